"""Bit settings (weight-only, KV-only, mixed), per-module overrides and what calibration trains for each."""

import argparse
import copy

import pytest
import torch
from conftest import tiny_model

import flatquant as fq
from flatquant import cli
from flatquant.modules import AttentionQuant, FlatQuantLinear, OnlineTransform
from flatquant.quantizer import ActivationQuantizer, WeightQuantizer

SETTINGS = {  # name: (config fields, weight method)
    "w4a4kv4": ({}, "rtn"),
    "w4a4kv4-gptq-g24": ({"w_group_size": 24}, "gptq"),  # 64 = 2 x 24 + 16: a shorter last group
    "w4a16": ({"a_bits": 16, "k_bits": 16, "v_bits": 16}, "gptq"),
    "w3a16-g24": ({"w_bits": 3, "a_bits": 16, "k_bits": 16, "v_bits": 16, "w_group_size": 24}, "rtn"),
    "w4a8": ({"a_bits": 8, "k_bits": 16, "v_bits": 16}, "rtn"),
    "k4v4": ({"w_bits": 16, "a_bits": 16}, "rtn"),
    "k3v3": ({"w_bits": 16, "a_bits": 16, "k_bits": 3, "v_bits": 3}, "rtn"),
    "k2v2": ({"w_bits": 16, "a_bits": 16, "k_bits": 2, "v_bits": 2}, "rtn"),
    "w3a3kv3": ({"w_bits": 3, "a_bits": 3, "k_bits": 3, "v_bits": 3}, "gptq"),
    "down8": ({"overrides": {"down_proj": {"w_bits": 8, "a_bits": 8}}}, "gptq"),
    "first-block-8": ({"overrides": {"layers.0.": {"w_bits": 8, "a_bits": 8, "k_bits": 8, "v_bits": 8}}}, "rtn"),
}


def _cfg(**kw):
    return fq.FlatQuantConfig(**{"nsamples": 8, "seqlen": 32, "epochs": 1, "autocast_dtype": "float32", **kw})


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_setting_calibrates_merges_evaluates_and_reloads(name, tokens, tmp_path):
    fields, weights = SETTINGS[name]
    base = tiny_model("qwen2")
    ref = base(tokens).logits
    model = copy.deepcopy(base)
    fq.quantize(model, _cfg(**fields, weight_method=weights), tokens, device="cpu", progress=False)
    out = model(tokens).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    loaded = fq.load_quantized(copy.deepcopy(base), fq.save_quantized(model, str(tmp_path / name)), device="cpu")
    assert torch.equal(loaded(tokens).logits, out)


def _trainable(model, kind):
    return [p for m in model.modules() if isinstance(m, kind) for p in m.parameters(recurse=False)]


def test_weight_only_calibration_trains_no_activation_or_kv_clipping(tokens):
    model = tiny_model("llama")
    cfg = _cfg(a_bits=16, k_bits=16, v_bits=16, w_group_size=24)
    fq.quantize(model, cfg, tokens, device="cpu", progress=False, merge=False)
    assert _trainable(model, ActivationQuantizer) == []
    clip = model.model.layers[0].mlp.down_proj.quant.clip_max  # LWC per group: 96 = 4 x 24 columns
    assert clip.shape == (64, 4, 1) and len(torch.unique(clip)) > 1  # learned, group by group
    assert all(m.p_h is None for m in model.modules() if isinstance(m, AttentionQuant))
    assert len(_trainable(model, WeightQuantizer)) == 2 * 7 * 2  # clip_max, clip_min of 7 linears per block
    assert all(m.kron is not None for m in model.modules() if isinstance(m, OnlineTransform))


def test_kv_only_calibration_trains_no_weight_clipping_and_no_linear_transforms(tokens):
    model = tiny_model("llama")
    fq.quantize(model, _cfg(w_bits=16, a_bits=16), tokens, device="cpu", progress=False, merge=False)
    assert _trainable(model, WeightQuantizer) == []
    assert all(m.kron is None and m.smooth is None for m in model.modules() if isinstance(m, OnlineTransform))
    attn = [m for m in model.modules() if isinstance(m, AttentionQuant)]
    assert all(m.p_h is not None and m.p_v is not None and m.k_quant.clip_max is not None for m in attn)


def test_overrides_set_the_bits_of_the_matching_modules_only(tokens):
    overrides = {
        "down_proj": {"a_bits": 8},
        "layers.0.": {"w_bits": 8, "a_bits": 8},
        "layers.1.self_attn": {"v_bits": 3},
    }
    model = tiny_model("llama")
    fq.quantize(model, _cfg(overrides=overrides), tokens, device="cpu", progress=False)
    for i, layer in enumerate(model.model.layers):
        for name, lin in layer.named_modules():
            if isinstance(lin, FlatQuantLinear):
                expected = (8, 8) if i == 0 else (4, 8 if name.endswith("down_proj") else 4)
                a_bits = lin._shared["input"].quant.bits
                assert (lin.quant.bits, a_bits) == expected, (i, name)
        fq_attn = layer.self_attn.flatquant_attn
        assert (fq_attn.k_quant.bits, fq_attn.v_quant.bits) == ((4, 4) if i == 0 else (4, 3))


def test_an_override_to_16_bits_equals_the_global_setting(tokens):
    base = tiny_model("llama")
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    fq.quantize(a, _cfg(overrides={"layers.": {"w_bits": 16, "a_bits": 16}}), tokens, device="cpu", progress=False)
    fq.quantize(b, _cfg(w_bits=16, a_bits=16), tokens, device="cpu", progress=False)
    assert torch.equal(a(tokens).logits, b(tokens).logits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dwn_proj": {"a_bits": 8}}, r"'dwn_proj' \(setting \['a_bits'\]\) matches no linear layer"),
        ({"layers.7.": {"w_bits": 8}}, "matches no linear layer.*model.layers.0.self_attn.q_proj"),
        ({"down_proj": {"k_bits": 8}}, "matches no attention module.*model.layers.0.self_attn"),
        ({"q_proj": {"a_bits": 8}}, "read one shared quantized input"),
    ],
)
def test_bad_overrides_are_reported_before_calibration(overrides, message, tokens):
    with pytest.raises(ValueError, match=message):
        fq.quantize(tiny_model("llama"), _cfg(overrides=overrides), tokens, device="cpu", progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"down_proj": {"x_bits": 8}}, "key 'x_bits' is not one of"),
        ({"down_proj": {"a_bits": 1}}, "a_bits=1 is out of range"),
        ({"": {"a_bits": 8}}, "non-empty"),
        ({"down_proj": {}}, "non-empty dict"),
    ],
)
def test_override_syntax_is_validated_by_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        fq.FlatQuantConfig(overrides=overrides)


def test_override_command_line_syntax():
    args = cli.build_parser().parse_args(
        ["quantize", "--override", "down_proj:a8,w8", "--override", "layers.0.:w8a8", "--override", "self_attn:kv3"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.overrides == {
        "down_proj": {"a_bits": 8, "w_bits": 8},
        "layers.0.": {"w_bits": 8, "a_bits": 8},
        "self_attn": {"k_bits": 3, "v_bits": 3},
    }
    assert cli.config_from_args(cli.build_parser().parse_args(["quantize"])).overrides == {}
    for bad in ("down_proj", "down_proj:x8", ":w8", "down_proj:w8b"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected PATTERN:BITS"):
            cli.parse_override(bad)


def test_gptq_options_from_the_command_line():
    args = cli.build_parser().parse_args(
        ["quantize", "--weight-method", "gptq", "--gptq-damping", "0.05", "--gptq-act-order", "--w-group-size", "128"]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.weight_method, cfg.gptq_damping, cfg.gptq_act_order, cfg.w_group_size) == ("gptq", 0.05, True, 128)
    with pytest.raises(ValueError, match="gptq_damping=0"):
        fq.FlatQuantConfig(gptq_damping=0.0)
