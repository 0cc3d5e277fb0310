import pytest
import torch

from flatquant.quantizer import (
    ActivationQuantizer,
    WeightQuantizer,
    dequantize_codes,
    expand_groups,
    fake_quantize,
    round_ste,
)


def test_symmetric_4bit_hand_computed():
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5]])
    # absmax 3.5, scale 3.5 / 7 = 0.5: codes 2, -4, 1, 7 -> exact
    out = fake_quantize(x, x.amax(-1, keepdim=True), x.amin(-1, keepdim=True), 4, True)
    torch.testing.assert_close(out, x)
    y = torch.tensor([[0.3, -0.7, 1.4]])
    # scale 0.2: 0.3/0.2 = 1.5 -> 2 (half to even), -3.5 -> -4, 7 -> 7
    out = fake_quantize(y, y.amax(-1, keepdim=True), y.amin(-1, keepdim=True), 4, True)
    torch.testing.assert_close(out, torch.tensor([[0.4, -0.8, 1.4]]))


def test_symmetric_clamps_to_minus_eight():
    x = torch.tensor([[-8.0, 7.0]])
    out = fake_quantize(x, torch.tensor([[7.0]]), torch.tensor([[-7.0]]), 4, True)  # scale 1
    torch.testing.assert_close(out, torch.tensor([[-8.0, 7.0]]))
    out = fake_quantize(torch.tensor([[-9.0]]), torch.tensor([[7.0]]), torch.tensor([[-7.0]]), 4, True)
    torch.testing.assert_close(out, torch.tensor([[-8.0]]))


def test_asymmetric_hand_computed():
    x = torch.tensor([[-1.0, 0.2, 2.0]])
    # 2 bits: scale (2 - -1) / 3 = 1, zero round(1) = 1, codes clamp(round(x) + 1, 0, 3) = 0, 1, 3
    out = fake_quantize(x, torch.tensor([[2.0]]), torch.tensor([[-1.0]]), 2, False)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 2.0]]))


def test_round_ste_passes_gradient():
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2))


def test_weight_quantizer_learned_clipping_shrinks_the_range():
    w = torch.tensor([[4.0, -2.0, 1.5, 0.0]])
    wq = WeightQuantizer(1, 4, bits=4, learnable_clip=True, clip_init=0.0)  # sigmoid(0) = 0.5
    # clipped range [-1, 2], absmax 2, scale 2/7: 4 -> clamp(14) = 7 -> 2.0
    out = wq(w)
    scale = 2.0 / 7
    expected = torch.tensor([[7.0, -7.0, 5.0, 0.0]]) * scale  # -2/scale = -7, 1.5/scale = 5.25 -> 5
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert wq.clip_max.grad is not None and wq.clip_max.grad.abs().sum() > 0


def test_weight_quantizer_groups_match_a_per_group_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=g)
    grouped = WeightQuantizer(3, 8, bits=3, group_size=4, learnable_clip=False)(w)
    for j in range(2):
        part = w[:, 4 * j : 4 * j + 4]
        ref = WeightQuantizer(3, 4, bits=3, learnable_clip=False)(part)
        torch.testing.assert_close(grouped[:, 4 * j : 4 * j + 4], ref)
    with pytest.raises(ValueError, match="group_size=0"):
        WeightQuantizer(3, 8, bits=4, group_size=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_last_shorter_group_has_its_own_range_and_clipping(symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 11, generator=g)  # groups of 4: 4 + 4 + 3 columns
    wq = WeightQuantizer(4, 11, bits=3, symmetric=symmetric, group_size=4, clip_init=1.0)
    assert wq.clip_max.shape == (4, 3, 1)
    with torch.no_grad():
        wq.clip_max[:, 2] = 0.5  # only the last group's clipping changes
    out = wq(w)
    for j, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 11)]):
        ref = WeightQuantizer(4, hi - lo, bits=3, symmetric=symmetric, clip_init=1.0)
        with torch.no_grad():
            ref.clip_max.copy_(wq.clip_max[:, j : j + 1])
        torch.testing.assert_close(out[:, lo:hi], ref(w[:, lo:hi]))
    # the grid reproduces the fake-quantized values through integer codes
    scale, zero = wq.grid(w)
    qmin, qmax = wq.code_range()
    codes = torch.clamp(torch.round(w / expand_groups(scale, 11, 4)) + expand_groups(zero, 11, 4), qmin, qmax)
    torch.testing.assert_close(dequantize_codes(codes, scale, zero, 4), out.detach(), rtol=0, atol=1e-6)


def test_activation_quantizer_is_per_token_and_off_at_16_bits():
    x = torch.tensor([[1.0, 2.0, -7.0], [0.1, 0.2, 0.7]])
    aq = ActivationQuantizer(4, learnable_clip=False)
    out = aq(x)
    torch.testing.assert_close(out, x)  # each row sits on its own grid: scales 1.0 and 0.1
    assert ActivationQuantizer(16)(x) is x


@pytest.mark.parametrize("symmetric", [True, False])
def test_no_grad_path_matches_the_training_path(symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.rand(64, 1, generator=g) * 5
    aq = ActivationQuantizer(4, symmetric=symmetric, learnable_clip=True, clip_init=1.5)
    trained_path = aq(x)
    with torch.no_grad():
        fast_path = aq(x)
    torch.testing.assert_close(fast_path, trained_path.detach(), rtol=0, atol=1e-6)


def test_compiled_quantizers_train_like_eager(monkeypatch):
    # The calibration step compiles these functions; compiled gradients must equal eager ones. On CUDA the
    # test runs there (torch.aminmax once broke only the CUDA compile), elsewhere it compiles for the CPU.
    from flatquant import fusion

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(fusion, "_DEVICE_TYPES", {device.type})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).to(device)
    w = torch.randn(16, 32, generator=g).to(device)
    grads = []
    for compiled in (False, True):
        aq, wq = (
            ActivationQuantizer(4, symmetric=True).to(device),
            WeightQuantizer(16, 32, 4, symmetric=True).to(device),
        )
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ctx = fusion.fused_calibration(device) if compiled else torch.enable_grad()
        with ctx:
            (aq(xs) @ wq(ws).T).square().sum().backward()
        grads.append([t.grad for t in (xs, ws, aq.clip_max, aq.clip_min, wq.clip_max, wq.clip_min)])
    for eager, comp in zip(*grads, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


def test_calibration_solves_on_cusolver_on_cuda_only(monkeypatch):
    """MAGMA (PyTorch's pick for batches of small matrices) syncs with the host and breaks step capture."""
    from flatquant.fusion import linalg_backend

    monkeypatch.delenv("FLATQUANT_LINALG", raising=False)
    assert linalg_backend(torch.device("cuda")) == "cusolver"
    assert linalg_backend(torch.device("cpu")) is None  # left alone (a CPU build cannot even set it)
    monkeypatch.setenv("FLATQUANT_LINALG", "default")
    assert linalg_backend(torch.device("cuda")) == "default"
    monkeypatch.setenv("FLATQUANT_LINALG", "lapack")
    with pytest.raises(ValueError, match=r"FLATQUANT_LINALG must be one of 'cusolver' \(the default\), .*got 'lapack'"):
        linalg_backend(torch.device("cuda"))
