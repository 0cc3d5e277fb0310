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
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(xmax, -xmin).clamp_min(_EPS) / qmax
        q = torch.clamp(round_ste(x / scale), -qmax - 1, qmax)
        return q * scale
    qmax = 2**bits - 1
    scale = (xmax - xmin).clamp_min(_EPS) / qmax
    zero = round_ste(-xmin / scale)
    q = torch.clamp(round_ste(x / scale) + zero, 0, qmax)
    return (q - zero) * scale


def _fake_quantize_inplace(x, xmax, xmin, bits: int, symmetric: bool) -> torch.Tensor:
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(xmax, -xmin).clamp_min(_EPS) / qmax
        return torch.div(x, scale).round_().clamp_(-qmax - 1, qmax).mul_(scale)
    qmax = 2**bits - 1
    scale = (xmax - xmin).clamp_min(_EPS) / qmax
    zero = torch.round(-xmin / scale)
    return torch.div(x, scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)


class WeightQuantizer(nn.Module):
    """Per-output-channel (or per-group) RTN weight quantizer with learnable clipping.

    The clip range is [wmin * sigmoid(theta_min), wmax * sigmoid(theta_max)], recomputed from the
    (transformed) weight at every call. Groups run over consecutive input columns; a last group shorter than
    ``group_size`` (e.g. 576 = 4 x 128 + 64) has its own range and clipping logits.
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
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size={group_size} must be a positive integer or None")
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        groups = num_groups(in_features, group_size)
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

    @torch.no_grad()
    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each (out, groups) in w's dtype: the grid :meth:`forward` rounds w onto.

        A weight quantized elsewhere (GPTQ) with ``codes_of`` / ``dequantize_codes`` on this grid lands on
        the same values as RTN would, clipping included. ``zero`` is 0 for symmetric quantization.
        """
        wmax, wmin = _weight_range(w, self.clip_max, self.clip_min, self.group_size)
        if self.symmetric:
            scale = torch.maximum(wmax, -wmin).clamp_min(_EPS) / (2 ** (self.bits - 1) - 1)
            zero = torch.zeros_like(scale)
        else:
            scale = (wmax - wmin).clamp_min(_EPS) / (2**self.bits - 1)
            zero = torch.round(-wmin / scale)
        return scale[..., 0], zero[..., 0]

    @torch.no_grad()
    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The quantization step of every group, (out, groups) in w's dtype (for packing real 4-bit layers)."""
        return self.grid(w)[0]

    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code."""
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_features // group_size)


def expand_groups(t: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """(out, groups) -> (out, in_features): each group's value repeated over its columns."""
    return t.repeat_interleave(group_size or in_features, dim=1)[:, :in_features]


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None):
    """(codes - zero) * scale for integer codes (out, in) on a per-group grid (out, groups), in scale's dtype."""
    in_f = codes.shape[1]
    return (codes.to(scale.dtype) - expand_groups(zero, in_f, group_size)) * expand_groups(scale, in_f, group_size)


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
    out_f, in_f = w.shape
    wmax, wmin = _weight_range(w, clip_max, clip_min, group_size)
    wg = _grouped(w, group_size)  # (out, groups, g)
    return fake_quantize(wg, wmax, wmin, bits, symmetric).reshape(out_f, -1)[:, :in_f]


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, groups, g), the last group zero-padded (zeros never change a range that holds 0)."""
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        w = torch.nn.functional.pad(w, (0, g - in_f % g))
    return w.reshape(out_f, -1, g)


def _weight_range(w, clip_max, clip_min, group_size):
    """Clipped (max, min) of every group, (out, groups, 1) each, with max >= 0 >= min."""
    wg = _grouped(w, group_size)
    wmax = wg.amax(-1, keepdim=True).clamp_min(0)
    wmin = wg.amin(-1, keepdim=True).clamp_max(0)
    if clip_max is not None:
        wmax = wmax * torch.sigmoid(clip_max)
        wmin = wmin * torch.sigmoid(clip_min)
    return wmax, wmin


@fusable
def quantize_activation(x, clip_max, clip_min, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-token fake quantization of x (..., d) in float32 with optional scalar clipping logits."""
    xf = x.float()
    # amax/amin, not aminmax: aminmax has no derivative, which breaks the compiled training step
    xmax, xmin = xf.amax(-1, keepdim=True).clamp_min(0), xf.amin(-1, keepdim=True).clamp_max(0)
    if clip_max is not None:
        xmax = xmax * torch.sigmoid(clip_max)
        xmin = xmin * torch.sigmoid(clip_min)
    return fake_quantize(xf, xmax, xmin, bits, symmetric).to(x.dtype)
