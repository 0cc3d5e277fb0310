"""KV quantization and decode attention (plain PyTorch), against the fake quantizer and a float64 loop."""

import math

import pytest
import torch

from flatquant.kernels.kv_quant import decode_attention, decode_attention_reference, dequantize_kv, quantize_kv
from flatquant.quantizer import quantize_activation


def _logit(p: float) -> torch.Tensor:
    return torch.tensor(math.log(p / (1 - p)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("clip", [None, (0.9, 0.8)])
def test_round_trip_equals_the_fake_quantizer_bit_for_bit(dtype, bits, clip):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 5, 7, 16, generator=g) * torch.rand(3, 5, 7, 1, generator=g) * 4 + 0.5).to(dtype)
    x[0, 0, 0] = 0  # an all-zero row: the smallest scale
    x[0, 0, 1] = x[0, 0, 1].abs()  # one-signed rows: zero stays inside the range
    x[0, 0, 2] = -x[0, 0, 2].abs()
    if clip is None:
        logits, ratios = (None, None), (1.0, 1.0)
    else:  # the learned clipping logits, and the ratios the packed model stores (sigmoid as fp32 floats)
        logits = (_logit(clip[0]), _logit(clip[1]))
        ratios = tuple(float(torch.sigmoid(t)) for t in logits)
    with torch.no_grad():
        fake = quantize_activation(x, logits[0], logits[1], bits, False)  # (..., 16) in x.dtype
    codes, scale, zero = quantize_kv(x, bits, *ratios)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (8 if bits == 4 else 16)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert torch.equal(dequantize_kv(codes, scale, zero, bits, dtype), fake)


def test_four_bit_layout_is_two_unsigned_codes_per_byte_low_nibble_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 10, generator=g)
    packed, scale, zero = quantize_kv(x, 4)
    fake = quantize_activation(x, None, None, 4, False)
    codes = (torch.round(fake / scale[..., None]) + zero[..., None]).to(torch.int64)  # (4, 2, 10) in [0, 15]
    assert codes.min() >= 0 and codes.max() <= 15 and codes.max() == 15  # the full range is used
    expected = codes[..., 0::2] + 16 * codes[..., 1::2]
    assert torch.equal(packed.to(torch.int64), expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits=1"):
        quantize_kv(torch.zeros(2, 4), bits=1)
    with pytest.raises(ValueError, match="d=5"):
        quantize_kv(torch.zeros(2, 5), bits=4)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_kv(torch.zeros(2, 2), torch.ones(2), torch.zeros(2))


def _loop_reference(q, k, v, seq_lens, sm_scale):
    """float64, one (sequence, query head) at a time, with KV heads repeated explicitly."""
    b, hq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(seq_lens[i])
        for h in range(hq):
            kk, vv = k[i, h // g, :n].double(), v[i, h // g, :n].double()  # (n, D)
            w = torch.softmax(q[i, h].double() @ kk.T * sm_scale, dim=-1)  # (n,)
            out[i, h] = w @ vv
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_a_float64_loop_and_ignores_positions_past_the_length(dtype):
    g = torch.Generator().manual_seed(3)
    b, hkv, grp, s_cap, d = 3, 2, 3, 11, 16
    k = torch.randn(b, hkv, s_cap, d, generator=g)
    v = torch.randn(b, hkv, s_cap, d, generator=g)
    (kc, ks, kz), (vc, vs, vz) = quantize_kv(k), quantize_kv(v)
    seq_lens = torch.tensor([11, 1, 6], dtype=torch.int32)
    for t in (kc, vc):  # garbage beyond each sequence's length must not matter
        t[2, :, 6:] = torch.randint(0, 256, t[2, :, 6:].shape, generator=g, dtype=torch.uint8)
    ks[2, :, 6:] = 1e4
    q = torch.randn(b, hkv * grp, d, generator=g).to(dtype)
    sm = d**-0.5
    out = decode_attention(q, kc, ks, kz, vc, vs, vz, seq_lens, sm)
    assert out.dtype == dtype and out.shape == (b, hkv * grp, d)
    kd, vd = dequantize_kv(kc, ks, kz), dequantize_kv(vc, vs, vz)
    ref = _loop_reference(q.float(), kd, vd, seq_lens, sm)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_decode_attention_checks_shapes():
    kc = torch.zeros(1, 2, 4, 8, dtype=torch.uint8)
    s = torch.ones(1, 2, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention_reference(torch.zeros(1, 3, 16), kc, s, s, kc, s, s, torch.tensor([4]), 0.25)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention_reference(torch.zeros(1, 4, 12), kc, s, s, kc, s, s, torch.tensor([4]), 0.25)
