"""Rows times one small square matrix in one PDL-launched Triton kernel: the decode step's query transform.

A decode step multiplies each layer's new queries by P_h^-T (``q @ T``: B·H rows of head_dim, times head_dim x
head_dim) before the attention kernel reads them. As a PyTorch matmul it is one cuBLAS kernel per layer (2.6 µs on an
NVIDIA H100 80GB HBM3, 2.9 µs on an NVIDIA H200, profiled at batch 16), and the only kernel between the KV append
and the attention that is launched without programmatic dependent launch, so it breaks the overlap of the chain
twice (it waits for its predecessor to drain, and the attention cannot start early behind it). Here the matrix is
loaded before the wait (parameters are never written by a kernel of the step) and each program multiplies
``BLOCK_R`` rows on the tensor cores, accumulating in fp32 and rounding once to the rows' dtype, as cuBLAS does
(sums in another order: a result may differ from cuBLAS's in its last bit).

The decode attention uses it on CUDA (``FLATQUANT_QUERY_KERNEL=0`` takes PyTorch's matmul instead): a LLaMA-2-7B
decode step on an NVIDIA H200 took 2.799 / 4.802 ms at batch 1 / 16 with it against 2.810 / 4.860 ms without, in
one job (docs/kernels-pdl.md). Head dims that are powers of two from 16 to 256 (LLaMA, Mistral and Qwen use 64 or
128); other head dims take PyTorch's matmul.
"""

from __future__ import annotations

import torch

from .. import envflags as _envflags
from . import kron_quantize as _kq
from . import pdl as _pdl

triton, tl = _kq.triton, _kq.tl

__all__ = ["ENV", "USE_KERNEL", "applies", "rows_matmul", "rows_matmul_reference", "rows_matmul_triton"]

ENV = "FLATQUANT_QUERY_KERNEL"
_DTYPES = (torch.bfloat16, torch.float16)


def _use_kernel_from_env() -> bool:
    return _envflags.switch(ENV, True, "PyTorch's matmul", "the Triton kernel")


USE_KERNEL = _use_kernel_from_env()


def rows_matmul_reference(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` in x's dtype (PyTorch's matmul)."""
    return x @ m.to(device=x.device, dtype=x.dtype)


def applies(x: torch.Tensor, m: torch.Tensor) -> str | None:
    """Why the kernel cannot compute ``x @ m`` here, or None if it can."""
    d = x.shape[-1]
    reason = _kq.triton_unavailable_reason(x)  # built with the transform kernel, in the same mode
    if reason is not None:
        return reason
    if x.dtype not in _DTYPES:
        return f"x must be bfloat16 or float16, got {x.dtype}"
    if m.shape != (d, d):
        return f"m must be ({d}, {d}) for rows of {d}, got {tuple(m.shape)}"
    if d < 16 or d > 256 or d & (d - 1):
        return f"the row length must be a power of two in [16, 256], got {d}"
    return None


if triton is not None:

    @triton.jit
    def _rows_matmul_kernel(
        x_ptr, m_ptr, o_ptr, R, D: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr
    ):
        """Rows pid*BLOCK_R .. +BLOCK_R of x (R, D) times m (D, D), into o (R, D); fp32 sums, one rounding."""
        rd = tl.arange(0, D)
        mat = tl.load(m_ptr + rd[:, None] * D + rd[None, :])  # (D, D): a parameter, read before the wait
        _pdl.wait_previous(PDL)
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = (rr < R)[:, None]
        offs = rr.to(tl.int64)[:, None] * D + rd[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)  # (BLOCK_R, D)
        y = _kq._dot(x, mat, tl.full((BLOCK_R, D), 0.0, tl.float32), INTERPRET)
        tl.store(o_ptr + offs, _kq._round_to(y, o_ptr.dtype.element_ty, INTERPRET), mask=ok)


def rows_matmul_triton(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` for x (..., D) and m (D, D) in one launch (PDL on Hopper); the result in x's dtype and shape."""
    reason = applies(x, m)
    if reason is not None:
        raise RuntimeError(f"rows_matmul triton kernel cannot run: {reason}")
    d = x.shape[-1]
    rows = x.reshape(-1, d).contiguous()
    mat = m.to(device=x.device, dtype=x.dtype).contiguous()
    out = torch.empty_like(rows)
    r = rows.shape[0]
    if r:
        block_r = 16 if r <= 16 else 32 if r <= 256 else 64
        pdl = _pdl.pdl_on(rows)
        grid = (triton.cdiv(r, block_r),)
        _rows_matmul_kernel[grid](
            rows, mat, out, r, D=d, BLOCK_R=block_r, INTERPRET=_kq._interpreting(), **_pdl.launch_options(pdl)
        )
    return out.view(x.shape)


def rows_matmul(x: torch.Tensor, m: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``x @ m``: the Triton kernel (``impl="triton"``, or "auto" where it applies, unless
    ``FLATQUANT_QUERY_KERNEL=0``) or PyTorch's matmul ("torch", or "auto" otherwise)."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "triton" or (impl == "auto" and USE_KERNEL and applies(x, m) is None):
        return rows_matmul_triton(x, m)
    return rows_matmul_reference(x, m)
