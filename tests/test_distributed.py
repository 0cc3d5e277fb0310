import copy
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_model

import flatquant as fq
from flatquant import calibrate as calib_mod
from flatquant import cli, distributed
from flatquant.checkpoint import read_checkpoint, write_calibration

BLOCKS = 4


def _cfg(**kw):
    return fq.FlatQuantConfig(**{"nsamples": 8, "seqlen": 32, "epochs": 2, "autocast_dtype": "float32", **kw})


def _tokens():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


def _model():
    return tiny_model("llama", num_hidden_layers=BLOCKS)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a clean run, a run where rank 1 fails on its second block, then a resumed run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    state = os.path.join(out, "state")
    report = {}
    result = distributed.calibrate_distributed(_model(), _cfg(), _tokens(), device="cpu", progress=False, timeout=60)
    if rank == 0:
        write_calibration(result, _model().config, os.path.join(out, "clean"))

    real_train, trained = calib_mod._train_block, []

    def failing_train(layer, *args, **kwargs):
        if rank == 1 and len(trained) == 1:
            raise ValueError("boom")
        trained.append(1)
        return real_train(layer, *args, **kwargs)

    calib_mod._train_block = failing_train
    t0 = time.perf_counter()
    try:
        distributed.calibrate_distributed(
            _model(), _cfg(), _tokens(), device="cpu", state_dir=state, progress=False, timeout=60
        )
    except distributed.DistributedCalibrationError as e:
        report["error"] = str(e)
    report["failure_seconds"] = time.perf_counter() - t0

    trained.clear()
    calib_mod._train_block = lambda *a, **k: trained.append(1) or real_train(*a, **k)
    result = distributed.calibrate_distributed(
        _model(), _cfg(), _tokens(), device="cpu", state_dir=state, progress=False
    )
    report["trained_after_restart"] = len(trained)
    if rank == 0:
        write_calibration(result, _model().config, os.path.join(out, "resumed"))

    torch.distributed.barrier()  # both ranks here before the group with the short timeout is made
    ctx = distributed.setup("cpu", timeout=1)  # rank 1 hangs: rank 0 gives up after the timeout
    t0 = time.perf_counter()
    try:
        if rank == 1:
            time.sleep(2.5)
        distributed._Status(ctx, 1).post()
    except distributed.DistributedCalibrationError as e:
        report["hang_error"], report["hang_seconds"] = str(e), time.perf_counter() - t0
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_and_stop_together_on_failure(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)

    torch.set_num_threads(1)
    model = _model()
    fresh = copy.deepcopy(model)
    reference = fq.quantize(model, _cfg(), _tokens(), device="cpu", progress=False)
    fq.save_quantized(model, str(tmp_path / "single"))
    single_meta, single_tensors = read_checkpoint(str(tmp_path / "single"))
    for name in ("clean", "resumed"):
        meta, tensors = read_checkpoint(str(tmp_path / name))
        assert meta.keys() == single_meta.keys() and meta["config"] == single_meta["config"]
        assert meta["model"] == single_meta["model"]
        assert tensors.keys() == single_tensors.keys()
        for k in tensors:
            torch.testing.assert_close(tensors[k], single_tensors[k], rtol=1e-5, atol=1e-6, msg=k)
        assert [float(v) for v in meta["block_losses"].values()] == pytest.approx(
            [reference.losses[i] for i in range(BLOCKS)], rel=1e-4
        )
    loaded = fq.load_quantized(copy.deepcopy(fresh), str(tmp_path / "clean"), device="cpu")
    torch.testing.assert_close(loaded(_tokens()).logits, model(_tokens()).logits, rtol=1e-4, atol=1e-4)

    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in reports:  # both ranks stop, with the failing rank and block named, without waiting for a timeout
        assert "rank 1 failed on block 3: ValueError: boom" in r["error"]
        assert r["failure_seconds"] < 30
    assert "rank 0: no answer from the other ranks (waited up to 1 s" in reports[0]["hang_error"]
    assert reports[0]["hang_seconds"] < 2.5
    # rank 0 finished blocks 0 and 1, rank 1 block 2 before failing: only block 3 is trained again
    assert [r["trained_after_restart"] for r in reports] == [0, 1]


def test_blocks_are_shared_out_in_balanced_contiguous_ranges():
    assert distributed.assign_blocks(range(5), 2) == [[0, 1], [2, 3, 4]]
    assert distributed.assign_blocks(range(80), 8)[3] == list(range(30, 40))
    shares = distributed.assign_blocks(range(7), 3)
    assert sum(shares, []) == list(range(7)) and max(map(len, shares)) - min(map(len, shares)) <= 1
    assert distributed.assign_blocks([1], 2) == [[], [1]]
    with pytest.raises(ValueError, match="world=0"):
        distributed.assign_blocks(range(3), 0)


def test_single_process_falls_back_to_calibrate(tokens, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = _model()
    result = distributed.calibrate_distributed(model, _cfg(epochs=1), tokens, device="cpu", progress=False)
    assert sorted(result.state) == list(range(BLOCKS))
    with pytest.raises(ValueError, match="covers blocks"):
        result.state.pop(2)
        write_calibration(result, model.config, "unused")


def _hf_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = str(tmp_path / "hf")
    tiny_model("llama", num_hidden_layers=3).save_pretrained(folder, max_shard_size="100KB")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(2000)))
    return folder, str(text)


def test_torchrun_quantize_streaming_matches_the_single_process_command(tmp_path):
    folder, text = _hf_folder(tmp_path)
    argv = ["quantize", "--model", folder, "--preset", "quick", "--seqlen", "32", "--nsamples", "4", "--epochs", "1"]
    argv += ["--calib-data", text, "--eval-data", "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*cmd, "-m", "flatquant.cli", *argv, "--stream", "--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "saved calibration to" in run.stdout and "2 process(es)" in run.stdout
    assert cli.main([*argv, "--output", str(tmp_path / "one")]) == 0
    one, two = read_checkpoint(str(tmp_path / "one")), read_checkpoint(str(tmp_path / "two"))
    assert one[1].keys() == two[1].keys()
    for k in one[1]:
        torch.testing.assert_close(two[1][k], one[1][k], rtol=1e-5, atol=1e-6, msg=k)
    assert not os.path.exists(str(tmp_path / "two.state"))


def test_local_ranks_share_the_gpus_round_robin():
    from flatquant.distributed import local_device

    assert [local_device(r, 1).index for r in range(3)] == [0, 0, 0]  # three processes on one GPU
    assert [local_device(r, 2, "cuda").index for r in range(4)] == [0, 1, 0, 1]
    assert local_device(3, 2, "cuda:1") == torch.device("cuda", 1)  # an explicit index is kept
    assert local_device(1, 0) == torch.device("cpu") and local_device(0, 2, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU is visible"):
        local_device(0, 0, "cuda")


def test_quantized_calibration_inputs_are_not_shared_out(tokens, monkeypatch):
    ctx = distributed.Context(rank=0, world=2, device=torch.device("cpu"), group=None)
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: ctx)
    with pytest.raises(ValueError, match="calib_inputs='quantized' cannot be shared out over 2 processes"):
        distributed.calibrate_distributed(_model(), _cfg(calib_inputs="quantized"), tokens, progress=False)
