"""The dense FP8 prefill path of the W4A4 GEMM: packed int4 -> e4m3 unpacking, cuBLAS FP8 GEMM, dispatch.

On the CPU the unpacking kernel runs in Triton's interpreter and the GEMM is PyTorch's CPU ``_scaled_mm``; on a GPU
both run compiled, at LLaMA shapes as well.
"""

import pytest
import torch

from flatquant.kernels import gemm_dense as gd
from flatquant.kernels import gemm_w4a4 as gw
from flatquant.kernels.gemm_w4a4 import pack_int4, unpack_int4, w4a4_gemm, w4a4_gemm_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # conftest runs Triton in its interpreter off CUDA
needs_triton = pytest.mark.skipif(gw.triton is None, reason="triton missing")
needs_fp8_gpu = pytest.mark.skipif(
    DEV != "cuda" or torch.cuda.get_device_capability() < (8, 9), reason="needs a GPU with FP8 tensor cores"
)
E4M3 = torch.float8_e4m3fn


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    return x, w, xs, ws


# ------------------------------------------------------------------------------------------- unpacking
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("n,k", [(1, 2), (5, 64), (7, 130), (3, 8200)])  # 8200: more bytes than one program's
def test_unpack_e4m3_equals_the_codes(impl, n, k):
    w = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    w[0, :2] = torch.tensor([-8, 7])  # both ends of the range
    got = gd.unpack_int4_e4m3(pack_int4(w).to(DEV), k, impl=impl)
    assert got.dtype == E4M3 and got.shape == (n, k)
    assert torch.equal(got.float().cpu(), w.float())
    assert torch.equal(got.float().cpu(), unpack_int4(pack_int4(w), k).float())
    out = torch.empty(n, k, dtype=E4M3, device=DEV)
    assert gd.unpack_int4_e4m3(pack_int4(w).to(DEV), k, out=out, impl=impl) is out


def test_unpack_e4m3_errors():
    p = pack_int4(torch.zeros(4, 10, dtype=torch.int8))
    with pytest.raises(ValueError, match="even K=9"):
        gd.unpack_int4_e4m3(p, 9)
    with pytest.raises(ValueError, match="even K=12"):
        gd.unpack_int4_e4m3(p, 12)
    with pytest.raises(ValueError, match="must be uint8"):
        gd.unpack_int4_e4m3(p.to(torch.int8), 10)
    with pytest.raises(ValueError, match=r"contiguous float8_e4m3fn \(4, 10\)"):
        gd.unpack_int4_e4m3(p, 10, out=torch.empty(4, 10, dtype=torch.int8))
    with pytest.raises(ValueError, match="impl must be"):
        gd.unpack_int4_e4m3(p, 10, impl="cuda")


# ---------------------------------------------------------------------------------------------- the GEMM
DENSE_SHAPES = [(5, 48, 96), (33, 32, 160), (2, 16, 1024)]  # (M, N, K): K and N multiples of 16


@needs_triton
@pytest.mark.parametrize("m,n,k", DENSE_SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.int8, E4M3])
def test_dense_integer_sums_exact(m, n, k, x_dtype):
    x, w, _, _ = _operands(m, n, k, seed=m + n + k)
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    out = w4a4_gemm(x.to(x_dtype).to(DEV), ones_m, pack_int4(w).to(DEV), ones_n, out_dtype=torch.float32,
                    impl="triton", path="dense")  # fmt: skip
    assert gw.last_path() == "dense"
    assert torch.equal(out.double().cpu(), x.double() @ w.double().T)


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", DENSE_SHAPES[:2])
def test_dense_scaled_output_bias_and_residual(m, n, k, out_dtype):
    """Scales and bias in cuBLAS's epilogue: within one rounding of the float64 reference and of the Triton kernel;
    a residual is added after the rounding, bit for bit ``residual + out``."""
    x, w, xs, ws = _operands(m, n, k, seed=7)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(out_dtype)
    args = [t.to(DEV) for t in (x.to(E4M3), xs, pack_int4(w), ws, bias)]
    out = w4a4_gemm(*args, out_dtype=out_dtype, impl="triton", path="dense")
    ref = w4a4_gemm_reference(*args, out_dtype=torch.float32).double()
    ulp = torch.finfo(out_dtype).eps * ref.abs().clamp_min(1e-3)
    assert ((out.double() - ref).abs() <= ulp).all()  # one rounding of the exact result, at most one ulp off
    triton_out = w4a4_gemm(args[0].to(torch.int8), *args[1:], out_dtype=out_dtype, impl="triton", path="int8")
    assert ((out.double() - triton_out.double()).abs() <= 2 * ulp).all()
    residual = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(DEV, out_dtype)
    fused = w4a4_gemm(*args, out_dtype=out_dtype, impl="triton", path="dense", residual=residual)
    assert torch.equal(fused, residual + out)


def _centred(m, k, seed):
    """Asymmetric codes q in [0, 15] with per-token zero points z in [0, 15] (the ends included), and q - z."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (m, k), generator=g, dtype=torch.int8)
    z = torch.randint(0, 16, (m,), generator=g).float()
    q[0], z[0] = 15, 0.0  # q - z = 15 everywhere
    q[1], z[1] = 0, 15.0  # q - z = -15 everywhere
    return q, z, (q.float() - z[:, None]).to(E4M3)


@needs_triton
@pytest.mark.parametrize("m,n,k", DENSE_SHAPES)
def test_dense_centred_asymmetric_codes_exact(m, n, k):
    """Asymmetric activations reach the dense path as centred e4m3 codes (q - z, integers in [-15, 15], exact in
    e4m3): its sums equal the reference GEMM's on the int8 codes with their zero points, exactly, the largest
    products (15 * -8) included."""
    q, z, centred = _centred(max(m, 2), k, seed=m + k)
    _, w, _, _ = _operands(max(m, 2), n, k, seed=n)
    w[:, : k // 2] = -8
    assert torch.equal(centred.float(), q.float() - z[:, None])
    ones_m, ones_n = torch.ones(len(q), device=DEV), torch.ones(n, device=DEV)
    wp = pack_int4(w).to(DEV)
    out = w4a4_gemm(centred.to(DEV), ones_m, wp, ones_n, out_dtype=torch.float32, impl="triton", path="dense")
    assert gw.last_path() == "dense"
    ref = w4a4_gemm_reference(q, ones_m.cpu(), wp.cpu(), ones_n.cpu(), x_zero=z, out_dtype=torch.float32)
    assert torch.equal(out.double().cpu(), ref.double())
    assert torch.equal(out.double().cpu(), (q.double() - z.double()[:, None]) @ w.double().T)


@needs_triton
def test_dense_path_refuses_what_it_cannot_compute():
    x, w, xs, ws = (t.to(DEV) for t in _operands(4, 32, 64))
    wp = pack_int4(w)
    cases = [
        (dict(x_zero=torch.zeros(4, device=DEV)), r"zero point .* centred"),
        (dict(w_group_scale=torch.ones(32, 2, device=DEV), group_size=32), "group scales"),
        (dict(bias=torch.zeros(32, device=DEV)), r"bias must be in out_dtype \(torch.bfloat16\)"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            w4a4_gemm(x, xs, wp, ws, impl="triton", path="dense", **kw)
    x40, w40, xs40, ws40 = (t.to(DEV) for t in _operands(4, 32, 40))
    with pytest.raises(ValueError, match="K and N divisible by 16, got K=40, N=32"):
        w4a4_gemm(x40, xs40, pack_int4(w40), ws40, impl="triton", path="dense")
    with pytest.raises(ValueError, match="path must be one of"):
        w4a4_gemm(x, xs, wp, ws, path="cublas")


@needs_triton
def test_auto_takes_dense_from_dense_m(monkeypatch):
    """path="auto" runs the dense path from DENSE_M tokens on (where it can run), the Triton INT8 kernel below it,
    with int8 codes and a zero point, on K not a multiple of 16, or with the dense path off (DENSE_M = 0)."""
    monkeypatch.setattr(gd, "_auto_device", lambda device: True)  # as on an FP8 GPU
    monkeypatch.setattr(gd, "DENSE_M", 8)
    cfg = None if DEV == "cpu" else dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2)

    def run(m, k=64, **kw):
        x, w, xs, ws = _operands(m, 32, k, seed=m)
        args = [t.to(DEV) for t in (x, xs, pack_int4(w), ws)]
        out = w4a4_gemm(*args, out_dtype=torch.float32, impl="triton", **kw)
        ref = w4a4_gemm_reference(*args, out_dtype=torch.float32, **{a: v for a, v in kw.items() if a != "config"})
        # fp32 epilogues; the CPU _scaled_mm scales the operands before its fp32 sums (cancellation: ~1e-5 relative)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        return gw.last_path()

    assert run(8) == "dense" and run(50) == "dense"
    assert run(7) == "int8"
    assert run(8, config=cfg) == "int8" if cfg else True  # a fixed tile config is the Triton kernel's
    assert run(8, x_zero=torch.zeros(8, device=DEV)) == "int8"
    assert run(8, k=72) == "int8"
    assert gd.wants_e4m3_codes(8, 64, torch.device(DEV)) and not gd.wants_e4m3_codes(7, 64, torch.device(DEV))
    assert not gd.wants_e4m3_codes(8, 72, torch.device(DEV))
    monkeypatch.setattr(gd, "DENSE_M", 0)
    assert run(50) == "int8" and not gd.wants_e4m3_codes(50, 64, torch.device(DEV))


def test_no_dense_codes_off_the_gpu():
    assert not gd.wants_e4m3_codes(4096, 4096, torch.device("cpu"))


@pytest.mark.parametrize(
    "name,raw,want",
    [
        ("FLATQUANT_DENSE_M", raw, want)
        for raw, want in ((None, 512), ("0", 0), ("2048", 2048), ("-1", None), ("x", None))
    ]
    + [
        ("FLATQUANT_MEDIUM_M", raw, want)
        for raw, want in ((None, 128), ("16", 16), ("64", 64), ("8", None), ("big", None))
    ],
)
def test_token_count_settings(monkeypatch, name, raw, want):
    """FLATQUANT_DENSE_M (dense FP8 path from this many tokens; 0 = off) and FLATQUANT_MEDIUM_M (the largest token
    count of the batched-decode tiles; 16 = off): defaults, accepted values, and an error naming value and range."""
    read, allowed = {
        "FLATQUANT_DENSE_M": (gd._dense_m_from_env, r"an integer \(0 = off\) in \[0, 2147483647\]"),
        "FLATQUANT_MEDIUM_M": (gw._medium_m_from_env, r"an integer in \[16, 1024\]"),
    }[name]
    if raw is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, raw)
    if want is None:
        with pytest.raises(ValueError, match=f"{name} must be {allowed}, got '{raw}'"):
            read()
    else:
        assert read() == want


# ------------------------------------------------------------------------------------------ on the GPU
@needs_fp8_gpu
@pytest.mark.parametrize("m", [512, 2048])
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (4096, 14336), (14336, 4096)])
def test_gpu_dense_full_shapes_exact(m, k, n):
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randint(-8, 8, (m, k), generator=g, device="cuda", dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    out = w4a4_gemm(x.to(E4M3), ones_m, pack_int4(w), ones_n, out_dtype=torch.float32)  # auto: dense here
    assert gw.last_path() == "dense"
    assert torch.equal(out.double(), x.double() @ w.double().T)


@needs_fp8_gpu
def test_gpu_dense_extreme_codes_exact():
    """The largest symmetric sums, -8 * -8 and 7 * -8 over K = 14336, need the fp32 promotion of cuBLAS's default
    FP8 accumulation (use_fast_accum=True lost up to 278528 here on an H200)."""
    m, k, n = 1024, 14336, 4096
    x = torch.full((m, k), -8, device="cuda", dtype=torch.int8)
    x[1::2] = 7
    w = torch.full((n, k), -8, device="cuda", dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    out = w4a4_gemm(x.to(E4M3), ones_m, pack_int4(w), ones_n, out_dtype=torch.float32, path="dense")
    assert torch.all(out[0::2] == 64.0 * k) and torch.all(out[1::2] == -56.0 * k)


@needs_fp8_gpu
@pytest.mark.parametrize("k", [4096, 14336])
def test_gpu_dense_centred_asymmetric_codes_exact(k):
    """Centred asymmetric codes (q - z in [-15, 15]) at full shapes, random and the largest products (15 * -8 and
    -15 * -8 over all of K): cuBLAS's sums stay exact."""
    m, n = 1024, 4096
    q, z, centred = _centred(m, k, seed=k)
    _, w, _, _ = _operands(2, n, k, seed=k + 1)
    w[: n // 2] = -8
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    out = w4a4_gemm(centred.cuda(), ones_m, pack_int4(w).cuda(), ones_n, out_dtype=torch.float32, path="dense")
    want = (q.cuda().double() - z.cuda().double()[:, None]) @ w.cuda().double().T
    assert torch.equal(out.double(), want)
    assert out[0, 0] == -120.0 * k and out[1, 0] == 120.0 * k


@needs_fp8_gpu
@torch.no_grad()
def test_gpu_layer_takes_e4m3_codes_and_the_dense_path():
    """A W4A4 layer at 2048 tokens: the transform writes e4m3 codes, the GEMM takes the dense path, and the output
    is within one bf16 rounding of the same layer on the INT8 kernel."""
    from flatquant.kernels.w4a4_linear import W4A4Linear, quantize_operand

    k, n = 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    p1 = torch.linalg.qr(torch.randn(64, 64, device="cuda", generator=g))[0]
    p2 = torch.linalg.qr(torch.randn(64, 64, device="cuda", generator=g))[0]
    weight = torch.randn(n, k, device="cuda", generator=g) / 64
    layer = W4A4Linear.from_float(weight, None, p1, p2, act_clip=0.9)
    x = torch.randn(2048, k, device="cuda", generator=g).to(torch.bfloat16)
    op = quantize_operand(x, p1, p2, 0.9, 0.9)
    assert op[0].dtype == E4M3
    assert quantize_operand(x[:100], p1, p2, 0.9, 0.9)[0].dtype == torch.int8
    out = layer(x)
    assert gw.last_path() == "dense"
    int8_out = w4a4_gemm(op[0].to(torch.int8), op[1], layer.w_packed, layer.w_scale, path="int8")
    ulp = torch.finfo(torch.bfloat16).eps * int8_out.float().abs().clamp_min(1e-3)
    assert ((out.float() - int8_out.float()).abs() <= 2 * ulp).all()


@needs_fp8_gpu
@torch.no_grad()
def test_gpu_asymmetric_layer_takes_centred_codes_and_the_dense_path():
    """A W4A4 layer with asymmetric activations at 2048 tokens: the transform writes centred e4m3 codes and no zero
    point, the GEMM takes the dense path, and the output is within two bf16 roundings of the INT8 kernel's on the
    int8 codes with their zero points."""
    from flatquant.kernels.kron_quantize import kron_quantize
    from flatquant.kernels.w4a4_linear import W4A4Linear, quantize_operand

    k, n = 11008, 4096
    g = torch.Generator(device="cuda").manual_seed(1)
    p1 = torch.linalg.qr(torch.randn(86, 86, device="cuda", generator=g))[0]
    p2 = torch.linalg.qr(torch.randn(128, 128, device="cuda", generator=g))[0]
    weight = torch.randn(n, k, device="cuda", generator=g) / 100
    layer = W4A4Linear.from_float(weight, None, p1, p2, act_clip=(0.9, 0.8), act_symmetric=False)
    x = (torch.randn(2048, k, device="cuda", generator=g) + 0.3).to(torch.bfloat16)
    op = quantize_operand(x, p1, p2, 0.9, 0.8, symmetric=False)
    assert op[0].dtype == E4M3 and len(op) == 2  # centred: no zero point left
    codes, scale, zero = quantize_operand(x[:100], p1, p2, 0.9, 0.8, symmetric=False)
    assert codes.dtype == torch.int8
    assert 0 <= zero.min() and zero.max() <= 15
    out = layer(x)
    assert gw.last_path() == "dense"
    int8_op = kron_quantize(x, p1, p2, 0.9, 0.8, symmetric=False)  # int8 codes and zero points, same kernel
    assert torch.equal(op[0].float(), int8_op.codes.float() - int8_op.zero[:, None])
    assert torch.equal(op[1], int8_op.scale)
    int8_out = w4a4_gemm(int8_op.codes, int8_op.scale, layer.w_packed, layer.w_scale, x_zero=int8_op.zero, path="int8")
    ulp = torch.finfo(torch.bfloat16).eps * int8_out.float().abs().clamp_min(1e-3)
    assert ((out.float() - int8_out.float()).abs() <= 2 * ulp).all()
