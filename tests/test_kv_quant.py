"""INT4 KV cache: quantization against the fake quantizer, decode attention against a float64 computation.

Without a GPU the Triton kernels run in the CPU interpreter on small shapes; on a GPU the same tests run
compiled, at LLaMA head sizes and long contexts as well.
"""

import importlib
import math
import os
import random
import struct
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flatquant.kernels.kron_quantize as kq  # noqa: E402
import flatquant.kernels.kv_quant as kv  # noqa: E402
from flatquant.quantizer import ActivationQuantizer  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA and kv.triton is not None and not kv._interpreting():
    kq = importlib.reload(kq)  # imported before TRITON_INTERPRET was set: rebuild both for the interpreter
    kv = importlib.reload(kv)
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    kv.triton is None or not (CUDA or kv._interpreting()), reason="triton is not importable"
)
HEAD_DIMS = [64, 128] if CUDA else [32]
ASM = [False, True] if CUDA else [False]  # inline-PTX unpacking exists only compiled
ONE_ROW_LOOPS = {  # the one-row loop's variants (configs for decode_attention_triton)
    "one-pass": {"two_pass": False},
    "two-pass": {"two_pass": True},
    "words": {"two_pass": True, "words": True},
    "words-prefetch": {"two_pass": True, "words": True, "prefetch": True},
}
BLOCK_N = None if CUDA else 16  # small token blocks in the interpreter, so that short caches take many steps


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _kv_like(shape, seed=0, dtype=torch.float32, device=DEVICE):
    """Random K/V rows with per-row magnitudes and a few outlier channels, as after RoPE and P_h."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g) * (0.2 + 3 * torch.rand(*shape[:-1], 1, generator=g))
    x[..., :: max(1, shape[-1] // 5)] *= 6
    x = x + 0.5 * torch.randn(*shape[:-1], 1, generator=g)  # rows not centred on zero
    return x.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ quantize
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_matches_fake_quantizer_bit_for_bit(bits, clip, dtype):
    quant = ActivationQuantizer(bits, symmetric=False, learnable_clip=clip)
    if clip:
        with torch.no_grad():
            quant.clip_max.fill_(1.3)  # ratios 0.79 and 0.55
            quant.clip_min.fill_(0.2)
    x = _kv_like((2, 3, 7, 16), seed=bits, dtype=dtype, device="cpu")
    x[0, 0, 0] = 0  # an all-zero row: scale hits the 1e-8 floor
    x[0, 0, 1] = 2.5  # a constant positive row: xmin = 0
    with torch.no_grad():
        expected = quant(x)
        ratios = quant.clip_ratios()
    codes, scale, zero = kv.quantize_kv(x, bits, *ratios, impl="torch")
    assert codes.dtype == torch.uint8 and codes.shape == (*x.shape[:-1], 8 if bits == 4 else 16)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == zero.shape == x.shape[:-1]
    assert torch.equal(kv.dequantize_kv(codes, scale, zero, bits, dtype=dtype), expected)
    if dtype == torch.float32:  # and in fp32 exactly the training-time (straight-through) path
        assert torch.equal(kv.dequantize_kv(codes, scale, zero, bits), quant(x.requires_grad_()).detach())


def test_quantize_codes_and_layout_from_the_formula():
    """Codes from the written formula in float64 (no tie cases here), and the nibble order."""
    x = torch.tensor([[-1.0, 0.5, 3.0, 0.0], [0.2, 0.45, 0.6, 0.8]])
    codes, scale, zero = kv.quantize_kv_reference(x, 4)
    xd = x.double()
    s = (xd.amax(1).clamp_min(0) - xd.amin(1).clamp_max(0)) / 15
    z = torch.round(-xd.amin(1).clamp_max(0) / s)
    expected = torch.clamp(torch.round(xd / s[:, None]) + z[:, None], 0, 15).to(torch.uint8)
    assert expected.tolist() == [[0, 6, 15, 4], [4, 8, 11, 15]]
    assert codes.tolist() == [[0 | 6 << 4, 15 | 4 << 4], [4 | 8 << 4, 11 | 15 << 4]]
    torch.testing.assert_close(scale.double(), s, rtol=1e-7, atol=0)
    assert torch.equal(zero.double(), z)
    assert torch.equal(kv.dequantize_kv(codes, scale, zero), (expected.float() - zero[:, None]) * scale[:, None])


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_kernel_is_bit_exact(bits, dtype):
    d = 128 if CUDA else 24  # 24: not a power of two
    x = _kv_like((3, 5, 11, d), seed=7 + bits, dtype=dtype)
    x[1, 2, 3] = 0
    for cmax, cmin in ((1.0, 1.0), (0.83, 0.61)):
        out = kv.quantize_kv(x, bits, cmax, cmin, impl="triton")
        ref = kv.quantize_kv_reference(x, bits, cmax, cmin)
        for a, b in zip(out, ref, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_quantize_errors():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="bits"):
        kv.quantize_kv(x, bits=9)
    with pytest.raises(ValueError, match="even"):
        kv.quantize_kv(torch.randn(2, 5), bits=4)
    with pytest.raises(ValueError, match="impl"):
        kv.quantize_kv(x, impl="cuda")
    with pytest.raises(TypeError, match="uint8"):
        kv.dequantize_kv(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), torch.zeros(2))


# -------------------------------------------------------------------------------------------- decode
def _cache(b, hkv, s_cap, d, lens, seed=0, device=DEVICE):
    """A 4-bit cache whose positions >= lens[b] hold garbage codes and NaN / inf scales."""
    k_packed, k_scale, k_zero = kv.quantize_kv_reference(_kv_like((b, hkv, s_cap, d), seed, device=device))
    v_packed, v_scale, v_zero = kv.quantize_kv_reference(_kv_like((b, hkv, s_cap, d), seed + 1, device=device))
    junk = torch.randint(0, 256, k_packed.shape, generator=_gen(seed + 2), dtype=torch.uint8).to(device)
    for i, n in enumerate(lens):
        for t, fill in ((k_packed, junk), (v_packed, junk)):
            t[i, :, n:] = fill[i, :, n:]
        k_scale[i, :, n:], v_scale[i, :, n:] = float("nan"), float("inf")
        k_zero[i, :, n:], v_zero[i, :, n:] = float("inf"), float("nan")
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lens_t


def _dense_float64(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lens, sm_scale):
    """Per sequence and query head: explicit nibble unpacking, dequantization and softmax in float64."""
    b, hq, d = q.shape
    g = hq // k_packed.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)

    def deq(p, s, z, i, kvh, n):
        p = p[i, kvh, :n].cpu().long()
        codes = torch.empty(n, d, dtype=torch.float64)
        codes[:, 0::2], codes[:, 1::2] = p % 16, p // 16
        return (codes - z[i, kvh, :n].cpu().double()[:, None]) * s[i, kvh, :n].cpu().double()[:, None]

    for i in range(b):
        n = int(lens[i])
        for h in range(hq):
            if n == 0:
                continue
            k = deq(k_packed, k_scale, k_zero, i, h // g, n)  # (n, D)
            v = deq(v_packed, v_scale, v_zero, i, h // g, n)
            p = torch.softmax(k @ q[i, h].cpu().double() * sm_scale, dim=0)
            out[i, h] = p @ v
    return out


def _assert_close_to_dense(out, dense, dtype):
    """Within the output rounding (half an ulp of dtype) plus a little fp32 error."""
    assert out.dtype == dtype and out.shape == dense.shape
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (out.cpu().double() - dense).abs()
    bound = ulp * dense.abs() + 1e-5 * dense.abs().max() + 1e-6
    assert (err <= bound).all(), f"max error {err.max().item():.3g} (bound {bound.max().item():.3g})"


@pytest.mark.parametrize("groups", [1, 3, 4])
def test_reference_matches_dense_float64(groups):
    hkv, d = 2, 16
    lens = [13, 1, 0, 20]
    cache = _cache(len(lens), hkv, 20, d, lens, seed=groups, device="cpu")
    q = _kv_like((len(lens), hkv * groups, d), seed=40, dtype=torch.bfloat16, device="cpu")
    out = kv.decode_attention_reference(q, *cache, d**-0.5)
    _assert_close_to_dense(out, _dense_float64(q, *cache, d**-0.5), torch.bfloat16)
    assert (out[2] == 0).all()  # an empty sequence gives zeros


def _check_kernel(b, groups, hkv, d, s_cap, lens, dtype, seed=0, config=None):
    cache = _cache(b, hkv, s_cap, d, lens, seed=seed)
    q = _kv_like((b, hkv * groups, d), seed=seed + 50, dtype=dtype)
    cfg = {"block_n": BLOCK_N} if BLOCK_N else {}
    out = kv.decode_attention_triton(q, *cache, d**-0.5, config={**cfg, **(config or {})})
    ref = kv.decode_attention_reference(q, *cache, d**-0.5)
    _assert_close_to_dense(out, _dense_float64(q, *cache, d**-0.5), dtype)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # both round to dtype: at most an ulp apart
    torch.testing.assert_close(out.float(), ref.float(), rtol=ulp, atol=1e-4 * ref.float().abs().max().item())


@needs_triton
@pytest.mark.parametrize("asm", ASM)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_kernel_matches_reference_and_dense(groups, dtype, d, asm):
    lens = [1000, 77, 4097] if CUDA else [37, 1, 50]
    _check_kernel(len(lens), groups, 2, d, max(lens) + 3, lens, dtype, seed=groups, config={"asm": asm})


TILE_TWO_PASS = {"mma": True, "two_pass": True}  # the tensor-core tile loop in two passes


@needs_triton
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
def test_two_pass_tile_loop_matches_reference_and_dense(groups, dtype, splits):
    """The tensor-core tile loop in two passes (scores to a scratch row per query head, chunk maxima of the scores
    and of the value scales, then values with no rescale), split across programs or not, against the float64
    result and the reference."""
    lens = [1000, 77, 4097] if CUDA else [37, 1, 50]
    d = HEAD_DIMS[-1]
    cfg = {**TILE_TWO_PASS, "splits": splits}
    _check_kernel(len(lens), groups, 2, d, max(lens) + 3, lens, dtype, seed=groups, config=cfg)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_kernel_chunk_splits(splits):
    """Sequence split across programs (and the merge), including empty chunks and an empty sequence."""
    lens = [0, 5, 64, 200, 131] if CUDA else [0, 5, 16, 61, 33]
    s_cap = 256 if CUDA else 64
    _check_kernel(len(lens), 4, 1, HEAD_DIMS[0], s_cap, lens, torch.bfloat16, seed=splits, config={"splits": splits})


@needs_triton
def test_kernel_strided_views():
    """q from a (B, 1, Hq, D) layout, the cache as a batch slice of a larger allocation."""
    d, hkv, g, s_cap = HEAD_DIMS[-1], 2, 2, 48
    lens = [30, 47]
    big = _cache(4, hkv, s_cap, d, [s_cap] * 4, seed=3)
    cache = [t[1:3] for t in big[:6]]
    q4 = _kv_like((2, hkv * g, 1, d), seed=8, dtype=torch.bfloat16).transpose(1, 2)  # (B, 1, Hq, D), strided
    q = q4[:, 0]
    lens_t = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    cfg = {"block_n": BLOCK_N} if BLOCK_N else None
    out = kv.decode_attention_triton(q, *cache, lens_t, 0.3, config=cfg)
    _assert_close_to_dense(out, _dense_float64(q, *cache, lens_t, 0.3), torch.bfloat16)


@needs_triton
def test_kernel_rejects_bad_block():
    cache = _cache(1, 1, 8, 16, [8])
    q = _kv_like((1, 1, 16), seed=1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_n"):
        kv.decode_attention_triton(q, *cache, 0.5, config={"block_n": 24})
    with pytest.raises(ValueError, match=r"config takes the keys .*got \['blockn'\]"):  # a typo is not ignored
        kv.decode_attention_triton(q, *cache, 0.5, config={"blockn": 32})
    with pytest.raises(ValueError, match="two_pass=True takes flat=True .* or mma=True"):
        kv.decode_attention_triton(q, *cache, 0.5, config={"two_pass": True, "mma": False})
    one_row = {"mma": False, "flat": True}
    with pytest.raises(ValueError, match="words=True takes two_pass=True and flat=True"):
        kv.decode_attention_triton(q, *cache, 0.5, config={**one_row, "words": True})
    with pytest.raises(ValueError, match="words=True takes two_pass=True and flat=True"):
        kv.decode_attention_triton(q, *cache, 0.5, config={"two_pass": True, "words": True})
    with pytest.raises(ValueError, match="prefetch=True takes words=True"):
        kv.decode_attention_triton(q, *cache, 0.5, config={**one_row, "two_pass": True, "prefetch": True})
    cache12 = _cache(1, 1, 8, 12, [8])  # head_dim 12: six bytes a token, not whole int32 words
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        kv.decode_attention_triton(_kv_like((1, 1, 12), seed=1, dtype=torch.bfloat16), *cache12, 0.5,
                                   config={**one_row, "two_pass": True, "words": True})  # fmt: skip
    words = [c for c in kv.CANDIDATE_CONFIGS if c["words"]]  # tuning leaves them out for such a head_dim
    assert words and all(kv.applies(c, 1, 128) and not kv.applies(c, 1, 12) for c in words)
    q2 = _kv_like((1, 2, 16), seed=1, dtype=torch.bfloat16)  # two query heads per KV head: the one-row loop's error
    with pytest.raises(ValueError, match="one query head per KV head, got 2"):
        kv.decode_attention_triton(q2, *cache, 0.5, config={**one_row, "two_pass": True, "words": True})


def test_word_loop_needs_rows_on_4_byte_boundaries():
    """The words loop reads int32: a cache view whose rows do not start on a multiple of 4 bytes (an odd storage
    offset, which .contiguous() keeps) runs the byte loop instead; aligned caches and views use words."""
    buf = torch.zeros(1 + 2 * 2 * 8 * 16, dtype=torch.uint8)
    aligned = buf[:-1].view(2, 2, 8, 16)
    shifted = buf[1:].view(2, 2, 8, 16)
    assert shifted.is_contiguous() and shifted.contiguous().data_ptr() == shifted.data_ptr()
    assert kv._word_aligned(aligned, aligned) and kv._word_aligned(aligned[:, :, 2:], aligned[:, :1])
    assert not kv._word_aligned(aligned, shifted) and not kv._word_aligned(aligned[..., 1:])


@pytest.mark.skipif(not CUDA, reason="long contexts only on the GPU")
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_kernel_long_context(hq, hkv):
    lens = [32768, 9000]
    cache = _cache(2, hkv, 32768, 128, lens, seed=11)
    q = _kv_like((2, hq, 128), seed=12, dtype=torch.bfloat16)
    out = kv.decode_attention(q, *cache, 128**-0.5)
    ref = kv.decode_attention_reference(q, *cache, 128**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-4 * ref.float().abs().max().item())


def test_dispatcher_choices_and_errors(monkeypatch):
    d, lens = 8, [5, 3]
    cache = _cache(2, 2, 6, d, lens, device="cpu")
    q = _kv_like((2, 4, d), seed=1, dtype=torch.float16, device="cpu")
    ref = kv.decode_attention_reference(q, *cache, 0.5)
    assert torch.equal(kv.decode_attention(q, *cache, 0.5), ref)  # CPU tensors: auto uses the reference
    with pytest.raises(ValueError, match="impl"):
        kv.decode_attention(q, *cache, 0.5, impl="cuda")
    with pytest.raises(TypeError, match="q must be"):
        kv.decode_attention(q.double(), *cache, 0.5)
    q32 = q.float()  # float32 queries (CPU runtime) take the reference
    assert torch.equal(kv.decode_attention(q32, *cache, 0.5), kv.decode_attention_reference(q32, *cache, 0.5))
    with pytest.raises(TypeError, match="bfloat16/float16"):
        kv.decode_attention(q32, *cache, 0.5, impl="triton")  # the kernel takes bfloat16/float16 only
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kv.decode_attention(torch.cat([q, q[:, :1]], 1), *cache, 0.5)
    with pytest.raises(ValueError, match="k_scale"):
        kv.decode_attention(q, cache[0], cache[1].double(), *cache[2:], 0.5)
    with pytest.raises(ValueError, match="S_cap"):
        kv.decode_attention(q, *cache[:6], torch.tensor([7, 1]), 0.5)
    monkeypatch.setattr(kv, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kv.decode_attention(q, *cache, 0.5, impl="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kv.quantize_kv(torch.randn(2, 8), impl="triton")


def test_decode_equals_sdpa_on_the_fake_quantized_cache():
    """The evaluation path (fake-quantize K and V, expand KV heads as repeat_kv does, SDPA) and decode over
    the packed cache agree: query head h reads KV head h // G, sm_scale is applied once."""
    b, hkv, g, s, d = 2, 2, 3, 11, 16
    quants = [ActivationQuantizer(4, symmetric=False) for _ in range(2)]
    k, v = (_kv_like((b, hkv, s, d), seed=i, device="cpu") for i in (5, 6))
    q = _kv_like((b, hkv * g, d), seed=7, dtype=torch.bfloat16, device="cpu")
    with torch.no_grad():
        k_fq, v_fq = (quant(x).repeat_interleave(g, dim=1) for quant, x in zip(quants, (k, v), strict=True))
        ratios = [quant.clip_ratios() for quant in quants]  # sigmoid(4.0) = 0.982: clipping on
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float()[:, :, None], k_fq, v_fq, scale=math.pi / 10)
    cache = (*kv.quantize_kv(k, 4, *ratios[0]), *kv.quantize_kv(v, 4, *ratios[1]), torch.tensor([s, s]))
    out = kv.decode_attention_reference(q, *cache, math.pi / 10)
    torch.testing.assert_close(out.float(), sdpa[:, :, 0], rtol=2**-8, atol=1e-6)
    if kv.triton is not None and kv._interpreting():
        kern = kv.decode_attention_triton(q, *cache, math.pi / 10)
        torch.testing.assert_close(kern.float(), sdpa[:, :, 0], rtol=2**-8, atol=1e-5)


_B32_OPS = {
    "shl.b32": lambda x, y: (x << y) & 0xFFFFFFFF,
    "shr.b32": lambda x, y: x >> y,
    "and.b32": lambda x, y: x & y,
    "or.b32": lambda x, y: x | y,
}


def _run_ptx(ptx: str, word: int, outputs: int = 4) -> list[int]:
    """A tiny interpreter for the instructions the unpacking PTX uses (prmt, shl, shr, and, or on b32): the
    input word is operand ``$outputs``, the outputs ``$0 .. $(outputs - 1)``."""
    regs = {f"${outputs}": word}

    def val(tok):
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    for ins in ptx.strip("{} ").split(";"):
        op, _, rest = ins.strip().partition(" ")
        a = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":  # result byte i = byte (selector nibble i) of {a[2]:a[1]}
            src, sel = val(a[2]) << 32 | val(a[1]), val(a[3])
            regs[a[0]] = sum(((src >> 8 * ((sel >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op in _B32_OPS:
            regs[a[0]] = _B32_OPS[op](val(a[1]), val(a[2]))
        else:
            assert op in ("", ".reg"), op
    return [regs[f"${i}"] for i in range(outputs)]


@pytest.mark.skipif(kv.triton is None, reason="triton is not importable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpack_ptx_bit_logic(dtype):
    """The inline PTX of the compiled kernel, emulated: 4 bytes -> 16 + low nibbles, 16 + high nibbles, two
    16-bit values per register, element i in register i // 2, low half first (LLVM's vector packing)."""
    ptx = (kv._PTX_BF16 if dtype == torch.bfloat16 else kv._PTX_FP16).value
    g = random.Random(0)
    words = [[g.randrange(256) for _ in range(4)] for _ in range(512)]
    for i in range(256):  # every byte value in the first and the last position
        words[i][0], words[256 + i][3] = i, i
    for b in words:
        regs = _run_ptx(ptx, b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24)
        halves = [h for r in regs for h in (r & 0xFFFF, r >> 16)]
        if dtype == torch.bfloat16:  # a bf16 is the top half of an fp32
            vals = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
        else:
            vals = [struct.unpack("<e", struct.pack("<H", h))[0] for h in halves]
        assert vals == [16.0 + (x & 15) for x in b] + [16.0 + (x >> 4) for x in b]


@pytest.mark.skipif(kv.triton is None, reason="triton is not importable")
def test_unpack_ptx_f32_bit_logic():
    """The fp32 unpacking PTX of the CUDA-core loop, emulated: 4 bytes -> F32_BIAS + low nibbles in registers 0-3,
    F32_BIAS + high nibbles in registers 4-7, one fp32 per register (byte i in register i). (The integer path
    the interpreter runs is checked by the decode tests of every candidate against float64.)"""
    bias = kv.F32_BIAS.value
    g = random.Random(1)
    words = [[g.randrange(256) for _ in range(4)] for _ in range(512)]
    for i in range(256):  # every byte value in every position
        words[i] = [i, (i + 85) % 256, (i + 170) % 256, 255 - i]
    for b in words:
        regs = _run_ptx(kv._PTX_F32.value, b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24, outputs=8)
        vals = [struct.unpack("<f", struct.pack("<I", r))[0] for r in regs]
        assert vals == [bias + (x & 15) for x in b] + [bias + (x >> 4) for x in b]


@needs_triton
@pytest.mark.parametrize("into_cache", [False, True])
def test_quantize_kernel_reads_head_transposed_column_slices_in_place(into_cache, monkeypatch):
    """V of a packed block is a head-transposed view of a column slice of the fused q/k/v GEMM output: no
    single row stride reaches its rows. The kernel reads them at their (b, h, t) strides, with no copy."""
    b, t, h, d = 2, 7, 3, 32
    g = torch.Generator().manual_seed(4)
    qkv = (torch.randn(b, t, 5 * h * d, generator=g) * 3).to(DEVICE, torch.bfloat16)  # q (3h), k, v columns
    v = qkv[..., 4 * h * d :].view(b, t, h, d).transpose(1, 2)  # (b, h, t, d), as the attention forward makes it
    assert v.reshape(-1, d).data_ptr() != v.data_ptr()  # a flat view is impossible: reshape copies
    launched, real = [], kv._quantize_kv_kernel

    class Spy:  # records the x the kernel is launched on
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(args[0]) or real[grid](*args, **kw)

    monkeypatch.setattr(kv, "_quantize_kv_kernel", Spy())
    out = None
    if into_cache:
        cache = [torch.zeros((b, h, 12, d // 2), dtype=torch.uint8, device=DEVICE)]
        cache += [torch.zeros((b, h, 12), device=DEVICE), torch.zeros((b, h, 12), device=DEVICE)]
        out = tuple(c[:, :, 3 : 3 + t] for c in cache)
    *codes, values = kv.quantize_kv_triton(v, 4, 0.9, 0.8, out=out, dequantized=torch.bfloat16)
    assert len(launched) == 1 and launched[0].data_ptr() == v.data_ptr()  # v itself, not a copy
    want = kv.quantize_kv_reference(v.clone(memory_format=torch.contiguous_format), 4, 0.9, 0.8)
    for a, w in zip(codes, want, strict=True):
        assert torch.equal(a, w)
    assert torch.equal(values, kv.dequantize_kv(*want, 4, torch.bfloat16))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bits", [4, 3])
def test_quantize_into_a_cache_slice_writes_what_quantize_returns(impl, bits):
    """out=: the append path writes codes, scales and zero points straight into the cache at the append
    position (strided views); the rest of the cache is untouched."""
    b, h, cap, t, d, pos = 2, 3, 16, 5, 32, 7
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(b, h, t, d, generator=g) * 3).to(DEVICE, torch.bfloat16)
    width = d // 2 if bits == 4 else d
    codes = torch.full((b, h, cap, width), 0xAB, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), -1.0, device=DEVICE)
    zero = torch.full((b, h, cap), -2.0, device=DEVICE)
    views = (codes[:, :, pos : pos + t], scale[:, :, pos : pos + t], zero[:, :, pos : pos + t])
    got = kv.quantize_kv(x, bits, 0.9, 0.8, impl=impl, out=views)
    assert all(a is v for a, v in zip(got, views, strict=True))
    want = kv.quantize_kv_reference(x, bits, 0.9, 0.8)
    for dst, ref in zip(views, want, strict=True):
        assert torch.equal(dst, ref)
    outside = torch.ones(cap, dtype=torch.bool)
    outside[pos : pos + t] = False
    assert (codes[:, :, outside] == 0xAB).all() and (scale[:, :, outside] == -1).all()
    assert (zero[:, :, outside] == -2).all()
    with pytest.raises(ValueError, match="out scale must be"):
        kv.quantize_kv(x, bits, impl=impl, out=(views[0], scale[:, :, :t].double(), views[2]))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_dequantize_equals_dequantizing_the_codes(impl, bits, dtype):
    """The prefill's fused path: the values equal dequantize_kv of the codes it wrote, bit for bit, in the
    requested dtype (one launch on CUDA, with a rounding of its own), and the codes equal quantize_kv's."""
    d = 128 if CUDA else 24
    x = _kv_like((2, 3, 7, d), seed=5 + bits, dtype=dtype)
    for out_dtype in (dtype, torch.float32):
        codes, values = kv.quantize_dequantize_kv(x, bits, 0.9, 0.7, out_dtype, impl=impl)
        want = kv.quantize_kv_reference(x, bits, 0.9, 0.7)
        for a, b in zip(codes, want, strict=True):
            assert torch.equal(a, b)
        expected = kv.dequantize_kv(*want, bits, out_dtype)
        assert values.dtype == out_dtype and values.shape == x.shape
        assert torch.equal(values, expected)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_quantize_dequantize_into_a_cache_slice(impl):
    b, h, cap, t, d, pos = 2, 3, 16, 5, 32, 4
    x = _kv_like((b, h, t, d), seed=3, dtype=torch.bfloat16)
    codes = torch.zeros((b, h, cap, d // 2), dtype=torch.uint8, device=DEVICE)
    scale = torch.zeros((b, h, cap), device=DEVICE)
    zero = torch.zeros((b, h, cap), device=DEVICE)
    views = (codes[:, :, pos : pos + t], scale[:, :, pos : pos + t], zero[:, :, pos : pos + t])
    got, values = kv.quantize_dequantize_kv(x, 4, impl=impl, out=views)
    assert all(a is v for a, v in zip(got, views, strict=True))
    assert torch.equal(values, kv.dequantize_kv(*views, 4, torch.bfloat16))
    assert torch.equal(values, kv.dequantize_kv(*kv.quantize_kv_reference(x, 4), 4, torch.bfloat16))


@needs_triton
def test_every_decode_candidate_config_matches_the_reference():
    """Tuning may choose any candidate on the GPU, so each one must be as close to the float64 result as
    the default (half an ulp of the output dtype plus a little fp32 error)."""
    # on the CPU the PTX unpacking is emulated, so its candidates repeat the others (the two-pass loop has only them)
    configs = kv.CANDIDATE_CONFIGS if CUDA else [c for c in kv.CANDIDATE_CONFIGS if not c["asm"] or c["two_pass"]]
    assert kv.DEFAULT_CONFIG in configs and len(configs) >= 18 and any(not c["mma"] for c in configs)
    assert any(c["flat"] and not c["two_pass"] for c in configs) and any(c["two_pass"] for c in configs)
    shapes = [(4, 8, 4, 128, 1000), (3, 4, 1, 128, 700)] if CUDA else [(2, 2, 2, 32, 40), (3, 2, 1, 16, 33)]
    shapes += [(2, 4, 2, 128, 300)] if CUDA else [(2, 1, 2, 16, 70)]  # two query heads per KV head
    for b, hkv, g, d, s_cap in shapes:  # grouped heads, and one query head per KV head (MHA)
        lens = [s_cap - 3, 12, s_cap, 1][:b]
        cache = _cache(b, hkv, s_cap, d, lens)
        q = _kv_like((b, hkv * g, d), seed=9 + g, dtype=torch.bfloat16)
        dense = _dense_float64(q, *cache, d**-0.5)
        for cfg in configs:
            if not kv.applies(cfg, g, d):
                with pytest.raises(ValueError, match="takes"):
                    kv.decode_attention_triton(q, *cache, d**-0.5, config=cfg)
                continue
            out = kv.decode_attention_triton(q, *cache, d**-0.5, config=cfg)
            _assert_close_to_dense(out, dense, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("trend", ["rising", "falling"])
@pytest.mark.parametrize("loop", ["one-pass", "two-pass", "words", "words-prefetch"])
@pytest.mark.parametrize("asm", ASM)
def test_flat_loop_raises_its_reference_maximum_only_when_needed(splits, trend, loop, asm):
    """The one-row loop keeps a stale maximum until a step's scores exceed it by more than 8 (base 2): with key
    scales that grow (or shrink) along the sequence the rescale runs in later steps (or never after the
    first), and both must give the float64 result."""
    d, lens = 32, [70, 45]
    k_packed, k_scale, k_zero, *rest = _cache(2, 2, 80, d, lens, seed=21)
    ramp = torch.linspace(0.2, 6.0, 80, device=k_scale.device)
    k_scale = k_scale * (ramp if trend == "rising" else ramp.flip(0))  # scores spread over ~30 (base 2)
    cache = (k_packed, k_scale, k_zero, *rest)
    q = _kv_like((2, 2, d), seed=22, dtype=torch.bfloat16)
    cfg = {"block_n": 16, "mma": False, "flat": True, **ONE_ROW_LOOPS[loop], "splits": splits, "asm": asm}
    out = kv.decode_attention_triton(q, *cache, 1.0, config=cfg)
    _assert_close_to_dense(out, _dense_float64(q, *cache, 1.0), torch.bfloat16)


class OutOfResources(RuntimeError):  # the name Triton gives a launch that does not fit the SM
    pass


def test_decode_tuning_picks_the_fastest_candidate_once_per_shape(monkeypatch):
    monkeypatch.setattr(kv, "_TUNED", {})
    cands = [dict(kv.DEFAULT_CONFIG, block_n=bn) for bn in (64, 32, 128, 16)]
    monkeypatch.setattr(kv, "CANDIDATE_CONFIGS", cands)
    times = {64: 3.0, 32: 1.5, 128: 2.0}
    ran = []

    def run(cfg):
        ran.append(cfg["block_n"])
        if cfg["block_n"] == 16:
            raise OutOfResources("shared memory")  # a candidate that cannot launch is skipped

    monkeypatch.setattr(kv, "_graph_time", lambda fn: (fn(), times[ran[-1]])[1])
    q = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 2, 300, 32, dtype=torch.uint8)
    assert kv.last_config(q, k) is None
    assert kv._tuned_config(q, k, run)["block_n"] == 32
    assert ran == [64, 32, 128, 16]
    assert kv._tuned_config(q, k, run)["block_n"] == 32 and len(ran) == 4  # remembered: not timed again
    assert kv.last_config(q, torch.zeros(2, 2, 500, 32, dtype=torch.uint8))["block_n"] == 32  # same bucket
    assert kv.last_config(q, torch.zeros(2, 2, 600, 32, dtype=torch.uint8)) is None  # next power of two
    # CUDA-core candidates are tried only for one or two query heads per KV head (here 4: skipped)
    monkeypatch.setattr(kv, "CANDIDATE_CONFIGS", [dict(kv.DEFAULT_CONFIG, mma=False, block_n=32)] + cands[:1])
    ran.clear()
    assert kv._tuned_config(q, torch.zeros(2, 2, 2000, 32, dtype=torch.uint8), run)["mma"] and ran == [64]


@pytest.mark.parametrize("error", [OutOfResources("shared memory"), RuntimeError("invalid operands of pointer")])
def test_decode_tuning_warns_when_a_candidate_fails_to_compile(monkeypatch, error):
    """A candidate that does not fit is skipped quietly; one that fails otherwise (e.g. a Triton version that
    rejects its code) is skipped with a warning that names it, and both are listed by skipped_configs."""
    monkeypatch.setattr(kv, "_TUNED", {})
    monkeypatch.setattr(kv, "_SKIPPED", {})
    monkeypatch.setattr(kv._kq, "AUTOTUNE_CACHE", False)
    cands = [dict(kv.DEFAULT_CONFIG, block_n=bn) for bn in (64, 32)]
    monkeypatch.setattr(kv, "CANDIDATE_CONFIGS", cands)
    ran = []

    def run(cfg):
        ran.append(cfg["block_n"])
        if cfg["block_n"] == 32:
            raise error

    monkeypatch.setattr(kv, "_graph_time", lambda fn: (fn(), 1.0)[1])
    q = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 2, 300, 32, dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kv._tuned_config(q, k, run)["block_n"] == 64
    ours = [w for w in caught if "decode attention tuning" in str(w.message)]
    if isinstance(error, OutOfResources):
        assert not ours
    else:
        assert len(ours) == 1 and "1 of 2 candidates" in str(ours[0].message)
        assert "'block_n': 32" in str(ours[0].message) and "invalid operands of pointer" in str(ours[0].message)
    (skipped,) = kv.skipped_configs().values()
    assert [c["block_n"] for c, _ in skipped] == [32] and skipped[0][1].startswith(type(error).__name__)
    kv._TUNED.clear()  # tuned afresh with every candidate running: no stale failure is kept
    assert kv._tuned_config(q, k, lambda cfg: None)["block_n"] == 64 and kv.skipped_configs() == {}


@pytest.mark.skipif(not CUDA, reason="tuning times CUDA-graph replays")
def test_decode_attention_is_tuned_on_cuda():
    b, hkv, g, d, s_cap = 2, 8, 4, 128, 512
    cache = _cache(b, hkv, s_cap, d, [500, 37])
    q = _kv_like((b, hkv * g, d), seed=4, dtype=torch.bfloat16)
    out = kv.decode_attention(q, *cache, d**-0.5)
    assert kv.last_config(q, cache[0]) in kv.CANDIDATE_CONFIGS
    _assert_close_to_dense(out, _dense_float64(q, *cache, d**-0.5), torch.bfloat16)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bits,t", [(4, 1), (3, 1), (4, 2)])
def test_quantize_at_device_positions_writes_only_those_rows(impl, bits, t):
    """A static cache's decode append: row (b, h, i) of x lands at position positions[b] + i of every head of
    sequence b, equal to quantize_kv of x; every other position keeps its content."""
    b, h, cap, d = 3, 2, 12, 32
    x = _kv_like((b, h, t, d), seed=17 + bits, dtype=torch.bfloat16)
    width = d // 2 if bits == 4 else d
    codes = torch.full((b, h, cap, width), 0x5A, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), -1.0, device=DEVICE)
    zero = torch.full((b, h, cap), -2.0, device=DEVICE)
    positions = torch.tensor([0, 7, cap - t], dtype=torch.int32, device=DEVICE)
    kv.quantize_kv_at(x, bits, 0.9, 0.8, (codes, scale, zero), positions, impl=impl)
    want = kv.quantize_kv_reference(x, bits, 0.9, 0.8)
    written = torch.zeros(b, cap, dtype=torch.bool)
    for i, p in enumerate(positions.tolist()):
        written[i, p : p + t] = True
        for buf, ref in zip((codes, scale, zero), want, strict=True):
            assert torch.equal(buf[i, :, p : p + t], ref[i])
    assert (codes.cpu()[~written[:, None, :].expand(b, h, cap)] == 0x5A).all()
    assert (scale.cpu()[~written[:, None, :].expand(b, h, cap)] == -1).all()
    with pytest.raises(ValueError, match="positions must be int32"):
        kv.quantize_kv_at(x, bits, 1.0, 1.0, (codes, scale, zero), positions.long(), impl=impl)
    with pytest.raises(ValueError, match="cache must be uint8 codes"):
        kv.quantize_kv_at(x, bits, 1.0, 1.0, (codes, scale.double(), zero), positions, impl=impl)


def _empty_cache(b, h, cap, d, bits, transposed=False):
    width = d // 2 if bits == 4 else d
    codes = torch.full((b, h, cap, width), 0x5A, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), -1.0, device=DEVICE)
    if transposed:  # another layout of the same shapes: (b, cap, h) storage
        codes = codes.transpose(1, 2).contiguous().transpose(1, 2)
        scale = scale.transpose(1, 2).contiguous().transpose(1, 2)
    return codes, scale, scale.clone() - 1.0


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bits,t,with_transform", [(4, 1, True), (4, 1, False), (3, 2, True)])
def test_append_of_k_and_v_in_one_launch_equals_two(impl, bits, t, with_transform, monkeypatch):
    """append_kv_at (K with P_h, and V, in one launch where they share shapes and cache strides) writes exactly
    what quantize_kv_at writes for K and V in two launches: codes, scales and zero points, and nothing else;
    caches of different strides take two launches, with the same result."""
    b, h, cap, d = 3, 2, 12, 32
    k = _kv_like((b, h, t, d), seed=3, dtype=torch.bfloat16)
    v = _kv_like((b, t, h, d), seed=4, dtype=torch.bfloat16).transpose(1, 2)  # a head-transposed view
    ph = (torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5)))[0]).to(DEVICE)
    transform = ph.to(torch.bfloat16) if with_transform else None
    positions = torch.tensor([0, 7, cap - t], dtype=torch.int32, device=DEVICE)
    want_k, want_v = _empty_cache(b, h, cap, d, bits), _empty_cache(b, h, cap, d, bits)
    kv.quantize_kv_at(k, bits, 0.9, 0.8, want_k, positions, impl=impl, transform=transform)
    kv.quantize_kv_at(v, bits, 0.7, 0.6, want_v, positions, impl=impl)
    launches = []
    if impl == "triton":
        real = kv._append_kv_kernel

        class Counting:
            def __getitem__(self, grid):
                launches.append(grid)
                return real[grid]

        monkeypatch.setattr(kv, "_append_kv_kernel", Counting())
    for transposed_v in (False, True):
        got_k, got_v = _empty_cache(b, h, cap, d, bits), _empty_cache(b, h, cap, d, bits, transposed_v)
        kv.append_kv_at(k, v, bits, (0.9, 0.8), (0.7, 0.6), got_k, got_v, positions, impl=impl, transform=transform)
        for got, want in ((got_k, want_k), (got_v, want_v)):
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)
    if impl == "triton":  # one launch of both halves where the caches share strides, none where they do not
        assert len(launches) == 1 and launches[0][1] == 2
    with pytest.raises(ValueError, match="positions must be int32"):
        kv.append_kv_at(k, v, bits, (1, 1), (1, 1), got_k, got_v, positions.long(), impl=impl)
    with pytest.raises(ValueError, match="cache must be uint8 codes"):
        kv.append_kv_at(
            k, v, bits, (1, 1), (1, 1), got_k, (got_v[0], got_v[1].double(), got_v[2]), positions, impl=impl
        )


def test_decode_tuning_persists_across_processes(monkeypatch, tmp_path):
    """A tuned shape is written to FLATQUANT_CACHE_DIR and a later process (fresh memory) reuses it untimed."""
    monkeypatch.setenv("FLATQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kq, "AUTOTUNE_CACHE", True)
    monkeypatch.setattr(kv._kq, "AUTOTUNE_CACHE", True)
    cands = [dict(kv.DEFAULT_CONFIG, block_n=bn) for bn in (64, 128)]
    monkeypatch.setattr(kv, "CANDIDATE_CONFIGS", cands)
    timed = []

    def fake_time(fn):
        timed.append(1)
        return 2.0 if len(timed) == 1 else 1.0  # the second candidate (block_n 128) wins

    monkeypatch.setattr(kv, "_graph_time", fake_time)
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 4, 100, 32, dtype=torch.uint8)
    monkeypatch.setattr(kv, "_TUNED", {})
    assert kv._tuned_config(q, k, lambda c: None)["block_n"] == 128 and len(timed) == 2
    assert (tmp_path / "decode_attention_tuning.json").exists()
    monkeypatch.setattr(kv, "_TUNED", {})  # a new process
    assert kv._tuned_config(q, k, lambda c: None)["block_n"] == 128 and len(timed) == 2  # from the file
    monkeypatch.setattr(kq, "AUTOTUNE_CACHE", False)
    monkeypatch.setattr(kv._kq, "AUTOTUNE_CACHE", False)
    monkeypatch.setattr(kv, "_TUNED", {})
    kv._tuned_config(q, k, lambda c: None)
    assert len(timed) == 4  # FLATQUANT_AUTOTUNE_CACHE=0: timed afresh


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_with_a_fused_transform(impl, dtype):
    """transform=T quantizes x @ T (K P_h of the runtime): the reference through a 16-bit matmul, the kernel in
    the same launch; both equal quantizing the float64 product rounded to the dtype, but for rows where the two
    roundings of the product differ (rare)."""
    d = 128 if CUDA else 32
    x = _kv_like((2, 3, 9, d), seed=31, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    t = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].to(DEVICE, dtype)
    codes, scale, zero = kv.quantize_kv(x, 4, 0.9, 0.8, impl=impl, transform=t)
    y = (x.double() @ t.double()).to(dtype)
    want = kv.quantize_kv_reference(y, 4, 0.9, 0.8)
    rows_equal = (codes == want[0]).all(-1) & (scale == want[1]) & (zero == want[2])
    assert rows_equal.float().mean() > 0.9
    torch.testing.assert_close(scale, want[1], rtol=2**-6, atol=0)
    ref = kv.quantize_kv(x @ t, 4, 0.9, 0.8, impl="torch")  # the runtime's separate matmul
    if impl == "torch":
        assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), ref, strict=True))
    else:
        with pytest.raises(ValueError, match=rf"transform must be \({d}, {d}\)"):
            kv.quantize_kv_triton(x, transform=t[:-1])


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("groups", [1, 3])
def test_decode_with_a_query_transform(impl, groups):
    """q_transform=T attends with q @ T (the runtime's P_h^-T): as the reference on the transformed queries."""
    d = 128 if CUDA else 32
    lens = [37, 1, 50]
    cache = _cache(len(lens), 2, max(lens) + 3, d, lens, seed=groups)
    q = _kv_like((len(lens), 2 * groups, d), seed=60, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    t = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].to(DEVICE, torch.bfloat16)
    cfg = {"config": {"block_n": BLOCK_N}} if impl == "triton" and BLOCK_N else {}
    if impl == "triton":
        out = kv.decode_attention_triton(q, *cache, d**-0.5, q_transform=t, **cfg)
    else:
        out = kv.decode_attention(q, *cache, d**-0.5, impl="torch", q_transform=t)
    ref = kv.decode_attention_reference(q @ t, *cache, d**-0.5)
    if impl == "torch":
        assert torch.equal(out, ref)
    else:  # the device matmul may sum in another order than the CPU one: a bf16 rounding boundary apart
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6, atol=1e-3 * ref.float().abs().max().item())
        assert not torch.allclose(out.float(), kv.decode_attention_reference(q, *cache, d**-0.5).float(), atol=1e-2)
        if groups <= kv.MAX_G_CUDA_CORES:  # the CUDA-core variant forms q @ T without tensor cores
            cfg_cc = {**cfg.get("config", {}), "mma": False}
            out_cc = kv.decode_attention_triton(q, *cache, d**-0.5, q_transform=t, config=cfg_cc)
            tol = 1e-3 * ref.float().abs().max().item()
            torch.testing.assert_close(out_cc.float(), ref.float(), rtol=2**-6, atol=tol)
        if groups == 1:  # and the one-row loop
            cfg_flat = {**cfg.get("config", {}), "mma": False, "flat": True}
            out_flat = kv.decode_attention_triton(q, *cache, d**-0.5, q_transform=t, config=cfg_flat)
            torch.testing.assert_close(out_flat.float(), ref.float(), rtol=2**-6, atol=tol)


def test_launch_splits_come_from_shapes_and_the_gpu_size(monkeypatch):
    """Programs per sequence: progs_per_sm x SMs over the KV programs, at most one per token block of the
    capacity and at most _MAX_SPLITS; an explicit count wins within those bounds."""
    monkeypatch.setattr(kv._kq, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert kv._launch_splits(16 * 32, 2304, 64, cpu, 4) == 2  # ceil(528 / 512)
    assert kv._launch_splits(16 * 32, 2304, 64, cpu, 8) == 3
    assert kv._launch_splits(32, 2304, 64, cpu, 4) == 17
    assert kv._launch_splits(1, 1 << 20, 64, cpu, 8) == kv._MAX_SPLITS
    assert kv._launch_splits(1, 100, 64, cpu, 8) == 2  # two token blocks of capacity
    assert kv._launch_splits(512, 2304, 64, cpu, 4, splits=5) == 5


@needs_triton
@pytest.mark.parametrize("loop", [None, *ONE_ROW_LOOPS, "tile-two-pass"])
def test_chunks_divide_the_real_length_not_the_capacity(loop):
    """Sequences far shorter than the capacity, split over more programs than the shortest has token blocks:
    the chunks computed on the device from seq_lens cover every token once (a chunk one block short would drop
    the heavily weighted last tokens), and programs beyond a short sequence's blocks contribute nothing."""
    d = 32
    lens = [5, 70, 1000, 0]
    k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lens_t = _cache(len(lens), 1, 1024, d, lens, seed=41)
    v_scale = v_scale * torch.where(torch.arange(1024) < 896, 1.0, 16.0).to(v_scale)  # the last tokens count
    cache = (k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, lens_t)
    g = 4 if loop == "tile-two-pass" else 1  # the tensor-core loop with four query heads per KV head
    q = _kv_like((len(lens), g, d), seed=42, dtype=torch.bfloat16)
    if loop == "tile-two-pass":
        cfg = {"block_n": 16, **TILE_TWO_PASS, "splits": 7}
    else:
        cfg = {"block_n": 16, "mma": loop is None, "flat": loop is not None, **ONE_ROW_LOOPS.get(loop, {}), "splits": 7}
    out = kv.decode_attention_triton(q, *cache, 0.01, config=cfg)  # near-uniform weights: every token counts
    _assert_close_to_dense(out, _dense_float64(q, *cache, 0.01), torch.bfloat16)
