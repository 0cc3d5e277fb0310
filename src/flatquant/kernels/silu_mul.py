"""SiLU(gate) · up in one launch, with the numerics of the Llama / Mistral / Qwen2 / Qwen3 MLP.

Those MLPs compute ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn`` = SiLU: in a 16-bit dtype
``dt`` that is two element-wise kernels, each computing in fp32 and rounding to ``dt``::

    s = (g / (1 + exp(-g))).to(dt)          # torch.nn.functional.silu
    h = (s.float() * u.float()).to(dt)      # the product

In a packed model gate and up are column halves of one GEMM output (strided views), which PyTorch's
element-wise kernels read without vectorisation: about 15 ms of a LLaMA-2-7B prefill of 4 x 2048 tokens went
there (NVIDIA H200). :func:`silu_mul_triton` does both in one pass. The product is exact in fp32 and both
roundings are the same; ``exp`` and the division may differ from PyTorch's in the last fp32 ulp, so ``s`` can
differ by one ulp of ``dt`` where a value lies at a rounding boundary (tested). :func:`silu_mul_reference` is
the modules' arithmetic in PyTorch.

:func:`fuse_silu_mul` swaps a model's gated-SiLU MLP modules for :class:`FusedGatedMLP`, which calls the same
``gate_proj`` / ``up_proj`` / ``down_proj`` modules and fuses only the activation and the product.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from . import kron_quantize as _kq
from . import kv_quant as _kv
from . import pdl as _pdl

triton, tl = _kq.triton, _kq.tl

__all__ = ["FusedGatedMLP", "fuse_silu_mul", "silu_mul", "silu_mul_reference", "silu_mul_triton"]


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's arithmetic, op for op (see the module doc)."""
    return torch.nn.functional.silu(gate) * up


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(
        g_ptr, u_ptr, out_ptr, n_rows, n_cols, stride_g, stride_u, stride_o,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        _pdl.wait_previous(PDL)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (r < n_rows)[:, None] & (c < n_cols)[None, :]
        r64 = r.to(tl.int64)[:, None]
        g = tl.load(g_ptr + r64 * stride_g + c[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + r64 * stride_u + c[None, :], mask=m, other=0.0).to(tl.float32)
        s = tl.div_rn(g, 1.0 + tl.exp(-g))
        s = _kq._round_to(s, g_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # silu's output in dt
        h = _kq._round_to(s * u, out_ptr.dtype.element_ty, INTERPRET)
        tl.store(out_ptr + r64 * stride_o + c[None, :], h, mask=m)


def _interpreting() -> bool:
    return triton is not None and type(_silu_mul_kernel).__name__ == "InterpretedFunction"


def launch_meta(n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the launch for rows of n elements: up to 1024 columns, 2048 elements a program."""
    block_c = min(1024, _kq._next_pow2(n))
    return max(1, 2048 // block_c), block_c


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One Triton launch for :func:`silu_mul_reference` (gate, up (..., n) of one 16-bit dtype; any row
    strides, unit stride over the last dimension); returns a contiguous tensor."""
    reason = _kv.triton_unavailable_reason(gate)
    if reason is not None:
        raise RuntimeError(f"silu_mul triton kernel cannot run: {reason}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must share shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} {gate.device} "
            f"and {tuple(up.shape)} {up.dtype} {up.device}"
        )
    if gate.dtype not in _kv._Q_DTYPES:
        raise ValueError(f"silu_mul_triton takes {_kv._Q_DTYPES}, got {gate.dtype}")
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)  # views for the usual (..., n) column slices
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    out = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
    rows = g2.shape[0]
    if rows and n:
        block_r, block_c = launch_meta(n)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(n, block_c))
        _silu_mul_kernel[grid](
            g2, u2, out, rows, n, g2.stride(0), u2.stride(0), out.stride(0),
            BLOCK_R=block_r, BLOCK_C=block_c, INTERPRET=_interpreting(), num_warps=4,
            **_pdl.launch_options(_pdl.pdl_on(g2)),
        )  # fmt: skip
    return out.reshape(gate.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """SiLU(gate) * up (see the module doc). impl: "auto" (Triton on CUDA for 16-bit inputs, else the
    reference), "triton" or "torch" (forced; RuntimeError when the forced kernel cannot run)."""
    if _kv._pick(impl, gate) == "triton" and (impl == "triton" or gate.dtype in _kv._Q_DTYPES):
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)


class FusedGatedMLP(nn.Module):
    """A gated-SiLU MLP that runs ``down_proj(silu_mul(gate_proj(x), up_proj(x)))``: the model's own three
    projection modules (same names, so the state dict is unchanged), activation and product in one launch on
    CUDA. :func:`fuse_silu_mul` swaps it in."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output; with ``residual``, ``residual + output`` (by down_proj where it takes a residual,
        e.g. a W4A4 linear adding it in its GEMM's epilogue)."""
        h = silu_mul(self.gate_proj(x), self.up_proj(x))
        if residual is None:
            return self.down_proj(h)
        takes = self.__dict__.get("_down_takes_residual")
        if takes is None:  # decided once: a signature lookup per call would cost host time on every layer
            takes = self._down_takes_residual = "residual" in inspect.signature(self.down_proj.forward).parameters
        return self.down_proj(h, residual=residual) if takes else residual + self.down_proj(h)


def _is_silu(act) -> bool:
    # transformers' ACT2FN["silu"]: torch.nn.SiLU in some releases, its own SiLUActivation (F.silu) in others
    return type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation"


def fuse_silu_mul(model: nn.Module, mlp_name: str = "mlp") -> int:
    """Swap every module called ``mlp_name`` that is a gated-SiLU MLP (``gate_proj``, ``up_proj``,
    ``down_proj`` and a SiLU ``act_fn``) for :class:`FusedGatedMLP`; other
    activations are left alone. Returns how many were swapped."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if name.rpartition(".")[2] != mlp_name or isinstance(mod, FusedGatedMLP):
            continue
        parts = [getattr(mod, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if _is_silu(getattr(mod, "act_fn", None)) and all(isinstance(p, nn.Module) for p in parts):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, FusedGatedMLP(*parts))
            swapped += 1
    return swapped
