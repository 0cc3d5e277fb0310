"""RMSNorm in one launch, with the numerics of the Llama / Mistral / Qwen2 / Qwen3 norm modules.

Those modules compute, per row of ``x`` (..., D) in dtype ``dt``::

    h = (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(dt)
    out = weight * h                   # in the promoted dtype of weight and dt

as about eight separate kernels (upcast, square, mean, add, rsqrt, multiply, downcast, multiply). At decode
batch sizes each is a few microseconds of launch for almost no work, and in prefill each is a pass over the
activations. :func:`rms_norm_triton` does the same arithmetic in one pass; the mean's summation order and the
hardware rsqrt may differ from PyTorch's in the last fp32 ulp, so ``h`` can differ by one ulp of ``dt`` where a
value lies at a rounding boundary (tested). :func:`rms_norm_reference` is the module's arithmetic in PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kron_quantize as _kq
from . import kv_quant as _kv
from . import pdl as _pdl
from .kron_quantize import rms_norm_reference  # the modules' arithmetic, op for op (also the fused norm's)

triton, tl = _kq.triton, _kq.tl

__all__ = ["FusedRMSNorm", "rms_norm", "rms_norm_reference", "rms_norm_triton"]


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, w_ptr, out_ptr, n_rows, stride_x, stride_o, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        _pdl.wait_previous(PDL)
        x, r64, rd, _, m = _kv._load_rows(x_ptr, n_rows, stride_x, D, BLOCK_R, BLOCK_D)
        var = tl.sum(x * x, 1) / D
        h = x * (1.0 / tl.sqrt_rn(var + eps))[:, None]
        h = _kq._round_to(h, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # .to(dt) of the module
        w = tl.load(w_ptr + rd, mask=rd < D, other=0.0).to(tl.float32)
        out = _kq._round_to(w[None, :] * h, out_ptr.dtype.element_ty, INTERPRET)
        tl.store(out_ptr + r64[:, None] * stride_o + rd[None, :], out, mask=m)


def _interpreting() -> bool:
    return triton is not None and type(_rms_norm_kernel).__name__ == "InterpretedFunction"


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One Triton launch for :func:`rms_norm_reference` (x bf16/fp16/fp32, weight (D,) of any float dtype)."""
    reason = _kv.triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"rms_norm triton kernel cannot run: {reason}")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape ({d},), got {tuple(weight.shape)}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    n_rows = x2.shape[0]
    if n_rows:
        block_d = triton.next_power_of_2(d)
        block_r = max(1, min(16, 4096 // block_d))
        _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, weight, out, n_rows, x2.stride(0), out.stride(0), float(eps),
            D=d, BLOCK_D=block_d, BLOCK_R=block_r, INTERPRET=_interpreting(), num_warps=4 if block_d <= 4096 else 8,
            **_pdl.launch_options(_pdl.pdl_on(x2)),
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """RMSNorm of the rows of x (see the module doc). impl: "auto" (Triton on CUDA for 16-bit x, else the
    reference), "triton" or "torch" (forced; RuntimeError when the forced kernel cannot run)."""
    if _kv._pick(impl, x) == "triton" and (impl == "triton" or x.dtype in _kv._Q_DTYPES):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class FusedRMSNorm(nn.Module):
    """Drop-in for a model's RMSNorm module (same ``weight`` parameter and ``variance_epsilon``), one launch
    on CUDA. :func:`fuse_rms_norms` swaps it in."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def fuse_rms_norms(model: nn.Module) -> int:
    """Swap every Llama-style RMSNorm module of ``model`` (class name ending in ``RMSNorm``, a ``weight`` and a
    ``variance_epsilon``) for :class:`FusedRMSNorm` sharing its parameter; returns how many were swapped."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FusedRMSNorm):  # already swapped (or folded into a quantizer: DeferredRMSNorm)
            continue
        if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon") and name:
            weight = getattr(mod, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 1:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, FusedRMSNorm(weight, mod.variance_epsilon))
                swapped += 1
    return swapped
