"""calib_inputs="quantized": each block trains on the outputs of the calibrated, fake-quantized blocks before it."""

import copy

import pytest
import torch
from conftest import tiny_model

import flatquant as fq
from flatquant import calibrate as calib_mod
from flatquant.arch import spec_for
from flatquant.transforms import factor_cache, precompute_factors


def _cfg(**kw):
    return fq.FlatQuantConfig(**{"nsamples": 8, "seqlen": 32, "epochs": 1, "autocast_dtype": "float32", **kw})


def _record_training_inputs(monkeypatch) -> list[torch.Tensor]:
    seen = []
    real_train = calib_mod._train_block

    def recording(layer, x, y, kwargs, cfg, lr_scale, bar):
        store = calib_mod.as_activations(x)
        seen.append(torch.cat([store.read(s, s + 1) for s in range(len(store))]).clone())
        return real_train(layer, x, y, kwargs, cfg, lr_scale, bar)

    monkeypatch.setattr(calib_mod, "_train_block", recording)
    return seen


def _inputs_of_block(model, i: int, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states entering block ``i`` in a forward pass of the whole model (another path than calibration)."""
    captured = []
    layer = model.get_submodule(spec_for(model).layers)[i]
    handle = layer.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True,
    )
    try:
        with torch.no_grad(), factor_cache():
            precompute_factors(model)  # the factors as calibration computes them (one batched solve)
            for row in tokens:
                model(row.unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(captured)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_blocks_train_on_the_outputs_of_the_calibrated_blocks(arch, tokens, monkeypatch):
    fp_model = tiny_model(arch, num_hidden_layers=3)
    model = copy.deepcopy(fp_model)
    seen = _record_training_inputs(monkeypatch)
    calib_mod.calibrate(model, _cfg(calib_inputs="quantized"), tokens, device="cpu", progress=False)
    assert len(seen) == 3
    # the calibrated, unmerged blocks are in place: a forward pass of the model feeds block i what it trained on
    for i in (1, 2):
        expected = _inputs_of_block(model, i, tokens)
        torch.testing.assert_close(seen[i], expected, rtol=1e-5, atol=1e-5)
        fp_inputs = _inputs_of_block(fp_model, i, tokens)
        assert (seen[i] - fp_inputs).abs().max() > 1e-2  # not the full-precision inputs
    torch.testing.assert_close(seen[0], _inputs_of_block(fp_model, 0, tokens))


def test_full_precision_inputs_stay_the_default(tokens, monkeypatch):
    fp_model = tiny_model("llama", num_hidden_layers=2)
    seen = _record_training_inputs(monkeypatch)
    calib_mod.calibrate(copy.deepcopy(fp_model), _cfg(), tokens, device="cpu", progress=False)
    torch.testing.assert_close(seen[1], _inputs_of_block(fp_model, 1, tokens), rtol=1e-5, atol=1e-5)


def test_quantized_inputs_resume_to_the_same_model(tmp_path, tokens, monkeypatch):
    base = tiny_model("llama", num_hidden_layers=3)
    cfg = _cfg(calib_inputs="quantized", epochs=2)
    reference = copy.deepcopy(base)
    fq.quantize(reference, cfg, tokens, device="cpu", progress=False)

    calls = []
    real_train = calib_mod._train_block

    def train_then_die(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while training block 2
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(calib_mod, "_train_block", train_then_die)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        fq.quantize(copy.deepcopy(base), cfg, tokens, device="cpu", state_dir=state, progress=False)
    calls.clear()
    monkeypatch.setattr(calib_mod, "_train_block", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    resumed = copy.deepcopy(base)
    fq.quantize(resumed, cfg, tokens, device="cpu", state_dir=state, progress=False)
    assert len(calls) == 1  # block 2 trained again, on inputs rebuilt through the two reloaded blocks
    assert torch.equal(resumed(tokens).logits, reference(tokens).logits)


def test_quantized_inputs_refuse_a_subset_of_blocks(tokens):
    with pytest.raises(ValueError, match=r"calib_inputs='quantized' needs every block.*blocks=\[1\]"):
        calib_mod.calibrate(
            tiny_model("llama", num_hidden_layers=2),
            _cfg(calib_inputs="quantized"),
            tokens,
            device="cpu",
            progress=False,
            blocks=[1],
        )


def test_calib_inputs_is_validated_and_the_default_keeps_old_fingerprints():
    with pytest.raises(ValueError, match=r"calib_inputs='quant' is not one of \('fp', 'quantized'\)"):
        fq.FlatQuantConfig(calib_inputs="quant")
    assert "calib_inputs" not in fq.FlatQuantConfig().calibration_dict()
    assert fq.FlatQuantConfig(calib_inputs="quantized").calibration_dict()["calib_inputs"] == "quantized"
