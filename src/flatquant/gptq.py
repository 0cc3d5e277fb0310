"""GPTQ weight rounding (Frantar et al., arXiv 2210.17323) for the merged, transformed model.

GPTQ rounds the columns of a weight W (out, in) one at a time and spreads each column's rounding error over
the columns not yet rounded, weighted by the inverse Hessian H^-1 of the layer's reconstruction error
||X W^T - X Q^T||², H = X^T X / n. Here X is what the linear really sees in the merged fake-quantized model:
the transformed and quantized input. Blocks are processed in order, each fed by the already-rounded blocks
before it, and inside a block the linears are rounded in the order they are computed (q/k/v, o, gate/up,
down), so that every Hessian comes from inputs of already-rounded layers.

The grid GPTQ rounds onto is the calibrated one: per output channel (or per group of input columns) from
the merged weight and its learned clipping (LWC), exactly the grid RTN uses, so a diagonal Hessian gives
RTN's result.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import spec_for
from .bits import linear_path
from .calibrate import capture_block_inputs
from .config import FlatQuantConfig
from .modules import FlatQuantLinear
from .prepare import merge_block
from .quantizer import WeightQuantizer, expand_groups

# Linears that read the same input, in the order the block computes them.
STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


@torch.no_grad()
def gptq_codes(
    w: torch.Tensor,
    hessian: torch.Tensor,
    quant: WeightQuantizer,
    damping: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round w (out, in) with GPTQ onto ``quant``'s grid for w; returns (codes, scale, zero).

    hessian: (in, in), X^T X up to a factor. codes: (out, in) float64 integer values; scale, zero:
    (out, groups) float64, so that the rounded weight is ``dequantize_codes(codes, scale, zero, group)``.
    damping: added to the diagonal as a fraction of its mean. act_order: round columns in order of
    decreasing diag(H) (the grid stays that of the original column groups).
    """
    w = w.double().clone()  # (out, in)
    out_f, in_f = w.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not fit a weight with {in_f} columns")
    scale, zero = quant.grid(w)  # (out, groups): fixed before any error feedback
    col_scale = expand_groups(scale, in_f, quant.group_size)  # (out, in)
    col_zero = expand_groups(zero, in_f, quant.group_size)
    qmin, qmax = quant.code_range()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        col_scale, col_zero = col_scale[:, perm], col_zero[:, perm]
    hinv = _inverse_cholesky(h, damping)
    codes = torch.zeros_like(w)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()  # (out, B)
        err = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s, z = w1[:, i], col_scale[:, i1 + i], col_zero[:, i1 + i]
            c = torch.clamp(torch.round(col / s) + z, qmin, qmax)
            codes[:, i1 + i] = c
            e = (col - (c - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # the block's error onto the later columns at once
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero


def _inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping·mean(diag H)·I)^-1; row i holds the error-feedback weights of
    column i over the columns after it. Damping grows tenfold (up to three times) if H is not positive definite."""
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(4):
        damped = h + damping * 10**attempt * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise ValueError(f"the Hessian is not positive definite even with damping {damping * 1000:g}")


def code_dtype(quant: WeightQuantizer) -> torch.dtype:
    """The smallest integer dtype holding ``quant``'s codes (int8 for symmetric 4 bits, uint8 asymmetric)."""
    qmin, qmax = quant.code_range()
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise AssertionError(f"no integer dtype for codes {qmin}..{qmax}")


class _StageDone(Exception):
    """Raised once every linear of a stage has seen its input: the rest of the block is not needed."""


def _run_block(layer: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], batch_size):
        y = layer(x[s : s + batch_size], **kwargs)
        out[s : s + batch_size] = y[0] if isinstance(y, tuple | list) else y
    return out


def _hessians(layer, linears: dict[str, FlatQuantLinear], x, kwargs, batch_size) -> dict[str, torch.Tensor]:
    """X^T X / n (float64) of each linear's input over all windows, from one pass through the block.

    Each batch stops as soon as every linear of ``linears`` has seen its input.
    """
    sums, counts, seen = {}, {}, set()

    def observer(name):
        def observe(inp: torch.Tensor) -> None:
            flat = inp.detach().reshape(-1, inp.shape[-1]).float()  # (tokens, in)
            xtx = (flat.transpose(0, 1) @ flat).double()
            sums[name] = xtx if name not in sums else sums[name] + xtx
            counts[name] = counts.get(name, 0) + flat.shape[0]
            seen.add(name)
            if len(seen) == len(linears):
                raise _StageDone

        return observe

    for name, lin in linears.items():
        lin.input_observer = observer(name)
    try:
        for s in range(0, x.shape[0], batch_size):
            seen.clear()
            try:
                layer(x[s : s + batch_size], **kwargs)
            except _StageDone:
                pass
    finally:
        for lin in linears.values():
            lin.input_observer = None
    return {name: sums[name] / counts[name] for name in linears}


@torch.no_grad()
def gptq_block(layer: nn.Module, spec, x: torch.Tensor, kwargs: dict, cfg: FlatQuantConfig, batch_size: int):
    """Round the pending weights of a block merged with ``round_weights=False``; returns the saved tensors.

    The returned dict maps ``{path}.codes`` (integers), ``{path}.scale`` and ``{path}.zero`` (float64) of
    each rounded linear, e.g. ``mlp.down_proj.codes``.
    """
    saved = {}
    for stage in STAGES:
        paths = [linear_path(spec, role) for role in stage]
        linears = {p: layer.get_submodule(p) for p in paths}
        linears = {p: lin for p, lin in linears.items() if lin.pending_weight is not None}
        if not linears:
            continue
        hessians = _hessians(layer, linears, x, kwargs, batch_size)
        for path, lin in linears.items():
            codes, scale, zero = gptq_codes(
                lin.pending_weight, hessians[path], lin.quant, cfg.gptq_damping, cfg.gptq_act_order
            )
            lin.set_rounded(codes, scale, zero)
            saved[f"{path}.codes"] = codes.to(code_dtype(lin.quant)).cpu()
            saved[f"{path}.scale"], saved[f"{path}.zero"] = scale.cpu(), zero.cpu()
    return saved


@torch.no_grad()
def apply_rounded(layer: nn.Module, spec, saved: dict[str, torch.Tensor]) -> None:
    """Set the pending weights of a block from tensors returned by :func:`gptq_block` (a checkpoint)."""
    for role in sum(STAGES, ()):
        path = linear_path(spec, role)
        lin = layer.get_submodule(path)
        if lin.pending_weight is None:
            continue
        keys = [f"{path}.{k}" for k in ("codes", "scale", "zero")]
        missing = [k for k in keys if k not in saved]
        if missing:
            raise ValueError(f"the rounded weights lack {missing} (is the checkpoint complete?)")
        device = lin.pending_weight.device
        lin.set_rounded(*(saved[k].to(device) for k in keys))


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    cfg: FlatQuantConfig,
    windows: torch.Tensor,
    device: torch.device,
    progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """Merge every calibrated block and round its weights with GPTQ, block by block; returns the codes."""
    spec = spec_for(model)
    layers = model.get_submodule(spec.layers)
    x, kwargs = capture_block_inputs(model, windows, device)
    rounded = {}
    for i in tqdm(range(len(layers)), desc="GPTQ", disable=not progress):
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        merge_block(layer, round_weights=False)
        rounded[i] = gptq_block(layer, spec, x, kwargs, cfg, cfg.batch_size)
        x = _run_block(layer, x, kwargs, cfg.batch_size)  # the next block sees this block's rounded output
        layer.to(home)
    return rounded
