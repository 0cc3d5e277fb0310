"""Rotary position embedding of q and k in one launch, bit for bit as transformers computes it.

Llama, Mistral, Qwen2 and Qwen3 rotate the queries and keys inside their attention forward with the module
function ``apply_rotary_pos_emb``::

    q_embed = (q * cos) + (rotate_half(q) * sin)        # rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    k_embed = (k * cos) + (rotate_half(k) * sin)

about ten kernels (two slices, a negation and a concatenation per tensor, four products and two sums), each a
few microseconds of launch for almost no work in a decode step, and each a pass over q or k in a prompt.
:func:`rope_triton` does it in one launch for q and k together. In 16-bit dtypes it is exact: every product
of two 16-bit values is exact in fp32, so rounding each product and the sum to the dtype (as PyTorch's
element-wise kernels do, computing in fp32) gives the same bits.

:func:`fuse_rotary` makes a packed model use it without copying any forward: the architecture's module-level
``apply_rotary_pos_emb`` (looked up by name at each call) is replaced by a :class:`FusedRotary` that runs the
kernel for CUDA bf16/fp16 inputs of the usual layout and the original function for anything else.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import kron_quantize as _kq
from . import kv_quant as _kv
from . import pdl as _pdl

triton, tl = _kq.triton, _kq.tl

__all__ = ["FusedRotary", "fuse_rotary", "rope", "rope_reference", "rope_triton", "unfuse_rotary"]


def rope_reference(q, k, cos, sin):
    """transformers' formula, op for op (q, k (B, H, T, D); cos, sin (B or 1, T, D))."""

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


if triton is not None:

    @triton.jit
    def _rotate_heads(
        x_ptr, o_ptr, x_base, o_base, sxh, soh, h0, H, c_lo, c_hi, s_lo, s_hi, rd, md,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        """Heads h0 .. h0 + BLOCK_H of one token: each product and the sum rounded to the output dtype."""
        rh = h0 + tl.arange(0, BLOCK_H)
        m = (rh < H)[:, None] & md[None, :]
        rows = x_ptr + x_base + rh.to(tl.int64)[:, None] * sxh + rd[None, :]
        lo = tl.load(rows, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(rows + HALF, mask=m, other=0.0).to(tl.float32)
        dt = o_ptr.dtype.element_ty
        # first half: x1 * cos1 + (-x2) * sin1; second half: x2 * cos2 + x1 * sin2
        a = _kq._round_to(lo * c_lo[None, :], dt, INTERPRET).to(tl.float32)
        b = _kq._round_to(-hi * s_lo[None, :], dt, INTERPRET).to(tl.float32)
        out_lo = _kq._round_to(a + b, dt, INTERPRET)
        a = _kq._round_to(hi * c_hi[None, :], dt, INTERPRET).to(tl.float32)
        b = _kq._round_to(lo * s_hi[None, :], dt, INTERPRET).to(tl.float32)
        out_hi = _kq._round_to(a + b, dt, INTERPRET)
        out = o_ptr + o_base + rh.to(tl.int64)[:, None] * soh + rd[None, :]
        tl.store(out, out_lo, mask=m)
        tl.store(out + HALF, out_hi, mask=m)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, HQ, HK, NQB,
        sqb, sqh, sqt, skb, skh, skt, scb, sct, soqb, soqh, soqt, sokb, sokh, sokt,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Program (token b * T + t, head block): the first NQB head blocks are q's, the rest k's."""
        _pdl.wait_previous(PDL)
        bt = tl.program_id(0)
        hb = tl.program_id(1)
        b = (bt // T).to(tl.int64)
        t = (bt % T).to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        md = rd < HALF
        c_row = b * scb + t * sct  # cos and sin share strides (stride 0 over a broadcast batch)
        c_lo = tl.load(cos_ptr + c_row + rd, mask=md, other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + c_row + HALF + rd, mask=md, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + c_row + rd, mask=md, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + c_row + HALF + rd, mask=md, other=0.0).to(tl.float32)
        if hb < NQB:
            _rotate_heads(
                q_ptr, qo_ptr, b * sqb + t * sqt, b * soqb + t * soqt, sqh, soqh, hb * BLOCK_H, HQ,
                c_lo, c_hi, s_lo, s_hi, rd, md, HALF, BLOCK_H, INTERPRET,
            )  # fmt: skip
        else:
            _rotate_heads(
                k_ptr, ko_ptr, b * skb + t * skt, b * sokb + t * sokt, skh, sokh, (hb - NQB) * BLOCK_H, HK,
                c_lo, c_hi, s_lo, s_hi, rd, md, HALF, BLOCK_H, INTERPRET,
            )  # fmt: skip


def _interpreting() -> bool:
    return triton is not None and type(_rope_kernel).__name__ == "InterpretedFunction"


def unsupported_reason(q, k, cos, sin) -> str | None:
    """Why :func:`rope_triton` cannot take these arguments (None when it can); devices aside."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return f"needs q, k (B, H, T, D) and cos, sin (B, T, D); got {q.dim()}-d, {k.dim()}-d, {cos.dim()}-d"
    (b, _, t, d), (bk, _, tk, dk) = q.shape, k.shape
    if (bk, tk, dk) != (b, t, d) or cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b) or d % 2:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} do not match (even D)"
    if q.dtype not in _kv._Q_DTYPES or any(x.dtype != q.dtype for x in (k, cos, sin)):
        return f"needs one 16-bit dtype for q, k, cos, sin; got {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}"
    if any(x.stride(-1) != 1 for x in (q, k, cos, sin)) or cos.stride() != sin.stride():
        return "needs unit-stride rows and cos, sin of equal strides"
    return None


def _like(x: torch.Tensor) -> torch.Tensor:
    """An output for x (B, H, T, D) laid out as the element-wise result would be: token-major when x is (the
    head transpose of a projection's output), else contiguous."""
    b, h, t, d = x.shape
    if x.stride(2) > x.stride(1):
        return torch.empty((b, t, h, d), device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty((b, h, t, d), device=x.device, dtype=x.dtype)


def kernel_meta(head_dim: int) -> dict:
    """The kernel's constexprs for a head dimension: half of it, padded to a power of two, and heads per program."""
    half = head_dim // 2
    return dict(HALF=half, BLOCK_H=4 if head_dim > 128 else 8, BLOCK_D=max(2, triton.next_power_of_2(half)))


def rope_triton(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for :func:`rope_reference` (same bits); see :func:`unsupported_reason` for what it takes."""
    reason = unsupported_reason(q, k, cos, sin)
    if reason is not None:
        raise RuntimeError(f"rope triton kernel cannot run: {reason}")
    return _launch(q, k, cos, sin)


def _launch(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch of :func:`rope_triton` for arguments already checked with :func:`unsupported_reason`."""
    reason = _kv.triton_unavailable_reason(q)
    if reason is not None:
        raise RuntimeError(f"rope triton kernel cannot run: {reason}")
    b, hq, t, d = q.shape
    hk = k.shape[1]
    qo, ko = _like(q), _like(k)
    if q.numel() and k.numel():
        meta = kernel_meta(d)
        nqb = triton.cdiv(hq, meta["BLOCK_H"])
        sc = cos.stride()
        _rope_kernel[(b * t, nqb + triton.cdiv(hk, meta["BLOCK_H"]))](
            q, k, cos, sin, qo, ko, t, hq, hk, nqb, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), 0 if cos.shape[0] == 1 else sc[0], sc[1], qo.stride(0), qo.stride(1), qo.stride(2),
            ko.stride(0), ko.stride(1), ko.stride(2), **meta, INTERPRET=_interpreting(), num_warps=4,
            **_kv._no_fp_fusion(), **_pdl.launch_options(_pdl.pdl_on(q)),
        )  # fmt: skip
    return qo, ko


def rope(q, k, cos, sin, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (see the module doc). impl: "auto" (Triton for CUDA 16-bit inputs it takes, else the
    reference), "triton" or "torch" (forced; RuntimeError when the forced kernel cannot run)."""
    if _kv._pick(impl, q) == "triton":
        if impl == "triton":
            return rope_triton(q, k, cos, sin)
        if unsupported_reason(q, k, cos, sin) is None:
            return _launch(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)


class FusedRotary:
    """Stands in for a modeling module's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: the
    one-launch kernel where it applies (CUDA, or ``impl="triton"`` for tests; 16-bit q, k, cos, sin of the
    usual shapes, ``unsqueeze_dim=1``, nothing that needs a gradient), the ``original`` function for every
    other call."""

    def __init__(self, original):
        self.original = original
        self.impl = "auto"

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if len(args) == 1 else 1)
        plain = len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze_dim == 1
        # the kernel has no backward: a model being trained in this process (a calibration) keeps the original
        grads = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, cos, sin))
        if plain and not grads and _kv._pick(self.impl, q) == "triton" and unsupported_reason(q, k, cos, sin) is None:
            return _launch(q, k, cos, sin)  # checked just above: no second check on this per-layer path
        return self.original(q, k, cos, sin, *args, **kwargs)


def fuse_rotary(model: nn.Module) -> list[str]:
    """Route the ``apply_rotary_pos_emb`` of the modeling modules that ``model``'s attention classes come from
    through :class:`FusedRotary` (once per module; the same bits, so other models of that architecture in the
    process are unaffected in value). Returns the modules changed now."""
    changed = []
    for mod in model.modules():
        if not type(mod).__name__.endswith("Attention"):
            continue
        module = sys.modules.get(type(mod).__module__)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None or isinstance(fn, FusedRotary):
            continue
        module.apply_rotary_pos_emb = FusedRotary(fn)
        changed.append(module.__name__)
    return changed


def unfuse_rotary() -> list[str]:
    """Put back the original ``apply_rotary_pos_emb`` wherever :func:`fuse_rotary` replaced it (e.g. to time
    an unmodified baseline model in the same process). Returns the modules restored."""
    restored = []
    for name, module in list(sys.modules.items()):
        fn = getattr(module, "apply_rotary_pos_emb", None) if module is not None else None
        if isinstance(fn, FusedRotary):
            module.apply_rotary_pos_emb = fn.original
            restored.append(name)
    return restored
