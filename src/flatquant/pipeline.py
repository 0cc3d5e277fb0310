"""The public entry point: calibrate, merge and fake-quantize a model in place."""

from __future__ import annotations

import torch
from torch import nn

from .arch import spec_for
from .bits import validate_overrides
from .calibrate import CalibrationResult, calibrate
from .config import FlatQuantConfig
from .gptq import apply_rounded, gptq_model
from .prepare import merge_block, use_flatquant_attention


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def merge_model(
    model: nn.Module,
    device: torch.device | str | None = None,
    rounded: dict[int, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Merge every prepared block (float64 folding, weight quantization), one block on ``device`` at a time.

    Weights are rounded with RTN, or set from ``rounded`` (GPTQ codes per block, as saved in a checkpoint).
    """
    device = _device(device)
    spec = spec_for(model)
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        home = next(layer.parameters()).device
        layer.to(device)
        merge_block(layer, round_weights=rounded is None)
        if rounded is not None:
            apply_rounded(layer, spec, rounded.get(i, {}))
        layer.to(home)


def round_weights(
    model: nn.Module,
    result: CalibrationResult,
    calibration_data: torch.Tensor | None = None,
    *,
    weight_method: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Merge a model calibrated with ``quantize(..., merge=False)`` and round its weights.

    weight_method: ``rtn`` or ``gptq`` (default: the calibration's config). GPTQ needs the calibration
    windows. One calibration can be finished both ways on deep copies of the calibrated model. Returns the
    result (config with this weight method, GPTQ codes) that is stored as ``model.flatquant``.
    """
    cfg = result.config if weight_method is None else result.config.replace(weight_method=weight_method)
    result = CalibrationResult(
        cfg, dict(result.state), dict(result.losses), result.seconds, peak_gpu_bytes=result.peak_gpu_bytes
    )
    if cfg.weight_method == "gptq":
        _check_windows(calibration_data, required=True)
        result.rounded = gptq_model(model, cfg, calibration_data, _device(device), progress)
    else:
        merge_model(model, device)
    model.flatquant = result
    return result


def _check_windows(data: torch.Tensor | None, required: bool) -> None:
    if data is None:
        if required:
            raise ValueError("weight_method='gptq' needs calibration windows (N, T) of token ids")
        return
    if data.dim() != 2 or data.dtype != torch.long:
        raise ValueError(f"calibration_data must be (N, T) int64 token ids, got {tuple(data.shape)} {data.dtype}")


def quantize(
    model: nn.Module,
    config: FlatQuantConfig,
    calibration_data: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    state_dir: str | None = None,
    progress: bool = True,
    merge: bool = True,
    **calibration_options,
) -> CalibrationResult:
    """Quantize ``model`` in place with ``config`` (fake quantization) and return the calibration result.

    calibration_data: (N, T) int64 token ids (see :func:`flatquant.data.calibration_windows`); required for
    ``method="flatquant"`` and for GPTQ weights, otherwise unused.
    state_dir: where per-block progress is kept; rerunning with the same directory resumes.
    merge=False stops after calibration: finish with :func:`round_weights` (e.g. on copies, RTN and GPTQ).
    The result is also stored as ``model.flatquant`` so that :func:`save_quantized` can find it.
    calibration_options: ``offload``, ``memory_budget``, ``offload_dir`` (see :func:`flatquant.calibrate.calibrate`).
    """
    if not isinstance(config, FlatQuantConfig):
        raise TypeError(f"config must be a FlatQuantConfig, got {type(config).__name__}")
    spec_for(model)  # fails early, listing the supported architectures
    if getattr(model, "flatquant", None) is not None:
        raise ValueError("this model is already quantized; load a fresh copy of the original model")
    _check_windows(calibration_data, required=config.weight_method == "gptq" and merge)
    validate_overrides(model, config)
    use_flatquant_attention(model)
    result = calibrate(
        model, config, calibration_data, device=device, state_dir=state_dir, progress=progress, **calibration_options
    )
    if not merge:
        return result
    return round_weights(model, result, calibration_data, device=device, progress=progress)
