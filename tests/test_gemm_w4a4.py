"""W4A4 GEMM (packing, reference, Triton kernel) and the real-quant W4A4Linear layer.

Without a GPU the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, small shapes); on a GPU it runs
compiled, at full LLaMA shapes as well.
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

from flatquant.kernels.gemm_w4a4 import pack_int4, unpack_int4, w4a4_gemm, w4a4_gemm_reference
from flatquant.kernels.w4a4_linear import W4A4Linear, kron_quantize_torch

try:
    from triton.runtime.interpreter import InterpretedFunction

    from flatquant.kernels.gemm_w4a4 import _w4a4_gemm_kernel

    HAS_TRITON = True
    # another test module may have imported the kernels before TRITON_INTERPRET was set
    INTERPRET = isinstance(_w4a4_gemm_kernel, InterpretedFunction)
except ImportError:
    HAS_TRITON = INTERPRET = False

DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
RUNNABLE = HAS_TRITON and (DEV == "cuda" or INTERPRET)
needs_triton = pytest.mark.skipif(not RUNNABLE, reason="triton missing, or no GPU and not interpreted")
needs_cuda = pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU (compiled Triton)")
PATHS = ["int8", "fp8"]
# a fixed tile config on the GPU for the small shapes: compiling every autotune candidate costs minutes
CFG = None if DEV == "cpu" else dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _operands(m, n, k, asym=False, seed=0):
    """Random codes and scales: x (M, K) int8, w (N, K) int8, x_scale (M,), w_scale (N,), x_zero or None."""
    g = _gen(seed)
    lo, hi = (0, 16) if asym else (-8, 8)
    x = torch.randint(lo, hi, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    xs = torch.rand(m, generator=g) + 0.01
    ws = torch.rand(n, generator=g) + 0.01
    xz = torch.randint(0, 16, (m,), generator=g).float() if asym else None
    return x, w, xs, ws, xz


# ----------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("k", [1, 2, 7, 64, 129])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(-8, 8, (5, k), generator=_gen(k), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), codes)


def test_pack_layout_low_nibble_is_even_k():
    codes = torch.tensor([[1, -2, -8, 7, 3]], dtype=torch.int8)
    # byte0 = 1 | (0xE << 4), byte1 = 0x8 | (0x7 << 4), byte2 = 3 (odd K padded with 0)
    assert pack_int4(codes).tolist() == [[0xE1, 0x78, 0x03]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 2))


# --------------------------------------------------------------------------------------------- reference
def test_reference_matches_dequantized_matmul():
    x, w, xs, ws, xz = _operands(6, 10, 40, asym=True)
    bias = torch.randn(10, generator=_gen(1))
    out = w4a4_gemm_reference(x, xs, pack_int4(w), ws, bias, xz, out_dtype=torch.float32)
    want = ((x.double() - xz.double()[:, None]) * xs.double()[:, None]) @ (w.double() * ws.double()[:, None]).T
    torch.testing.assert_close(out, (want + bias.double()).float(), rtol=1e-6, atol=1e-5)


def test_reference_group_scales():
    x, w, xs, ws, _ = _operands(4, 6, 100)
    gs = torch.rand(6, 4, generator=_gen(2))  # groups of 32 over K=100 (last group partial)
    out = w4a4_gemm_reference(x, xs, pack_int4(w), ws, None, None, gs, 32, out_dtype=torch.float32)
    wd = w.double() * gs.double().repeat_interleave(32, dim=1)[:, :100] * ws.double()[:, None]
    torch.testing.assert_close(out, ((x.double() * xs.double()[:, None]) @ wd.T).float(), rtol=1e-6, atol=1e-5)


def test_dispatcher_errors(monkeypatch):
    x, w, xs, ws, _ = _operands(2, 4, 8)
    with pytest.raises(ValueError, match="impl"):
        w4a4_gemm(x, xs, pack_int4(w), ws, impl="cuda")
    with pytest.raises(ValueError, match="K=8 needs 4"):
        w4a4_gemm(x, xs, pack_int4(w)[:, :3], ws)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run"):
        w4a4_gemm(x, xs, pack_int4(w), ws, impl="triton")  # CPU tensors, no interpreter
    out = w4a4_gemm(x, xs, pack_int4(w), ws, impl="auto")  # falls back to the reference on CPU
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4)


# ------------------------------------------------------------------------------------------ triton kernel
SMALL_SHAPES = [(1, 40, 70), (5, 37, 129), (16, 96, 256), (33, 50, 190)]  # (M, N, K); tiles 16/32/64


@needs_triton
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,k", SMALL_SHAPES)
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.float8_e4m3fn])
def test_triton_integer_sums_exact(m, n, k, asym, path, x_dtype):
    x, w, _, _, xz = _operands(m, n, k, asym, seed=m + n + k)
    xin = x.to(x_dtype).to(DEV)  # e4m3 holds the codes exactly
    args = (xin, torch.ones(m, device=DEV), pack_int4(w).to(DEV), torch.ones(n, device=DEV))
    out = w4a4_gemm(*args, out_dtype=torch.float32, impl="triton", path=path, config=CFG)
    want = x.double() @ w.double().T  # (M, N) integer sums
    assert torch.equal(out.double().cpu(), want)
    if asym:  # zero point applied in the epilogue: still integers, still exact
        xz = xz.to(DEV)
        out = w4a4_gemm(*args, x_zero=xz, out_dtype=torch.float32, impl="triton", path=path, config=CFG)
        assert torch.equal(out.double().cpu(), (x.double() - xz.double().cpu()[:, None]) @ w.double().T)


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", SMALL_SHAPES[1:3])
def test_triton_scaled_output_matches_reference(m, n, k, out_dtype):
    x, w, xs, ws, xz = _operands(m, n, k, asym=True, seed=3)
    bias = torch.randn(n, generator=_gen(4)).to(out_dtype)
    args = [t.to(DEV) for t in (x, xs, pack_int4(w), ws, bias, xz)]
    out = w4a4_gemm(*args, out_dtype=out_dtype, impl="triton", config=CFG)
    ref = w4a4_gemm_reference(*args, out_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)  # one rounding to 16 bits


@needs_triton
@pytest.mark.parametrize("group_size", [64, 128])
def test_triton_group_scales(group_size):
    m, n, k = 9, 40, 320  # K not a multiple of the group
    x, w, xs, ws, xz = _operands(m, n, k, asym=True, seed=5)
    gs = torch.rand(n, -(-k // group_size), generator=_gen(6)) + 0.5
    x, xs, wp, ws, xz, gs = (t.to(DEV) for t in (x, xs, pack_int4(w), ws, xz, gs))
    kw = dict(x_zero=xz, w_group_scale=gs, group_size=group_size, out_dtype=torch.float32)
    out = w4a4_gemm(x, xs, wp, ws, impl="triton", **kw)
    ref = w4a4_gemm_reference(x, xs, wp, ws, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)


@needs_triton
def test_zero_point_column_sums_computed_once_per_weight(monkeypatch):
    """The zero point's correction (the weight's column sums) unpacks the whole weight: it is computed once per
    weight tensor, not per call (a decode GEMM would spend most of its time on it), recomputed after an in-place
    write to the weights or group scales, and forgotten with the tensor; results stay exact throughout."""
    import flatquant.kernels.gemm_w4a4 as g

    unpacked = []
    real_unpack = g.unpack_int4
    monkeypatch.setattr(g, "unpack_int4", lambda *a: unpacked.append(1) or real_unpack(*a))
    m, n, k = 3, 40, 96
    x, w, xs, ws, xz = (t.to(DEV) for t in _operands(m, n, k, asym=True, seed=11))
    held, sums = [pack_int4(w)], []

    def check(**kw):
        wp, before = held[0], len(unpacked)
        out = w4a4_gemm(x, xs, wp, ws, x_zero=xz, out_dtype=torch.float32, impl="triton", config=CFG, **kw)
        sums.append(len(unpacked) - before)  # unpacking passes of this call (the reference's own are not counted)
        ref = w4a4_gemm_reference(x, xs, wp, ws, x_zero=xz, out_dtype=torch.float32, **kw)
        torch.testing.assert_close(out, ref)

    check()
    check()
    assert sums == [1, 0]
    held[0][0].copy_(pack_int4(torch.full((1, k), 7, dtype=torch.int8)).to(DEV)[0])  # in place: new sums needed
    check()
    check()
    assert sums == [1, 0, 1, 0]
    gs = torch.rand(n, 3, generator=_gen(12)).to(DEV) + 0.5
    check(w_group_scale=gs, group_size=32)
    gs.mul_(2.0)
    check(w_group_scale=gs, group_size=32)
    check(w_group_scale=gs, group_size=32)
    assert sums == [1, 0, 1, 0, 1, 1, 0]
    key = id(held[0])
    assert key in g._COLSUMS
    held.clear()  # the last reference: the entry goes with the tensor
    assert key not in g._COLSUMS
    with torch.inference_mode():  # inference tensors have no version counter: still cached, still exact
        held.append(pack_int4(w))
        sums.clear()
        check()
        check()
    assert sums == [1, 0]


def test_auto_path_is_int8(monkeypatch):
    # INT8 was faster than FP8 at every shape measured on the H100: "auto" hands fp8 codes to the INT8 path
    import flatquant.kernels.gemm_w4a4 as g

    seen = {}

    def spy(x_codes, *args):
        seen["dtype"], seen["path"] = x_codes.dtype, args[-3]  # (..., path, config, residual)
        return torch.zeros(x_codes.shape[0], args[1].shape[0])

    monkeypatch.setattr(g, "_w4a4_gemm_triton", spy)
    monkeypatch.setattr(g, "_triton_unavailable_reason", lambda x: None)
    x, w, xs, ws, _ = _operands(64, 8, 32)
    g.w4a4_gemm(x.to(torch.float8_e4m3fn), xs, pack_int4(w), ws, impl="triton")
    assert seen == {"dtype": torch.int8, "path": "int8"}


@needs_triton
def test_fp8_path_rejects_long_k_tiles():
    x, w, xs, ws, _ = _operands(4, 8, 256)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1)
    with pytest.raises(ValueError, match="BLOCK_K <= 128"):
        w4a4_gemm(x.to(DEV), xs.to(DEV), pack_int4(w).to(DEV), ws.to(DEV), impl="triton", path="fp8", config=cfg)


_SM90_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flatquant.kernels.gemm_w4a4 import _w4a4_gemm_kernel as kern
ptrs = ["x_ptr", "w_ptr", "out_ptr", "xs_ptr", "ws_ptr", "xz_ptr", "zc_ptr", "bias_ptr", "gs_ptr"]
ptrs += ["part_ptr", "cnt_ptr", "res_ptr"]
ints = ["M", "N", "K", "K2", "M_KEY", "group_size", "stride_xm", "stride_wn", "stride_om", "stride_gn", "stride_rm",
        "pf_bytes"]
sig = {p: "*i8" if p == "x_ptr" else "*u8" if p == "w_ptr" else "*i32" if p in ("part_ptr", "cnt_ptr") else "*fp32"
       for p in ptrs} | dict.fromkeys(ints, "i32")
const = dict(HAS_ZERO=False, HAS_BIAS=False, HAS_GROUP=False, HAS_RES=False, USE_FP8=True, X_FP8=True, USE_ASM=True,
             EVEN_K=True, MASK_M=False,
             BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1, SWAP_AB=False, PDL=False, PREFETCH=False)
sig |= dict.fromkeys(const, "constexpr")
src = ASTSource(kern, sig, constexprs={(list(sig).index(k),): v for k, v in const.items()})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)).asm["ttgir"])
"""


def _sm90_ttgir() -> str:
    """The fp8 kernel's TTGIR compiled for sm_90 on this machine (no GPU needed), in a fresh interpreter."""
    import subprocess

    pytest.importorskip("triton.backends.nvidia.compiler")
    src_dir = os.path.join(os.path.dirname(__file__), "..", "src")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _SM90_PROBE, src_dir], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_row_offsets_are_64_bit_in_the_compiled_kernel():
    """Prefill sizes pass 2^31 elements (64 x 2165 tokens x the fused gate/up's 22016 outputs): with int32
    row offsets the H100 run hit an illegal memory access. The sm_90 build must form the activation, weight and
    output row offsets in int64 (the CUDA test test_outputs_past_two_to_the_31_elements checks the values)."""
    import re

    ttgir = _sm90_ttgir()
    for name in ("x_ptrs", "w_ptrs", "out_ptrs"):
        assert re.search(rf"%{name}\S* = tt.addptr .*tensor<\d+x1xi64", ttgir), f"{name}: 32-bit row offsets"


def test_fp8_wgmma_sums_each_k_tile_from_zero():
    # The GPU run failed test_gpu_full_shapes_exact[14336-4096-256-fp8]: Hopper's FP8 MMA accumulates with ~14
    # significant bits, and Triton's sm_90 default (max_num_imprecise_acc = 2^30) fed the running sum into
    # every wgmma. Compile for sm_90 on the CPU and check that each K tile's dot starts from zero and is added
    # to the running sum in fp32 outside the tensor core.
    import re

    ttgir = _sm90_ttgir()
    dots = re.findall(r"(%\S+) = ttng.warp_group_dot (%\S+), (%\S+), (%\S+)[ ,]", ttgir)
    assert dots, "no wgmma in the fp8 kernel"
    for _, _, _, acc_in in dots:
        defn = re.search(rf"{re.escape(acc_in)} = arith.constant dense<0\.0+e\+00>", ttgir)
        assert defn, f"the fp8 wgmma accumulates into {acc_in}, not into zero"
    assert re.search(r"arith.addf .*tensor<128x128xf32, #mma>", ttgir), "no fp32 add of the tile sums"


# ------------------------------------------------------------------------------- configs and split-K
@needs_triton
@pytest.mark.parametrize("split_k", [2, 3, 4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 40, 70), (5, 37, 1029), (16, 96, 256)])
def test_split_k_decode_exact(m, n, k, split_k):
    """Decode split-K: K slices in separate programs, int32 partials summed by the last one (odd K and N,
    more slices than K tiles); the counters are back at zero afterwards, so a second call is right too."""
    import flatquant.kernels.gemm_w4a4 as g

    x, w, xs, ws, xz = _operands(m, n, k, asym=True, seed=split_k + k)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=split_k)
    if DEV == "cuda":
        cfg.update(num_warps=4, num_stages=3)
    args = [t.to(DEV) for t in (x, xs, pack_int4(w), ws)]
    for zero in (None, xz.to(DEV)):
        out = w4a4_gemm(*args, x_zero=zero, out_dtype=torch.float32, impl="triton", config=cfg)
        ref = w4a4_gemm_reference(*args, x_zero=zero, out_dtype=torch.float32)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    assert int(g._COUNTERS[torch.device(DEV) if DEV == "cpu" else args[0].device].abs().sum()) == 0
    ones = (torch.ones(m, device=DEV), torch.ones(n, device=DEV))
    out = w4a4_gemm(args[0], ones[0], args[2], ones[1], out_dtype=torch.float32, impl="triton", config=cfg)
    assert torch.equal(out.double().cpu(), x.double() @ w.double().T)


@needs_triton
@pytest.mark.parametrize("mask_rows", [True, False])
@pytest.mark.parametrize(
    "m,k,swap,split_k",
    [
        (1, 70, False, 1),
        (3, 1029, True, 2),
        (15, 256, False, 4),
        (7, 96, True, 1),
        (17, 130, False, 2),
        (40, 96, True, 1),
    ],
)
def test_partial_row_tiles_exact_with_masked_or_clamped_rows(monkeypatch, m, k, swap, split_k, mask_rows):
    """Fewer tokens than BLOCK_M (decode), or a partial last tile (17 and 40 tokens on 16-row tiles): the padding
    rows are masked out of the activation loads (MASK_M, the default) or clamped onto row 0 (the kernel before);
    both give the integer product exactly, with odd K (the masked-K loads), SWAP_AB and split-K."""
    import flatquant.kernels.gemm_w4a4 as g

    monkeypatch.setattr(g, "_MASK_ROWS", mask_rows)
    x, w, _, _, _ = _operands(m, 40, k, seed=m + k)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=split_k, SWAP_AB=swap)
    if DEV == "cuda":
        cfg.update(num_warps=4, num_stages=3)
    ones = (torch.ones(m, device=DEV), torch.ones(40, device=DEV))
    out = w4a4_gemm(
        x.to(DEV), ones[0], pack_int4(w).to(DEV), ones[1], out_dtype=torch.float32, impl="triton", config=cfg
    )
    assert torch.equal(out.double().cpu(), x.double() @ w.double().T)


@needs_triton
def test_padding_rows_are_masked_where_a_decode_size_tile_is_partial():
    """MASK_M is on when M < BLOCK_M (decode on a 16-row tile: 1.6x faster at one token on an NVIDIA H200) or
    when a decode-size launch (M <= MEDIUM_M) ends in a partial tile; full tiles and prefill launches keep their
    unmasked loads (a prefill's partial last tile clamps its extra rows)."""
    import flatquant.kernels.gemm_w4a4 as g

    rule = g._kernel.values["MASK_M"]
    ms = (1, 15, 16, 17, 32, 40, g.MEDIUM_M, g.MEDIUM_M + 1, 2048, 2049)
    assert [rule({"M": m, "BLOCK_M": 16}) for m in ms] == [True, True, False, True, False, True, False] + [False] * 3
    assert rule({"M": 64, "BLOCK_M": 128}) and not rule({"M": 256, "BLOCK_M": 128})


@needs_triton
@pytest.mark.parametrize(
    "m,n,k,bm,split_k,swap",
    [(5, 70, 1029, 16, 1, True), (16, 130, 512, 16, 2, True), (33, 37, 190, 64, 1, True),
     (40, 70, 1029, 32, 2, False), (100, 37, 600, 64, 4, True)],
)  # fmt: skip
def test_swap_ab_and_split_k_exact_with_zero_point_and_bias(m, n, k, bm, split_k, swap):
    """SWAP_AB (W @ X^T, transposed back in the epilogue) and split-K, in decode (M <= SMALL_M) and batched
    decode (SMALL_M < M <= MEDIUM_M: several row tiles share each slice's partial sums and arrival counters):
    odd N and K, zero point, bias; the counters are back at zero afterwards."""
    import flatquant.kernels.gemm_w4a4 as g

    assert m <= g.MEDIUM_M
    x, w, xs, ws, xz = _operands(m, n, k, asym=True, seed=29 + k)
    cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, SPLIT_K=split_k, SWAP_AB=swap)
    if DEV == "cuda":
        cfg.update(num_warps=4, num_stages=3)
    x, xs, wp, ws, xz = (t.to(DEV) for t in (x, xs, pack_int4(w), ws, xz))
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    out = w4a4_gemm(x, ones_m, wp, ones_n, x_zero=xz, out_dtype=torch.float32, impl="triton", config=cfg)
    assert torch.equal(out.double().cpu(), (x.double() - xz.double()[:, None]).cpu() @ w.double().T)
    bias = torch.randn(n, generator=_gen(30)).to(DEV)
    out = w4a4_gemm(x, xs, wp, ws, bias, xz, out_dtype=torch.float32, impl="triton", config=cfg)
    ref = w4a4_gemm_reference(x, xs, wp, ws, bias, xz, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    if split_k > 1:
        assert int(g._COUNTERS[x.device].abs().sum()) == 0


@needs_triton
def test_split_k_rejected_where_unsupported():
    import flatquant.kernels.gemm_w4a4 as g

    x, w, xs, ws, _ = _operands(g.MEDIUM_M + 1, 8, 64)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=2)
    with pytest.raises(ValueError, match="SPLIT_K=2 needs"):
        w4a4_gemm(x.to(DEV), xs.to(DEV), pack_int4(w).to(DEV), ws.to(DEV), impl="triton", config=cfg)


@needs_triton
def test_fixed_config_keys_and_values_are_checked():
    """A fixed tile config missing a key, with a key the kernel does not take or with a tile that is not a power of
    two stops with an error naming it (instead of a KeyError or a compiler failure)."""
    x, w, xs, ws, _ = _operands(3, 8, 64)
    args = (x.to(DEV), xs.to(DEV), pack_int4(w).to(DEV), ws.to(DEV))
    base = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1)
    for cfg, match in (
        ({k: v for k, v in base.items() if k != "BLOCK_N"}, r"missing \['BLOCK_N'\], unknown \[\]"),
        (dict(base, BLOCK=4), r"unknown \['BLOCK'\]"),
        (dict(base, BLOCK_N=48), "BLOCK_N=48 must be a power of two >= 16"),
        (dict(base, BLOCK_K=16), "BLOCK_K=16 must be a power of two >= 32"),
        (dict(base, GROUP_M=0), "GROUP_M=0"),
        (dict(base, num_warps=3), "num_warps=3"),
        (dict(base, num_stages=0), "num_stages=0"),
    ):
        with pytest.raises(ValueError, match=match):
            w4a4_gemm(*args, impl="triton", config=cfg)
    ones_m, ones_n = torch.ones(3, device=DEV), torch.ones(8, device=DEV)
    out = w4a4_gemm(args[0], ones_m, args[2], ones_n, out_dtype=torch.float32, impl="triton", config=base)
    assert torch.equal(out.double().cpu(), x.double() @ w.double().T)  # the checked config still runs


def test_batched_decode_configs_fit_their_workspace():
    """The autotuned batched-decode launch sizes its partial-sum workspace for MEDIUM_MAX_SPLIT_K slices."""
    import flatquant.kernels.gemm_w4a4 as g

    splits = [c.kwargs["SPLIT_K"] for c in g.MEDIUM_CONFIGS]
    assert max(splits) <= g.MEDIUM_MAX_SPLIT_K <= g.MAX_SPLIT_K and min(splits) == 1
    assert max(c.kwargs["SPLIT_K"] for c in g.SMALL_CONFIGS) <= g.MAX_SPLIT_K


def test_fp8_autotune_configs_keep_k_tiles_exact():
    import flatquant.kernels.gemm_w4a4 as g

    for c in g.LARGE_CONFIGS_FP8 + g.SMALL_CONFIGS_FP8:
        assert c.kwargs["BLOCK_K"] <= g.FP8_MAX_BLOCK_K and c.kwargs["SPLIT_K"] == 1 and not c.kwargs["SWAP_AB"]
        assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128  # 128x256 spills with the fp32 tile sums
    assert len(g.LARGE_CONFIGS_FP8) >= 3


def _config_dict(c):
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


@needs_triton
@pytest.mark.parametrize("which", ["small", "medium", "large"])
def test_every_autotune_candidate_exact(which):
    """The autotuner may pick any candidate on the GPU: each one must give the exact integer sums
    (K = 14336 on the GPU: the long-K case that broke the FP8 path)."""
    import flatquant.kernels.gemm_w4a4 as g

    configs = {"small": g.SMALL_CONFIGS, "medium": g.MEDIUM_CONFIGS, "large": g.LARGE_CONFIGS}[which]
    if DEV == "cuda":
        m, n, k = {"small": 16, "medium": 100, "large": 300}[which], 1024, 14336
    else:  # K: two 256-tiles + a tail
        m, n, k = {"small": 7, "medium": 40, "large": 140}[which], 48, 544
    x, w, _, _, _ = _operands(m, n, k, seed=23)
    xd, wp = x.to(DEV), pack_int4(w).to(DEV)
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    want = x.double() @ w.double().T
    for c in configs:
        out = w4a4_gemm(xd, ones_m, wp, ones_n, out_dtype=torch.float32, impl="triton", config=_config_dict(c))
        assert torch.equal(out.double().cpu(), want), _config_dict(c)


# ----------------------------------------------------------------------------- full shapes on the GPU
@needs_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 16, 256, 2048])
@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096), (4096, 14336), (14336, 4096)])
def test_gpu_full_shapes_exact(m, k, n, path):
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randint(-8, 8, (m, k), generator=g, device="cuda", dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    xin = x.to(torch.float8_e4m3fn) if path == "fp8" else x  # the fast operand of each path
    out = w4a4_gemm(xin, ones_m, pack_int4(w), ones_n, out_dtype=torch.float32, impl="triton", path=path)
    assert torch.equal(out.double(), x.double() @ w.double().T)


@needs_cuda
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 2048])
def test_gpu_extreme_codes_exact(m, path):
    # the largest possible sums: 15 * -8 over K = 14336 (asymmetric codes) and -8 * -8
    k, n = 14336, 4096
    x = torch.full((m, k), 15, device="cuda", dtype=torch.int8)
    w = torch.full((n, k), -8, device="cuda", dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    xin = x.to(torch.float8_e4m3fn) if path == "fp8" else x
    out = w4a4_gemm(xin, ones_m, pack_int4(w), ones_n, out_dtype=torch.float32, impl="triton", path=path)
    assert torch.all(out == -120.0 * k)
    out = w4a4_gemm(-x.clamp(max=8), ones_m, pack_int4(w), ones_n, out_dtype=torch.float32, path=path)
    assert torch.all(out == 64.0 * k)


# -------------------------------------------------------------------------------------------- the layer
def _fake_quant_layer(x, weight, bias, p1, p2, clip, w_clip=1.0):
    """Float64 fake-quant forward: dequantized 4-bit activations (after the transform) and weights.

    The factors are rounded to x.dtype first, as the deployed layer keeps them in the model dtype.
    """
    n1, n2 = p1.shape[0], p2.shape[0]
    p1, p2 = p1.to(x.dtype).double(), p2.to(x.dtype).double()
    xt = (p1.T @ x.double().reshape(-1, n1, n2) @ p2).reshape(x.shape)  # (T, K)
    xs = xt.abs().amax(-1, keepdim=True) * clip / 7
    xq = torch.round(xt / xs).clamp(-8, 7) * xs
    ws = weight.double().abs().amax(-1, keepdim=True) * w_clip / 7
    wq = torch.round(weight.double() / ws).clamp(-8, 7) * ws
    return xq @ wq.T + bias.double()


def _layer_case(seed=0, k=96, n=40, t=7):
    g = _gen(seed)
    n1, n2 = 8, k // 8
    p1 = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0] * 1.5  # invertible, not orthonormal
    p2 = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0]
    weight, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(t, k, generator=g)
    return x, weight, bias, p1, p2


@needs_triton
@pytest.mark.parametrize("act_impl", ["torch", "auto"])
def test_layer_matches_fake_quant(act_impl):
    x, weight, bias, p1, p2 = _layer_case()
    layer = W4A4Linear.from_float(
        weight, bias, p1, p2, act_clip=0.9, out_dtype=torch.float32, act_impl=act_impl, gemm_impl="triton"
    ).to(DEV)
    want = _fake_quant_layer(x, weight, bias, p1, p2, 0.9)
    got = layer(x.to(DEV)).double().cpu()  # fp32 input -> fp32 output
    if act_impl == "torch":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # another kernel's rounding may flip a code at an exact tie: compare by SQNR
        sqnr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
        assert sqnr > 40, f"{sqnr=}"
    y16 = layer(x.to(DEV, torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    want16 = _fake_quant_layer(x.bfloat16(), weight, bias, p1, p2, 0.9)
    sqnr = 10 * torch.log10(want16.pow(2).mean() / (y16.double().cpu() - want16).pow(2).mean())
    assert sqnr > 40, f"{sqnr=}"  # bf16 output rounding (~50 dB) plus rare code flips at ties


@needs_triton
def test_layer_shared_operand_and_leading_dims():
    x, weight, bias, p1, p2 = _layer_case(seed=1, t=6)
    q = W4A4Linear.from_float(weight, bias, p1, p2, act_clip=1.0, act_impl="torch", gemm_impl="triton")
    k = W4A4Linear.from_float(weight[:24], None, p1, p2, act_clip=1.0, act_impl="torch", gemm_impl="triton")
    q, k = q.to(DEV), k.to(DEV)
    xb = x.reshape(2, 3, -1).to(DEV, torch.bfloat16)  # (B, T, K)
    operand = q.quantize_input(xb)  # one transform + quantize for both layers
    assert operand[0].dtype == torch.int8 and operand[0].shape == (2, 3, 96) and operand[1].shape == (2, 3)
    yq, yk = q(operand), k(operand)
    assert yq.shape == (2, 3, 40) and yk.shape == (2, 3, 24) and yq.dtype == torch.bfloat16
    torch.testing.assert_close(yq, q(xb))
    torch.testing.assert_close(yk.float(), (yq.float() - q.bias.float())[..., :24], rtol=1e-2, atol=2e-2)


def test_layer_asymmetric_activations_and_state_dict():
    x, weight, bias, p1, p2 = _layer_case(seed=2)
    layer = W4A4Linear.from_float(
        weight, bias, p1, p2, act_clip=(0.95, 0.9), act_symmetric=False, out_dtype=torch.float32
    )
    codes, scale, zero = layer.quantize_input(x)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    xt = (p1.T @ x.reshape(-1, 8, 12) @ p2).reshape(x.shape)
    deq = (codes.double() - zero.double()[:, None]) * scale.double()[:, None]
    assert (deq - xt.double()).abs().max() <= scale.max() * 0.51 + (xt.abs().max() * 0.1)
    clone = W4A4Linear(96, 40, True, (8, 12), act_symmetric=False, out_dtype=torch.float32)
    clone.load_state_dict(layer.state_dict())
    assert clone.act_clip_max == 0.95 and clone.act_clip_min == 0.9
    torch.testing.assert_close(clone(x), layer(x))


def test_kron_quantize_torch_identity_transform():
    x = torch.randn(3, 16, generator=_gen(7))
    codes, scale = kron_quantize_torch(x, None, None)
    assert torch.equal(codes, torch.round(x / (x.abs().amax(-1, keepdim=True) / 7)).to(torch.int8))
    torch.testing.assert_close(scale, x.abs().amax(-1) / 7)


@needs_triton
@pytest.mark.skipif(DEV == "cuda", reason="the GPU runs the real autotuner (test_gpu_full_shapes_exact)")
def test_autotuned_plumbing_in_interpreter(monkeypatch):
    """The autotuned launch path on CPU (timing replaced by a stub that runs every candidate once): grid from
    each config (split-K's second grid axis included), exact sums from every candidate and from the choice."""
    import triton

    import flatquant.kernels.gemm_w4a4 as g

    def bench(fn, quantiles=None, **kwargs):
        fn()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    try:
        large = triton.autotune(g.LARGE_CONFIGS, key=g._KEY, do_bench=bench)(g._kernel)
        medium = triton.autotune(g.MEDIUM_CONFIGS, key=g._KEY, do_bench=bench)(g._kernel)
        small = triton.autotune(g.SMALL_CONFIGS, key=g._KEY, do_bench=bench)(g._kernel)
    except TypeError:
        pytest.skip("this triton's autotune takes no do_bench")
    monkeypatch.setattr(g, "_large", large)
    monkeypatch.setattr(g, "_medium", medium)
    monkeypatch.setattr(g, "_small", small)
    monkeypatch.setattr(g, "_use_autotuner", lambda group_size: group_size is None)
    for m in (3, 40, 130):  # decode, batched-decode and prefill sets
        x, w, _, _, _ = _operands(m, 36, 200, seed=m)
        ones_m, ones_n = torch.ones(m), torch.ones(36)
        out = g.w4a4_gemm(x, ones_m, pack_int4(w), ones_n, out_dtype=torch.float32, impl="triton")
        assert torch.equal(out.double(), x.double() @ w.double().T)
        assert g.last_config(m) is not None


@needs_cuda
@torch.no_grad()
@pytest.mark.parametrize("path", ["int8", "auto"])  # auto: the dense FP8 path at this size (gemm_dense)
def test_outputs_past_two_to_the_31_elements(path):
    """M x N > 2^31 (a prefill of 64 x 2165 tokens into the fused gate/up of LLaMA-2-7B is 3e9): the row
    offsets must not wrap in int32 (they did: an illegal memory access). The last rows equal the reference."""
    k, n = 64, 22016
    m = 2**31 // n + 64
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8, generator=g)
    w = torch.randint(-8, 8, (n, k), device=DEV, dtype=torch.int8, generator=g)
    xs, ws = torch.rand(m, device=DEV, generator=g), torch.rand(n, device=DEV, generator=g) / 64
    out = w4a4_gemm(x, xs, pack_int4(w), ws, path=path)
    torch.cuda.synchronize()
    tail = slice(m - 80, m)
    want = w4a4_gemm_reference(x[tail], xs[tail], pack_int4(w), ws)
    torch.testing.assert_close(out[tail].float(), want.float(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------- residual
@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "m,n,k,cfg",
    [
        (5, 37, 130, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1)),
        (3, 70, 1029, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=4)),  # the last slice adds it
        (33, 40, 190, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, SWAP_AB=True)),
    ],
)
def test_residual_in_the_epilogue_equals_the_separate_addition(m, n, k, cfg, out_dtype):
    """residual= adds a (strided) residual after the output's rounding, bit for bit ``residual + out`` as the
    decoder layer computes it, in the kernel (plain, split-K, SWAP_AB tiles) and in the reference."""
    x, w, xs, ws, xz = _operands(m, n, k, asym=True, seed=k)
    bias = torch.randn(n, generator=_gen(5)).to(out_dtype)
    args = [t.to(DEV) for t in (x, xs, pack_int4(w), ws, bias, xz)]
    wide = torch.randn(m, n + 9, generator=_gen(6)).to(DEV, out_dtype)
    residual = wide[:, 3 : n + 3]  # a column slice: row stride n + 9
    cfg = dict(cfg, **(dict(num_warps=4, num_stages=3) if DEV == "cuda" else {}))
    for impl, kw in (("triton", dict(config=cfg)), ("reference", {})):
        out = w4a4_gemm(*args, out_dtype=out_dtype, impl=impl, **kw)
        fused = w4a4_gemm(*args, out_dtype=out_dtype, impl=impl, residual=residual, **kw)
        assert torch.equal(fused, residual + out), impl
    with pytest.raises(ValueError, match=rf"residual must be \({m}, {n}\) {out_dtype}"):
        w4a4_gemm(*args, out_dtype=out_dtype, impl="reference", residual=residual[:, :5])


def test_layer_adds_a_residual_of_another_dtype_separately():
    """A W4A4 linear given a residual in another dtype than its output adds it outside the GEMM (same result as
    the addition written out)."""
    lin = W4A4Linear(64, 24, bias=True, transform_sizes=(8, 8), out_dtype=torch.float32, act_impl="torch")
    lin.w_packed.copy_(pack_int4(torch.randint(-8, 8, (24, 64), generator=_gen(8), dtype=torch.int8)))
    x = torch.randn(3, 64, generator=_gen(9))
    res64 = torch.randn(3, 24, generator=_gen(10), dtype=torch.float64)
    torch.testing.assert_close(lin(x, residual=res64), res64 + lin(x), rtol=0, atol=0)
    lin.next_residual = res64.float()
    torch.testing.assert_close(lin(x), res64.float() + lin(x), rtol=0, atol=0)  # handed over once, then gone
    assert lin.next_residual is None


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 2048])
def test_gpu_autotuned_residual_epilogue(m):
    """The autotuner's residual candidates (128 x 128 output tiles at most) at an o_proj shape, bf16 (the INT8
    kernel: from 512 tokens path="auto" takes the dense FP8 path, tests/test_gemm_dense.py)."""
    k = n = 4096
    x, w, xs, ws, _ = _operands(m, n, k, seed=m)
    args = [t.to(DEV) for t in (x, xs, pack_int4(w), ws)]
    residual = torch.randn(m, n, generator=_gen(11)).to(DEV, torch.bfloat16)
    out = w4a4_gemm(*args, out_dtype=torch.bfloat16, path="int8")
    assert torch.equal(w4a4_gemm(*args, out_dtype=torch.bfloat16, residual=residual, path="int8"), residual + out)
