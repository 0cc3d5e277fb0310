import copy
import os

import pytest
import torch
from conftest import tiny_model

import flatquant as fq
from flatquant import calibrate as calib_mod
from flatquant import streaming
from flatquant.calibrate import calibrate
from flatquant.offload import Activations, choose_placement


def _cfg(**kw):
    return fq.FlatQuantConfig(**{"nsamples": 8, "seqlen": 32, "epochs": 2, "autocast_dtype": "float32", **kw})


def _in_memory(model, cfg, tokens, **kw):
    model = copy.deepcopy(model)
    return calibrate(model, cfg, tokens, device="cpu", progress=False, **kw)


def _assert_same_states(a, b):
    assert a.state.keys() == b.state.keys()
    for i in a.state:
        assert a.state[i].keys() == b.state[i].keys()
        for k in a.state[i]:
            torch.testing.assert_close(a.state[i][k], b.state[i][k], rtol=1e-6, atol=1e-7, msg=f"block {i} {k}")


def test_streaming_from_safetensors_shards_matches_the_in_memory_model(tmp_path, tokens, monkeypatch):
    model = tiny_model("qwen2", num_hidden_layers=3)
    folder = str(tmp_path / "hf")
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3  # really sharded
    reference = _in_memory(model, _cfg(), tokens)

    loaded = []  # every tensor read from the shards, by name: never the whole model at once
    real_load = streaming.ShardedCheckpoint.load

    def spy(self, names, dtype=None):
        loaded.append(list(names))
        return real_load(self, names, dtype)

    monkeypatch.setattr(streaming.ShardedCheckpoint, "load", spy)
    sm = fq.StreamingModel(folder)
    assert all(p.is_meta for p in sm.skeleton.parameters())
    result = calibrate(sm, _cfg(), tokens, device="cpu", progress=False)
    _assert_same_states(result, reference)
    assert result.losses == pytest.approx(reference.losses)
    block_reads = [names for names in loaded if names[0].startswith("model.layers.")]
    assert len(block_reads) == 3 and all(len({n.split(".")[2] for n in names}) == 1 for names in block_reads)
    assert all(p.is_meta for p in sm.skeleton.parameters())  # embeddings and head dropped again


def test_offloaded_activations_give_the_same_calibration(tmp_path, tokens, monkeypatch):
    model = tiny_model("llama", num_hidden_layers=2)
    reference = _in_memory(model, _cfg(), tokens)
    for where in ("cpu", "disk"):
        folder = str(tmp_path / where)
        _assert_same_states(_in_memory(model, _cfg(), tokens, offload=where, offload_dir=folder), reference)
        assert not os.path.exists(folder) or os.listdir(folder) == []  # activation files removed

    def fail(*_args, **_kwargs):
        assert len(os.listdir(tmp_path / "disk")) == 2  # inputs and targets of the block, on disk
        raise RuntimeError("stop")

    monkeypatch.setattr(calib_mod, "_train_block", fail)
    with pytest.raises(RuntimeError, match="stop"):
        _in_memory(model, _cfg(), tokens, offload="disk", offload_dir=str(tmp_path / "disk"))
    assert os.listdir(tmp_path / "disk") == []  # removed after the error too


def test_activation_store_rows_and_placement():
    x = torch.randn(5, 3, 4)
    store = Activations(x.shape, x.dtype, torch.device("cpu"), "disk")
    for s in range(0, 5, 2):
        store.write(s, x[s : s + 2])
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(store.rows(idx), x[idx]) and torch.equal(store.read(1, 3), x[1:3])
    path = store.path
    store.close()
    assert not os.path.exists(path)
    cpu = torch.device("cpu")
    assert choose_placement(10**6, cpu) == "device"
    assert choose_placement(10**6, cpu, memory_budget=1e-3) == "disk"  # 1 MB > half of 1 MB
    assert choose_placement(10**6, cpu, memory_budget=1.0) == "device"
    assert choose_placement(10**6, cpu, "disk") == "disk"
    with pytest.raises(ValueError, match="offload='ram' is not one of"):
        choose_placement(1, cpu, "ram")
    with pytest.raises(ValueError, match="memory_budget=0"):
        choose_placement(1, cpu, memory_budget=0)


def test_streaming_needs_a_local_safetensors_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        fq.StreamingModel(str(tmp_path))
    tiny_model("llama").config.save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor"):
        fq.StreamingModel(str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_activations_on_cuda_match_device_resident_ones(tokens):
    model = tiny_model("llama", num_hidden_layers=2)
    results = {
        where: calibrate(copy.deepcopy(model), _cfg(), tokens, device="cuda", progress=False, offload=where)
        for where in ("device", "cpu")
    }
    for i, state in results["device"].state.items():
        for k, v in state.items():
            torch.testing.assert_close(results["cpu"].state[i][k], v, rtol=1e-3, atol=1e-4)
    assert results["cpu"].peak_gpu_bytes > 0
    assert choose_placement(10**9, torch.device("cuda"), memory_budget=1.0) in ("cpu", "disk")
