"""Save and load calibrated parameters: ``flatquant.json`` + ``calibration.safetensors`` (no pickle).

Loading applies them to the original model (prepare, load, merge) and so reproduces the quantized model
exactly. A directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import spec_for
from .calibrate import CalibrationResult
from .config import FlatQuantConfig
from .files import atomic_directory, read_format_json
from .pipeline import merge_model
from .prepare import load_calibration_state, prepare_block, use_flatquant_attention

FORMAT = "flatquant-calibration"
FORMAT_VERSION = 1
_CONFIG_FILE, _TENSORS_FILE = "flatquant.json", "calibration.safetensors"


def _model_identity(model: nn.Module) -> dict:
    c = model.config
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
    with atomic_directory(path, overwrite) as tmp:
        tensors = {f"layers.{i}.{k}": v for i, st in result.state.items() for k, v in st.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, _TENSORS_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": result.config.to_dict(),
            "model": _model_identity(model),
            "block_losses": {str(k): v for k, v in result.losses.items()},
            "calib_seconds": result.seconds,
            "metadata": metadata or {},
        }
        with open(os.path.join(tmp, _CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    return path


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved calibration, with clear errors for missing or corrupt files."""
    cfg_path, t_path = os.path.join(path, _CONFIG_FILE), os.path.join(path, _TENSORS_FILE)
    if not os.path.isdir(path) or not os.path.isfile(cfg_path) or not os.path.isfile(t_path):
        raise FileNotFoundError(f"{path} is not a flatquant checkpoint (needs {_CONFIG_FILE} and {_TENSORS_FILE})")
    meta = read_format_json(cfg_path, FORMAT, FORMAT_VERSION)
    try:
        tensors = load_file(t_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{t_path} is corrupt: {e}") from e
    return meta, tensors


def load_quantized(model: nn.Module, path: str, device: torch.device | str | None = None) -> nn.Module:
    """Apply a saved calibration to the original (unquantized) ``model`` in place and return it."""
    meta, tensors = read_checkpoint(path)
    ident = _model_identity(model)
    if meta["model"] != ident:
        raise ValueError(f"checkpoint was made for {meta['model']}, but the model is {ident}")
    cfg = FlatQuantConfig.from_dict(meta["config"])
    spec = spec_for(model)
    layers = model.get_submodule(spec.layers)
    result = CalibrationResult(cfg, seconds=meta.get("calib_seconds", 0.0))
    use_flatquant_attention(model)
    for i, layer in enumerate(layers):
        prefix = f"layers.{i}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        prepare_block(layer, spec, model.config, cfg)
        load_calibration_state(layer, state)
        for p in layer.parameters():
            p.requires_grad_(False)
        result.state[i] = state
        result.losses[i] = meta["block_losses"].get(str(i), float("nan"))
    merge_model(model, device)
    model.flatquant = result
    return model
