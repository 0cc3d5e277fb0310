"""The public entry point: calibrate, merge and fake-quantize a model in place."""

from __future__ import annotations

import torch
from torch import nn

from .arch import spec_for
from .calibrate import CalibrationResult, calibrate
from .config import FlatQuantConfig
from .prepare import merge_block, use_flatquant_attention


@torch.no_grad()
def merge_model(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Merge every prepared block (float64 folding, weight quantization), one block on ``device`` at a time."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for layer in model.get_submodule(spec_for(model).layers):
        home = next(layer.parameters()).device
        layer.to(device)
        merge_block(layer)
        layer.to(home)


def quantize(
    model: nn.Module,
    config: FlatQuantConfig,
    calibration_data: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    state_dir: str | None = None,
    progress: bool = True,
    **calibration_options,
) -> CalibrationResult:
    """Quantize ``model`` in place with ``config`` (fake quantization) and return the calibration result.

    calibration_data: (N, T) int64 token ids (see :func:`flatquant.data.calibration_windows`); required for
    ``method="flatquant"``, ignored by the ``rtn`` and ``rotation`` baselines.
    state_dir: where per-block progress is kept; rerunning with the same directory resumes.
    The result is also stored as ``model.flatquant`` so that :func:`save_quantized` can find it.
    calibration_options: ``offload``, ``memory_budget``, ``offload_dir`` (see :func:`flatquant.calibrate.calibrate`).
    """
    if not isinstance(config, FlatQuantConfig):
        raise TypeError(f"config must be a FlatQuantConfig, got {type(config).__name__}")
    spec_for(model)  # fails early, listing the supported architectures
    if getattr(model, "flatquant", None) is not None:
        raise ValueError("this model is already quantized; load a fresh copy of the original model")
    if calibration_data is not None and (calibration_data.dim() != 2 or calibration_data.dtype != torch.long):
        raise ValueError(
            f"calibration_data must be (N, T) int64 token ids, got {tuple(calibration_data.shape)} "
            f"{calibration_data.dtype}"
        )
    use_flatquant_attention(model)
    result = calibrate(
        model, config, calibration_data, device=device, state_dir=state_dir, progress=progress, **calibration_options
    )
    merge_model(model, device)
    model.flatquant = result
    return result
