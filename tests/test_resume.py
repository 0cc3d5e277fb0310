import copy
import math

import pytest
import torch
from conftest import tiny_model

import flatquant as fq
from flatquant import calibrate as calib_mod


def _cfg(**kw):
    return fq.FlatQuantConfig(**{"nsamples": 8, "seqlen": 32, "epochs": 2, "autocast_dtype": "float32", **kw})


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tokens, monkeypatch):
    base = tiny_model("llama", num_hidden_layers=3)
    reference = copy.deepcopy(base)
    fq.quantize(reference, _cfg(), tokens, device="cpu", progress=False)

    calls = []
    real_train = calib_mod._train_block

    def train_then_die(layer, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while training block 2
        calls.append(1)
        return real_train(layer, *args, **kwargs)

    monkeypatch.setattr(calib_mod, "_train_block", train_then_die)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        fq.quantize(copy.deepcopy(base), _cfg(), tokens, device="cpu", state_dir=state, progress=False)

    calls.clear()
    monkeypatch.setattr(calib_mod, "_train_block", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    resumed = copy.deepcopy(base)
    fq.quantize(resumed, _cfg(), tokens, device="cpu", state_dir=state, progress=False)
    assert len(calls) == 1  # only block 2 was trained again
    assert torch.equal(resumed(tokens).logits, reference(tokens).logits)


def test_state_of_another_job_is_refused(tmp_path, tokens):
    state = str(tmp_path / "state")
    fq.quantize(tiny_model("llama"), _cfg(epochs=1), tokens, device="cpu", state_dir=state, progress=False)
    with pytest.raises(ValueError, match="another job"):
        fq.quantize(tiny_model("llama"), _cfg(epochs=2), tokens, device="cpu", state_dir=state, progress=False)


def test_non_finite_loss_restarts_the_block_at_a_lower_rate(tokens, monkeypatch):
    scales = []
    real_train = calib_mod._train_block

    def nan_first(layer, x, y, kwargs, cfg, lr_scale, bar):
        scales.append(lr_scale)
        if len(scales) == 1:
            with torch.no_grad():  # wreck the parameters: the restart must undo this
                for p in layer.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))
            return float("nan")
        return real_train(layer, x, y, kwargs, cfg, lr_scale, bar)

    monkeypatch.setattr(calib_mod, "_train_block", nan_first)
    model = tiny_model("llama", num_hidden_layers=1)
    fq.quantize(model, _cfg(), tokens, device="cpu", progress=False)
    assert scales == [1.0, 0.1]
    assert torch.isfinite(model(tokens).logits).all()


def test_persistent_nan_raises(tokens, monkeypatch):
    monkeypatch.setattr(calib_mod, "_train_block", lambda *a, **k: float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        fq.quantize(tiny_model("llama", num_hidden_layers=1), _cfg(), tokens, device="cpu", progress=False)


def test_log_mse_objective_reweights_steps(tokens):
    # Adam's first step ignores a constant loss scale, later steps see the per-step 1/MSE weights.
    base = tiny_model("llama", num_hidden_layers=1)
    states = {}
    for loss in ("mse", "log-mse"):
        model = copy.deepcopy(base)
        states[loss] = fq.quantize(model, _cfg(loss=loss), tokens, device="cpu", progress=False).state[0]
    assert states["mse"].keys() == states["log-mse"].keys()
    assert all(torch.isfinite(v).all() for v in states["log-mse"].values())
    assert any(not torch.equal(states["mse"][k], states["log-mse"][k]) for k in states["mse"])
    with pytest.raises(ValueError, match="loss='l1' is not one of"):
        _cfg(loss="l1")


def test_token_mse_weights_every_token_alike(tokens):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    target[0, 0] *= 100.0  # one token with a huge norm, like a residual stream's first token
    out = target + 0.1 * torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    expected = sum(
        float(((out[b, t] - target[b, t]) ** 2).sum() / (target[b, t] ** 2).sum()) for b in range(2) for t in range(5)
    )
    got = calib_mod._block_loss(out, target, "token-mse")
    assert abs(float(got) - expected / 10) < 1e-12
    assert torch.equal(calib_mod._block_loss(out, target, "mse"), torch.nn.functional.mse_loss(out, target))
    result = fq.quantize(
        tiny_model("llama", num_hidden_layers=1), _cfg(loss="token-mse"), tokens, device="cpu", progress=False
    )
    assert math.isfinite(result.losses[0]) and 0 < result.losses[0] < 1


def test_learning_rates_follow_the_cosine_schedule_per_step(tokens, monkeypatch):
    """Step k trains at base * f(k), f cosine from 1 to 1e-3 over all steps (as LambdaLR stepped per batch),
    transforms at lr and clipping logits at clip_lr."""
    seen = []
    real_step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append([float(g["lr"]) for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    cfg = _cfg(epochs=3, lr=0.02, clip_lr=0.3)
    fq.quantize(tiny_model("llama", num_hidden_layers=1), cfg, tokens, device="cpu", progress=False)
    total = cfg.epochs * (cfg.nsamples // cfg.batch_size)
    assert len(seen) == total
    f = calib_mod._lr_lambda(total)
    for k, (lr, clip_lr) in enumerate(seen):
        assert lr == pytest.approx(0.02 * f(k), rel=1e-12) and clip_lr == pytest.approx(0.3 * f(k), rel=1e-12)
    assert seen[0][0] == pytest.approx(0.02) and seen[-1][0] < 0.02 * 0.1  # decayed (1e-3 one step later)


def test_step_graphs_need_cuda_device_activations_and_can_be_turned_off(monkeypatch):
    from flatquant.offload import Activations

    x = Activations.wrap(torch.zeros(8, 4, 2))
    monkeypatch.setattr(calib_mod, "CALIB_GRAPH", True)
    assert not calib_mod._graphable(x, x, 32, 4)  # CPU tensors
    x.device = torch.device("cuda")  # as if device-resident on a GPU
    assert calib_mod._graphable(x, x, 32, 4)
    monkeypatch.setattr(calib_mod, "CALIB_GRAPH", False)  # FLATQUANT_CALIB_GRAPH=0
    assert not calib_mod._graphable(x, x, 32, 4)
    monkeypatch.setattr(calib_mod, "CALIB_GRAPH", True)
    assert not calib_mod._graphable(x, x, 30, 4)  # a partial last batch: one captured shape only
    assert not calib_mod._graphable(x, x, 12, 4)  # too few steps after the warm-up


def test_a_step_that_cannot_be_captured_runs_eagerly_and_says_where(monkeypatch, capsys):
    """A failed capture returns None (the caller runs the steps eagerly) and the warning names the innermost
    frames, so that a host copy inside the step can be found from one GPU run."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())

    def copy_from_the_host(idx):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture\nsecond line")

    assert calib_mod._capture(copy_from_the_host, torch.zeros(2)) is None
    captured = capsys.readouterr()
    msg = captured.out + captured.err
    assert "not capturable (RuntimeError: Cannot copy between CPU and CUDA" in msg
    assert "copy_from_the_host" in msg and "second line" not in msg and "running eagerly" in msg
