"""The modules swapped into a decoder block: online transforms, fake-quantized linears, attention quant.

Each module has two states. While calibrating, transforms are computed from their learnable parameters
at every call. After ``merge()``, everything that can be folded into weights and norms has been folded
(in float64), the weights are quantized once, and only the online parts remain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import fusable
from .quantizer import ActivationQuantizer, WeightQuantizer, dequantize_codes
from .transforms import KroneckerTransform, LearnableMatrix, kron_apply


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class OnlineTransform(nn.Module):
    """x -> Q(x · diag(c) · (P1 ⊗ P2)): per-channel scaling, Kronecker transform, activation quantizer.

    One instance serves every linear that reads the same input (q/k/v; gate/up).
    """

    def __init__(self, n: int, quant: ActivationQuantizer, kron: KroneckerTransform | None, smooth: bool):
        super().__init__()
        self.n = n
        self.kron = kron
        self.quant = quant
        self.smooth = nn.Parameter(torch.ones(n)) if smooth else None
        self.merged = False

    def weight_factors(self, dtype: torch.dtype):
        """(c or None, P1^-1 or None, P2^-1 or None) in ``dtype``, for folding into weights."""
        if self.kron is None:
            return self.smooth, None, None
        (_, p1_inv), p2 = self.kron.factors(dtype)
        return self.smooth, p1_inv, None if p2 is None else p2[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., n) -> transformed, fake-quantized (..., n) of x's dtype."""
        p1 = p2 = None
        if self.merged:
            if self.kron is not None:
                p1, p2 = self.p1_fixed, self.p2_fixed
        elif self.kron is not None:
            with _no_autocast(x.device.type):
                (p1, _), p2 = self.kron.factors(torch.float32)
                p2 = None if p2 is None else p2[0]
        return self.quant(_smooth_and_transform(x, self.smooth, p1, p2))

    @torch.no_grad()
    def merge(self) -> None:
        """Fix the transform; the scaling must already have been folded by the caller."""
        if self.kron is not None:
            (p1, _), p2 = self.kron.factors(torch.float64)
            self.register_buffer("p1_fixed", p1.float())
            self.register_buffer("p2_fixed", None if p2 is None else p2[0].float())
        self.smooth = None
        self.merged = True


@fusable
def _smooth_and_transform(x, smooth, p1, p2) -> torch.Tensor:
    """x · diag(smooth) · (P1 ⊗ P2) in x's dtype (P2 None: identity)."""
    if smooth is not None:
        x = x * smooth.to(x.dtype)
    if p1 is not None:
        x = kron_apply(x, p1.to(x.dtype), None if p2 is None else p2.to(x.dtype))
    return x


@fusable
def transform_weight(w, b, smooth, p1_inv, p2_inv, p_v, row_c):
    """Fold the input transform (and P_v / a row scaling) into a weight (out, in) and bias (out,).

    W' = diag(row_c) · P_v-rows(W diag(1/smooth) (P1^-T ⊗ P2^-T)); b' = row_c · (b per head @ P_v).
    """
    out_f, in_f = w.shape
    if smooth is not None:
        w = w / smooth
    if p1_inv is not None:
        w = kron_apply(w, p1_inv.transpose(0, 1), None if p2_inv is None else p2_inv.transpose(0, 1))
    if p_v is not None:
        hd = p_v.shape[0]
        w = (p_v.transpose(0, 1) @ w.reshape(-1, hd, in_f)).reshape(out_f, in_f)  # P_v^T on each head's rows
        if b is not None:
            b = (b.reshape(-1, hd) @ p_v).reshape(-1)
    if row_c is not None:
        w = w * row_c[:, None]
        b = None if b is None else b * row_c
    return w, b


class TransformedNorm(nn.Module):
    """A norm followed by the online transform of its output; the scaling is folded into the norm weight."""

    def __init__(self, norm: nn.Module, transform: OnlineTransform):
        super().__init__()
        self.norm = norm
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.norm(x))

    @torch.no_grad()
    def merge(self) -> None:
        if self.transform.smooth is not None:
            w = self.norm.weight
            w.copy_((w.double() * self.transform.smooth.double()).to(w.dtype))
        self.transform.merge()


class FlatQuantLinear(nn.Module):
    """A linear layer whose input lives in a transformed space, with a fake-quantized, merged weight.

    input_transform: the OnlineTransform producing this layer's input (shared, not owned, unless
        ``owns_input`` in which case it is applied here, as for o_proj and down_proj).
    right_extra: for o_proj, P_v (head_dim x head_dim) already applied to V, so the weight gets
        the inverse of P_o ⊗ P_v while only P_o ⊗ I runs online.
    out_head: for v_proj, P_v applied to each head of the output (merged into rows and bias).
    row_scale: for up_proj, the down_proj input transform whose scaling is folded into up's rows.
    """

    def __init__(
        self,
        linear: nn.Linear,
        quant: WeightQuantizer,
        input_transform: OnlineTransform,
        owns_input: bool = False,
        right_extra: LearnableMatrix | None = None,
        out_head: LearnableMatrix | None = None,
        row_scale: OnlineTransform | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.quant = quant
        if owns_input:
            self.input_transform = input_transform
        # Shared modules are held outside the module tree so that they are saved once, by their owner.
        self._shared = {"input": input_transform, "right": right_extra, "head": out_head, "row": row_scale}
        self.owns_input = owns_input
        self.merged = False
        self.pending_weight: torch.Tensor | None = None  # merged, not yet rounded (float64)
        self.input_observer = None  # called with every (quantized) input; used to build GPTQ's Hessian

    def _transformed_weight(self, dtype: torch.dtype, fold_row_scale: bool):
        """(W', b') with W' = [rows scaled] P_v-rows(W diag(1/c) (P1^-T ⊗ P2^-T)), in ``dtype``."""
        smooth, p1_inv, p2_inv = self._shared["input"].weight_factors(dtype)
        if self._shared["right"] is not None:
            p2_inv = self._shared["right"].pair(dtype)[1]
        head = self._shared["head"]
        p_v = None if head is None else head.pair(dtype)[0]
        row = self._shared["row"]
        row_c = row.smooth if fold_row_scale and row is not None else None
        to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return transform_weight(to(self.weight), to(self.bias), to(smooth), p1_inv, p2_inv, p_v, to(row_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.owns_input:
            x = self.input_transform(x)
        if self.input_observer is not None:
            self.input_observer(x)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        with _no_autocast(x.device.type):
            w, b = self._transformed_weight(torch.float32, fold_row_scale=False)
            w = self.quant(w)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def merge(self, round_weight: bool = True) -> None:
        """Fold transforms in float64, quantize the weight once (RTN), and keep only that.

        round_weight=False keeps the merged weight unrounded until :meth:`set_rounded` (GPTQ).
        """
        w, b = self._transformed_weight(torch.float64, fold_row_scale=True)
        if self.quant.bits < 16:  # the step of every weight code, for packing into a real 4-bit layer
            self.register_buffer("weight_scale", self.quant.scale(w).float())
        if round_weight or self.quant.bits >= 16:
            w = self.quant(w)
        else:
            self.pending_weight = w
        dtype = self.weight.dtype
        self.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if b is not None:
            self.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        self._shared = {"input": self._shared["input"]}
        self.merged = True

    @torch.no_grad()
    def set_rounded(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Set the merged weight to integer ``codes`` (out, in) on the grid ``scale``, ``zero`` (out, groups)."""
        if self.pending_weight is None:
            raise ValueError("set_rounded needs a linear merged with round_weight=False")
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit the weight {tuple(self.weight.shape)}")
        w = dequantize_codes(codes.to(scale.device), scale, zero, self.quant.group_size)
        self.weight = nn.Parameter(w.to(self.weight.device, self.weight.dtype), requires_grad=False)
        self.pending_weight = None


class AttentionQuant(nn.Module):
    """Q/K transform P_h after RoPE, V transform P_v (merged into v_proj), and KV-cache quantizers.

    Called by the registered attention function on query (B, H, T, D), key and value (B, KVH, T, D).
    """

    def __init__(
        self,
        p_h: LearnableMatrix | None,
        p_v: LearnableMatrix | None,
        k_quant: ActivationQuantizer,
        v_quant: ActivationQuantizer,
    ):
        super().__init__()
        self.p_h, self.p_v = p_h, p_v
        self.k_quant, self.v_quant = k_quant, v_quant
        self.merged = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.p_h is not None:
            if self.merged:
                p, p_inv = self.ph_fixed.to(q.dtype), self.ph_inv_fixed.to(q.dtype)
            else:
                with _no_autocast(q.device.type):
                    p, p_inv = self.p_h.pair(torch.float32)
            q = q @ p_inv.transpose(0, 1).to(q.dtype)  # q P_h^-T
            k = k @ p.to(k.dtype)  # k P_h
        return q, self.k_quant(k), self.v_quant(v)

    @torch.no_grad()
    def merge(self) -> None:
        if self.p_h is not None:
            p, p_inv = self.p_h.pair(torch.float64)
            self.register_buffer("ph_fixed", p.float())
            self.register_buffer("ph_inv_fixed", p_inv.float())
        self.merged = True
