"""End-to-end speed and memory: packed W4A4KV4 model vs the BF16 Hugging Face model (SDPA), LLaMA shapes.

Usage (one GPU, about 5-8 minutes on an H100):
    PYTHONPATH=src python benchmarks/e2e.py [--out benchmarks/results/e2e.json]
    PYTHONPATH=src python benchmarks/e2e.py --quick --out /tmp/e2e.json      # tiny model, CPU, seconds

Models are built from the LLaMA-2-7B and LLaMA-3-8B configs with random weights, in the script (timings do not
depend on the values; never read accuracy from them). The W4A4 model is the packed runtime of
``flatquant.load_packed`` (4-bit linears with online transforms, INT4 KV cache), filled with random codes.

* prefill: one forward of 2048 tokens per sequence at batch 1, 4, 16, writing the KV cache (BF16:
  transformers' DynamicCache, what ``generate()`` uses; W4A4: ``Int4KVCache``), logits of the last token.
* decode: single-token steps after a prompt, at batch 1, 16, 64. ``--decode-steps`` steps are timed
  (after warm-up steps) with the cache holding about 2048 + 128 tokens, the middle of a 256-token generation
  after a 2048-token prompt, and 256 x the mean step is reported (attention cost grows linearly with the
  length, so the middle step is the mean). The prompt is written into the cache by a prefill (not timed), or
  with ``--decode-fill random`` as random cache contents (no prefill: a decode-only run then compiles and tunes
  no prefill-size GEMM; a step's time does not depend on the cached values).
* memory: bytes of all weights (parameters and buffers) and of the KV cache at 2048 + 256 tokens
  (measured per token on the filled cache), and the peak allocated memory of each decode run.
* breakdown: a torch.profiler trace of one prefill (batch 4) and a few decode steps (batch 16) of each model,
  device time summed by kernel name into GEMM / transform+quantize / attention / other; for W4A4 also one
  prefill replayed from its CUDA graph (``prefill-graph``: the kernels as served) and 4 decode steps replayed
  from theirs (``decode-graph``, as served: with programmatic dependent launch a kernel starts while its
  predecessor finishes and waits inside, so the kernels' spans overlap and their sum exceeds the step; and
  ``decode-graph-serial``, the same steps captured without it: each kernel's own time, summing to about the
  step). ``--breakdown-phases decode`` profiles the decode steps only (no prefill-size tuning).

Eager PyTorch for both models (what ``generate()`` runs), so decode at small batch includes Python launch
overhead. Decode is also timed replayed from CUDA graphs, for both models: W4A4 through
``flatquant.kvcache.GraphedDecoder`` over a static INT4 cache, BF16 over transformers' ``StaticCache``
(``bf16_graphed_ms``, ``w4a4_graphed_ms``, ``speedup_graphed``). Prefill likewise: W4A4 through
``flatquant.kvcache.GraphedPrefill`` (the prompt fills its one bucket), BF16 over a ``StaticCache``.
``speedup_best_bf16`` ("vs best") divides the faster of the two BF16 times (eager or graph) by the W4A4
graph's: the BF16 graph's prefill attends with a materialised causal mask (transformers cannot skip it while
a graph is captured), which makes it slower than eager BF16 at batch 1.
A configuration that runs out of memory, or would start after --budget-s seconds (default 420, so the
whole run stays under 8 minutes), is recorded with null times and a note.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time

os.environ.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # tune afresh: no results from earlier processes

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig  # noqa: E402

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kernels import pdl as _pdl  # noqa: E402
from flatquant.kernels.rope import unfuse_rotary  # noqa: E402
from flatquant.kvcache import GraphedDecoder, GraphedPrefill, Int4KVCache, cache_kwargs  # noqa: E402
from flatquant.packed import HEAD_GROUP, finish_packed_model, head_group_for, packed_skeleton  # noqa: E402
from flatquant.report import device_name  # noqa: E402
from flatquant.transforms import kron_factors, random_orthogonal  # noqa: E402

CONFIGS = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192,
    ),
}  # fmt: skip
QUICK = {
    "tiny-llama": dict(
        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=1024,
    )
}  # fmt: skip
CATEGORIES = {  # substrings of kernel (CUDA) or op (CPU) names, checked in this order (unpack_e4m3: the dense FP8
    # path's weight unpacking, part of its GEMM)
    "attention": ("attention", "attn", "flash", "fmha", "sdpa", "softmax", "decode"),
    "transform+quantize": ("kron", "quantize", "round"),
    "gemm": (
        "w4a4",
        "gemm",
        "unpack_e4m3",
        "nvjet",
        "cutlass",
        "xmma",
        "cublas",
        "aten::mm",
        "aten::bmm",
        "aten::addmm",
    ),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device, reps: int) -> float:
    """Median wall milliseconds of ``fn()`` over ``reps`` runs (synchronised)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def model_bytes(model) -> int:
    """Bytes of the model's tensors, each storage once (tied or concatenated-and-viewed tensors); on the meta
    device, where nothing has an address, each tensor object once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_meta else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def bf16_model(cfg: dict, device, dtype):
    unfuse_rotary()  # the baseline runs transformers' own RoPE (a packed model built earlier fused it)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype, attn_implementation="sdpa").eval()


def _transforms(cfg: dict, act_symmetric: bool = True) -> dict:
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return {
        "qkv": list(kron_factors(cfg["hidden_size"])),
        "gate_up": list(kron_factors(cfg["hidden_size"])),
        "down": list(kron_factors(cfg["intermediate_size"])),
        "o": [cfg["num_attention_heads"], head_dim],
        "p_h": True,
        "act_symmetric": act_symmetric,
    }


def weight_sizes(name: str, dtype=torch.bfloat16) -> dict:
    """Bytes of the BF16 model and of the packed model (16- and 8-bit head) of a config, counted by
    ``model_bytes`` on the meta device (no memory, no GPU)."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        bf16 = model_bytes(AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype))
    out = {"model": name, "weights_bytes_bf16": bf16}
    for bits, group in ((16, None), (8, None), (8, HEAD_GROUP)):
        group = head_group_for(cfg["hidden_size"], group)
        skeleton = packed_skeleton(LlamaConfig(**cfg), _transforms(cfg), dtype, head_bits=bits, head_group=group)
        w4a4 = model_bytes(skeleton)
        tag = f"head{bits}" + (f"_group{group}" if group else "")
        out[f"weights_bytes_w4a4_{tag}"] = w4a4
        out[f"ratio_{tag}"] = round(bf16 / w4a4, 3)
    return out


@torch.no_grad()
def w4a4_model(
    cfg: dict,
    device,
    dtype,
    seed: int = 0,
    head_bits: int = 16,
    head_group: int | None = HEAD_GROUP,
    act_symmetric: bool = True,
):
    """The packed runtime for ``cfg`` with random 4-bit codes, scales, orthogonal factors and embeddings
    (head_bits=8: the embedding and lm_head as random int8 codes and scales, one per head_group columns;
    act_symmetric=False: per-token asymmetric activations, as ``--preset accurate`` calibrates)."""
    config = LlamaConfig(**cfg)
    group = head_group_for(cfg["hidden_size"], head_group) if head_bits == 8 else None
    transforms = _transforms(cfg, act_symmetric)
    skeleton = packed_skeleton(config, transforms, dtype, head_bits=head_bits, head_group=group)
    model = skeleton.to_empty(device=device)
    g = torch.Generator().manual_seed(seed)  # small factors on the CPU; big tensors drawn on the device
    torch.manual_seed(seed)
    for mod in model.modules():
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t.dtype == torch.uint8:  # packed weights
                t.random_(0, 256)
            elif t.dtype == torch.int8:  # an 8-bit embedding / lm_head
                t.random_(-127, 128)
            elif name == "weight_scale":  # rows of about 0.02 standard deviation, as the 16-bit ones
                t.fill_(0.02 / 73)
            elif name == "w_scale":  # output variance about the input's
                t.fill_(1.0 / (4.6 * math.sqrt(2 * mod.w_packed.shape[1])))
            elif name in ("p1", "p2", "p_h"):
                t.copy_(random_orthogonal(t.shape[0], g).to(t.dtype))
            elif name == "p_h_inv":
                t.copy_(mod.p_h.T)
            elif "norm" in type(mod).__name__.lower():
                t.fill_(1.0)
            elif t.is_floating_point():
                t.normal_(0.0, 0.02)
    return finish_packed_model(model, device)


def new_cache(model, kind: str, capacity: int):
    return Int4KVCache(model, min_capacity=capacity) if kind == "w4a4" else DynamicCache()


_FILL = ["prefill"]  # how decode runs fill their cache with the prompt (--decode-fill)


def fill_random(cache, model, kind: str, batch: int, tokens: int, capacity: int, device) -> torch.Tensor:
    """Write ``tokens`` positions of random contents into every layer of an empty ``cache`` (Int4KVCache: codes,
    scales and zero points straight into its storage of ``capacity`` tokens; transformers' caches: random K/V
    through ``update``) instead of prefilling a prompt, and return random next-token ids (batch, 1). A decode
    step's time does not depend on the cached values, and a decode-only run then compiles and tunes no
    prefill-size GEMM. The cache stays dynamic (``make_static`` as after a prefill)."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if kind == "w4a4":
        cache.allocate_static(batch, capacity, kv_heads, device)
        for layer in cache.layers:
            layer.k_packed.random_(0, 256), layer.v_packed.random_(0, 256)
            for t in (layer.k_scale, layer.v_scale):
                t.fill_(0.02)
            for t in (layer.k_zero, layer.v_zero):
                t.fill_(7.5)
            layer.length, layer.lens, layer.dtype = tokens, None, model.dtype
    else:
        kw = {"cache_position": torch.arange(tokens, device=device)}
        for i in range(cfg.num_hidden_layers):
            k, v = (torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=model.dtype) for _ in "kv")
            cache.update(k, v, i, kw)
    return torch.randint(0, cfg.vocab_size, (batch, 1), device=device)


def fill_prompt(cache, model, kind, batch, tokens, capacity, device, positions=False) -> torch.Tensor:
    """``tokens`` prompt positions into the empty ``cache`` as ``--decode-fill`` says: a prefill of random ids
    (with explicit cache positions when ``positions``, as transformers' StaticCache needs) or random contents
    (:func:`fill_random`). Returns the next-token ids (batch, 1)."""
    if _FILL[0] == "random":
        return fill_random(cache, model, kind, batch, tokens, capacity, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=device)
    kw = {"cache_position": torch.arange(tokens, device=device)} if positions else {}
    return model(ids, logits_to_keep=1, **kw, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)


def kv_bytes(cache, kind: str) -> int:
    if kind == "w4a4":
        return cache.nbytes()
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)  # at 2 bytes each


@torch.no_grad()
def prefill(model, kind, batch, seqlen, device, reps) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)

    def run():
        model(ids, logits_to_keep=1, **cache_kwargs(model, new_cache(model, kind, seqlen)))

    run()  # warm-up (Triton autotuning for this shape)
    return timed_ms(run, device, reps)


def _warm_graphed_prefill(model, batch, seqlen, device):
    """(GraphedPrefill whose prompt fills its one bucket, the prompt ids), past its eager call (autotuning),
    its capture and one replay."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
    pre = GraphedPrefill(model, new_cache(model, "w4a4", seqlen), capacity=seqlen, buckets=(seqlen,))
    for _ in range(3):
        pre(ids)
    return pre, ids


@torch.no_grad()
def prefill_graphed(model, batch, seqlen, device, reps) -> dict | None:
    """The W4A4 model's prefill replayed from a CUDA graph (``GraphedPrefill``, the prompt filling one bucket),
    median of ``reps``; eager through the same static path off CUDA. None (reason printed) if capture fails."""
    try:
        pre, ids = _warm_graphed_prefill(model, batch, seqlen, device)
    except RuntimeError as e:
        print(f"  graphed prefill unavailable: {str(e).splitlines()[0][:160]}")
        return None
    return {"ms": timed_ms(lambda: pre(ids), device, reps), "graph": pre._static[(batch, seqlen)]["graph"] is not None}


@torch.no_grad()
def prefill_graphed_bf16(model, batch, seqlen, device, reps) -> dict | None:
    """The BF16 model's prefill replayed from a CUDA graph over transformers' StaticCache (reset, then the prompt
    written at positions 0 .. seqlen - 1, on every replay), as ``prefill_graphed``."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=seqlen)
    kw = cache_kwargs(model, cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
    position = torch.arange(seqlen, device=device).unsqueeze(0)

    def forward():  # the reset (a memset of the cache, <1% of a prefill) rewinds its write position
        cache.reset()
        return model(ids, position_ids=position, logits_to_keep=1, **kw).logits

    graph = None
    try:
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()
    except RuntimeError as e:
        print(f"  graphed BF16 prefill unavailable: {str(e).splitlines()[0][:160]}")
        return None
    run = graph.replay if graph is not None else forward
    run()
    return {"ms": timed_ms(run, device, reps), "graph": graph is not None}


def _ms_per_step(step, steps: int, device) -> float:
    """Mean wall time of ``steps`` calls of ``step`` in ms, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


@torch.no_grad()
def decode(model, kind, batch, prompt, gen, steps, warmup, device) -> dict:
    """ms per decode step around the middle of a ``gen``-token generation after ``prompt`` tokens."""
    start = prompt + gen // 2 - steps // 2 - warmup
    cache = new_cache(model, kind, prompt + gen)
    nxt = fill_prompt(cache, model, kind, batch, start, prompt + gen, device)

    def step():
        nonlocal nxt
        nxt = model(nxt, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)

    for _ in range(warmup):
        step()
    per_step = _ms_per_step(step, steps, device)
    length = cache.get_seq_length()
    kv = kv_bytes(cache, kind) * (prompt + gen) // length  # per-token storage x the final length
    return {"ms_per_step": per_step, "kv_bytes": kv, "cache_tokens_timed": [length - steps, length]}


@torch.no_grad()
def decode_graphed(model, batch, prompt, gen, steps, warmup, device) -> dict | None:
    """The W4A4 model's decode steps replayed from a CUDA graph (static INT4 cache), as ``decode``;
    eager through the same static path off CUDA. None (with the reason printed) if capture fails."""
    start = prompt + gen // 2 - steps // 2 - warmup
    cache = new_cache(model, "w4a4", prompt + gen)
    nxt = fill_prompt(cache, model, "w4a4", batch, start, prompt + gen, device)
    cache.make_static(prompt + gen)
    dec = GraphedDecoder(model, cache, use_graph=device.type == "cuda")
    try:
        for _ in range(max(warmup, dec.warmup_steps + 1)):  # eager warm-up, then the capture and one replay
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
    except RuntimeError as e:
        print(f"  graphed decode unavailable: {str(e).splitlines()[0][:160]}")
        return None

    def step():
        nonlocal nxt
        nxt = dec.step(nxt).argmax(-1, keepdim=True)

    return {"ms_per_step": _ms_per_step(step, steps, device), "graph": dec.graph is not None}


@torch.no_grad()
def decode_graphed_bf16(model, batch, prompt, gen, steps, warmup, device) -> dict | None:
    """The BF16 model's decode steps replayed from a CUDA graph over transformers' StaticCache (what its
    ``torch.compile`` "reduce-overhead" mode relies on), as ``decode``; eager through the same path off CUDA.
    The cache position lives in a device tensor advanced between replays, so the mask and the cache writes
    follow it inside the graph. None (with the reason printed) if the capture fails."""
    from transformers import StaticCache

    start = prompt + gen // 2 - steps // 2 - warmup
    cache = StaticCache(config=model.config, max_cache_len=prompt + gen)
    kw = cache_kwargs(model, cache)
    static_ids = fill_prompt(cache, model, "bf16", batch, start, prompt + gen, device, positions=True)
    position = torch.tensor([start], device=device)

    def forward():
        return model(static_ids, cache_position=position, logits_to_keep=1, **kw).logits[:, -1]

    def advance(out):
        static_ids.copy_(out.argmax(-1, keepdim=True))
        position.add_(1)

    graph = None
    try:
        for _ in range(max(1, warmup - 1)):  # eager warm-up steps
            advance(forward())
        if device.type == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward()
    except RuntimeError as e:
        print(f"  graphed BF16 decode unavailable: {str(e).splitlines()[0][:160]}")
        return None

    def step():
        if graph is None:
            advance(forward())
        else:
            graph.replay()
            advance(out)

    step()
    return {"ms_per_step": _ms_per_step(step, steps, device), "graph": graph is not None}


def _profile_parts(run, model, device, steps: int) -> dict:
    """Device (or CPU) time of ``run()`` by category, launches per layer and step, the top kernels, and the
    host's enqueue time against the wall time of an unprofiled call."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    # host time to enqueue the work against the wall time: equal when the host is the bottleneck
    _sync(device)
    t0 = time.perf_counter()
    run()
    t1 = time.perf_counter()
    _sync(device)
    host_wall = [1000 * (t1 - t0), 1000 * (time.perf_counter() - t0)]
    with torch.profiler.profile(activities=acts) as prof:
        run()
        _sync(device)
    kernels = {c: [] for c in [*CATEGORIES, "other"]}  # (ms, launches, name): kernels (CUDA) or aten ops (CPU)
    for e in prof.key_averages():
        if device.type == "cuda":
            if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES.items() if any(k in name for k in keys)), "other")
        kernels[cat].append((us / 1000, e.count, e.key[:100]))
    totals = {c: sum(ms for ms, _, _ in ks) for c, ks in kernels.items()}
    layer_steps = steps * model.config.num_hidden_layers
    per_layer = {c: sum(n for _, n, _ in ks) / layer_steps for c, ks in kernels.items()}
    top = {c: [[round(ms, 3), n, key] for ms, n, key in sorted(ks, reverse=True)[:8]] for c, ks in kernels.items()}
    out = {"steps": steps, "ms": totals, "launches_per_layer_step": per_layer, "top": top}
    out["host_ms"], out["wall_ms"] = host_wall
    return out


def _graph_decode_parts(model, batch, seqlen, device, pdl: bool) -> dict:
    """4 decode steps of the W4A4 model replayed from a CUDA graph captured with programmatic dependent launch
    on or off (eager through the same static path off CUDA), profiled as :func:`_profile_parts`."""
    prev = _pdl.ENABLED
    _pdl.ENABLED = pdl and prev  # read per launch: the capture below records the kernels with or without it
    try:
        capacity = seqlen + 32  # warm-up, one timed and one profiled run of 4 steps each
        cache = new_cache(model, "w4a4", capacity)
        nxt = fill_prompt(cache, model, "w4a4", batch, seqlen, capacity, device)
        cache.make_static(capacity)
        dec = GraphedDecoder(model, cache, use_graph=device.type == "cuda")
        for _ in range(dec.warmup_steps + 1):
            nxt = dec.step(nxt).argmax(-1, keepdim=True)

        def run():
            nonlocal nxt
            for _ in range(4):
                nxt = dec.step(nxt).argmax(-1, keepdim=True)

        out = _profile_parts(run, model, device, 4)
        out["pdl"] = _pdl.pdl_on(torch.empty(0, device=device))  # as launched: off on the CPU and older GPUs
        return out
    finally:
        _pdl.ENABLED = prev


def breakdown(model, kind, device, batch_prefill, batch_decode, seqlen, phases=("prefill", "decode")) -> dict:
    """Device (or CPU) time by category for one prefill and 4 decode steps (``phases``: either or both); for
    W4A4 also one prefill replayed from its CUDA graph (``prefill-graph``: the kernels as served, which can
    differ from the eager ones, e.g. when transformers builds an attention mask during the capture; eager on the
    CPU) and 4 decode steps replayed from graphs with and without programmatic dependent launch
    (``decode-graph``, ``decode-graph-serial``; see the module doc)."""
    out = {}
    for phase, batch in (("prefill", batch_prefill), ("decode", batch_decode)):
        if phase not in phases:
            continue
        with torch.no_grad():
            cache = new_cache(model, kind, seqlen + 8)
            if phase == "prefill":
                ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
                model(ids, logits_to_keep=1, **cache_kwargs(model, cache))
            else:
                ids = None
                nxt = fill_prompt(cache, model, kind, batch, seqlen, seqlen + 8, device)

            def run(phase=phase, ids=ids, cache=cache):  # this iteration's (called within it)
                nonlocal nxt
                if phase == "prefill":
                    model(ids, logits_to_keep=1, **cache_kwargs(model, new_cache(model, kind, seqlen)))
                else:
                    for _ in range(4):
                        nxt = model(nxt, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)

            out[phase] = {"batch": batch, **_profile_parts(run, model, device, 1 if phase == "prefill" else 4)}
    if kind == "w4a4":
        with torch.no_grad():
            if "prefill" in phases:
                pre, ids = _warm_graphed_prefill(model, batch_prefill, seqlen, device)
                out["prefill-graph"] = {"batch": batch_prefill, **_profile_parts(lambda: pre(ids), model, device, 1)}
            if "decode" in phases:
                for name, pdl in (("decode-graph", True), ("decode-graph-serial", False)):
                    parts = _graph_decode_parts(model, batch_decode, seqlen, device, pdl)
                    out[name] = {"batch": batch_decode, **parts}
    return out


def measure(name, kind, cfg, args, device, dtype, res: dict) -> dict | None:
    """Timings and memory of one model (bf16 or w4a4) into ``res`` as they come (kept if a later one fails);
    returns the breakdown. The model is freed on return."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = (
        bf16_model(cfg, device, dtype)
        if kind == "bf16"
        else w4a4_model(
            cfg,
            device,
            dtype,
            head_bits=args.head_bits,
            head_group=args.head_group or None,
            act_symmetric=not args.act_asymmetric,
        )
    )
    res["weights_bytes"] = model_bytes(model)
    print(f"{name} {kind}: built in {time.perf_counter() - t0:.1f} s, {res['weights_bytes'] / 2**30:.2f} GiB")
    for b in args.prefill_batches:
        res[("prefill", b)] = _guard(prefill, model, kind, b, args.seqlen, device, args.reps)
        graphed = prefill_graphed if kind == "w4a4" else prefill_graphed_bf16
        res[("prefill_graphed", b)] = _guard(graphed, model, b, args.seqlen, device, args.reps)
    for b in args.decode_batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = _guard(decode, model, kind, b, args.seqlen, args.gen, args.decode_steps, args.warmup_steps, device)
        if r is not None and device.type == "cuda":
            r["peak_bytes"] = torch.cuda.max_memory_allocated()
        res[("decode", b)] = r
        graphed = decode_graphed if kind == "w4a4" else decode_graphed_bf16
        res[("decode_graphed", b)] = _guard(
            graphed, model, b, args.seqlen, args.gen, args.decode_steps, args.warmup_steps, device
        )
    if args.no_breakdown:
        return None
    return _guard(breakdown, model, kind, device, *args.breakdown_batches, args.seqlen, args.breakdown_phases)


def run_model(name, cfg, args, device, dtype) -> tuple[list[dict], dict]:
    """Records of both models; a failure (e.g. a faulting kernel, after which the device is unusable) keeps
    what was measured before it and is returned as text, for the caller to save the records and stop."""
    res, extra, error = {"bf16": {}, "w4a4": {}}, {}, None
    for kind in args.kinds:
        try:
            extra[kind] = measure(name, kind, cfg, args, device, dtype, res[kind])
        except Exception as e:  # noqa: BLE001 - reported with the records, then raised by main
            error = f"{name} {kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            break
    records = []
    for phase, batches in (("prefill", args.prefill_batches), ("decode", args.decode_batches)):
        for b in batches:
            bf, w4 = res["bf16"].get((phase, b)), res["w4a4"].get((phase, b))
            rec = {"model": name, "phase": phase, "batch": b}
            if phase == "prefill":
                rec.update(bf16_ms=bf, w4a4_ms=w4, tokens=args.seqlen)
                for kind in ("bf16", "w4a4"):  # replayed from CUDA graphs (eager through the same path off CUDA)
                    gr = res[kind].get(("prefill_graphed", b))
                    rec[f"{kind}_graphed_ms"] = None if gr is None else gr["ms"]
                    rec[f"{kind}_graphed_is_graph"] = None if gr is None else gr["graph"]
            else:
                scale = args.gen
                rec.update(
                    bf16_ms=None if bf is None else bf["ms_per_step"] * scale,
                    w4a4_ms=None if w4 is None else w4["ms_per_step"] * scale,
                    bf16_ms_per_step=None if bf is None else bf["ms_per_step"],
                    w4a4_ms_per_step=None if w4 is None else w4["ms_per_step"],
                    prompt=args.seqlen,
                    new_tokens=args.gen,
                    steps_timed=args.decode_steps,
                    extrapolated=f"{args.gen} x mean of {args.decode_steps} steps at cache length "
                    f"{(w4 or bf or {}).get('cache_tokens_timed')}",
                    kv_bytes_bf16=None if bf is None else bf["kv_bytes"],
                    kv_bytes_w4a4=None if w4 is None else w4["kv_bytes"],
                    peak_bytes_bf16=None if bf is None else bf.get("peak_bytes"),
                    peak_bytes_w4a4=None if w4 is None else w4.get("peak_bytes"),
                )
                for kind in ("bf16", "w4a4"):
                    gr = res[kind].get(("decode_graphed", b))
                    rec[f"{kind}_graphed_ms_per_step"] = None if gr is None else gr["ms_per_step"]
                    rec[f"{kind}_graphed_ms"] = None if gr is None else gr["ms_per_step"] * scale
                    rec[f"{kind}_graphed_is_graph"] = None if gr is None else gr["graph"]
            rec["speedup_graphed"] = (  # both replayed from graphs
                None
                if not (rec["bf16_graphed_ms"] and rec["w4a4_graphed_ms"])
                else rec["bf16_graphed_ms"] / rec["w4a4_graphed_ms"]
            )
            # the fastest BF16 run (eager or graph: the BF16 graph's prefill attends with a materialised mask)
            # against the W4A4 graph, the way a user would serve each
            best_bf16 = min((t for t in (rec["bf16_ms"], rec["bf16_graphed_ms"]) if t), default=None)
            rec["speedup_best_bf16"] = (
                None if not (best_bf16 and rec["w4a4_graphed_ms"]) else best_bf16 / rec["w4a4_graphed_ms"]
            )
            rec.update(
                weights_bytes_bf16=res["bf16"].get("weights_bytes"),
                weights_bytes_w4a4=res["w4a4"].get("weights_bytes"),
                speedup=None if not (rec["bf16_ms"] and rec["w4a4_ms"]) else rec["bf16_ms"] / rec["w4a4_ms"],
                note=None
                if bf is not None and w4 is not None
                else f"null: {error}"
                if error
                else "null: out of memory or time budget (see the log)",
                device=device_name(device),
            )
            records.append(rec)
    return records, extra, error


_DEADLINE = [float("inf")]  # perf_counter time after which measurements are skipped (--budget-s)


def _guard(fn, *args):
    """fn(*args), or None when the device runs out of memory (its tensors freed once the exception is gone)
    or the time budget is spent."""
    label = f"{fn.__name__}{tuple(a for a in args if isinstance(a, (int, str)))}"
    if time.perf_counter() > _DEADLINE[0]:
        print(f"  skipped {label}: time budget spent")
        return None
    print(f"  {label} ...", flush=True)  # so that a crash (not an exception: a faulting kernel) names its step
    try:
        out = fn(*args)
        summary = {k: v for k, v in out.items() if isinstance(v, float)} if isinstance(out, dict) else out
        print(f"  {label}: {summary if isinstance(summary, (dict, float)) else 'done'}", flush=True)
        return out
    except torch.OutOfMemoryError as e:
        print(f"  out of memory: {str(e).splitlines()[0]}")
    gc.collect()
    torch.cuda.empty_cache()
    return None


def _num(v, spec: str) -> str:
    """``v`` formatted with ``spec``, or n/a in the same width."""
    return "n/a".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)


def _ratio(v, spec: str) -> str:
    return _num(v, spec) + (" " if v is None else "x")


def print_table(records: list[dict]) -> None:
    head = f"{'model':<12}{'phase':<9}{'batch':>6}{'bf16 ms':>11}{'w4a4 ms':>11}{'speed-up':>10}{'KV x':>7}{'W x':>7}"
    print(head + f"{'bf16 graph':>12}{'w4a4 graph':>12}{'speed-up':>10}{'vs best':>9}")
    for r in records:
        f, x = _num, _ratio
        kv = r.get("kv_bytes_bf16") and r.get("kv_bytes_w4a4") and r["kv_bytes_bf16"] / r["kv_bytes_w4a4"]
        wx = r["weights_bytes_w4a4"] and r["weights_bytes_bf16"] and r["weights_bytes_bf16"] / r["weights_bytes_w4a4"]
        print(
            f"{r['model']:<12}{r['phase']:<9}{r['batch']:>6}{f(r['bf16_ms'], '11.1f')}{f(r['w4a4_ms'], '11.1f')}"
            f"{x(r['speedup'], '9.2f')}{f(kv or None, '6.2f') if r['phase'] == 'decode' else '':>7}"
            f"{f(wx, '7.2f'):>7}"
            + (
                f"{f(r.get('bf16_graphed_ms'), '12.1f')}{f(r.get('w4a4_graphed_ms'), '12.1f')}"
                f"{x(r.get('speedup_graphed'), '9.2f')}{x(r.get('speedup_best_bf16'), '8.2f')}"
            )
        )


def tuned_decode_configs() -> list[dict]:
    """The launch config the decode attention tuning chose per shape in this process (KV programs = batch x KV
    heads, query heads per KV head, head dim, capacity rounded up to a power of two), and how many candidates
    failed to run there (a compile error also warns)."""
    from flatquant.kernels import kv_quant

    keys = ("kv_programs", "group", "head_dim", "capacity_pow2")
    skipped = kv_quant.skipped_configs()
    return [
        {**dict(zip(keys, key[2:], strict=True)), "config": cfg, "skipped": len(skipped.get(key, []))}
        for key, cfg in kv_quant._TUNED.items()
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results JSON [default benchmarks/results/e2e.json; none if --quick]")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU (or the GPU) in seconds")
    p.add_argument("--head-bits", type=int, choices=(8, 16), default=16, help="W4A4 embedding and lm_head bits")
    p.add_argument(
        "--head-group", type=int, default=HEAD_GROUP, help="with --head-bits 8: columns per scale, 0 = per row"
    )
    p.add_argument(
        "--act-asymmetric", action="store_true", help="W4A4 with per-token asymmetric activations (--preset accurate)"
    )
    p.add_argument("--sizes", action="store_true", help="only the weight bytes (meta device, no GPU), with 8-bit heads")
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {sorted(CONFIGS)}")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first (autotuning)")
    p.add_argument("--reps", type=int, default=3, help="timed prefills per batch size (median)")
    p.add_argument("--budget-s", type=float, default=420, help="skip measurements that would start after this")
    p.add_argument("--prefill-batches", type=int, nargs="*", default=None, help="instead of 1 4 16 (quick: 1 2)")
    p.add_argument("--decode-batches", type=int, nargs="*", default=None, help="instead of 1 16 64 (quick: 1 4)")
    p.add_argument(
        "--kinds", nargs="+", choices=("bf16", "w4a4"), default=["bf16", "w4a4"],
        help="models to measure (w4a4 alone: a same-job comparison of a switch, the BF16 baseline from another run)",
    )  # fmt: skip
    p.add_argument(
        "--breakdown-batches", type=int, nargs=2, default=None, metavar=("PREFILL", "DECODE"),
        help="batch sizes of the profiled prefill and decode [default 4 16; quick: 2 4]",
    )  # fmt: skip
    p.add_argument("--no-breakdown", action="store_true", help="skip the profiled per-part breakdown")
    p.add_argument(
        "--breakdown-phases", nargs="+", choices=("prefill", "decode"), default=["prefill", "decode"],
        help="phases the breakdown profiles (decode alone: no prefill-size GEMM tuning with --decode-fill random)",
    )  # fmt: skip
    p.add_argument(
        "--decode-fill", choices=("prefill", "random"), default="prefill",
        help="decode runs fill the cache by a prefill of random ids, or write random contents (no prefill-size "
        "GEMM compiles and tuning: faster decode-only runs)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.sizes:
        rows = [weight_sizes(name) for name in (args.models or CONFIGS)]
        print(
            f"{'model':12} {'BF16 GB':>8} {'W4A4 GB':>8} {'ratio':>6} {'8-bit head GB':>14} {'ratio':>6} {'grouped':>8}"
        )
        for r in rows:
            grouped = next(k for k in r if k.startswith("ratio_head8_group"))
            print(
                f"{r['model']:12} {r['weights_bytes_bf16'] / 1e9:8.2f} {r['weights_bytes_w4a4_head16'] / 1e9:8.2f} "
                f"{r['ratio_head16']:6.2f} {r['weights_bytes_w4a4_head8'] / 1e9:14.2f} {r['ratio_head8']:6.2f} "
                f"{r[grouped]:8.3f} ({grouped.rpartition('group')[2]} columns per scale)"
            )
        if args.out:
            atomic_write_json(args.out, {"sizes": rows, "note": "bytes of the tensors, counted on the meta device"})
        return
    chosen = args.prefill_batches, args.decode_batches, args.breakdown_batches
    _DEADLINE[0] = time.perf_counter() + args.budget_s
    _FILL[0] = args.decode_fill
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        configs, dtype = QUICK, torch.bfloat16 if device.type == "cuda" else torch.float32
        args.seqlen, args.gen, args.prefill_batches, args.decode_batches = 64, 16, [1, 2], [1, 4]
        args.breakdown_batches = (2, 4)
        args.decode_steps, args.warmup_steps, args.reps = min(args.decode_steps, 4), 1, min(args.reps, 2)
    else:
        if device.type != "cuda":
            raise SystemExit("the full benchmark needs a CUDA GPU; use --quick on CPU")
        configs, dtype = {k: CONFIGS[k] for k in (args.models or CONFIGS)}, torch.bfloat16
        args.seqlen, args.gen, args.prefill_batches, args.decode_batches = 2048, 256, [1, 4, 16], [1, 16, 64]
        args.breakdown_batches = (4, 16)
        args.out = args.out or "benchmarks/results/e2e.json"
    args.prefill_batches = args.prefill_batches if chosen[0] is None else chosen[0]
    args.decode_batches = args.decode_batches if chosen[1] is None else chosen[1]
    args.breakdown_batches = args.breakdown_batches if chosen[2] is None else tuple(chosen[2])
    t0 = time.perf_counter()
    records, breakdowns, error = [], {}, None
    for name, cfg in configs.items():
        recs, extra, error = run_model(name, cfg, args, device, dtype)
        records += recs
        breakdowns[name] = extra
        print_table(recs)
        if error:  # the device may be unusable: save what was measured (below), then stop
            print(f"stopped: {error}")
            break
    print_table(records)
    for name, kinds in breakdowns.items():
        for kind, phases in kinds.items():
            for phase, b in (phases or {}).items():
                parts = ", ".join(f"{c} {ms:.1f}" for c, ms in b["ms"].items())
                print(f"breakdown {name} {kind} {phase} (batch {b['batch']}, {b['steps']} step(s)), ms: {parts}")
                counts = ", ".join(f"{c} {n:.1f}" for c, n in b["launches_per_layer_step"].items())
                print(f"  launches per layer and step: {counts}")
                if "host_ms" in b:
                    print(f"  host enqueue {b['host_ms']:.1f} ms of {b['wall_ms']:.1f} ms wall (unprofiled run)")
                for ms, n, key in b.get("top", {}).get("other", [])[:5]:
                    print(f"    other: {ms:8.2f} ms {n:6d}x {key}")
    total = time.perf_counter() - t0
    for t in tuned_decode_configs():
        print(f"decode attention tuned: {t}")
    print(f"total {total:.0f} s on {device_name(device)}; decode times are {args.gen} x the mean timed step")
    if device.type == "cpu":
        print("(CPU: both models run in float32 here; the 'bf16' side is the unquantized model)")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        out = {"device": device_name(device), "seconds": total, "settings": settings, "records": records}
        out["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("FLATQUANT_")}  # the switches set
        out["decode_attention_configs"] = tuned_decode_configs()
        atomic_write_json(args.out, {**out, "breakdown": breakdowns, **({"stopped": error} if error else {})})
        print(f"wrote {args.out}")
    if error:
        raise SystemExit(f"stopped early: {error}")


if __name__ == "__main__":
    main()
