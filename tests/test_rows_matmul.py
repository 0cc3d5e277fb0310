"""The decode step's query transform (rows x one square matrix) as a PDL-launched Triton kernel.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, small shapes).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
try:
    import flatquant  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, SRC)

from flatquant.kernels import kv_quant as kv  # noqa: E402
from flatquant.kernels import rows_matmul as rm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    rm.triton is None or (DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="triton missing, or no GPU and not interpreted",
)
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def _within_one_ulp(out: torch.Tensor, exact: torch.Tensor) -> None:
    """out (16-bit) is the float64 value rounded to the dtype, or its neighbour (fp32 sums in another order)."""
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-3))) - MANTISSA[out.dtype])
    err = (out.double() - exact).abs()
    assert (err <= ulp).all(), f"{int((err > ulp).sum())} results more than one ulp off (max {float(err.max())})"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 16), (7, 64), (33, 128), (300, 32)])
def test_rows_times_the_matrix_within_one_ulp_of_float64(dtype, rows, d):
    g = torch.Generator().manual_seed(rows * d)
    x = torch.randn(rows, d, generator=g).to(dtype)
    m = (torch.randn(d, d, generator=g) / d**0.5).to(dtype)
    out = rm.rows_matmul_triton(x.to(DEV), m.to(DEV)).cpu()
    assert out.dtype == dtype and out.shape == (rows, d)
    _within_one_ulp(out, x.double() @ m.double())
    # and the PyTorch matmul it replaces agrees to the same bound
    _within_one_ulp(rm.rows_matmul_reference(x, m), x.double() @ m.double())


@needs_kernel
def test_query_shaped_and_strided_input_keeps_its_shape():
    """The decode step's queries: (B, H, D), a view of (B, 1, H, D) memory; a transposed (non-contiguous) view too."""
    g = torch.Generator().manual_seed(0)
    q4 = torch.randn(3, 1, 5, 64, generator=g).bfloat16()
    m = (torch.randn(64, 64, generator=g) / 8).bfloat16()
    q = q4.transpose(1, 2)[:, :, 0]  # (3, 5, 64)
    out = rm.rows_matmul_triton(q.to(DEV), m.to(DEV)).cpu()
    assert out.shape == (3, 5, 64)
    _within_one_ulp(out, q.double() @ m.double())
    qt = torch.randn(64, 6, generator=g).bfloat16().t()  # (6, 64) with row stride 1
    _within_one_ulp(rm.rows_matmul_triton(qt.to(DEV), m.to(DEV)).cpu(), qt.double() @ m.double())


@needs_kernel
def test_decode_attention_with_the_query_kernel_matches_the_reference(monkeypatch):
    """decode_attention's Triton path with FLATQUANT_QUERY_KERNEL on (the queries' P_h^-T in the kernel above)
    gives the reference's output (PyTorch matmul, dequantized cache, fp32 softmax) to rounding."""
    monkeypatch.setattr(rm, "USE_KERNEL", True)
    calls = []
    real = rm.rows_matmul_triton
    monkeypatch.setattr(rm, "rows_matmul_triton", lambda x, m: calls.append(x.shape) or real(x, m))
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, s_cap, d = 2, 4, 2, 40, 32
    k = torch.randn(b, hkv, s_cap, d, generator=g)
    v = torch.randn(b, hkv, s_cap, d, generator=g)
    kq = [t.to(DEV) for t in kv.quantize_kv(k, 4, 1.0, 1.0, impl="torch")]
    vq = [t.to(DEV) for t in kv.quantize_kv(v, 4, 1.0, 1.0, impl="torch")]
    q = torch.randn(b, hq, d, generator=g).bfloat16().to(DEV)
    t = (torch.randn(d, d, generator=g) / d**0.5).bfloat16().to(DEV)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=DEV)
    out = kv.decode_attention_triton(q, *kq, *vq, lens, d**-0.5, q_transform=t, config={"mma": False})
    ref = kv.decode_attention_reference(q, *kq, *vq, lens, d**-0.5, q_transform=t)
    assert calls == [(b, hq, d)]
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
def test_where_the_kernel_does_not_apply_it_says_why():
    x = torch.zeros(4, 80, dtype=torch.bfloat16, device=DEV)
    assert "power of two in [16, 256], got 80" in rm.applies(x, torch.zeros(80, 80, device=DEV))
    assert "m must be (80, 80)" in rm.applies(x, torch.zeros(64, 64, device=DEV))
    assert "bfloat16 or float16, got torch.float32" in rm.applies(x.float(), torch.zeros(80, 80, device=DEV))
    assert rm.applies(x[:, :64], torch.zeros(64, 64, device=DEV)) is None
    with pytest.raises(RuntimeError, match="power of two"):
        rm.rows_matmul_triton(x, torch.zeros(80, 80, device=DEV))
    with pytest.raises(ValueError, match="impl must be"):
        rm.rows_matmul(x, torch.zeros(80, 80, device=DEV), impl="cuda")


def test_auto_takes_pytorch_matmul_unless_switched_on_and_applicable(monkeypatch):
    calls = []
    monkeypatch.setattr(rm, "rows_matmul_triton", lambda x, m: calls.append(x.shape) or x @ m)
    x, m = torch.ones(2, 80, dtype=torch.bfloat16), torch.eye(80, dtype=torch.bfloat16)
    monkeypatch.setattr(rm, "USE_KERNEL", False)
    assert torch.equal(rm.rows_matmul(x, m), x) and calls == []
    monkeypatch.setattr(rm, "USE_KERNEL", True)
    assert torch.equal(rm.rows_matmul(x, m), x) and calls == []  # head dim 80: not a power of two
    if rm.applies(x[:, :64], m[:64, :64]) is None:
        rm.rows_matmul(x[:, :64], m[:64, :64])
        assert calls == [(2, 64)]
