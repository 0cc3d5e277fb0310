"""Fake quantizers with learnable clipping (LWC for weights, LAC for activations and the KV cache).

All quantizers round with a straight-through estimator so that gradients reach the transforms and the
clipping logits. Symmetric range [-2^(b-1), 2^(b-1)-1] with scale = max / (2^(b-1)-1); asymmetric range
[0, 2^b - 1] with zero point round(-xmin / scale).
"""

from __future__ import annotations

import torch
from torch import nn

from .fusion import fusable

_EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def fake_quantize(x: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize x with ranges broadcastable to x (e.g. (..., 1) per row).

    xmax >= 0 >= xmin hold the (clipped) range of each quantization group.
    """
    if not torch.is_grad_enabled():  # evaluation: the same numbers in fewer passes over x
        return _fake_quantize_inplace(x, xmax, xmin, bits, symmetric)
    scale = quant_scale(xmax, xmin, bits, symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(round_ste(x / scale), -qmax - 1, qmax)
        return q * scale
    qmax = 2**bits - 1
    zero = round_ste(-xmin / scale)
    q = torch.clamp(round_ste(x / scale) + zero, 0, qmax)
    return (q - zero) * scale


def quant_scale(xmax: torch.Tensor, xmin: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The quantization step for a (clipped) range xmax >= 0 >= xmin."""
    if symmetric:
        return torch.maximum(xmax, -xmin).clamp_min(_EPS) / (2 ** (bits - 1) - 1)
    return (xmax - xmin).clamp_min(_EPS) / (2**bits - 1)


def _fake_quantize_inplace(x, xmax, xmin, bits: int, symmetric: bool) -> torch.Tensor:
    scale = quant_scale(xmax, xmin, bits, symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return torch.div(x, scale).round_().clamp_(-qmax - 1, qmax).mul_(scale)
    qmax = 2**bits - 1
    zero = torch.round(-xmin / scale)
    return torch.div(x, scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)


class WeightQuantizer(nn.Module):
    """Per-output-channel (or per-group) RTN weight quantizer with learnable clipping.

    The clip range is [wmin * sigmoid(theta_min), wmax * sigmoid(theta_max)], recomputed from the
    (transformed) weight at every call.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bits: int,
        symmetric: bool = True,
        group_size: int | None = None,
        learnable_clip: bool = True,
        clip_init: float = 4.0,
    ):
        super().__init__()
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        groups = 1 if group_size is None else in_features // group_size
        if learnable_clip and bits < 16:
            self.clip_max = nn.Parameter(torch.full((out_features, groups, 1), clip_init))
            self.clip_min = nn.Parameter(torch.full((out_features, groups, 1), clip_init))
        else:
            self.clip_max = self.clip_min = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w: (out, in) float -> fake-quantized (out, in)."""
        if self.bits >= 16:
            return w
        return quantize_weight(w, self.clip_max, self.clip_min, self.bits, self.symmetric, self.group_size)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The quantization step that :meth:`forward` uses for w (out, in): (out, groups) in w's dtype."""
        _, wmax, wmin = _weight_range(w, self.clip_max, self.clip_min, self.group_size)
        return quant_scale(wmax, wmin, self.bits, self.symmetric).squeeze(-1)


class ActivationQuantizer(nn.Module):
    """Dynamic per-token quantizer over the last dimension with two learnable clipping logits."""

    def __init__(self, bits: int, symmetric: bool = True, learnable_clip: bool = True, clip_init: float = 4.0):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        if learnable_clip and bits < 16:
            self.clip_max = nn.Parameter(torch.tensor(clip_init))
            self.clip_min = nn.Parameter(torch.tensor(clip_init))
        else:
            self.clip_max = self.clip_min = None

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def clip_ratios(self) -> tuple[float, float]:
        """The (max, min) clipping ratios as floats, 1.0 when clipping is off."""
        if self.clip_max is None:
            return 1.0, 1.0
        return float(torch.sigmoid(self.clip_max)), float(torch.sigmoid(self.clip_min))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> fake-quantized (..., d), computed in float32."""
        if self.bits >= 16:
            return x
        return quantize_activation(x, self.clip_max, self.clip_min, self.bits, self.symmetric)


@fusable
def quantize_weight(w, clip_max, clip_min, bits: int, symmetric: bool, group_size: int | None) -> torch.Tensor:
    """Per-row (or per-group) fake quantization of w (out, in) with optional clipping logits (out, groups, 1)."""
    wg, wmax, wmin = _weight_range(w, clip_max, clip_min, group_size)
    return fake_quantize(wg, wmax, wmin, bits, symmetric).reshape(w.shape)


def _weight_range(w, clip_max, clip_min, group_size: int | None):
    """w (out, in) viewed as (out, groups, g), and its clipped per-group range (out, groups, 1) twice."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, -1, group_size or in_f)  # (out, groups, g)
    wmax = wg.amax(-1, keepdim=True).clamp_min(0)
    wmin = wg.amin(-1, keepdim=True).clamp_max(0)
    if clip_max is not None:
        wmax = wmax * torch.sigmoid(clip_max)
        wmin = wmin * torch.sigmoid(clip_min)
    return wg, wmax, wmin


@fusable
def quantize_activation(x, clip_max, clip_min, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-token fake quantization of x (..., d) in float32 with optional scalar clipping logits."""
    xf = x.float()
    xmin, xmax = torch.aminmax(xf, dim=-1, keepdim=True)
    xmax, xmin = xmax.clamp_min(0), xmin.clamp_max(0)
    if clip_max is not None:
        xmax = xmax * torch.sigmoid(clip_max)
        xmin = xmin * torch.sigmoid(clip_min)
    return fake_quantize(xf, xmax, xmin, bits, symmetric).to(x.dtype)
