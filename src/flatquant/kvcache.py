"""INT4 KV cache for packed models, usable by transformers' ``generate()``.

Per layer it stores K (after RoPE and P_h) and V (in the P_v space, which v_proj already produces) as packed
4-bit codes with an fp32 scale and zero point per (token, head), KV heads kept grouped (never repeated):

    k_packed, v_packed  uint8 (B, Hkv, S_cap, D // 2)   two codes per byte, low nibble = even channel
    k_scale, k_zero, v_scale, v_zero  fp32 (B, Hkv, S_cap)

preallocated to a capacity that doubles when full. ``update`` quantizes the new tokens straight into the cache
at the append position (``quantize_kv(..., out=)``: one launch each for K and V on CUDA, no copies).
For a prefill (or any step with more than one new token) it returns the whole cache dequantized, on which the
attention function runs SDPA: the same K/V values as the fake-quant evaluation, bit for bit. For a
single-token step it returns the new token only and flags the layer's ``KVQuant`` so that the attention
function reads the 4-bit cache directly with ``decode_attention``.

    cache = Int4KVCache(model)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .arch import BUILTIN_ARCHITECTURES, spec_for
from .kernels.kv_quant import dequantize_kv
from .runtime import KVQuant

__all__ = [
    "GenerationSession",
    "GraphedDecoder",
    "GraphedPrefill",
    "Int4KVCache",
    "Int4KVLayer",
    "cache_kwargs",
    "generate",
]

_NAMES = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero")
_new_storage = torch.empty  # cache storage (the tests swap in an allocator that fills it with garbage)


class Int4KVLayer(CacheLayerMixin):
    """One layer's 4-bit K/V storage (see the module doc for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, kv_quant: KVQuant, min_capacity: int = 256):
        super().__init__()
        self.kv_quant = kv_quant
        self.min_capacity = min_capacity
        self.length = 0
        self.k_packed = self.k_scale = self.k_zero = self.v_packed = self.v_scale = self.v_zero = None
        # static decode (see Int4KVCache.make_static): lengths on the device, appends at device positions
        self.lens: torch.Tensor | None = None
        # set while GraphedPrefill runs: prompts start at position 0 with no padding mask (see packed_attention)
        self.causal_prompt = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self._allocate(b, h, d, self.min_capacity)
        self.is_initialized = True

    def _allocate(self, b: int, h: int, d: int, capacity: int) -> None:
        """Storage for ``capacity`` tokens, the valid ones copied over. Left uninitialised: nothing reads a
        position at or past a sequence's length (decode attention masks them, NaN included; the prefill and
        ``dequantized`` slice to the length), and six fill launches per layer and prefill are saved."""
        width = d // 2 if self.kv_quant.bits == 4 else d
        old = {n: getattr(self, n) for n in _NAMES}
        for n in _NAMES:
            is_code = n.endswith("packed")
            shape = (b, h, capacity, width) if is_code else (b, h, capacity)
            t = _new_storage(shape, dtype=torch.uint8 if is_code else torch.float32, device=self.device)
            if old[n] is not None:
                t[:, :, : self.length] = old[n][:, :, : self.length]
            setattr(self, n, t)

    @property
    def capacity(self) -> int:
        return 0 if self.k_packed is None else self.k_packed.shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new K (B, Hkv, T, D) after RoPE and V; see the module doc for what is returned."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kvq = self.kv_quant
        b, h, t, d = key_states.shape
        if t > 1:  # a decode step's K is transformed by its quantizing launch (P_h fused), a prompt's here
            key_states = kvq.transform_key(key_states)
        elif self.lens is not None:
            return self._static_decode_update(key_states, value_states)
        end = self.length + t
        if end > self.capacity:
            cap = self.capacity
            while cap < end:
                cap *= 2
            self._allocate(b, h, d, cap)
        # quantized straight into the cache at the append position (one launch each for K and V on CUDA)
        out = [getattr(self, n)[:, :, self.length : end] for n in _NAMES]
        fresh = self.length == 0 and t > 1  # a prompt into an empty cache: the new tokens are the whole cache
        if fresh:  # the dequantized values come from the same launches, not from a pass over the cache
            k, v = kvq.quantize_dequantize(key_states, value_states, value_states.dtype, out=out)
        else:
            kvq.quantize(key_states, value_states, out=out, transform_k=t == 1)
        self.length = end
        if self.lens is not None:  # a static cache fed several tokens at once (e.g. a second prompt chunk)
            self.lens.fill_(end)
        if t == 1:
            kvq.pending = ("decode", self, key_states)
            return key_states, value_states
        if not fresh:
            k, v = self.dequantized(value_states.dtype)
        kvq.pending = ("causal-prompt" if fresh and self.causal_prompt else "prefill", self, k)
        return k, v

    def _static_decode_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """One token per sequence written at the device-side positions ``lens`` (B,), which then advance:
        no host value in the step, so it can be captured in a CUDA graph and replayed."""
        if self.length + 1 > self.capacity:
            raise RuntimeError(f"static INT4 cache is full ({self.capacity} tokens); make_static a larger capacity")
        kvq = self.kv_quant
        # written at rows lens[b] of every head of sequence b: one launch for K and V on CUDA (append_kv_at)
        kvq.quantize_at(key_states, value_states, [getattr(self, n) for n in _NAMES], self.lens)
        self.lens += 1
        self.length += 1  # host bookkeeping (a graph replay does not run this line: see GraphedDecoder)
        kvq.pending = ("decode", self, key_states)
        return key_states, value_states

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """(k_packed, k_scale, k_zero, v_packed, v_scale, v_zero), full capacity, for ``decode_attention``."""
        return tuple(getattr(self, n) for n in _NAMES)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the valid positions, (B, Hkv, S, D) in ``dtype``."""
        s, bits = self.length, self.kv_quant.bits
        k = dequantize_kv(self.k_packed[:, :, :s], self.k_scale[:, :, :s], self.k_zero[:, :, :s], bits, dtype)
        v = dequantize_kv(self.v_packed[:, :, :s], self.v_scale[:, :, :s], self.v_zero[:, :, :s], bits, dtype)
        return k, v

    def nbytes(self, used: bool = True) -> int:
        """Bytes of the stored tensors: of the valid positions (``used``) or of the whole allocation."""
        if self.k_packed is None:
            return 0
        total = sum(getattr(self, n).nbytes for n in _NAMES)
        return total * self.length // self.capacity if used else total

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        if self.lens is not None:
            self.lens.zero_()
        self.kv_quant.pending = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove=}")
        self.length = max(0, self.length + tokens_to_remove)
        if self.lens is not None:
            self.lens.fill_(self.length)

    def _map_batch(self, fn) -> None:
        if self.k_packed is not None:
            for n in _NAMES:
                setattr(self, n, fn(getattr(self, n)))
        if self.lens is not None:
            self.lens = fn(self.lens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def offload(self):
        raise NotImplementedError("Int4KVCache does not support offloading")

    prefetch = offload


class Int4KVCache(Cache):
    """INT4 KV cache for a model returned by :func:`flatquant.load_packed`; pass as ``past_key_values``."""

    def __init__(self, model: nn.Module, min_capacity: int = 256):
        kvqs = []
        for i, layer in enumerate(model.get_submodule(spec_for(model).layers)):
            kvq = getattr(layer.get_submodule(spec_for(model).attn), "kv_quant", None)
            if not isinstance(kvq, KVQuant):
                raise ValueError(f"layer {i} has no KVQuant: Int4KVCache needs a model from flatquant.load_packed")
            kvqs.append(kvq)
        if min_capacity < 1:
            raise ValueError(f"min_capacity={min_capacity} must be >= 1")
        super().__init__(layers=[Int4KVLayer(kvq, min_capacity) for kvq in kvqs])
        self.windows = _sliding_windows(model.config, len(kvqs))

    def _check_window(self, capacity: int) -> None:
        """Static decoding attends over every cached token: refuse a capacity past a layer's sliding window."""
        windows = [w for w in self.windows if w is not None]
        if windows and capacity > min(windows):
            raise ValueError(
                f"a static INT4 cache of capacity={capacity} tokens exceeds the model's sliding window "
                f"({min(windows)} tokens), which static decoding (GraphedDecoder, GenerationSession, generate) "
                "does not apply: use a capacity / max_length of at most the window, or model.generate with a "
                "dynamic Int4KVCache"
            )

    def nbytes(self, used: bool = True) -> int:
        """Bytes held by all layers (see :meth:`Int4KVLayer.nbytes`)."""
        return sum(layer.nbytes(used) for layer in self.layers)

    def allocate_static(self, batch: int, capacity: int, kv_heads: int, device: torch.device | str) -> None:
        """Empty static storage for ``batch`` sequences of up to ``capacity`` tokens (length 0, device-side
        lengths 0), before any forward: what a captured prefill writes into (:class:`GraphedPrefill`)."""
        if batch < 1 or capacity < 1:
            raise ValueError(f"batch={batch} and capacity={capacity} must be >= 1")
        self._check_window(capacity)
        for layer in self.layers:
            layer.device, layer.length = torch.device(device), 0
            for n in _NAMES:  # no old tokens to copy
                setattr(layer, n, None)
            layer._allocate(batch, kv_heads, layer.kv_quant.head_dim, capacity)
            layer.is_initialized = True
            layer.lens = torch.zeros((batch,), dtype=torch.int32, device=layer.device)

    def make_static(self, capacity: int) -> None:
        """Decode from now on at device-side positions, in buffers of exactly ``capacity`` tokens (reallocated
        now if they differ).

        Call it after the prefill (which sets the batch size): single-token steps then run no host-dependent
        operation, so :class:`GraphedDecoder` can capture one step in a CUDA graph and replay it. Steps of
        more than one token still take the regular path."""
        self._check_window(capacity)
        for layer in self.layers:
            if not layer.is_initialized:
                raise RuntimeError("make_static needs the cache filled by a prefill first")
            if capacity < layer.length:
                raise ValueError(f"capacity={capacity} is below the {layer.length} tokens already cached")
            if capacity != layer.capacity:  # exactly the asked size: memory known up front
                b, h, _, w = layer.k_packed.shape
                d = 2 * w if layer.kv_quant.bits == 4 else w
                layer._allocate(b, h, d, capacity)
            b = layer.k_packed.shape[0]
            layer.lens = torch.full((b,), layer.length, dtype=torch.int32, device=layer.k_packed.device)


def _sliding_windows(config, n_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from the config as transformers reads it: Qwen2 /
    Qwen3 name the sliding layers in ``layer_types``; Mistral's ``sliding_window`` applies to every layer."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return [None] * n_layers
    types = getattr(config, "layer_types", None)
    if types is None or getattr(config, "model_type", None) == "mistral":  # Mistral windows every layer
        return [window] * n_layers
    return [window if t == "sliding_attention" else None for t in types]


def cache_kwargs(model: nn.Module, cache: Cache) -> dict:
    """``{name: cache}`` for ``model.generate``/``forward``: transformers renamed ``past_key_values`` to ``cache``."""
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: cache}


def _capture(forward, doing: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
    """(graph, output) of ``forward`` captured in a CUDA graph (its host side runs, its kernels do not), or None
    with a warning when something in it cannot be captured; the caller then goes on ``doing`` eagerly."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = forward()
    except RuntimeError as e:
        warnings.warn(f"CUDA graph capture failed, {doing} eagerly: {str(e).splitlines()[0]}", stacklevel=3)
        torch.cuda.synchronize()
        return None
    return graph, out


class GraphedDecoder:
    """Single-token decode steps of a packed model, replayed from a CUDA graph after two eager steps.

    Eager decode of a 4-bit model is bound by the host: every step launches a few hundred small kernels from
    Python. A graph replays the whole step at once. The cache must be static (device-side lengths, fixed
    buffers: :meth:`Int4KVCache.make_static` after the prefill)::

        cache = fq.Int4KVCache(model)
        logits = model(prompt, **cache_kwargs(model, cache)).logits[:, -1]  # prefill, eager
        cache.make_static(prompt.shape[1] + max_new_tokens)
        dec = GraphedDecoder(model, cache)
        for _ in range(max_new_tokens):
            logits = dec.step(logits.argmax(-1, keepdim=True))  # greedy: (B, 1) tokens in, (B, vocab) out

    step(ids) takes the (B, 1) next tokens and returns the (B, vocab) logits of the step; positions come from
    the cache's device-side lengths. The returned tensor is overwritten by the next replay (clone to keep it).
    use_graph: default on CUDA; off (or on the CPU) every step runs eagerly through the same static path.
    """

    def __init__(self, model: nn.Module, cache: Int4KVCache, use_graph: bool | None = None, warmup_steps: int = 2):
        self.model, self.cache = model, cache
        lens = cache.layers[0].lens
        if lens is None:
            raise RuntimeError(
                "GraphedDecoder needs a static cache: call cache.make_static(capacity) after the prefill"
            )
        self.use_graph = lens.is_cuda if use_graph is None else use_graph
        if self.use_graph and not lens.is_cuda:
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        bits = sorted({layer.kv_quant.bits for layer in cache.layers} - {4})
        if self.use_graph and bits:  # only the 4-bit decode kernel reads the device-side lengths
            warnings.warn(f"a {bits[0]}-bit KV cache decodes eagerly (CUDA graphs need the 4-bit cache)", stacklevel=2)
            self.use_graph = False
        self.ids = torch.zeros((lens.shape[0], 1), dtype=torch.long, device=lens.device)
        self.pos = torch.zeros_like(self.ids)
        self.warmup_steps, self.steps = warmup_steps, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        self.pos.copy_(self.cache.layers[0].lens.view(-1, 1))  # position of the new token = tokens cached
        kw = cache_kwargs(self.model, self.cache)
        return self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, **kw).logits[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape != self.ids.shape:
            raise ValueError(f"ids must be {tuple(self.ids.shape)} (one token per sequence), got {tuple(ids.shape)}")
        self.ids.copy_(ids)
        self.steps += 1
        if not self.use_graph or self.steps <= self.warmup_steps:  # eager (compiles, autotuning happen here)
            return self._forward()
        layers = self.cache.layers
        if self.graph is None:
            lengths = [layer.length for layer in layers]
            try:
                captured = _capture(self._forward, "decoding")
            finally:  # the capture ran the host side of the step without executing it
                for layer, n in zip(layers, lengths, strict=True):
                    layer.length = n
            if captured is None:  # something in the step cannot be captured: keep decoding, eagerly
                self.use_graph = False
                return self._forward()
            self.graph, self.out = captured
        self.graph.replay()
        for layer in layers:
            layer.length += 1
        return self.out


# model types whose attention masks are causal, or causal within a sliding window (GraphedPrefill may then let
# SDPA do the causal masking itself)
CAUSAL_MODEL_TYPES = BUILTIN_ARCHITECTURES


class GraphedPrefill:
    """Prompts of a packed model prefilled by replaying a CUDA graph, one per (batch, padded length).

    Eager prefill at small batch is bound by the host: a 2048-token prompt on a 7B model needs about 40 ms of
    kernels but 90 ms to launch them from Python. A graph replays the whole forward. Prompts (one length L per
    call) are padded at the end to the smallest bucket >= L; causal attention keeps the padding out of the real
    tokens' outputs, the cache keeps the first L positions and the logits of position L - 1 are returned. The
    cache is static with ``capacity`` tokens, ready for :class:`GraphedDecoder`::

        cache = fq.Int4KVCache(model)
        prefill = GraphedPrefill(model, cache, capacity=prompt_len + max_new_tokens)
        logits = prefill(prompt)  # (B, vocab), last prompt token
        dec = GraphedDecoder(model, cache)

    buckets: padded lengths (default: powers of two from 64 to ``capacity``, and ``capacity``). A graph holds
    the activations of its bucket; each bucket's first call runs eagerly (compilation, autotuning), the second
    captures. use_graph: default on CUDA; off (or on the CPU) every call runs eagerly through the same padded
    path. The returned tensor is overwritten by the next replay (clone to keep it).
    """

    def __init__(
        self,
        model: nn.Module,
        cache: Int4KVCache,
        capacity: int,
        buckets: tuple[int, ...] | None = None,
        use_graph: bool | None = None,
        pad_token_id: int = 0,
    ):
        self.model, self.cache, self.capacity, self.pad = model, cache, capacity, pad_token_id
        if buckets is None:
            buckets = tuple(b for b in (2**i for i in range(6, 40)) if b < capacity) + (capacity,)
        if not buckets or any(b < 1 or b > capacity for b in buckets):
            raise ValueError(f"buckets={buckets} must be lengths in [1, capacity={capacity}]")
        self.buckets = tuple(sorted(set(buckets)))
        self.device = next(model.parameters()).device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        if self.use_graph and any(layer.kv_quant.bits != 4 for layer in cache.layers):
            warnings.warn(
                "a KV cache of other than 4 bits prefills eagerly (graphs need the 4-bit cache)", stacklevel=2
            )
            self.use_graph = False
        self.kv_heads = model.config.num_key_value_heads
        self._static: dict[tuple[int, int], dict] = {}  # (batch, bucket) -> buffers, calls, graph, out

    def bucket(self, length: int) -> int:
        """The padded length of an ``length``-token prompt."""
        if length < 1:
            raise ValueError(f"a prompt needs at least one token, got {length}")
        for b in self.buckets:
            if b >= length:
                return b
        raise ValueError(f"a {length}-token prompt exceeds the largest bucket ({self.buckets[-1]}) / capacity")

    def _forward(self, st: dict) -> torch.Tensor:
        # no padding mask: attention may use SDPA's own causal masking (for the model types whose masks are known
        # to be causal, with sliding windows checked per layer in packed_attention)
        causal = getattr(self.model.config, "model_type", None) in CAUSAL_MODEL_TYPES
        try:
            for layer in self.cache.layers:
                layer.length = 0  # host bookkeeping: every replay writes positions 0 .. bucket - 1 afresh
                layer.causal_prompt = causal
                if st["ids"].shape[1] == 1 and layer.lens is not None:
                    layer.lens.zero_()  # a one-token prompt is written at the device-side lengths (decode path)
            kw = cache_kwargs(self.model, self.cache)
            out = self.model(
                input_ids=st["ids"], position_ids=st["pos"], logits_to_keep=st["last"], use_cache=True, **kw
            )
        finally:
            for layer in self.cache.layers:
                layer.causal_prompt = False
        return out.logits[:, 0]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> the (B, vocab) logits of token L - 1; the cache then holds the L tokens (static)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, length), got shape {tuple(ids.shape)}")
        b, length = ids.shape
        padded = self.bucket(length)
        layer0 = self.cache.layers[0]
        if layer0.lens is None or layer0.capacity != self.capacity or layer0.k_packed.shape[0] != b:
            self.cache.allocate_static(b, self.capacity, self.kv_heads, self.device)
            self._static = {key: st for key, st in self._static.items() if key[0] == b}  # graphs of old buffers
            for st in self._static.values():
                st["graph"] = None
        st = self._static.get((b, padded))
        if st is None:
            st = dict(calls=0, graph=None, out=None)
            st["ids"] = torch.full((b, padded), self.pad, dtype=torch.long, device=self.device)
            st["pos"] = torch.arange(padded, device=self.device).unsqueeze(0)
            st["last"] = torch.zeros((1,), dtype=torch.long, device=self.device)
            self._static[(b, padded)] = st
        st["ids"][:, :length].copy_(ids)
        st["ids"][:, length:] = self.pad
        st["last"].fill_(length - 1)
        st["calls"] += 1
        if not self.use_graph or st["calls"] == 1:
            out = self._forward(st)
        else:
            if st["graph"] is None:
                captured = _capture(lambda: self._forward(st), "prefilling")
                if captured is None:  # something in the forward cannot be captured: prefill eagerly
                    self.use_graph = False
                    return self._finish(self._forward(st), length)
                st["graph"], st["out"] = captured
            st["graph"].replay()
            out = st["out"]
        return self._finish(out, length)

    def _finish(self, out: torch.Tensor, length: int) -> torch.Tensor:
        for layer in self.cache.layers:  # keep the real tokens: the padded positions are never read
            layer.length = length
            layer.lens.fill_(length)
        return out


class GenerationSession:
    """Repeated generation with one packed model, each batch size's graphs made once.

    Per batch size: a static INT4 cache of ``max_length`` tokens, a :class:`GraphedPrefill` (prompts padded to
    ``buckets``, one graph per bucket) and a :class:`GraphedDecoder`; every call reuses them, so after the first
    calls of a (batch, bucket) a request is one prefill replay plus one decode replay per token, with no capture
    and no kernel launches from Python. ::

        session = fq.GenerationSession(model, max_length=4096)
        for prompt in requests:  # (B, T) token ids of one length each
            ids = session.generate(prompt, max_new_tokens=128)

    ``generate`` takes the arguments of :func:`generate`. buckets: padded prompt lengths (default powers of two
    up to ``max_length``; ``(T,)`` pads nothing); use_graph: default on CUDA.
    """

    def __init__(
        self,
        model: nn.Module,
        max_length: int,
        buckets: tuple[int, ...] | None = None,
        use_graph: bool | None = None,
    ):
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (a prompt token and a new one)")
        self.model, self.max_length, self.buckets, self.use_graph = model, max_length, buckets, use_graph
        self._prefills: dict[int, GraphedPrefill] = {}  # per batch size, each with its own static cache
        self._decoders: dict[int, GraphedDecoder] = {}  # per batch size, made after its first prefill

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | tuple[int, ...] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, T) prompt ids -> (B, T + new) ids; as :func:`generate`."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, length >= 1), got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.shape[1] + max_new_tokens - 1 > self.max_length:
            raise ValueError(
                f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new ones need a cache of "
                f"{input_ids.shape[1] + max_new_tokens - 1} tokens; this session holds max_length={self.max_length}"
            )
        if do_sample and (
            temperature <= 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1)
        ):
            raise ValueError(
                f"sampling needs temperature > 0, top_k >= 1 or None and 0 < top_p <= 1 or None, got {temperature=}, "
                f"{top_k=}, {top_p=}"
            )
        eos = None
        if eos_token_id is not None:  # one id or several (e.g. Llama 3's end-of-text and end-of-turn)
            ids_ = torch.as_tensor(eos_token_id)  # an int, a list / tuple, numpy ints or a tensor
            if ids_.numel() == 0 or ids_.dtype == torch.bool or ids_.is_floating_point() or ids_.is_complex():
                raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
            eos = [int(e) for e in ids_.flatten().tolist()]

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, 1)
            if not do_sample:
                return logits.argmax(-1, keepdim=True)
            logits = logits.float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            if top_p is not None:
                logits = top_p_filter(logits, top_p)
            return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)

        b = input_ids.shape[0]
        if b not in self._prefills:
            self._prefills[b] = GraphedPrefill(
                self.model, Int4KVCache(self.model), self.max_length, buckets=self.buckets, use_graph=self.use_graph
            )
        prefill = self._prefills[b]
        nxt = pick(prefill(input_ids.to(prefill.device)))
        out = [input_ids.to(nxt.device)]
        finished = None if eos is None else torch.zeros_like(nxt, dtype=torch.bool)
        eos_ids = None if eos is None else torch.tensor(eos, device=nxt.device, dtype=nxt.dtype)
        for step in range(max_new_tokens):
            if finished is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos[0]), nxt)  # finished: the first eos id
                finished |= torch.isin(nxt, eos_ids)
            out.append(nxt)
            if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                break
            if b not in self._decoders:  # after the first prefill: the cache is static
                self._decoders[b] = GraphedDecoder(self.model, prefill.cache, use_graph=self.use_graph)
            nxt = pick(self._decoders[b].step(nxt))
        return torch.cat(out, dim=1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits (B, V) with -inf outside each row's nucleus: the smallest set of most likely tokens whose
    probability reaches ``top_p`` (the most likely token always stays)."""
    if top_p >= 1:  # everything stays (a float32 cumulative sum can reach 1 before the tail)
        return logits
    logits = logits.float()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))


@torch.no_grad()
def generate(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, use_graph: bool | None = None, **sampling
) -> torch.Tensor:
    """Greedy or sampled generation with the INT4 cache, decode steps replayed from a CUDA graph.

    input_ids: (B, T) prompts of one length (no padding). Returns (B, T + new) token ids. ``sampling``:
    ``do_sample`` (default False: greedy), ``temperature`` (1.0), ``top_k`` (None), ``top_p`` (None),
    ``eos_token_id`` (None, an id or a list of ids: with it a finished sequence continues with the first of them
    and generation stops when all have finished, one host sync per step) and ``generator``; sampling draws from
    softmax(logits / temperature), optionally over the ``top_k`` most likely tokens and then the smallest set of
    most likely tokens whose probability reaches ``top_p`` (nucleus sampling). For padding, beam search or
    other strategies use ``model.generate`` with an :class:`Int4KVCache` (eager decode). This is a one-call
    :class:`GenerationSession` (whose only prompt bucket is the prompt's length); a session kept across calls
    reuses its cache and graphs.
    """
    length = max(input_ids.shape[-1], 1) if input_ids.dim() == 2 else 1
    # the last new token is never fed back: prompt + new - 1 cache positions
    capacity = length + max(max_new_tokens, 1) - 1
    session = GenerationSession(model, capacity, buckets=(length,), use_graph=use_graph)
    return session.generate(input_ids, max_new_tokens, **sampling)
