"""Every decode tile config of the W4A4 GEMM, timed as a model runs it, against what each tuning mode chooses.

Usage:
    PYTHONPATH=src python benchmarks/decode_tiles.py              # CUDA, LLaMA-2-7B and LLaMA-3-8B, 1 and 16 tokens
    PYTHONPATH=src python benchmarks/decode_tiles.py --tokens 1 16 64 --models llama-2-7b
    PYTHONPATH=src python benchmarks/decode_tiles.py --quick      # toy shapes, two configs, CPU interpreter
    PYTHONPATH=src python benchmarks/decode_tiles.py --rows clamped  # the kernel before it masked padding rows

For each decode GEMM of a model as the packed runtime runs it (q/k/v as one GEMM, o_proj with its residual,
gate/up as one GEMM, down_proj with its residual) and each token count: every candidate of the tile set that
serves it (up to 16 tokens the decode set, up to MEDIUM_M the batched-decode set) is timed as CUDA-graph replays
that cycle through copies of the weights larger than three times the L2 (``gemm_w4a4.time_rotating``: from HBM,
consecutive launches overlapping under programmatic dependent launch as a model's layers do). Then the choice of
each tuning mode (``FLATQUANT_DECODE_TUNE``: "graph", Triton's autotuner on replays of one call, the weights in
L2; "rotate", the rotating timing above) is timed the same way. The gap between the best candidate and a mode's
choice is what that mode leaves on the table. Results: ``benchmarks/results/decode_tiles.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU run goes through Triton's interpreter
os.environ.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # tune afresh: no results from earlier processes

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import gemm_w4a4 as gw  # noqa: E402
from flatquant.report import device_name  # noqa: E402

CUDA = torch.cuda.is_available()
# hidden size, intermediate size, attention heads, KV heads
MODELS = {"llama-2-7b": (4096, 11008, 32, 32), "llama-3-8b": (4096, 14336, 32, 8)}
QUICK_MODELS = {"tiny": (64, 96, 4, 2)}


def gemms(hidden: int, inter: int, heads: int, kv_heads: int) -> list[tuple[str, int, int, bool]]:
    """(name, K, N, residual) of a decoder layer's W4A4 GEMMs in the packed runtime."""
    qkv = hidden + 2 * kv_heads * (hidden // heads)
    return [("qkv", hidden, qkv, False), ("o", hidden, hidden, True), ("gate_up", hidden, 2 * inter, False),
            ("down", inter, hidden, True)]  # fmt: skip


def _timer(launch, weights) -> float:
    """Microseconds per weight: rotating graph replays on CUDA; one eager pass on the CPU (interpreter)."""
    if CUDA:
        return gw.time_rotating(launch, weights)
    t0 = time.perf_counter()
    for w in weights:
        launch(w)
    return (time.perf_counter() - t0) * 1e6 / len(weights)


def measure(name: str, k: int, n: int, m: int, residual: bool, max_configs: int | None) -> dict:
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=dev).manual_seed(k + n + m)
    codes = torch.randint(-8, 8, (m, k), generator=g, device=dev, dtype=torch.int8)
    xs, ws = torch.rand(m, device=dev) + 0.01, torch.rand(n, device=dev) * 0.01
    w = gw.pack_int4(torch.randint(-8, 8, (n, k), generator=g, device=dev, dtype=torch.int8))
    res = torch.randn(m, n, generator=g, device=dev).bfloat16() if residual else None
    copies = [w] + [torch.empty_like(w) for _ in range(gw.rotating_copies(w.numel(), _l2()) - 1)]

    def call(wc, config=None):
        return gw.w4a4_gemm(codes, xs, wc, ws, impl="triton", config=config, residual=res)

    tuned = gw._tuned_set(m, False)
    configs = gw._prune_residual(list(tuned.configs), {"HAS_RES": residual})[:max_configs]
    rec = {"layer": name, "K": k, "N": n, "M": m, "residual": residual, "copies": len(copies), "candidates": []}
    for cfg in configs:
        kw = gw._launch_kwargs(cfg)
        try:
            us = _timer(lambda wc, kw=kw: call(wc, kw), copies)
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            us, kw = float("inf"), {**kw, "error": f"{type(err).__name__}: {str(err)[:200]}"}
        rec["candidates"].append({"config": kw, "us": us})
    best = min(rec["candidates"], key=lambda c: c["us"])
    rec.update(best_us=best["us"], best_config=best["config"])
    if CUDA:  # what each tuning mode picks, timed like the candidates
        keep = gw.DECODE_TUNE
        try:
            for mode in ("graph", "rotate"):
                gw.DECODE_TUNE = mode
                call(w)
                cfg = gw.last_config(m)
                rec[f"{mode}_config"] = cfg
                rec[f"{mode}_us"] = _timer(lambda wc, cfg=cfg: call(wc, cfg), copies)
        finally:
            gw.DECODE_TUNE = keep
    rec["best_gbps"] = w.numel() / best["us"] / 1e3
    return rec


def _l2() -> int:
    return gw._l2_bytes(torch.device("cuda")) if CUDA else 0


def _short(cfg: dict | None) -> str:
    if not cfg:
        return "-"
    swap = "S" if cfg.get("SWAP_AB") else ""
    tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} sk{cfg.get('SPLIT_K', 1)}{swap}"
    return f"{tile} w{cfg.get('num_warps', '-')}s{cfg.get('num_stages', '-')}"


def _row(r: dict) -> str:
    nan = float("nan")
    return (
        f"{r['model']:12}{r['layer']:8}{r['K']:6d}{r['N']:7d}{r['M']:4d}  {r['best_us']:8.2f} "
        f"{_short(r['best_config']):<26}{r.get('graph_us', nan):9.2f} {_short(r.get('graph_config')):<26}"
        f"{r.get('rotate_us', nan):10.2f}"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results JSON [default benchmarks/results/decode_tiles.json]")
    p.add_argument("--quick", action="store_true", help="toy shapes and two configs (the CPU interpreter)")
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {sorted(MODELS)}")
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts M [default 1 16; quick 1]")
    p.add_argument(
        "--rows",
        choices=("masked", "clamped"),
        default="masked",
        help="padding rows of a tile with fewer tokens than BLOCK_M: masked (the kernel) or clamped onto row 0 "
        "(the kernel before 2026-11-29, for comparison)",
    )
    args = p.parse_args(argv)
    gw._MASK_ROWS = args.rows == "masked"
    models = QUICK_MODELS if args.quick else {k: MODELS[k] for k in (args.models or MODELS)}
    tokens = args.tokens or ([1] if args.quick else [1, 16])
    bad = [t for t in tokens if not 1 <= t <= gw.MEDIUM_M]
    if bad:
        raise SystemExit(f"--tokens must lie in [1, MEDIUM_M={gw.MEDIUM_M}] (decode sizes), got {bad}")
    if not args.quick and not CUDA:
        raise SystemExit("the full sweep needs a CUDA GPU; use --quick on CPU")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode_tiles.json")
    device = device_name(torch.device("cuda" if CUDA else "cpu"))
    result = {"device": device, "l2_bytes": _l2(), "pdl": CUDA and gw._pdl.pdl_on(torch.empty(0, device="cuda"))}
    result["rows"] = args.rows
    result["records"], start = [], time.time()
    print(f"{'model':12}{'layer':8}{'K':>6}{'N':>7}{'M':>4}  {'best us':>8} {'best tile':<26}{'graph us':>9}"
          f" {'graph tile':<26}{'rotate us':>10}")  # fmt: skip
    for model, dims in models.items():
        for name, k, n, residual in gemms(*dims):
            for m in tokens:
                rec = {"model": model, **measure(name, k, n, m, residual, 2 if args.quick else None)}
                rec["device"] = device
                result["records"].append(rec)
                print(_row(rec), flush=True)
                result["seconds"] = round(time.time() - start, 1)
                atomic_write_json(out, result)  # after every record: a run cut short keeps what it measured
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
