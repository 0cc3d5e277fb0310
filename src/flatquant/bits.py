"""Bits of every quantizer of a block: the config's global bits with per-module overrides by name pattern.

An override pattern is a substring of a module's full name in the model, e.g. ``down_proj`` matches
``model.layers.{i}.mlp.down_proj`` of every block and ``layers.0.`` every module of block 0 (the trailing dot
keeps it from matching ``layers.10``). ``w_bits`` / ``a_bits`` apply to the linear layers a pattern matches
(the activation bits of a linear are those of its input); ``k_bits`` / ``v_bits`` to the attention modules
(``model.layers.{i}.self_attn``). When several patterns match, the later one wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .arch import ArchSpec, spec_for
from .config import FlatQuantConfig

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Linears that read one shared, quantized input (one online transform and one activation quantizer).
SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"))


def linear_path(spec: ArchSpec, role: str) -> str:
    """Path of a linear inside a block, e.g. ``self_attn.q_proj``."""
    parent = spec.attn if role in ("q", "k", "v", "o") else spec.mlp
    return f"{parent}.{getattr(spec, role)}"


def _resolve(cfg: FlatQuantConfig, name: str, key: str) -> int:
    value = getattr(cfg, key)
    for pattern, bits in cfg.overrides.items():
        if pattern in name and key in bits:
            value = bits[key]
    return value


@dataclass(frozen=True)
class BlockBits:
    """Resolved bits of one block: weights and inputs of each linear role, and the KV cache."""

    w: dict[str, int]
    a: dict[str, int]
    k: int
    v: int

    def quantizes(self, *roles: str) -> bool:
        """Whether any of these linears quantizes its weight or its input."""
        return any(self.w[r] < 16 or self.a[r] < 16 for r in roles)


def block_bits(cfg: FlatQuantConfig, spec: ArchSpec, layer_name: str) -> BlockBits:
    """The bits of block ``layer_name`` (e.g. ``model.layers.3``); raises when a shared input gets two."""
    names = {r: f"{layer_name}.{linear_path(spec, r)}" for r in LINEAR_ROLES}
    w = {r: _resolve(cfg, n, "w_bits") for r, n in names.items()}
    a = {r: _resolve(cfg, n, "a_bits") for r, n in names.items()}
    for roles in SHARED_INPUTS:
        values = {names[r]: a[r] for r in roles}
        if len(set(values.values())) > 1:
            raise ValueError(
                f"a_bits overrides give different bits {values} to linears that read one shared quantized "
                f"input; override a_bits of {[getattr(spec, r) for r in roles]} together"
            )
    attn = f"{layer_name}.{spec.attn}"
    return BlockBits(w, a, _resolve(cfg, attn, "k_bits"), _resolve(cfg, attn, "v_bits"))


def quantized_module_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of every quantized linear, names of every attention module) of the model."""
    spec = spec_for(model)
    count = len(model.get_submodule(spec.layers))
    blocks = [f"{spec.layers}.{i}" for i in range(count)]
    linears = [f"{b}.{linear_path(spec, r)}" for b in blocks for r in LINEAR_ROLES]
    return linears, [f"{b}.{spec.attn}" for b in blocks]


def validate_overrides(model: nn.Module, cfg: FlatQuantConfig) -> None:
    """Raise ValueError for a pattern that matches no module its keys apply to, or conflicting a_bits."""
    linears, attentions = quantized_module_names(model)
    for pattern, bits in cfg.overrides.items():
        wa, kv = sorted({"w_bits", "a_bits"} & set(bits)), sorted({"k_bits", "v_bits"} & set(bits))
        for keys, names, kind in ((wa, linears, "linear layer"), (kv, attentions, "attention module")):
            if keys and not any(pattern in n for n in names):
                raise ValueError(
                    f"override pattern {pattern!r} (setting {keys}) matches no {kind} of the model; "
                    f"{kind} names look like {names[0]!r} … {names[-1]!r}"
                )
    spec = spec_for(model)
    for i in range(len(model.get_submodule(spec.layers))):
        block_bits(cfg, spec, f"{spec.layers}.{i}")
