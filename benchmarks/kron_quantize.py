"""Benchmark the fused Kronecker transform + per-token 4-bit quantization kernel (CUDA only).

For each hidden size and token count: the fused kernel (int8 codes and packed int4, fp32 intermediate,
plus packed with the 16-bit intermediate), the unfused torch.compile path, the BF16 GEMM the operand
feeds, all timed with triton.testing.do_bench medians (L2 flushed between runs), and the device copy
bandwidth measured in the same run. Prints a table and writes benchmarks/results/kron_quantize.json.

    PYTHONPATH=src python benchmarks/kron_quantize.py [--sweep] [--out PATH]
"""

import argparse
import json
import os

import torch
import triton
import triton.testing

from flatquant.kernels.kron_quantize import kron_quantize_triton

# hidden size -> (n1, n2, N of the BF16 GEMM it feeds, which layer)
SHAPES = {
    4096: (64, 64, 4096, "LLaMA-2/3-7/8B hidden -> q_proj (4096->4096)"),
    11008: (86, 128, 4096, "LLaMA-2-7B intermediate -> down_proj (11008->4096)"),
    14336: (112, 128, 4096, "LLaMA-3-8B intermediate -> down_proj (14336->4096)"),
    8192: (64, 128, 8192, "LLaMA-2/3-70B hidden -> q_proj (8192->8192)"),
}
TOKENS = (1, 16, 2048, 8192)


def _bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def _unfused(x, p1, p2, clip_max: float, clip_min: float):
    """The unfused path: two 16-bit batched matmuls, then the per-token quantizer in fp32."""
    n1, n2 = p1.shape[0], p2.shape[0]
    z = torch.matmul(p1.T, torch.matmul(x.view(-1, n1, n2), p2)).float()  # (T, n1, n2)
    absmax = torch.maximum(clip_max * z.amax(dim=(1, 2)), -clip_min * z.amin(dim=(1, 2)))
    scale = (absmax / 7).clamp_min(1e-8)
    codes = torch.clamp(torch.round(z / scale[:, None, None]), -8, 7).to(torch.int8)
    return codes.view(x.shape), scale


def copy_bandwidth_gbs(nbytes=1 << 30):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (_bench(lambda: dst.copy_(src)) * 1e-6) / 1e9


def _sweep_shape(n, n1, n2, tokens):
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    p1 = torch.randn(n1, n1, device="cuda", dtype=torch.bfloat16)
    p2 = torch.randn(n2, n2, device="cuda", dtype=torch.bfloat16)
    out = []
    for warps in (4, 8):
        for stages in (1, 2, 3):
            for pps in (1, 2, 4):
                cfg = {"num_warps": warps, "num_stages": stages, "progs_per_sm": pps}
                try:
                    us = _bench(lambda c=cfg: kron_quantize_triton(x, p1, p2, config=c), rep=30)
                except Exception as err:  # out of resources, for instance
                    print(f"sweep n={n} {cfg}: {type(err).__name__}")
                    continue
                out.append({"n": n, "tokens": tokens, **cfg, "kernel_us": round(us, 2)})
                print(f"sweep n={n:6d} T={tokens} warps={warps} stages={stages} progs/SM={pps}: {us:8.1f} us")
    return out


def sweep(tokens=8192):
    """Time launch configurations at one token count; prints, returns the records."""
    out = []
    for n, (n1, n2, _, _) in SHAPES.items():
        out += _sweep_shape(n, n1, n2, tokens)
    return out


def _measure(n, n1, n2, tokens, p1, p2, w, unfused):
    x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    kernel = _bench(lambda: kron_quantize_triton(x, p1, p2, 0.9, 0.9))
    packed = _bench(lambda: kron_quantize_triton(x, p1, p2, 0.9, 0.9, pack=True))
    pk16 = _bench(lambda: kron_quantize_triton(x, p1, p2, 0.9, 0.9, pack=True, intermediate="input"))
    unf = float("nan") if unfused is None else _bench(lambda: unfused(x, p1, p2, 0.9, 0.9))
    gemm = _bench(lambda: x @ w)
    moved = tokens * n * (2 + 1) + tokens * 4 + 2 * (n1 * n1 + n2 * n2)  # bytes, int8 codes
    rec = {
        "n": n, "n1": n1, "n2": n2, "tokens": tokens,
        "kernel_us": round(kernel, 2), "kernel_packed_us": round(packed, 2),
        "kernel_packed_input_intermediate_us": round(pk16, 2),
        "unfused_us": round(unf, 2), "gemm_bf16_us": round(gemm, 2),
        "achieved_gbs": round(moved / (kernel * 1e-6) / 1e9, 1),
        "torch": torch.__version__, "triton": triton.__version__,
    }  # fmt: skip
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kron_quantize.json"))
    ap.add_argument("--sweep", default=None, metavar="PATH", help="also time launch configs, write them here")
    ap.add_argument("--no-unfused", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write, 1 GiB)")
    if args.sweep:
        sweep_records = sweep()
        with open(args.sweep, "w") as f:
            json.dump(sweep_records, f, indent=1)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    unfused = torch.compile(_unfused)
    records = []
    header = (
        f"{'n':>6} {'n1xn2':>8} {'T':>5} {'kernel':>8} {'packed':>8} {'pk16':>8} {'unfused':>8} "
        f"{'gemm':>8} {'%gemm':>6} {'x unf':>6} {'GB/s':>6}"
    )
    print(header)
    for n, (n1, n2, gemm_n, layer) in SHAPES.items():
        p1 = torch.linalg.qr(torch.randn(n1, n1, device="cuda"))[0].to(torch.bfloat16)
        p2 = torch.linalg.qr(torch.randn(n2, n2, device="cuda"))[0].to(torch.bfloat16)
        w = torch.randn(n, gemm_n, device="cuda", dtype=torch.bfloat16)
        for tokens in TOKENS:
            rec = _measure(n, n1, n2, tokens, p1, p2, w, None if args.no_unfused else unfused)
            rec.update(gemm_n=gemm_n, gemm_layer=layer, copy_gbs=round(copy_gbs, 1), device=device)
            records.append(rec)
            r = rec
            print(
                f"{n:6d} {f'{n1}x{n2}':>8} {tokens:5d} {r['kernel_us']:8.1f} {r['kernel_packed_us']:8.1f} "
                f"{r['kernel_packed_input_intermediate_us']:8.1f} {r['unfused_us']:8.1f} {r['gemm_bf16_us']:8.1f} "
                f"{100 * r['kernel_us'] / r['gemm_bf16_us']:5.1f}% {r['unfused_us'] / r['kernel_us']:6.2f} "
                f"{r['achieved_gbs']:6.0f}"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
