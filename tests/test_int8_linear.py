"""The 8-bit head's matmul (16-bit x times int8 codes with per-row or per-group scales) against float64."""

import pytest
import torch
from conftest import for_the_interpreter

import flatquant.kernels.int8_linear as il
import flatquant.kernels.kron_quantize as kq
import flatquant.kernels.kv_quant as kv

kq, kv, il = for_the_interpreter(kq, kv, il)
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(il.triton is None or not (CUDA or il._interpreting()), reason="no triton")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def _problem(m, n, k, group, dtype, seed=0):
    """x (m, k), codes (n, k) in [-127, 127], fp32 scales per row (group = k) or per group of columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    shape = (n,) if group == k else (n, k // group)
    scale = (torch.rand(shape, generator=g) * 0.02 + 1e-3).to(DEVICE)
    return x, codes, scale


def _float64(x, codes, scale):
    """Dense dequantized weight in float64 (another way than the group sums)."""
    n, k = codes.shape
    s = scale.double().reshape(n, -1).repeat_interleave(k // scale.reshape(n, -1).shape[1], dim=1)
    return x.double() @ (codes.double() * s).T


def _close_to_float64(out, x, codes, scale):
    want = _float64(x, codes, scale)
    # one rounding to the output dtype (and fp32 summation order: far below it)
    tol = ULP[out.dtype] * want.abs() + 1e-5 * want.abs().max()
    err = (out.double() - want).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_matches_float64(group, dtype, monkeypatch):
    monkeypatch.setattr(il, "_CHUNK", 7)  # several row chunks, the last one partial
    k = 96
    x, codes, scale = _problem(5, 23, k, group or k, dtype)
    out = il.int8_linear_reference(x, codes, scale)
    assert out.dtype == dtype and out.shape == (5, 23)
    _close_to_float64(out, x, codes, scale)
    # leading dimensions are kept
    out3 = il.int8_linear_reference(x.reshape(5, 1, k), codes, scale)
    assert out3.shape == (5, 1, 23) and torch.equal(out3.reshape(5, 23), out)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,n,k,group",
    [(1, 45, 96, 96), (7, 100, 64, 32), (17, 70, 96, 16), (33, 64, 576, 64), (3, 130, 576, 576)],
)
def test_kernel_matches_float64(m, n, k, group, dtype):
    x, codes, scale = _problem(m, n, k, group, dtype, seed=m + n)
    out = il.int8_linear_triton(x, codes, scale)
    assert out.dtype == dtype and out.shape == (m, n)
    _close_to_float64(out, x, codes, scale)
    ref = il.int8_linear_reference(x, codes, scale)
    assert (out.float() - ref.float()).abs().le(2 * ULP[dtype] * ref.float().abs() + 1e-6).all()  # one ulp apart


@needs_triton
def test_kernel_fixed_configs_agree():
    """Every K block that divides the group gives the same sums (up to fp32 order): 16, 32 and 64 columns."""
    x, codes, scale = _problem(20, 40, 128, 64, torch.bfloat16, seed=3)
    outs = [
        il.int8_linear_triton(x, codes, scale, config={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": bk})
        for bk in (16, 32, 64)
    ]
    for out in outs:
        _close_to_float64(out, x, codes, scale)
    with pytest.raises(ValueError, match="BLOCK_K=128 does not divide"):
        il.int8_linear_triton(x, codes, scale, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128})


@pytest.mark.skipif(not CUDA, reason="full shapes and the autotuner need CUDA")
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("group", [None, 64, 128])
def test_autotuned_head_shapes(m, group):
    k, n = 4096, 32000
    x, codes, scale = _problem(m, n, k, group or k, torch.bfloat16, seed=m)
    out = il.int8_linear(x, codes, scale)
    _close_to_float64(out, x, codes, scale)


def test_dispatcher_and_errors():
    x, codes, scale = _problem(2, 8, 32, 16, torch.float32)
    assert torch.equal(il.int8_linear(x, codes, scale, impl="torch"), il.int8_linear_reference(x, codes, scale))
    with pytest.raises(ValueError, match="impl must be one of"):
        il.int8_linear(x, codes, scale, impl="cuda")
    with pytest.raises(ValueError, match="codes must be a 2-D int8 tensor"):
        il.int8_linear_reference(x, codes.float(), scale)
    with pytest.raises(ValueError, match=r"scale must be fp32 of shape \(8,\)"):
        il.int8_linear_reference(x, codes, scale[:4])
    with pytest.raises(ValueError, match="3 groups per row, which does not divide the 32 columns"):
        il.int8_linear_reference(x, codes, torch.ones(8, 3, device=DEVICE))
    with pytest.raises(ValueError, match="x has 31 features, the weight 32"):
        il.int8_linear_reference(x[:, :31], codes, scale)
    if il.triton is not None and (CUDA or il._interpreting()):
        with pytest.raises(ValueError, match="takes x in"):
            il.int8_linear_triton(x, codes, scale)  # fp32 x
        xb = x.to(torch.bfloat16)
        with pytest.raises(ValueError, match="multiple of 16 columns"):
            il.int8_linear_triton(xb, codes, torch.ones(8, 4, device=DEVICE))  # groups of 8


@pytest.mark.skipif(il.triton is None, reason="no triton")
def test_tuned_candidates_cover_every_group_the_tuner_takes():
    """The autotuner takes per-row scales and groups that are multiples of the smallest tuned K block; for
    each, at decode and prefill sizes, some candidates remain and every one has K blocks inside one group
    (smaller groups go to the fixed config: on a GPU an empty candidate list would be an error)."""
    configs = il._configs()
    assert il._MIN_TUNED_K == min(c.kwargs["BLOCK_K"] for c in configs)
    for group, grouped in [(4096, False), (576, False), (64, True), (128, True), (256, True)]:
        for bucket in (0, 1):
            keep = il._prune(configs, {"GROUP": group, "GROUPED": grouped, "M_BUCKET": bucket})
            assert keep and all((c.kwargs["BLOCK_M"] == 16) == (bucket == 0) for c in keep)
            assert not grouped or all(group % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_M"] < 128 for c in keep)


@needs_triton
def test_kernel_reads_scales_of_any_layout():
    """Grouped scales with the groups not adjacent in memory (a transposed layout) give the same result."""
    x, codes, scale = _problem(5, 48, 128, 32, torch.bfloat16, seed=7)
    strided = scale.t().contiguous().t()
    assert strided.stride(-1) != 1
    assert torch.equal(il.int8_linear_triton(x, codes, strided), il.int8_linear_triton(x, codes, scale))


@needs_triton
def test_auto_takes_the_reference_for_groups_the_kernel_cannot_use(monkeypatch):
    """Where the kernel would run (forced here: "auto" picks Triton as on CUDA), groups that are not a multiple of
    16 columns go to the reference instead of raising; groups of 16 go to the kernel."""
    monkeypatch.setattr(il._kv, "_pick", lambda impl, x: "triton")
    calls = []
    real = il.int8_linear_triton
    monkeypatch.setattr(il, "int8_linear_triton", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 32).to(DEVICE, torch.bfloat16)
    codes = torch.randint(-127, 128, (8, 32), dtype=torch.int8).to(DEVICE)
    out8 = il.int8_linear(x, codes, torch.rand(8, 4, device=DEVICE))  # groups of 8
    assert not calls and out8.shape == (3, 8)
    s16 = torch.rand(8, 2, device=DEVICE)
    _close_to_float64(il.int8_linear(x, codes, s16), x, codes, s16)
    assert calls == [1]
