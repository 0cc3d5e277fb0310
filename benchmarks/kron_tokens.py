"""Every launch config of the transform + quantize kernel across the token counts between decode and prefill.

The kernel takes the latency path (one token per program, ``SMALL_TOKENS``) up to 64 tokens and the throughput
path's candidates above (token bucket 1 up to 512). Batched decode (32-128 tokens) sits on that border, so this
times, for each hidden size and token count, every candidate of both paths forced as a fixed config, and what the
autotuner chooses when it tunes at that very token count; then the W4A4 layer (transform + quantize + GEMM) against
its parts, so that a layer slower than its parts is visible (the layer cycles through weight copies larger than
three times the L2, its transform reads one input from L2 as in the layer; ``--profile`` adds each kernel's GPU
time in the layer). Every config time is a median of CUDA-graph replays cycling through inputs larger than three
times the L2 (as ``kron_quantize.py``). Prints tables and writes ``benchmarks/results/kron_tokens.json`` (device
name in every record).

    PYTHONPATH=src python benchmarks/kron_tokens.py                       # CUDA, a few minutes
    PYTHONPATH=src python benchmarks/kron_tokens.py --hidden 4096 --tokens 64 128
    PYTHONPATH=src python benchmarks/kron_tokens.py --no-sweep --layer-shapes 4096:4096 11008:4096 \
        --layer-tokens 64 128 256 --pdl-early-tokens 0                   # the layer table, transform always late
    PYTHONPATH=src python benchmarks/kron_tokens.py --quick               # toy sizes; CPU interpreter too
"""

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU run goes through Triton's interpreter
os.environ.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # tune afresh: no results from earlier processes

from gemm import n_copies  # noqa: E402  (the sibling benchmark: copies that defeat the L2 cache)
from kron_quantize import SHAPES, _bench, _copies, pick_hidden  # noqa: E402

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import gemm_w4a4, pdl  # noqa: E402
from flatquant.kernels import kron_pieces as kp  # noqa: E402
from flatquant.kernels import kron_quantize as kq  # noqa: E402
from flatquant.kernels.w4a4_linear import W4A4Linear, operand_gemm  # noqa: E402

TOKENS = (32, 64, 65, 96, 128, 192, 256, 384, 512)
QUICK_SHAPES = {256: (16, 16, 64, "toy"), 5120: (40, 128, 64, "toy, pieces")}
QUICK_TOKENS = (3, 5)
LAYER_TOKENS = (64, 65, 128, 256)


def candidates(n1: int, n2: int) -> list[tuple[str, dict]]:
    """(path name, fixed config) for every candidate of both token paths (the kernel the dispatcher uses)."""
    out = []
    pieces = kp.uses_pieces(n1, n2, True, True, "fp32", None)
    for bucket, path in ((0, "latency"), (1, "throughput")):
        if pieces:
            cands = [dict(c, PIECES=1) for c in kp.pieces_candidate_configs(bucket)]
        else:
            bn1, bn2 = max(16, kq._next_pow2(n1)), max(16, kq._next_pow2(n2))
            cands = kq.candidate_configs(bn1, bn2, bucket, True)
        out += [(path, {k: v for k, v in c.items() if v is not None}) for c in cands]
    return out


def _reset_tuning() -> None:
    """Forget what the autotuners chose, so that the next call tunes at its own token count."""
    for tuned in (getattr(kq, "_kron_quantize_tuned", None), getattr(kp, "_kron_quantize_pieces_tuned", None)):
        if tuned is not None:
            tuned.chosen.clear()
            getattr(tuned.tuner, "cache", {}).clear()


def _short(cfg: dict) -> str:
    keys = ("PIECES", "BLOCK_T", "PROGS_PER_SM", "P1_FIRST", "FAST_DIV", "BC", "num_warps", "num_stages", "maxnreg")
    names = {"PROGS_PER_SM": "pps", "num_warps": "w", "num_stages": "s", "FAST_DIV": "fd", "P1_FIRST": "p1f"}
    return " ".join(f"{names.get(k, k)}={cfg[k]}" for k in keys if k in cfg)


def _gemm_short(cfg: dict | None) -> str:
    if not cfg:
        return "-"
    tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} {cfg['num_warps']}w {cfg['num_stages']}s"
    return tile + (f" split-K {cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else "") + (" swap" * cfg["SWAP_AB"])


def sweep_shape(n, n1, n2, tokens, dev) -> dict:
    # contiguous, as the runtime holds them (QR's Q is column-major: the transform would copy it on every call)
    p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev))[0].to(torch.bfloat16).contiguous()
    p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev))[0].to(torch.bfloat16).contiguous()
    x = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
    xs = _copies(x)
    ref = kq.kron_quantize_reference(x, p1, p2, 0.9, 0.9)
    rec = {"n": n, "n1": n1, "n2": n2, "tokens": tokens, "bucket": kq._token_bucket(tokens), "configs": []}
    for path, cfg in candidates(n1, n2):
        fn = lambda xi, c=cfg: kq.kron_quantize_triton(xi, p1, p2, 0.9, 0.9, config=c)  # noqa: E731
        out = fn(x)
        mismatch = (out.codes != ref.codes).float().mean().item()  # rounding ties only
        us = _bench(fn, tokens, xs, f"{n} {_short(cfg)}")
        rec["configs"].append({"path": path, "config": cfg, "us": round(us, 2), "code_mismatch": mismatch})
    _reset_tuning()
    kq.kron_quantize_triton(x, p1, p2, 0.9, 0.9)  # tune at this token count, outside the timing
    rec["tuned_us"] = round(_bench(lambda xi: kq.kron_quantize_triton(xi, p1, p2, 0.9, 0.9), tokens, xs, "tuned"), 2)
    for path in ("latency", "throughput"):
        best = min((c for c in rec["configs"] if c["path"] == path), key=lambda c: c["us"])
        rec[f"best_{path}_us"], rec[f"best_{path}_config"] = best["us"], best["config"]
    return rec


def layer_parts(k: int, n: int, n1: int, n2: int, m: int, dev: str, profile: bool = False) -> dict:
    """The W4A4 layer (K -> N) at M tokens against its transform + quantize and its GEMM, each timed alone."""
    gen = torch.Generator(device=dev).manual_seed(k + n + m)
    weight = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / k**0.5
    p1 = torch.linalg.qr(torch.randn(n1, n1, device=dev, generator=gen))[0]
    p2 = torch.linalg.qr(torch.randn(n2, n2, device=dev, generator=gen))[0]
    nq = n_copies(n * k // 2)
    layers = [W4A4Linear.from_float(weight, None, p1, p2, act_clip=0.9) for _ in range(nq)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
    first = layers[0]
    rec = {"K": k, "N": n, "M": m, "weight_copies": nq}
    with torch.no_grad():
        op = first.quantize_input(x)
        rec["transform_us"] = round(_bench(lambda _: first.quantize_input(x), 1), 2)

        def gemms(_):
            for lay in layers:
                operand_gemm(op, lay.w_packed, lay.w_scale, None, torch.bfloat16)

        def whole(_):
            for lay in layers:
                lay(x)

        rec["gemm_us"] = round(_bench(gemms, 1) / nq, 2)
        rec["gemm_config"] = gemm_w4a4.last_config(m)  # the tile the autotuner chose for this process
        rec["layer_us"] = round(_bench(whole, 1) / nq, 2)
        lins = [torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        rec["bf16_us"] = round(_bench(lambda _: [lin(x) for lin in lins], 1) / len(lins), 2)
        lins = None
        if profile:
            rec["layer_kernels"] = _graph_kernels(whole)
            rec["parts_kernels"] = _graph_kernels(lambda _: (first.quantize_input(x), gemms(None)))
    rec["layer_minus_parts_us"] = round(rec["layer_us"] - rec["transform_us"] - rec["gemm_us"], 2)
    return rec


def _graph_kernels(fn, replays: int = 5) -> dict:
    """GPU time of each kernel (by name) in replays of a CUDA graph of ``fn(None)``: µs per call, calls per
    replay (profiler)."""
    fn(None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(None)
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:60]
            t = out.setdefault(name, [0.0, 0])
            t[0] += ev.device_time  # us
            t[1] += 1
    return {k: {"us_per_call": round(v[0] / v[1], 2), "calls": v[1] // replays} for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kron_tokens[_quick].json)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (runs on CPU through the interpreter)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later shapes are skipped past it")
    ap.add_argument("--hidden", type=int, nargs="*", default=None, help=f"only these hidden sizes (of {list(SHAPES)})")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help=f"token counts (default {list(TOKENS)})")
    ap.add_argument("--no-layer", action="store_true", help="skip the layer-against-parts table")
    ap.add_argument("--no-sweep", action="store_true", help="skip the config sweep (the layer table only)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also each kernel's GPU time in the layer (profiler; under PDL a kernel's span includes its wait)",
    )
    ap.add_argument("--layer-tokens", type=int, nargs="*", default=None, help=f"M of the layer table {LAYER_TOKENS}")
    ap.add_argument(
        "--layer-shapes",
        nargs="*",
        default=None,
        help="K:N of the layer table (K a hidden size; 4096:4096)",
    )
    ap.add_argument(
        "--pdl-early-tokens",
        type=int,
        default=None,
        help=f"kron_quantize.PDL_EARLY_TOKENS for the run (default {kq.PDL_EARLY_TOKENS}; 0: always late)",
    )
    args = ap.parse_args()
    start = time.time()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    all_shapes, token_counts = (QUICK_SHAPES, QUICK_TOKENS) if args.quick or not cuda else (SHAPES, TOKENS)
    shapes = pick_hidden(ap, all_shapes, args.hidden)
    if args.tokens:
        bad = [t for t in args.tokens if t < 1]
        if bad:
            ap.error(f"--tokens {bad}: token counts must be at least 1")
        token_counts = tuple(args.tokens)
    layer_shapes = []
    for spec in args.layer_shapes or (["4096:4096"] if all_shapes is SHAPES else ["256:64"]):
        k, _, n = spec.partition(":")
        if not (k.isdigit() and n.isdigit()) or int(k) not in all_shapes:
            ap.error(f"--layer-shapes {spec!r}: expected K:N with K among {sorted(all_shapes)}")
        layer_shapes.append((int(k), int(n)))
    if args.pdl_early_tokens is not None:
        if args.pdl_early_tokens < 0:
            ap.error(f"--pdl-early-tokens {args.pdl_early_tokens}: must be 0 or more")
        kq.PDL_EARLY_TOKENS = args.pdl_early_tokens
    name = "kron_tokens_quick.json" if args.quick or not cuda else "kron_tokens.json"
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"device: {device}; SMALL_TOKENS = {kq.SMALL_TOKENS}")
    records, layer_records, skipped = [], [], []
    result = {"device": device, "small_tokens": kq.SMALL_TOKENS, "records": records, "layers": layer_records}
    result["pdl"] = bool(pdl.ENABLED)
    result["pdl_early_tokens"] = kq.PDL_EARLY_TOKENS
    result["skipped"] = skipped
    head = f"{'n':>6} {'n1xn2':>8} {'T':>5} {'tuned':>7} {'latency':>8} {'through':>8}"
    print(head + "  best latency / throughput config")
    for n, (n1, n2, *_rest) in shapes.items():
        for tokens in () if args.no_sweep else token_counts:
            if time.time() - start > args.budget:
                skipped.append({"n": n, "tokens": tokens})
                continue
            r = sweep_shape(n, n1, n2, tokens, dev)
            r["device"] = device
            records.append(r)
            print(
                f"{n:6d} {f'{n1}x{n2}':>8} {tokens:5d} {r['tuned_us']:7.1f} {r['best_latency_us']:8.1f} "
                f"{r['best_throughput_us']:8.1f}  {_short(r['best_latency_config'])} / "
                f"{_short(r['best_throughput_config'])}",
                flush=True,
            )
            atomic_write_json(out_path, result)  # after every record: a run cut short keeps what it measured
    if not args.no_layer:  # on the CPU (quick) the layer's reference ops, wall clock: the code path only
        head = f"{'K':>6} {'N':>6} {'M':>5} {'bf16':>7} {'layer':>7} {'transf':>7} {'gemm':>7} {'layer-parts':>11}"
        print(head + "  gemm tile")
        for k, n in layer_shapes:
            n1, n2 = all_shapes[k][:2]
            for m in args.layer_tokens or (LAYER_TOKENS if cuda else QUICK_TOKENS[:1]):
                if time.time() - start > args.budget:
                    skipped.append({"layer_K": k, "M": m})
                    continue
                r = layer_parts(k, n, n1, n2, m, dev, args.profile and cuda)
                r["device"] = device
                layer_records.append(r)
                print(
                    f"{k:6d} {n:6d} {m:5d} {r['bf16_us']:7.1f} {r['layer_us']:7.1f} {r['transform_us']:7.1f} "
                    f"{r['gemm_us']:7.1f} {r['layer_minus_parts_us']:11.1f}  {_gemm_short(r['gemm_config'])}",
                    flush=True,
                )
                for part in ("layer_kernels", "parts_kernels") if args.profile and cuda else ():
                    for kname, v in sorted(r[part].items(), key=lambda kv: -kv[1]["us_per_call"]):
                        print(f"    {part[:-8]:6s} {v['us_per_call']:7.2f} us x{v['calls']:<4d} {kname}")
                atomic_write_json(out_path, result)
    result["seconds"] = round(time.time() - start, 1)
    atomic_write_json(out_path, result)
    print(f"wrote {out_path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
