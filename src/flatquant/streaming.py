"""Calibrate models larger than memory: blocks materialised one at a time from safetensors shards.

The model is built on the meta device from its ``config.json``; the parts outside the decoder blocks
(embeddings, final norm, head) are loaded to capture block 0's inputs and dropped again, and each block is
copied from the meta skeleton and filled from the shards only while it is calibrated.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .arch import set_submodule, spec_for
from .prepare import use_flatquant_attention

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class ShardedCheckpoint:
    """Tensor names of a local Hugging Face safetensors checkpoint (one file or an index of shards)."""

    def __init__(self, folder: str):
        self.folder = folder
        index, single = os.path.join(folder, _INDEX), os.path.join(folder, _SINGLE)
        if os.path.isfile(index):
            with open(index) as f:
                self.files = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), _SINGLE)
        else:
            raise FileNotFoundError(
                f"{folder} has neither {_INDEX} nor {_SINGLE}: streaming needs a local Hugging Face folder "
                "with safetensors weights"
            )

    def load(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (CPU), opening each shard once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(os.path.join(self.folder, file), framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


class StreamingModel:
    """A causal LM whose decoder blocks are read from disk one at a time (see :func:`flatquant.calibrate`).

    folder: a local Hugging Face model folder (``config.json`` and safetensors weights).
    dtype: the dtype of the loaded weights (default: as stored).
    """

    streams_blocks = True
    in_place = False

    def __init__(self, folder: str, dtype: str | torch.dtype | None = None):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{folder}/config.json does not exist: streaming needs a local model folder")
        self.folder = folder
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.checkpoint = ShardedCheckpoint(folder)
        config = AutoConfig.from_pretrained(folder)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=self.dtype or config.dtype)
        self.skeleton.eval()
        use_flatquant_attention(self.skeleton)
        self.config = self.skeleton.config
        self.spec = spec_for(self.skeleton)
        self.layers = self.skeleton.get_submodule(self.spec.layers)
        self._prefix = self.spec.layers + "."

    def __len__(self) -> int:
        return len(self.layers)

    def block_names(self, i: int) -> list[str]:
        prefix = f"{self._prefix}{i}."
        return [k for k in self.checkpoint.files if k.startswith(prefix)]

    def block(self, i: int, device) -> nn.Module:
        """Block ``i`` with its weights, on ``device``; the skeleton keeps its meta copy."""
        prefix = f"{self._prefix}{i}."
        state = {k[len(prefix) :]: v for k, v in self.checkpoint.load(self.block_names(i), self.dtype).items()}
        layer = copy.deepcopy(self.layers[i], memo={id(self.config): self.config})  # shares the config
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{self.folder}: the weights of block {i} do not match the model: {e}") from e
        return layer.to(device)

    def release(self, i: int, layer: nn.Module) -> None:
        """Nothing to do: the materialised copy is dropped by the caller."""

    def capture(self, windows, device, make_store=None):
        """Block 0's inputs: load everything outside the blocks, run it, and drop it again."""
        from .calibrate import capture_block_inputs

        names = [k for k in self.checkpoint.files if not k.startswith(self._prefix)]
        self.skeleton.load_state_dict(self.checkpoint.load(names, self.dtype), strict=False, assign=True)
        if getattr(self.config, "tie_word_embeddings", False):
            self.skeleton.tie_weights()
        _materialise_outside(self.skeleton, self.layers)
        try:
            return capture_block_inputs(self.skeleton, windows, device, make_store)
        finally:  # free the embeddings and the head again
            for module in self.skeleton.modules():
                if not any(module is m for m in self.layers.modules()):
                    for name, p in list(module.named_parameters(recurse=False)):
                        setattr(module, name, nn.Parameter(p.to("meta"), requires_grad=False))


def _materialise_outside(model: nn.Module, layers: nn.ModuleList) -> None:
    """Rebuild modules outside the blocks whose buffers are computed, not stored (rotary frequencies), and
    check that every parameter outside the blocks was loaded."""
    inside = {id(m) for m in layers.modules()}
    for name, module in list(model.named_modules()):
        if id(module) in inside or not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        with torch.device("cpu"):
            set_submodule(model, name, type(module)(config=module.config))
    for name, module in model.named_modules():
        if id(module) not in inside:
            for pname, p in module.named_parameters(recurse=False):
                if p.is_meta:
                    raise ValueError(f"{name}.{pname} is missing from the checkpoint")
