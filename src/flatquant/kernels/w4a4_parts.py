"""Jit helpers of both W4A4 GEMM kernels: the tensor-core kernel (``gemm_w4a4``) and the CUDA-core decode kernel
(``gemv_w4a4``)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

__all__ = ["prefetch_rows", "prefetch_slice", "unpack_x16"]

if triton is not None:

    @triton.jit
    def unpack_x16(p, USE_ASM: tl.constexpr):
        """Packed nibbles -> (even, odd) codes, 16x each: uint8 (R, C) bytes -> two int8 (R, C) tensors, or int32
        words of eight codes -> two int32 words of four signed bytes each."""
        if USE_ASM:
            # one 32-bit register holds 4 packed bytes; two ALU ops yield 4 even and 4 odd codes (x16)
            lo, hi = tl.inline_asm_elementwise(
                asm="""
                {
                shl.b32 $0, $2, 4;
                and.b32 $0, $0, 0xF0F0F0F0;
                and.b32 $1, $2, 0xF0F0F0F0;
                }
                """,
                constraints="=r,=r,r",
                args=[p],
                dtype=(tl.int32, tl.int32) if p.dtype == tl.int32 else (tl.int8, tl.int8),
                is_pure=True,
                pack=1 if p.dtype == tl.int32 else 4,
            )
        elif p.dtype == tl.int32:
            lo = (p << 4) & -0x0F0F0F10  # 0xF0F0F0F0 as an int32
            hi = p & -0x0F0F0F10
        else:
            lo = (p << 4).to(tl.int8, bitcast=True)
            hi = (p & 0xF0).to(tl.int8, bitcast=True)
        return lo, hi

    @triton.jit
    def prefetch_rows(row_ptrs, n_bytes):
        """L2 prefetch of ``n_bytes`` (int32 tensor like ``row_ptrs``, multiples of 16) from each 16-byte aligned
        address of ``row_ptrs``: one bulk-prefetch instruction per row (sm_90), no registers or shared memory
        filled."""
        tl.inline_asm_elementwise(
            asm="cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
            constraints="=r,l,r",
            args=[row_ptrs, n_bytes],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def prefetch_slice(row_ptrs, rows, slice_bytes, pf_bytes, SPLIT_K: tl.constexpr):
        """Before the wait for the previous kernel: an L2 prefetch of each weight row of this program's K slice
        (``row_ptrs``, the slice's first byte of each of ``rows``; ``slice_bytes`` long), at most ``pf_bytes //
        SPLIT_K`` bytes of each (``pf_bytes``: over all of K, a multiple of 16)."""
        pf = (min(pf_bytes // SPLIT_K, slice_bytes) // 16) * 16
        if pf > 0:
            prefetch_rows(row_ptrs, rows * 0 + pf)
