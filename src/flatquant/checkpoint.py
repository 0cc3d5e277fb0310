"""Save and load calibrated parameters: ``flatquant.json`` + ``calibration.safetensors`` (no pickle).

Loading applies them to the original model (prepare, load, merge) and so reproduces the quantized model
exactly. RTN weights are recomputed on loading; GPTQ weights depend on the calibration data, so a GPTQ
checkpoint also holds them in ``gptq.safetensors`` (integer codes with their per-channel/group scale and zero).
A directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import spec_for
from .bits import validate_overrides
from .calibrate import CalibrationResult
from .config import FlatQuantConfig
from .files import atomic_directory, read_format_json
from .pipeline import merge_model
from .prepare import load_calibration_state, prepare_block, use_flatquant_attention

FORMAT = "flatquant-calibration"
FORMAT_VERSION = 1
_CONFIG_FILE, _TENSORS_FILE, _ROUNDED_FILE = "flatquant.json", "calibration.safetensors", "gptq.safetensors"


def _model_identity(c) -> dict:
    """The shape of the model a calibration belongs to, from its Hugging Face config."""
    return {
        "model_type": c.model_type,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
    }


def save_quantized(model: nn.Module, path: str, overwrite: bool = False, metadata: dict | None = None) -> str:
    """Write the calibration of a model returned by :func:`flatquant.quantize` to directory ``path``."""
    result: CalibrationResult | None = getattr(model, "flatquant", None)
    if result is None:
        raise ValueError("model has no FlatQuant calibration: run flatquant.quantize(model, ...) first")
    return write_calibration(result, model.config, path, overwrite, metadata)


def write_calibration(
    result: CalibrationResult, model_config, path: str, overwrite: bool = False, metadata: dict | None = None
) -> str:
    """Write a calibration result for the model described by ``model_config`` (its Hugging Face config).

    This is what :func:`save_quantized` writes; it also serves results of :func:`flatquant.calibrate_distributed`
    and of streamed models, which never exist as one quantized model in memory.
    """
    n = model_config.num_hidden_layers
    if sorted(result.state) != list(range(n)):
        raise ValueError(f"the calibration covers blocks {sorted(result.state)}, but the model has {n} blocks")
    with atomic_directory(path, overwrite) as tmp:
        tensors = {f"layers.{i}.{k}": v for i, st in result.state.items() for k, v in st.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, _TENSORS_FILE))
        if result.config.weight_method == "gptq":
            rounded = {f"layers.{i}.{k}": v for i, st in result.rounded.items() for k, v in st.items()}
            save_file({k: v.contiguous() for k, v in rounded.items()}, os.path.join(tmp, _ROUNDED_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": result.config.to_dict(),
            "model": _model_identity(model_config),
            "block_losses": {str(k): v for k, v in result.losses.items()},
            "calib_seconds": result.seconds,
            "metadata": metadata or {},
        }
        with open(os.path.join(tmp, _CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    return path


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from e


def read_rounded(path: str) -> dict[int, dict[str, torch.Tensor]]:
    """The GPTQ codes of a checkpoint by block index (``{}`` for an RTN checkpoint's missing file)."""
    file = os.path.join(path, _ROUNDED_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} was saved with GPTQ weights but {_ROUNDED_FILE} is missing")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(file).items():
        _, index, rest = key.split(".", 2)
        out.setdefault(int(index), {})[rest] = value
    return out


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved calibration, with clear errors for missing or corrupt files."""
    cfg_path, t_path = os.path.join(path, _CONFIG_FILE), os.path.join(path, _TENSORS_FILE)
    if not os.path.isdir(path) or not os.path.isfile(cfg_path) or not os.path.isfile(t_path):
        raise FileNotFoundError(f"{path} is not a flatquant checkpoint (needs {_CONFIG_FILE} and {_TENSORS_FILE})")
    meta = read_format_json(cfg_path, FORMAT, FORMAT_VERSION)
    return meta, _load_tensors(t_path)


def load_quantized(model: nn.Module, path: str, device: torch.device | str | None = None) -> nn.Module:
    """Apply a saved calibration to the original (unquantized) ``model`` in place and return it."""
    meta, tensors = read_checkpoint(path)
    ident = _model_identity(model.config)
    if meta["model"] != ident:
        raise ValueError(f"checkpoint was made for {meta['model']}, but the model is {ident}")
    cfg = FlatQuantConfig.from_dict(meta["config"])
    result = CalibrationResult(cfg, seconds=meta.get("calib_seconds", 0.0))
    result.rounded = read_rounded(path) if cfg.weight_method == "gptq" else {}
    for i in range(len(model.get_submodule(spec_for(model).layers))):
        prefix = f"layers.{i}."
        result.state[i] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        result.losses[i] = meta["block_losses"].get(str(i), float("nan"))
    return apply_calibration(model, result, device)


def apply_calibration(model: nn.Module, result: CalibrationResult, device: torch.device | str | None = None):
    """Swap every block of the original ``model``, load ``result``'s tensors and merge (in place).

    GPTQ-rounded weights (``result.rounded``) are used where present; otherwise the weights are rounded
    with RTN on the calibrated grid.
    """
    cfg, spec = result.config, spec_for(model)
    validate_overrides(model, cfg)
    use_flatquant_attention(model)
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        prepare_block(layer, spec, model.config, cfg, layer_name=f"{spec.layers}.{i}")
        load_calibration_state(layer, result.state[i])
        for p in layer.parameters():
            p.requires_grad_(False)
    merge_model(model, device, result.rounded or None)
    model.flatquant = result
    return model
