"""W4A4 GEMM for Hopper: 4-bit activation codes x packed 4-bit weights, scales in the epilogue.

Hopper has no INT4 tensor-core instruction, so the 4-bit integers are multiplied on INT8 (or FP8) tensor
cores, where they are exact, while the weights stay packed two per byte in memory.

Operands (the fused transform + quantize kernel produces the activation side):
    x_codes  int8  (M, K)       one 4-bit code per byte: [-8, 7] symmetric, or [0, 15] with ``x_zero``
    x_scale  fp32  (M,)         per-token scale
    x_zero   fp32  (M,)         optional per-token zero point (asymmetric activations)
    w_packed uint8 (N, ceil(K/2))  two's complement nibbles, low nibble = even k (see ``pack_int4``)
    w_scale  fp32  (N,)         per-output-channel scale
    w_group_scale fp32 (N, ceil(K/group_size))  optional per-group scales, multiplied with ``w_scale``
    bias     (N,)               optional
Result (M, N) in ``out_dtype``:
    out[m, n] = x_scale[m] * w_scale[n] * sum_g gs[n, g] * sum_{k in g} (x[m, k] - x_zero[m]) * w[n, k]
                + bias[n]

Kernel layout: the inner loop loads an int8 activation tile and a packed weight tile, unpacks the weight in
registers to int8 holding 16x the code (``p << 4`` and ``p & 0xF0``: two ALU ops per 8 weights with the inline
PTX path), and accumulates in int32 on the tensor cores; the accumulator is shifted right by 4 (exact) in the
epilogue. The zero point is applied as ``acc - x_zero[m] * colsum(w)[n]``. docs/kernels-gemm.md explains why
the INT8 rather than the FP8 tensor-core path is the default (faster at every measured shape, and its int32
accumulator is exact without care) and gives the measurements.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch

from .. import envflags as _envflags
from . import gemm_dense as _dense  # the dense FP8 path (it imports this module's unpack_int4 lazily)
from . import gemv_w4a4 as _gemv  # the CUDA-core decode path (1-4 tokens)
from . import pdl as _pdl
from .kron_quantize import autotune as _autotune  # triton.autotune, results cached on disk
from .w4a4_parts import prefetch_slice as _prefetch_slice
from .w4a4_parts import unpack_x16 as _unpack_x16

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "pack_int4",
    "unpack_int4",
    "w4a4_gemm",
    "w4a4_gemm_reference",
    "last_config",
    "resolve_path",
    "last_path",
    "SMALL_M",
    "MEDIUM_M",
    "FP8_MAX_BLOCK_K",
    "MAX_SPLIT_K",
]

SMALL_M = 16  # at or below this many tokens the weight-bandwidth-bound (decode) configs are used


def _medium_m_from_env() -> int:
    """FLATQUANT_MEDIUM_M (default 128): see MEDIUM_M; SMALL_M (16) turns the batched-decode set off."""
    return _envflags.number("FLATQUANT_MEDIUM_M", 128, int, SMALL_M, 1024, "an integer")


# above SMALL_M and up to this many tokens (batched decode, short prompts) the INT8 path chooses among tiles that
# also split K: the weights are still read once for all rows, and 64 x 128 tiles alone give N / 128 CTAs.
# FLATQUANT_MEDIUM_M=16 sends those token counts to the prefill tiles instead (for comparisons)
MEDIUM_M = _medium_m_from_env()

# FP8 path: largest K tile whose partial sum is exact in the FP8 MMA's ~14-bit accumulator (128 * 120 < 2^14)
FP8_MAX_BLOCK_K = 128
_X_DTYPES = (torch.int8, torch.float8_e4m3fn)  # activation codes: integers, exact in both
_QMIN, _QMAX = -8, 7


# ----------------------------------------------------------------------------------------------- packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes two per byte.

    Args:
        codes: integer tensor (N, K) with values in [-8, 7].
    Returns:
        uint8 (N, ceil(K/2)); byte j holds code 2j in its low nibble and code 2j+1 in its high nibble, each as
        a two's complement nibble; an odd K is padded with a zero code.
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TypeError(f"pack_int4 expects an integer tensor, got {codes.dtype=}")
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor (N, K), got {tuple(codes.shape)=}")
    if codes.numel() and (int(codes.min()) < _QMIN or int(codes.max()) > _QMAX):
        raise ValueError(f"codes must lie in [{_QMIN}, {_QMAX}], got [{int(codes.min())}, {int(codes.max())}]")
    n, k = codes.shape
    c = codes.to(torch.int16)
    if k % 2:
        c = torch.cat([c, c.new_zeros(n, 1)], dim=1)
    nib = c & 0xF  # (N, K2*2) two's complement nibbles
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inverse of ``pack_int4``: uint8 (N, ceil(K/2)) -> int8 (N, K) with values in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype=}")
    if packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"expected packed shape (N, {(k + 1) // 2}) for {k=}, got {tuple(packed.shape)}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4  # (N, K2) each
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]  # (N, K)
    return (both - ((both & 8) << 1)).to(torch.int8)  # sign-extend the nibble


# --------------------------------------------------------------------------------------------- reference
def _check_operands(x_codes, x_scale, w_packed, w_scale, bias, x_zero, w_group_scale, group_size, out_dtype):
    """Validate shapes and dtypes; return (M, N, K)."""
    if x_codes.dtype not in _X_DTYPES or x_codes.dim() != 2:
        raise TypeError(f"x_codes must be int8 or float8_e4m3fn (M, K), got {x_codes.dtype=} {tuple(x_codes.shape)=}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(f"w_packed must be uint8 (N, ceil(K/2)), got {w_packed.dtype=} {tuple(w_packed.shape)=}")
    m, k = x_codes.shape
    n = w_packed.shape[0]
    if w_packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"w_packed has {w_packed.shape[1]} bytes per row, K={k} needs {(k + 1) // 2}")
    if x_scale.shape != (m,):
        raise ValueError(f"x_scale must have shape ({m},), got {tuple(x_scale.shape)}")
    if w_scale.shape != (n,):
        raise ValueError(f"w_scale must have shape ({n},), got {tuple(w_scale.shape)}")
    if x_zero is not None and x_zero.shape != (m,):
        raise ValueError(f"x_zero must have shape ({m},), got {tuple(x_zero.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if (w_group_scale is None) != (group_size is None):
        raise ValueError("w_group_scale and group_size must be given together")
    if group_size is not None:
        if group_size <= 0 or group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {group_size=}")
        n_groups = -(-k // group_size)
        if w_group_scale.shape != (n, n_groups):
            raise ValueError(f"w_group_scale must have shape ({n}, {n_groups}), got {tuple(w_group_scale.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype=}")
    return m, n, k


def w4a4_gemm_reference(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_zero: torch.Tensor | None = None,
    w_group_scale: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch W4A4 GEMM with exact integer math (float64 holds every partial sum exactly).

    Shapes and dtypes as in the module docstring; returns (M, N) ``out_dtype``. residual: (M, N), added to
    the result after its rounding to ``out_dtype`` (``residual + out`` in ``out_dtype``, as a decoder layer
    adds its residual).
    """
    m, n, k = _check_operands(x_codes, x_scale, w_packed, w_scale, bias, x_zero, w_group_scale, group_size, out_dtype)
    _check_residual(residual, m, n, out_dtype)
    x = x_codes.to(torch.float64)  # (M, K)
    if x_zero is not None:
        x = x - x_zero.to(torch.float64)[:, None]
    w = unpack_int4(w_packed, k).to(torch.float64)  # (N, K)
    if group_size is None:
        acc = x @ w.T  # (M, N), integer-valued
    else:
        acc = x.new_zeros(m, n)
        for g, k0 in enumerate(range(0, k, group_size)):
            part = x[:, k0 : k0 + group_size] @ w[:, k0 : k0 + group_size].T  # (M, N)
            acc += part * w_group_scale[:, g].to(torch.float64)[None, :]
    out = acc * x_scale.to(torch.float64)[:, None] * w_scale.to(torch.float64)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float64)[None, :]
    return _add_residual(out.to(out_dtype), residual)


def _check_residual(residual: torch.Tensor | None, m: int, n: int, out_dtype: torch.dtype) -> None:
    if residual is None:
        return
    if residual.shape != (m, n) or residual.dtype != out_dtype or residual.stride(-1) != 1:
        raise ValueError(
            f"residual must be ({m}, {n}) {out_dtype} with unit stride over N, got {tuple(residual.shape)} "
            f"{residual.dtype} with strides {residual.stride()}"
        )


def _add_residual(out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return out if residual is None else residual + out


# ------------------------------------------------------------------------------------------------ triton
# mask the padding rows of a tile with fewer tokens than BLOCK_M (MASK_M); False clamps them onto row 0 (the
# kernel before 2026-11-29, kept for benchmarks/decode_tiles.py --rows clamped)
_MASK_ROWS = True


def _masks_rows(m: int, block_m: int) -> bool:
    """Whether a launch of ``m`` tokens on ``block_m``-row tiles masks its padding rows out of the activation
    loads (MASK_M): when the tokens fill less than one tile, or (decode sizes, up to MEDIUM_M) when the last tile
    is partial. Prefill launches keep unmasked loads (at most one partial tile among many)."""
    return m < block_m or (m % block_m != 0 and m <= MEDIUM_M)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if _HAS_TRITON:

    @triton.jit
    def _unpack_fp8(p, USE_ASM: tl.constexpr):
        """uint8 (R, C) packed nibbles -> two float8e4nv (R, C) tensors: the even and the odd codes."""
        if USE_ASM:
            # per 4 packed bytes (8 codes): u = code + 8 into fp16 lanes as 1024 + u (exponent trick), minus
            # 1032 gives the code exactly, then the packed fp16x2 -> e4m3x2 conversion; bytes reordered so
            # that output byte i holds the low (first result) or high (second) nibble of input byte i
            lo, hi = tl.inline_asm_elementwise(
                asm="""
                {
                .reg .b32 x, t0, t1, t2, t3, m;
                .reg .b16 c0, c1, c2, c3;
                xor.b32 x, $2, 0x88888888;
                and.b32 t0, x, 0x000F000F;
                shr.b32 t1, x, 4;
                and.b32 t1, t1, 0x000F000F;
                shr.b32 t2, x, 8;
                and.b32 t2, t2, 0x000F000F;
                shr.b32 t3, x, 12;
                and.b32 t3, t3, 0x000F000F;
                or.b32 t0, t0, 0x64006400;
                or.b32 t1, t1, 0x64006400;
                or.b32 t2, t2, 0x64006400;
                or.b32 t3, t3, 0x64006400;
                mov.b32 m, 0x64086408;
                sub.f16x2 t0, t0, m;
                sub.f16x2 t1, t1, m;
                sub.f16x2 t2, t2, m;
                sub.f16x2 t3, t3, m;
                cvt.rn.satfinite.e4m3x2.f16x2 c0, t0;
                cvt.rn.satfinite.e4m3x2.f16x2 c1, t1;
                cvt.rn.satfinite.e4m3x2.f16x2 c2, t2;
                cvt.rn.satfinite.e4m3x2.f16x2 c3, t3;
                mov.b32 t0, {c0, c2};
                mov.b32 t1, {c1, c3};
                prmt.b32 $0, t0, 0, 0x3120;
                prmt.b32 $1, t1, 0, 0x3120;
                }
                """,
                constraints="=r,=r,r",
                args=[p],
                dtype=(tl.int8, tl.int8),
                is_pure=True,
                pack=4,
            )
            lo = lo.to(tl.float8e4nv, bitcast=True)
            hi = hi.to(tl.float8e4nv, bitcast=True)
        else:
            lo16, hi16 = _unpack_x16(p, USE_ASM)
            lo = (lo16 >> 4).to(tl.float16).to(tl.float8e4nv)
            hi = (hi16 >> 4).to(tl.float16).to(tl.float8e4nv)
        return lo, hi

    # one binary for every token count (no specialisation on 1 or on divisibility by 16: fewer compiles)
    @triton.jit(do_not_specialize=["M", "M_KEY"])
    def _w4a4_gemm_kernel(
        # operands: activation codes (M, K) int8, packed weights (N, K2) uint8, output (M, N)
        x_ptr,
        w_ptr,
        out_ptr,
        # epilogue vectors: x_scale (M,), w_scale (N,), x_zero (M,), zero correction (N,), bias (N,)
        xs_ptr,
        ws_ptr,
        xz_ptr,
        zc_ptr,
        bias_ptr,
        # per-group weight scales (N, G) fp32
        gs_ptr,
        # split-K (decode, batched decode): int32 partial sums (SPLIT_K, M, N), one arrival counter per output tile
        part_ptr,
        cnt_ptr,
        # residual (M, N) in the output dtype, added after the output's rounding
        res_ptr,
        # sizes and strides (inner strides are 1)
        M,
        N,
        K,
        K2,
        M_KEY,  # power-of-two bucket of M: the autotune key, unused in the body
        group_size,
        stride_xm,
        stride_wn,
        stride_om,
        stride_gn,
        stride_rm,
        # PREFETCH: bytes of each weight row of this program's K slice to prefetch into L2 (a multiple of 16)
        pf_bytes,
        # features
        HAS_ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_GROUP: tl.constexpr,
        HAS_RES: tl.constexpr,
        USE_FP8: tl.constexpr,
        X_FP8: tl.constexpr,  # x holds float8_e4m3fn bytes (passed as int8)
        USE_ASM: tl.constexpr,
        EVEN_K: tl.constexpr,
        # padding rows masked out of the activation loads instead of clamped onto row 0 (_masks_rows: fewer tokens
        # than one tile, or a partial last tile at decode sizes); 16 lanes loading one address made a 1-token
        # GEMM up to 2x slower than a 16-token one on an NVIDIA H200
        MASK_M: tl.constexpr,
        # tiles
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr,  # > 1: program (tile, s) sums K slice s; the last to finish reduces
        # INT8 path: compute the transposed tile W @ X^T, so that the weights unpacked in registers feed the
        # tensor cores as the register operand (no shared-memory round trip) and few tokens are the short side
        SWAP_AB: tl.constexpr,
        # programmatic dependent launch (pdl.py); PREFETCH (with PDL, decode sizes): this program's packed weights
        # go to L2 while the previous kernel (the transform that makes x) still runs
        PDL: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
    ):
        # grouped launch order: GROUP_M row tiles share the weight tiles they read from L2
        pid = tl.program_id(0)
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv nor tl.zeros (jit functions): they break
        num_pid_n = (N + BLOCK_N - 1) // BLOCK_N  # the interpreter if triton was imported before it was set
        num_in_group = GROUP_M * num_pid_n
        first_m = (pid // num_in_group) * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % num_in_group) % group_rows)
        pid_n = (pid % num_in_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        offs_k = tl.arange(0, BLOCK_K)  # (BK,)
        offs_kh = tl.arange(0, BLOCK_K // 2)  # (BK/2,) packed bytes
        mask_m = offs_m < M
        mask_n = offs_n < N
        # clamp rows instead of masking them in the loop: out-of-range rows are never stored
        rows_x = tl.where(mask_m, offs_m, 0)
        rows_w = tl.where(mask_n, offs_n, 0)
        # K range of this program: all of K, or a BLOCK_K-aligned slice of it (split-K)
        k_lo = 0
        k_hi = K
        if SPLIT_K > 1:
            k_per = ((K + BLOCK_K * SPLIT_K - 1) // (BLOCK_K * SPLIT_K)) * BLOCK_K
            k_lo = tl.program_id(1) * k_per
            k_hi = min(K, k_lo + k_per)
        # row offsets in int64: M x K or M x N passes 2^31 at prefill sizes (64 x 2165 tokens x 22016 outputs)
        x_ptrs = x_ptr + rows_x.to(tl.int64)[:, None] * stride_xm + k_lo + offs_k[None, :]  # (BM, BK)
        w_ptrs = w_ptr + rows_w.to(tl.int64)[:, None] * stride_wn + k_lo // 2 + offs_kh[None, :]  # (BN, BK/2)
        if PREFETCH:  # weights are never written by a kernel: fetch them before waiting for the one that writes x
            _prefetch_slice(w_ptr + rows_w.to(tl.int64) * stride_wn + k_lo // 2, offs_n, (k_hi - k_lo) // 2, pf_bytes,
                            SPLIT_K)  # fmt: skip
        _pdl.wait_previous(PDL)

        if USE_FP8:
            acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
        elif SWAP_AB:
            acc_t = tl.full((BLOCK_N, BLOCK_M), 0, tl.int32)
        else:
            acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        if HAS_GROUP:
            accf = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)

        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                if MASK_M:
                    x = tl.load(x_ptrs, mask=mask_m[:, None], other=0)  # (BM, BK) int8
                else:
                    x = tl.load(x_ptrs)  # (BM, BK) int8
                p = tl.load(w_ptrs)  # (BN, BK/2) uint8
            else:
                if MASK_M:
                    x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0)
                else:
                    x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0)
                p = tl.load(w_ptrs, mask=offs_kh[None, :] < K2 - k0 // 2, other=0)
            if USE_FP8:
                lo, hi = _unpack_fp8(p, USE_ASM)  # (BN, BK/2) e4m3 each, the codes
            else:
                lo, hi = _unpack_x16(p, USE_ASM)  # (BN, BK/2) int8 each, 16x codes
            w = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)  # (BN, BK), k order restored
            if HAS_GROUP:
                part = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
                part = tl.dot(x, tl.trans(w), part, out_dtype=tl.int32)  # (BM, BN) 16x int sums
                gs = tl.load(gs_ptr + rows_w * stride_gn + k0 // group_size)  # (BN,)
                accf += (part >> 4).to(tl.float32) * gs[None, :]
            elif USE_FP8:
                # codes are exact in e4m3. Hopper's FP8 MMA does not accumulate in full fp32: it keeps about
                # 14 significant bits (Triton's sm_90 default max_num_imprecise_acc = 2^30 leaves it so for
                # the whole K loop), which rounded sums above 2^14 on the GPU (K = 14336). So each tile's
                # sum starts from zero (|sum| <= 128 * 120 < 2^14 with BLOCK_K <= FP8_MAX_BLOCK_K: exact)
                # and is added to the running sum here in fp32 (exact below 2^24). Triton does not fold
                # this add back into the dot for fp8 with a nonzero max_num_imprecise_acc.
                # int8 activation codes are converted here (slow); fp8 codes feed the tensor cores directly
                if X_FP8:
                    x = x.to(tl.float8e4nv, bitcast=True)  # the bytes are e4m3 already
                else:
                    x = x.to(tl.float16).to(tl.float8e4nv)
                acc += tl.dot(x, tl.trans(w), max_num_imprecise_acc=BLOCK_K)
            elif SWAP_AB:
                acc_t = tl.dot(w, tl.trans(x), acc_t, out_dtype=tl.int32)  # (BN, BM)
            else:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)  # (BM, BN)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 2

        if SWAP_AB and not USE_FP8 and not HAS_GROUP:
            acc = tl.trans(acc_t)  # (BM, BN)
        # integer sums -> fp32
        if SPLIT_K > 1:
            # publish this slice's int32 sums; the last program of the tile to arrive adds all slices (exact),
            # runs the epilogue and resets the tile's counter for the next launch; the others store nothing
            tile = offs_m[:, None] * N + offs_n[None, :]
            tl.store(part_ptr + tl.program_id(1) * M * N + tile, acc, mask=mask_m[:, None] & mask_n[None, :])
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            last = arrived == SPLIT_K - 1
            mask_m = mask_m & ((offs_m * 0 + arrived) == SPLIT_K - 1)  # (BM,): all rows, or none
            mask_mn = mask_m[:, None] & mask_n[None, :]
            acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
            for s in range(0, SPLIT_K):
                acc += tl.load(part_ptr + s * M * N + tile, mask=mask_mn, other=0, cache_modifier=".cg")
            tl.atomic_add(cnt_ptr + pid, tl.where(last, -SPLIT_K, 0))  # back to 0 once all have arrived
            res = (acc >> 4).to(tl.float32)
        elif HAS_GROUP:
            res = accf
        elif USE_FP8:
            res = acc
        else:
            res = (acc >> 4).to(tl.float32)  # exact: every product carried a factor 16
        # epilogue: zero-point correction, scales, bias, one rounding
        if HAS_ZERO:
            xz = tl.load(xz_ptr + offs_m, mask=mask_m, other=0.0)  # (BM,)
            zc = tl.load(zc_ptr + offs_n, mask=mask_n, other=0.0)  # (BN,)
            res = res - xz[:, None] * zc[None, :]
        xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)  # (BM,)
        ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)  # (BN,)
        res = res * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            res = res + b[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        y = res.to(out_ptr.dtype.element_ty)
        if HAS_RES:  # the decoder layer's residual + this output, each rounded as the unfused add would be
            r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
            r = tl.load(r_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            y = (r.to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, y, mask=mask_m[:, None] & mask_n[None, :])

    _kernel = triton.heuristics(
        {
            "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
            "MASK_M": lambda a: _MASK_ROWS and _masks_rows(a["M"], a["BLOCK_M"]),
        }
    )(_w4a4_gemm_kernel)

    def _cfg(bm, bn, bk, warps, stages, group_m=8, split_k=1, swap=False):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SPLIT_K": split_k, "SWAP_AB": swap},
            num_warps=warps,
            num_stages=stages,
        )

    # prefill (M > SMALL_M): compute-bound tiles on wgmma (BLOCK_M >= 64 per warpgroup). The first four are the
    # configs of the earlier H100 runs; then a deeper pipeline with a wider swizzle group, a longer K step, and
    # SWAP_AB tiles (the unpacked weights as the register operand of wgmma: no shared-memory round trip)
    LARGE_CONFIGS = [
        _cfg(128, 128, 128, 8, 4),
        _cfg(128, 256, 128, 8, 3),
        _cfg(256, 128, 128, 8, 3),
        _cfg(64, 128, 128, 4, 4),
        _cfg(128, 256, 128, 8, 4, 16),
        _cfg(128, 128, 256, 8, 3),
        _cfg(128, 128, 128, 8, 4, swap=True),
        _cfg(256, 128, 128, 8, 3, swap=True),
        _cfg(128, 256, 128, 8, 3, swap=True),
    ]
    # decode (M <= SMALL_M): one 16-row tile of tokens. Narrow weight tiles on mma.sync so that many CTAs
    # stream the packed weights; SWAP_AB tiles put the weights on the long side of wgmma (64/128 rows) and the
    # 16 tokens on the short one; split-K (SPLIT_K slices of K in separate CTAs, int32 partials summed exactly
    # by the last one) keeps more weight bytes in flight when N alone gives too few CTAs
    SMALL_CONFIGS = [
        _cfg(16, 32, 512, 4, 3, 1),
        _cfg(16, 32, 1024, 4, 3, 1),
        _cfg(16, 64, 256, 4, 4, 1),
        _cfg(16, 16, 1024, 4, 4, 1),
        _cfg(16, 32, 512, 4, 3, 1, 2),
        _cfg(16, 64, 512, 4, 3, 1, 4),
        _cfg(16, 32, 256, 4, 4, 1, 4),
        _cfg(16, 64, 256, 4, 4, 1, 1, True),
        _cfg(16, 128, 256, 8, 4, 1, 1, True),
        _cfg(16, 64, 512, 4, 3, 1, 2, True),
        _cfg(16, 128, 256, 8, 4, 1, 4, True),
        # split-K 8: for the smaller weights (4096 -> 4096 streamed by 64 N tiles at 43% of copy in the H100 runs)
        _cfg(16, 64, 256, 4, 4, 1, 8),
        _cfg(16, 128, 256, 8, 4, 1, 8, True),
    ]
    # batched decode (SMALL_M < M <= MEDIUM_M, INT8): the weights are read once for up to 128 token rows, so the
    # GEMM is still bound by the weight stream at these sizes, but 64 x 128 tiles give only N / 128 CTAs
    # (32 at N = 4096). The prefill tiles that suit these M, the same with K split in 2 or 4, narrower tiles
    # (more CTAs), and SWAP_AB tiles with the tokens on wgmma's short side.
    MEDIUM_CONFIGS = [
        _cfg(64, 128, 128, 4, 4),
        _cfg(128, 128, 128, 8, 4),
        _cfg(64, 64, 256, 4, 4),
        _cfg(32, 64, 256, 4, 4),
        _cfg(64, 128, 128, 4, 4, 8, 2),
        _cfg(64, 128, 128, 4, 4, 8, 4),
        _cfg(64, 64, 256, 4, 4, 8, 4),
        _cfg(32, 64, 256, 4, 4, 8, 4),
        _cfg(64, 128, 128, 4, 4, 8, 1, True),
        _cfg(64, 128, 256, 8, 3, 8, 2, True),
        _cfg(64, 128, 128, 4, 4, 8, 4, True),
        _cfg(128, 128, 128, 8, 3, 8, 2, True),
        # added after the first H200 run (not yet timed): all tokens in one row tile, each weight byte read once
        _cfg(128, 128, 128, 8, 3, 8, 4),
        _cfg(128, 64, 256, 4, 3, 8, 4, True),
    ]
    # the partial-sum workspace of an autotuned batched-decode launch (SPLIT_K x M x N int32) holds this many slices
    MEDIUM_MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in MEDIUM_CONFIGS)
    # decode tiles for the FP8 path: BLOCK_K <= FP8_MAX_BLOCK_K keeps every partial sum exact; no split-K
    SMALL_CONFIGS_FP8 = [
        _cfg(16, 32, 128, 4, 4, 1),
        _cfg(16, 64, 128, 4, 4, 1),
    ]
    _KEY = ["M_KEY", "N", "K", "HAS_ZERO", "HAS_BIAS", "HAS_RES", "USE_FP8", "X_FP8"]

    def _prune_residual(configs, named_args, **kwargs):
        """With the residual epilogue, output tiles of at most 128 x 128: the 128 x 256 and 256 x 128 tiles spill
        in the sm_90 build when the residual tile joins the accumulator (benchmarks/sm90_report.py)."""
        if not {**named_args, **kwargs}.get("HAS_RES"):
            return configs
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128] or configs[:1]

    _PRUNE = {"early_config_prune": _prune_residual}
    _large = _autotune(LARGE_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_kernel)
    # FP8 path: BLOCK_K <= FP8_MAX_BLOCK_K (exact tile sums); SWAP_AB is an INT8-path option; at most 128x128
    # output tiles (the per-tile fp32 sum doubles the accumulator registers: 128x256 spilled in the sm_90 build)
    LARGE_CONFIGS_FP8 = [
        c
        for c in LARGE_CONFIGS
        if c.kwargs["BLOCK_K"] <= FP8_MAX_BLOCK_K
        and not c.kwargs["SWAP_AB"]
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128
    ] + [_cfg(128, 64, 128, 4, 4)]
    _large_fp8 = _autotune(LARGE_CONFIGS_FP8, key=_KEY, prune_configs_by=_PRUNE)(_kernel)
    # decode kernels take a few microseconds: time the candidates under CUDA graphs, not launch overhead
    _small = _autotune(SMALL_CONFIGS, key=_KEY, use_cuda_graph=True)(_kernel)
    _medium = _autotune(MEDIUM_CONFIGS, key=_KEY, use_cuda_graph=True, prune_configs_by=_PRUNE)(_kernel)
    _small_fp8 = _autotune(SMALL_CONFIGS_FP8, key=_KEY, use_cuda_graph=True)(_kernel)

MAX_SPLIT_K = 8  # the largest SPLIT_K of any config; the partial-sum workspace is sized for it
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_k_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, reused across calls (each launch leaves them at 0).

    Split-K launches that share a device must not run concurrently on different streams.
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _tuned_set(m: int, fp8: bool):
    """The autotuned kernel that serves ``m`` tokens on the FP8 or the INT8 path."""
    if m <= SMALL_M:
        return _small_fp8 if fp8 else _small
    if m <= MEDIUM_M and not fp8:
        return _medium
    return _large_fp8 if fp8 else _large


def last_config(m: int, path: str = "auto") -> dict | None:
    """The tile config the autotuner chose for the last call on ``path`` ("auto"/"int8" or "fp8") in the set
    that serves ``m`` tokens (decode: m <= SMALL_M; batched decode: m <= MEDIUM_M on INT8; prefill), or None."""
    if not _HAS_TRITON:
        return None
    tuned = _tuned_set(m, path == "fp8")
    if DECODE_TUNE == "rotate" and id(tuned) in _ROTATE_LAST:
        return dict(_ROTATE_LAST[id(tuned)])
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return None
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _use_autotuner(group_size: int | None) -> bool:
    """Whether a launch without a fixed config is autotuned (compiled Triton; groups need a fixed BLOCK_K)."""
    return not _interpreting() and group_size is None


def _triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run on ``x`` here, or None if it can."""
    if not _HAS_TRITON:
        return "triton is not installed (pip install 'triton>=3.0')"
    if x.device.type != "cuda" and not _interpreting():
        return f"tensors are on {x.device.type}; the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1"
    return None


_COLSUMS: dict[int, tuple] = {}  # id(w_packed) -> (its state, column sums); an entry goes with its tensor


def tensor_version(t: torch.Tensor) -> int | None:
    """``t._version`` (bumped by every in-place write), or None for an inference tensor (made under
    ``torch.inference_mode``), which keeps no version counter: its contents count as fixed."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _tensor_state(t: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's current contents: storage, in-place writes, shape."""
    return None if t is None else (id(t), t.data_ptr(), tensor_version(t), tuple(t.shape))


def zero_correction(w_packed, k: int, group_size: int | None, w_group_scale) -> torch.Tensor:
    """fp32 (N,): sum_k w[n, k] (group-scaled when groups exist), the zero point's rank-1 correction,
    ``sum_k (x - z) w = sum_k x w - z * sum_k w``. Computed once per weight tensor (an unpacking pass over the whole
    weight: far more than a decode GEMM) and kept while the tensor lives; recomputed when the weights or group
    scales are written in place (except inference tensors, which have no version counter). Not kept when computed
    inside a CUDA graph capture."""
    key, state = id(w_packed), (_tensor_state(w_packed), k, group_size, _tensor_state(w_group_scale))
    hit = _COLSUMS.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    n = w_packed.shape[0]
    w = unpack_int4(w_packed, k).to(torch.float32)  # (N, K)
    if group_size is None:
        zc = w.sum(dim=1)
    else:
        pad = -k % group_size
        wg = torch.nn.functional.pad(w, (0, pad)).view(n, -1, group_size).sum(-1)  # (N, G)
        zc = (wg * w_group_scale.to(torch.float32)).sum(dim=1)
    zc = zc.contiguous()
    capturing = w_packed.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        if hit is None:
            weakref.finalize(w_packed, _COLSUMS.pop, key, None)
        _COLSUMS[key] = (state, zc)
    return zc


def _w4a4_gemm_triton(
    x_codes, x_scale, w_packed, w_scale, bias, x_zero, w_group_scale, group_size, out_dtype, path, config,
    residual=None,
):  # fmt: skip
    m, n, k = x_codes.shape[0], w_packed.shape[0], x_codes.shape[1]
    dev = x_codes.device
    x_fp8 = x_codes.dtype == torch.float8_e4m3fn
    x_codes = x_codes.contiguous()
    w_packed = w_packed.contiguous()
    out = torch.empty(m, n, device=dev, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    f32 = dict(device=dev, dtype=torch.float32)
    xs = x_scale.to(**f32).contiguous()
    ws = w_scale.to(**f32).contiguous()
    dummy = xs  # never read when the matching feature flag is off
    zc = dummy if x_zero is None else zero_correction(w_packed, k, group_size, w_group_scale)
    gs = w_group_scale.to(**f32).contiguous() if group_size is not None else dummy
    split_ok = m <= MEDIUM_M and group_size is None and path != "fp8"
    if split_ok and (config is None or config.get("SPLIT_K", 1) > 1):
        most = MAX_SPLIT_K if m <= SMALL_M else MEDIUM_MAX_SPLIT_K
        part = torch.empty((most if config is None else config["SPLIT_K"]) * m * n, device=dev, dtype=torch.int32)
        counters = _split_k_counters(dev, triton.cdiv(m, 16) * triton.cdiv(n, 16))
    else:
        part = counters = dummy
    pdl = _pdl.pdl_on(x_codes)
    args = (
        x_codes.view(torch.int8),  # fp8 codes travel as their bytes (masked loads fill int 0 = fp8 +0)
        w_packed,
        out,
        xs,
        ws,
        x_zero.to(**f32).contiguous() if x_zero is not None else dummy,
        zc,
        bias.contiguous() if bias is not None else dummy,
        gs,
        part,
        counters,
        residual if residual is not None else out,
        m,
        n,
        k,
        w_packed.shape[1],
        triton.next_power_of_2(m),
        group_size or 1,
        x_codes.stride(0),
        w_packed.stride(0),
        out.stride(0),
        gs.stride(0) if group_size is not None else 0,
        residual.stride(0) if residual is not None else 0,
        _prefetch_bytes(w_packed, m, dev, pdl),
    )
    flags = dict(
        HAS_ZERO=x_zero is not None,
        HAS_BIAS=bias is not None,
        HAS_GROUP=group_size is not None,
        HAS_RES=residual is not None,
        USE_FP8=path == "fp8" and group_size is None,
        X_FP8=x_fp8,
        USE_ASM=not _interpreting(),
        PREFETCH=pdl and args[-1] > 0,
        **_pdl.launch_options(pdl),
    )
    if config is None and not _use_autotuner(group_size):
        # no autotuning in the interpreter; groups need BLOCK_K to divide group_size
        bm = 16 if m <= SMALL_M else 64
        bk = 64 if group_size is None else max(32, min(128, group_size & -group_size))
        config = dict(BLOCK_M=bm, BLOCK_N=32 if _interpreting() else 64, BLOCK_K=bk, GROUP_M=8)
        if not _interpreting():
            config.update(num_warps=4, num_stages=3)
    if config is not None:
        config = {"SPLIT_K": 1, "SWAP_AB": False, **config}
        bm, bn, bk, sk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
        if flags["USE_FP8"] and bk > FP8_MAX_BLOCK_K:
            raise ValueError(f"the fp8 path needs BLOCK_K <= {FP8_MAX_BLOCK_K} for exact sums, got BLOCK_K={bk}")
        if group_size is not None and group_size % bk:
            raise ValueError(f"group_size={group_size} must be a multiple of BLOCK_K={bk} (and of 32)")
        if sk > 1 and not split_ok:
            raise ValueError(f"SPLIT_K={sk} needs the int8 path without group scales and M <= {MEDIUM_M}, got {m=}")
        if not 1 <= sk <= MAX_SPLIT_K:
            raise ValueError(f"SPLIT_K must be in [1, {MAX_SPLIT_K}], got {sk}")
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), sk)
        if _interpreting():
            config = {k_: v for k_, v in config.items() if k_ not in ("num_warps", "num_stages")}
        _kernel[grid](*args, **flags, **config)
    else:
        tuned = _tuned_set(m, flags["USE_FP8"])
        if DECODE_TUNE == "rotate" and m <= MEDIUM_M and (m <= SMALL_M or not flags["USE_FP8"]):
            kw = _rotate_choice(tuned, args, flags, m, n)
            grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])
            _kernel[grid](*args, **flags, **kw)
            return out

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

        tuned[grid](*args, **flags)
    return out


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "SWAP_AB", "num_warps", "num_stages")


def _check_config(config: dict) -> None:
    """A fixed tile config's keys and values, before the launch (a clear error instead of a KeyError or a compiler
    failure): BLOCK_M / BLOCK_N / BLOCK_K powers of two from 16 (BLOCK_K from 32: the packed pairs), GROUP_M >= 1,
    num_warps a power of two up to 16, num_stages >= 1."""
    missing = [k for k in _CONFIG_KEYS[:4] if k not in config]
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if missing or unknown:
        raise ValueError(f"a fixed config takes the keys {list(_CONFIG_KEYS)} (the first four required); "
                         f"missing {missing}, unknown {unknown}")  # fmt: skip
    for key, low in (("BLOCK_M", 16), ("BLOCK_N", 16), ("BLOCK_K", 32)):
        v = config[key]
        if not isinstance(v, int) or v < low or v & (v - 1):
            raise ValueError(f"{key}={v!r} must be a power of two >= {low}")
    if not isinstance(config["GROUP_M"], int) or config["GROUP_M"] < 1:
        raise ValueError(f"GROUP_M={config['GROUP_M']!r} must be an integer >= 1")
    if config.get("num_warps", 4) not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={config['num_warps']!r} must be 1, 2, 4, 8 or 16")
    if not isinstance(config.get("num_stages", 1), int) or config.get("num_stages", 1) < 1:
        raise ValueError(f"num_stages={config['num_stages']!r} must be an integer >= 1")


def _prefetch_fraction_from_env() -> float:
    """FLATQUANT_PREFETCH_L2 (default 0, off): see PREFETCH_L2_FRACTION."""
    return _envflags.number("FLATQUANT_PREFETCH_L2", 0.0, float, 0, 1, "a fraction of the L2 cache")


# decode (up to MEDIUM_M tokens) with PDL: at most this fraction of the L2 cache is filled with weights prefetched
# before the previous kernel ends (the rest of each weight row is read as usual); 0 = no prefetch, the default: on
# an NVIDIA H200 a LLaMA-2-7B decode step at batch 1 took 3.33 ms without it, 3.37 ms at 0.15 and 3.58 ms at 0.5
# (docs/kernels-pdl.md)
PREFETCH_L2_FRACTION = _prefetch_fraction_from_env()
_L2_BYTES: dict[int, int] = {}


def _prefetch_bytes(w_packed: torch.Tensor, m: int, dev: torch.device, pdl: bool) -> int:
    """Bytes of each packed weight row (over all of K) that a launch prefetches into L2 before it waits for the
    previous kernel (pdl.py): 0 for a launch without PDL (``pdl``), above MEDIUM_M tokens (compute-bound: the
    weights are reread from L2 anyway) or for rows not 16-byte aligned; else the whole row while all rows fit in
    PREFETCH_L2_FRACTION of the L2 cache, and the leading part of each row that fits when they do not."""
    if m > MEDIUM_M or PREFETCH_L2_FRACTION == 0 or not pdl:
        return 0
    if w_packed.data_ptr() % 16 or w_packed.stride(0) % 16:
        return 0
    n, k2 = w_packed.shape
    return min(k2, int(_l2_bytes(dev) * PREFETCH_L2_FRACTION) // max(n, 1)) // 16 * 16


def _l2_bytes(dev: torch.device) -> int:
    """The L2 cache size of a CUDA device (0 where the driver does not say), cached per device index."""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _L2_BYTES:
        _L2_BYTES[idx] = int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0))
    return _L2_BYTES[idx]


def _decode_tune_from_env() -> str:
    """FLATQUANT_DECODE_TUNE (default "graph"): see DECODE_TUNE."""
    return _envflags.choice("FLATQUANT_DECODE_TUNE", "graph", ("graph", "rotate"))


# How the decode and batched-decode tiles (up to MEDIUM_M tokens, bound by the weight stream) are chosen.
# "graph": Triton's autotuner, each candidate timed as CUDA-graph replays of the one call, whose weights (up to
# ~45 MB) then stay in the 50 MB L2. "rotate": each candidate timed as graph replays that cycle through copies of
# the weights together larger than three times the L2 (rotating_copies), as benchmarks/gemm.py and
# benchmarks/decode_tiles.py time them: from HBM, consecutive launches overlapping as a model's layers do
DECODE_TUNE = _decode_tune_from_env()
_ROTATE_CHOSEN: dict[tuple, dict] = {}  # tuning key -> launch config (tile sizes, num_warps, num_stages)
_ROTATE_LAST: dict[int, dict] = {}  # id of the tuned set -> config of its last rotate-tuned launch (last_config)


def rotating_copies(weight_bytes: int, l2_bytes: int) -> int:
    """How many copies of a weight to cycle through so that together they exceed three times the L2 (1..16)."""
    return max(1, min(16, -(-3 * l2_bytes // max(weight_bytes, 1))))


def time_rotating(launch, weights: list[torch.Tensor]) -> float:
    """Median microseconds of ``launch(w)`` per weight, from CUDA-graph replays that call it for each of
    ``weights`` in turn (compiled and run once before the capture)."""
    import triton.testing

    def run():
        for w in weights:
            launch(w)

    run()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(run, rep=20, quantiles=(0.5,))
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 1000.0 * ms / len(weights)


def _launch_kwargs(cfg) -> dict:
    """A triton.Config as the keyword arguments of one launch."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _rotate_choice(tuned, args: tuple, flags: dict, m: int, n: int) -> dict:
    """The config of ``tuned``'s set (tiles up to MEDIUM_M tokens) that runs this call fastest with the weights
    streamed from HBM (DECODE_TUNE "rotate"), timed once per key and remembered. Inside a CUDA-graph capture
    (nothing can be timed) an untuned key takes the set's first config, unremembered. Candidates that fail to
    compile or launch (e.g. out of shared memory) are skipped."""
    w = args[1]
    key = (id(tuned), triton.next_power_of_2(m), n, args[14], w.dtype, args[2].dtype, tuple(sorted(flags.items())))
    best = _ROTATE_CHOSEN.get(key)
    configs = _prune_residual(list(tuned.configs), {"HAS_RES": flags["HAS_RES"]})
    if best is None and w.is_cuda and torch.cuda.is_current_stream_capturing():
        return _launch_kwargs(configs[0])
    if best is None:
        copies = [w] + [torch.empty_like(w) for _ in range(rotating_copies(w.numel(), _l2_bytes(w.device)) - 1)]
        timed = []
        for i, cfg in enumerate(configs):
            kw = _launch_kwargs(cfg)
            grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])

            def launch(wc, grid=grid, kw=kw):
                _kernel[grid](args[0], wc, *args[2:], **flags, **kw)

            try:
                timed.append((time_rotating(launch, copies), i, kw))
            except Exception:  # noqa: BLE001 - a candidate this GPU cannot run is skipped, as the autotuner does
                continue
        if not timed:
            raise RuntimeError(f"no decode tile config of the W4A4 GEMM could run for M={m}, N={n}, K={args[14]}")
        best = _ROTATE_CHOSEN[key] = min(timed)[2]
    _ROTATE_LAST[id(tuned)] = best
    return best


_PATHS = ("auto", "int8", "fp8", "dense", "gemv")
_LAST_PATH: list[str] = []  # the path the last w4a4_gemm call on the GPU kernels took (benchmarks read it)


def resolve_path(path: str, group_size: int | None = None) -> str:
    """The tensor-core path the Triton kernel really takes for a ``path`` argument: "auto" is "int8" (faster
    than fp8 at every shape measured on H100, docs/kernels-gemm.md); group scales always run on "int8".
    (From ``gemm_dense.DENSE_M`` tokens on, ``w4a4_gemm(path="auto")`` takes the dense FP8 path instead where it
    can; :func:`last_path` says which path a call took.)"""
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path=}")
    if path in ("dense", "gemv"):
        return path
    return "int8" if path == "auto" or group_size is not None else path


def last_path() -> str | None:
    """The path ("int8", "fp8", "dense" or "gemv") the last non-reference ``w4a4_gemm`` call took, or None."""
    return _LAST_PATH[-1] if _LAST_PATH else None


def w4a4_gemm(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_zero: torch.Tensor | None = None,
    w_group_scale: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    impl: str = "auto",
    path: str = "auto",
    config: dict | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A4 GEMM dispatcher: (M, K) int8 codes x (N, ceil(K/2)) packed int4 -> (M, N) ``out_dtype``.

    Args:
        impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" (raises RuntimeError saying why
            when it cannot run) or "reference".
        path: "int8" or "fp8" (tensor-core path of the Triton kernel), "dense" (the weights unpacked to e4m3,
            then cuBLAS's FP8 GEMM: ``gemm_dense``; symmetric codes, no group scales), "gemv" (1-4 tokens on
            the CUDA cores with dp4a: ``gemv_w4a4``), or "auto" = "gemv" up to ``gemv_w4a4.GEMV_M`` tokens
            and "dense" from ``gemm_dense.DENSE_M`` tokens on where they can run, else "int8" (codes in the
            other dtype are converted, exactly). The INT8 path was faster than the FP8 one at every shape and M
            measured on an H100 (docs/kernels-gemm.md). Both give exact integer sums; the FP8 one promotes
            each K tile's sum to fp32 (the FP8 MMA accumulator keeps ~14 bits), exact while
            |sum| < 2^24 (K <= 139,810 for 4-bit codes) and only on configs with BLOCK_K <= FP8_MAX_BLOCK_K.
        config: fixed tile config (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M[, num_warps, num_stages]) instead of
            autotuning; for tests and benchmarks. With path="gemv": (BLOCK_N, BLOCK_KW[, SPLIT_K, num_warps,
            num_stages]), see ``gemv_w4a4``.
        residual: (M, N) ``out_dtype`` tensor added to the result after its rounding (``residual + out``
            rounded once more, as a decoder layer adds its residual): in the kernel's epilogue, so the layer
            needs no separate addition.
    Other arguments as in the module docstring.
    """
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl=}")
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path=}")
    _check_operands(x_codes, x_scale, w_packed, w_scale, bias, x_zero, w_group_scale, group_size, out_dtype)
    _check_residual(residual, x_codes.shape[0], w_packed.shape[0], out_dtype)
    if config is not None and path != "gemv":  # the caller's; the autotuner's candidates are valid by construction
        _check_config(config)
    reason = _triton_unavailable_reason(x_codes)
    if impl == "auto":
        impl = "triton" if reason is None and x_codes.device.type == "cuda" else "reference"
    if impl == "reference":
        return w4a4_gemm_reference(
            x_codes, x_scale, w_packed, w_scale, bias, x_zero, w_group_scale, group_size, out_dtype, residual
        )
    if reason is not None:
        raise RuntimeError(f"w4a4_gemm(impl='triton') cannot run: {reason}")
    if path == "dense":
        why = _dense.dense_unavailable_reason(x_codes, w_packed, bias, x_zero, w_group_scale, out_dtype)
        if why is not None:
            raise ValueError(f"w4a4_gemm(path='dense') cannot run: {why}")
    dense = path == "dense"
    if path == "auto" and config is None:  # a fixed config is the Triton kernel's
        dense = _dense.takes_dense(x_codes, w_packed, bias, x_zero, w_group_scale, out_dtype)
    if dense:
        _LAST_PATH[:] = ["dense"]
        return _dense.dense_gemm(x_codes, x_scale, w_packed, w_scale, bias, out_dtype, residual)
    gemv = path == "gemv"
    if gemv or (path == "auto" and config is None and x_codes.shape[0] <= _gemv.GEMV_M):
        # both paths left ("gemv", or "auto" -> "int8") take int8 codes: converted once, exactly (small integers)
        x_codes = x_codes if x_codes.dtype == torch.int8 else x_codes.to(torch.int8)
        if gemv:
            why = _gemv.gemv_unavailable_reason(x_codes, w_packed, w_group_scale)
            if why is not None:
                raise ValueError(f"w4a4_gemm(path='gemv') cannot run: {why}")
        else:
            gemv = _gemv.takes_gemv(x_codes, w_packed, w_group_scale)
        if gemv:
            _LAST_PATH[:] = ["gemv"]
            k = x_codes.shape[1]
            zc = None if x_zero is None else zero_correction(w_packed, k, None, None)
            pf = _prefetch_bytes(w_packed, x_codes.shape[0], x_codes.device, _pdl.pdl_on(x_codes))
            return _gemv.w4a4_gemv(
                x_codes, x_scale, w_packed, w_scale, bias, x_zero, zc, out_dtype, residual, config,
                functools.partial(_split_k_counters, x_codes.device), checked=True, pf_bytes=pf,
            )  # fmt: skip
    path = resolve_path(path, group_size)
    _LAST_PATH[:] = [path]
    if path == "int8" and x_codes.dtype != torch.int8:
        x_codes = x_codes.to(torch.int8)  # exact: the codes are small integers
    return _w4a4_gemm_triton(
        x_codes, x_scale, w_packed, w_scale, bias, x_zero, w_group_scale, group_size, out_dtype, path, config,
        residual,
    )  # fmt: skip
