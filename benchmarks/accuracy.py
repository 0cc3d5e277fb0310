"""Accuracy benchmark: FP vs RTN vs fixed rotation vs FlatQuant on the default model (SmolLM2-135M).

Perplexity on the offline ``wiki`` and ``c4`` texts in non-overlapping 2048-token windows, W4A4KV4
(weights and activations symmetric, KV asymmetric, RTN weights), plus W4A16. Prints a table and writes
``benchmarks/results/accuracy.json`` (records keyed by model, method and bits are replaced).

    python benchmarks/accuracy.py                       # everything, paper preset (use a GPU)
    python benchmarks/accuracy.py --preset quick --eval-windows 4 --runs fp rtn
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import flatquant as fq
from flatquant.data import calibration_windows, eval_windows, load_text, tokenize
from flatquant.evaluate import perplexity
from flatquant.files import atomic_write_json
from flatquant.loading import DEFAULT_MODEL, load_model

RUNS = {  # name: (method, bit overrides)
    "fp": (None, {}),
    "rtn": ("rtn", {}),
    "rotation": ("rotation", {}),
    "flatquant": ("flatquant", {}),
    "rtn-w4a16": ("rtn", {"a_bits": 16, "k_bits": 16, "v_bits": 16}),
    "flatquant-w4a16": ("flatquant", {"a_bits": 16, "k_bits": 16, "v_bits": 16}),
}
RESULTS = os.path.join(os.path.dirname(__file__), "results", "accuracy.json")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--preset", default="paper")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many windows per text")
    p.add_argument("--calib-data", default="wiki-summaries", help="calibration text: name or file")
    p.add_argument("--wiki", default="wiki", help="the wiki evaluation text: name or file")
    p.add_argument("--c4", default="c4", help="the c4 evaluation text: name or file")
    p.add_argument("--label", default=None, help="model name written in the records [default --model]")
    p.add_argument("--save", default=None, help="save the FlatQuant W4A4KV4 calibration to this folder")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--state-dir", default=None, help="resumable calibration state of the FlatQuant runs")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. epochs=5 weight_decay=0.01")
    args = p.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value

    base, tok = load_model(args.model)
    sources = {"wiki": args.wiki, "c4": args.c4}
    texts = {n: eval_windows(tokenize(tok, load_text(src)), 2048, args.eval_windows) for n, src in sources.items()}
    calib_ids = tokenize(tok, load_text(args.calib_data))
    records = []
    for run in args.runs:
        method, bits = RUNS[run]
        model = copy.deepcopy(base)
        cfg, seconds, peak = None, None, None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if method is not None:
            cfg = fq.preset(args.preset, method=method, **bits, **overrides)
            windows = None
            if method == "flatquant":
                windows = calibration_windows(calib_ids, cfg.nsamples, cfg.seqlen, cfg.seed)
            t0 = time.perf_counter()
            state = None if args.state_dir is None or method != "flatquant" else f"{args.state_dir}/{run}"
            fq.quantize(model, cfg, windows, state_dir=state)
            seconds = time.perf_counter() - t0
            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated()
            if args.save and run == "flatquant":
                fq.save_quantized(model, args.save, overwrite=True)
        ppl = {f"{name}_ppl": perplexity(model, w, desc=f"{run} {name}") for name, w in texts.items()}
        rec = {
            "model": args.label or args.model,
            "method": method or "fp",
            "w_bits": cfg.w_bits if cfg else 16,
            "a_bits": cfg.a_bits if cfg else 16,
            "kv_bits": cfg.k_bits if cfg else 16,
            "weights": "rtn" if cfg else None,
            **ppl,
            "eval_windows": {name: int(w.shape[0]) for name, w in texts.items()},
            "calib_seconds": seconds,
            "peak_gpu_bytes": peak,
            "device": _device_name(),
            "preset": args.preset if cfg and method == "flatquant" else None,
            "config": cfg.to_dict() if cfg else None,
            "torch": torch.__version__,
        }
        records.append(rec)
        _merge_results(args.results, [rec])  # written as we go: a cut-off run keeps what it measured
        print(json.dumps({k: rec[k] for k in ("method", "w_bits", "a_bits", "kv_bits", "wiki_ppl", "c4_ppl")}))
        del model

    print(f"\n{'run':<18}{'W/A/KV':<10}{'wiki PPL':>10}{'c4 PPL':>10}{'calib s':>10}{'peak GiB':>10}  device")
    for run, r in zip(args.runs, records, strict=True):
        secs = f"{r['calib_seconds']:.1f}" if r["calib_seconds"] is not None else "-"
        peak = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r["peak_gpu_bytes"] else "-"
        bits = f"{r['w_bits']}/{r['a_bits']}/{r['kv_bits']}"
        print(f"{run:<18}{bits:<10}{r['wiki_ppl']:>10.2f}{r['c4_ppl']:>10.2f}{secs:>10}{peak:>10}  {r['device']}")


def _merge_results(path: str, records: list[dict]) -> None:
    def key(r):
        return (r["model"], r["method"], r["w_bits"], r["a_bits"], r["kv_bits"], r.get("weights"))

    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    atomic_write_json(path, merged)


if __name__ == "__main__":
    main()
