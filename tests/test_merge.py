"""With quantization off, the transformed-and-merged model computes the original logits."""

import copy

import pytest
import torch
from conftest import ARCHS, tiny_model

import flatquant as fq
from flatquant.calibrate import calibrate
from flatquant.modules import FlatQuantLinear, OnlineTransform
from flatquant.prepare import use_flatquant_attention
from flatquant.quantizer import ActivationQuantizer, WeightQuantizer
from flatquant.transforms import LearnableMatrix

OFF = dict(w_bits=16, a_bits=16, k_bits=16, v_bits=16)


def _calibrated(model, tokens, **cfg):
    base = dict(nsamples=tokens.shape[0], seqlen=tokens.shape[1], epochs=1, autocast_dtype="float32")
    fq.quantize(model, fq.FlatQuantConfig(**{**base, **cfg}), tokens, device="cpu", progress=False)
    return model


def _perturb_transforms(model):
    """Push every learnable factor away from an orthogonal matrix, so merging is tested in general."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LearnableMatrix):
                for p in m.parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("parametrisation", ["svd", "plain"])
def test_merge_is_exact_with_quantization_off(arch, parametrisation, tokens):
    model = tiny_model(arch)
    ref = model(tokens).logits
    # calibrated at 4 bits so that every transform exists; the quantizers are then switched off below
    quant = copy.deepcopy(model)
    cfg = fq.FlatQuantConfig(
        parametrisation=parametrisation,
        nsamples=8,
        seqlen=32,
        epochs=1,
        autocast_dtype="float32",
    )
    use_flatquant_attention(quant)
    calibrate(quant, cfg, tokens, device="cpu", progress=False)
    _perturb_transforms(quant)
    _quantizers_off(quant)
    before = quant(tokens).logits  # unmerged: transforms applied on the fly
    fq.merge_model(quant, "cpu")
    after = quant(tokens).logits
    torch.testing.assert_close(before, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_w4a4kv4_runs_and_stays_close(arch, tokens):
    model = tiny_model(arch)
    ref = model(tokens).logits
    rtn = _calibrated(copy.deepcopy(model), tokens, method="rtn")
    flat = _calibrated(copy.deepcopy(model), tokens, epochs=3)
    for m in (rtn, flat):
        out = m(tokens).logits
        assert torch.isfinite(out).all()
        assert not torch.equal(out, ref)  # quantization really happened


def _quantizers_off(model):
    """Switch every weight, activation and KV quantizer off, keeping all transforms."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer | ActivationQuantizer):
            m.bits = 16
    assert any(isinstance(m, LearnableMatrix) for m in model.modules())


def test_odd_sizes_without_power_of_two_factors(tokens):
    # hidden 54 = 6 x 9 (n ≡ 2 mod 4), MLP 70 = 7 x 10, 3 heads of 18
    model = tiny_model("llama", hidden_size=54, intermediate_size=70, num_attention_heads=3, num_key_value_heads=1)
    ref = model(tokens).logits
    quant = copy.deepcopy(model)
    use_flatquant_attention(quant)
    cfg = fq.FlatQuantConfig(nsamples=8, seqlen=32, epochs=1, autocast_dtype="float32")
    calibrate(quant, cfg, tokens, device="cpu", progress=False)
    _quantizers_off(quant)
    fq.merge_model(quant, "cpu")
    torch.testing.assert_close(quant(tokens).logits, ref, rtol=1e-4, atol=1e-4)


def test_one_online_transform_per_shared_input(tokens):
    model = _calibrated(tiny_model("llama"), tokens, **OFF)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj._shared["input"] is attn.k_proj._shared["input"] is attn.v_proj._shared["input"]
    assert mlp.gate_proj._shared["input"] is mlp.up_proj._shared["input"]
    online = [m for m in layer.modules() if isinstance(m, OnlineTransform)]
    assert len(online) == 4  # P_a (q/k/v), P_o, P_ug (gate/up), P_d
    assert all(isinstance(getattr(attn, n), FlatQuantLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported.*llama.*mistral.*qwen2.*qwen3"):
        fq.quantize(model, fq.FlatQuantConfig(method="rtn"))


def test_quantize_twice_is_refused(tokens):
    model = _calibrated(tiny_model("llama"), tokens, method="rtn")
    with pytest.raises(ValueError, match="already quantized"):
        fq.quantize(model, fq.FlatQuantConfig(method="rtn"))


def test_flatquant_needs_calibration_data():
    with pytest.raises(ValueError, match="calibration windows"):
        fq.quantize(tiny_model("llama"), fq.FlatQuantConfig())
