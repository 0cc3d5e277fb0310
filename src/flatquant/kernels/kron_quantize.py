"""Fused online Kronecker transform + per-token activation quantization.

Each token x (n,) is viewed row-major as X (n1, n2) (element ``i = a * n2 + b``) and transformed to
``X' = P1^T @ X @ P2``; X' is then quantized per token to ``bits``-bit integer codes with a learned
clipping ratio. This is what runs before every W4A4 linear layer at inference (method.md, section 2).

Contract shared by the kernel and the reference (the rest of the library depends on it):

- P1 and P2 are rounded to ``x.dtype`` first (deployed factors live in the model dtype); products are
  exact in fp32 and accumulate in fp32. ``intermediate="fp32"`` (default) keeps ``X @ P2`` in fp32
  precision before ``P1^T @ (.)``; ``intermediate="input"`` rounds it to ``x.dtype`` first, as an
  unfused 16-bit torch implementation does (faster kernel, slightly less accurate).
- Symmetric: ``absmax = max(clip_max * max(X'), -clip_min * min(X'))``,
  ``scale = max(absmax / (2^(bits-1) - 1), 1e-8)``,
  ``codes = clamp(round(X' / scale), -2^(bits-1), 2^(bits-1) - 1)``.
- Asymmetric: ``xmax = clip_max * max(max(X'), 0)``, ``xmin = clip_min * min(min(X'), 0)`` (the range holds 0, as
  the fake quantizer's: the zero point lies in [0, 2^bits - 1]),
  ``scale = max((xmax - xmin) / (2^bits - 1), 1e-8)``, ``zero = round(-xmin / scale)``,
  ``codes = clamp(round(X' / scale) + zero, 0, 2^bits - 1)``.
- ``round`` is round-half-to-even (``torch.round``); the kernel uses IEEE division and an exact
  round-half-to-even, so codes differ from the reference only where ``X' / scale`` lies within a few
  fp32 ulps of a half-integer (the two compute X' with different fp32 summation orders).
- Output: int8 codes (..., n), one code per byte (the W4A4 GEMM operand layout), or with ``pack=True``
  uint8 (..., n // 2) holding two 4-bit codes per byte, low nibble = even index (two's complement nibble
  when symmetric); fp32 scale (...,); fp32 zero point (...,) when asymmetric, else None.
  ``codes_dtype=float8_e4m3fn`` writes e4m3 bytes, the operand of the dense FP8 prefill GEMM, always read as
  ``scale * code``: the same integers when symmetric; when asymmetric the centred codes ``code - zero``
  (integers in [-(2^bits - 1), 2^bits - 1], exact in e4m3 for bits <= 4) and no zero point (None).
- ``p2=None`` means identity over n2 (the P_o transform: heads x heads factor, identity over head_dim,
  ``n2 = n // n1``); ``p1=None`` likewise means identity over n1.

The kernel pads each token's (n1, n2) tile to powers of two; 86 x 128 tokens go to :mod:`.kron_pieces` instead
(power-of-two pieces, the same contract and quantizer helpers), chosen in :func:`kron_quantize_triton`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import envflags as _envflags
from . import pdl as _pdl

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except ImportError as err:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = err

__all__ = ["KronQuantized", "kron_quantize", "kron_quantize_reference", "kron_quantize_triton"]

_EPS = 1e-8
_IMPLS = ("auto", "triton", "torch")
_INTERMEDIATES = ("fp32", "input")
_CODES_DTYPES = (torch.int8, torch.float8_e4m3fn)  # one code per byte: both hold 4-bit integers exactly
_MAX_TILE = 128 * 128  # larger token tiles are built in column chunks, twice (max, then codes)
# fp32 1 / qmax per (bits, symmetric): PyTorch on CUDA divides a tensor by a Python scalar as a multiply by
# the scalar's fp32 reciprocal, so the reference's scale on CUDA is range * this value (on the CPU: a division)
_INV_QMAX = {
    (b, sym): (torch.ones((), dtype=torch.float32) / (2 ** (b - 1) - 1 if sym else 2**b - 1)).item()
    for b in range(2, 9)
    for sym in (True, False)
}


class KronQuantized(NamedTuple):
    """Result of :func:`kron_quantize`.

    codes: int8 (..., n) (float8_e4m3fn with ``codes_dtype``), or uint8 (..., n // 2) when packed. scale: fp32 (...,).
    zero: fp32 (...,) when asymmetric, else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _check_args(x, p1, p2, bits, symmetric, pack, intermediate, codes_dtype=torch.int8) -> tuple[int, int]:
    """Validate the arguments; return (n1, n2)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype=}")
    if codes_dtype not in _CODES_DTYPES:
        raise ValueError(f"codes_dtype must be torch.int8 or torch.float8_e4m3fn, got {codes_dtype=}")
    if pack and codes_dtype != torch.int8:
        raise ValueError(f"pack=True writes two codes per byte (uint8); codes_dtype must stay int8, got {codes_dtype}")
    if codes_dtype != torch.int8 and bits > 4:
        raise ValueError(f"float8_e4m3fn codes hold integers up to 16 exactly: bits must be <= 4, got {bits=}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits=}")
    if pack and bits > 4:
        raise ValueError(f"pack=True stores two codes per byte and needs bits <= 4, got {bits=}")
    if intermediate not in _INTERMEDIATES:
        raise ValueError(f"intermediate must be one of {_INTERMEDIATES}, got {intermediate=}")
    n = x.shape[-1]
    for name, p in (("p1", p1), ("p2", p2)):
        if p is not None and (p.dim() != 2 or p.shape[0] != p.shape[1]):
            raise ValueError(f"{name} must be a square matrix, got {name}.shape={tuple(p.shape)}")
    n1 = p1.shape[0] if p1 is not None else None
    n2 = p2.shape[0] if p2 is not None else None
    if n1 is None and n2 is None:
        n1, n2 = 1, n
    elif n1 is None:
        n1 = n // n2
    elif n2 is None:
        n2 = n // n1
    if n1 * n2 != n:
        raise ValueError(f"factor sizes must multiply to x.shape[-1]: {n1=} * {n2=} != {n=}")
    if pack and n % 2:
        raise ValueError(f"pack=True needs an even number of channels, got {n=}")
    return n1, n2


def _check_norm(x: torch.Tensor, norm) -> None:
    """A fused RMSNorm ``(weight, eps)``: weight (n,) in x's dtype (the module's output dtype is then x's)."""
    if norm is None:
        return
    weight, eps = norm
    if weight.shape != (x.shape[-1],) or weight.dtype != x.dtype:
        raise ValueError(
            f"norm weight must be ({x.shape[-1]},) in {x.dtype}, got {tuple(weight.shape)} in {weight.dtype}"
        )
    if not float(eps) >= 0.0:
        raise ValueError(f"norm eps must be >= 0, got {eps!r}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama / Mistral / Qwen RMSNorm modules' arithmetic, op for op (upcast, mean of squares, rsqrt,
    downcast, times the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes (..., n) two per byte: uint8 (..., n // 2), low nibble = even index."""
    nib = codes.to(torch.int32) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def kron_quantize_reference(
    x: torch.Tensor,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
    clip_max: float | torch.Tensor = 1.0,
    clip_min: float | torch.Tensor = 1.0,
    bits: int = 4,
    symmetric: bool = True,
    *,
    pack: bool = False,
    intermediate: str = "fp32",
    norm: tuple[torch.Tensor, float] | None = None,
    codes_dtype: torch.dtype = torch.int8,
) -> KronQuantized:
    """Plain PyTorch reference of :func:`kron_quantize` (any device; same contract, see module doc).

    x: bf16/fp16 (..., n); p1: (n1, n1) or None; p2: (n2, n2) or None; n1 * n2 = n.
    X' is computed in float64 from the x.dtype-rounded operands and rounded once to fp32, i.e. the
    fp32-accumulated result without summation-order error; the quantizer then runs in fp32.
    """
    n1, n2 = _check_args(x, p1, p2, bits, symmetric, pack, intermediate, codes_dtype)
    _check_norm(x, norm)
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    lead = x.shape[:-1]
    z = x.reshape(-1, n1, n2).double()  # (T, n1, n2)
    if p2 is not None:
        z = z @ p2.to(x.dtype).double()
        if intermediate == "input":
            z = z.to(x.dtype).double()
    if p1 is not None:
        z = p1.to(x.dtype).double().T @ z
    z = z.float().reshape(z.shape[0], -1)  # (T, n) fp32
    zmax, zmin = z.amax(dim=1), z.amin(dim=1)  # (T,)
    cmax = torch.as_tensor(clip_max, dtype=torch.float32, device=z.device)
    cmin = torch.as_tensor(clip_min, dtype=torch.float32, device=z.device)
    if symmetric:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        absmax = torch.maximum(cmax * zmax, -(cmin * zmin))
        scale = (absmax / qmax).clamp_min(_EPS)
        codes = torch.clamp(torch.round(z / scale[:, None]), qmin, qmax)
        zero = None
    else:
        qmax = 2**bits - 1
        xmax, xmin = cmax * zmax.clamp_min(0), cmin * zmin.clamp_max(0)  # the range holds 0
        scale = ((xmax - xmin) / qmax).clamp_min(_EPS)
        zero = torch.round(-xmin / scale)
        codes = torch.clamp(torch.round(z / scale[:, None]) + zero[:, None], 0, qmax)
        zero = zero.reshape(lead)
    codes = codes.to(torch.int8).reshape(*lead, n1 * n2)
    if pack:
        codes = _pack_int4(codes)
    elif codes_dtype != torch.int8:  # exact: small integers; centred (no zero point) when asymmetric
        codes = codes.to(codes_dtype) if zero is None else (codes.float() - zero[..., None]).to(codes_dtype)
        zero = None
    return KronQuantized(codes, scale.reshape(lead), zero)


if triton is not None:

    @triton.jit
    def _rint_arith(v):
        """Round half to even, exactly, for fp32 (adding 2^23 leaves no fractional bits)."""
        a = tl.abs(v)
        r = (a + 8388608.0) - 8388608.0
        r = tl.where(a < 8388608.0, r, a)
        return tl.where(v < 0, -r, r)

    # compiled kernels round with one instruction; the interpreter cannot run inline PTX
    _PTX_RINT = tl.constexpr(type(_rint_arith).__name__ != "InterpretedFunction")

    @triton.jit
    def _rint(v):
        """Round half to even, exactly, for fp32: PTX ``cvt.rni`` (one instruction instead of the six of
        :func:`_rint_arith`, which the interpreter runs; both are torch.round's half-to-even)."""
        if _PTX_RINT:
            return tl.inline_asm_elementwise(
                "cvt.rni.f32.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1
            )
        return _rint_arith(v)

    # Only builtins and our own @triton.jit helpers are used: triton's jit-defined library functions
    # (tl.max, tl.zeros, tl.cdiv, ...) cannot run in the interpreter when triton was imported before
    # TRITON_INTERPRET=1 was set, as happens when another module imports it first.

    @triton.jit
    def _real(z, mask, neutral, SYMMETRIC: tl.constexpr):
        """z where mask, else ``neutral`` (+-inf), for a token's max and min over its real elements. Symmetric
        scales need no mask: padded elements of X' are exactly 0 (zero-padded operands), and a 0 cannot change
        max(cmax * max, -cmin * min), whatever the signs (the asymmetric min and max themselves are used).
        Small tiles keep the mask: dropping it there saves little and made one 24x24 build use stack."""
        if SYMMETRIC and z.numel >= 4096:
            return z
        return tl.where(mask, z, neutral)

    @triton.jit
    def _tile_max(v):
        """Max over all elements of a 2-D tile (a scalar). tl.standard's combine functions are
        recognised by the interpreter (a numpy reduction) and never called there."""
        return tl.reduce(tl.reduce(v, 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max)

    @triton.jit
    def _tile_min(v):
        return tl.reduce(tl.reduce(v, 1, tl.standard._elementwise_min), 0, tl.standard._elementwise_min)

    # The CPU interpreter (TRITON_INTERPRET=1) multiplies bf16 operands as raw bits and truncates
    # fp32 -> bf16 casts; under INTERPRET the helpers below work around both (same math).

    @triton.jit
    def _dot(a, b, acc, INTERPRET: tl.constexpr):
        """acc + a @ b, fp32 accumulate (16-bit products are exact in fp32)."""
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _round_to(y, dt: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 -> dt (bf16/fp16) rounding to nearest even."""
        if INTERPRET and dt == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        return y.to(dt)

    @triton.jit
    def _halves(w, dt: tl.constexpr, INTERPRET: tl.constexpr):
        """w (fp32) = hi + lo to ~2^-17 relative, both in dt: two exact 16-bit products instead of one fp32 one."""
        hi = _round_to(w, dt, INTERPRET)
        return hi, _round_to(w - hi.to(tl.float32), dt, INTERPRET)

    @triton.jit
    def _left_factor(y, p1t, dt: tl.constexpr, HAS_P1: tl.constexpr, SPLIT_Y: tl.constexpr, INTERPRET):
        """P1^T @ y, fp32 (BN1, cols); y fp32 holds X @ P2 (or X itself)."""
        if HAS_P1:
            acc = tl.full(y.shape, 0.0, tl.float32)
            if SPLIT_Y:
                y_hi, y_lo = _halves(y, dt, INTERPRET)
                acc = _dot(p1t, y_lo, acc, INTERPRET)
                return _dot(p1t, y_hi, acc, INTERPRET)
            return _dot(p1t, _round_to(y, dt, INTERPRET), acc, INTERPRET)  # exact when y == x
        if SPLIT_Y:
            return y
        return _round_to(y, dt, INTERPRET).to(tl.float32)  # the 16-bit intermediate is the result

    @triton.jit
    def _right_factor(yt, p1, dt: tl.constexpr, HAS_P1: tl.constexpr, SPLIT_Y: tl.constexpr, INTERPRET):
        """yt @ P1, fp32 (rows, BN1): the stacked, transposed form of P1^T @ Y_t (rows = tokens x BN2)."""
        if HAS_P1:
            acc = tl.full(yt.shape, 0.0, tl.float32)
            if SPLIT_Y:
                y_hi, y_lo = _halves(yt, dt, INTERPRET)
                acc = _dot(y_lo, p1, acc, INTERPRET)
                return _dot(y_hi, p1, acc, INTERPRET)
            return _dot(_round_to(yt, dt, INTERPRET), p1, acc, INTERPRET)
        if SPLIT_Y:
            return yt
        return _round_to(yt, dt, INTERPRET).to(tl.float32)

    @triton.jit
    def _scale_zero(
        zmax, zmin, clip_max, clip_min, inv_qmax, SYMMETRIC: tl.constexpr, BITS: tl.constexpr, RECIP: tl.constexpr
    ):
        """Per-token scale and zero point (0 when symmetric), fp32 scalars, rounded as the reference.

        RECIP (CUDA): the range times the fp32 reciprocal of qmax, which is what the reference's division by a
        Python scalar computes on CUDA; otherwise an IEEE division, as on the CPU."""
        if SYMMETRIC:
            rng = tl.maximum(clip_max * zmax, -(clip_min * zmin))
            qmax = 2.0 ** (BITS - 1) - 1
        else:  # the range holds 0 (as the fake quantizer's): the zero point lies in [0, 2^BITS - 1]
            xmin = clip_min * tl.minimum(zmin, 0.0)
            rng = clip_max * tl.maximum(zmax, 0.0) - xmin
            qmax = 2.0**BITS - 1
        if RECIP:
            scale = tl.maximum(rng * inv_qmax, 1e-8)
        else:
            scale = tl.maximum(tl.math.div_rn(rng, qmax), 1e-8)
        if SYMMETRIC:
            zero = scale * 0.0
        else:
            zero = _rint(tl.math.div_rn(-xmin, scale))
        return scale, zero

    @triton.jit
    def _quotient(z, s, BITS: tl.constexpr, FAST_DIV: tl.constexpr):
        """z / s rounded as IEEE division (the reference's), for the codes: what matters is rint of it.

        An IEEE division per element is a multi-instruction sequence; z * (1 / s) costs one multiply and is
        within 1.5 ulp of the exact quotient, so its rint equals rint(z / s) unless the quotient lies within
        that distance of a half-integer. The test below flags every such element (bound (|v| + 1) * 2^-22,
        above the error), only where a code can land in range (|v| <= 2^BITS + 1, zero point included), and
        a tile with any flagged element is redone exactly: a few percent of 4-bit tiles.
        FAST_DIV = 0: the exact quotient throughout (:func:`_div_exact`, three instructions per element; the
        fast path adds a tile-wide reduction per token and registers: the autotuner decides)."""
        y = _recip(s)  # once per scale
        if not FAST_DIV:
            return _div_exact(z, s, y)
        v = z * y
        a = tl.abs(v)
        near = (tl.abs(a - tl.floor(a) - 0.5) < (a + 1.0) * 2.384185791015625e-07) & (a < 2.0**BITS + 1.0)
        if tl.max(near.to(tl.int32)) > 0:
            v = _div_exact(z, s, y)
        return v

    @triton.jit
    def _recip(s):
        """RN(1 / s), an IEEE division (per scale, not per element): the y of :func:`_div_exact`."""
        return tl.math.div_rn(s * 0.0 + 1.0, s)

    @triton.jit
    def _div_exact(z, s, y):
        """z / s rounded as an IEEE division, in three instructions per element: with y = RN(1 / s)
        (:func:`_recip`, once per scale; s holds per-token scales broadcast over z), q = RN(z * y) is within an
        ulp of z / s, the remainder z - s * q is exact in one fma, and RN(q + remainder * y) is the correctly
        rounded quotient (Markstein's theorem; its conditions hold: s is a positive normal number, and a
        quotient small enough to underflow rounds to code 0 either way). The inlined IEEE division instead
        checks every element's range (FCHK) and keeps a slow path."""
        q = z * y
        return tl.fma(tl.fma(-q, s, z), y, q)

    @triton.jit
    def _codes(z, scale, zero, SYMMETRIC: tl.constexpr, BITS: tl.constexpr, FAST_DIV: tl.constexpr):
        """int32 codes of z (fp32) with the token's scale and zero point (broadcast over z)."""
        if SYMMETRIC:
            v = _quotient(z, scale, BITS, FAST_DIV)
            q = _rint(tl.minimum(tl.maximum(v, -(2.0 ** (BITS - 1))), 2.0 ** (BITS - 1) - 1))
        else:
            q = _rint(_quotient(z, scale, BITS, FAST_DIV)) + zero
            q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1)
        return q.to(tl.int32)

    @triton.jit
    def _code_bytes(qi, zero, q_ptr, SYMMETRIC: tl.constexpr):
        """int32 codes as the bytes ``q_ptr`` holds: int8, or e4m3 via fp32, centred (code - zero, in [-15, 15])
        when asymmetric. Both exact for 4-bit codes."""
        if q_ptr.dtype.element_ty == tl.float8e4nv:
            if SYMMETRIC:
                return qi.to(tl.float32).to(tl.float8e4nv)
            else:
                return (qi.to(tl.float32) - zero).to(tl.float8e4nv)
        else:
            return qi.to(tl.int8)

    @triton.jit
    def _quantize_store(
        z,
        scale,
        zero,
        q_ptr,
        row0,
        col0,
        N1,
        N2,
        BN1: tl.constexpr,
        BC: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        FAST_DIV: tl.constexpr,
    ):
        """Quantize z (BN1, BC) fp32, columns col0 .. col0 + BC of the token's (N1, N2) view; store codes.

        row0: int64 offset of the token's codes, counted in codes (the packed byte offset is row0 // 2).
        """
        qi = _codes(z, scale, zero, SYMMETRIC, BITS, FAST_DIV)
        ra = tl.arange(0, BN1)
        if PACK:
            lo, hi = tl.split(tl.reshape(qi, (BN1, BC // 2, 2)))  # (BN1, BC // 2): even / odd columns
            byte = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            rh = col0 // 2 + tl.arange(0, BC // 2)
            mh = (ra[:, None] < N1) & (rh[None, :] < N2 // 2)
            tl.store(q_ptr + row0 // 2 + ra[:, None] * (N2 // 2) + rh[None, :], byte, mask=mh)
        else:
            rb = col0 + tl.arange(0, BC)
            m = (ra[:, None] < N1) & (rb[None, :] < N2)
            tl.store(q_ptr + row0 + ra[:, None] * N2 + rb[None, :], _code_bytes(qi, zero, q_ptr, SYMMETRIC), mask=m)

    @triton.jit
    def _quantize_store_tokens(
        z,
        scale,
        zero,
        q_ptr,
        t64,
        tmask,
        N1,
        N2,
        BT: tl.constexpr,
        BN1: tl.constexpr,
        BN2: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        FAST_DIV: tl.constexpr,
    ):
        """Quantize z (BT, BN1, BN2) fp32 (BT tokens) with per-token scale / zero (BT,); store the codes."""
        qi = _codes(z, scale[:, None, None], zero[:, None, None], SYMMETRIC, BITS, FAST_DIV)
        ra = tl.arange(0, BN1)
        base = t64 * (N1 * N2)  # (BT,) int64, in codes
        mt = tmask[:, None, None] & (ra[None, :, None] < N1)
        if PACK:
            lo, hi = tl.split(tl.reshape(qi, (BT, BN1, BN2 // 2, 2)))  # even / odd columns
            byte = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            rh = tl.arange(0, BN2 // 2)
            offs = base[:, None, None] // 2 + ra[None, :, None] * (N2 // 2) + rh[None, None, :]
            tl.store(q_ptr + offs, byte, mask=mt & (rh[None, None, :] < N2 // 2))
        else:
            rb = tl.arange(0, BN2)
            offs = base[:, None, None] + ra[None, :, None] * N2 + rb[None, None, :]
            codes = _code_bytes(qi, zero[:, None, None], q_ptr, SYMMETRIC)
            tl.store(q_ptr + offs, codes, mask=mt & (rb[None, None, :] < N2))

    @triton.jit
    def _column_chunk(
        x_ptr,
        p2_ptr,
        p1t,
        xrow,
        j0,
        N1,
        N2,
        BN1: tl.constexpr,
        BN2: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        HAS_P1,
        HAS_P2: tl.constexpr,
        SPLIT_Y,
        INTERPRET,
    ):
        """Columns j0 .. j0 + BC of X' (BN1, BC) fp32, streaming X and P2 in BK-wide slices."""
        dt = x_ptr.dtype.element_ty
        ra = tl.arange(0, BN1)
        rj = j0 + tl.arange(0, BC)
        if HAS_P2:
            y = tl.full((BN1, BC), 0.0, tl.float32)
            for k0 in range(0, BN2, BK):
                rk = k0 + tl.arange(0, BK)
                xk = tl.load(
                    x_ptr + xrow + ra[:, None] * N2 + rk[None, :],
                    mask=(ra[:, None] < N1) & (rk[None, :] < N2),
                    other=0.0,
                )
                pk = tl.load(
                    p2_ptr + rk[:, None] * N2 + rj[None, :], mask=(rk[:, None] < N2) & (rj[None, :] < N2), other=0.0
                )
                y = _dot(xk, pk, y, INTERPRET)
        else:
            y = tl.load(
                x_ptr + xrow + ra[:, None] * N2 + rj[None, :], mask=(ra[:, None] < N1) & (rj[None, :] < N2), other=0.0
            ).to(tl.float32)
        return _left_factor(y, p1t, dt, HAS_P1, SPLIT_Y, INTERPRET)

    # one binary for every token count (no specialisation on 1 or on divisibility by 16: fewer compiles)
    @triton.jit(do_not_specialize=["n_tokens", "T_BUCKET"])
    def _kron_quantize_kernel(
        # pointers: x (T, n) row stride stride_xt; p1 (N1, N1); p2 (N2, N2); q codes; scale/zero (T,)
        x_ptr,
        p1_ptr,
        p2_ptr,
        q_ptr,
        scale_ptr,
        zero_ptr,
        nw_ptr,  # (N1 * N2,) RMSNorm weight in x's dtype when NORM (else unused)
        # runtime scalars
        clip_max,
        clip_min,
        inv_qmax,  # fp32 1 / qmax, used when RECIP
        eps,  # RMSNorm epsilon when NORM
        n_tokens,
        stride_xt,
        T_BUCKET,  # token-count bucket: an autotune key, unused in the body
        # shapes: the token tile is (BN1, BN2) = (N1, N2) padded to powers of two >= 16
        N1: tl.constexpr,
        N2: tl.constexpr,
        BN1: tl.constexpr,
        BN2: tl.constexpr,
        # variants
        HAS_P1: tl.constexpr,
        HAS_P2: tl.constexpr,
        SPLIT_Y: tl.constexpr,  # keep X @ P2 in fp32 precision as hi + lo 16-bit halves
        SYMMETRIC: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        INTERPRET: tl.constexpr,  # CPU interpreter workarounds
        RECIP: tl.constexpr,  # CUDA: scale = range * fp32(1 / qmax), as the reference computes it there
        NORM: tl.constexpr,  # RMSNorm each token first (the decoder layer's norm), as the modules compute it
        # launch config (autotuned): tokens stacked per iteration, programs per SM (read by the grid only)
        BLOCK_T: tl.constexpr,
        PROGS_PER_SM: tl.constexpr,
        # one token per iteration, fp32 intermediate, both factors: compute (P1^T X) P2, so that the split
        # fp32 intermediate is the left operand of the second product (registers, not shared memory)
        P1_FIRST: tl.constexpr,
        # codes from z * (1 / scale) with an exact IEEE-division redo of tiles near rounding ties (_quotient)
        FAST_DIV: tl.constexpr = 0,
        # BC < BN2: X' is built BC columns at a time, twice (max, then codes): tiles too large for registers,
        # or a smaller footprint (more programs per SM) for 128x128 tiles
        BC: tl.constexpr = 0,
        # programmatic dependent launch (pdl.py): the factors and the norm weight load before the previous kernel
        # has finished, the tokens after it
        PDL: tl.constexpr = False,
        # with PDL: let the next kernel launch right after the wait (else as this kernel's programs exit)
        PDL_EARLY: tl.constexpr = True,
    ):
        # Persistent: each program loads the factors once and loops over token blocks pid, pid + G, ...
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        ra = tl.arange(0, BN1)
        rb = tl.arange(0, BN2)
        mask = (ra[:, None] < N1) & (rb[None, :] < N2)  # (BN1, BN2)
        dt = x_ptr.dtype.element_ty
        m1 = (ra[:, None] < N1) & (ra[None, :] < N1)
        if BLOCK_T > 1:
            # BLOCK_T tokens per iteration: X @ P2 as one (BLOCK_T * BN1, BN2) product, then P1^T @ Y_t for
            # every token as one stacked product of the transposed intermediates, (BLOCK_T * BN2, BN1) @ P1
            p1 = tl.load(p1_ptr + ra[:, None] * N1 + ra[None, :], mask=m1 & HAS_P1, other=0.0)  # (BN1, BN1)
            if HAS_P2:
                m2 = (rb[:, None] < N2) & (rb[None, :] < N2)
                p2 = tl.load(p2_ptr + rb[:, None] * N2 + rb[None, :], mask=m2, other=0.0)  # (BN2, BN2)
            if NORM:
                nw = tl.load(nw_ptr + ra[:, None] * N2 + rb[None, :], mask=mask, other=0.0).to(tl.float32)
            rt = tl.arange(0, BLOCK_T)
            n_blocks = (n_tokens + BLOCK_T - 1) // BLOCK_T
            _pdl.wait_previous(PDL, PDL_EARLY)
            for i in range(0, (n_blocks - pid + nprog - 1) // nprog):
                t64 = (pid + i * nprog).to(tl.int64) * BLOCK_T + rt  # (BT,) token indices
                tmask = t64 < n_tokens
                m3 = tmask[:, None, None] & mask[None, :, :]  # (BT, BN1, BN2)
                offs = t64[:, None, None] * stride_xt + ra[None, :, None] * N2 + rb[None, None, :]
                x = tl.load(x_ptr + offs, mask=m3, other=0.0)  # (BT, BN1, BN2)
                if NORM:  # as the norm module: fp32 mean of squares, x * 1 / sqrt, to dt, times the weight, to dt
                    xf = x.to(tl.float32)
                    ss = tl.reduce(tl.reduce(xf * xf, 2, tl.standard._sum_combine), 1, tl.standard._sum_combine)
                    inv = 1.0 / tl.sqrt_rn(ss / (N1 * N2) + eps)  # (BT,)
                    h = _round_to(xf * inv[:, None, None], dt, INTERPRET).to(tl.float32)
                    x = _round_to(nw[None, :, :] * h, dt, INTERPRET)
                if HAS_P2:
                    y = _dot(
                        tl.reshape(x, (BLOCK_T * BN1, BN2)),
                        p2,
                        tl.full((BLOCK_T * BN1, BN2), 0.0, tl.float32),
                        INTERPRET,
                    )
                else:
                    y = tl.reshape(x.to(tl.float32), (BLOCK_T * BN1, BN2))
                if HAS_P1:
                    yt = tl.reshape(tl.permute(tl.reshape(y, (BLOCK_T, BN1, BN2)), (0, 2, 1)), (BLOCK_T * BN2, BN1))
                    zt = _right_factor(yt, p1, dt, HAS_P1, SPLIT_Y, INTERPRET)  # (BT * BN2, BN1)
                    z = tl.permute(tl.reshape(zt, (BLOCK_T, BN2, BN1)), (0, 2, 1))  # (BT, BN1, BN2)
                else:
                    z = tl.reshape(_right_factor(y, p1, dt, HAS_P1, SPLIT_Y, INTERPRET), (BLOCK_T, BN1, BN2))
                zmax = tl.reduce(
                    tl.reduce(_real(z, m3, -float("inf"), SYMMETRIC), 2, tl.standard._elementwise_max),
                    1,
                    tl.standard._elementwise_max,
                )  # (BT,)
                zmin = tl.reduce(
                    tl.reduce(_real(z, m3, float("inf"), SYMMETRIC), 2, tl.standard._elementwise_min),
                    1,
                    tl.standard._elementwise_min,
                )
                scale, zero = _scale_zero(zmax, zmin, clip_max, clip_min, inv_qmax, SYMMETRIC, BITS, RECIP)  # (BT,)
                _quantize_store_tokens(
                    z, scale, zero, q_ptr, t64, tmask, N1, N2, BLOCK_T, BN1, BN2, SYMMETRIC, BITS, PACK, FAST_DIV
                )
                tl.store(scale_ptr + t64, scale, mask=tmask)
                if not SYMMETRIC:
                    tl.store(zero_ptr + t64, zero, mask=tmask)
        else:
            # one token per iteration. p1t[i, a] = P1[a, i]; zero padding keeps padded rows of X' at 0
            p1t = tl.load(p1_ptr + ra[None, :] * N1 + ra[:, None], mask=m1 & HAS_P1, other=0.0)  # (BN1, BN1)
            if BC == BN2 and HAS_P2:
                m2 = (rb[:, None] < N2) & (rb[None, :] < N2)
                p2 = tl.load(p2_ptr + rb[:, None] * N2 + rb[None, :], mask=m2, other=0.0)  # (BN2, BN2)
            if NORM:  # full tiles only (the wrapper refuses column chunks with a norm)
                nw = tl.load(nw_ptr + ra[:, None] * N2 + rb[None, :], mask=mask, other=0.0).to(tl.float32)

            _pdl.wait_previous(PDL, PDL_EARLY)
            for i in range(0, (n_tokens - pid + nprog - 1) // nprog):
                t64 = (pid + i * nprog).to(tl.int64)  # token index; int64 offsets for huge T * n
                xrow = t64 * stride_xt
                if BC == BN2:
                    x = tl.load(x_ptr + xrow + ra[:, None] * N2 + rb[None, :], mask=mask, other=0.0)
                    if NORM:
                        xf = x.to(tl.float32)
                        ss = tl.reduce(tl.reduce(xf * xf, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)
                        inv = 1.0 / tl.sqrt_rn(ss / (N1 * N2) + eps)
                        h = _round_to(xf * inv, dt, INTERPRET).to(tl.float32)
                        x = _round_to(nw * h, dt, INTERPRET)
                    if P1_FIRST and HAS_P1 and HAS_P2 and SPLIT_Y:
                        w = _dot(p1t, x, tl.full((BN1, BN2), 0.0, tl.float32), INTERPRET)  # P1^T X, exact products
                        z = _right_factor(w, p2, dt, True, True, INTERPRET)  # (BN1, BN2) fp32
                    else:
                        if HAS_P2:
                            y = _dot(x, p2, tl.full((BN1, BN2), 0.0, tl.float32), INTERPRET)  # (BN1, BN2)
                        else:
                            y = x.to(tl.float32)
                        z = _left_factor(y, p1t, dt, HAS_P1, SPLIT_Y, INTERPRET)  # (BN1, BN2) fp32
                    zmax = _tile_max(_real(z, mask, -float("inf"), SYMMETRIC))
                    zmin = _tile_min(_real(z, mask, float("inf"), SYMMETRIC))
                    scale, zero = _scale_zero(zmax, zmin, clip_max, clip_min, inv_qmax, SYMMETRIC, BITS, RECIP)
                    _quantize_store(
                        z, scale, zero, q_ptr, t64 * (N1 * N2), 0, N1, N2, BN1, BN2, SYMMETRIC, BITS, PACK, FAST_DIV
                    )
                else:
                    zmax = tl.full((), -float("inf"), tl.float32)
                    zmin = tl.full((), float("inf"), tl.float32)
                    for j0 in range(0, BN2, BC):
                        z = _column_chunk(
                            x_ptr, p2_ptr, p1t, xrow, j0, N1, N2, BN1, BN2, BC, BC, HAS_P1, HAS_P2, SPLIT_Y, INTERPRET
                        )
                        rj = j0 + tl.arange(0, BC)
                        mj = (ra[:, None] < N1) & (rj[None, :] < N2)
                        zmax = tl.maximum(zmax, _tile_max(_real(z, mj, -float("inf"), SYMMETRIC)))
                        zmin = tl.minimum(zmin, _tile_min(_real(z, mj, float("inf"), SYMMETRIC)))
                    scale, zero = _scale_zero(zmax, zmin, clip_max, clip_min, inv_qmax, SYMMETRIC, BITS, RECIP)
                    for j0 in range(0, BN2, BC):  # recompute: cheaper than a round trip through memory
                        z = _column_chunk(
                            x_ptr, p2_ptr, p1t, xrow, j0, N1, N2, BN1, BN2, BC, BC, HAS_P1, HAS_P2, SPLIT_Y, INTERPRET
                        )
                        _quantize_store(
                            z, scale, zero, q_ptr, t64 * (N1 * N2), j0, N1, N2, BN1, BC, SYMMETRIC, BITS, PACK, FAST_DIV
                        )
                tl.store(scale_ptr + t64, scale)
                if not SYMMETRIC:
                    tl.store(zero_ptr + t64, zero)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _interpreting() -> bool:
    """Whether the kernel was built for the CPU interpreter (TRITON_INTERPRET=1 when it was imported)."""
    return triton is not None and type(_kron_quantize_kernel).__name__ == "InterpretedFunction"


_CONFIG_ALIASES = {"progs_per_sm": "PROGS_PER_SM", "block_t": "BLOCK_T"}
_SM_COUNT: dict[int, int] = {}
# With PDL (pdl.py), up to this many tokens the transform lets the kernel after it (the GEMM) launch right after its
# own wait; above, only as its programs exit. Launched early, a GEMM of about one wave of programs was placed
# unevenly on the SMs beside the running transform (two programs on some SMs, none on others): on an NVIDIA H200 the
# 14336 -> 4096 layer at 256 tokens took 126.8 us with the early launch, 74.5 us with the late one and 76.8 us without
# PDL (docs/kernels-pdl.md). FLATQUANT_PDL_EARLY_TOKENS (read at import) sets it; 0: always late.
PDL_EARLY_TOKENS = _envflags.number("FLATQUANT_PDL_EARLY_TOKENS", 64, int, 0, 1 << 31, "a token count")
SMALL_TOKENS = 64  # at or below: the latency path (one token per program, no token stacking)
# Register budget of the stacked path: BLOCK_T * BN1 * BN2 fp32 elements of X' per iteration
_MAX_STACK = 128 * 128
# Autotuning on CUDA (set False, or FLATQUANT_AUTOTUNE=0, for the fixed heuristic config)
AUTOTUNE = _envflags.switch("FLATQUANT_AUTOTUNE", True, "fixed configs", "autotuned")
# Tuning results kept on disk across processes (Triton's cache directory for the autotuned kernels); the
# benchmarks set FLATQUANT_AUTOTUNE_CACHE=0 to tune afresh
AUTOTUNE_CACHE = _envflags.switch("FLATQUANT_AUTOTUNE_CACHE", True, "tune afresh", "reuse results")


def autotune(configs, key, **kwargs):
    """``triton.autotune`` with its results cached on disk (``AUTOTUNE_CACHE``) where this Triton can, and
    launched through :class:`ChosenConfigLaunch` (no per-call dispatch of the autotuner once it has chosen)."""
    decorate = None
    if AUTOTUNE_CACHE:
        try:
            decorate = triton.autotune(configs, key, cache_results=True, **kwargs)
        except TypeError:  # a Triton before cache_results
            pass
    decorate = decorate or triton.autotune(configs, key, **kwargs)
    return lambda fn: ChosenConfigLaunch(decorate(fn))


class ChosenConfigLaunch:
    """An autotuned kernel whose launches skip the autotuner's per-call dispatch once it has chosen a config.

    ``Autotuner.run`` builds dicts of every argument and its key from them on each call, which on the host costs
    about as much as the launch itself (``benchmarks/host_profile.py``). Here the first call of each key goes
    through the autotuner (timing the candidates, or reading its disk cache) and its ``best_config`` is kept;
    later calls with the same key launch the JIT function with that config directly. The key is the
    autotuner's own (the values of its key arguments, the dtypes of the tensor arguments), so a call never
    takes a config tuned for another key; every candidate computes the same results anyway (tested), the
    choice only decides speed. Attributes not defined here are the autotuner's. Triton versions without the
    attributes used (``keys``, ``arg_names``, ``best_config``, ``fn``) always go through the autotuner.
    """

    def __init__(self, tuner):
        self.tuner = tuner
        self.chosen: dict[tuple, object] = {}
        try:
            names = list(tuner.arg_names)
            self._key_at = [names.index(k) for k in tuner.keys]
            self._names = names
            self._fn = tuner.fn
        except (AttributeError, ValueError):
            self._key_at = None

    def __getattr__(self, name):
        return getattr(self.tuner, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """The autotuner's key of a call: key argument values (positional or keyword), then tensor dtypes."""
        vals = tuple(args[i] if i < len(args) else kwargs[self._names[i]] for i in self._key_at)
        return vals + tuple(str(a.dtype) for a in (*args, *kwargs.values()) if hasattr(a, "dtype"))

    def run(self, grid, args: tuple, kwargs: dict):
        if self._key_at is None:
            return self.tuner[grid](*args, **kwargs)
        key = self.key(args, kwargs)
        config = self.chosen.get(key)
        if config is None:
            out = self.tuner[grid](*args, **kwargs)
            best = getattr(self.tuner, "best_config", None)
            if best is not None and best.pre_hook is None:
                self.chosen[key] = best
            return out
        self.tuner.best_config = config  # what the benchmarks report as the config of the last launch
        return self._fn[grid](*args, **kwargs, **config.all_kwargs())


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def pdl_early(n_tokens: int) -> bool:
    """Whether a PDL launch for ``n_tokens`` lets its successor launch right after its wait (PDL_EARLY_TOKENS)."""
    return n_tokens <= PDL_EARLY_TOKENS


def _token_bucket(n_tokens: int) -> int:
    """Autotune key for the token count: 0 = latency path (<= SMALL_TOKENS); 1, 2, 3 = throughput path up to
    512, up to 4096 and above (the same candidates, tuned apart: a config that wins at 8192 tokens, with
    ~60 tokens per program, need not win at 2048)."""
    if n_tokens <= SMALL_TOKENS:
        return 0
    return 1 if n_tokens <= 512 else 2 if n_tokens <= 4096 else 3


def _default_config(bn1: int, bn2: int, n_tokens: int) -> dict:
    """The fixed launch config (interpreter, FLATQUANT_AUTOTUNE=0): the previous H100 sweep's best one
    token per iteration config (4 warps up to 64x128 tiles, 8 above; 3 stages except 2 at 64x128;
    4 programs per SM)."""
    tile = bn1 * bn2
    return {
        "BLOCK_T": 1,
        "P1_FIRST": 0,
        "FAST_DIV": 0,
        "BC": bn2 if tile <= _MAX_TILE else 64,
        "PROGS_PER_SM": 4,
        "num_warps": 4 if tile <= 8192 else 8,
        "num_stages": 2 if tile == 8192 else 3,
        "maxnreg": None,  # a register cap per thread (None: the compiler's choice)
    }


def candidate_configs(bn1: int, bn2: int, bucket: int, p1_first: bool = True) -> list[dict]:
    """The launch configs the autotuner chooses among for a (BN1, BN2) tile and token bucket.

    Latency path (bucket 0): one token per program, 4 or 8 warps, both product orders, IEEE divisions or the
    reciprocal multiply (``FAST_DIV``). Throughput path:
    the fixed default; (P1^T X) P2 order (``P1_FIRST``, the split fp32 intermediate stays in registers);
    token stacking (BLOCK_T tokens per iteration, up to _MAX_STACK elements); fewer pipeline stages and
    programs per SM (less shared memory); below 128x128 tiles also one token per program with one stage, as the
    latency path; for the throughput path also the reciprocal-multiply codes
    (``FAST_DIV``, see ``_quotient``). p1_first: whether P1_FIRST changes anything for the call (fp32
    intermediate and both factors); when not, its configs are left out.
    """
    tile = bn1 * bn2
    default = _default_config(bn1, bn2, 0)
    orders = (0, 1) if p1_first else (0,)
    if bucket == 0:  # buckets 1-3 (throughput) share one candidate list
        # 4 warps spill a 128x128 fp32 tile (seen in the sm_90 build): 8 warps only from 128x128 up
        warps = (4, 8) if tile < 128 * 128 else (8,)
        # FAST_DIV too: one program per token quantizes the whole tile, its IEEE divisions serialised on one SM
        return [
            dict(default, num_stages=1, num_warps=w, P1_FIRST=o, FAST_DIV=f)
            for f in (0, 1)
            for o in orders
            for w in warps
        ]
    out = [default, dict(default, FAST_DIV=1)]  # IEEE divisions or the reciprocal multiply (_quotient)
    if tile > _MAX_TILE:  # column-chunked tiles: one token per iteration, product order fixed
        return out + [dict(default, num_warps=4, num_stages=2)]
    if p1_first:
        out.append(dict(default, P1_FIRST=1))
        if tile >= 128 * 128:
            out.append(dict(default, P1_FIRST=1, FAST_DIV=1))
            out.append(dict(default, P1_FIRST=1, num_stages=2, PROGS_PER_SM=2))
    if tile >= 128 * 128:
        # column chunks of 64: a quarter of the fp32 tile in registers and less shared memory, so that two
        # programs fit on an SM, at the price of building X' twice
        chunked = [dict(default, BC=64, num_stages=2, PROGS_PER_SM=2, num_warps=w) for w in (4, 8)]
        # or the whole tile with registers capped at 128 and one stage (96 KB): two programs per SM, spilling
        capped = [dict(default, P1_FIRST=1, num_stages=1, PROGS_PER_SM=2, maxnreg=128)] if p1_first else []
        return out + [dict(default, num_stages=2, PROGS_PER_SM=2)] + chunked + capped
    # one token per program with one pipeline stage (less shared memory, more programs resident), as the latency
    # path: forced in benchmarks/kron_tokens.py on an NVIDIA H200 it beat the candidates above at 384-512 tokens
    # (64x64 at 512: 8.8 against 10.4 us; 64x128 at 384: 13.2 against 16.7 us)
    out += [dict(default, num_stages=1, P1_FIRST=o) for o in orders]
    for bt in (2, 4, 8):
        if bt * tile <= _MAX_STACK:
            warps = 4 if bt * tile <= 4096 else 8
            pps = 4 if bt * tile <= 8192 else 2
            out.append(dict(default, BLOCK_T=bt, PROGS_PER_SM=pps, num_warps=warps, num_stages=2))
    if tile == 8192:
        out.append(dict(default, num_warps=8, num_stages=3))
    return out


_LAUNCH_KEYS = ("num_warps", "num_stages", "maxnreg")  # a config's compile options; the other keys are constexprs


def _as_triton_config(cfg: dict):
    meta = {k: v for k, v in cfg.items() if k not in _LAUNCH_KEYS}
    return triton.Config(meta, **{k: cfg[k] for k in _LAUNCH_KEYS})


def config_items(config) -> dict:
    """A triton.Config as the dict ``candidate_configs`` describes it in (constexprs and compile options)."""
    return {**config.kwargs, **{k: getattr(config, k, None) for k in _LAUNCH_KEYS}}


def _keep(configs, candidates: list[dict]) -> list:
    """The triton.Configs among ``configs`` that are in ``candidates`` (an autotuner's early prune)."""
    want = [tuple(sorted(c.items())) for c in candidates]
    return [c for c in configs if tuple(sorted(config_items(c).items())) in want] or configs[:1]


if triton is not None:
    # every candidate of every tile / bucket; early_config_prune keeps those of the call's tile and bucket
    _ALL_CONFIGS = {
        tuple(sorted(c.items())): c
        for bn1 in (16, 32, 64, 128, 256)
        for bn2 in (16, 32, 64, 128, 256)
        for bucket in (0, 1)
        for c in candidate_configs(bn1, bn2, bucket, True)
    }

    def _prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        p1_first = a["SPLIT_Y"] and a["HAS_P1"] and a["HAS_P2"]
        keep = candidate_configs(a["BN1"], a["BN2"], a["T_BUCKET"], p1_first)
        if a["NORM"]:  # the fused norm needs whole token rows in registers: no column chunks
            keep = [c for c in keep if c["BC"] == a["BN2"]]
        return _keep(configs, keep)

    def graph_bench(kernel_call, quantiles):
        """Candidates timed as CUDA-graph replays (as the W4A4 GEMM's decode configs): event timing counts the
        host's launch of each call, which is longer than a decode-size kernel (~8 us) and grows when the host
        is busy, so the choice would depend on the host rather than on the kernel."""
        import triton.testing

        return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)

    _TUNE = dict(
        configs=[_as_triton_config(c) for c in _ALL_CONFIGS.values()],
        key=["N1", "N2", "T_BUCKET", "HAS_P1", "HAS_P2", "SPLIT_Y", "SYMMETRIC", "PACK", "NORM"],
        prune_configs_by={"early_config_prune": _prune},
    )

    def graph_autotune(kernel, **tune):
        """``autotune`` of ``kernel`` with candidates timed by :func:`graph_bench` (on a Triton before the
        do_bench argument: its own CUDA-graph timing)."""
        try:
            return autotune(**tune, do_bench=graph_bench)(kernel)
        except TypeError:
            return autotune(**tune, use_cuda_graph=True)(kernel)

    _kron_quantize_tuned = graph_autotune(_kron_quantize_kernel, **_TUNE)


def fuses_norm(n1: int, n2: int) -> bool:
    """Whether the Triton kernel can apply an RMSNorm to tokens of n1 x n2 (whole padded rows in registers:
    every hidden size up to 8192, e.g. 4096 = 64 x 64 and 8192 = 64 x 128)."""
    return max(16, _next_pow2(n1)) * max(16, _next_pow2(n2)) < _MAX_TILE


def _use_autotuner(config: dict | None) -> bool:
    """Whether a launch goes through the autotuner (CUDA, no fixed config, AUTOTUNE on)."""
    return config is None and AUTOTUNE and not _interpreting()


def triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run on ``x``, or None when it can."""
    if triton is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR}); install triton>=3.0"
    if x.device.type != "cuda" and not _interpreting():
        return f"x is on {x.device}, the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1)"
    return None


def kron_quantize_triton(
    x: torch.Tensor,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
    clip_max: float | torch.Tensor = 1.0,
    clip_min: float | torch.Tensor = 1.0,
    bits: int = 4,
    symmetric: bool = True,
    *,
    pack: bool = False,
    intermediate: str = "fp32",
    config: dict | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    codes_dtype: torch.dtype = torch.int8,
) -> KronQuantized:
    """The fused Triton kernel (one launch); same contract as :func:`kron_quantize_reference`.

    config: a fixed launch config instead of the autotuner (keys BLOCK_T, PROGS_PER_SM, P1_FIRST, FAST_DIV, BC,
    num_warps, num_stages; missing keys from the default; see ``candidate_configs``), for tests and
    benchmarks. On CUDA without it the launch is autotuned among ``candidate_configs`` (``AUTOTUNE``).
    """
    reason = triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"kron_quantize triton kernel cannot run: {reason}")
    n1, n2 = _check_args(x, p1, p2, bits, symmetric, pack, intermediate, codes_dtype)
    _check_norm(x, norm)
    if norm is not None and not fuses_norm(n1, n2):
        raise ValueError(
            f"a fused norm needs token tiles of at most {_MAX_TILE - 1} padded elements, got {n1}x{n2} "
            "(run the norm separately)"
        )
    if pack and n2 % 2:
        raise ValueError(f"the Triton kernel packs pairs within a row and needs an even n2, got {n2=}")
    n = n1 * n2
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_tokens = x2.shape[0]
    p1c = p1.to(device=x.device, dtype=x.dtype).contiguous() if p1 is not None else x2
    p2c = p2.to(device=x.device, dtype=x.dtype).contiguous() if p2 is not None else x2
    codes = torch.empty((n_tokens, n // 2 if pack else n), device=x.device, dtype=torch.uint8 if pack else codes_dtype)
    scale = torch.empty(n_tokens, device=x.device, dtype=torch.float32)
    zero = None if symmetric else torch.empty(n_tokens, device=x.device, dtype=torch.float32)
    if n_tokens > 0:
        bn1, bn2 = max(16, _next_pow2(n1)), max(16, _next_pow2(n2))
        sms = _sm_count(x.device)
        bucket = _token_bucket(n_tokens)
        nw = norm[0].contiguous() if norm is not None else x2
        args = (x2, p1c, p2c, codes, scale, zero if zero is not None else scale, nw)
        args += (
            float(clip_max),
            float(clip_min),
            _INV_QMAX[(bits, symmetric)],
            float(norm[1]) if norm is not None else 0.0,
            n_tokens,
            x2.stride(0),
            bucket,
        )
        # the shape and variant constexprs go positionally (N1 ... INTERPRET), so that the autotuner's key and
        # its config pruning see them among the named arguments in every Triton version
        args += (n1, n2, bn1, bn2, p1 is not None, p2 is not None, intermediate == "fp32", symmetric, bits, pack)
        args += (_interpreting(), x.is_cuda, norm is not None)
        meta = {} if _interpreting() else {"enable_fp_fusion": False}  # keep the reference's roundings
        pdl = _pdl.pdl_on(x2)  # PDL_EARLY means nothing without PDL: one build then
        meta.update(_pdl.launch_options(pdl), PDL_EARLY=pdl and pdl_early(n_tokens))

        def grid(m):
            return (max(1, min(triton.cdiv(n_tokens, m["BLOCK_T"]), sms * m["PROGS_PER_SM"])),)

        from . import kron_pieces  # it builds on this module's helpers

        fixed = {_CONFIG_ALIASES.get(k, k): v for k, v in (config or {}).items()}
        pieces = fixed.pop("PIECES", None)
        if pieces is None:  # a fixed config without PIECES is the padded kernel's
            factors = (p1 is not None, p2 is not None)
            pieces = config is None and kron_pieces.uses_pieces(n1, n2, *factors, intermediate, norm)
        if pieces and (norm is not None or intermediate != "fp32"):  # the pieces kernel computes neither
            raise ValueError(
                "PIECES=1 runs with the fp32 intermediate and without a fused norm only, "
                f"got {intermediate=} and {'a' if norm is not None else 'no'} norm"
            )
        if pieces:
            shape = (n1, n2, symmetric, bits, pack)
            kron_pieces.launch_pieces(x2, p1c, p2c, codes, scale, zero, args[7:13], *shape, fixed, config, meta)
        elif _use_autotuner(config):
            _kron_quantize_tuned[grid](*args, **meta)
        else:
            cfg = _fixed_config(_default_config(bn1, bn2, n_tokens), fixed, "the padded kernel", "or PIECES=1")
            bc = cfg["BC"]
            if bc not in [2**k for k in range(4, 9)] or bc > bn2 or (bc == bn2 and bn1 * bn2 > _MAX_TILE):
                raise ValueError(
                    f"BC={bc} must be a power of two from 16 to the padded n2 ({bn2}), and below it for tiles over "
                    f"{_MAX_TILE} elements (a {bn1}x{bn2} tile here)"
                )
            if norm is not None and bc != bn2:
                raise ValueError(f"BC={bc}: a fused norm needs whole token rows (BC = the padded n2, {bn2})")
            if cfg["BLOCK_T"] > 1 and (bc != bn2 or cfg["BLOCK_T"] * bn1 * bn2 > _MAX_STACK):
                raise ValueError(
                    f"BLOCK_T={cfg['BLOCK_T']} stacks tokens only for tiles up to {_MAX_STACK} elements in all "
                    f"(BLOCK_T * BN1 * BN2), got a {bn1}x{bn2} tile"
                )
            _kron_quantize_kernel[grid({**cfg})](*args, **meta, **_compile_options(cfg))
    codes = codes.reshape(*lead, codes.shape[-1])
    if zero is not None and codes_dtype != torch.int8:
        zero = None  # e4m3 codes are centred (code - zero), read as scale * code
    return KronQuantized(codes, scale.reshape(lead), None if zero is None else zero.reshape(lead))


def _fixed_config(default: dict, fixed: dict, kernel: str, also: str) -> dict:
    """``default`` updated with a caller's ``fixed`` config, its keys and shared values checked (``kernel`` and
    ``also``, the other keys it takes, name them in the error)."""
    unknown = set(fixed) - set(default)
    if unknown:
        raise ValueError(f"{kernel} takes config keys {sorted(default)} ({also}), got {sorted(unknown)}")
    cfg = {**default, **fixed}
    _check_launch_values(cfg)
    return cfg


def _check_launch_values(cfg: dict) -> None:
    """The values of a fixed config that every transform kernel shares, checked before a launch."""
    pow2 = [1 << k for k in range(8)]
    allowed = {"BLOCK_T": pow2, "PROGS_PER_SM": range(1, 65), "num_warps": (1, 2, 4, 8, 16), "num_stages": range(1, 9)}
    allowed |= {"FAST_DIV": (0, 1, False, True), "P1_FIRST": (0, 1, False, True)}
    for key, values in allowed.items():
        if key in cfg and cfg[key] not in values:
            shown = f"{values.start}-{values.stop - 1}" if isinstance(values, range) else ", ".join(map(str, values))
            raise ValueError(f"config {key}={cfg[key]!r} is not one of {shown}")
    if cfg.get("maxnreg") is not None and not 24 <= cfg["maxnreg"] <= 255:
        raise ValueError(f"config maxnreg={cfg['maxnreg']!r} must be None or a register count from 24 to 255")


def _compile_options(cfg: dict) -> dict:
    """A fixed config as launch keywords: without the compile options under the interpreter, without an unset
    register cap."""
    drop = _LAUNCH_KEYS if _interpreting() else ("maxnreg",) if cfg.get("maxnreg") is None else ()
    return {k: v for k, v in cfg.items() if k not in drop}


def kron_quantize(
    x: torch.Tensor,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
    clip_max: float | torch.Tensor = 1.0,
    clip_min: float | torch.Tensor = 1.0,
    bits: int = 4,
    symmetric: bool = True,
    impl: str = "auto",
    *,
    pack: bool = False,
    intermediate: str = "fp32",
    norm: tuple[torch.Tensor, float] | None = None,
    codes_dtype: torch.dtype = torch.int8,
) -> KronQuantized:
    """Transform each token by P1 (x) P2 and quantize it per token (see the module doc for the contract).

    x: bf16/fp16 (..., n). p1: (n1, n1) or None (identity). p2: (n2, n2) or None (identity; the P_o
    variant: p1 = heads x heads factor, n2 = head_dim). clip_max / clip_min: clipping ratios in (0, 1]
    (sigmoid outputs). impl: "auto" runs the Triton kernel on CUDA tensors and the reference elsewhere;
    "triton" / "torch" force one and raise RuntimeError when the forced kernel cannot run.
    Returns KronQuantized(codes int8 (..., n) or uint8 (..., n // 2) if pack, scale fp32 (...,),
    zero fp32 (...,) or None).
    norm: ``(weight, eps)`` to RMSNorm each token first, as the decoder layer's norm module would (weight (n,)
    in x's dtype; the Triton kernel takes tiles below 128 x 128 padded elements, see :func:`fuses_norm`).
    codes_dtype: torch.int8 (default) or torch.float8_e4m3fn: the codes as e4m3 bytes (exact for bits <= 4), the
    operand the dense FP8 prefill path of the W4A4 GEMM reads without a conversion; asymmetric codes are then
    centred (code - zero) and the zero point is None, so that ``scale * code`` dequantizes either kind.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl=}")
    if impl == "auto":
        impl = "triton" if x.device.type == "cuda" and triton is not None else "torch"
    fn = kron_quantize_triton if impl == "triton" else kron_quantize_reference
    kw = dict(pack=pack, intermediate=intermediate, norm=norm, codes_dtype=codes_dtype)
    return fn(x, p1, p2, clip_max, clip_min, bits, symmetric, **kw)
