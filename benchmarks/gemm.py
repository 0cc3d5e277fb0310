"""Benchmark the W4A4 GEMM and the full W4A4 layer against BF16 nn.Linear (cuBLAS) on LLaMA layer shapes.

Usage:
    PYTHONPATH=src python benchmarks/gemm.py             # CUDA, about 2-3 minutes on an H100
    PYTHONPATH=src python benchmarks/gemm.py --quick     # toy sizes; runs on CPU (interpreter) too
    PYTHONPATH=src python benchmarks/gemm.py --paths auto,fp8   # also time the FP8 tensor-core path

Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), so Python launch overhead is
excluded, as it is when a model runs decode under CUDA graphs. Each timed call cycles through enough copies
of the weights to overflow L2 (> 3x its size), so small-M figures are HBM-bound, not L2-bound. Ceilings
(a bf16 8192^3 matmul and a large device copy) are measured in the same run. Every shape is called before it
is timed (autotuning outside the numbers); each record names the tensor-core path really taken (``path``,
from the dispatcher's own rule) and the tile config the autotuner chose.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU run goes through Triton's interpreter
os.environ.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # tune afresh: no results from earlier processes

import triton  # noqa: E402
from torch import nn  # noqa: E402

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import gemm_dense, gemm_w4a4, gemv_w4a4  # noqa: E402
from flatquant.kernels.gemm_w4a4 import SMALL_M, last_config, last_path, pack_int4, resolve_path, w4a4_gemm  # noqa: E402
from flatquant.kernels.w4a4_linear import W4A4Linear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (4096, 12288)]  # K -> N
TOKENS = [1, 16, 256, 2048, 8192]
FACTORS = {4096: (64, 64), 11008: (86, 128), 14336: (112, 128), 96: (8, 12), 160: (10, 16)}  # method.md
QUICK_SHAPES = [(96, 40), (160, 72)]
QUICK_TOKENS = [1, 16, 33]
CUDA = torch.cuda.is_available()


def bench(fn, n_calls: int = 1) -> float:
    """Median microseconds of one call of ``fn`` (which performs ``n_calls`` operations), under a CUDA graph."""
    fn()
    fn()  # autotune and compile outside the graph
    if not CUDA:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6 / n_calls
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except TypeError:  # a triton without return_mode
        ms = triton.testing.do_bench_cudagraph(fn, rep=20)
    return 1000.0 * ms / n_calls


def n_copies(weight_bytes: int) -> int:
    """How many weight copies to cycle through so that together they exceed three times the L2 size."""
    if not CUDA:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return gemm_w4a4.rotating_copies(weight_bytes, l2)


def ceilings() -> dict:
    """Measured bf16 matmul TFLOP/s (8192^3) and device-copy GB/s (bytes read + written)."""
    if not CUDA:
        return {"bf16_tflops": float("nan"), "copy_gbps": float("nan")}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ b)
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    c = bench(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * 8192**3 / t / 1e6, "copy_gbps": 2 * src.numel() / c / 1e3}


def _check_ptx() -> list[str]:
    """Which tensor-core instructions the compiled GEMM kernels use (wgmma s8 / e4m3, or mma.sync)."""
    found = []
    try:
        for dev_cache in gemm_w4a4._kernel.fn.device_caches.values():
            for kernel in dev_cache[0].values():
                ptx = kernel.asm.get("ptx", "")
                kinds = sorted({w for w in ("wgmma.mma_async", "mma.sync", ".s8", ".e4m3") if w in ptx})
                found.append(f"{kernel.name}: {' '.join(kinds)}")
    except Exception as err:  # the cache layout differs between triton versions
        found.append(f"(could not inspect kernels: {err!r})")
    return found


def run_shape(k: int, n: int, m: int, paths: list[str]) -> dict:
    dev = "cuda" if CUDA else "cpu"
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
    impl = "triton"
    e4m3 = codes.to(torch.float8_e4m3fn)
    for path in paths:
        # each path's native operand, as the transform writes it (e4m3 where "auto" takes the dense FP8 path)
        fp8_codes = path in ("fp8", "dense") or (path == "auto" and gemm_dense.wants_e4m3_codes(m, k, codes.device))
        xin = e4m3 if fp8_codes else codes
        try:
            rec[f"gemm_{path}_us"] = bench(
                lambda p=path, xin=xin: [w4a4_gemm(xin, x_scale, w, w_scale, impl=impl, path=p) for w in packed], nq
            )
            rec[f"gemm_{path}_taken"] = taken = last_path() or resolve_path(path)
            dense = "cuBLAS FP8 on the weights unpacked to e4m3"
            rec[f"gemm_{path}_config"] = (
                dense if taken == "dense" else gemv_w4a4.last_gemv_config() if taken == "gemv" else last_config(m, path)
            ) if CUDA else "interpreter"  # fmt: skip
        except Exception as err:  # a path that fails to compile is reported, not fatal
            print(f"  {path} failed at {k=} {n=} {m=}: {err!r}"[:400])
            rec[f"gemm_{path}_us"] = float("inf")
    if rec.get("gemm_auto_taken") == "dense" and "int8" not in paths:  # the INT8 kernel it replaces, same run
        rec["gemm_int8_kernel_us"] = bench(
            lambda: [w4a4_gemm(codes, x_scale, w, w_scale, impl=impl, path="int8") for w in packed], nq
        )
        rec["gemm_int8_kernel_config"] = last_config(m) if CUDA else "interpreter"
        scratch = torch.empty(n, k, device=dev, dtype=torch.float8_e4m3fn)
        rec["unpack_e4m3_us"] = bench(lambda: [gemm_dense.unpack_int4_e4m3(w, k, out=scratch) for w in packed], nq)
    if SMALL_M < m <= gemm_w4a4.MEDIUM_M and "auto" in paths:  # batched decode: also the prefill tiles alone
        medium, gemm_w4a4.MEDIUM_M = gemm_w4a4.MEDIUM_M, SMALL_M
        try:
            rec["gemm_prefill_tiles_us"] = bench(
                lambda: [w4a4_gemm(codes, x_scale, w, w_scale, impl=impl) for w in packed], nq
            )
            rec["gemm_prefill_tiles_config"] = last_config(m) if CUDA else "fixed (interpreter)"
        finally:
            gemm_w4a4.MEDIUM_M = medium
    # exactness of the autotuned call (the config chosen above: the tuning key ignores the output dtype)
    ones_m, ones_n = torch.ones(m, device=dev), torch.ones(n, device=dev)
    out = w4a4_gemm(codes, ones_m, packed[0], ones_n, out_dtype=torch.float32, impl=impl, path=paths[0])
    want = codes.double() @ gemm_w4a4.unpack_int4(packed[0], k).double().T
    rec["exact"] = bool(torch.equal(out.double(), want))
    out = want = None
    packed = None
    # full layer (default settings): transform + quantize + GEMM
    n1, n2 = FACTORS[k]
    p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0]
    p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0]
    layers = [W4A4Linear.from_float(weight, None, p1, p2, act_clip=0.9, gemm_impl=impl) for _ in range(nq)]
    try:
        with torch.no_grad():
            rec["layer_us"] = bench(lambda: [layer(x) for layer in layers], nq)
    except Exception as err:
        print(f"  layer failed at {k=} {n=} {m=}: {err!r}"[:400])
        rec["layer_us"] = float("inf")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gemm[_quick].json)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (runs on CPU through the interpreter)")
    ap.add_argument("--paths", default="auto", help="path arguments to time, comma-separated: auto,int8,fp8")
    ap.add_argument("--budget", type=float, default=210.0, help="seconds; later shapes are skipped past it")
    ap.add_argument("--shapes", default=None, help="K:N pairs to run, comma-separated (default: all LLaMA shapes)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help=f"token counts M (default {TOKENS})")
    args = ap.parse_args()
    start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)"
    ceil = ceilings()
    print(f"{device}: bf16 {ceil['bf16_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    paths = args.paths.split(",")
    for p in paths:
        resolve_path(p)  # validates
    shapes, tokens = (QUICK_SHAPES, QUICK_TOKENS) if args.quick or not CUDA else (SHAPES, TOKENS)
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in pair.split(":")) for pair in args.shapes.split(",")]
        except ValueError:
            raise SystemExit(f"--shapes takes K:N pairs such as 4096:11008,11008:4096, got {args.shapes!r}") from None
    if args.tokens:
        if min(args.tokens) < 1:
            raise SystemExit(f"--tokens takes positive token counts, got {args.tokens}")
        tokens = args.tokens
    records = []
    hdr = f"{'K':>6} {'N':>6} {'M':>5} {'bf16us':>8} " + " ".join(f"{p + 'us':>8}" for p in paths)
    print(
        hdr + f" {'layerus':>8} {'path':>5} {'gemm_x':>6} {'layer_x':>7} {'TOP/s':>7} {'GB/s':>6} {'exact':>5} config"
    )
    name = "gemm_quick.json" if args.quick or not CUDA else "gemm.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    result = {"device": device, "small_m": SMALL_M, "medium_m": gemm_w4a4.MEDIUM_M, "ceilings": ceil}
    # programmatic dependent launch: back-to-back launches overlap (kernels/pdl.py; FLATQUANT_PDL=0 times them
    # without); with FLATQUANT_PREFETCH_L2 > 0 the decode-size GEMMs also prefetch weights while the transform runs
    result["pdl"] = CUDA and gemm_w4a4._pdl.pdl_on(torch.empty(0, device="cuda"))
    result["prefetch_l2_fraction"] = pf = gemm_w4a4.PREFETCH_L2_FRACTION
    print(f"programmatic dependent launch: {'on' if result['pdl'] else 'off'}; L2 prefetch {pf}")
    result.update(records=records, skipped=[])
    for k, n in shapes:
        for m in tokens:
            if time.time() - start > args.budget:
                result["skipped"].append({"K": k, "N": n, "M": m})
                print(f"{k:6d} {n:6d} {m:5d} skipped: past the {args.budget:.0f} s budget")
                continue
            rec = run_shape(k, n, m, paths)
            first = paths[0]  # the headline: the first path argument (default "auto", the dispatcher's choice)
            best = min(paths, key=lambda p: rec[f"gemm_{p}_us"])
            t = rec[f"gemm_{first}_us"]
            taken = {p: rec.get(f"gemm_{p}_taken") or resolve_path(p) for p in paths}
            rec.update(path=taken[first], path_arg=first, best_path=taken[best], gemm_us=t)
            rec.update(config=rec.get(f"gemm_{first}_config"), decode=m <= SMALL_M, device=device)
            rec["gemm_tops"] = 2 * m * n * k / t / 1e6
            rec["gemm_gbps"] = (n * k / 2 + m * k + 2 * m * n + 4 * (m + n)) / t / 1e3
            rec["bf16_tflops"] = 2 * m * n * k / rec["bf16_us"] / 1e6
            rec["bf16_gbps"] = 2 * (n * k + m * k + m * n) / rec["bf16_us"] / 1e3
            records.append(rec)
            times = " ".join(f"{rec[f'gemm_{p}_us']:8.1f}" for p in paths)
            print(
                f"{k:6d} {n:6d} {m:5d} {rec['bf16_us']:8.1f} {times} {rec['layer_us']:8.1f} {rec['path']:>5} "
                f"{rec['bf16_us'] / t:6.2f} {rec['bf16_us'] / rec['layer_us']:7.2f} "
                f"{rec['gemm_tops']:7.0f} {rec['gemm_gbps']:6.0f}  {rec['exact']!s:>5} {rec['config']}",
                flush=True,
            )
            if "gemm_prefill_tiles_us" in rec:
                us = rec["gemm_prefill_tiles_us"]
                cfg = rec["gemm_prefill_tiles_config"]
                print(f"{'':20} prefill tiles alone: {us:8.1f} us ({us / t:.2f}x ours) {cfg}")
            if "gemm_int8_kernel_us" in rec:
                us, cfg = rec["gemm_int8_kernel_us"], rec["gemm_int8_kernel_config"]
                print(f"{'':20} INT8 kernel instead: {us:8.1f} us ({us / t:.2f}x ours); unpack alone "
                      f"{rec['unpack_e4m3_us']:.1f} us; {cfg}")  # fmt: skip
            result["seconds"] = round(time.time() - start, 1)
            atomic_write_json(out, result)  # after every record: a run cut short keeps what it measured
    result["kernels"] = _check_ptx() if CUDA else []
    print("\n".join(result["kernels"]))
    result["seconds"] = round(time.time() - start, 1)
    atomic_write_json(out, result)
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
