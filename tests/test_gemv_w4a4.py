"""The CUDA-core (dp4a) decode path of the W4A4 GEMM, 1-4 tokens: exact integer sums, the tensor-core kernel's
epilogue bit for bit, refusals, dispatch.

Without a GPU the kernel runs in the interpreter (TRITON_INTERPRET=1, small shapes, the PTX replaced by the same
integer arithmetic); on a GPU it runs compiled, at full LLaMA shapes as well.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest

try:
    import flatquant  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from flatquant.kernels import gemv_w4a4
from flatquant.kernels.gemm_w4a4 import last_path, pack_int4, unpack_int4, w4a4_gemm, w4a4_gemm_reference

try:
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
    INTERPRET = isinstance(gemv_w4a4._w4a4_gemv_kernel, InterpretedFunction)
except (ImportError, AttributeError):
    HAS_TRITON = INTERPRET = False

DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
RUNNABLE = HAS_TRITON and (DEV == "cuda" or INTERPRET)
needs_triton = pytest.mark.skipif(not RUNNABLE, reason="triton missing, or no GPU and not interpreted")
needs_cuda = pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU (compiled Triton)")


def _operands(m, n, k, asym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if asym else (-8, 8)
    x = torch.randint(lo, hi, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    xs = torch.rand(m, generator=g) + 0.01
    ws = torch.rand(n, generator=g) + 0.01
    xz = torch.randint(0, 16, (m,), generator=g).float() if asym else None
    return x, w, xs, ws, xz


def _gemv(x, xs, wp, ws, config=None, **kw):
    return w4a4_gemm(x.to(DEV), xs.to(DEV), wp.to(DEV), ws.to(DEV), impl="triton", path="gemv", config=config, **kw)


def _int_sums(x, w):
    return x.double() @ w.double().T  # exact integer sums (float64 holds them)


# (M, N, K, config): K tails shorter than a step, odd N, split-K with slices that end mid-tile or are empty
CASES = [
    (1, 40, 64, dict(BLOCK_N=16, BLOCK_KW=4)),
    (1, 33, 200, dict(BLOCK_N=8, BLOCK_KW=8)),  # K / 8 = 25 words: a partial last step
    (2, 50, 256, dict(BLOCK_N=16, BLOCK_KW=8, SPLIT_K=4)),
    (3, 37, 200, dict(BLOCK_N=8, BLOCK_KW=8, SPLIT_K=2)),
    (4, 21, 136, dict(BLOCK_N=16, BLOCK_KW=4, SPLIT_K=3)),  # 17 words over 3 slices of 8: the last one empty
    (4, 64, 512, dict(BLOCK_N=32, BLOCK_KW=16, SPLIT_K=2)),
    # heads (BLOCK_KW0 words of each row read before the wait; the head takes the remainder of the steps)
    (1, 40, 512, dict(BLOCK_N=16, BLOCK_KW=4, BLOCK_KW0=16)),  # 64 words: a whole head, then 12 steps
    (2, 33, 200, dict(BLOCK_N=8, BLOCK_KW=4, BLOCK_KW0=16)),  # 25 words: a 13-word head, then 3 steps
    (1, 30, 800, dict(BLOCK_N=8, BLOCK_KW=8, BLOCK_KW0=32)),  # 100 words: a 28-word head (16-byte aligned steps)
    (3, 37, 232, dict(BLOCK_N=8, BLOCK_KW=4, BLOCK_KW0=16, SPLIT_K=2)),  # slices of 16 and 13 words: heads only
    (4, 21, 136, dict(BLOCK_N=16, BLOCK_KW=4, BLOCK_KW0=8, SPLIT_K=3)),  # slices of 8, 8 and 1 words
    (2, 50, 768, dict(BLOCK_N=16, BLOCK_KW=8, BLOCK_KW0=64, SPLIT_K=3)),  # 32-word slices, shorter than the head
    (1, 64, 1024, dict(BLOCK_N=8, BLOCK_KW=8, BLOCK_KW0=32, SPLIT_K=2)),  # 64-word slices: whole heads and steps
    # two steps of weights loaded ahead (the last two loads of a slice fall past its end, masked)
    (1, 40, 512, dict(BLOCK_N=16, BLOCK_KW=4, AHEAD=2)),  # 64 words: whole steps
    (2, 33, 200, dict(BLOCK_N=8, BLOCK_KW=4, BLOCK_KW0=16, AHEAD=2)),  # a 13-word head, then 3 steps
    (3, 37, 232, dict(BLOCK_N=8, BLOCK_KW=4, AHEAD=2, SPLIT_K=2)),  # slices of 16 and 13 words
    (1, 21, 40, dict(BLOCK_N=8, BLOCK_KW=4, BLOCK_KW0=8, AHEAD=2)),  # 5 words: the head only
]


@needs_triton
@pytest.mark.parametrize("m,n,k,config", CASES)
def test_integer_sums_exact(m, n, k, config):
    x, w, _, _, _ = _operands(m, n, k, seed=m * n + k)
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    out = _gemv(x, ones_m, pack_int4(w), ones_n, config, out_dtype=torch.float32)
    assert last_path() == "gemv"
    assert torch.equal(out.cpu().double(), _int_sums(x, w))


@needs_triton
@pytest.mark.parametrize("m", [1, 4])
def test_extreme_codes_exact(m):
    """-8 x -8 everywhere (the largest sum), -8 x 7 (the most negative), asymmetric 15 x -8."""
    n, k = 24, 264
    cfg = dict(BLOCK_N=8, BLOCK_KW=8, SPLIT_K=2)
    w = torch.full((n, k), -8, dtype=torch.int8)
    w[1::2] = 7
    for fill in (-8, 7, 15):
        x = torch.full((m, k), fill, dtype=torch.int8)
        out = _gemv(x, torch.ones(m), pack_int4(w), torch.ones(n), cfg, out_dtype=torch.float32)
        assert torch.equal(out.cpu().double(), _int_sums(x, w)), fill


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m,n,k,config", CASES[2:5] + CASES[7:9] + CASES[10:11])
def test_same_output_as_tensor_core_kernel(m, n, k, config, asym, dtype):
    """Zero point, bias and residual through the same epilogue: bit for bit the INT8 tensor-core kernel's
    output, and within the output's rounding of the float64 reference."""
    x, w, xs, ws, xz = _operands(m, n, k, asym=asym, seed=k)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g).to(dtype)
    res = torch.randn(m, n, generator=g).to(dtype)
    wp = pack_int4(w)
    kw = dict(bias=bias.to(DEV), x_zero=None if xz is None else xz.to(DEV), out_dtype=dtype, residual=res.to(DEV))
    out = _gemv(x, xs, wp, ws, config, **kw)
    tc = w4a4_gemm(x.to(DEV), xs.to(DEV), wp.to(DEV), ws.to(DEV), impl="triton", path="int8", **kw)
    assert torch.equal(out, tc)
    ref = w4a4_gemm_reference(x, xs, wp, ws, bias, xz, out_dtype=torch.float32)
    want = res.float() + ref.to(dtype).float()
    # two roundings to bf16 / fp16 (the interpreter's float -> bf16 casts truncate: up to one ulp each)
    bound = 2**-6 * (res.float().abs() + ref.abs()) + 1e-3
    assert ((out.cpu().float() - want).abs() <= bound).all()


@needs_triton
def test_fp8_codes_converted_exactly():
    m, n, k = 2, 24, 128
    x, w, xs, ws, _ = _operands(m, n, k, seed=5)
    wp = pack_int4(w)
    cfg = dict(BLOCK_N=8, BLOCK_KW=8)
    a = _gemv(x.to(torch.float8_e4m3fn), xs, wp, ws, cfg)
    b = _gemv(x, xs, wp, ws, cfg)
    assert torch.equal(a, b)


def test_refusals_name_the_reason():
    x, w, xs, ws, _ = _operands(5, 8, 64)
    wp = pack_int4(w)
    with pytest.raises(ValueError, match="at most 4 tokens, got 5"):
        if RUNNABLE:  # the dispatcher's message
            w4a4_gemm(x.to(DEV), xs.to(DEV), wp.to(DEV), ws.to(DEV), impl="triton", path="gemv")
        else:
            _raise_reason(x, wp)
    x, w, xs, ws, _ = _operands(1, 8, 60)
    with pytest.raises(ValueError, match="K must be a multiple of 8.*K=60"):
        _raise_reason(x, pack_int4(w))
    x, w, xs, ws, _ = _operands(1, 8, 72)
    with pytest.raises(ValueError, match="8-byte aligned"):
        _raise_reason(x.view(-1)[4:68].view(1, 64), pack_int4(w[:, 8:]))  # 4 bytes past an aligned start
    with pytest.raises(ValueError, match="group scales"):
        _raise_reason(x[:, :64], pack_int4(w[:, :64]), torch.ones(8, 1))


@needs_triton
def test_direct_call_checks_its_operands():
    """Called directly (not through w4a4_gemm, which passes checked=True), w4a4_gemv asks for the reason itself."""
    x, w, xs, ws, _ = _operands(1, 8, 64)
    with pytest.raises(ValueError, match="w4a4_gemv cannot run: it takes int8 codes"):
        gemv_w4a4.w4a4_gemv(x.to(DEV).float(), xs.to(DEV), pack_int4(w).to(DEV), ws.to(DEV))


def test_prefetch_size_checked():
    x, w, xs, ws, _ = _operands(1, 8, 64)
    with pytest.raises(ValueError, match="pf_bytes must be a non-negative multiple of 16, got pf_bytes=20"):
        gemv_w4a4.w4a4_gemv(x.to(DEV), xs.to(DEV), pack_int4(w).to(DEV), ws.to(DEV), pf_bytes=20)


def _raise_reason(x, wp, gs=None):
    why = gemv_w4a4.gemv_unavailable_reason(x, wp, gs)
    if why is not None:
        raise ValueError(why)


def test_bad_config_rejected():
    x, w, xs, ws, _ = _operands(1, 8, 64)
    for cfg, msg in (
        (dict(BLOCK_N=12, BLOCK_KW=8), "BLOCK_N=12 must be a power of two"),
        (dict(BLOCK_N=8, BLOCK_KW=8, SPLIT_K=5), "SPLIT_K=5 must be an integer from 1 to 4"),
        (dict(BLOCK_N=8, BLOCK_KW=8, BLOCK_KW0=4), "BLOCK_KW0=4 must be a power of two, at least BLOCK_KW=8"),
        (dict(BLOCK_N=8, BLOCK_KW=8, BLOCK_KW0=24), "BLOCK_KW0=24 must be a power of two"),
        (dict(BLOCK_N=8, BLOCK_KW=8, AHEAD=3), "AHEAD=3 must be 1 or 2"),
        (dict(BLOCK_N=8), "missing \\['BLOCK_KW'\\]"),
        (dict(BLOCK_N=8, BLOCK_KW=8, BLOCK_K=64), "unknown \\['BLOCK_K'\\]"),
    ):
        with pytest.raises(ValueError, match=msg):
            gemv_w4a4._check_config(cfg)


def test_auto_never_takes_it_off_the_gpu():
    x, w, xs, ws, _ = _operands(1, 8, 64)
    assert not gemv_w4a4.takes_gemv(x, pack_int4(w), None)


def test_env_threshold_validated(monkeypatch):
    monkeypatch.setenv("FLATQUANT_GEMV_M", "9")
    with pytest.raises(ValueError, match="FLATQUANT_GEMV_M"):
        gemv_w4a4._gemv_m_from_env()
    monkeypatch.setenv("FLATQUANT_GEMV_M", "0")
    assert gemv_w4a4._gemv_m_from_env() == 0


# --------------------------------------------------------------------------------------------------- GPU
@needs_cuda
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gpu_full_shapes_exact_autotuned(m, k, n):
    x, w, _, _, _ = _operands(m, n, k, seed=m + k + n)
    out = _gemv(x, torch.ones(m), pack_int4(w), torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(out.cpu().double(), _int_sums(x, w))


@needs_cuda
@pytest.mark.parametrize("config", gemv_w4a4.CONFIGS if HAS_TRITON else [], ids=str)
def test_gpu_every_candidate_exact(config):
    m, n, k = 3, 4096 + 40, 14336 - 8  # N and K past whole tiles
    x, w, xs, ws, xz = _operands(m, n, k, asym=True, seed=3)
    cfg = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    wp = pack_int4(w)
    kw = dict(x_zero=xz.to(DEV), out_dtype=torch.float32)
    out = _gemv(x, torch.ones(m), wp, torch.ones(n), cfg, **kw)
    ref = w4a4_gemm_reference(x, torch.ones(m), wp, torch.ones(n), None, xz, out_dtype=torch.float32)
    assert torch.equal(out.cpu(), ref)


@needs_cuda
def test_gpu_auto_dispatch_takes_it_at_one_token():
    n, k = 4096, 4096
    x, w, xs, ws, _ = _operands(1, n, k)
    wp = pack_int4(w).cuda()
    out = w4a4_gemm(x.cuda(), xs.cuda(), wp, ws.cuda())
    assert last_path() == ("gemv" if gemv_w4a4.GEMV_M >= 1 else "int8")
    tc = w4a4_gemm(x.cuda(), xs.cuda(), wp, ws.cuda(), path="int8")
    assert torch.equal(out, tc)
    assert torch.equal(unpack_int4(wp, k).cpu(), w)


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_candidates_valid_and_heads_listed():
    """Every autotuning candidate passes the fixed-config check; the long-head candidates are in the set (unless
    FLATQUANT_GEMV_HEAD=0 took them out at import) and read more words before the wait than a step."""
    for c in gemv_w4a4.CONFIGS:
        cfg = gemv_w4a4._check_config({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
        assert cfg["BLOCK_KW0"] >= cfg["BLOCK_KW"]
    assert all(c.kwargs["BLOCK_KW0"] > c.kwargs["BLOCK_KW"] for c in gemv_w4a4.HEAD_CONFIGS)
    listed = all(c in gemv_w4a4.CONFIGS for c in gemv_w4a4.HEAD_CONFIGS)
    assert listed == (os.environ.get("FLATQUANT_GEMV_HEAD", "1") == "1")


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_tuning_times_each_candidate_after_a_transform(monkeypatch):
    """The layer-context timing replays a transform of the tuned call's tokens (the factor pair of K) and then the
    candidate, in that order; the transform is built (and tuned) once per shape, outside the timed replays."""
    import triton.testing

    from flatquant.kernels import kron_quantize as kq

    seen = []

    def fake_kron(x, p1, p2, clip_max, clip_min):
        seen.append(("transform", tuple(x.shape), p1.shape[0], p2.shape[0]))

    def fake_bench(fn, rep, quantiles):
        seen.append("replays")
        fn()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(kq, "kron_quantize", fake_kron)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_bench)
    bench = gemv_w4a4._AfterTransform()
    codes = torch.zeros(2, 11008, dtype=torch.int8)
    bench.tuner = type("Tuner", (), {"nargs": {"M": 2, "KW": 11008 // 8, "x_ptr": codes.view(torch.int64)}})()
    for _ in range(2):
        assert bench(lambda: seen.append("kernel"), (0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    built = ("transform", (2, 11008), 86, 128)
    assert seen == [built, "replays", built, "kernel", "replays", built, "kernel"]
