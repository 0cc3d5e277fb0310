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
