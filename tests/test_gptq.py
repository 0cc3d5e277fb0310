"""GPTQ against a dense least-squares reference, against RTN, and inside the merged model."""

import copy
import os

import pytest
import torch
from conftest import tiny_model

import flatquant as fq
from flatquant import gptq
from flatquant.quantizer import WeightQuantizer, dequantize_codes, expand_groups


def _planted(out_f=6, in_f=13, n=200, seed=0):
    """Correlated inputs X (n, in) and a weight W (out, in): the setting where error feedback pays off."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f, dtype=torch.float64) + 0.6 * torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ mix
    x[:, 3] *= 4.0  # one dominant column, so that act_order changes the order
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return x, w


def _quantizer(out_f, in_f, bits, symmetric, group_size, seed=0):
    q = WeightQuantizer(out_f, in_f, bits, symmetric, group_size, learnable_clip=True).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # learned clipping as after calibration: ratios between ~0.75 and 1
        q.clip_max.copy_(1.0 + 3 * torch.rand(q.clip_max.shape, generator=g, dtype=torch.float64))
        q.clip_min.copy_(1.0 + 3 * torch.rand(q.clip_min.shape, generator=g, dtype=torch.float64))
    return q


def _least_squares_reference(w, x, quant, damping, act_order):
    """Column by column: round the next column on the grid, then refit all later columns by least squares.

    The damped objective ||X (w - u)||² + n·λ||w - u||² is written as one least-squares problem with the
    rows sqrt(n·λ)·I appended to X; each refit is a dense ``lstsq`` over the remaining columns.
    """
    n, in_f = x.shape
    h = x.T @ x / n
    lam = damping * torch.diagonal(h).mean()
    xa = torch.cat([x, (n * lam).sqrt() * torch.eye(in_f, dtype=x.dtype)])  # (n + in, in)
    target = xa @ w.T  # (n + in, out)
    scale, zero = quant.grid(w)
    s, z = expand_groups(scale, in_f, quant.group_size), expand_groups(zero, in_f, quant.group_size)
    qmin, qmax = quant.code_range()
    order = torch.argsort(torch.diagonal(h), descending=True).tolist() if act_order else list(range(in_f))
    cur, codes = w.clone(), torch.zeros_like(w)
    for k, j in enumerate(order):
        codes[:, j] = torch.clamp(torch.round(cur[:, j] / s[:, j]) + z[:, j], qmin, qmax)
        done, rest = order[: k + 1], order[k + 1 :]
        fixed = dequantize_codes(codes, scale, zero, quant.group_size)[:, done]
        if rest:
            resid = target - xa[:, done] @ fixed.T
            cur[:, rest] = torch.linalg.lstsq(xa[:, rest], resid).solution.T
    return codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric, group_size", [(True, None), (False, 4), (True, 5)])
def test_gptq_matches_the_least_squares_reference(act_order, symmetric, group_size):
    x, w = _planted()
    quant = _quantizer(*w.shape, 3, symmetric, group_size)
    codes, scale, zero = gptq.gptq_codes(w, x.T @ x / x.shape[0], quant, 0.01, act_order, block_size=4)
    ref = _least_squares_reference(w, x, quant, 0.01, act_order)
    assert torch.equal(codes, ref)
    assert codes.min() >= quant.code_range()[0] and codes.max() <= quant.code_range()[1]
    assert scale.shape == zero.shape == (w.shape[0], 1 if group_size is None else -(-w.shape[1] // group_size))


@pytest.mark.parametrize("symmetric, group_size, bound", [(True, None, 0.8), (False, 4, 0.95)])
def test_gptq_output_error_is_below_rtn(symmetric, group_size, bound):
    x, w = _planted(out_f=16, in_f=64, n=512, seed=3)
    quant = _quantizer(*w.shape, 3, symmetric, group_size)
    codes, scale, zero = gptq.gptq_codes(w, x.T @ x, quant)
    q_gptq = dequantize_codes(codes, scale, zero, group_size)
    q_rtn = quant(w).detach()
    err_gptq = torch.linalg.norm(x @ w.T - x @ q_gptq.T)
    err_rtn = torch.linalg.norm(x @ w.T - x @ q_rtn.T)
    assert err_gptq < bound * err_rtn  # small groups leave less room: their grid clamps the feedback


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric, group_size", [(True, None), (False, 4), (True, 6)])
def test_diagonal_hessian_gives_rtn(act_order, symmetric, group_size):
    _, w = _planted(seed=5)
    quant = _quantizer(*w.shape, 4, symmetric, group_size, seed=2)
    hessian = torch.diag(torch.rand(w.shape[1], dtype=torch.float64) + 0.1)
    codes, scale, zero = gptq.gptq_codes(w, hessian, quant, act_order=act_order, block_size=4)
    assert torch.equal(dequantize_codes(codes, scale, zero, group_size), quant(w).detach())


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    quant = _quantizer(2, 4, 4, True, None)
    with pytest.raises(ValueError, match="does not fit a weight with 4 columns"):
        gptq.gptq_codes(torch.randn(2, 4), torch.eye(5), quant)


def _cfg(**kw):
    return fq.FlatQuantConfig(**{"nsamples": 8, "seqlen": 32, "epochs": 1, "autocast_dtype": "float32", **kw})


def test_hessian_is_built_from_the_quantized_inputs_the_layer_sees(tokens, monkeypatch):
    """down_proj of the last block: H = X^T X / n of its transformed, quantized input in the final model."""
    seen = []
    real = gptq.gptq_codes
    monkeypatch.setattr(gptq, "gptq_codes", lambda w, h, *a, **k: seen.append(h) or real(w, h, *a, **k))
    model = tiny_model("llama")
    fq.quantize(model, _cfg(w_group_size=32, weight_method="gptq"), tokens, device="cpu", progress=False)
    assert len(seen) == 2 * 7
    inputs = []
    down = model.model.layers[1].mlp.down_proj
    handle = down.input_transform.register_forward_hook(lambda m, a, out: inputs.append(out.reshape(-1, 96)))
    with torch.no_grad():
        for s in range(0, tokens.shape[0], 4):
            model(tokens[s : s + 4], use_cache=False)
    handle.remove()
    x = torch.cat(inputs).double()
    assert len(torch.unique(x[0])) <= 16  # 4-bit activations: the Hessian sees quantized inputs
    torch.testing.assert_close(seen[-1], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["flatquant", "rtn"])
def test_gptq_checkpoint_reloads_the_same_logits(method, tokens, tmp_path):
    base = tiny_model("qwen2")
    model = copy.deepcopy(base)
    cfg = _cfg(method=method, weight_method="gptq", gptq_act_order=True, w_group_size=16, a_bits=8)
    fq.quantize(model, cfg, tokens, device="cpu", progress=False)
    path = fq.save_quantized(model, str(tmp_path / "ckpt"))
    assert sorted(os.listdir(path)) == ["calibration.safetensors", "flatquant.json", "gptq.safetensors"]
    loaded = fq.load_quantized(copy.deepcopy(base), path, device="cpu")
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    rtn = copy.deepcopy(base)
    fq.quantize(rtn, cfg.replace(weight_method="rtn"), tokens, device="cpu", progress=False)
    assert not torch.equal(rtn(tokens).logits, model(tokens).logits)
    os.remove(os.path.join(path, "gptq.safetensors"))
    with pytest.raises(FileNotFoundError, match="gptq.safetensors is missing"):
        fq.load_quantized(copy.deepcopy(base), path)


def test_one_calibration_rounded_both_ways(tokens):
    """quantize(merge=False) + round_weights on copies gives what two full runs give."""
    base = tiny_model("llama")
    calibrated = copy.deepcopy(base)
    result = fq.quantize(calibrated, _cfg(w_bits=3, a_bits=16, k_bits=16, v_bits=16), tokens, merge=False)
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(calibrated)
        fq.round_weights(m, result, tokens, weight_method=method, device="cpu", progress=False)
        full = copy.deepcopy(base)
        fq.quantize(full, result.config.replace(weight_method=method), tokens, device="cpu", progress=False)
        assert m.flatquant.config.weight_method == method
        assert torch.equal(m(tokens).logits, full(tokens).logits)


def test_gptq_needs_calibration_windows():
    with pytest.raises(ValueError, match="weight_method='gptq' needs calibration windows"):
        fq.quantize(tiny_model("llama"), fq.FlatQuantConfig(method="rtn", weight_method="gptq"))


def test_rtn_and_gptq_share_a_calibration_state(tokens):
    from flatquant.calibrate import fingerprint

    model, cfg = tiny_model("llama"), _cfg()
    same = cfg.replace(weight_method="gptq", gptq_act_order=True, gptq_damping=0.1)
    assert fingerprint(same, model, tokens) == fingerprint(cfg, model, tokens)
    assert fingerprint(cfg.replace(overrides={"down_proj": {"a_bits": 8}}), model, tokens) != fingerprint(
        cfg, model, tokens
    )
    assert "overrides" not in cfg.calibration_dict() and "gptq_damping" not in cfg.calibration_dict()
