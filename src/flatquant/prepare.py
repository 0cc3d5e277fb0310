"""Swap a decoder block's modules for their FlatQuant versions, and merge them after calibration.

No Hugging Face forward is copied: norms and linears are replaced in place, and the K/Q transform and the
KV-cache quantizers run inside an attention function registered with transformers' AttentionInterface
that then delegates to SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .arch import ArchSpec, set_submodule
from .bits import block_bits
from .config import FlatQuantConfig
from .modules import AttentionQuant, FlatQuantLinear, OnlineTransform, TransformedNorm
from .quantizer import ActivationQuantizer, WeightQuantizer
from .transforms import KroneckerTransform, LearnableMatrix

ATTN_IMPLEMENTATION = "flatquant"
CALIBRATED_TYPES = (OnlineTransform, AttentionQuant, WeightQuantizer)


def flatquant_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention after the block's Q/K transform and KV fake quantization (when it has them)."""
    fq = getattr(module, "flatquant_attn", None)
    if fq is not None:
        query, key, value = fq(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_flatquant_attention(model: nn.Module) -> None:
    """Register the attention function and select it for ``model`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, flatquant_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.config._attn_implementation = ATTN_IMPLEMENTATION


def _dims(config) -> tuple[int, int, int]:
    """(hidden size, attention heads, head_dim)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, heads, head_dim


def prepare_block(
    layer: nn.Module,
    spec: ArchSpec,
    model_config,
    cfg: FlatQuantConfig,
    act_stats: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    layer_name: str | None = None,
) -> None:
    """Replace the block's norms, linears and attention hooks in place.

    act_stats: per-channel max |x| of the inputs of q ("qkv"), gate/up ("upgate") and down ("down"),
    used to initialise the per-channel scaling; without it the scaling starts at one.
    layer_name: the block's name in the model (``model.layers.3``), matched by ``cfg.overrides``.
    A transform (and its scaling) is made only where something it feeds is quantized, so a weight-only or
    KV-only setting learns no transform, scaling or clipping that could not change its output.
    """
    if cfg.overrides and layer_name is None:
        raise ValueError("config overrides need the block's name: pass layer_name='model.layers.N'")
    bits = block_bits(cfg, spec, layer_name or "")
    hidden, heads, head_dim = _dims(model_config)
    attn, mlp = layer.get_submodule(spec.attn), layer.get_submodule(spec.mlp)
    transforms = cfg.uses_transforms
    learn_clip = cfg.method == "flatquant"
    kron_kw = {"parametrisation": cfg.parametrisation, "init": cfg.effective_init, "generator": generator}

    def act_quant(bits: int, symmetric: bool) -> ActivationQuantizer:
        return ActivationQuantizer(bits, symmetric, learn_clip and cfg.learnable_act_clip)

    def online(roles: tuple, n: int, smooth: bool, n2_identity_heads: int | None = None) -> OnlineTransform:
        kron = None
        useful = bits.quantizes(*roles)
        if transforms and useful:
            if n2_identity_heads is None:
                kron = KroneckerTransform.for_size(n, **kron_kw)
            else:
                kron = KroneckerTransform(n2_identity_heads, n // n2_identity_heads, n2_identity=True, **kron_kw)
        quant = act_quant(bits.a[roles[0]], cfg.a_symmetric)
        return OnlineTransform(n, quant, kron, smooth and useful and cfg.method == "flatquant")

    def linear(role: str, lin: nn.Linear, t: OnlineTransform, **kw) -> FlatQuantLinear:
        wq = WeightQuantizer(
            lin.out_features,
            lin.in_features,
            bits.w[role],
            cfg.w_symmetric,
            cfg.w_group_size,
            learn_clip and cfg.learnable_weight_clip,
        )
        return FlatQuantLinear(lin, wq, t, **kw)

    # attention: P_a shared by q/k/v, P_v per head on V, P_h on Q/K after RoPE, P_o before o_proj
    q, k, v, o = (attn.get_submodule(n) for n in (spec.q, spec.k, spec.v, spec.o))
    t_a = online(("q", "k", "v"), hidden, smooth=cfg.smooth)
    # P_v shapes the V cache, v_proj's rows and o_proj's input and weight
    use_p_v = transforms and (bits.v < 16 or bits.w["v"] < 16 or bits.quantizes("o"))
    p_v = LearnableMatrix(head_dim, cfg.parametrisation, cfg.effective_init, generator) if use_p_v else None
    p_h = (
        LearnableMatrix(head_dim, cfg.parametrisation, cfg.effective_init, generator)
        if transforms and bits.k < 16
        else None
    )
    set_submodule(layer, spec.input_norm, TransformedNorm(layer.get_submodule(spec.input_norm), t_a))
    setattr(attn, spec.q, linear("q", q, t_a))
    setattr(attn, spec.k, linear("k", k, t_a))
    setattr(attn, spec.v, linear("v", v, t_a, out_head=p_v))
    t_o = online(("o",), o.in_features, smooth=False, n2_identity_heads=heads)
    setattr(attn, spec.o, linear("o", o, t_o, owns_input=True, right_extra=p_v))
    attn.flatquant_attn = AttentionQuant(
        p_h,
        p_v,
        act_quant(bits.k, cfg.kv_symmetric),
        act_quant(bits.v, cfg.kv_symmetric),
    )

    # MLP: P_ug shared by gate/up, P_d before down_proj with its scaling folded into up's rows
    gate, up, down = (mlp.get_submodule(n) for n in (spec.gate, spec.up, spec.down))
    t_ug = online(("gate", "up"), hidden, smooth=cfg.smooth)
    t_d = online(("down",), down.in_features, smooth=cfg.smooth)
    set_submodule(layer, spec.post_norm, TransformedNorm(layer.get_submodule(spec.post_norm), t_ug))
    setattr(mlp, spec.gate, linear("gate", gate, t_ug))
    setattr(mlp, spec.up, linear("up", up, t_ug, row_scale=t_d))
    setattr(mlp, spec.down, linear("down", down, t_d, owns_input=True))

    if act_stats is not None:
        _init_smoothing(t_a, [q, k, v], act_stats.get("qkv"), cfg.smooth_alpha)
        _init_smoothing(t_ug, [gate, up], act_stats.get("upgate"), cfg.smooth_alpha)
        _init_smoothing(t_d, [down], act_stats.get("down"), cfg.smooth_alpha)


@torch.no_grad()
def _init_smoothing(t: OnlineTransform, linears: list[nn.Linear], act_max, alpha: float) -> None:
    """c_j = max|W_:,j|^(1-alpha) / max|x_j|^alpha over the concatenated weights, clamped >= 1e-5."""
    if t.smooth is None or act_max is None:
        return
    w_max = torch.cat([lin.weight.detach().abs().float() for lin in linears], 0).amax(0).cpu()
    a_max = act_max.float().cpu().clamp_min(1e-5)
    c = (w_max.clamp_min(1e-5).pow(1 - alpha) / a_max.pow(alpha)).clamp_min(1e-5)
    t.smooth.data.copy_(c.to(t.smooth.device))


@torch.no_grad()
def merge_block(layer: nn.Module, round_weights: bool = True) -> None:
    """Fold every transform into weights and norms (float64), quantize weights, fix online parts.

    round_weights=False leaves each quantized linear's merged weight unrounded (its float64 copy in
    ``pending_weight``) for GPTQ or for rounded weights loaded from a checkpoint.
    """
    linears = [m for m in layer.modules() if isinstance(m, FlatQuantLinear) and not m.merged]
    for lin in linears:  # weights first: they read the scalings that the norms then absorb
        lin.merge(round_weight=round_weights)
    for m in list(layer.modules()):
        if isinstance(m, TransformedNorm) and not m.transform.merged:
            m.merge()
        elif isinstance(m, OnlineTransform) and not m.merged:
            m.merge()  # o_proj / down_proj inputs: down's scaling went into up_proj's rows
        elif isinstance(m, AttentionQuant) and not m.merged:
            m.merge()


def calibration_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every calibrated parameter and buffer of the block (not the original weights), on the CPU."""
    state = {}
    for name, module in layer.named_modules():
        if isinstance(module, CALIBRATED_TYPES):
            for key, value in module.state_dict().items():
                if value is not None:
                    state[f"{name}.{key}"] = value.detach().cpu().clone()
    return state


def load_calibration_state(layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`calibration_state`; raises if a key is missing or unexpected."""
    expected = calibration_state(layer)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"calibration state does not match the block: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it saved with another config or model?)"
        )
    for name, module in layer.named_modules():
        if isinstance(module, CALIBRATED_TYPES):
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            own = {k: sub[k] for k in module.state_dict()}
            module.load_state_dict(own, strict=True)
