"""Where the dense FP8 path of the W4A4 GEMM overtakes the INT8 Triton kernel, and whether cuBLAS sums exactly.

Usage:
    PYTHONPATH=src python benchmarks/dense_crossover.py            # CUDA, about 2 minutes on an H100 / H200
    PYTHONPATH=src python benchmarks/dense_crossover.py --quick    # toy sizes; runs on CPU (interpreter) too

1. Exactness: ``torch._scaled_mm`` on 4-bit integer codes (random, and the largest same-sign sums) and on centred
   asymmetric codes (code - zero in [-15, 15]: random, and +-15 against -8, products up to 120) at K = 4096, 11008
   and 14336, with ``use_fast_accum`` False (what ``gemm_dense`` calls) and True, against a float64 product.
2. Timing, one process: for LLaMA layer shapes and token counts around ``gemm_dense.DENSE_M``, BF16 ``F.linear``
   (cuBLAS), the INT8 Triton kernel (``path="int8"``) and the dense path (``path="dense"``, e4m3 codes as the
   transform writes them), and for N = 4096 (o_proj, down_proj) both again with a residual added. Times are
   medians of CUDA-graph replays cycling through more than 3x L2 of weights (``gemm.py``'s method).
Writes ``benchmarks/results/dense_crossover.json`` (or ``--out``) after every shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gemm import CUDA, bench, n_copies  # noqa: E402  (the sibling benchmark's timing and L2-defeating copies)

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import gemm_dense  # noqa: E402
from flatquant.kernels.gemm_w4a4 import last_config, last_path, pack_int4, w4a4_gemm  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 12288), (4096, 22016)]  # K -> N; 22016: LLaMA-2-7B gate/up fused
TOKENS = [256, 512, 768, 1024, 1536, 2048, 4096]
QUICK_SHAPES, QUICK_TOKENS = [(96, 32), (160, 32), (96, 48)], [3, 17]
E4M3 = torch.float8_e4m3fn


def exactness(dev: str, ks: list[int]) -> list[dict]:
    """Does ``_scaled_mm`` return the exact integer sums of 4-bit codes (unit scales, fp32 output)?"""
    records = []
    for k in ks:
        for case in ("random", "largest", "centred-random", "centred-largest"):
            m, n = (256, 512) if CUDA else (8, 16)
            g = torch.Generator(device=dev).manual_seed(k)
            b = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g)
            if case == "random":
                a = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8, generator=g)
            elif case == "centred-random":  # q - z, q and the per-token zero point z in [0, 15]
                a = torch.randint(0, 16, (m, k), device=dev, dtype=torch.int8, generator=g)
                a -= torch.randint(0, 16, (m, 1), device=dev, dtype=torch.int8, generator=g)
            else:  # -8 * -8 and 7 * -8 (or +-15 * -8) everywhere: the largest sums of either sign
                lo, hi = (-8, 7) if case == "largest" else (-15, 15)
                a = torch.full((m, k), lo, device=dev, dtype=torch.int8)
                a[1::2] = hi
                b = torch.full((n, k), -8, device=dev, dtype=torch.int8)
            want = a.double() @ b.double().T
            one = torch.ones((), device=dev)
            for fast in (False, True):
                got = torch._scaled_mm(a.to(E4M3), b.to(E4M3).T, one, one, out_dtype=torch.float32, use_fast_accum=fast)
                err = float((got.double() - want).abs().max())
                records.append({"K": k, "codes": case, "use_fast_accum": fast, "exact": err == 0.0, "max_abs_err": err})
                print(f"  K={k:6d} {case:15s} use_fast_accum={fast!s:5}: exact {err == 0.0!s:5} (max error {err:.0f})")
    return records


def run_shape(k: int, n: int, m: int, dev: str, with_residual: bool) -> dict:
    g = torch.Generator(device=dev).manual_seed(k + n + m)
    rec = {"K": k, "N": n, "M": m}
    nb = n_copies(2 * n * k)
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(nb)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
    rec["bf16_us"] = bench(lambda: [torch.nn.functional.linear(x, w) for w in weights], nb)
    weights = None
    nq = n_copies(n * k // 2)
    codes = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8, generator=g)
    e4m3 = codes.to(E4M3)  # as the transform writes them for the dense path
    xs, ws = torch.rand(m, device=dev) + 0.01, torch.rand(n, device=dev) + 0.01
    packed = [pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g)) for _ in range(nq)]
    residuals = [None, torch.randn(m, n, device=dev, generator=g).to(torch.bfloat16)] if with_residual else [None]
    for res in residuals:
        tag = "" if res is None else "_residual"
        rec[f"int8{tag}_us"] = bench(
            lambda r=res: [w4a4_gemm(codes, xs, w, ws, path="int8", residual=r, impl="triton") for w in packed], nq
        )
        rec[f"int8{tag}_config"] = last_config(m) if CUDA else "interpreter"
        rec[f"dense{tag}_us"] = bench(
            lambda r=res: [w4a4_gemm(e4m3, xs, w, ws, path="dense", residual=r, impl="triton") for w in packed], nq
        )
        assert last_path() == "dense"
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dense_crossover[_quick].json)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (runs on CPU through the interpreter)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help=f"token counts M (default {TOKENS})")
    args = ap.parse_args(argv)
    start = time.time()
    dev = "cuda" if CUDA else "cpu"
    quick = args.quick or not CUDA
    device = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter, PyTorch's CPU _scaled_mm)"
    shapes, tokens = (QUICK_SHAPES, QUICK_TOKENS) if quick else (SHAPES, TOKENS)
    if args.tokens:
        if min(args.tokens) < 1:
            raise SystemExit(f"--tokens takes positive token counts, got {args.tokens}")
        tokens = args.tokens
    name = "dense_crossover_quick.json" if quick else "dense_crossover.json"
    out = args.out or os.path.join(HERE, "results", name)
    print(f"{device}; dense path from DENSE_M = {gemm_dense.DENSE_M} tokens")
    result = {"device": device, "dense_m": gemm_dense.DENSE_M, "records": []}
    result["exactness"] = exactness(dev, [64, 160] if quick else [4096, 11008, 14336])
    print(f"{'K':>6} {'N':>6} {'M':>5} {'bf16':>8} {'int8':>8} {'dense':>8} {'int8+res':>9} {'dense+res':>9} faster")
    for k, n in shapes:
        for m in tokens:
            rec = run_shape(k, n, m, dev, with_residual=n == shapes[0][1])  # the o_proj / down_proj N
            rec["device"] = device
            result["records"].append(rec)
            res = (
                f"{rec['int8_residual_us']:9.1f} {rec['dense_residual_us']:9.1f}"
                if "int8_residual_us" in rec
                else " " * 19
            )
            best = "dense" if rec["dense_us"] < rec["int8_us"] else "int8"
            print(
                f"{k:6d} {n:6d} {m:5d} {rec['bf16_us']:8.1f} {rec['int8_us']:8.1f} {rec['dense_us']:8.1f} {res} {best}"
            )
            result["seconds"] = round(time.time() - start, 1)
            atomic_write_json(out, result)
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
