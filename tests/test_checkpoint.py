import copy
import json
import os

import pytest
import torch
from conftest import tiny_model

import flatquant as fq
from flatquant import checkpoint


def _quantized(tokens, **kw):
    model = tiny_model("qwen2")
    original = copy.deepcopy(model)
    cfg = fq.FlatQuantConfig(nsamples=8, seqlen=32, epochs=2, autocast_dtype="float32", **kw)
    fq.quantize(model, cfg, tokens, device="cpu", progress=False)
    return original, model


def test_save_load_round_trip_is_exact(tmp_path, tokens):
    original, model = _quantized(tokens, w_group_size=16)
    path = fq.save_quantized(model, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(path)) == ["calibration.safetensors", "flatquant.json"]
    loaded = fq.load_quantized(copy.deepcopy(original), path, device="cpu")
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert loaded.flatquant.config == model.flatquant.config
    assert not torch.equal(loaded(tokens).logits, original(tokens).logits)


def test_save_refuses_to_overwrite_and_unquantized_models(tmp_path, tokens):
    _, model = _quantized(tokens, method="rtn")
    path = fq.save_quantized(model, str(tmp_path / "ckpt"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fq.save_quantized(model, path)
    fq.save_quantized(model, path, overwrite=True)
    with pytest.raises(ValueError, match="no FlatQuant calibration"):
        fq.save_quantized(tiny_model("llama"), str(tmp_path / "other"))


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, tokens, monkeypatch):
    _, model = _quantized(tokens, method="rtn")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        fq.save_quantized(model, str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == []


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path, tokens):
    original, model = _quantized(tokens, method="rtn")
    with pytest.raises(FileNotFoundError, match="not a flatquant checkpoint"):
        fq.load_quantized(copy.deepcopy(original), str(tmp_path / "nowhere"))
    path = fq.save_quantized(model, str(tmp_path / "ckpt"))
    with open(os.path.join(path, "calibration.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="corrupt"):
        fq.load_quantized(copy.deepcopy(original), path)
    with open(os.path.join(path, "flatquant.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        fq.load_quantized(copy.deepcopy(original), path)


def test_checkpoint_for_another_model_is_refused(tmp_path, tokens):
    _, model = _quantized(tokens, method="rtn")
    path = fq.save_quantized(model, str(tmp_path / "ckpt"))
    other = tiny_model("qwen2", hidden_size=32)
    with pytest.raises(ValueError, match="was made for"):
        fq.load_quantized(other, path)
    meta = json.load(open(os.path.join(path, "flatquant.json")))
    assert meta["config"]["method"] == "rtn" and meta["format_version"] == 1
