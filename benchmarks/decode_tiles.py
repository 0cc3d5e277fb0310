"""Every decode tile config of the W4A4 GEMM, timed as a model runs it, against what each tuning mode chooses.

Usage:
    PYTHONPATH=src python benchmarks/decode_tiles.py              # CUDA, LLaMA-2-7B and LLaMA-3-8B, 1 and 16 tokens
    PYTHONPATH=src python benchmarks/decode_tiles.py --tokens 1 16 64 --models llama-2-7b
    PYTHONPATH=src python benchmarks/decode_tiles.py --quick      # toy shapes, two configs, CPU interpreter
    PYTHONPATH=src python benchmarks/decode_tiles.py --rows clamped  # the kernel before it masked padding rows
    PYTHONPATH=src python benchmarks/decode_tiles.py --path gemv  # the CUDA-core kernel's candidates, 1-2 tokens

For each decode GEMM of a model as the packed runtime runs it (q/k/v as one GEMM, o_proj with its residual,
gate/up as one GEMM, down_proj with its residual) and each token count: every candidate of the tile set that
serves it (up to 16 tokens the decode set, up to MEDIUM_M the batched-decode set) is timed as CUDA-graph replays
that cycle through copies of the weights larger than three times the L2 (``gemm_w4a4.time_rotating``: from HBM,
consecutive launches overlapping under programmatic dependent launch as a model's layers do). Then the choice of
each tuning mode (``FLATQUANT_DECODE_TUNE``: "graph", Triton's autotuner on replays of one call, the weights in
L2; "rotate", the rotating timing above) is timed the same way. The gap between the best candidate and a mode's
choice is what that mode leaves on the table. Results: ``benchmarks/results/decode_tiles.json`` (``--out``).

``--path gemv`` does the same for the CUDA-core decode kernel (``gemv_w4a4``, 1-2 tokens), each candidate timed twice:
alone, and right after the layer's transform + quantize (``kron_quantize`` of a 16-bit input with the layer's
Kronecker factors, whose codes the GEMM then reads), as a layer runs it, where the weights a candidate reads before
its wait stream while the transform still runs. The autotuner times the GEMM alone; the gap between the best
candidate after the transform and the tuner's choice after the transform is what tuning in the layer's context
could gain. Results: ``benchmarks/results/decode_gemv.json``.
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
from flatquant.kernels import gemv_w4a4 as gv  # noqa: E402
from flatquant.kernels.w4a4_linear import quantize_operand  # noqa: E402
from flatquant.report import device_name  # noqa: E402
from flatquant.transforms import kron_factors  # noqa: E402

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


def measure_gemv(name: str, k: int, n: int, m: int, residual: bool, max_configs: int | None) -> dict:
    """Every CUDA-core candidate for m tokens, alone and after the layer's transform, and the autotuner's choice."""
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=dev).manual_seed(k + n + m)
    dtype = torch.bfloat16 if CUDA else torch.float32  # (the interpreter's bf16 is slow)
    x = torch.randn(m, k, generator=g, device=dev, dtype=dtype)
    n1, n2 = kron_factors(k)  # the method's pairs: 64 x 64, 86 x 128, 112 x 128
    # contiguous, as the runtime holds them (QR's Q is column-major: the transform would copy it on every call)
    p1 = torch.linalg.qr(torch.randn(n1, n1, generator=g, device=dev))[0].to(dtype).contiguous()
    p2 = torch.linalg.qr(torch.randn(n2, n2, generator=g, device=dev))[0].to(dtype).contiguous()
    codes, xs = quantize_operand(x, p1, p2, 0.9, 0.9)
    ws = torch.rand(n, device=dev) * 0.01
    w = gw.pack_int4(torch.randint(-8, 8, (n, k), generator=g, device=dev, dtype=torch.int8))
    res = torch.randn(m, n, generator=g, device=dev).to(dtype) if residual else None
    copies = [w] + [torch.empty_like(w) for _ in range(gw.rotating_copies(w.numel(), _l2()) - 1)]

    def alone(wc, config=None):
        return gw.w4a4_gemm(codes, xs, wc, ws, impl="triton", path="gemv", config=config, residual=res, out_dtype=dtype)

    def layer(wc, config=None):
        c, s = quantize_operand(x, p1, p2, 0.9, 0.9)
        return gw.w4a4_gemm(c, s, wc, ws, impl="triton", path="gemv", config=config, residual=res, out_dtype=dtype)

    configs = gv._prune(gv.CONFIGS, {"M": m})[:max_configs]
    rec = {"layer": name, "K": k, "N": n, "M": m, "residual": residual, "copies": len(copies), "candidates": []}
    rec["transform_us"] = _timer(lambda wc: quantize_operand(x, p1, p2, 0.9, 0.9), copies)
    for cfg in configs:
        kw = gw._launch_kwargs(cfg)
        entry = {"config": kw}
        for label, fn in (("us", alone), ("layer_us", layer)):
            try:
                entry[label] = _timer(lambda wc, kw=kw, fn=fn: fn(wc, kw), copies)
            except Exception as err:  # noqa: BLE001 - reported, not fatal
                entry[label], entry["error"] = float("inf"), f"{type(err).__name__}: {str(err)[:200]}"
        rec["candidates"].append(entry)
    best = min(rec["candidates"], key=lambda c: c["us"])
    best_layer = min(rec["candidates"], key=lambda c: c["layer_us"])
    rec.update(best_us=best["us"], best_config=best["config"], best_config_layer_us=best["layer_us"])
    rec.update(best_layer_us=best_layer["layer_us"], best_layer_config=best_layer["config"])
    if CUDA:  # the autotuner's choice (graph replays of the GEMM alone), timed like the candidates
        alone(w)
        cfg = gv.last_gemv_config()
        rec.update(graph_config=cfg, graph_us=_timer(lambda wc: alone(wc, cfg), copies))
        rec["graph_layer_us"] = _timer(lambda wc: layer(wc, cfg), copies)
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


def _short_gemv(cfg: dict | None) -> str:
    if not cfg:
        return "-"
    head = cfg.get("BLOCK_KW0", cfg["BLOCK_KW"])
    ahead = f" a{cfg['AHEAD']}" if cfg.get("AHEAD", 1) > 1 else ""
    return f"{cfg['BLOCK_N']}x{cfg['BLOCK_KW']} h{head} sk{cfg.get('SPLIT_K', 1)} w{cfg.get('num_warps', '-')}{ahead}"


def _lead(r: dict) -> str:
    """A row's model, layer and shape columns."""
    return f"{r['model']:12}{r['layer']:8}{r['K']:6d}{r['N']:7d}{r['M']:4d}"


def _row_gemv(r: dict) -> str:
    nan = float("nan")
    alone = f"{r['best_us']:7.2f} {r['best_config_layer_us']:8.2f} {_short_gemv(r['best_config']):<20}"
    layer = f"{r['best_layer_us']:8.2f} {_short_gemv(r['best_layer_config']):<20}"
    graph = f"{r.get('graph_us', nan):8.2f}{r.get('graph_layer_us', nan):9.2f} {_short_gemv(r.get('graph_config'))}"
    return f"{_lead(r)}{r['transform_us']:8.2f}  {alone}{layer}{graph}"


def _row(r: dict) -> str:
    nan = float("nan")
    return (
        f"{_lead(r)}  {r['best_us']:8.2f} {_short(r['best_config']):<26}{r.get('graph_us', nan):9.2f} "
        f"{_short(r.get('graph_config')):<26}{r.get('rotate_us', nan):10.2f}"
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
    p.add_argument(
        "--path", choices=("tiles", "gemv"), default="tiles",
        help="tiles: the tensor-core decode tiles; gemv: the CUDA-core kernel (1-2 tokens), alone and after the "
        "layer's transform",
    )  # fmt: skip
    args = p.parse_args(argv)
    gw._MASK_ROWS = args.rows == "masked"
    gemv = args.path == "gemv"
    models = QUICK_MODELS if args.quick else {k: MODELS[k] for k in (args.models or MODELS)}
    tokens = args.tokens or ([1] if args.quick else [1, 2] if gemv else [1, 16])
    most = gv.MAX_M if gemv else gw.MEDIUM_M
    bad = [t for t in tokens if not 1 <= t <= most]
    if bad:
        limit = f"MAX_M={gv.MAX_M} (the CUDA-core kernel)" if gemv else f"MEDIUM_M={gw.MEDIUM_M} (decode sizes)"
        raise SystemExit(f"--tokens must lie in [1, {limit}], got {bad}")
    if not args.quick and not CUDA:
        raise SystemExit("the full sweep needs a CUDA GPU; use --quick on CPU")
    name = "decode_gemv.json" if gemv else "decode_tiles.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    device = device_name(torch.device("cuda" if CUDA else "cpu"))
    result = {"device": device, "l2_bytes": _l2(), "pdl": CUDA and gw._pdl.pdl_on(torch.empty(0, device="cuda"))}
    result["rows"], result["path"] = args.rows, args.path
    result["records"], start = [], time.time()
    if gemv:
        print(f"{'model':12}{'layer':8}{'K':>6}{'N':>7}{'M':>4}{'kron us':>8}  {'best us':>7} {'layer us':>8} "
              f"{'best tile (alone)':<20}{'layer us':>8} {'best tile (layer)':<20}{'graph us':>8}{'layer us':>9} "
              "graph tile")  # fmt: skip
    else:
        print(f"{'model':12}{'layer':8}{'K':>6}{'N':>7}{'M':>4}  {'best us':>8} {'best tile':<26}{'graph us':>9}"
              f" {'graph tile':<26}{'rotate us':>10}")  # fmt: skip
    for model, dims in models.items():
        for name, k, n, residual in gemms(*dims):
            for m in tokens:
                run = measure_gemv if gemv else measure
                rec = {"model": model, **run(name, k, n, m, residual, 2 if args.quick else None)}
                rec["device"] = device
                result["records"].append(rec)
                print((_row_gemv if gemv else _row)(rec), flush=True)
                result["seconds"] = round(time.time() - start, 1)
                atomic_write_json(out, result)  # after every record: a run cut short keeps what it measured
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
