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
- Asymmetric: ``xmax = clip_max * max(X')``, ``xmin = clip_min * min(X')``,
  ``scale = max((xmax - xmin) / (2^bits - 1), 1e-8)``, ``zero = round(-xmin / scale)``,
  ``codes = clamp(round(X' / scale) + zero, 0, 2^bits - 1)``.
- ``round`` is round-half-to-even (``torch.round``); the kernel uses IEEE division and an exact
  round-half-to-even, so codes differ from the reference only where ``X' / scale`` lies within a few
  fp32 ulps of a half-integer (the two compute X' with different fp32 summation orders).
- Output: int8 codes (..., n), one code per byte (the W4A4 GEMM operand layout), or with ``pack=True``
  uint8 (..., n // 2) holding two 4-bit codes per byte, low nibble = even index (two's complement nibble
  when symmetric); fp32 scale (...,); fp32 zero point (...,) when asymmetric, else None.
- ``p2=None`` means identity over n2 (the P_o transform: heads x heads factor, identity over head_dim,
  ``n2 = n // n1``); ``p1=None`` likewise means identity over n1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
_MAX_TILE = 128 * 128  # larger token tiles are built in column chunks, twice (max, then codes)


class KronQuantized(NamedTuple):
    """Result of :func:`kron_quantize`.

    codes: int8 (..., n), or uint8 (..., n // 2) when packed. scale: fp32 (...,).
    zero: fp32 (...,) when asymmetric, else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _check_args(x, p1, p2, bits, symmetric, pack, intermediate) -> tuple[int, int]:
    """Validate the arguments; return (n1, n2)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype=}")
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
) -> KronQuantized:
    """Plain PyTorch reference of :func:`kron_quantize` (any device; same contract, see module doc).

    x: bf16/fp16 (..., n); p1: (n1, n1) or None; p2: (n2, n2) or None; n1 * n2 = n.
    X' is computed in float64 from the x.dtype-rounded operands and rounded once to fp32, i.e. the
    fp32-accumulated result without summation-order error; the quantizer then runs in fp32.
    """
    n1, n2 = _check_args(x, p1, p2, bits, symmetric, pack, intermediate)
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
        xmax, xmin = cmax * zmax, cmin * zmin
        scale = ((xmax - xmin) / qmax).clamp_min(_EPS)
        zero = torch.round(-xmin / scale)
        codes = torch.clamp(torch.round(z / scale[:, None]) + zero[:, None], 0, qmax)
        zero = zero.reshape(lead)
    codes = codes.to(torch.int8).reshape(*lead, n1 * n2)
    if pack:
        codes = _pack_int4(codes)
    return KronQuantized(codes, scale.reshape(lead), zero)


if triton is not None:

    @triton.jit
    def _rint(v):
        """Round half to even, exactly, for fp32 (adding 2^23 leaves no fractional bits)."""
        a = tl.abs(v)
        r = (a + 8388608.0) - 8388608.0
        r = tl.where(a < 8388608.0, r, a)
        return tl.where(v < 0, -r, r)

    # Only builtins and our own @triton.jit helpers are used: triton's jit-defined library functions
    # (tl.max, tl.zeros, tl.cdiv, ...) cannot run in the interpreter when triton was imported before
    # TRITON_INTERPRET=1 was set, as happens when another module imports it first.

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
    def _left_factor(y, p1t, dt: tl.constexpr, HAS_P1: tl.constexpr, SPLIT_Y: tl.constexpr, INTERPRET):
        """P1^T @ y, fp32 (BN1, cols); y fp32 holds X @ P2 (or X itself)."""
        if HAS_P1:
            acc = tl.full(y.shape, 0.0, tl.float32)
            if SPLIT_Y:
                # y = hi + lo to ~2^-17 relative: two exact 16-bit products instead of one fp32 one
                y_hi = _round_to(y, dt, INTERPRET)
                y_lo = _round_to(y - y_hi.to(tl.float32), dt, INTERPRET)
                acc = _dot(p1t, y_lo, acc, INTERPRET)
                return _dot(p1t, y_hi, acc, INTERPRET)
            return _dot(p1t, _round_to(y, dt, INTERPRET), acc, INTERPRET)  # exact when y == x
        return y

    @triton.jit
    def _scale_zero(zmax, zmin, clip_max, clip_min, SYMMETRIC: tl.constexpr, BITS: tl.constexpr):
        """Per-token scale and zero point (0 when symmetric), fp32 scalars, rounded as the reference."""
        if SYMMETRIC:
            absmax = tl.maximum(clip_max * zmax, -(clip_min * zmin))
            scale = tl.maximum(tl.math.div_rn(absmax, 2.0 ** (BITS - 1) - 1), 1e-8)
            zero = scale * 0.0
        else:
            xmin = clip_min * zmin
            scale = tl.maximum(tl.math.div_rn(clip_max * zmax - xmin, 2.0**BITS - 1), 1e-8)
            zero = _rint(tl.math.div_rn(-xmin, scale))
        return scale, zero

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
    ):
        """Quantize z (BN1, BC) fp32, columns col0 .. col0 + BC of the token's (N1, N2) view; store codes.

        row0: int64 offset of the token's codes, counted in codes (the packed byte offset is row0 // 2).
        """
        if SYMMETRIC:
            v = tl.math.div_rn(z, scale)
            q = _rint(tl.minimum(tl.maximum(v, -(2.0 ** (BITS - 1))), 2.0 ** (BITS - 1) - 1))
        else:
            q = _rint(tl.math.div_rn(z, scale)) + zero
            q = tl.minimum(tl.maximum(q, 0.0), 2.0**BITS - 1)
        qi = q.to(tl.int32)
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
            tl.store(q_ptr + row0 + ra[:, None] * N2 + rb[None, :], qi.to(tl.int8), mask=m)

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

    @triton.jit
    def _kron_quantize_kernel(
        # pointers: x (T, n) row stride stride_xt; p1 (N1, N1); p2 (N2, N2); q codes; scale/zero (T,)
        x_ptr,
        p1_ptr,
        p2_ptr,
        q_ptr,
        scale_ptr,
        zero_ptr,
        # runtime scalars
        clip_max,
        clip_min,
        n_tokens,
        stride_xt,
        # shapes: the token tile is (BN1, BN2) = (N1, N2) padded to powers of two >= 16
        N1: tl.constexpr,
        N2: tl.constexpr,
        BN1: tl.constexpr,
        BN2: tl.constexpr,
        # BC < BN2: tile too large for registers; X' is built BC columns at a time, twice (max, then codes)
        BC: tl.constexpr,
        # variants
        HAS_P1: tl.constexpr,
        HAS_P2: tl.constexpr,
        SPLIT_Y: tl.constexpr,  # keep X @ P2 in fp32 precision as hi + lo 16-bit halves
        SYMMETRIC: tl.constexpr,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        INTERPRET: tl.constexpr,  # CPU interpreter workarounds
    ):
        # Persistent: each program loads the factors once and loops over tokens pid, pid + G, ...
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        ra = tl.arange(0, BN1)
        rb = tl.arange(0, BN2)
        mask = (ra[:, None] < N1) & (rb[None, :] < N2)  # (BN1, BN2)
        dt = x_ptr.dtype.element_ty
        # p1t[i, a] = P1[a, i]; zero padding keeps padded rows of X' at 0
        m1 = (ra[:, None] < N1) & (ra[None, :] < N1)
        p1t = tl.load(p1_ptr + ra[None, :] * N1 + ra[:, None], mask=m1 & HAS_P1, other=0.0)  # (BN1, BN1)
        if BC == BN2 and HAS_P2:
            m2 = (rb[:, None] < N2) & (rb[None, :] < N2)
            p2 = tl.load(p2_ptr + rb[:, None] * N2 + rb[None, :], mask=m2, other=0.0)  # (BN2, BN2)

        for i in range(0, (n_tokens - pid + nprog - 1) // nprog):
            t64 = (pid + i * nprog).to(tl.int64)  # token index; int64 offsets for huge T * n
            xrow = t64 * stride_xt
            if BC == BN2:
                x = tl.load(x_ptr + xrow + ra[:, None] * N2 + rb[None, :], mask=mask, other=0.0)
                if HAS_P2:
                    y = _dot(x, p2, tl.full((BN1, BN2), 0.0, tl.float32), INTERPRET)  # (BN1, BN2)
                else:
                    y = x.to(tl.float32)
                z = _left_factor(y, p1t, dt, HAS_P1, SPLIT_Y, INTERPRET)  # (BN1, BN2) fp32
                zmax = _tile_max(tl.where(mask, z, -float("inf")))
                zmin = _tile_min(tl.where(mask, z, float("inf")))
                scale, zero = _scale_zero(zmax, zmin, clip_max, clip_min, SYMMETRIC, BITS)
                _quantize_store(z, scale, zero, q_ptr, t64 * (N1 * N2), 0, N1, N2, BN1, BN2, SYMMETRIC, BITS, PACK)
            else:
                zmax = tl.full((), -float("inf"), tl.float32)
                zmin = tl.full((), float("inf"), tl.float32)
                for j0 in range(0, BN2, BC):
                    z = _column_chunk(
                        x_ptr, p2_ptr, p1t, xrow, j0, N1, N2, BN1, BN2, BC, BC, HAS_P1, HAS_P2, SPLIT_Y, INTERPRET
                    )
                    rj = j0 + tl.arange(0, BC)
                    mj = (ra[:, None] < N1) & (rj[None, :] < N2)
                    zmax = tl.maximum(zmax, _tile_max(tl.where(mj, z, -float("inf"))))
                    zmin = tl.minimum(zmin, _tile_min(tl.where(mj, z, float("inf"))))
                scale, zero = _scale_zero(zmax, zmin, clip_max, clip_min, SYMMETRIC, BITS)
                for j0 in range(0, BN2, BC):  # recompute: cheaper than a round trip through memory
                    z = _column_chunk(
                        x_ptr, p2_ptr, p1t, xrow, j0, N1, N2, BN1, BN2, BC, BC, HAS_P1, HAS_P2, SPLIT_Y, INTERPRET
                    )
                    _quantize_store(z, scale, zero, q_ptr, t64 * (N1 * N2), j0, N1, N2, BN1, BC, SYMMETRIC, BITS, PACK)
            tl.store(scale_ptr + t64, scale)
            if not SYMMETRIC:
                tl.store(zero_ptr + t64, zero)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _interpreting() -> bool:
    """Whether the kernel was built for the CPU interpreter (TRITON_INTERPRET=1 when it was imported)."""
    return triton is not None and type(_kron_quantize_kernel).__name__ == "InterpretedFunction"


_SM_COUNT: dict[int, int] = {}


def _default_config(bn1: int, bn2: int, n_tokens: int, device: torch.device) -> dict:
    """Launch heuristics from a sweep on H100 at 8192 tokens (benchmarks/kron_quantize.py --sweep):
    4 warps up to 64x128 tiles, 8 above; 3 pipeline stages except at 64x128; 4 programs per SM."""
    tile = bn1 * bn2
    num_warps = 4 if tile <= 8192 else 8
    num_stages = 2 if tile == 8192 else 3
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        sms = _SM_COUNT[idx]
    else:
        sms = 4
    return {"num_warps": num_warps, "num_stages": num_stages, "progs_per_sm": 4, "sms": sms}


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
) -> KronQuantized:
    """The fused Triton kernel (one launch); same contract as :func:`kron_quantize_reference`.

    config: optional launch overrides (num_warps, num_stages, progs_per_sm), for benchmarking.
    """
    reason = triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"kron_quantize triton kernel cannot run: {reason}")
    n1, n2 = _check_args(x, p1, p2, bits, symmetric, pack, intermediate)
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
    codes = torch.empty((n_tokens, n // 2 if pack else n), device=x.device, dtype=torch.uint8 if pack else torch.int8)
    scale = torch.empty(n_tokens, device=x.device, dtype=torch.float32)
    zero = None if symmetric else torch.empty(n_tokens, device=x.device, dtype=torch.float32)
    if n_tokens > 0:
        bn1, bn2 = max(16, _next_pow2(n1)), max(16, _next_pow2(n2))
        bc = bn2 if bn1 * bn2 <= _MAX_TILE else 64
        cfg = _default_config(bn1, bn2, n_tokens, x.device)
        cfg.update(config or {})
        grid = (min(n_tokens, cfg["sms"] * cfg["progs_per_sm"]),)
        extra = {} if _interpreting() else {"enable_fp_fusion": False}  # keep the reference's roundings
        _kron_quantize_kernel[grid](
            x2,
            p1c,
            p2c,
            codes,
            scale,
            zero if zero is not None else scale,
            float(clip_max),
            float(clip_min),
            n_tokens,
            x2.stride(0),
            N1=n1,
            N2=n2,
            BN1=bn1,
            BN2=bn2,
            BC=bc,
            HAS_P1=p1 is not None,
            HAS_P2=p2 is not None,
            SPLIT_Y=intermediate == "fp32",
            SYMMETRIC=symmetric,
            BITS=bits,
            PACK=pack,
            INTERPRET=_interpreting(),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            **extra,
        )
    codes = codes.reshape(*lead, codes.shape[-1])
    return KronQuantized(codes, scale.reshape(lead), None if zero is None else zero.reshape(lead))


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
) -> KronQuantized:
    """Transform each token by P1 (x) P2 and quantize it per token (see the module doc for the contract).

    x: bf16/fp16 (..., n). p1: (n1, n1) or None (identity). p2: (n2, n2) or None (identity; the P_o
    variant: p1 = heads x heads factor, n2 = head_dim). clip_max / clip_min: clipping ratios in (0, 1]
    (sigmoid outputs). impl: "auto" runs the Triton kernel on CUDA tensors and the reference elsewhere;
    "triton" / "torch" force one and raise RuntimeError when the forced kernel cannot run.
    Returns KronQuantized(codes int8 (..., n) or uint8 (..., n // 2) if pack, scale fp32 (...,),
    zero fp32 (...,) or None).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl=}")
    if impl == "auto":
        impl = "triton" if x.device.type == "cuda" and triton is not None else "torch"
    fn = kron_quantize_triton if impl == "triton" else kron_quantize_reference
    return fn(x, p1, p2, clip_max, clip_min, bits, symmetric, pack=pack, intermediate=intermediate)
