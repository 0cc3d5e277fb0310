"""Benchmark decode attention over the INT4 KV cache against BF16 SDPA (and flash-attn when installed).

One query token per sequence, full caches (seq_len = context), LLaMA-2-7B (Hq/Hkv/D = 32/32/128) and
LLaMA-3-8B (32/8/128) heads, batch 1/16/64, context 2048/8192. Timed: our Triton flash-decoding kernel on
the packed 4-bit cache; torch SDPA on the BF16 cache with grouped-query attention through ``enable_gqa=True``
(the KV heads are not duplicated) and, where G > 1, on a cache already expanded to Hq heads (what
``repeat_kv`` hands SDPA); ``flash_attn_with_kvcache`` when flash-attn is installed; and the append path
(quantize one new token per sequence and head: fused kernel vs the PyTorch ops). Medians of
``triton.testing.do_bench`` (L2 flushed between runs); achieved GB/s counts the cache bytes read once
(packed codes + fp32 scale and zero for us, BF16 K and V for SDPA), next to the device copy bandwidth
(read + write) measured in the same run. On CUDA the kernel, SDPA and the append are also timed as CUDA-graph
replays (``*_graph_us``): ``do_bench`` times back-to-back Python calls, so at small caches it measures the
host-side cost of a call; the graph replays measure the GPU alone. Prints a table, writes
benchmarks/results/decode_attention.json.

    PYTHONPATH=src python benchmarks/decode_attention.py [--sweep] [--out PATH]
    PYTHONPATH=src python benchmarks/decode_attention.py --quick     # toy sizes, runs on CPU too
"""

import argparse
import itertools
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in the interpreter off the GPU
os.environ.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # tune afresh: no results from earlier processes

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import kv_quant as kv  # noqa: E402

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

MODELS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # Hq, Hkv, D
BATCHES, CONTEXTS = (1, 16, 64), (2048, 8192)
QUICK_MODELS = {"toy-mha": (4, 4, 32), "toy-gqa": (4, 2, 32)}
QUICK_BATCHES, QUICK_CONTEXTS = (1, 2), (64, 128)


# (title, record key, width) of the printed table; times in us
COLUMNS = [
    ("model", "model", 11), ("B", "batch", 3), ("ctx", "context", 5),
    ("kv4", "kv4_us", 8), ("GB/s", "kv4_gbs", 6), ("kv4 asm", "kv4_asm_us", 8),
    ("sdpa", "sdpa_gqa_us", 8), ("GB/s", "sdpa_gqa_gbs", 6), ("x sdpa", "speedup_vs_sdpa_gqa", 6),
    ("fa2", "sdpa_flash_us", 8), ("effic", "sdpa_efficient_us", 8), ("cudnn", "sdpa_cudnn_us", 8),
    ("x best", "speedup_vs_best_sdpa", 6), ("expand", "sdpa_expanded_us", 8), ("fa-kvc", "flash_attn_us", 8),
    ("app.k", "append_kernel_us", 7), ("app.t", "append_torch_us", 7),
    ("kv4 g", "kv4_graph_us", 7), ("sdpa g", "sdpa_gqa_graph_us", 7), ("app.k g", "append_kernel_graph_us", 8),
]  # fmt: skip


def _cell(v, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width}.1f}" if isinstance(v, float) else f"{v:>{width}}"


def _bench(fn, cuda: bool) -> float:
    """Median time of fn in microseconds."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _bench_graph(fn) -> float | None:
    """Median time of fn replayed from a CUDA graph in microseconds (no host-side cost per call), or None
    when fn cannot be captured."""
    import triton.testing

    try:
        return round(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3, 2)
    except RuntimeError as e:  # e.g. a host sync inside fn
        print(f"  (not capturable in a CUDA graph: {str(e).splitlines()[0][:120]})")
        return None


def copy_bandwidth_gbs(cuda: bool, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    return 2 * nbytes / (_bench(lambda: dst.copy_(src), cuda) * 1e-6) / 1e9


def _caches(b, hkv, s, d, device):
    """BF16 K/V (B, Hkv, S, D) and their 4-bit packed form."""
    k = torch.randn(b, hkv, s, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, d, device=device, dtype=torch.bfloat16)
    return k, v, (*kv.quantize_kv(k), *kv.quantize_kv(v))


def measure(model, hq, hkv, d, b, s, cuda, config=None) -> dict:
    device = "cuda" if cuda else "cpu"
    g = hq // hkv
    k, v, packed = _caches(b, hkv, s, d, device)
    q = torch.randn(b, hq, d, device=device, dtype=torch.bfloat16)
    lens = torch.full((b,), s, dtype=torch.int32, device=device)
    sm = d**-0.5
    rec = {"model": model, "hq": hq, "hkv": hkv, "head_dim": d, "batch": b, "context": s}
    ours = _bench(lambda: kv.decode_attention_triton(q, *packed, lens, sm, config=config), cuda)
    if cuda:  # the same calls replayed from CUDA graphs (how decode runs when the host cost matters)
        rec["kv4_graph_us"] = _bench_graph(lambda: kv.decode_attention_triton(q, *packed, lens, sm, config=config))
        rec["config"] = config or kv.last_config(q, packed[0])  # the tuned choice (None: untuned)
        rec["kv4_default_graph_us"] = _bench_graph(
            lambda: kv.decode_attention_triton(q, *packed, lens, sm, config=kv.DEFAULT_CONFIG)
        )
        q4g = q[:, :, None]
        rec["sdpa_gqa_graph_us"] = _bench_graph(
            lambda: F.scaled_dot_product_attention(q4g, k, v, scale=sm, enable_gqa=g > 1)
        )
    if cuda:  # the inline-PTX unpacking variant (config "asm")
        asm_cfg = {**(config or {}), "asm": True}
        rec["kv4_asm_us"] = round(
            _bench(lambda: kv.decode_attention_triton(q, *packed, lens, sm, config=asm_cfg), cuda), 2
        )
    kv4_bytes = sum(t.numel() * t.element_size() for t in packed)
    bf16_bytes = 2 * k.numel() * k.element_size()
    q4 = q[:, :, None]  # (B, Hq, 1, D)
    sdpa = _bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=sm, enable_gqa=g > 1), cuda)
    rec.update(
        kv4_us=round(ours, 2),
        kv4_bytes=kv4_bytes,
        kv4_gbs=round(kv4_bytes / (ours * 1e-6) / 1e9, 1),
        sdpa_gqa_us=round(sdpa, 2),
        bf16_bytes=bf16_bytes,
        sdpa_gqa_gbs=round(bf16_bytes / (sdpa * 1e-6) / 1e9, 1),
        speedup_vs_sdpa_gqa=round(sdpa / ours, 2),
    )
    if cuda:  # which SDPA backend is fastest here (the default pick is timed above)
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            backend = getattr(SDPBackend, name, None)
            try:
                with sdpa_kernel([backend]):
                    us = _bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=sm, enable_gqa=g > 1), cuda)
            except (RuntimeError, TypeError):  # not available for these inputs or this build
                us = None
            rec[f"sdpa_{name.split('_')[0].lower()}_us"] = None if us is None else round(us, 2)
    best = min(t for t in (sdpa, *(rec.get(f"sdpa_{n}_us") for n in ("flash", "efficient", "cudnn"))) if t)
    rec["speedup_vs_best_sdpa"] = round(best / ours, 2)
    if g > 1:  # the cache as repeat_kv hands it to SDPA: G copies of every KV head (built outside the timing)
        ke, ve = (t.repeat_interleave(g, dim=1) for t in (k, v))
        rec["sdpa_expanded_us"] = round(_bench(lambda: F.scaled_dot_product_attention(q4, ke, ve, scale=sm), cuda), 2)
        del ke, ve
    if flash_attn_with_kvcache is not None and cuda:
        kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # (B, S, Hkv, D)
        qf = q[:, None]  # (B, 1, Hq, D)
        fa = _bench(lambda: flash_attn_with_kvcache(qf, kf, vf, cache_seqlens=lens, softmax_scale=sm), cuda)
        rec["flash_attn_us"] = round(fa, 2)
        del kf, vf
    new = torch.randn(b, hkv, 1, d, device=device, dtype=torch.bfloat16)  # one decode step's K for one layer
    if cuda or kv._interpreting():
        rec["append_kernel_us"] = round(_bench(lambda: kv.quantize_kv_triton(new), cuda), 2)
        if cuda:
            rec["append_kernel_graph_us"] = _bench_graph(lambda: kv.quantize_kv_triton(new))
    rec["append_torch_us"] = round(_bench(lambda: kv.quantize_kv_reference(new), cuda), 2)
    return rec


def _sweep_shape(model, hq, hkv, d, b, s) -> list[dict]:
    _, _, packed = _caches(b, hkv, s, d, "cuda")
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    out = []
    for bn, warps, stages, pps, asm in itertools.product((32, 64, 128), (4, 8), (2, 3), (2, 4, 8), (False, True)):
        cfg = {"block_n": bn, "num_warps": warps, "num_stages": stages, "progs_per_sm": pps, "asm": asm}
        try:
            us = _bench(lambda c=cfg: kv.decode_attention_triton(q, *packed, lens, 0.1, config=c), True)
        except Exception as err:  # out of resources, for instance
            print(f"sweep {model} B={b} S={s} {cfg}: {type(err).__name__}")
            continue
        out.append({"model": model, "batch": b, "context": s, **cfg, "kv4_us": round(us, 2)})
        print(f"sweep {model} B={b} S={s} {cfg}: {us:8.1f} us")
    return out


def sweep() -> list[dict]:
    """Launch configurations at three representative shapes (GPU); prints and returns the records."""
    shapes = (("llama-3-8b", 1, 8192), ("llama-2-7b", 16, 2048), ("llama-3-8b", 64, 8192))
    return [rec for model, b, s in shapes for rec in _sweep_shape(model, *MODELS[model], b, s)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decode_attention.json"))
    ap.add_argument("--quick", action="store_true", help="toy sizes (runs on CPU through the Triton interpreter)")
    ap.add_argument("--sweep", action="store_true", help="also time launch configurations (GPU)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    models, batches, contexts = (
        (QUICK_MODELS, QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (MODELS, BATCHES, CONTEXTS)
    )
    copy_gbs = copy_bandwidth_gbs(cuda, 1 << 30 if cuda else 1 << 24)
    print(f"device: {device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print(f"flash-attn: {'installed' if flash_attn_with_kvcache is not None else 'not installed'}")
    sweep_records = sweep() if args.sweep and cuda else []
    for r in sweep_records:
        r.update(device=device, torch=torch.__version__)
    print(" ".join(f"{title:>{w}}" for title, _, w in COLUMNS))
    records = []
    for model, (hq, hkv, d) in models.items():
        for b in batches:
            for s in contexts:
                r = measure(model, hq, hkv, d, b, s, cuda)
                r.update(copy_gbs=round(copy_gbs, 1), device=device, torch=torch.__version__)
                records.append(r)
                print(" ".join(_cell(r.get(key), w) for _, key, w in COLUMNS))
                torch.cuda.empty_cache() if cuda else None
    atomic_write_json(args.out, {"records": records, "sweep": sweep_records})
    if sweep_records:
        for model, b, s in sorted({(r["model"], r["batch"], r["context"]) for r in sweep_records}):
            best = min(
                (r for r in sweep_records if (r["model"], r["batch"], r["context"]) == (model, b, s)),
                key=lambda r: r["kv4_us"],
            )
            print(f"best config {model} B={b} S={s}: {best}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
