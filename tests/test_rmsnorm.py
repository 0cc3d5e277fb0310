"""The one-launch RMSNorm against the norm modules' arithmetic, and its swap into packed models."""

import pytest
import torch
from conftest import ARCHS, for_the_interpreter, swap_keeps_logits, tiny_model

import flatquant.kernels.kron_quantize as kq
import flatquant.kernels.kv_quant as kv
import flatquant.kernels.rmsnorm as rn

kq, kv, rn = for_the_interpreter(kq, kv, rn)
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(rn.triton is None or not (CUDA or rn._interpreting()), reason="no triton")


def _rows(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (0.1 + 5 * torch.rand(*shape[:-1], 1, generator=g))
    return x.to(DEVICE, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("w_dtype", ["same", torch.float32])
@pytest.mark.parametrize("d", [4096, 576] if CUDA else [576, 40])
def test_kernel_matches_the_module_arithmetic(dtype, w_dtype, d):
    x = _rows((3, 7, d), dtype, seed=d)
    x[1, 2] = 0  # an all-zero row: eps keeps it finite
    g = torch.Generator().manual_seed(1)
    weight = (1 + 0.3 * torch.randn(d, generator=g)).to(DEVICE, dtype if w_dtype == "same" else w_dtype)
    out = rn.rms_norm_triton(x, weight, 1e-5)
    ref = rn.rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # the intermediate h is rounded to x's dtype by both: at most one ulp of it apart, times the weight
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}[dtype]
    bound = 2 * ulp * ref.float().abs() + 1e-6
    assert ((out.float() - ref.float()).abs() <= bound).all()
    exact = (out == ref).float().mean().item()
    assert exact > (0.95 if dtype != torch.float32 else 0.5)  # differences only at rounding boundaries
    assert torch.isfinite(out).all() and (out[1, 2] == 0).all()


def test_rms_norm_dispatch_and_errors():
    x, w = torch.randn(2, 8), torch.ones(8)
    assert torch.equal(rn.rms_norm(x, w, 1e-6), rn.rms_norm_reference(x, w, 1e-6))  # CPU: the reference
    with pytest.raises(ValueError, match="impl"):
        rn.rms_norm(x, w, 1e-6, impl="cuda")
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rn.rms_norm_triton(x.to(DEVICE), torch.ones(7, device=DEVICE), 1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_swapped_norms_give_the_same_logits(arch):
    names = {n for n, m in tiny_model(arch).named_modules() if type(m).__name__.endswith("RMSNorm")}
    swapped = []
    model = swap_keeps_logits(arch, lambda m: swapped.append(rn.fuse_rms_norms(m)))
    assert swapped == [len(names)] and len(names) > 0
    assert all(isinstance(model.get_submodule(n), rn.FusedRMSNorm) for n in names)
