"""Benchmark the W4A4 GEMM and the full W4A4 layer against BF16 nn.Linear (cuBLAS) on LLaMA layer shapes.

Usage: PYTHONPATH=src python benchmarks/gemm.py [--out benchmarks/results/gemm.json] [--quick]

Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), so Python launch overhead is
excluded, as it is when a model runs decode under CUDA graphs. Each timed call cycles through enough copies
of the weights to overflow L2 (> 3x its size), so small-M figures are HBM-bound, not L2-bound. Ceilings
(a bf16 8192^3 matmul and a large device copy) are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton
from torch import nn

from flatquant.kernels.gemm_w4a4 import SMALL_M, pack_int4, w4a4_gemm
from flatquant.kernels.w4a4_linear import W4A4Linear

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (4096, 12288)]  # K -> N
TOKENS = [1, 16, 256, 2048, 8192]
FACTORS = {4096: (64, 64), 11008: (86, 128), 14336: (112, 128)}  # Kronecker factor sizes (method.md)


def bench(fn, n_calls: int = 1) -> float:
    """Median microseconds of one call of ``fn`` (which performs ``n_calls`` operations), under a CUDA graph."""
    fn()
    fn()  # autotune and compile outside the graph
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
    except TypeError:  # older triton without return_mode
        ms = triton.testing.do_bench_cudagraph(fn, rep=30)
    return 1000.0 * ms / n_calls


def n_copies(weight_bytes: int) -> int:
    """How many weight copies to cycle through so that together they exceed three times the L2 size."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, math.ceil(3 * l2 / weight_bytes)))


def ceilings() -> dict:
    """Measured bf16 matmul TFLOP/s (8192^3) and device-copy GB/s (bytes read + written)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ b)
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    c = bench(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * 8192**3 / t / 1e6, "copy_gbps": 2 * src.numel() / c / 1e3}


def _check_ptx() -> list[str]:
    """Which tensor-core instructions the compiled GEMM kernels use (wgmma s8 / e4m3, or mma.sync)."""
    from flatquant.kernels import gemm_w4a4

    found = []
    try:
        caches = gemm_w4a4._kernel.fn.device_caches
        for dev_cache in caches.values():
            for kernel in dev_cache[0].values():
                ptx = kernel.asm.get("ptx", "")
                kinds = sorted({w for w in ("wgmma.mma_async", "mma.sync", ".s8", ".e4m3") if w in ptx})
                found.append(f"{kernel.name}: {' '.join(kinds)}")
    except Exception as err:  # the cache layout differs between triton versions
        found.append(f"(could not inspect kernels: {err!r})")
    return found


def run_shape(k: int, n: int, m: int, paths: list[str]) -> dict:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(k + n + m)
    # BF16 cuBLAS baseline
    nb = n_copies(2 * n * k)
    linears = [nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(nb)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        bf16_us = bench(lambda: [lin(x) for lin in linears], nb)
        weight = linears[0].weight.detach().clone()
    linears = None  # free the bf16 weights
    # GEMM alone
    nq = n_copies(n * k // 2)
    codes = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8, generator=gen)
    x_scale = torch.rand(m, device=dev) + 0.01
    w_scale = torch.rand(n, device=dev) + 0.01
    packed = [pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)) for _ in range(nq)]
    rec = {"K": k, "N": n, "M": m, "bf16_us": bf16_us}
    for path in paths:
        xin = codes.to(torch.float8_e4m3fn) if path == "fp8" else codes  # each path's native operand
        try:
            rec[f"gemm_{path}_us"] = bench(
                lambda p=path, xin=xin: [w4a4_gemm(xin, x_scale, w, w_scale, path=p) for w in packed], nq
            )
        except Exception as err:  # a path that fails to compile is reported, not fatal
            print(f"  {path} failed at {k=} {n=} {m=}: {err!r}"[:400])
            rec[f"gemm_{path}_us"] = float("inf")
    packed = None
    # full layer: transform + quantize + GEMM
    n1, n2 = FACTORS[k]
    p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0]
    p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0]
    layers = [W4A4Linear.from_float(weight, None, p1, p2, act_clip=0.9) for _ in range(nq)]
    for name, fp8 in (("layer_us", True), ("layer_int8_us", False)):
        for layer in layers:
            layer.prefill_fp8 = fp8  # int8 codes to the FP8 GEMM (one conversion pass) or to the INT8 one
        try:
            with torch.no_grad():
                rec[name] = bench(lambda: [layer(x) for layer in layers], nq)
        except Exception as err:
            print(f"  layer failed at {k=} {n=} {m=}: {err!r}"[:400])
            rec[name] = float("inf")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gemm.json")
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--paths", default="int8,fp8", help="tensor-core paths to time")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    print(f"{device}: bf16 {ceil['bf16_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    paths = args.paths.split(",")
    shapes = SHAPES[:1] + SHAPES[4:5] if args.quick else SHAPES
    records = []
    hdr = f"{'K':>6} {'N':>6} {'M':>5} {'bf16us':>8} " + " ".join(f"{p + 'us':>8}" for p in paths)
    print(hdr + f" {'layerus':>8} {'l_int8':>8} {'path':>5} {'gemm_x':>6} {'layer_x':>7} {'TFLOP/s':>7} {'GB/s':>6}")
    for k, n in shapes:
        for m in TOKENS:
            rec = run_shape(k, n, m, paths)
            # the path the dispatcher picks by default (fp8 codes: fp8 above SMALL_M, else int8)
            default = "fp8" if m > SMALL_M and "fp8" in paths else "int8"
            best = min(paths, key=lambda p: rec[f"gemm_{p}_us"])
            rec.update(path=default, best_path=best, gemm_us=rec[f"gemm_{default}_us"], device=device)
            t = rec["gemm_us"]
            rec["gemm_tflops"] = 2 * m * n * k / t / 1e6
            rec["gemm_gbps"] = (n * k / 2 + m * k + 2 * m * n + 4 * (m + n)) / t / 1e3
            rec["bf16_tflops"] = 2 * m * n * k / rec["bf16_us"] / 1e6
            rec["bf16_gbps"] = 2 * (n * k + m * k + m * n) / rec["bf16_us"] / 1e3
            records.append(rec)
            times = " ".join(f"{rec[f'gemm_{p}_us']:8.1f}" for p in paths)
            print(
                f"{k:6d} {n:6d} {m:5d} {rec['bf16_us']:8.1f} {times} {rec['layer_us']:8.1f} "
                f"{rec['layer_int8_us']:8.1f} {default:>5} "
                f"{rec['bf16_us'] / t:6.2f} {rec['bf16_us'] / rec['layer_us']:7.2f} "
                f"{rec['gemm_tflops']:7.0f} {rec['gemm_gbps']:6.0f}",
                flush=True,
            )
    kernels = _check_ptx()
    print("\n".join(kernels))
    from flatquant.kernels import gemm_w4a4

    tuned = {f"{name}{key}": str(cfg) for name, t in (("large", gemm_w4a4._large), ("small", gemm_w4a4._small))
             for key, cfg in getattr(t, "cache", {}).items()}  # fmt: skip
    print("\n".join(f"{k_}: {v}" for k_, v in tuned.items()))
    result = {
        "device": device,
        "small_m": SMALL_M,
        "ceilings": ceil,
        "kernels": kernels,
        "tuned": tuned,
        "records": records,
    }
    for path in [args.out] + ([os.path.join(os.environ["OUT"], "gemm.json")] if os.environ.get("OUT") else []):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
