"""Architectures described as data: where the blocks, projections and norms of a model live."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths inside a Llama-style decoder model (pre-norm attention + gated MLP)."""

    layers: str = "model.layers"  # the ModuleList of decoder blocks, from the causal-LM root
    input_norm: str = "input_layernorm"  # feeds q, k, v
    post_norm: str = "post_attention_layernorm"  # feeds gate, up
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


_LLAMA_LIKE = ArchSpec()
_REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,  # q/k/v biases are carried through the transforms
    "qwen3": _LLAMA_LIKE,  # q/k norms act before RoPE, in the untransformed space
}
# the model types built in above: transformers' own layers, whose forward and masks the runtime knows (an
# architecture added with register_architecture may differ, e.g. scale a branch or mask otherwise)
BUILTIN_ARCHITECTURES = tuple(_REGISTRY)


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Make a Llama-like ``config.model_type`` quantizable by describing where its modules are."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    _REGISTRY[model_type] = spec


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported architectures: "
            f"{supported_architectures()} (add one with flatquant.register_architecture)"
        )
    return _REGISTRY[model_type]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(spec_for(model).layers)
