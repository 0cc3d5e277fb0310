"""Tests of the fused Kronecker transform + quantization kernel against its PyTorch reference.

Without a GPU the Triton kernel runs in the CPU interpreter on small shapes (CI sets TRITON_INTERPRET=1
in the environment; this module also sets it before the kernel module is imported). With a GPU the
same tests run compiled, at the factor pairs real models use.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flatquant.kernels.kron_quantize as kq  # noqa: E402

CUDA = torch.cuda.is_available()
import flatquant.kernels.kron_pieces as kp  # noqa: E402

if not CUDA and kq.triton is not None and not kq._interpreting():
    kq = importlib.reload(kq)  # imported before TRITON_INTERPRET was set: rebuild it for the interpreter
    kp = importlib.reload(kp)
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    kq.triton is None or not (CUDA or kq._interpreting()),
    reason="triton is not importable",
)

# Factor pairs: every pair from the method on the GPU; small ones (padding included) in the interpreter.
PAIRS = (
    [(24, 24), (32, 48), (56, 64), (64, 64), (64, 80), (64, 128), (86, 128), (108, 128), (112, 128)]
    + [(128, 148), (128, 224)]
    if CUDA
    else [(6, 10), (24, 24), (32, 48), (16, 16), (20, 36)]
)
TOKENS = [1, 7, 333, 2048] if CUDA else [1, 7, 33]
VARIANT_PAIR = (86, 128) if CUDA else (24, 40)
TIE_TOL = 1e-3  # |X'/scale - (k + 1/2)| below this (in code units) counts as a rounding tie


@pytest.fixture(autouse=True)
def _fixed_launch_config(monkeypatch, request):
    """On the GPU, tests use the fixed default config (autotuning every shape would take minutes); the
    candidates are checked one by one in test_every_candidate_config, the autotuner in test_autotuned_*."""
    if "autotuned" not in request.node.name:
        monkeypatch.setattr(kq, "AUTOTUNE", False)


def _factors(n1, n2, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    p1 = torch.linalg.qr(torch.randn(n1, n1, generator=g, dtype=torch.float64))[0] * 1.3
    p2 = torch.randn(n2, n2, generator=g, dtype=torch.float64) / n2**0.5
    return p1.float().contiguous().to(device), p2.float().to(device)


def _inputs(tokens, n, dtype, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * (1 + 4 * torch.rand(tokens, 1, generator=g))
    x[:, :: max(1, n // 7)] *= 20  # outlier channels, as in real activations
    return x.to(dtype=dtype, device=device)


def _unpack(codes, symmetric):
    lo, hi = (codes.to(torch.int32) & 0xF), (codes.to(torch.int32) >> 4)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)
    return torch.where(out > 7, out - 16, out) if symmetric else out


def _exact_transform(x, p1, p2, intermediate="fp32"):
    """X' in float64 from x.dtype-rounded operands, (T, n)."""
    n1 = p1.shape[0] if p1 is not None else x.shape[-1] // p2.shape[0]
    z = x.reshape(-1, n1, x.shape[-1] // n1).double()
    if p2 is not None:
        z = z @ p2.to(x.dtype).double()
        if intermediate == "input":
            z = z.to(x.dtype).double()
    if p1 is not None:
        z = p1.to(x.dtype).double().T @ z
    return z.reshape(z.shape[0], -1)


def _assert_same(out, ref, x, p1, p2, symmetric=True, pack=False, intermediate="fp32"):
    """Scales equal to fp32 rounding; codes equal except at rounding ties of X'/scale."""
    assert out.codes.shape == ref.codes.shape and out.codes.dtype == ref.codes.dtype
    torch.testing.assert_close(out.scale, ref.scale, rtol=2e-5, atol=0)
    if symmetric:
        assert out.zero is None and ref.zero is None
    else:
        torch.testing.assert_close(out.zero, ref.zero, rtol=0, atol=0)
    a, b = out.codes.cpu(), ref.codes.cpu()
    if pack:
        a, b = _unpack(a, symmetric), _unpack(b, symmetric)
    a, b = a.reshape(-1, a.shape[-1]).int(), b.reshape(-1, b.shape[-1]).int()  # (T, n)
    diff = a != b
    if diff.any():
        v = (_exact_transform(x, p1, p2, intermediate).cpu() / ref.scale.cpu().double().reshape(-1, 1))[diff]
        assert ((a - b).abs()[diff] == 1).all(), "codes differ by more than one step"
        tie = ((v - v.floor()) - 0.5).abs() < TIE_TOL
        assert tie.all(), f"{(~tie).sum().item()} code mismatches away from rounding ties"


def test_reference_matches_dense_kron_float64():
    """x @ kron(P1, P2) in float64, quantized independently, gives the reference's codes."""
    n1, n2 = 6, 10
    p1, p2 = _factors(n1, n2, device="cpu")
    x = _inputs(9, n1 * n2, torch.bfloat16, device="cpu")
    dense = x.double() @ torch.kron(p1.to(x.dtype).double(), p2.to(x.dtype).double())  # (T, n)
    ref = kq.kron_quantize_reference(x, p1, p2, clip_max=0.9, clip_min=0.7)
    absmax = torch.maximum(0.9 * dense.amax(1), -0.7 * dense.amin(1))
    scale = absmax / 7
    torch.testing.assert_close(ref.scale.double(), scale, rtol=1e-6, atol=0)
    codes = torch.clamp(torch.round(dense / scale[:, None]), -8, 7)
    near_tie = ((dense / scale[:, None]).frac().abs() - 0.5).abs() < TIE_TOL
    assert ((ref.codes.double() == codes) | near_tie).all()
    assert ref.codes.min() >= -8 and ref.codes.max() <= 7 and (ref.codes == 7).any()


def test_reference_asymmetric_and_zero_token():
    x = _inputs(4, 24, torch.float16, device="cpu")
    x[1] = 0
    p1, p2 = _factors(4, 6, device="cpu")
    ref = kq.kron_quantize_reference(x, p1, p2, clip_max=1.0, clip_min=1.0, bits=4, symmetric=False)
    assert ref.codes.min() >= 0 and ref.codes.max() <= 15
    assert ref.scale[1] == pytest.approx(1e-8) and (ref.codes[1] == ref.zero[1]).all()
    dense = _exact_transform(x, p1, p2)
    deq = (ref.codes.double() - ref.zero[:, None]) * ref.scale[:, None]
    assert ((deq - dense).abs() <= 0.5 * ref.scale[:, None] + 1e-6).all()  # within half a step


def test_pack_layout_low_nibble_is_even_index():
    codes = torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8)
    packed = kq._pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x78, 0xF1]]
    assert _unpack(packed, symmetric=True).tolist() == codes.tolist()


@needs_triton
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("n1,n2", PAIRS)
def test_kernel_matches_reference(n1, n2, tokens):
    p1, p2 = _factors(n1, n2)
    x = _inputs(tokens, n1 * n2, torch.bfloat16)
    out = kq.kron_quantize(x, p1, p2, 0.95, 0.9, impl="triton")
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2, 0.95, 0.9), x, p1, p2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("pack,intermediate", [(False, "fp32"), (True, "fp32"), (False, "input")])
def test_kernel_variants(dtype, symmetric, pack, intermediate):
    n1, n2 = VARIANT_PAIR
    p1, p2 = _factors(n1, n2, seed=3)
    x = _inputs(17, n1 * n2, dtype).reshape(1, 17, n1 * n2)  # leading dims kept
    kw = dict(clip_max=0.8, clip_min=0.6, bits=4, symmetric=symmetric, pack=pack, intermediate=intermediate)
    out = kq.kron_quantize(x, p1, p2, impl="triton", **kw)
    ref = kq.kron_quantize_reference(x, p1, p2, **kw)
    assert out.scale.shape == (1, 17)
    _assert_same(out, ref, x, p1, p2, symmetric, pack, intermediate)


@needs_triton
@pytest.mark.parametrize("which", ["p2_identity", "p1_identity"])
def test_kernel_identity_factor(which):
    """P_o: a heads x heads factor with identity over head_dim (p2=None); and the mirror case."""
    heads, head_dim = (32, 128) if CUDA else (8, 16)
    p1, p2 = _factors(heads, head_dim, seed=5)
    p1, p2 = (p1, None) if which == "p2_identity" else (None, p2)
    x = _inputs(7, heads * head_dim, torch.bfloat16)
    out = kq.kron_quantize(x, p1, p2, impl="triton", bits=8)
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2, bits=8), x, p1, p2)
    dense_p = p1.to(x.dtype).double() if p2 is None else p2.to(x.dtype).double()
    eye = torch.eye(head_dim if p2 is None else heads, dtype=torch.float64, device=x.device)
    dense = x.double() @ (torch.kron(dense_p, eye) if p2 is None else torch.kron(eye, dense_p))
    torch.testing.assert_close(_exact_transform(x, p1, p2), dense)


@needs_triton
def test_kernel_zero_token_and_strided_input():
    n1, n2 = (64, 64) if CUDA else (16, 16)
    p1, p2 = _factors(n1, n2)
    x = _inputs(6, 2 * n1 * n2, torch.float16)[:, : n1 * n2]  # row stride 2n
    x[2] = 0
    out = kq.kron_quantize(x, p1, p2, impl="triton")
    assert out.scale[2].item() == pytest.approx(1e-8) and (out.codes[2] == 0).all()
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2), x, p1, p2)


@pytest.mark.skipif(not CUDA, reason="large token count only on the GPU")
@pytest.mark.parametrize("n1,n2", [(112, 128), (128, 224)])
def test_kernel_many_tokens(n1, n2):
    p1, p2 = _factors(n1, n2)
    x = _inputs(16384, n1 * n2, torch.bfloat16)
    _assert_same(kq.kron_quantize(x, p1, p2), kq.kron_quantize_reference(x, p1, p2), x, p1, p2)


def test_dispatcher_choices_and_errors(monkeypatch):
    p1, p2 = _factors(4, 6, device="cpu")
    x = _inputs(3, 24, torch.bfloat16, device="cpu")
    ref = kq.kron_quantize_reference(x, p1, p2)
    out = kq.kron_quantize(x, p1, p2)  # CPU tensor: auto uses the reference
    assert torch.equal(out.codes, ref.codes) and torch.equal(out.scale, ref.scale)
    with pytest.raises(ValueError, match="impl"):
        kq.kron_quantize(x, p1, p2, impl="cuda")
    with pytest.raises(ValueError, match="multiply"):
        kq.kron_quantize(x, p1, p1)
    with pytest.raises(ValueError, match="bits"):
        kq.kron_quantize(x, p1, p2, bits=8, pack=True)
    with pytest.raises(TypeError, match="dtype"):
        kq.kron_quantize(x.float(), p1, p2)
    monkeypatch.setattr(kq, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA tensor|triton"):
        kq.kron_quantize(x, p1, p2, impl="triton")


@needs_triton
@pytest.mark.parametrize("symmetric,pack", [(True, False), (False, True)])
@pytest.mark.parametrize("n1,n2", [(128, 148)] if CUDA else [(6, 100), (10, 130)])
def test_kernel_column_chunks(monkeypatch, n1, n2, symmetric, pack):
    """Tiles above the register budget are built 64 columns at a time (forced here for small shapes)."""
    monkeypatch.setattr(kq, "_MAX_TILE", 0)
    p1, p2 = _factors(n1, n2, seed=7)
    x = _inputs(5, n1 * n2, torch.bfloat16)
    kw = dict(clip_max=0.9, clip_min=0.85, symmetric=symmetric, pack=pack)
    out = kq.kron_quantize(x, p1, p2, impl="triton", **kw)
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2, **kw), x, p1, p2, symmetric, pack)


@needs_triton
@pytest.mark.parametrize("bc", [16, 32])
def test_column_chunk_config_on_a_tile_that_fits(bc):
    """BC below the padded n2 on a tile within the register budget (the 128x128 candidates do this on the GPU)
    builds X' in chunks too, with the same codes; BC outside its range is refused with its limits."""
    n1, n2 = (112, 128) if CUDA else (12, 60)
    p1, p2 = _factors(n1, n2, seed=8)
    x = _inputs(9, n1 * n2, torch.bfloat16)
    kw = dict(clip_max=0.95, clip_min=0.9, symmetric=False, pack=True)
    out = kq.kron_quantize_triton(x, p1, p2, config=dict(BC=bc, PROGS_PER_SM=1), **kw)
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2, **kw), x, p1, p2, False, True)
    for bad in (8, 24, 256):
        with pytest.raises(ValueError, match=f"BC={bad} must be a power of two from 16"):
            kq.kron_quantize_triton(x, p1, p2, config=dict(BC=bad))


@needs_triton
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_padded_tiles_with_one_signed_tokens(symmetric, sign):
    """Tokens whose X' is all positive (or all negative) on a padded tile (40x72 in 64x128, a tile the unmasked
    path takes, >= 4096 elements, and small enough to stack two tokens): the symmetric path reduces max and min
    without masking the padding, which is exactly 0 and cannot change its range; the asymmetric one masks it
    (its range holds 0 anyway, as the fake quantizer's). Both equal the reference, also on the stacked-token and
    column-chunked paths."""
    n1, n2 = 40, 72
    g = torch.Generator().manual_seed(3)
    p1 = (torch.rand(n1, n1, generator=g) + 0.05).to(DEVICE, torch.bfloat16)  # positive factors: X' keeps x's sign
    p2 = (torch.rand(n2, n2, generator=g) + 0.05).to(DEVICE, torch.bfloat16)
    x = (sign * (torch.rand(7, n1 * n2, generator=g) + 0.1)).to(DEVICE, torch.bfloat16)
    kw = dict(clip_max=0.9, clip_min=0.8, symmetric=symmetric)
    ref = kq.kron_quantize_reference(x, p1, p2, **kw)
    bn2 = max(16, kq._next_pow2(n2))
    for cfg in (dict(PROGS_PER_SM=1), dict(BLOCK_T=2, PROGS_PER_SM=1), dict(BC=bn2 // 2, PROGS_PER_SM=1)):
        _assert_same(kq.kron_quantize_triton(x, p1, p2, config=cfg, **kw), ref, x, p1, p2, symmetric)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_asymmetric_range_holds_zero_as_the_fake_quantizer_does(impl, sign):
    """All-positive (all-negative) tokens: the asymmetric range is widened to hold 0, as flatquant.quantizer's is,
    so the zero point lies in [0, 15] and (code - zero) * scale equals the fake quantizer's output (identity
    factors, exact in bf16); the layer's own torch fallback (kron_quantize_torch) too."""
    from flatquant.kernels.w4a4_linear import kron_quantize_torch
    from flatquant.quantizer import quantize_activation

    n1, n2 = 8, 16
    g = torch.Generator().manual_seed(5)
    x = (sign * (torch.rand(5, n1 * n2, generator=g) + 0.1)).to(DEVICE, torch.bfloat16)
    eye1, eye2 = torch.eye(n1, device=DEVICE), torch.eye(n2, device=DEVICE)
    fake = quantize_activation(x.float(), None, None, 4, False).double()
    out = kq.kron_quantize(x, eye1, eye2, symmetric=False, impl=impl)
    codes, scale, zero = kron_quantize_torch(x, eye1, eye2, symmetric=False)
    for c, s_, z in ((out.codes, out.scale, out.zero), (codes, scale, zero)):
        assert (z >= 0).all() and (z <= 15).all()
        deq = (c.double() - z.double()[:, None]) * s_.double()[:, None]
        torch.testing.assert_close(deq, fake, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------- launch configs
# The autotuner may pick any candidate config on the GPU, so every candidate must give the same codes.
CONFIG_PAIRS = [(64, 64), (112, 128), (128, 148)] if CUDA else [(6, 10), (16, 16)]


@needs_triton
@pytest.mark.parametrize("n1,n2", CONFIG_PAIRS)
def test_every_candidate_config(n1, n2):
    p1, p2 = _factors(n1, n2, seed=11)
    bn1, bn2 = max(16, kq._next_pow2(n1)), max(16, kq._next_pow2(n2))
    for bucket, tokens in ((0, 5), (1, 70 if CUDA else 67)):  # token counts not multiples of BLOCK_T
        x = _inputs(tokens, n1 * n2, torch.bfloat16, seed=bucket)
        ref = kq.kron_quantize_reference(x, p1, p2, 0.9, 0.8)
        cfgs = kq.candidate_configs(bn1, bn2, bucket)
        if not CUDA:  # the interpreter has no register budget: also run the stacked path on these tiles
            cfgs = cfgs + [dict(cfgs[0], BLOCK_T=4, PROGS_PER_SM=1)]
        for cfg in cfgs:
            _assert_same(kq.kron_quantize_triton(x, p1, p2, 0.9, 0.8, config=cfg), ref, x, p1, p2)


@needs_triton
@pytest.mark.parametrize("symmetric,pack,intermediate", [(False, True, "fp32"), (True, False, "input")])
@pytest.mark.parametrize("which", ["both", "p2_identity", "p1_identity"])
def test_stacked_tokens_variants(which, symmetric, pack, intermediate):
    """BLOCK_T tokens per iteration: asymmetric, packed, 16-bit intermediate, identity factors, fp16."""
    n1, n2 = (32, 48) if CUDA else (8, 12)
    p1, p2 = _factors(n1, n2, seed=13)
    p1, p2 = (None, p2) if which == "p1_identity" else (p1, None) if which == "p2_identity" else (p1, p2)
    x = _inputs(11, n1 * n2, torch.float16, seed=14)
    x[4] = 0  # a zero token inside a block
    kw = dict(clip_max=0.9, clip_min=0.85, symmetric=symmetric, pack=pack, intermediate=intermediate)
    out = kq.kron_quantize_triton(x, p1, p2, config=dict(BLOCK_T=4, PROGS_PER_SM=1), **kw)
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2, **kw), x, p1, p2, symmetric, pack, intermediate)


def test_candidate_configs_respect_limits():
    """Stacking stays within the register budget, never on column-chunked tiles, never in the latency path."""
    for bn1 in (16, 32, 64, 128):
        for bn2 in (16, 32, 64, 128, 256):
            for bucket in (0, 1):
                cfgs = kq.candidate_configs(bn1, bn2, bucket)
                assert cfgs and (bucket == 0 or cfgs[0] == kq._default_config(bn1, bn2, 0))
                for c in cfgs:
                    assert c["BLOCK_T"] * bn1 * bn2 <= max(kq._MAX_STACK, bn1 * bn2)
                    assert c["BLOCK_T"] == 1 or (bucket == 1 and bn1 * bn2 <= kq._MAX_TILE)
                    assert c["num_warps"] in (4, 8) and c["PROGS_PER_SM"] >= 1
    assert kq._token_bucket(1) == kq._token_bucket(kq.SMALL_TOKENS) == 0 and kq._token_bucket(65) == 1
    assert (kq._token_bucket(2048), kq._token_bucket(8192)) == (2, 3)
    assert kq.candidate_configs(128, 128, 3) == kq.candidate_configs(128, 128, 1)


@needs_triton
def test_fixed_config_keys_and_values_are_checked():
    """A fixed config with a key the kernel does not take, or a value outside its range, stops with an error that
    names it (instead of a silent ignore, a division by zero or a compiler error)."""
    p1, p2 = _factors(16, 16)
    x = _inputs(3, 256, torch.bfloat16)
    for cfg, match in (
        ({"FOO": 1}, r"takes config keys .*got \['FOO'\]"),
        ({"BLOCK_T": 0}, "BLOCK_T=0 is not one of 1, 2, 4"),
        ({"BLOCK_T": 3}, "BLOCK_T=3"),
        ({"PROGS_PER_SM": 0}, "PROGS_PER_SM=0 is not one of 1-64"),
        ({"num_warps": 3}, "num_warps=3 is not one of 1, 2, 4, 8, 16"),
        ({"num_stages": 0}, "num_stages=0"),
        ({"FAST_DIV": 2}, "FAST_DIV=2"),
        ({"maxnreg": 8}, "maxnreg=8 must be None or a register count"),
    ):
        with pytest.raises(ValueError, match=match):
            kq.kron_quantize_triton(x, p1, p2, config=cfg)
    xp = _inputs(2, 86 * 128, torch.bfloat16)
    with pytest.raises(ValueError, match="num_warps=5"):
        kq.kron_quantize_triton(xp, *_factors(86, 128), config={"PIECES": 1, "num_warps": 5})
    _assert_same(
        kq.kron_quantize_triton(x, p1, p2, config={"num_warps": 8, "maxnreg": 128}),
        kq.kron_quantize_reference(x, p1, p2),
        x,
        p1,
        p2,
    )


@needs_triton
def test_stacked_config_rejected_on_large_tiles():
    p1, p2 = _factors(16, 16)
    x = _inputs(3, 256, torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_T=128"):
        kq.kron_quantize_triton(x, p1, p2, config=dict(BLOCK_T=128))


@needs_triton
def test_identity_p1_with_16bit_intermediate():
    """p1=None with intermediate="input": X @ P2 rounded to x.dtype is the transform's result (one token
    per iteration, the default path)."""
    n1, n2 = (32, 64) if CUDA else (4, 16)
    _, p2 = _factors(n1, n2, seed=17)
    x = _inputs(9, n1 * n2, torch.bfloat16, seed=18)
    out = kq.kron_quantize_triton(x, None, p2, intermediate="input")
    _assert_same(out, kq.kron_quantize_reference(x, None, p2, intermediate="input"), x, None, p2, intermediate="input")


@pytest.mark.skipif(not CUDA, reason="the autotuner runs on CUDA only (the interpreter uses the fixed config)")
@pytest.mark.parametrize("n1,n2", [(64, 64), (112, 128)])
def test_autotuned_launch(n1, n2):
    """The autotuned kernel: a shape's first call goes through the autotuner, the second launches the config it
    chose directly (ChosenConfigLaunch); both give the reference's codes."""
    p1, p2 = _factors(n1, n2, seed=19)
    for tokens in (3, 1000):
        for seed in (tokens, tokens + 1):
            x = _inputs(tokens, n1 * n2, torch.bfloat16, seed=seed)
            out = kq.kron_quantize(x, p1, p2, 0.9, 0.9)
            _assert_same(out, kq.kron_quantize_reference(x, p1, p2, 0.9, 0.9), x, p1, p2)
    assert kq._kron_quantize_tuned.chosen  # the second calls took the direct launch


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric,pack", [(True, False), (False, True)])
def test_p1_first_order(dtype, symmetric, pack):
    """(P1^T X) P2 order (fp32 intermediate split on the left operand) gives the reference's codes."""
    n1, n2 = (86, 128) if CUDA else (24, 40)
    p1, p2 = _factors(n1, n2, seed=21)
    x = _inputs(13, n1 * n2, dtype, seed=22)
    kw = dict(clip_max=0.8, clip_min=0.7, symmetric=symmetric, pack=pack)
    out = kq.kron_quantize_triton(x, p1, p2, config=dict(P1_FIRST=1), **kw)
    _assert_same(out, kq.kron_quantize_reference(x, p1, p2, **kw), x, p1, p2, symmetric, pack)


@needs_triton
@pytest.mark.skipif(CUDA, reason="the GPU runs the real autotuner (test_autotuned_launch)")
def test_autotuned_plumbing_in_interpreter(monkeypatch):
    """The autotuned launch path on CPU: key names, config pruning to the call's candidates, grid from the
    chosen config; timing replaced by a stub (every candidate runs once)."""
    pruned = []

    def prune(configs, named_args, **kwargs):
        out = kq._prune(configs, named_args, **kwargs)
        pruned.append([kq.config_items(c) for c in out])
        return out

    def bench(fn, quantiles=None, **kwargs):
        fn()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    configs = [kq._as_triton_config(c) for c in kq._ALL_CONFIGS.values()]
    key = ["N1", "N2", "T_BUCKET", "HAS_P1", "HAS_P2", "SPLIT_Y", "SYMMETRIC", "PACK"]
    try:
        tuned = kq.triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, do_bench=bench)
    except TypeError:
        pytest.skip("this triton's autotune takes no do_bench")
    monkeypatch.setattr(kq, "_kron_quantize_tuned", tuned(kq._kron_quantize_kernel))
    monkeypatch.setattr(kq, "_use_autotuner", lambda config: config is None)
    p1, p2 = _factors(16, 16, seed=31)
    for tokens, bucket in ((70, 1), (5, 0)):
        x = _inputs(tokens, 256, torch.bfloat16, seed=tokens)
        out = kq.kron_quantize_triton(x, p1, p2, 0.9, 0.8)
        _assert_same(out, kq.kron_quantize_reference(x, p1, p2, 0.9, 0.8), x, p1, p2)
        want = kq.candidate_configs(16, 16, bucket)
        assert sorted(str(sorted(c.items())) for c in pruned[-1]) == sorted(str(sorted(c.items())) for c in want)


@needs_triton
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_t", [1, 2])
@pytest.mark.parametrize("fast_div", [0, 1])
def test_codes_exact_where_a_reciprocal_multiply_rounds_the_other_way(symmetric, block_t, fast_div):
    """FAST_DIV=1 divides by the scale as z * (1 / scale) and redoes a tile with IEEE divisions where that
    can round differently; tokens built so that it does for one element each must give the reference's codes
    (as the IEEE divisions of FAST_DIV=0 do)."""
    n1 = n2 = 16
    qmax = 7 if symmetric else 15
    g = torch.Generator().manual_seed(3)
    m = (torch.rand(20000, generator=g) * 63 + 1).to(torch.bfloat16).to(DEVICE)  # each token's range
    s = (m.float() / qmax).clamp_min(1e-8)  # the reference's scale of such a token, computed as it does
    found = []
    for k in range(qmax):
        for sign in (1, -1) if symmetric else (1,):
            z = (sign * (k + 0.5) * s).to(torch.bfloat16)  # quotients at or next to k + 1/2
            flips = torch.round(z.float() / s) != torch.round(z.float() * (1 / s))
            found += [(m[i], z[i]) for i in flips.nonzero().flatten()[:6].tolist()]
    assert len(found) >= 12, "the construction should find such quotients"  # 18-48: bf16 ranges are few
    x = torch.zeros(len(found), n1 * n2, dtype=torch.bfloat16, device=DEVICE)
    fill = torch.rand(len(found), n1 * n2 - 16, generator=g).to(DEVICE)
    for t, (mt, zt) in enumerate(found):
        x[t, 0], x[t, 7] = mt, zt
        x[t, 16:] = (fill[t] * mt.float() / 2).to(torch.bfloat16)  # in range, >= 0: min and max stay 0 and m
    eye = torch.eye(n1, device=DEVICE)
    kw = dict(bits=4, symmetric=symmetric)
    out = kq.kron_quantize_triton(
        x, eye, None, 1.0, 1.0, config=dict(BLOCK_T=block_t, PROGS_PER_SM=1, FAST_DIV=fast_div), **kw
    )
    ref = kq.kron_quantize_reference(x, eye, None, 1.0, 1.0, **kw)
    assert torch.equal(out.scale, ref.scale)
    assert torch.equal(out.codes, ref.codes)


@needs_triton
def test_autotuner_times_candidates_as_graph_replays(monkeypatch):
    """The autotuner's candidates are timed from CUDA-graph replays, not events around host launches (which
    measured the host for decode-size kernels)."""
    import triton.testing

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: calls.append((fn, kw)) or [2.0])
    fn = object()
    assert kq._kron_quantize_tuned.do_bench(fn, quantiles=(0.5, 0.2, 0.8)) == [2.0]
    assert calls and calls[0][0] is fn and calls[0][1]["quantiles"] == (0.5, 0.2, 0.8)


if kq.triton is not None:
    tl = kq.tl

    @kq.triton.jit
    def _div_probe(z_ptr, s_ptr, out_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        z = tl.load(z_ptr + r)
        s = tl.load(s_ptr + r // 64)  # one scale per row of 64, broadcast as a token's scale is
        tl.store(out_ptr + r, kq._div_exact(z, s, kq._recip(s)))


@needs_triton
def test_exact_division_equals_ieee_division_bit_for_bit():
    """z / s from the reciprocal and two fmas equals the correctly rounded quotient (torch's IEEE division),
    including quotients next to half-integers, where rint of z * RN(1 / s) alone can differ."""
    g = torch.Generator().manual_seed(5)
    s = torch.rand(64, generator=g) * 3 + 1e-3
    k = torch.randint(-9, 9, (64, 64), generator=g).float() + 0.5  # half-integer quotients, then nudged
    z = (k * s[:, None]) * (1 + (torch.rand(64, 64, generator=g) - 0.5) * 4e-7)
    z[:16] = torch.randn(16, 64, generator=g) * 50  # and ordinary values
    z[16, :3] = torch.tensor([0.0, -0.0, 1e-30])
    out = torch.empty(64 * 64)
    zd, sd, od = (t.to(DEVICE).contiguous() for t in (z.flatten(), s, out))
    _div_probe[(1,)](zd, sd, od, N=64 * 64)
    want = z.flatten() / s.repeat_interleave(64)
    assert torch.equal(od.cpu(), want)
    naive = z.flatten() * (1 / s).repeat_interleave(64)
    assert not torch.equal(naive, want)  # the inputs do reach the cases the correction step is for


def test_chosen_config_launch_skips_the_autotuner_once_a_key_is_tuned():
    """The autotuned kernels launch through ChosenConfigLaunch: the first call of a key goes through the
    autotuner; later calls with the same key values and tensor dtypes launch the JIT function with the config
    it chose; another key value or dtype goes through the autotuner again. Attributes are the autotuner's."""
    if kq.triton is None:
        pytest.skip("triton is not importable")
    calls = []

    class Config:
        def __init__(self, block):
            self.kwargs, self.pre_hook = {"BLOCK": block}, None

        def all_kwargs(self):
            return {**self.kwargs, "num_warps": 4}

    class Jit:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("direct", a[1], kw))

    class Tuner:
        arg_names, keys, fn, do_bench = ["x", "N", "FLAG"], ["N", "FLAG"], Jit(), "tuner's"

        def __getitem__(self, grid):
            def run(*a, **kw):
                self.best_config = Config(16 * a[1])
                calls.append(("tuner", a[1], kw))

            return run

    launch = kq.ChosenConfigLaunch(Tuner())
    x16, x32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    launch[(1,)](x16, 4, FLAG=True)
    launch[(1,)](x16, 4, FLAG=True)
    launch[(1,)](x16, 8, FLAG=True)  # another key value
    launch[(1,)](x32, 4, FLAG=True)  # another dtype
    launch[(1,)](x16, 4, FLAG=False)  # a key argument given by keyword
    launch[(1,)](x16, 8, FLAG=True)
    assert [c[0] for c in calls] == ["tuner", "direct", "tuner", "tuner", "tuner", "direct"]
    assert calls[1][2] == {"FLAG": True, "BLOCK": 64, "num_warps": 4}  # the config chosen for N=4
    assert calls[5][2] == {"FLAG": True, "BLOCK": 128, "num_warps": 4}
    assert launch.best_config.kwargs == {"BLOCK": 128}  # the last launch's config, as the benchmarks read it
    assert launch.do_bench == "tuner's" and isinstance(kq._kron_quantize_tuned, kq.ChosenConfigLaunch)


NORM_CONFIGS = [{}, {"BLOCK_T": 2}, {"P1_FIRST": 1}, {"FAST_DIV": 1}]


def _norm_case(tokens, n1, n2, dtype, exact: bool, seed=5):
    """x, the RMSNorm weight and eps. exact: every row of x is +-2^k (a power of two per row), eps = 0, so that
    the norm's mean of squares, square root and division are exact and the normalised x is +-weight: any
    kernel / reference difference is then the kernel's own (masks, weight layout, stacking), not rounding."""
    g = torch.Generator().manual_seed(seed)
    n = n1 * n2
    if exact:
        sign = torch.randint(0, 2, (tokens, n), generator=g) * 2 - 1
        x = sign * 2.0 ** torch.randint(-3, 4, (tokens, 1), generator=g)
        eps = 0.0
    else:
        x, eps = _inputs(tokens, n, torch.float32, seed=seed, device="cpu"), 1e-6
    w = 0.5 + torch.rand(n, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), eps


@needs_triton
@pytest.mark.parametrize("cfg", NORM_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_norm_equals_the_norm_module_then_the_transform(cfg, symmetric, dtype):
    """kron_quantize(x, norm=(w, eps)) = kron_quantize(RMSNorm(x)) with the norm modules' arithmetic: exactly
    where the norm is exact by construction; else codes equal except at rounding ties of X'/scale, or where
    the normalised input itself rounds differently (the kernel sums the squares in another order: one 16-bit
    ulp at a rounding boundary, as the one-launch RMSNorm kernel), which must stay rare."""
    n1, n2 = (64, 64) if CUDA else (8, 12)
    p1, p2 = _factors(n1, n2)
    tokens = 333 if CUDA else 37
    for exact in (True, False):
        x, w, eps = _norm_case(tokens, n1, n2, dtype, exact)
        out = kq.kron_quantize_triton(x, p1, p2, 0.9, 0.8, 4, symmetric, norm=(w, eps), config=cfg)
        xn = kq.rms_norm_reference(x, w, eps)
        ref = kq.kron_quantize_reference(xn, p1, p2, 0.9, 0.8, 4, symmetric)
        assert torch.equal(
            ref.codes, kq.kron_quantize_reference(x, p1, p2, 0.9, 0.8, 4, symmetric, norm=(w, eps)).codes
        )
        if exact:
            assert torch.equal(xn.abs(), w.expand_as(xn).abs())
            _assert_same(out, ref, xn, p1, p2, symmetric)
        else:
            diff = out.codes != ref.codes
            assert (out.codes.int() - ref.codes.int()).abs().max() <= 1
            assert diff.float().mean() < 1e-3, f"{diff.sum().item()} codes differ"
            torch.testing.assert_close(out.scale, ref.scale, rtol=1e-2, atol=0)
            assert (((out.scale - ref.scale).abs() / ref.scale) < 2e-5).float().mean() > 0.99


@needs_triton
def test_fused_norm_is_refused_where_it_cannot_run():
    n1, n2 = (64, 64) if CUDA else (8, 12)
    p1, p2 = _factors(n1, n2)
    x, w, eps = _norm_case(5, n1, n2, torch.bfloat16, exact=False)
    with pytest.raises(ValueError, match="norm weight must be"):
        kq.kron_quantize_triton(x, p1, p2, norm=(w.float(), eps))
    with pytest.raises(ValueError, match="norm weight must be"):
        kq.kron_quantize_triton(x, p1, p2, norm=(w[:-1], eps))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        kq.kron_quantize(x, p1, p2, norm=(w, -1.0), impl="torch")
    big1, big2 = _factors(128, 128)
    xb = torch.zeros(2, 128 * 128, dtype=torch.bfloat16, device=DEVICE)
    wb = torch.ones(128 * 128, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="fused norm needs token tiles"):
        kq.kron_quantize_triton(xb, big1, big2, norm=(wb, 0.0))
    assert kq.fuses_norm(64, 64) and kq.fuses_norm(64, 128) and kq.fuses_norm(56, 64) and kq.fuses_norm(24, 24)
    assert not kq.fuses_norm(128, 128) and not kq.fuses_norm(86, 128)


@pytest.mark.skipif(not CUDA, reason="the autotuner runs on CUDA only")
@pytest.mark.parametrize("n1,n2", [(64, 64), (64, 128)])
def test_autotuned_launch_with_a_fused_norm(n1, n2):
    """The autotuned launch with a fused norm (NORM in the key; column-chunked candidates pruned): exact where the
    norm is exact by construction, twice per shape (the second call launches the chosen config directly)."""
    p1, p2 = _factors(n1, n2, seed=23)
    for tokens in (3, 1000, 1000):
        x, w, eps = _norm_case(tokens, n1, n2, torch.bfloat16, exact=True, seed=tokens)
        out = kq.kron_quantize(x, p1, p2, 0.9, 0.9, norm=(w, eps))
        xn = kq.rms_norm_reference(x, w, eps)
        _assert_same(out, kq.kron_quantize_reference(xn, p1, p2, 0.9, 0.9), xn, p1, p2)


# ---- the pieces kernel: n1 cut in power-of-two pieces (86 -> 64 + 32) for n2 = 128 ----
PIECE_PAIRS = [(86, 128), (108, 128), (112, 128)] if CUDA else [(40, 128), (86, 128), (112, 128)]


def test_piece_sizes_and_which_launches_take_them():
    assert [kp.piece_sizes(n) for n in (86, 112, 108, 80, 48, 148, 224)] == [
        (64, 32), (64, 32, 16), (64, 32, 16), (64, 16), (32, 16), (128, 32), (128, 64, 32)
    ]  # fmt: skip
    assert [kp.piece_sizes(n) for n in (16, 24, 64, 120, 240)] == [None] * 5  # no padding saved
    assert kp.pieces_of(86, 128) == (64, 32) and kp.pieces_of(112, 128) == (64, 32, 16)
    assert kp.pieces_of(86, 64) is None and kp.pieces_of(64, 80) is None  # n2 must be 128
    assert kp.pieces_of(148, 128) is None  # 128 x 160 elements: over the register budget
    assert kp.uses_pieces(86, 128, True, True, "fp32", None) == kp.PIECES
    assert not kp.uses_pieces(112, 128, True, True, "fp32", None)  # three pieces: no faster than padding
    assert not kp.uses_pieces(86, 128, True, True, "input", None)
    assert not kp.uses_pieces(86, 128, True, False, "fp32", None)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric,pack", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("n1,n2", PIECE_PAIRS)
def test_pieces_kernel_matches_reference(n1, n2, symmetric, pack, dtype):
    p1, p2 = _factors(n1, n2, seed=21)
    tokens = 333 if CUDA else 3
    x = _inputs(tokens, 2 * n1 * n2, dtype, seed=22)[:, : n1 * n2]  # row stride 2n
    x[1] = 0
    kw = dict(clip_max=0.9, clip_min=0.85, symmetric=symmetric, pack=pack)
    out = kq.kron_quantize_triton(x, p1, p2, config={"PIECES": 1}, **kw)
    ref = kq.kron_quantize_reference(x, p1, p2, **kw)
    assert out.scale[1].item() == pytest.approx(1e-8)
    _assert_same(out, ref, x, p1, p2, symmetric, pack)


@needs_triton
@pytest.mark.parametrize("n1,n2", PIECE_PAIRS[::2] if CUDA else PIECE_PAIRS[:1])
def test_every_pieces_candidate_config(n1, n2):
    p1, p2 = _factors(n1, n2, seed=23)
    for bucket, tokens in ((0, 5), (1, 70)):
        x = _inputs(tokens, n1 * n2, torch.bfloat16, seed=bucket)
        ref = kq.kron_quantize_reference(x, p1, p2, 0.9, 0.8)
        for cfg in kp.pieces_candidate_configs(bucket):
            out = kq.kron_quantize_triton(x, p1, p2, 0.9, 0.8, config=dict(cfg, PIECES=1))
            _assert_same(out, ref, x, p1, p2)


@needs_triton
def test_pieces_dispatch_and_errors(monkeypatch):
    """Without a fixed config the pieces kernel runs where it applies and FLATQUANT_KRON_PIECES allows it; a
    forced PIECES=1 that cannot run, or a padded-kernel key given to it, is refused with the reason."""
    calls = []
    launch = kp.launch_pieces
    monkeypatch.setattr(kp, "launch_pieces", lambda *a: calls.append(a[7:9]) or launch(*a))
    n1, n2 = 86, 128
    p1, p2 = _factors(n1, n2, seed=24)
    x = _inputs(2, n1 * n2, torch.bfloat16, seed=25)
    ref = kq.kron_quantize_reference(x, p1, p2)
    for on in (True, False):
        monkeypatch.setattr(kp, "PIECES", on)
        _assert_same(kq.kron_quantize_triton(x, p1, p2), ref, x, p1, p2)
    assert calls == [(n1, n2)]  # only with the switch on
    _assert_same(kq.kron_quantize_triton(x, p1, p2, config={"BLOCK_T": 1}), ref, x, p1, p2)  # padded kernel's
    assert len(calls) == 1
    with pytest.raises(ValueError, match="PIECES=1 needs"):
        kq.kron_quantize_triton(_inputs(2, 256, torch.bfloat16), *_factors(16, 16), config={"PIECES": 1})
    with pytest.raises(ValueError, match="BLOCK_T"):
        kq.kron_quantize_triton(x, p1, p2, config={"PIECES": 1, "BLOCK_T": 2})
    with pytest.raises(ValueError, match="fp32 intermediate"):  # would have run the fp32 intermediate silently
        kq.kron_quantize_triton(x, p1, p2, intermediate="input", config={"PIECES": 1})


@needs_triton
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kernel", ["padded", "stacked", "pieces"])
def test_e4m3_codes_are_the_int8_codes(kernel, symmetric):
    """codes_dtype=float8_e4m3fn writes the same integers as e4m3 bytes (the dense FP8 GEMM's operand), from both
    Triton kernels and the reference, centred (code - zero) and without a zero point when asymmetric; scales
    unchanged."""
    n1, n2 = PIECE_PAIRS[0] if kernel == "pieces" else (6, 10) if kernel == "stacked" else CONFIG_PAIRS[0]
    p1, p2 = _factors(n1, n2, seed=31)
    x = _inputs(333 if CUDA else 5, n1 * n2, torch.bfloat16, seed=32)
    config = {"pieces": {"PIECES": 1}, "stacked": {"BLOCK_T": 2, "PROGS_PER_SM": 1}}.get(kernel)
    kw = dict(clip_max=0.9, clip_min=0.85, symmetric=symmetric)
    base = kq.kron_quantize_triton(x, p1, p2, config=config, **kw)
    fp8 = kq.kron_quantize_triton(x, p1, p2, config=config, codes_dtype=torch.float8_e4m3fn, **kw)
    ref = kq.kron_quantize_reference(x, p1, p2, codes_dtype=torch.float8_e4m3fn, **kw)
    assert fp8.codes.dtype == ref.codes.dtype == torch.float8_e4m3fn and base.codes.dtype == torch.int8
    assert fp8.zero is None and ref.zero is None
    centre = 0.0 if symmetric else base.zero[:, None]
    assert torch.equal(fp8.codes.float(), base.codes.float() - centre)
    assert torch.equal(fp8.scale, base.scale)
    ref_int8 = kq.kron_quantize_reference(x, p1, p2, **kw)
    assert torch.equal(ref.codes.float(), ref_int8.codes.float() - (0.0 if symmetric else ref_int8.zero[:, None]))
    _assert_same(ref_int8, base, x, p1, p2, symmetric)
    if not symmetric:
        assert fp8.codes.float().abs().max() <= 15 and (base.zero >= 0).all() and (base.zero <= 15).all()


def test_codes_dtype_errors():
    x = _inputs(2, 64, torch.bfloat16)
    p1, p2 = _factors(8, 8)
    with pytest.raises(ValueError, match="codes_dtype must be torch.int8 or torch.float8_e4m3fn"):
        kq.kron_quantize(x, p1, p2, codes_dtype=torch.float16)
    with pytest.raises(ValueError, match="pack=True .* must stay int8"):
        kq.kron_quantize(x, p1, p2, pack=True, codes_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="bits must be <= 4"):
        kq.kron_quantize(x, p1, p2, bits=6, codes_dtype=torch.float8_e4m3fn)
