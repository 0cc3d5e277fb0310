"""Real-quant W4A4 linear layer: online Kronecker transform + 4-bit activation quantization + W4A4 GEMM.

The layer is built from a calibrated, merged fake-quant layer: its weight already contains the inverse of the
online transform (and the smoothing scales), so at inference

    y = W4A4_GEMM(quantize(P1^T X P2), pack(RTN(W))) + bias

where X is each token (K,) viewed as (n1, n2) row-major. Several layers that read the same input (q/k/v,
gate/up) share one quantized operand: call ``quantize_input`` once and pass the tuple to each layer.
"""

from __future__ import annotations

import torch
from torch import nn

from flatquant.kernels.gemm_dense import wants_e4m3_codes
from flatquant.kernels.gemm_w4a4 import SMALL_M, pack_int4, w4a4_gemm

try:  # the fused transform + quantize kernel; the torch fallback below has the same numerics
    from flatquant.kernels.kron_quantize import fuses_norm as _fuses_norm
    from flatquant.kernels.kron_quantize import kron_quantize as _kron_quantize
except ImportError:
    _kron_quantize = _fuses_norm = None
from flatquant.kernels.rmsnorm import rms_norm as _rms_norm

__all__ = ["W4A4Linear", "kron_quantize_torch", "operand_gemm", "quantize_operand", "quantize_weight_rtn"]

_EPS = 1e-8  # smallest activation scale, as in kron_quantize


def kron_quantize_torch(
    x: torch.Tensor,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
    clip_max: float = 1.0,
    clip_min: float = 1.0,
    bits: int = 4,
    symmetric: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Transform each token by P1^T X P2 and quantize it per token (plain PyTorch, fp32 math).

    Same quantizer contract as ``flatquant.kernels.kron_quantize`` (factors rounded to x.dtype, absmax =
    max(clip_max * max, -clip_min * min), scale >= 1e-8), but any float dtype and no fused kernel.

    Args:
        x: (..., n) float, n = n1 * n2.
        p1, p2: (n1, n1) and (n2, n2) transform factors, or both None for no transform.
        clip_max, clip_min: activation clip ratios applied to the per-token max (and min when asymmetric).
    Returns:
        codes int8 (..., n) in [-2^(b-1), 2^(b-1)-1] (symmetric) or [0, 2^b-1]; scale fp32 (...,);
        and zero fp32 (...,) when asymmetric. Rounding is half-to-even.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    xt = x.reshape(-1, n).float()  # (T, n)
    if p1 is not None:
        n1, n2 = p1.shape[0], p2.shape[0]
        f1, f2 = p1.to(x.dtype).float(), p2.to(x.dtype).float()  # factors live in the model dtype
        xt = (f1.T @ xt.view(-1, n1, n2) @ f2).reshape(-1, n)  # (T, n)
    xmax, xmin = xt.amax(dim=-1).clamp_min(0) * clip_max, xt.amin(dim=-1).clamp_max(0) * clip_min  # (T,), hold 0
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (torch.maximum(xmax, -xmin) / qmax).clamp_min(_EPS)  # (T,)
        codes = torch.round(xt / scale[:, None]).clamp(-qmax - 1, qmax)
        return codes.to(torch.int8).reshape(*lead, n), scale.reshape(lead)
    qmax = 2**bits - 1
    scale = ((xmax - xmin) / qmax).clamp_min(_EPS)
    zero = torch.round(-xmin / scale)
    codes = (torch.round(xt / scale[:, None]) + zero[:, None]).clamp(0, qmax)
    return codes.to(torch.int8).reshape(*lead, n), scale.reshape(lead), zero.reshape(lead)


def quantize_operand(
    x: torch.Tensor,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
    clip_max: float,
    clip_min: float,
    symmetric: bool = True,
    act_impl: str = "auto",
    norm: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, ...]:
    """x (..., K) float -> 4-bit GEMM operand (codes (..., K), scale fp32 (...,)[, zero fp32 (...,)]).

    The codes are int8, or float8_e4m3fn where the GEMM will take its dense FP8 path (``gemm_dense``: from
    ``DENSE_M`` tokens on a CUDA device with FP8 tensor cores), so that it reads them as they are; asymmetric e4m3
    codes come centred (code - zero) with no zero point, a ``(codes, scale)`` pair like a symmetric operand.
    The fused kernel (its reference off CUDA) for bf16/fp16 with ``act_impl="auto"``, else
    :func:`kron_quantize_torch`; several layers reading one input share the result. norm: ``(weight, eps)`` of
    the RMSNorm that produces this input, applied first (inside the fused kernel where it can take it: 16-bit x,
    the weight in x's dtype, token tiles below 128 x 128; else as a separate step, with the same arithmetic).
    """
    kw = dict(clip_max=clip_max, clip_min=clip_min, bits=4, symmetric=symmetric)
    if _kron_quantize is not None and act_impl == "auto" and x.dtype in (torch.bfloat16, torch.float16):
        if norm is not None and (norm[0].dtype != x.dtype or not _tile_takes_norm(x.shape[-1], p1, p2)):
            x, norm = _rms_norm(x, *norm), None
        k = x.shape[-1]
        e4m3 = wants_e4m3_codes(x.numel() // max(k, 1), k, x.device)
        codes_dtype = torch.float8_e4m3fn if e4m3 else torch.int8
        codes, scale, zero = _kron_quantize(x, p1, p2, **kw, norm=norm, codes_dtype=codes_dtype)
        return (codes, scale) if zero is None else (codes, scale, zero)
    if norm is not None:
        x = _rms_norm(x, *norm)
    return kron_quantize_torch(x, p1, p2, **kw)


def _tile_takes_norm(n: int, p1: torch.Tensor | None, p2: torch.Tensor | None) -> bool:
    n1 = p1.shape[0] if p1 is not None else (n // p2.shape[0] if p2 is not None else 1)
    return _fuses_norm is not None and _fuses_norm(n1, n // n1)


def quantize_weight_rtn(weight: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, ...]:
    """Symmetric per-output-channel 4-bit RTN: weight (N, K) float -> (codes int8 (N, K), scale fp32 (N,)).

    scale = absmax * clip / 7, codes = round_half_even(W / scale) clamped to [-8, 7]; math in float64.
    """
    w = weight.detach().to(torch.float64)  # (N, K)
    clip = torch.as_tensor(clip, dtype=torch.float64, device=w.device)
    scale = (w.abs().amax(dim=1) * clip / 7).clamp_min(torch.finfo(torch.float32).tiny)  # (N,)
    scale = scale.to(torch.float32).to(torch.float64)  # codes against the scale that is stored
    codes = torch.round(w / scale[:, None]).clamp(-8, 7).to(torch.int8)
    return codes, scale.to(torch.float32)


def operand_gemm(
    op: tuple[torch.Tensor, ...],
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    gemm_impl: str = "auto",
    prefill_fp8: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """An operand tuple (codes (..., K), scale (...,)[, zero (...,)]) times packed weights (N, ceil(K/2)):
    (..., N) in ``out_dtype``, scales (and bias) applied; plus ``residual`` (..., N) when given (in the GEMM's
    epilogue where it is in ``out_dtype``, as ``residual + out`` rounded once more)."""
    codes, scale = op[0], op[1]
    zero = op[2] if len(op) > 2 else None  # None for symmetric activations
    lead = codes.shape[:-1]
    codes = codes.reshape(-1, codes.shape[-1])  # (T, K)
    path = "auto"  # the INT8 Triton kernel, or the dense FP8 path for long inputs (w4a4_gemm)
    if prefill_fp8 and codes.is_cuda and codes.shape[0] > SMALL_M:
        codes, path = codes.to(torch.float8_e4m3fn), "fp8"  # the FP8 Triton kernel; exact for 4-bit codes
    n = w_packed.shape[0]
    fused = residual is not None and residual.dtype == out_dtype and residual.shape == (*lead, n)
    fused = fused and residual.device == codes.device
    out = w4a4_gemm(
        codes,
        scale.reshape(-1),
        w_packed,
        w_scale,
        bias=bias,
        x_zero=None if zero is None else zero.reshape(-1),
        out_dtype=out_dtype,
        impl=gemm_impl,
        path=path,
        residual=_unit_stride_rows(residual.reshape(-1, n)) if fused else None,
    ).reshape(*lead, n)
    return out if residual is None or fused else residual + out


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class W4A4Linear(nn.Module):
    """W4A4 linear layer holding packed int4 weights, scales, bias and the online transform.

    Buffers: ``w_packed`` uint8 (N, ceil(K/2)), ``w_scale`` fp32 (N,), ``bias`` (N,) or None, ``p1`` (n1, n1)
    and ``p2`` (n2, n2) in ``out_dtype`` (absent when the input is not transformed). ``act_clip_max`` and
    ``act_clip_min`` are the calibrated activation clip ratios (floats, saved as the module's extra state).

    forward(x, residual=None): x is either a float tensor (..., K) (bf16/fp16/fp32; transformed and quantized
    here, output in x.dtype) or an operand tuple ``(codes int8 (..., K), scale fp32 (...,)[, zero fp32 (...,)])``
    from ``quantize_input`` (output in ``out_dtype``). Returns (..., N), plus ``residual`` (..., N) when given
    (added in the GEMM's epilogue). ``next_residual``, when set, is the residual of the next call only (how a
    decoder layer hands its residual to an o_proj that transformers' attention calls).
    """

    next_residual: torch.Tensor | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        transform_sizes: tuple[int, int] | None = None,
        act_symmetric: bool = True,
        out_dtype: torch.dtype = torch.bfloat16,
        act_impl: str = "auto",
        gemm_impl: str = "auto",
        device: torch.device | str | None = None,
        prefill_fp8: bool = False,
    ):
        super().__init__()
        if act_impl not in ("auto", "torch"):
            raise ValueError(f"act_impl must be 'auto' or 'torch', got {act_impl=}")
        if transform_sizes is not None and transform_sizes[0] * transform_sizes[1] != in_features:
            raise ValueError(f"{transform_sizes=} must multiply to {in_features=}")
        self.in_features, self.out_features = in_features, out_features
        self.act_symmetric, self.out_dtype = act_symmetric, out_dtype
        self.act_impl, self.gemm_impl = act_impl, gemm_impl
        # above SMALL_M tokens on CUDA, use the FP8 tensor-core path; off: INT8 was faster at every H100 shape
        self.prefill_fp8 = prefill_fp8
        self.act_clip_max, self.act_clip_min = 1.0, 1.0
        kw = dict(device=device)
        self.register_buffer("w_packed", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8, **kw))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype, **kw) if bias else None)
        if transform_sizes is None:
            self.p1 = self.p2 = None
        else:
            n1, n2 = transform_sizes
            # factors live in the model dtype so the fused kernel reads them without a per-call cast
            self.register_buffer("p1", torch.eye(n1, dtype=out_dtype, **kw))
            self.register_buffer("p2", torch.eye(n2, dtype=out_dtype, **kw))

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        p1: torch.Tensor | None,
        p2: torch.Tensor | None,
        act_clip: float | tuple[float, float] = 1.0,
        w_bits: int = 4,
        w_clip: torch.Tensor | float = 1.0,
        act_symmetric: bool = True,
        out_dtype: torch.dtype = torch.bfloat16,
        act_impl: str = "auto",
        gemm_impl: str = "auto",
    ) -> W4A4Linear:
        """Build from a merged fake-quant layer.

        Args:
            weight: (N, K) float, already multiplied by the inverse transform (and smoothing).
            bias: (N,) or None.
            p1, p2: online transform factors (n1, n1), (n2, n2) with n1 * n2 = K, or both None.
            act_clip: activation clip ratio (clip_max), or (clip_max, clip_min) for asymmetric activations.
            w_bits: must be 4.
            w_clip: per-output-channel (N,) or scalar weight clip ratio (learned weight clipping).
        """
        if w_bits != 4:
            raise ValueError(f"W4A4Linear packs 4-bit weights only, got {w_bits=}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be (N, K), got {tuple(weight.shape)=}")
        if (p1 is None) != (p2 is None):
            raise ValueError("p1 and p2 must both be given or both be None")
        n, k = weight.shape
        sizes = None if p1 is None else (p1.shape[0], p2.shape[0])
        layer = cls(k, n, bias is not None, sizes, act_symmetric, out_dtype, act_impl, gemm_impl, weight.device)
        codes, scale = quantize_weight_rtn(weight, w_clip)  # (N, K) int8, (N,) fp32
        layer.w_packed.copy_(pack_int4(codes))
        layer.w_scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        if p1 is not None:
            layer.p1.copy_(p1.detach())
            layer.p2.copy_(p2.detach())
        clip = act_clip if isinstance(act_clip, (tuple, list)) else (act_clip, act_clip)
        layer.act_clip_max, layer.act_clip_min = float(clip[0]), float(clip[1])
        return layer

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., K) float -> operand tuple (codes int8 (..., K), scale fp32 (...,)[, zero fp32 (...,)])."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        return quantize_operand(
            x, self.p1, self.p2, self.act_clip_max, self.act_clip_min, self.act_symmetric, self.act_impl
        )

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...], residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None and self.next_residual is not None:
            residual, self.next_residual = self.next_residual, None
        if isinstance(x, torch.Tensor):
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else self.out_dtype
            x = self.quantize_input(x)
        else:
            out_dtype = self.out_dtype
        w, ws, b = self.w_packed, self.w_scale, self.bias
        return operand_gemm(x, w, ws, b, out_dtype, self.gemm_impl, self.prefill_fp8, residual)

    def get_extra_state(self) -> dict:
        return {"act_clip_max": self.act_clip_max, "act_clip_min": self.act_clip_min}

    def set_extra_state(self, state: dict) -> None:
        self.act_clip_max, self.act_clip_min = state["act_clip_max"], state["act_clip_min"]

    def extra_repr(self) -> str:
        t = None if self.p1 is None else (self.p1.shape[0], self.p2.shape[0])
        return f"in_features={self.in_features}, out_features={self.out_features}, transform={t}"
