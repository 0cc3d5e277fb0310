"""Accuracy benchmark: FP vs RTN vs fixed rotation vs FlatQuant, RTN or GPTQ weights, several bit settings.

SmolLM2-135M (the default model), perplexity on the offline ``wiki`` and ``c4`` texts in non-overlapping
2048-token windows. A run is ``METHOD-SETTING`` (e.g. ``flatquant-w4a16``) or ``fp``. Each run calibrates
once and then rounds the weights of deep copies of the calibrated model with every ``--weights`` method, so
RTN and GPTQ of one setting share one calibration and give one record each (a setting without weight
quantization, e.g. K4V4, gives one record with ``weights`` null). Prints a table and merges the records
into ``benchmarks/results/accuracy.json`` (a record with the same model, method, bits, weights, notes and
calibration text is replaced; the file is locked while it is rewritten, so several processes may share it).

    python benchmarks/accuracy.py                       # the default runs, paper preset (use a GPU)
    python benchmarks/accuracy.py --runs flatquant-w4a16 rtn-w4a16 --state-dir runs/state
    python benchmarks/accuracy.py --preset quick --eval-windows 4 --runs fp rtn-w4a4kv4 --results runs/quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import time

import torch

import flatquant as fq
from flatquant import calibrate
from flatquant.config import calibration_for, describe_overrides
from flatquant.data import calibration_mixture, eval_windows, load_text, mixture_parts, tokenize
from flatquant.evaluate import perplexity
from flatquant.files import atomic_write_json
from flatquant.loading import DEFAULT_MODEL, load_model

OFF = {"a_bits": 16, "k_bits": 16, "v_bits": 16}
SETTINGS = {  # name: config fields
    "w4a4kv4": {},
    "w4a16": {**OFF},
    "w3a16": {**OFF, "w_bits": 3},
    "w4a8": {**OFF, "a_bits": 8},
    "k4v4": {"w_bits": 16, "a_bits": 16},
    "k3v3": {"w_bits": 16, "a_bits": 16, "k_bits": 3, "v_bits": 3},
    "k2v2": {"w_bits": 16, "a_bits": 16, "k_bits": 2, "v_bits": 2},
    "w3a3kv3": {"w_bits": 3, "a_bits": 3, "k_bits": 3, "v_bits": 3},
    "w4a4kv4-down8": {"overrides": {"down_proj": {"w_bits": 8, "a_bits": 8}}},  # the paper's mixed precision
}
METHODS = ("flatquant", "rtn", "rotation")
RUNS = ["fp"] + [f"{m}-{s}" for m in METHODS for s in SETTINGS]
ALIASES = {"rtn": "rtn-w4a4kv4", "rotation": "rotation-w4a4kv4", "flatquant": "flatquant-w4a4kv4"}
DEFAULT_RUNS = ["fp", "rotation-w4a4kv4"] + [
    f"{m}-{s}" for m in ("flatquant", "rtn") for s in ("w4a4kv4", "w4a16", "w3a16", "k4v4", "w3a3kv3", "w4a4kv4-down8")
]
RESULTS = os.path.join(os.path.dirname(__file__), "results", "accuracy.json")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _parse_set(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; a VALUE that is JSON (numbers, true/false/null, lists, objects) is parsed, any
    other VALUE stays a string (``autocast_dtype=float32``)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set takes KEY=VALUE pairs, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def calib_label(spec: str) -> str:
    """The calibration text(s) as recorded: files by their base names (no machine paths), names as given, each
    text as many times as its shares."""

    def label(name: str) -> str:  # a path, existing or not, by its base name
        return os.path.basename(os.path.normpath(name)) if os.sep in name else model_label(name)

    return "+".join(label(name) for name, n in mixture_parts(spec).items() for _ in range(n))


def _notes(cfg, extra: dict, calib: str | None = None) -> str | None:
    """What sets a record apart from its setting's defaults: bit overrides, ``--set`` values and a calibration
    mixture (``calib``: the text of a run that calibrates; a single text is the default's stand-in, e.g. the
    same file given by path, and the record's ``calib`` field names it)."""
    parts = [describe_overrides(cfg.overrides)] if cfg.overrides else []
    parts += [f"{k}={v}" for k, v in sorted(extra.items())]
    if calib is not None and len(mixture_parts(calib)) > 1:
        parts.append(f"calib={calib_label(calib)}")
    return "; ".join(parts) or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--preset", default="paper")
    p.add_argument(
        "--runs",
        nargs="+",
        default=DEFAULT_RUNS,
        choices=RUNS + list(ALIASES),
        metavar="RUN",
        help=f"fp or METHOD-SETTING with METHOD in {METHODS}, SETTING in {list(SETTINGS)}",
    )
    p.add_argument("--weights", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"], help="weight rounding")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many windows per text")
    p.add_argument(
        "--calib-data",
        default=None,
        help="calibration text: name or file, or a mixture NAME+NAME+... (flatquant.data.calibration_mixture) "
        "[default: the preset's, flatquant.config.calibration_for]",
    )
    p.add_argument("--wiki", default="wiki", help="the wiki evaluation text: name or file")
    p.add_argument("--c4", default="c4", help="the c4 evaluation text: name or file")
    p.add_argument("--label", default=None, help="model name in the records [default: --model; a path: its base name]")
    p.add_argument("--save", default=None, help="save flatquant-w4a4kv4 to SAVE-rtn / SAVE-gptq")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--state-dir", default=None, help="resumable calibration state, one subfolder per run")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. epochs=5 weight_decay=0.01")
    args = p.parse_args()
    extra = _parse_set(args.set)
    runs = [ALIASES.get(r, r) for r in args.runs]

    base, tok = load_model(args.model)
    sources = {"wiki": args.wiki, "c4": args.c4}
    texts = {n: eval_windows(tokenize(tok, load_text(src)), 2048, args.eval_windows) for n, src in sources.items()}
    if args.calib_data is None:
        args.calib_data = calibration_for(args.preset)
    mixture_parts(args.calib_data)  # a malformed mixture fails before any run
    records = []
    for run in runs:
        for rec in _run(run, base, tok, texts, extra, args):
            records.append(rec)
            _merge_results(args.results, [rec])  # written as we go: a cut-off run keeps what it measured
            print(json.dumps({k: rec[k] for k in ("run", "weights", "wiki_ppl", "c4_ppl", "notes")}), flush=True)

    header = f"{'run':<24}{'weights':<8}{'W/A/K/V':<11}{'wiki PPL':>10}{'c4 PPL':>10}{'calib s':>9}{'round s':>9}"
    print(f"\n{header}{'peak GiB':>9}  device")
    for r in records:
        secs = f"{r['calib_seconds']:.1f}" if r["calib_seconds"] is not None else "-"
        rnd = f"{r['round_seconds']:.1f}" if r["round_seconds"] is not None else "-"
        peak = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r["peak_gpu_bytes"] else "-"
        bits = f"{r['w_bits']}/{r['a_bits']}/{r['kv_bits']}/{r['v_bits']}"
        print(
            f"{r['run']:<24}{r['weights'] or '-':<8}{bits:<11}{r['wiki_ppl']:>10.2f}{r['c4_ppl']:>10.2f}"
            f"{secs:>9}{rnd:>9}{peak:>9}  {r['device']}" + (f"  ({r['notes']})" if r["notes"] else "")
        )


def _run(run: str, base, tok, texts, extra: dict, args):
    """Calibrate ``run`` once, then evaluate it with each weight rounding; yields one record per rounding."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if run == "fp":
        yield _record(run, args, None, None, base, texts, None, None, extra)
        return
    method, setting = run.split("-", 1)
    cfg = fq.preset(args.preset, method=method, **SETTINGS[setting], **extra)
    windows = _calibration(tok, args.calib_data, cfg.nsamples, cfg.seqlen, cfg.seed)
    model = copy.deepcopy(base)
    state = None if args.state_dir is None or method != "flatquant" else os.path.join(args.state_dir, run)
    t0 = time.perf_counter()
    result = fq.quantize(model, cfg, windows, state_dir=state, merge=False)
    calib_seconds = time.perf_counter() - t0
    rounds = args.weights if _quantizes_weights(cfg) else [None]
    for k, weights in enumerate(rounds):
        m = model if k == len(rounds) - 1 else copy.deepcopy(model)  # the last rounding may consume the original
        t0 = time.perf_counter()
        fq.round_weights(m, result, windows, weight_method=weights or "rtn")
        round_seconds = time.perf_counter() - t0
        if args.save and run == "flatquant-w4a4kv4":
            fq.save_quantized(m, f"{args.save}-{weights}", overwrite=True)
        yield _record(run, args, m.flatquant.config, weights, m, texts, calib_seconds, round_seconds, extra)
        del m


_WINDOWS: dict[tuple, torch.Tensor] = {}


def _calibration(tok, spec: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration windows, tokenised once per (text, size, seed) for all runs of the process."""
    key = (spec, nsamples, seqlen, seed)
    if key not in _WINDOWS:
        _WINDOWS[key] = calibration_mixture(tok, spec, nsamples, seqlen, seed)
    return _WINDOWS[key]


def _quantizes_weights(cfg) -> bool:
    return cfg.w_bits < 16 or any(b.get("w_bits", 16) < 16 for b in cfg.overrides.values())


def model_label(model: str) -> str:
    """The model's name in the records: a local file or folder by its base name (the records never carry
    a machine's paths), a hub id or built-in name as given."""
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


def _record(run, args, cfg, weights, model, texts, calib_seconds, round_seconds, extra: dict) -> dict:
    label = f"{run} {weights or ''}".strip()
    trains = cfg is not None and cfg.method == "flatquant"
    calib = calib_label(args.calib_data) if trains or weights == "gptq" else None  # the text it calibrated on
    ppl = {f"{name}_ppl": perplexity(model, w, desc=f"{label} {name}") for name, w in texts.items()}
    return {
        "model": args.label or model_label(args.model),
        "run": run,
        "method": cfg.method if cfg else "fp",
        "w_bits": cfg.w_bits if cfg else 16,
        "a_bits": cfg.a_bits if cfg else 16,
        "kv_bits": cfg.k_bits if cfg else 16,
        "v_bits": cfg.v_bits if cfg else 16,
        "weights": weights,
        "notes": _notes(cfg, extra, calib) if cfg else None,
        "calib": calib,
        **ppl,
        "eval_windows": {name: int(w.shape[0]) for name, w in texts.items()},
        "calib_seconds": calib_seconds,
        "round_seconds": round_seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        # steps replayed from CUDA graphs (where they could be captured; the log says otherwise)
        "calib_graph": (calibrate.CALIB_GRAPH and torch.cuda.is_available()) if trains else None,
        "device": _device_name(),
        "preset": args.preset if cfg and cfg.method == "flatquant" else None,
        "config": cfg.to_dict() if cfg else None,
        "torch": torch.__version__,
    }


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path + '.lock'`` for a read-modify-write shared by parallel processes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _merge_results(path: str, records: list[dict]) -> None:
    def key(r):
        bits = (r["w_bits"], r["a_bits"], r["kv_bits"], r.get("v_bits", r["kv_bits"]))
        return (r["model"], r["method"], *bits, r.get("weights"), r.get("notes"), r.get("calib"))

    with _locked(path):
        old = []
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        new_keys = {key(r) for r in records}
        merged = [r for r in old if key(r) not in new_keys] + records
        atomic_write_json(path, merged)


if __name__ == "__main__":
    main()
