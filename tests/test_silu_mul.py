"""The one-launch SiLU(gate) * up against the MLP's arithmetic and float64, and its swap into models."""

import pytest
import torch
from conftest import ARCHS, for_the_interpreter, swap_keeps_logits, tiny_model

import flatquant.kernels.kron_quantize as kq
import flatquant.kernels.kv_quant as kv
import flatquant.kernels.silu_mul as sm

kq, kv, sm = for_the_interpreter(kq, kv, sm)
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(sm.triton is None or not (CUDA or sm._interpreting()), reason="no triton")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _gate_up(rows, n, dtype, seed=0):
    """gate and up as the column halves of one (rows, 2n) GEMM output: strided views, as in a packed model."""
    g = torch.Generator().manual_seed(seed)
    fused = (torch.randn(rows, 2 * n, generator=g) * 4).to(DEVICE, dtype)
    fused[0, :4] = torch.tensor([0.0, -30.0, 30.0, -1e-3])  # silu's flat tail, linear head and zero
    return fused[:, :n], fused[:, n:]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", [(7, 1376), (1, 100)] if not CUDA else [(7, 1376), (1, 100), (4096, 11008)])
def test_kernel_matches_the_mlp_arithmetic_and_float64(dtype, rows, n):
    gate, up = _gate_up(rows, n, dtype, seed=n)
    assert gate.stride(0) == 2 * n  # really strided
    out = sm.silu_mul_triton(gate, up)
    ref = sm.silu_mul_reference(gate, up)
    assert out.dtype == dtype and out.shape == (rows, n) and out.is_contiguous()
    # float64 with the module's two roundings to the dtype: silu's output, then the product
    g64, u64 = gate.double(), up.double()
    s = (g64 / (1 + torch.exp(-g64))).to(dtype).double()
    exact64 = (s * u64).to(dtype)
    for want in (ref, exact64):
        # silu's output may sit one ulp of the dtype apart at a rounding boundary; the product carries it,
        # which below the normal range (float16 products of ~1e-5) is one step of the fixed subnormal spacing
        bound = 4 * ULP[dtype] * want.float().abs() + 2 * ULP[dtype] * torch.finfo(dtype).smallest_normal
        assert ((out.float() - want.float()).abs() <= bound).all()
        assert (out == want).float().mean().item() > 0.99
    assert torch.isfinite(out).all() and out[0, 0] == 0


@needs_triton
def test_kernel_takes_any_leading_shape_and_contiguous_inputs():
    gate, up = _gate_up(6, 40, torch.bfloat16, seed=3)
    g3, u3 = gate.contiguous().reshape(2, 3, 40), up.contiguous().reshape(2, 3, 40)
    out = sm.silu_mul_triton(g3, u3)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out.reshape(6, 40), sm.silu_mul_triton(gate, up))


def test_dispatch_and_errors():
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(sm.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)  # CPU: the reference
    with pytest.raises(ValueError, match="impl"):
        sm.silu_mul(gate, up, impl="cuda")
    if sm.triton is not None and (CUDA or sm._interpreting()):
        with pytest.raises(ValueError, match="must share shape"):
            sm.silu_mul_triton(gate.to(DEVICE, torch.bfloat16), up[:, :4].to(DEVICE, torch.bfloat16))
        with pytest.raises(ValueError, match="takes"):
            sm.silu_mul_triton(gate.to(DEVICE), up.to(DEVICE))  # float32


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_swapped_mlps_give_the_same_logits_and_keep_the_names(arch):
    swapped = []
    model = swap_keeps_logits(arch, lambda m: swapped.append(sm.fuse_silu_mul(m)))
    assert swapped == [model.config.num_hidden_layers]
    assert sm.fuse_silu_mul(model) == 0  # already swapped
    assert all(isinstance(layer.mlp, sm.FusedGatedMLP) for layer in model.model.layers)


def test_other_activations_are_left_alone():
    model = tiny_model("llama", hidden_act="gelu")
    assert sm.fuse_silu_mul(model) == 0
    assert not any(isinstance(m, sm.FusedGatedMLP) for m in model.modules())


def _factors(n1, n2, seed=0):
    g = torch.Generator().manual_seed(seed)
    p1 = torch.linalg.qr(torch.randn(n1, n1, generator=g, dtype=torch.float64))[0] * 1.3
    p2 = torch.randn(n2, n2, generator=g, dtype=torch.float64) / n2**0.5
    return p1.float().to(DEVICE), p2.float().to(DEVICE)


# (n1, n2, config): the down projection's tiles (86 x 128 pads to the largest whole-token tile) and a small one
# whose tokens can be stacked; each kernel path the gated input goes through (one token or BLOCK_T tokens per
# iteration, either product order, IEEE or reciprocal-multiply codes)
GATED_CASES = (
    [(86, 128, {}), (86, 128, {"P1_FIRST": 1}), (86, 128, {"FAST_DIV": 1}), (64, 64, {"BLOCK_T": 2})]
    if CUDA
    else [(6, 20, {}), (6, 20, {"P1_FIRST": 1}), (6, 20, {"FAST_DIV": 1}), (8, 12, {"BLOCK_T": 2})]
)


@needs_triton
@pytest.mark.parametrize("n1,n2,cfg", GATED_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_inside_the_transform_launch_equals_silu_mul_then_the_transform(n1, n2, cfg, symmetric, dtype):
    """kron_quantize(gate, up=up): SiLU(gate) * up computed in the transform + quantize launch gives the codes,
    scales and zero points of silu_mul_triton followed by kron_quantize_triton, bit for bit (one copy of the
    arithmetic, the same config); the reference's gated input is the MLP's own arithmetic."""
    p1, p2 = _factors(n1, n2)
    tokens = 333 if CUDA else 37
    gate, up = _gate_up(tokens, n1 * n2, dtype, seed=n1)
    assert gate.stride(0) == 2 * n1 * n2  # column halves of one GEMM output, as the packed MLP hands them over
    kw = dict(clip_max=0.9, clip_min=0.8, bits=4, symmetric=symmetric)
    out = kq.kron_quantize_triton(gate, p1, p2, **kw, up=up, config=cfg)
    sep = kq.kron_quantize_triton(sm.silu_mul_triton(gate, up), p1, p2, **kw, config=cfg)
    assert torch.equal(out.codes, sep.codes) and torch.equal(out.scale, sep.scale)
    assert (out.zero is None) == symmetric and (symmetric or torch.equal(out.zero, sep.zero))
    assert out.codes.abs().max() > 0 and (out.codes != out.codes[:, :1]).any()  # not a degenerate case
    ref = kq.kron_quantize_reference(gate, p1, p2, **kw, up=up)
    want = kq.kron_quantize_reference(sm.silu_mul_reference(gate, up), p1, p2, **kw)
    assert torch.equal(ref.codes, want.codes) and torch.equal(ref.scale, want.scale)
    # against the reference: codes one step apart at most, and rarely (exp may differ in its last fp32 bit,
    # and X' is summed in another order)
    assert (out.codes.int() - ref.codes.int()).abs().max() <= 1
    assert (out.codes != ref.codes).float().mean() < 1e-2
    torch.testing.assert_close(out.scale, ref.scale, rtol=1e-2, atol=0)


@needs_triton
def test_gated_input_is_refused_where_it_cannot_run():
    p1, p2 = _factors(6, 20)
    gate, up = _gate_up(3, 120, torch.bfloat16)
    with pytest.raises(ValueError, match="up must match the gate"):
        kq.kron_quantize_triton(gate, p1, p2, up=up[:, :60])
    with pytest.raises(ValueError, match="up must match the gate"):
        kq.kron_quantize(gate, p1, p2, up=up.half(), impl="torch")
    w = torch.ones(120, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="exclude each other"):
        kq.kron_quantize_triton(gate, p1, p2, up=up, norm=(w, 0.0))
    with pytest.raises(ValueError, match="whole token rows"):
        kq.kron_quantize_triton(gate, p1, p2, up=up, config={"BC": 16})
    big1, big2 = _factors(128, 148)
    gb = torch.zeros(1, 128 * 148, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16384 padded elements"):
        kq.kron_quantize_triton(gb, big1, big2, up=gb)
    assert kq.fuses_gate(86, 128) and kq.fuses_gate(112, 128) and kq.fuses_gate(128, 128) and kq.fuses_gate(8, 12)
    assert not kq.fuses_gate(128, 148) and not kq.fuses_gate(128, 224)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@torch.no_grad()
def test_down_projection_takes_gate_and_up_with_the_same_result(dtype):
    """W4A4Linear.forward_gated(gate, up, residual) = forward(silu_mul(gate, up), residual) exactly (CPU: the
    reference ops; a tile over 128 x 128 takes silu_mul first), and FusedGatedMLP hands gate and up over only
    when built with into_down and a down projection that takes them."""
    from flatquant.kernels.w4a4_linear import W4A4Linear

    g = torch.Generator().manual_seed(4)
    for n1, n2 in ((8, 12), (128, 136)):
        k = n1 * n2
        p1, p2 = _factors(n1, n2, seed=1)
        weight = torch.randn(24, k, generator=g) / k**0.5
        lin = W4A4Linear.from_float(weight, None, p1.cpu(), p2.cpu(), act_clip=0.9, out_dtype=dtype)
        gate, up = (t.cpu().to(dtype) for t in _gate_up(5, k, torch.float32, seed=k))
        residual = torch.randn(5, 24, generator=g).to(dtype)
        want = lin(sm.silu_mul(gate, up), residual=residual)
        assert torch.equal(lin.forward_gated(gate, up, residual=residual), want)
        assert torch.equal(lin.forward_gated(gate, up), lin(sm.silu_mul(gate, up)))
    gate_proj, up_proj = torch.nn.Linear(k, 4), torch.nn.Linear(k, 4)
    assert sm.FusedGatedMLP(gate_proj, up_proj, lin, into_down=True).into_down
    assert not sm.FusedGatedMLP(gate_proj, up_proj, lin).into_down
    assert not sm.FusedGatedMLP(gate_proj, up_proj, torch.nn.Linear(4, k), into_down=True).into_down


def test_gated_candidates_keep_whole_rows_and_fit_shared_memory():
    """The gated input loads two tiles a stage: whole token rows only, and at most 2 stages on 128 x 128 tiles
    (3 stages with X @ P2 first needed 256 KB of shared memory in the sm_90 build); smaller tiles keep theirs."""
    for bucket in (0, 1):
        plain = kq.candidate_configs(128, 128, bucket)
        gated = kq.candidate_configs(128, 128, bucket, gated=True)
        assert gated and all(c["BC"] == 128 and c["num_stages"] <= 2 for c in gated)
        assert len({tuple(sorted(c.items())) for c in gated}) == len(gated)  # no duplicates
        assert any(c["num_stages"] == 3 for c in plain) == any(c["BC"] == 64 for c in plain) == (bucket == 1)
        assert kq.candidate_configs(64, 64, bucket, gated=True) == kq.candidate_configs(64, 64, bucket)
    assert kq._default_config(128, 128, 5, gated=True)["num_stages"] == 2
    assert kq._default_config(128, 128, 5)["num_stages"] == 3
