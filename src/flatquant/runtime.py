"""Real-quant modules of a packed model: 4-bit linears with online transforms, and the KV quantizer.

A packed decoder block keeps Hugging Face's own modules and forward; only these pieces are swapped in:

* ``SharedInputQuant`` (``self_attn.qkv_quant``, ``mlp.gate_up_quant``): the online transform P_a (P_ug) and the
  4-bit activation quantizer of an input read by several linears. It runs once per forward; q/k/v (gate/up)
  consume the same operand.
* ``SharedInputLinear`` (q/k/v, gate/up): a :class:`W4A4Linear` fed by a ``SharedInputQuant``. After
  :meth:`SharedInputQuant.fuse` (``load_packed`` does it) the consumers of one input run as one GEMM over their
  concatenated weights (q/k/v: one launch instead of three; gate/up: one instead of two); each consumer's
  output is its column slice of the result, a view.
* :class:`W4A4Linear` with its own transform (o_proj: P_o ⊗ I; down_proj: P_d).
* ``KVQuant`` (``self_attn.kv_quant``): P_h on Q and K after RoPE and the per-(token, head) 4-bit K/V quantizer,
  used by the registered attention function ``packed_attention`` and by :class:`flatquant.kvcache.Int4KVCache`.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels.gemm_w4a4 import tensor_version
from .kernels.int8_linear import int8_linear
from .kernels.kron_quantize import fuses_norm
from .kernels.kv_quant import (
    append_kv_at,
    decode_attention,
    dequantize_kv,
    quantize_dequantize_kv,
    quantize_kv,
)
from .kernels.rmsnorm import FusedRMSNorm
from .kernels.w4a4_linear import W4A4Linear, operand_gemm, quantize_operand

ATTN_IMPLEMENTATION = "flatquant_packed"


def head_rows_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` for x (B, H, T, D). The attention forward's q and k are head-transposed views of (B, T, H, D)
    memory, which ``matmul`` copies to flatten; multiplied in memory order and transposed back, the same rows
    meet the same (B*T*H, D) x (D, D) product with no copy (the result is such a view too)."""
    if x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        return (x.transpose(1, 2) @ m).transpose(1, 2)
    return x @ m


class SharedInputQuant(nn.Module):
    """Online Kronecker transform + per-token 4-bit quantization of an input shared by ``consumers`` linears.

    Buffers ``p1`` (n1, n1), ``p2`` (n2, n2) in the model dtype, or None (no transform). The operand is computed
    for the first consumer and handed to the others (matched by tensor identity), then released.
    """

    def __init__(
        self,
        n: int,
        transform_sizes: tuple[int, int] | None,
        consumers: int,
        act_symmetric: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if transform_sizes is not None and transform_sizes[0] * transform_sizes[1] != n:
            raise ValueError(f"{transform_sizes=} must multiply to {n=}")
        self.n, self.consumers, self.act_symmetric = n, consumers, act_symmetric
        self.act_clip_max, self.act_clip_min = 1.0, 1.0
        self.act_impl = "auto"
        if transform_sizes is None:
            self.p1 = self.p2 = None
        else:
            self.register_buffer("p1", torch.eye(transform_sizes[0], dtype=dtype, device=device))
            self.register_buffer("p2", torch.eye(transform_sizes[1], dtype=dtype, device=device))
        self.norm: list[DeferredRMSNorm] = []  # the layer's norm feeding this input, when folded in here
        self._last: tuple[torch.Tensor, tuple, int] | None = None  # (input, operand, uses left)
        self._fused: list[tuple[SharedInputLinear, int, int]] | None = None  # (consumer, first, last column)
        self._last_out: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (input, fused output, uses left)

    def fuse(self, linears: list[SharedInputLinear]) -> None:
        """Run the consumers as one GEMM: concatenate their packed weights, scales and biases along N (held here
        as non-persistent buffers; the consumers' own buffers become views of them, so no memory is added)."""
        if len(linears) != self.consumers or any(lin._source[0] is not self for lin in linears):
            raise ValueError(f"fuse needs the {self.consumers} consumers of this input, got {len(linears)} linears")
        ref = linears[0]
        if any(lin.gemm_impl != ref.gemm_impl or lin.prefill_fp8 != ref.prefill_fp8 for lin in linears):
            raise ValueError("fused consumers must share gemm_impl and prefill_fp8")
        self.register_buffer("w_packed", torch.cat([lin.w_packed for lin in linears]), persistent=False)
        self.register_buffer("w_scale", torch.cat([lin.w_scale for lin in linears]), persistent=False)
        if all(lin.bias is None for lin in linears):
            self.register_buffer("bias", None, persistent=False)
        else:
            parts = [
                lin.bias if lin.bias is not None else lin.w_scale.new_zeros(lin.out_features).to(ref.out_dtype)
                for lin in linears
            ]
            self.register_buffer("bias", torch.cat(parts), persistent=False)
        self._fused, first = [], 0
        for lin in linears:
            last = first + lin.out_features
            self._fused.append((lin, first, last))
            first = last
        self._repoint()

    def _repoint(self) -> None:
        """Make the fused consumers' weight buffers views of the concatenated ones again."""
        for lin, first, last in self._fused or ():
            lin._buffers["w_packed"] = self.w_packed[first:last]
            lin._buffers["w_scale"] = self.w_scale[first:last]
            if lin._buffers.get("bias") is not None:
                lin._buffers["bias"] = self.bias[first:last]

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() convert the concatenated buffers here; the consumers skip theirs (views of
        # these) and are pointed at the converted ones, so a move does not turn the views into copies
        super()._apply(fn, recurse)
        self._repoint()
        return self

    def fused_output(self, x: torch.Tensor, lin: SharedInputLinear) -> torch.Tensor:
        """``lin``'s output for input x: its columns of the one GEMM of all consumers (computed once per x)."""
        if self._last_out is not None and self._last_out[0] is x:
            _, out, left = self._last_out
        else:
            ref = self._fused[0][0]
            op = self._operand(x)
            out = operand_gemm(
                op, self.w_packed, self.w_scale, self.bias, ref.out_dtype, ref.gemm_impl, ref.prefill_fp8
            )
            left = self.consumers
        self._last_out = (x, out, left - 1) if left > 1 else None
        first, last = next((a, b) for m, a, b in self._fused if m is lin)
        return out[..., first:last]

    def takes_norm(self, weight: torch.Tensor) -> bool:
        """Whether an RMSNorm with this weight can run inside this input's transform + quantize launch."""
        n1 = self.p1.shape[0] if self.p1 is not None else 1
        return weight.shape == (self.n,) and fuses_norm(n1, self.n // n1)

    def _operand(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        norm = (self.norm[0].weight, self.norm[0].variance_epsilon) if self.norm else None
        return quantize_operand(
            x, self.p1, self.p2, self.act_clip_max, self.act_clip_min, self.act_symmetric, norm=norm
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., n) float -> (codes int8 (..., n), scale fp32 (...,)[, zero fp32 (...,)])."""
        if self._last is not None and self._last[0] is x:
            _, op, left = self._last
        else:
            op = self._operand(x)
            left = self.consumers
        self._last = (x, op, left - 1) if left > 1 else None
        return op


class DeferredRMSNorm(FusedRMSNorm):
    """A decoder layer's RMSNorm whose only readers are the linears of one :class:`SharedInputQuant`: it
    passes its input through, and that module applies the norm inside its transform + quantize launch (one
    launch and one pass over the activations fewer). Keeps ``weight`` under the norm's name (same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + ", applied by the next quantizer"


class ResidualFusedLayer:
    """Mixed into a decoder layer's own class by :func:`~flatquant.packed.fuse_residuals`: the same computation
    (pre-norm attention, then pre-norm MLP, each added to the residual stream) with both residual additions done
    by the W4A4 GEMMs of o_proj and down_proj in their epilogues, bit for bit what the separate additions give.
    ``_fq_spec`` (an :class:`~flatquant.arch.ArchSpec`) names the submodules. The layer's keyword arguments go
    to the attention module unchanged, as transformers' own layers pass them."""

    _fq_spec = None

    def __reduce_ex__(self, protocol):
        # the class is made at run time (residual_fused_class): pickle rebuilds it from the layer's own class
        return _new_fused_layer, (type(self).__bases__[1],), self.__getstate__()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:  # positional arguments after hidden_states, named as the layer's own forward names them
            names = [p for p in inspect.signature(super().forward).parameters if p not in ("self", "hidden_states")]
            kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        spec = self._fq_spec
        attn = self.get_submodule(spec.attn)
        o_proj = attn.get_submodule(spec.o)
        o_proj.next_residual = hidden_states  # o_proj's next call adds it: residual + attention output
        try:
            h = attn(hidden_states=self.get_submodule(spec.input_norm)(hidden_states), **kwargs)[0]
        finally:
            o_proj.next_residual = None
        return self.get_submodule(spec.mlp)(self.get_submodule(spec.post_norm)(h), residual=h)


_RESIDUAL_CLASSES: dict[type, type] = {}


def _new_fused_layer(base: type) -> nn.Module:
    """An empty instance of ``base``'s residual-fused class, for unpickling (its state is set afterwards)."""
    return nn.Module.__new__(residual_fused_class(base))


def residual_fused_class(cls: type) -> type:
    """``cls`` with :class:`ResidualFusedLayer`'s forward (one subclass per decoder-layer class)."""
    if cls not in _RESIDUAL_CLASSES:
        _RESIDUAL_CLASSES[cls] = type(f"ResidualFused{cls.__name__}", (ResidualFusedLayer, cls), {})
    return _RESIDUAL_CLASSES[cls]


def _check_group(group: int | None, cols: int) -> None:
    if group is not None and (group < 1 or cols % group):
        raise ValueError(f"group={group!r} must be a positive divisor of the {cols} columns")


def quantize_rows_int8(weight: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes of a (N, K) matrix with one scale per row (``group`` None) or per ``group``
    consecutive columns of a row: (codes int8 (N, K) in [-127, 127], scale fp32 (N,) or (N, K // group)),
    scale = absmax / 127, round half to even; float64 math against the stored fp32 scale."""
    w = weight.detach().double()
    n, k = w.shape
    _check_group(group, k)
    g = group or k
    wg = w.view(n, k // g, g)
    scale = (wg.abs().amax(dim=2) / 127).clamp_min(torch.finfo(torch.float32).tiny).float()
    codes = torch.round(wg / scale.double()[:, :, None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return codes, (scale[:, 0].contiguous() if group is None else scale)


class _Int8Rows(nn.Module):
    """A (rows, cols) matrix as int8 codes (``weight_q``) and fp32 scales (``weight_scale``): (rows,) for one
    per row, (rows, cols // group) for one per ``group`` columns; ``weight`` is the codes (for code that asks a
    module for its weight's device)."""

    def __init__(self, rows: int, cols: int, device: torch.device | str | None = None, group: int | None = None):
        super().__init__()
        _check_group(group, cols)
        shape = (rows,) if group is None else (rows, cols // group)
        self.register_buffer("weight_q", torch.empty(rows, cols, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(shape, dtype=torch.float32, device=device))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q


class Int8Embedding(_Int8Rows):
    """An input embedding stored as int8 codes with per-row or per-group fp32 scales (``head_bits=8``
    checkpoints): each looked-up row is ``codes * scale`` in fp32, rounded once to the model dtype."""

    def __init__(
        self, num: int, dim: int, dtype: torch.dtype, device: torch.device | str | None = None, group: int | None = None
    ):
        super().__init__(num, dim, device, group)
        self.num_embeddings, self.embedding_dim, self.out_dtype = num, dim, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes, scale = self.weight_q[ids].float(), self.weight_scale[ids]
        if scale.dim() == ids.dim():  # per row
            return (codes * scale.unsqueeze(-1)).to(self.out_dtype)
        groups = scale.shape[-1]
        rows = codes.view(*ids.shape, groups, self.embedding_dim // groups) * scale.unsqueeze(-1)
        return rows.view(*ids.shape, self.embedding_dim).to(self.out_dtype)


class Int8Linear(_Int8Rows):
    """An output projection (lm_head) stored as int8 codes with per-row or per-group fp32 scales:
    :func:`~flatquant.kernels.int8_linear.int8_linear` (one Triton launch on CUDA that reads the codes once,
    fp32 arithmetic elsewhere, output in x's dtype)."""

    def __init__(
        self, in_features: int, out_features: int, device: torch.device | str | None = None, group: int | None = None
    ):
        super().__init__(out_features, in_features, device, group)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_q, self.weight_scale)


class SharedInputLinear(W4A4Linear):
    """A W4A4 linear whose input is quantized (and transformed) by a shared :class:`SharedInputQuant`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, source: SharedInputQuant, **kwargs):
        kwargs.setdefault("act_symmetric", source.act_symmetric)  # the source quantizes; the flag says how
        super().__init__(in_features, out_features, bias, transform_sizes=None, **kwargs)
        self._source = [source]  # a reference, not a submodule: the owner saves it once

    def _apply(self, fn, recurse=True):
        source = self._source[0]
        if source._fused is None:
            return super()._apply(fn, recurse)
        hidden = {n: self._buffers[n] for n in ("w_packed", "w_scale", "bias") if self._buffers.get(n) is not None}
        for n in hidden:  # views of the source's buffers: converted there (see SharedInputQuant._apply)
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(hidden)
        source._repoint()
        return self

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        source = self._source[0]
        if isinstance(x, torch.Tensor) and source._fused is not None:
            return source.fused_output(x, self)
        return super().forward(source(x) if isinstance(x, torch.Tensor) else x)


class KVQuant(nn.Module):
    """P_h on Q/K after RoPE and the asymmetric per-(token, head) K/V quantizers of one attention block.

    Buffers ``p_h``, ``p_h_inv`` (D, D) fp32, or None when the model has no P_h. ``pending`` is set by the
    INT4 cache's ``update`` for the attention call that follows it (see :func:`packed_attention`).
    """

    def __init__(self, head_dim: int, has_p_h: bool, bits: int = 4, device: torch.device | str | None = None):
        super().__init__()
        self.head_dim, self.bits = head_dim, bits
        self.k_clip, self.v_clip = (1.0, 1.0), (1.0, 1.0)
        if has_p_h:
            self.register_buffer("p_h", torch.eye(head_dim, device=device))
            self.register_buffer("p_h_inv", torch.eye(head_dim, device=device))
        else:
            self.p_h = self.p_h_inv = None
        # (mode: "prefill", "causal-prompt" or "decode"; cache layer; the key it returned)
        self.pending: tuple[str, object, torch.Tensor] | None = None
        self._casts: dict[tuple[str, torch.dtype, bool], tuple[weakref.ref, int, torch.Tensor]] = {}

    def _in_dtype(self, name: str, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
        """Buffer ``name`` (fp32) in ``dtype`` (``transposed``: its transpose, contiguous), made once and reused
        while the buffer is unchanged: a decode step then launches no cast kernels. A moved or rewritten buffer
        is made again."""
        t = getattr(self, name)
        if t.dtype == dtype and not transposed:
            return t
        hit = self._casts.get((name, dtype, transposed))
        version = tensor_version(t)
        if hit is None or hit[0]() is not t or hit[1] != version:  # weak: a replaced buffer is freed
            made = (t.transpose(0, 1).contiguous() if transposed else t).to(dtype)
            hit = (weakref.ref(t), version, made)
            self._casts[(name, dtype, transposed)] = hit
        return hit[2]

    def key_transform(self, dtype: torch.dtype) -> torch.Tensor | None:
        """P_h in ``dtype`` for the K append kernel (None without P_h)."""
        return None if self.p_h is None else self._in_dtype("p_h", dtype)

    def query_transform(self, dtype: torch.dtype) -> torch.Tensor | None:
        """P_h^-T in ``dtype``, contiguous, for the decode attention kernel (None without P_h)."""
        return None if self.p_h is None else self._in_dtype("p_h_inv", dtype, transposed=True)

    def transform_query(self, q: torch.Tensor) -> torch.Tensor:
        """q P_h^-T in q's dtype (B, H, T, D)."""
        return q if self.p_h is None else head_rows_matmul(q, self.query_transform(q.dtype))

    def transform_key(self, k: torch.Tensor) -> torch.Tensor:
        """k P_h in k's dtype (B, KVH, T, D)."""
        return k if self.p_h is None else head_rows_matmul(k, self.key_transform(k.dtype))

    def quantize(
        self, k: torch.Tensor, v: torch.Tensor, out: tuple | None = None, transform_k: bool = False
    ) -> tuple[tuple, tuple]:
        """((codes, scale, zero) of K, same of V). K already transformed, or ``transform_k``: P_h is applied by
        the quantizing launch. out: six tensors (K's codes, scale, zero, then V's) to write into, e.g. the
        cache slice at the append position."""
        ko, vo = (None, None) if out is None else (tuple(out[:3]), tuple(out[3:]))
        kt = self.key_transform(k.dtype) if transform_k else None
        qk = quantize_kv(k, self.bits, *self.k_clip, out=ko, transform=kt)
        return qk, quantize_kv(v, self.bits, *self.v_clip, out=vo)

    def quantize_at(self, k: torch.Tensor, v: torch.Tensor, cache: list, positions: torch.Tensor) -> None:
        """Quantize K (untransformed: P_h is applied by the launch) and V into the whole cache (K's codes, scale,
        zero, then V's) at the device-side positions (B,): one launch for both on CUDA (:func:`append_kv_at`)."""
        kt = self.key_transform(k.dtype)
        args = (tuple(cache[:3]), tuple(cache[3:]), positions)
        append_kv_at(k, v, self.bits, self.k_clip, self.v_clip, *args, transform=kt)

    def quantize_dequantize(
        self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, out: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize K (already transformed) and V, writing the codes to ``out`` if given (as :meth:`quantize`),
        and return their dequantized values in ``dtype``: what the fake-quant evaluation attends over. On
        CUDA one launch each for K and V (x read once), equal bit for bit to dequantizing the codes."""
        ko, vo = (None, None) if out is None else (tuple(out[:3]), tuple(out[3:]))
        _, k_deq = quantize_dequantize_kv(k, self.bits, *self.k_clip, dtype, out=ko)
        _, v_deq = quantize_dequantize_kv(v, self.bits, *self.v_clip, dtype, out=vo)
        return k_deq, v_deq

    def fake_quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize-dequantize K and V in their dtype: the fake-quant evaluation's KV cache."""
        if k.dtype == v.dtype:
            return self.quantize_dequantize(k, v, k.dtype)
        qk, qv = self.quantize(k, v)
        return dequantize_kv(*qk, self.bits, k.dtype), dequantize_kv(*qv, self.bits, v.dtype)


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of a packed block.

    Without an :class:`~flatquant.kvcache.Int4KVCache` (plain forward, or another cache): K P_h and K/V are
    quantized and dequantized here, then SDPA. After the INT4 cache's ``update``: a prefill gets the dequantized
    cache from it (same numbers), a single-token decode step reads the 4-bit cache through ``decode_attention``.
    """
    kvq: KVQuant = module.kv_quant
    pending, kvq.pending = kvq.pending, None
    if pending is not None and pending[2] is not key:  # left over from a call that did not reach attention
        pending = None
    if pending is None:
        key, value = kvq.fake_quantize(kvq.transform_key(key), value)
    elif pending[0] == "decode":
        layer = pending[1]
        # A static cache decodes from its device-side lengths only (no host value in the step): transformers
        # materialises the causal mask while a CUDA graph is being captured (it cannot skip it then), from the
        # host length of that moment, which replays would keep; one query token sees every cached one anyway
        # (static decode takes no padding), so that mask is not used.
        static = layer.lens is not None
        if (attention_mask is None or static) and kvq.bits == 4:
            b, h, _, d = query.shape
            scale = kwargs.get("scaling") or d**-0.5
            if static:
                seq_lens = layer.lens
            else:
                seq_lens = torch.full((b,), layer.length, dtype=torch.int32, device=query.device)
            qt = kvq.query_transform(query.dtype)  # P_h^-T, one matmul of the new queries
            out = decode_attention(query[:, :, 0], *layer.kernel_args(), seq_lens, scale, q_transform=qt)  # (B, H, D)
            return out.unsqueeze(1), None  # (B, 1, H, D), as sdpa_attention_forward returns
        key, value = layer.dequantized(query.dtype)  # a padding mask (or other bits): SDPA over the cache
    elif pending[0] == "causal-prompt":
        # A prompt from position 0 without a padding mask (GraphedPrefill), so the mask is purely causal unless a
        # sliding window is shorter than the prompt; while a CUDA graph is captured transformers (5.17 at least)
        # materialises it (it cannot skip it then), which on CUDA sends SDPA to a slower masked kernel and makes
        # transformers repeat K/V per query head. SDPA's own causal masking is the same (query and keys both
        # start at position 0) and keeps grouped K/V grouped.
        window = kwargs.get("sliding_window")
        if window is None or query.shape[2] <= window:
            attention_mask = None
    query = kvq.transform_query(query)  # (B, H, Tq, D)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_packed_attention(model: nn.Module) -> None:
    """Register :func:`packed_attention` (with SDPA's mask function) and select it for ``model``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
