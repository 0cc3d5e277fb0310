"""Benchmark the fused Kronecker transform + per-token 4-bit quantization kernel.

For each hidden size and token count: the fused kernel (int8 codes; fp32 and 16-bit intermediate; where the
pieces kernel applies, e.g. 86x128, also the padded power-of-two tile in the same run), the
unfused torch.compile path and the BF16 GEMM the operand feeds, with the device copy bandwidth measured in the
same run. Every time is a median of CUDA-graph replays (triton.testing.do_bench_cudagraph), so the host's
launch cost is out of the figures, as when a model runs under graphs: a host busy with other work had
inflated the 64x64 figures of an event-timed run 2.4x (kernel and unfused path alike). For more than 16 tokens
each replay cycles through copies of the input that together exceed three times the L2 cache, so the data comes
from memory as it would in a model; a path that cannot be captured falls back to triton.testing.do_bench
(L2 flushed between calls, host launch cost included) and its record says so. Every shape is called once
before it is timed, so autotuning and compilation stay outside the numbers; the config the autotuner chose is recorded.
Prints a table and writes benchmarks/results/kron_quantize.json (device name in every record).

    PYTHONPATH=src python benchmarks/kron_quantize.py            # CUDA, about 2-3 minutes on an H100
    PYTHONPATH=src python benchmarks/kron_quantize.py --quick    # toy sizes; runs on CPU (interpreter) too
"""

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU run goes through Triton's interpreter
os.environ.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # tune afresh: no results from earlier processes

import triton  # noqa: E402
import triton.testing  # noqa: E402
from gemm import n_copies  # noqa: E402  (the sibling benchmark: copies that defeat the L2 cache)

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import kron_pieces as kp  # noqa: E402
from flatquant.kernels import kron_quantize as kq  # noqa: E402

# hidden size -> (n1, n2, N of the BF16 GEMM it feeds, which layer)
SHAPES = {
    4096: (64, 64, 4096, "LLaMA-2/3-7/8B hidden -> q_proj (4096->4096)"),
    11008: (86, 128, 4096, "LLaMA-2-7B intermediate -> down_proj (11008->4096)"),
    14336: (112, 128, 4096, "LLaMA-3-8B intermediate -> down_proj (14336->4096)"),
    8192: (64, 128, 8192, "LLaMA-2/3-70B hidden -> q_proj (8192->8192)"),
}
TOKENS = (1, 16, 2048, 8192)
QUICK_SHAPES = {256: (16, 16, 64, "toy"), 480: (20, 24, 64, "toy, padded tiles"), 5120: (40, 128, 64, "toy, pieces")}
QUICK_TOKENS = (1, 16, 67)
GRAPH_TOKENS = 16  # at or below (decode sizes): one input, no copies to defeat the L2 cache


FALLBACKS: list[str] = []  # paths timed with do_bench because their capture failed (named in the records)


def _bench(fn, tokens: int, inputs: list | None = None, name: str = "") -> float:
    """Median microseconds of one fn(x): CUDA-graph replays cycling through ``inputs`` (see the module doc)."""
    inputs = inputs or [None]
    if not torch.cuda.is_available():  # interpreter: wall clock of a few calls
        t0 = time.perf_counter()
        for _ in range(3):
            fn(inputs[0])
        return (time.perf_counter() - t0) / 3 * 1e6

    def run():
        for x in inputs:
            fn(x)

    run()
    torch.cuda.synchronize()
    try:
        try:
            ms = triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
        except TypeError:  # a triton without return_mode
            ms = triton.testing.do_bench_cudagraph(run, rep=20)
    except RuntimeError as e:  # not capturable: events around each call (host launch cost included)
        torch.cuda.synchronize()
        FALLBACKS.append(f"{name} at {tokens} tokens: {str(e).splitlines()[0][:120]}")
        ms = triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
    return ms * 1e3 / len(inputs)


def _copies(x: torch.Tensor) -> list[torch.Tensor]:
    """x and clones of it: together over three times the L2 cache (one for at most GRAPH_TOKENS tokens)."""
    n = 1 if x.shape[0] <= GRAPH_TOKENS else n_copies(x.numel() * x.element_size())
    return [x] + [x.clone() for _ in range(n - 1)]


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
    return 2 * nbytes / (_bench(lambda _: dst.copy_(src), 1) * 1e-6) / 1e9


def _tuned_config(pieces: bool = False):
    tuner = getattr(kp, "_kron_quantize_pieces_tuned", None) if pieces else getattr(kq, "_kron_quantize_tuned", None)
    cfg = getattr(tuner, "best_config", None)
    if cfg is None or not kq.AUTOTUNE or not torch.cuda.is_available():
        return "fixed"
    return {k: v for k, v in kq.config_items(cfg).items() if v is not None}  # no register cap: no maxnreg key


def _measure(n, n1, n2, tokens, p1, p2, w, unfused, device, intermediates):
    x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
    xs = _copies(x)
    n_fallbacks = len(FALLBACKS)
    rec = {"n": n, "n1": n1, "n2": n2, "tokens": tokens, "kernel_input_intermediate_us": float("nan")}
    pieces = kp.uses_pieces(n1, n2, True, True, "fp32", None)
    rec["kernel_path"] = "pieces" if pieces else "padded"
    variants = [("kernel_us", "fp32", pieces), ("kernel_input_intermediate_us", "input", False)]
    if pieces:  # the padded power-of-two tile in the same run, for comparison
        variants.append(("kernel_padded_us", "fp32", False))
    default = kp.PIECES
    for name, inter, use_pieces in variants:
        if inter not in intermediates:
            continue
        kp.PIECES = use_pieces
        try:
            out = kq.kron_quantize_triton(x, p1, p2, 0.9, 0.9, intermediate=inter)  # autotune outside timing
            ref = kq.kron_quantize_reference(x[:64], p1, p2, 0.9, 0.9, intermediate=inter)
            mismatch = (out.codes[:64] != ref.codes).float().mean().item()  # ties only: ~1e-5 or less
            fn = lambda xi, i=inter: kq.kron_quantize_triton(xi, p1, p2, 0.9, 0.9, intermediate=i)  # noqa: E731
            rec[name] = round(_bench(fn, tokens, xs, name), 2)
            rec[name.replace("_us", "_config")] = _tuned_config(use_pieces)
            rec[name.replace("_us", "_code_mismatch")] = mismatch
        finally:
            kp.PIECES = default
    if unfused is not None:
        unfused(x, p1, p2, 0.9, 0.9)
        rec["unfused_us"] = round(_bench(lambda xi: unfused(xi, p1, p2, 0.9, 0.9), tokens, xs, "unfused"), 2)
    else:
        rec["unfused_us"] = float("nan")
    rec["gemm_bf16_us"] = round(_bench(lambda xi: xi @ w, tokens, xs, "gemm_bf16"), 2)
    fell_back = FALLBACKS[n_fallbacks:]
    how = "cuda-graph replays" if torch.cuda.is_available() else "wall clock (Triton interpreter)"
    rec["timing"] = how + (f"; do_bench for {fell_back}" if fell_back else "")
    rec["input_copies"] = len(xs)
    moved = tokens * n * (2 + 1) + tokens * 4 + 2 * (n1 * n1 + n2 * n2)  # bytes: x, int8 codes, scales, factors
    rec["achieved_gbs"] = round(moved / (rec["kernel_us"] * 1e-6) / 1e9, 1)
    rec.update(torch=torch.__version__, triton=triton.__version__)
    return rec


def pick_hidden(ap: argparse.ArgumentParser, shapes: dict, hidden: list[int] | None) -> dict:
    """The ``shapes`` entries of the ``--hidden`` sizes (all without it); an unknown size stops with an error."""
    if not hidden:
        return shapes
    unknown = sorted(set(hidden) - set(shapes))
    if unknown:
        ap.error(f"--hidden {unknown}: not among the benchmark's hidden sizes {sorted(shapes)}")
    return {n: shapes[n] for n in hidden}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kron_quantize[_quick].json)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (runs on CPU through the interpreter)")
    ap.add_argument("--no-unfused", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--budget", type=float, default=210.0, help="seconds; later shapes are skipped past it")
    ap.add_argument("--hidden", type=int, nargs="*", default=None, help=f"only these hidden sizes (of {list(SHAPES)})")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="only these token counts (of the default list)")
    ap.add_argument(
        "--input-intermediate", action="store_true", help='also time intermediate="input" (more autotuning time)'
    )
    args = ap.parse_args()
    start = time.time()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    name = "kron_quantize_quick.json" if args.quick else "kron_quantize.json"
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    copy_gbs = copy_bandwidth_gbs() if cuda else float("nan")
    print(f"device: {device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write, 1 GiB)")
    unfused = None
    if cuda and not args.no_unfused:
        for opt in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, opt):
                setattr(torch._dynamo.config, opt, 64)
        unfused = torch.compile(_unfused, dynamic=True)
    elif not cuda:
        unfused = _unfused
    shapes, token_counts = (QUICK_SHAPES, QUICK_TOKENS) if args.quick or not cuda else (SHAPES, TOKENS)
    shapes = pick_hidden(ap, shapes, args.hidden)
    if args.tokens:
        unknown = sorted(set(args.tokens) - set(token_counts))
        if unknown:
            ap.error(f"--tokens {unknown}: not among the benchmark's token counts {list(token_counts)}")
        token_counts = tuple(t for t in token_counts if t in args.tokens)
    records, skipped = [], []
    result = {"device": device, "copy_gbs": copy_gbs, "records": records, "skipped": skipped}
    print(
        f"{'n':>6} {'n1xn2':>8} {'T':>5} {'kernel':>8} {'k16':>8} {'unfused':>8} {'gemm':>8} {'%gemm':>6} "
        f"{'x unf':>6} {'GB/s':>6} {'padded':>8}  config"
    )
    for n, (n1, n2, gemm_n, layer) in shapes.items():
        # contiguous, as the runtime's modules hold them: QR's Q is column-major, and the wrapper would copy it
        # on every call (two more launches in each timing; the figures before 2026-11-30's last run had them)
        p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0].to(torch.bfloat16).contiguous()
        p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0].to(torch.bfloat16).contiguous()
        w = torch.randn(n, gemm_n, device=dev, dtype=torch.bfloat16)
        for tokens in token_counts:
            if time.time() - start > args.budget:
                skipped.append({"n": n, "tokens": tokens})
                print(f"{n:6d} {f'{n1}x{n2}':>8} {tokens:5d} skipped: past the {args.budget:.0f} s budget")
                continue
            inters = ("fp32", "input") if args.input_intermediate or not cuda else ("fp32",)
            r = _measure(n, n1, n2, tokens, p1, p2, w, unfused, dev, inters)
            r.update(gemm_n=gemm_n, gemm_layer=layer, copy_gbs=round(copy_gbs, 1), device=device)
            records.append(r)
            print(
                f"{n:6d} {f'{n1}x{n2}':>8} {tokens:5d} {r['kernel_us']:8.1f} "
                f"{r['kernel_input_intermediate_us']:8.1f} {r['unfused_us']:8.1f} {r['gemm_bf16_us']:8.1f} "
                f"{100 * r['kernel_us'] / r['gemm_bf16_us']:5.1f}% {r['unfused_us'] / r['kernel_us']:6.2f} "
                f"{r['achieved_gbs']:6.0f} {r.get('kernel_padded_us', float('nan')):8.1f}  {r['kernel_config']}",
                flush=True,
            )
            result["seconds"] = round(time.time() - start, 1)
            atomic_write_json(out_path, result)  # after every record: a run cut short keeps what it measured
    result["seconds"] = round(time.time() - start, 1)
    atomic_write_json(out_path, result)
    print(f"wrote {out_path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
