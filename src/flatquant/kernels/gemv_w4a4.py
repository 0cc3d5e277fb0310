"""Decode path of the W4A4 GEMM for one to four tokens: packed int4 weights x int8 codes on CUDA cores (``dp4a``).

With one token a GEMM is a matrix-vector product bound by the weight stream: every packed weight byte is read
once and used for two multiply-adds. The tensor-core kernel (``gemm_w4a4``) pads the token to a 16-row tile and
spends its registers and shared memory on a tile shape that the stream does not need; this kernel reads the
weights as 32-bit words (eight codes each, 16 bytes per load) straight into registers and multiplies them on the
CUDA cores with ``dp4a`` (four 8-bit products summed into an int32 in one instruction):

- a weight word w holds the codes k..k+7 of its row, code k + 2i in the low and k + 2i + 1 in the high nibble of
  byte i (``pack_int4``). ``(w << 4) & 0xF0F0F0F0`` gives the four even codes times 16 as signed bytes,
  ``w & 0xF0F0F0F0`` the four odd ones (three ALU instructions per eight codes, no sign extension needed);
- the token's eight codes k..k+7 (one 64-bit load) are split into the even and the odd bytes with two ``prmt``
  (once per program and K tile, shared by all its weight rows);
- two ``dp4a.s32.s32`` per word and token accumulate 16x the exact integer sum; the epilogue shifts it right by
  4 (exact), then applies the zero point, the scales, the bias and the residual as the tensor-core kernel does,
  with the same roundings (one to the output dtype, one more for the residual).

Each program streams ``BLOCK_N`` weight rows over its K slice (``SPLIT_K`` > 1 splits K over programs that publish
exact int32 partial sums; the last to arrive adds them, as the tensor-core kernel's split-K does) in steps of
``BLOCK_KW`` words. The first weight tile is loaded before the wait for the previous kernel (PDL): the weights are
never written by a kernel, so their stream starts while the transform that makes the codes still runs; each later
step is loaded one step ahead (two with ``AHEAD`` = 2: more bytes in flight for the programs of long rows). The
autotuner times each candidate right after a transform of the same tokens, as the runtime launches it
(``FLATQUANT_GEMV_TUNE``). Where the slice is not a whole number of steps, or with a long head (``BLOCK_KW0`` >
``BLOCK_KW``: up to 512 words of each row, and the first step, read before the wait), the first tile is a head that
takes the remainder, so that every step after it is whole: no step needs a mask along K (per-element masks cost the
16-byte loads; K = 11008 is 1376 words, not a multiple of 128).
Under ``TRITON_INTERPRET=1`` (CPU tests) the inline PTX is replaced by the same integer arithmetic in Triton.

Requirements (``gemv_unavailable_reason``): int8 codes, K a multiple of 8, no group scales, the codes' rows
8-byte aligned and the weights' rows 4-byte aligned, at most ``MAX_M`` tokens. docs/kernels-gemm.md has the
measurements.
"""

from __future__ import annotations

import os

import torch

from .. import envflags as _envflags
from . import pdl as _pdl
from .kron_quantize import autotune as _autotune  # triton.autotune, results cached on disk
from .w4a4_parts import prefetch_slice as _prefetch_slice
from .w4a4_parts import unpack_x16 as _unpack_x16

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

__all__ = ["GEMV_M", "MAX_M", "gemv_unavailable_reason", "takes_gemv", "w4a4_gemv", "last_gemv_config"]

MAX_M = 4  # tokens one program multiplies with each weight word it loads (one accumulator per token)


def _gemv_m_from_env() -> int:
    """FLATQUANT_GEMV_M (default 2; 0 turns the CUDA-core decode path off)."""
    return _envflags.number("FLATQUANT_GEMV_M", 2, int, 0, MAX_M, f"an integer from 0 to {MAX_M} (0 = off)")


# up to this many tokens, w4a4_gemm(path="auto") takes this kernel instead of the tensor-core decode tiles: on an
# NVIDIA H200 it was faster at every LLaMA-7B/8B shape at 1 and 2 tokens (1.1-1.6x at 1) and not at 4
# (docs/kernels-gemm.md)
GEMV_M = _gemv_m_from_env()


def gemv_unavailable_reason(x_codes, w_packed, w_group_scale, m_max: int = MAX_M) -> str | None:
    """Why the CUDA-core decode kernel cannot multiply these operands, or None if it can."""
    m, k = x_codes.shape
    if x_codes.dtype != torch.int8:
        return f"it takes int8 codes, got {x_codes.dtype}"
    if w_group_scale is not None:
        return "it has no group scales"
    if m > m_max:
        return f"it takes at most {m_max} tokens, got {m}"
    if k % 8:
        return f"K must be a multiple of 8 (one 32-bit weight word), got K={k}"
    if x_codes.stride(1) != 1 or x_codes.stride(0) % 8 or x_codes.data_ptr() % 8:
        return "the codes' rows must be contiguous and 8-byte aligned"
    if w_packed.stride(1) != 1 or w_packed.stride(0) % 4 or w_packed.data_ptr() % 4:
        return "the packed weight rows must be contiguous and 4-byte aligned"
    return None


def takes_gemv(x_codes, w_packed, w_group_scale) -> bool:
    """Whether ``w4a4_gemm(path="auto")`` runs these operands on this kernel: at most GEMV_M tokens on a GPU, and
    nothing in ``gemv_unavailable_reason``."""
    if GEMV_M == 0 or not x_codes.is_cuda or x_codes.shape[0] > GEMV_M or triton is None:
        return False
    return gemv_unavailable_reason(x_codes, w_packed, w_group_scale, GEMV_M) is None


if triton is not None:

    @triton.jit
    def _split_x(x64, USE_ASM: tl.constexpr):
        """int64 words of eight int8 codes -> (even, odd): int32 words of the codes 0, 2, 4, 6 and 1, 3, 5, 7."""
        if USE_ASM:
            xe, xo = tl.inline_asm_elementwise(
                asm="""
                {
                .reg .b32 a, b;
                mov.b64 {a, b}, $2;
                prmt.b32 $0, a, b, 0x6420;
                prmt.b32 $1, a, b, 0x7531;
                }
                """,
                constraints="=r,=r,l",
                args=[x64],
                dtype=(tl.int32, tl.int32),
                is_pure=True,
                pack=1,
            )
        else:  # interpreter: the same bytes gathered with shifts
            xe = x64 & 0
            xo = x64 & 0
            for i in tl.static_range(4):
                xe |= ((x64 >> (16 * i)) & 0xFF) << (8 * i)
                xo |= ((x64 >> (16 * i + 8)) & 0xFF) << (8 * i)
            xe = xe.to(tl.int32)
            xo = xo.to(tl.int32)
        return xe, xo

    @triton.jit
    def _dot8(acc, lo, hi, xe, xo, USE_ASM: tl.constexpr):
        """acc + the sum of the four byte products of (lo, xe) and of (hi, xo), bytes as signed integers."""
        if USE_ASM:
            return tl.inline_asm_elementwise(
                asm="""
                {
                .reg .s32 t;
                dp4a.s32.s32 t, $2, $4, $1;
                dp4a.s32.s32 $0, $3, $5, t;
                }
                """,
                constraints="=r,r,r,r,r,r",
                args=[acc, lo, hi, xe, xo],
                dtype=tl.int32,
                is_pure=True,
                pack=1,
            )
        else:
            for i in tl.static_range(4):  # byte i of each word, sign-extended by the arithmetic shift
                acc += ((lo << (24 - 8 * i)) >> 24) * ((xe << (24 - 8 * i)) >> 24)
                acc += ((hi << (24 - 8 * i)) >> 24) * ((xo << (24 - 8 * i)) >> 24)
            return acc

    @triton.jit
    def _whole(flag, offs, SCALAR: tl.constexpr):
        """A load mask that is ``flag`` for a whole tile: the scalar itself when compiled (it keeps the 16-byte
        vector loads), a tensor shaped like ``offs`` in the interpreter (which takes no scalar masks)."""
        if SCALAR:
            return flag
        else:
            return (offs * 0 + flag.to(tl.int32)) != 0

    @triton.jit
    def _token(t: tl.constexpr, M, offs, SCALAR: tl.constexpr):
        """The load mask of token t's code words: whether t < M (as ``_whole``)."""
        if SCALAR:
            return t < M
        else:
            return offs * 0 + t < M

    @triton.jit
    def _epilogue(
        acc, m, M, offs_n, mask_n, out_ptr, xs_ptr, ws_ptr, xz_ptr, zc_ptr, bias_ptr, res_ptr, stride_om,
        stride_rm, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    ):  # fmt: skip
        """Token m's (BLOCK_N,) sums of 16x the products -> its output row: the tensor-core kernel's epilogue."""
        mask = mask_n & (offs_n * 0 + m < M)
        res = (acc >> 4).to(tl.float32)  # exact: every product carried a factor 16
        if HAS_ZERO:
            xz = tl.load(xz_ptr + m)
            zc = tl.load(zc_ptr + offs_n, mask=mask_n, other=0.0)
            res = res - xz * zc
        xs = tl.load(xs_ptr + m)
        ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
        res = res * xs * ws
        if HAS_BIAS:
            res = res + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = res.to(out_ptr.dtype.element_ty)
        if HAS_RES:
            r = tl.load(res_ptr + m * stride_rm + offs_n, mask=mask, other=0.0)
            y = (r.to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m * stride_om + offs_n, y, mask=mask)

    @triton.jit
    def _publish(acc, m, M, offs_n, mask_n, part_ptr, N):
        """Store token m's int32 partial sums of this program's K slice (split-K)."""
        tl.store(part_ptr + tl.program_id(1) * M * N + m * N + offs_n, acc, mask=mask_n & (offs_n * 0 + m < M))

    @triton.jit
    def _gather(m, M, offs_n, mask_n, part_ptr, N, SPLIT_K: tl.constexpr):
        """Token m's exact sums over all K slices (split-K, the last program to arrive)."""
        mask = mask_n & (offs_n * 0 + m < M)
        total = tl.load(part_ptr + m * N + offs_n, mask=mask, other=0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT_K):
            total += tl.load(part_ptr + s * M * N + m * N + offs_n, mask=mask, other=0, cache_modifier=".cg")
        return total

    @triton.jit
    def _dot_tokens(a0, a1, a2, a3, lo, hi, x_ptrs, kmask, offs, M, stride_xm, BLOCK_M: tl.constexpr,
                    USE_ASM: tl.constexpr):  # fmt: skip
        """The accumulators of tokens 0..BLOCK_M-1 plus their products with one weight tile (``lo``, ``hi``): each
        token's code words at ``x_ptrs`` (token 0's, ``kmask`` the words to read), none past token M - 1."""
        x = tl.load(x_ptrs, mask=kmask, other=0)
        xe, xo = _split_x(x, USE_ASM)
        a0 = _dot8(a0, lo, hi, xe[None, :], xo[None, :], USE_ASM)
        if BLOCK_M > 1:
            x = tl.load(x_ptrs + stride_xm, mask=kmask & _token(1, M, offs, USE_ASM), other=0)
            xe, xo = _split_x(x, USE_ASM)
            a1 = _dot8(a1, lo, hi, xe[None, :], xo[None, :], USE_ASM)
        if BLOCK_M > 2:
            x = tl.load(x_ptrs + 2 * stride_xm, mask=kmask & _token(2, M, offs, USE_ASM), other=0)
            xe, xo = _split_x(x, USE_ASM)
            a2 = _dot8(a2, lo, hi, xe[None, :], xo[None, :], USE_ASM)
            x = tl.load(x_ptrs + 3 * stride_xm, mask=kmask & _token(3, M, offs, USE_ASM), other=0)
            xe, xo = _split_x(x, USE_ASM)
            a3 = _dot8(a3, lo, hi, xe[None, :], xo[None, :], USE_ASM)
        return a0, a1, a2, a3

    @triton.jit(do_not_specialize=["M", "M_KEY"])
    def _w4a4_gemv_kernel(
        x_ptr,  # int64 (M, K / 8): eight int8 codes per word
        w_ptr,  # int32 (N, K / 8): eight packed codes per word
        out_ptr,
        xs_ptr,
        ws_ptr,
        xz_ptr,
        zc_ptr,
        bias_ptr,
        part_ptr,  # split-K: int32 (SPLIT_K, M, N)
        cnt_ptr,  # split-K: one zeroed int32 arrival counter per program along N
        res_ptr,
        M,
        N,
        KW,  # words per row (K / 8)
        M_KEY,  # power-of-two bucket of M: the autotune key, unused in the body
        stride_xm,  # in int64 words
        stride_wn,  # in int32 words
        stride_om,
        stride_rm,
        pf_bytes,  # bytes of each weight row (over all of K) to prefetch into L2 before the wait (PREFETCH)
        HAS_ZERO: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        USE_ASM: tl.constexpr,
        FULL_HEAD: tl.constexpr,  # every K slice starts with a whole BLOCK_KW0 head, then whole steps (heuristic)
        ALIGN: tl.constexpr,  # 4 when every head length is a multiple of 4 words (16-byte loads after it), else 1
        BLOCK_M: tl.constexpr,  # 1, 2 or 4 accumulators (tokens at or past M are masked)
        BLOCK_N: tl.constexpr,
        BLOCK_KW: tl.constexpr,  # words (8 codes each) per row and step
        BLOCK_KW0: tl.constexpr,  # words per row of the head: read before the wait, a multiple of BLOCK_KW
        SPLIT_K: tl.constexpr,
        PDL: tl.constexpr = False,
        AHEAD: tl.constexpr = 1,  # steps of weights loaded ahead of their use (1 or 2)
        PREFETCH: tl.constexpr = False,  # with PDL: prefetch the weights into L2 while the kernel before runs
    ):
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.where(mask_n, offs_n, 0)  # clamped: rows past N are never stored
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # (BN, 1)
        offs_kw = tl.arange(0, BLOCK_KW)
        offs_h = tl.arange(0, BLOCK_KW0)
        kw_lo = 0
        kw_hi = KW
        if SPLIT_K > 1:
            kw_per = ((KW + BLOCK_KW * SPLIT_K - 1) // (BLOCK_KW * SPLIT_K)) * BLOCK_KW
            kw_lo = tl.program_id(1) * kw_per
            kw_hi = min(KW, kw_lo + kw_per)
        w_ptrs = w_rows + kw_lo + offs_kw[None, :]  # (BN, BKW)
        if FULL_HEAD and BLOCK_KW0 == BLOCK_KW:
            # whole steps from kw_lo, no head: the first step is read before the wait (the weights do not depend on
            # the previous kernel), each later one a step ahead of its use
            kw_start = kw_lo
            w = tl.load(w_ptrs, mask=_whole(kw_lo < kw_hi, offs_kw, USE_ASM), other=0)
            if AHEAD > 1:
                w1 = tl.load(w_ptrs + BLOCK_KW, mask=_whole(kw_lo + BLOCK_KW < kw_hi, offs_kw, USE_ASM), other=0)
            if PREFETCH and USE_ASM:  # (the interpreter has no L2 prefetch)
                _prefetch_slice(w_ptr + rows.to(tl.int64) * stride_wn + kw_lo, rows, (kw_hi - kw_lo) * 4, pf_bytes,
                                SPLIT_K)  # fmt: skip
            _pdl.wait_previous(PDL)
            acc0 = tl.full((BLOCK_N, BLOCK_KW), 0, tl.int32)
            acc1, acc2, acc3 = acc0, acc0, acc0
            t0 = tl.full((BLOCK_N,), 0, tl.int32)  # (no head)
            t1, t2, t3 = t0, t0, t0
        else:
            # the slice = a head of at most BLOCK_KW0 words, read before the wait, then whole BLOCK_KW steps: the
            # head takes the remainder (and the whole slice when it is short), so that no step needs a mask along K
            h_ptrs = w_rows + kw_lo + offs_h[None, :]  # (BN, BKW0)
            if FULL_HEAD:
                head = BLOCK_KW0
                w_head = tl.load(h_ptrs)
            else:
                span = tl.maximum(kw_hi - kw_lo, 0)
                head = min(span, BLOCK_KW0 - (BLOCK_KW - span % BLOCK_KW) % BLOCK_KW)
                if ALIGN > 1:
                    head = tl.multiple_of(head, ALIGN)
                w_head = tl.load(h_ptrs, mask=offs_h[None, :] < head, other=0)
            kw_start = kw_lo + head
            w_ptrs += head
            if BLOCK_KW0 > BLOCK_KW:  # and the first step
                w = tl.load(w_ptrs, mask=_whole(kw_start < kw_hi, offs_kw, USE_ASM), other=0)
            if PREFETCH and USE_ASM:  # (the interpreter has no L2 prefetch)
                _prefetch_slice(w_ptr + rows.to(tl.int64) * stride_wn + kw_lo, rows, (kw_hi - kw_lo) * 4, pf_bytes,
                                SPLIT_K)  # fmt: skip
            _pdl.wait_previous(PDL)
            if BLOCK_KW0 == BLOCK_KW:  # a step ahead (before the wait: two steps' registers)
                w = tl.load(w_ptrs, mask=_whole(kw_start < kw_hi, offs_kw, USE_ASM), other=0)
            if AHEAD > 1:
                w1 = tl.load(w_ptrs + BLOCK_KW, mask=_whole(kw_start + BLOCK_KW < kw_hi, offs_kw, USE_ASM), other=0)
            zero_h = tl.full((BLOCK_N, BLOCK_KW0), 0, tl.int32)
            lo_h, hi_h = _unpack_x16(w_head, USE_ASM)
            if FULL_HEAD:
                hmask = _whole(kw_lo < kw_hi, offs_h, USE_ASM)
            else:
                hmask = offs_h < head
            h0, h1, h2, h3 = _dot_tokens(zero_h, zero_h, zero_h, zero_h, lo_h, hi_h, x_ptr + kw_lo + offs_h, hmask,
                                         offs_h, M, stride_xm, BLOCK_M, USE_ASM)  # fmt: skip
            if BLOCK_KW0 == BLOCK_KW:  # the head's products seed the step accumulators
                acc0, acc1, acc2, acc3 = h0, h1, h2, h3
                t0 = tl.full((BLOCK_N,), 0, tl.int32)
                t1, t2, t3 = t0, t0, t0
            else:  # (BN,) each token's sums over the head, reduced at once to free its registers
                t0, t1, t2, t3 = tl.sum(h0, axis=1), tl.sum(h1, axis=1), tl.sum(h2, axis=1), tl.sum(h3, axis=1)
                acc0 = tl.full((BLOCK_N, BLOCK_KW), 0, tl.int32)
                acc1, acc2, acc3 = acc0, acc0, acc0
        x_ptrs = x_ptr + kw_start + offs_kw  # (BKW,) token 0's words
        full = offs_kw < BLOCK_KW  # all true: inside the loop every step is whole
        for kw0 in range(kw_start, kw_hi, BLOCK_KW):
            w_ptrs += BLOCK_KW  # the step AHEAD steps on, loaded that far ahead of its use
            ahead = (AHEAD - 1) * BLOCK_KW
            w_next = tl.load(w_ptrs + ahead, mask=_whole(kw0 + BLOCK_KW + ahead < kw_hi, offs_kw, USE_ASM), other=0)
            lo, hi = _unpack_x16(w, USE_ASM)
            acc0, acc1, acc2, acc3 = _dot_tokens(acc0, acc1, acc2, acc3, lo, hi, x_ptrs, full, offs_kw, M, stride_xm,
                                                 BLOCK_M, USE_ASM)  # fmt: skip
            x_ptrs += BLOCK_KW
            if AHEAD > 1:
                w = w1
                w1 = w_next
            else:
                w = w_next

        s0 = tl.sum(acc0, axis=1) + t0  # (BN,)
        s1 = tl.sum(acc1, axis=1) + t1
        s2 = tl.sum(acc2, axis=1) + t2
        s3 = tl.sum(acc3, axis=1) + t3
        if SPLIT_K > 1:
            # publish this slice; the last program of the N tile to arrive adds all slices (exact int32), runs
            # the epilogue and returns the counter to zero for the next launch; the others store nothing
            _publish(s0, 0, M, offs_n, mask_n, part_ptr, N)
            if BLOCK_M > 1:
                _publish(s1, 1, M, offs_n, mask_n, part_ptr, N)
            if BLOCK_M > 2:
                _publish(s2, 2, M, offs_n, mask_n, part_ptr, N)
                _publish(s3, 3, M, offs_n, mask_n, part_ptr, N)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            last = arrived == SPLIT_K - 1
            mask_n = mask_n & ((offs_n * 0 + arrived) == SPLIT_K - 1)  # all columns, or none
            s0 = _gather(0, M, offs_n, mask_n, part_ptr, N, SPLIT_K)
            if BLOCK_M > 1:
                s1 = _gather(1, M, offs_n, mask_n, part_ptr, N, SPLIT_K)
            if BLOCK_M > 2:
                s2 = _gather(2, M, offs_n, mask_n, part_ptr, N, SPLIT_K)
                s3 = _gather(3, M, offs_n, mask_n, part_ptr, N, SPLIT_K)
            tl.atomic_add(cnt_ptr + pid_n, tl.where(last, -SPLIT_K, 0))
        _epilogue(s0, 0, M, offs_n, mask_n, out_ptr, xs_ptr, ws_ptr, xz_ptr, zc_ptr, bias_ptr, res_ptr, stride_om,
                  stride_rm, HAS_ZERO, HAS_BIAS, HAS_RES)  # fmt: skip
        if BLOCK_M > 1:
            _epilogue(s1, 1, M, offs_n, mask_n, out_ptr, xs_ptr, ws_ptr, xz_ptr, zc_ptr, bias_ptr, res_ptr,
                      stride_om, stride_rm, HAS_ZERO, HAS_BIAS, HAS_RES)  # fmt: skip
        if BLOCK_M > 2:
            _epilogue(s2, 2, M, offs_n, mask_n, out_ptr, xs_ptr, ws_ptr, xz_ptr, zc_ptr, bias_ptr, res_ptr,
                      stride_om, stride_rm, HAS_ZERO, HAS_BIAS, HAS_RES)  # fmt: skip
            _epilogue(s3, 3, M, offs_n, mask_n, out_ptr, xs_ptr, ws_ptr, xz_ptr, zc_ptr, bias_ptr, res_ptr,
                      stride_om, stride_rm, HAS_ZERO, HAS_BIAS, HAS_RES)  # fmt: skip

    _kernel = triton.heuristics(
        {
            "FULL_HEAD": lambda a: (
                a["KW"] % (a["BLOCK_KW"] * a["SPLIT_K"]) == 0 and a["KW"] // a["SPLIT_K"] >= a["BLOCK_KW0"]
            ),
            "ALIGN": lambda a: 4 if a["KW"] % 4 == 0 and a["BLOCK_KW"] % 4 == 0 else 1,
            "BLOCK_M": lambda a: 1 if a["M"] <= 1 else (2 if a["M"] <= 2 else 4),
        }
    )(_w4a4_gemv_kernel)

    def _cfg(bn, bkw, warps, split_k=1, stages=1, head=None, ahead=1):
        return triton.Config(
            {"BLOCK_N": bn, "BLOCK_KW": bkw, "BLOCK_KW0": head or bkw, "SPLIT_K": split_k, "AHEAD": ahead},
            num_warps=warps,
            num_stages=stages,
        )

    # candidates: rows per program x words per row and step (64 words = 512 codes = 256 bytes per row), warps,
    # K split over programs (more weight bytes in flight when N / BLOCK_N alone gives few programs)
    # (8 to 32 words of weights per thread and step: each thread's share of the activation words, loaded and split
    # once per step, serves all its rows)
    CONFIGS = [
        _cfg(8, 64, 2),
        _cfg(16, 64, 4),
        _cfg(16, 128, 4),
        _cfg(32, 64, 4),
        _cfg(32, 128, 8),
        _cfg(64, 64, 8),
        _cfg(8, 128, 4),
        _cfg(16, 32, 2),
        _cfg(32, 64, 2),
        _cfg(64, 64, 4),
        _cfg(32, 128, 4),
        _cfg(16, 64, 4, 2),
        _cfg(16, 128, 4, 2),
        _cfg(32, 64, 4, 2),
        _cfg(32, 64, 2, 2),
        _cfg(64, 64, 4, 2),
        _cfg(16, 64, 4, 4),
        _cfg(32, 64, 8, 4),
        _cfg(8, 64, 2, 4),
        _cfg(32, 64, 2, 4),
    ]
    # timed on an NVIDIA H200 (2026-11-30) and dropped: 256-word steps (16 x 256 with 8 warps, alone or split in 2;
    # 8 x 256 split in 2), 16 x 128 split in 4, 8 x 128 split in 4 (never chosen at one token); 32 x 128 split in 2
    # or 4 and 16 x 128 split in 2 (never chosen; with them in the set the graph-timed tuning picked a slower tile at
    # 14336 -> 4096, 12.0 against 10.4 us); 64 x 128 with 8 warps (spills in the sm_90 build). The picks: 8 x 128
    # (4 warps) for N = 4096, 16-32 x 128 for wider N
    # long heads: each program reads 256-512 words of each of its rows before the wait, i.e. while the kernel before
    # it (the layer's transform) still runs, and has more weight bytes in flight at its start. Timed on an NVIDIA
    # H200 (2026-11-30): chosen at two tokens (4096 -> 4096: 4.1 against 4.6 us without them, same job) and now and
    # then at one; 8 x 128 with a 256-word head and 8 x 64 (2 warps) with a 256-word head were never chosen, dropped
    HEAD_CONFIGS = [
        _cfg(8, 128, 4, head=512),
        _cfg(16, 128, 4, head=256),
        _cfg(16, 128, 8, head=512),
        _cfg(32, 128, 8, head=256),
    ]
    if _envflags.switch("FLATQUANT_GEMV_HEAD", True, "off", "on"):
        CONFIGS += HEAD_CONFIGS
    # two steps of weights in flight per program instead of one, for the N = 4096 GEMMs with long rows (8-16 rows per
    # program, 4-8 KB a step: each program's bytes in flight limited their stream). Timed on an NVIDIA H200
    # (2026-11-30, weights from HBM): 16 x 128 with a 512-word head, 8 warps, two steps ahead took 14336 -> 4096 from
    # 10.4 to 9.0 us, 11008 -> 4096 from 8.1 to 7.0, 4096 -> 4096 from 3.6 to 3.2; FLATQUANT_GEMV_AHEAD=0 drops them
    AHEAD_CONFIGS = [
        _cfg(8, 128, 4, ahead=2),
        _cfg(16, 128, 4, ahead=2),
        _cfg(8, 128, 4, head=512, ahead=2),
        _cfg(16, 128, 8, head=512, ahead=2),
    ]
    if _envflags.switch("FLATQUANT_GEMV_AHEAD", True, "off", "on"):
        CONFIGS += AHEAD_CONFIGS
    _MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONFIGS)  # the most N tiles an autotuned launch can have
    _KEY = ["M_KEY", "N", "KW", "HAS_ZERO", "HAS_BIAS", "HAS_RES"]

    def _prune(configs, named_args, **kwargs):
        """At most 64 accumulated words per thread (weight words per thread x tokens, in the steps and in the
        head): the 32-word tiles spill with four tokens in the sm_90 build (benchmarks/sm90_report.py --gemv 4)."""
        m = {**named_args, **kwargs}["M"]
        bm = 1 if m <= 1 else (2 if m <= 2 else 4)
        keep = [c for c in configs if _words_per_thread(c) * bm <= 64]
        return keep or configs[:1]

    def _words_per_thread(c) -> int:
        """Weight words a thread holds of the larger of a step and the head."""
        return c.kwargs["BLOCK_N"] * max(c.kwargs["BLOCK_KW"], c.kwargs["BLOCK_KW0"]) // (32 * c.num_warps)

    _PRUNE = {"early_config_prune": _prune}

    class _AfterTransform:
        """The autotuner's timing of a candidate (``do_bench``): CUDA-graph replays of the launch right after a
        transform + quantize launch of the same tokens (``kron_quantize``, the factor pair of K), as the packed
        runtime runs every decode GEMM. Under PDL the GEMM's weight loads before its wait overlap the transform,
        which a timing of the GEMM alone does not see: on an NVIDIA H200 the tile fastest alone was up to 13%
        slower after the transform (docs/kernels-gemm.md). ``FLATQUANT_GEMV_TUNE=alone`` times the GEMM alone."""

        def __init__(self):
            self.tuner = None  # the Autotuner whose ``nargs`` hold the call being tuned (set once it exists)
            self.prologues: dict[tuple, object] = {}

        def prologue(self, m: int, k: int, device: torch.device):
            """A launch of the transform of m tokens of k channels, compiled and tuned here (not in the graph)."""
            key = (m, k, device)
            if key not in self.prologues:
                from ..transforms import kron_factors
                from .kron_quantize import kron_quantize

                n1, n2 = kron_factors(k)
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                p1, p2 = (torch.eye(n, device=device, dtype=torch.bfloat16) for n in (n1, n2))

                def launch():
                    kron_quantize(x, p1, p2, 1.0, 1.0)

                launch()
                self.prologues[key] = launch
            return self.prologues[key]

        def __call__(self, kernel_call, quantiles):
            import triton.testing

            args = self.tuner.nargs
            before = self.prologue(args["M"], args["KW"] * 8, args["x_ptr"].device)

            def pair():
                before()
                kernel_call()

            return triton.testing.do_bench_cudagraph(pair, rep=100, quantiles=quantiles)

    GEMV_TUNE = _envflags.choice("FLATQUANT_GEMV_TUNE", "layer", ("layer", "alone"))
    if GEMV_TUNE == "layer":
        _bench = _AfterTransform()
        _tuned = _autotune(CONFIGS, key=_KEY, do_bench=_bench, prune_configs_by=_PRUNE)(_kernel)
        _bench.tuner = _tuned.tuner
    else:
        _tuned = _autotune(CONFIGS, key=_KEY, use_cuda_graph=True, prune_configs_by=_PRUNE)(_kernel)

MAX_SPLIT_K = 4
_CONFIG_KEYS = ("BLOCK_N", "BLOCK_KW", "BLOCK_KW0", "SPLIT_K", "AHEAD", "num_warps", "num_stages")


def _check_config(config: dict) -> dict:
    """A fixed config (tests, benchmarks): BLOCK_N and BLOCK_KW powers of two, BLOCK_KW0 (the head, default
    BLOCK_KW) a power of two of at least BLOCK_KW, SPLIT_K 1..MAX_SPLIT_K, AHEAD (steps of weights loaded ahead of
    their use, default 1) 1 or 2."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    missing = [k for k in _CONFIG_KEYS[:2] if k not in config]
    if unknown or missing:
        raise ValueError(f"a gemv config takes the keys {list(_CONFIG_KEYS)} (the first two required); "
                         f"missing {missing}, unknown {unknown}")  # fmt: skip
    for key, low in (("BLOCK_N", 1), ("BLOCK_KW", 1)):
        v = config[key]
        if not isinstance(v, int) or v < low or v & (v - 1):
            raise ValueError(f"{key}={v!r} must be a power of two")
    head = config.get("BLOCK_KW0", config["BLOCK_KW"])
    if not isinstance(head, int) or head < config["BLOCK_KW"] or head & (head - 1):
        raise ValueError(f"BLOCK_KW0={head!r} must be a power of two, at least BLOCK_KW={config['BLOCK_KW']}")
    sk = config.get("SPLIT_K", 1)
    if not isinstance(sk, int) or not 1 <= sk <= MAX_SPLIT_K:
        raise ValueError(f"SPLIT_K={sk!r} must be an integer from 1 to {MAX_SPLIT_K}")
    ahead = config.get("AHEAD", 1)
    if ahead not in (1, 2) or not isinstance(ahead, int):
        raise ValueError(f"AHEAD={ahead!r} must be 1 or 2")
    return {"SPLIT_K": 1, "BLOCK_KW0": head, "AHEAD": ahead, **config}


def last_gemv_config() -> dict | None:
    """The config the autotuner chose for the last autotuned call, or None."""
    cfg = getattr(_tuned, "best_config", None) if triton is not None else None
    if cfg is None:
        return None
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def w4a4_gemv(
    x_codes, x_scale, w_packed, w_scale, bias=None, x_zero=None, zero_corr=None, out_dtype=torch.bfloat16,
    residual=None, config=None, counters=None, checked=False, pf_bytes=0,
):  # fmt: skip
    """The W4A4 product of at most MAX_M tokens on the CUDA-core kernel (shapes, dtypes and devices checked by the
    caller, ``gemm_w4a4.w4a4_gemm``, which also passes ``checked=True`` once it has asked
    ``gemv_unavailable_reason``; otherwise that is asked here; ``zero_corr`` its zero-point column sums;
    ``counters(tiles)`` returns a zeroed int32 buffer of at least ``tiles`` split-K arrival counters that every
    launch leaves at zero, one per N tile). ``config`` fixes (BLOCK_N, BLOCK_KW[, BLOCK_KW0, SPLIT_K, num_warps,
    num_stages]) instead of autotuning (the interpreter always uses a fixed one). ``pf_bytes`` (a multiple of 16, with
    16-byte aligned weight rows; ``gemm_w4a4._prefetch_bytes``, FLATQUANT_PREFETCH_L2): bytes of each weight row
    prefetched into L2 before the wait for the previous kernel (PDL launches only)."""
    if pf_bytes % 16 or pf_bytes < 0:
        raise ValueError(f"pf_bytes must be a non-negative multiple of 16, got {pf_bytes=}")
    why = None if checked else gemv_unavailable_reason(x_codes, w_packed, None)
    if why is not None:
        raise ValueError(f"w4a4_gemv cannot run: {why}")
    m, k = x_codes.shape
    n = w_packed.shape[0]
    dev = x_codes.device
    out = torch.empty(m, n, device=dev, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    f32 = dict(device=dev, dtype=torch.float32)
    xs = x_scale.to(**f32).contiguous()
    ws = w_scale.to(**f32).contiguous()
    dummy = xs
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if config is None and interpret:
        config = dict(BLOCK_N=16, BLOCK_KW=16)
    if config is not None:
        config = _check_config(config)
    most = MAX_SPLIT_K if config is None else config["SPLIT_K"]
    part = torch.empty(most * m * n, device=dev, dtype=torch.int32) if most > 1 else dummy
    tiles = triton.cdiv(n, _MIN_BLOCK_N if config is None else config["BLOCK_N"])
    if counters is None:
        counters = torch.zeros(tiles, device=dev, dtype=torch.int32)
    else:
        counters = counters(tiles)
    pdl = _pdl.pdl_on(x_codes)
    args = (
        x_codes.view(torch.int64),
        w_packed.view(torch.int32),
        out,
        xs,
        ws,
        x_zero.to(**f32).contiguous() if x_zero is not None else dummy,
        zero_corr if x_zero is not None else dummy,
        bias.contiguous() if bias is not None else dummy,
        part,
        counters,
        residual if residual is not None else out,
        m,
        n,
        k // 8,
        triton.next_power_of_2(m),
        x_codes.stride(0) // 8,
        w_packed.stride(0) // 4,
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        pf_bytes,
    )
    flags = dict(
        HAS_ZERO=x_zero is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        USE_ASM=not interpret,
        PREFETCH=pdl and pf_bytes > 0,
        **_pdl.launch_options(pdl),
    )
    if config is not None:
        grid = (triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
        if interpret:
            config = {k_: v for k_, v in config.items() if k_ not in ("num_warps", "num_stages")}
        _kernel[grid](*args, **flags, **config)
    else:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

        _tuned[grid](*args, **flags)
    return out
