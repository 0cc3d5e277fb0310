"""Evaluation reports: every number and setting in one JSON, a markdown table and a perplexity plot beside it.

A *record* is one evaluated setting (a flat dict written by the CLI: model, method, bits, ``<text>_ppl``,
``zeroshot`` scores, the flatquant config, library versions, device). A report gathers records from one or
several runs and renders them side by side. Every file is written under a temporary name, then renamed.
"""

from __future__ import annotations

import io
import json
import math
import os
from importlib.metadata import PackageNotFoundError, version

import torch

from .files import atomic_write

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "perplexity.png"
_PACKAGES = ("torch", "transformers", "lm-eval", "flatquant")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the numbers (``None`` when not installed)."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: str | torch.device | None = None) -> str:
    """The accelerator's name (e.g. 'NVIDIA H100 80GB HBM3') or 'cpu'."""
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return "cpu"


def load_records(paths: list[str]) -> list[dict]:
    """Records from result files: a JSON list of records (``--results-json``) or a report JSON."""
    records = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"result file {path} does not exist")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not JSON: {e}") from e
        data = data.get("records") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(r, dict) and "method" in r for r in data):
            raise ValueError(f"{path} holds no result records (a JSON list of dicts with 'method')")
        records += [{**r, "source": r.get("source", path)} for r in data]
    return records


def _ppl_names(records: list[dict]) -> list[str]:
    names = []
    for r in records:
        names += [k[: -len("_ppl")] for k in r if k.endswith("_ppl") and k[: -len("_ppl")] not in names]
    return names


def _task_columns(records: list[dict]) -> list[tuple[str, str]]:
    columns = []
    for r in records:
        for task, score in (r.get("zeroshot") or {}).items():
            if (task, score["metric"]) not in columns:
                columns.append((task, score["metric"]))
    return columns


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:.{digits}f}"


def markdown_table(records: list[dict]) -> str:
    """One row per record: perplexities (lower is better), zero-shot accuracies in % and the paper's mean."""
    ppl, tasks = _ppl_names(records), _task_columns(records)
    has_mean = any(r.get("paper_mean") is not None for r in records)
    header = ["model", "method", "W/A/KV", *(f"{n} PPL" for n in ppl), *(f"{t} {m}" for t, m in tasks)]
    header += ["mean (6 tasks)"] if has_mean else []
    rows = [header, ["---"] * 3 + ["---:"] * (len(header) - 3)]
    for r in records:
        scores = r.get("zeroshot") or {}
        row = [os.path.basename(os.path.normpath(str(r.get("model", "")))), r["method"]]
        row.append(f"{r.get('w_bits')}/{r.get('a_bits')}/{r.get('kv_bits')}")
        row += [_fmt(r.get(f"{n}_ppl"), digits=3) for n in ppl]
        row += [_fmt(scores[t]["value"], 100) if scores.get(t, {}).get("metric") == m else "–" for t, m in tasks]
        row += [_fmt(r.get("paper_mean"), 100)] if has_mean else []
        rows.append(row)
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows) + "\n"


def _plot(records: list[dict], path: str) -> bool:
    """A bar chart of perplexity per setting; ``False`` (nothing written) without matplotlib or perplexities."""
    names = _ppl_names(records)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not names:
        return False
    labels = [f"{r['method']} {r.get('w_bits')}/{r.get('a_bits')}/{r.get('kv_bits')}" for r in records]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(records), 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [r.get(f"{name}_ppl", float("nan")) for r in records]
        ax.bar([j + i * width for j in range(len(records))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))], labels, rotation=20, ha="right")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write(path, png.getvalue())
    return True


def write_report(records: list[dict], out_dir: str) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) ``perplexity.png`` into ``out_dir``.

    Returns ``{kind: path}`` of the files written.
    """
    if not records:
        raise ValueError("no records to report")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, REPORT_JSON), "markdown": os.path.join(out_dir, REPORT_MD)}
    report = {
        "records": records,
        "report_environment": {"versions": library_versions(), "device": device_name()},
    }
    atomic_write(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write(paths["markdown"], markdown_table(records))
    png = os.path.join(out_dir, REPORT_PNG)
    if _plot(records, png):
        paths["plot"] = png
    return paths
