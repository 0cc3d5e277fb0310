"""The one-launch RoPE of q and k against transformers' own apply_rotary_pos_emb, and its use in models."""

import sys

import pytest
import torch
from conftest import ARCHS, for_the_interpreter, tiny_model
from transformers.models.llama import modeling_llama

import flatquant.kernels.kron_quantize as kq
import flatquant.kernels.kv_quant as kv
import flatquant.kernels.rope as rp

kq, kv, rp = for_the_interpreter(kq, kv, rp)
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(rp.triton is None or not (CUDA or rp._interpreting()), reason="no triton")
HF_ROPE = modeling_llama.apply_rotary_pos_emb
if isinstance(HF_ROPE, rp.FusedRotary):  # another test of this process fused it: the function underneath
    HF_ROPE = HF_ROPE.original


def _qk(b, hq, hk, t, d, dtype, seed=0):
    """q and k as the attention forward makes them: head transposes of one fused projection's column slices."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(b, t, (hq + 2 * hk) * d, generator=g) * torch.exp(2 * torch.randn(b, t, 1, generator=g))
    proj = proj.to(DEVICE, dtype)
    q = proj[..., : hq * d].view(b, t, hq, d).transpose(1, 2)
    k = proj[..., hq * d : (hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
    return q, k


def _cos_sin(b, t, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(b, t, d, generator=g) * 100
    return torch.cos(angle).to(DEVICE, dtype), torch.sin(angle).to(DEVICE, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hk,t,d,cos_batch", [(2, 4, 2, 7, 16, 2), (1, 3, 3, 1, 64, 1), (3, 9, 3, 5, 8, 1)])
def test_kernel_equals_transformers_bit_for_bit(dtype, b, hq, hk, t, d, cos_batch):
    q, k = _qk(b, hq, hk, t, d, dtype, seed=d)
    cos, sin = _cos_sin(cos_batch, t, d, dtype)
    want_q, want_k = HF_ROPE(q, k, cos, sin)
    got_q, got_k = rp.rope_triton(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)

    def layout(x):  # strides of the dimensions that have more than one element
        return [st for st, n in zip(x.stride(), x.shape, strict=True) if n > 1]

    assert got_q.shape == want_q.shape and layout(got_q) == layout(want_q)  # the same (token-major) layout
    ref_q, ref_k = rp.rope_reference(q, k, cos, sin)
    assert torch.equal(ref_q, want_q) and torch.equal(ref_k, want_k)


@needs_triton
def test_contiguous_inputs_and_an_odd_half():
    q, k = (x.contiguous() for x in _qk(2, 2, 1, 3, 12, torch.bfloat16))  # D / 2 = 6: a padded block
    cos, sin = _cos_sin(2, 3, 12, torch.bfloat16)
    got = rp.rope_triton(q, k, cos, sin)
    assert all(torch.equal(a, w) for a, w in zip(got, HF_ROPE(q, k, cos, sin), strict=True))
    assert got[0].is_contiguous()


def test_dispatch_and_errors():
    q, k = _qk(1, 2, 2, 3, 8, torch.float32)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    assert all(torch.equal(a, w) for a, w in zip(rp.rope(q, k, cos, sin), HF_ROPE(q, k, cos, sin), strict=True))
    with pytest.raises(ValueError, match="impl"):
        rp.rope(q, k, cos, sin, impl="cuda")
    assert "16-bit" in rp.unsupported_reason(q, k, cos, sin)
    q16, k16 = q.to(torch.bfloat16), k.to(torch.bfloat16)
    assert "do not match" in rp.unsupported_reason(q16, k16[:, :, :2], cos.bfloat16(), sin.bfloat16())
    if rp.triton is not None:
        with pytest.raises(RuntimeError, match="rope triton kernel cannot run"):
            rp.rope_triton(q, k, cos, sin)


@needs_triton
def test_fused_rotary_falls_back_to_the_original_where_it_does_not_apply():
    calls = []

    def original(q, k, cos, sin, *args, **kwargs):
        calls.append((args, kwargs))
        return "original"

    fused = rp.FusedRotary(original)
    fused.impl = "triton"
    q, k = _qk(1, 2, 2, 3, 8, torch.bfloat16)
    cos, sin = _cos_sin(1, 3, 8, torch.bfloat16)
    assert fused(q, k, cos, sin)[0].shape == q.shape and not calls  # the kernel
    assert fused(q, k, cos, sin, 1)[0].shape == q.shape and not calls  # unsqueeze_dim=1 given
    assert fused(q, k, cos, sin, unsqueeze_dim=2) == "original"
    assert fused(q, k, cos, sin, None, 1) == "original"  # an older signature (position_ids first)
    assert fused(q.float(), k.float(), cos.float(), sin.float()) == "original"
    q_train = q.detach().requires_grad_()  # a model being calibrated: the kernel has no backward
    assert fused(q_train, k, cos, sin) == "original"
    with torch.no_grad():
        assert fused(q_train, k, cos, sin)[0].shape == q.shape
    fused.impl = "auto"  # the kernel on CUDA only
    assert (fused(q, k, cos, sin) == "original") != CUDA
    assert len(calls) == (4 if CUDA else 5)


@needs_triton
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_rotary_gives_the_same_logits(arch, monkeypatch):
    model = tiny_model(arch).to(DEVICE, torch.bfloat16)
    attn_module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = attn_module.apply_rotary_pos_emb
    original = original.original if isinstance(original, rp.FusedRotary) else original
    monkeypatch.setattr(attn_module, "apply_rotary_pos_emb", original)  # restored after the test
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        want = model(tokens).logits
        assert rp.fuse_rotary(model) == [attn_module.__name__]
        assert rp.fuse_rotary(model) == []  # once per module
        fused = attn_module.apply_rotary_pos_emb
        assert isinstance(fused, rp.FusedRotary) and fused.original is original
        fused.impl = "triton"  # the kernel (the interpreter off CUDA)
        calls, kernel = [], rp._launch
        monkeypatch.setattr(rp, "_launch", lambda *a: calls.append(1) or kernel(*a))
        got = model(tokens).logits
    assert calls and torch.equal(got, want)
    assert attn_module.__name__ in rp.unfuse_rotary() and attn_module.apply_rotary_pos_emb is original
