"""Programmatic dependent launch (kernels/pdl.py) and the W4A4 GEMM's L2 weight prefetch.

On the CPU: the switch, the launch options, the prefetch sizes, and the sm_90 builds (Triton's ptxas, no GPU):
every kernel waits for the previous one before it reads an activation, and reads before the wait only what no
kernel writes. On a GPU: a chain of transform + GEMM launches replayed from a CUDA graph with PDL gives the
same bits as the same chain launched one kernel after the other without it.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

try:
    import flatquant  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, SRC)

from flatquant.kernels import gemm_w4a4 as gw  # noqa: E402
from flatquant.kernels import pdl  # noqa: E402


def test_launch_options_pair_the_attribute_with_the_wait():
    assert pdl.launch_options(True) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_options(False) == {"PDL": False}  # no launch attribute without the wait


def test_off_without_a_gpu():
    assert not pdl.pdl_on(torch.zeros(1))


def test_transform_lets_the_next_kernel_launch_early_only_up_to_pdl_early_tokens(monkeypatch):
    from flatquant.kernels import kron_quantize as kq

    assert kq.PDL_EARLY_TOKENS == 64 or "FLATQUANT_PDL_EARLY_TOKENS" in os.environ  # the measured default
    monkeypatch.setattr(kq, "PDL_EARLY_TOKENS", 64)
    assert kq.pdl_early(1) and kq.pdl_early(64) and not kq.pdl_early(65) and not kq.pdl_early(8192)
    monkeypatch.setattr(kq, "PDL_EARLY_TOKENS", 0)
    assert not kq.pdl_early(1)


def test_prefetch_fraction_from_the_environment(monkeypatch):
    monkeypatch.delenv("FLATQUANT_PREFETCH_L2", raising=False)
    assert gw._prefetch_fraction_from_env() == 0.0  # off unless asked for
    monkeypatch.setenv("FLATQUANT_PREFETCH_L2", "0.25")
    assert gw._prefetch_fraction_from_env() == 0.25
    for bad in ("1.5", "-0.1", "half", "nan"):
        monkeypatch.setenv("FLATQUANT_PREFETCH_L2", bad)
        with pytest.raises(ValueError, match=r"FLATQUANT_PREFETCH_L2 must be .*\[0, 1\].*" + repr(bad)):
            gw._prefetch_fraction_from_env()


def test_prefetch_bytes(monkeypatch):
    monkeypatch.setattr(gw, "PREFETCH_L2_FRACTION", 0.5)
    monkeypatch.setitem(gw._L2_BYTES, 0, 50 * 2**20)
    dev = torch.device("cuda", 0)
    small = torch.zeros(4096, 2048, dtype=torch.uint8)  # 8 MiB: every row in full
    assert gw._prefetch_bytes(small, 1, dev, True) == 2048
    assert gw._prefetch_bytes(small, gw.MEDIUM_M, dev, True) == 2048
    assert gw._prefetch_bytes(small, gw.MEDIUM_M + 1, dev, True) == 0  # prefill sizes: no prefetch
    big = torch.zeros(22016, 2048, dtype=torch.uint8)  # 43 MiB: the leading bytes of each row that fit
    want = int(50 * 2**20 * gw.PREFETCH_L2_FRACTION) // 22016 // 16 * 16
    got = gw._prefetch_bytes(big, 1, dev, True)
    assert got == want and got % 16 == 0 and got * 22016 <= 50 * 2**20 * gw.PREFETCH_L2_FRACTION
    assert gw._prefetch_bytes(torch.zeros(64, 2050, dtype=torch.uint8)[:, :2049], 1, dev, True) == 0  # stride not 16x
    assert gw._prefetch_bytes(torch.zeros(64 * 2048 + 8, dtype=torch.uint8)[8:].view(64, 2048), 1, dev, True) == 0
    assert gw._prefetch_bytes(small, 1, dev, False) == 0  # a launch without PDL
    monkeypatch.setattr(gw, "PREFETCH_L2_FRACTION", 0.0)  # the default: no prefetch
    assert gw._prefetch_bytes(small, 1, dev, True) == 0


_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import sm90_report as r
from flatquant.kernels import gemm_w4a4 as gw, kron_quantize as kq, kv_quant as kv, rmsnorm as rn, silu_mul as sm
from flatquant.kernels import rows_matmul as rm

def ptx(fn, types, const, pdl, **opts):
    names = r._jit(fn).arg_names
    sig = {n: types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names if n not in const}
    sig |= {k: types[k] for k in types if k in names}
    return r.compile_sm90(fn, sig, {**const, "PDL": pdl}, [], dict(num_warps=4, **opts)).asm["ptx"]

def lines(text):
    keep = ("griddepcontrol.wait", "griddepcontrol.launch_dependents", "cp.async.bulk.prefetch", "ld.global",
            "cp.async.cg", "cp.async.ca", "ld.shared", "st.global")
    return [next(k for k in keep if k in l) for l in text.splitlines() if any(k in l for k in keep)]

out = {}
g = gw.SMALL_CONFIGS[-2]  # split-K 8: the counters are read after the wait too
gconst = dict(HAS_ZERO=False, HAS_BIAS=False, HAS_GROUP=False, HAS_RES=True, USE_FP8=False, X_FP8=False, USE_ASM=True,
              EVEN_K=True, MASK_M=True, **g.kwargs, PREFETCH=True)
gtypes = {"x_ptr": "*i8", "w_ptr": "*u8", "out_ptr": "*bf16", "res_ptr": "*bf16", "part_ptr": "*i32", "cnt_ptr": "*i32"}
for on in (True, False):
    out[f"gemm-{on}"] = lines(ptx(gw._w4a4_gemm_kernel, gtypes, gconst, on, num_stages=g.num_stages))
from flatquant.kernels import gemv_w4a4 as gv
c = next(c for c in gv.CONFIGS if c.kwargs["BLOCK_KW0"] > c.kwargs["BLOCK_KW"])  # a long head, read before the wait
vconst = dict(HAS_ZERO=False, HAS_BIAS=False, HAS_RES=True, USE_ASM=True, FULL_HEAD=True, ALIGN=4, BLOCK_M=1,
              **c.kwargs, PREFETCH=True)
vtypes = {"x_ptr": "*i64", "w_ptr": "*i32", "out_ptr": "*bf16", "res_ptr": "*bf16", "part_ptr": "*i32",
          "cnt_ptr": "*i32"}
out["gemv"] = lines(ptx(gv._w4a4_gemv_kernel, vtypes, vconst, True, num_stages=1))
kconst = dict(N1=64, N2=64, BN1=64, BN2=64, HAS_P1=True, HAS_P2=True, SPLIT_Y=True, SYMMETRIC=True, BITS=4, PACK=False,
              INTERPRET=False, RECIP=True, NORM=True, BLOCK_T=1, PROGS_PER_SM=1, P1_FIRST=0, FAST_DIV=0, BC=64)
ktypes = {"x_ptr": "*bf16", "p1_ptr": "*bf16", "p2_ptr": "*bf16", "nw_ptr": "*bf16", "q_ptr": "*i8",
          "clip_max": "fp32", "clip_min": "fp32", "inv_qmax": "fp32", "eps": "fp32"}
out["kron"] = lines(ptx(kq._kron_quantize_kernel, ktypes, {**kconst, "PDL_EARLY": True}, True, num_stages=1))
out["kron-late"] = lines(ptx(kq._kron_quantize_kernel, ktypes, {**kconst, "PDL_EARLY": False}, True, num_stages=1))
out["silu"] = lines(ptx(sm._silu_mul_kernel, dict.fromkeys(["g_ptr", "u_ptr", "out_ptr"], "*bf16"),
                        dict(BLOCK_R=1, BLOCK_C=1024, INTERPRET=False), True))
out["rmsnorm"] = lines(ptx(rn._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32"},
                           dict(D=4096, BLOCK_D=4096, BLOCK_R=1, INTERPRET=False), True))
qtypes = {"x_ptr": "*bf16", "code_ptr": "*u8", "deq_ptr": "*bf16", "pos_ptr": "*i32", "t_ptr": "*bf16",
          "clip_max": "fp32", "clip_min": "fp32", "inv_qmax": "fp32"}
out["quantize_kv"] = lines(ptx(kv._quantize_kv_kernel, qtypes, dict(D=128, BLOCK_R=16, BLOCK_D=128, BITS=4, PACK=True,
                               RECIP=True, DEQ=False, POS=True, TRANSFORM=False, INTERPRET=False), True))
atypes = {"k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*u8", "vc_ptr": "*u8", "pos_ptr": "*i32", "t_ptr": "*bf16"}
atypes |= dict.fromkeys(["k_clip_max", "k_clip_min", "v_clip_max", "v_clip_min", "inv_qmax"], "fp32")
out["append_kv"] = lines(ptx(kv._append_kv_kernel, atypes, dict(D=128, BLOCK_R=16, BLOCK_D=128, BITS=4, PACK=True,
                             RECIP=True, TRANSFORM=True, INTERPRET=False), True))
out["merge"] = lines(ptx(kv._decode_merge_kernel, {"out_ptr": "*bf16"},
                         dict(HQ=32, D=128, BLOCK_S=8, BLOCK_D=128, INTERPRET=False), True))
out["rows_matmul"] = lines(ptx(rm._rows_matmul_kernel, {"x_ptr": "*bf16", "m_ptr": "*bf16", "o_ptr": "*bf16"},
                              dict(D=128, BLOCK_R=16, INTERPRET=False), True))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sm90_events():
    """Per kernel, its global loads, stores, prefetches and grid dependency instructions in PTX order (sm_90)."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    args = [sys.executable, "-c", _PROBE, SRC, os.path.join(ROOT, "benchmarks")]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _reads(events: list[str]) -> list[int]:
    return [i for i, e in enumerate(events) if e in ("ld.global", "cp.async.cg", "cp.async.ca")]


def test_sm90_gemm_prefetches_weights_then_waits_before_any_load(sm90_events):
    ev = sm90_events["gemm-True"]
    wait = ev.index("griddepcontrol.wait")
    assert ev.index("cp.async.bulk.prefetch") < wait < ev.index("griddepcontrol.launch_dependents")
    assert _reads(ev) and min(_reads(ev)) > wait  # activations, weights, split-K partials and counters: after
    off = sm90_events["gemm-False"]
    assert not any(e.startswith("griddepcontrol") for e in off)  # PDL off: no grid dependency code at all


def test_sm90_decode_gemv_prefetches_and_reads_its_head_before_the_wait(sm90_events):
    """The CUDA-core decode GEMM: the L2 prefetch of its weight rows and the head's weight loads come before the
    wait; the activation codes, every later step and all stores after it."""
    ev = sm90_events["gemv"]
    wait = ev.index("griddepcontrol.wait")
    reads = _reads(ev)
    assert ev.index("cp.async.bulk.prefetch") < wait
    assert min(reads) < wait < max(reads)
    assert min(i for i, e in enumerate(ev) if e == "st.global") > wait


def test_sm90_transform_loads_factors_before_the_wait_and_tokens_after(sm90_events):
    ev = sm90_events["kron"]
    wait = ev.index("griddepcontrol.wait")
    reads = _reads(ev)
    assert min(reads) < wait < max(reads)  # P1, P2, the norm weight before; the token rows after
    assert min(i for i, e in enumerate(ev) if e == "st.global") > wait


def test_sm90_transform_with_a_late_trigger_waits_and_leaves_the_launch_to_its_exit(sm90_events):
    early, late = sm90_events["kron"], sm90_events["kron-late"]
    assert early.index("griddepcontrol.wait") < early.index("griddepcontrol.launch_dependents")
    assert "griddepcontrol.wait" in late and "griddepcontrol.launch_dependents" not in late
    wait = late.index("griddepcontrol.wait")
    assert min(i for i, e in enumerate(late) if e == "st.global") > wait


def test_sm90_query_transform_loads_its_matrix_before_the_wait_and_rows_after(sm90_events):
    ev = sm90_events["rows_matmul"]
    wait = ev.index("griddepcontrol.wait")
    reads = _reads(ev)
    assert min(reads) < wait < max(reads)  # P_h^-T before; the query rows after
    assert min(i for i, e in enumerate(ev) if e == "st.global") > wait


@pytest.mark.parametrize("kernel", ["silu", "rmsnorm", "quantize_kv", "append_kv", "merge"])
def test_sm90_kernels_wait_before_their_first_read(sm90_events, kernel):
    ev = sm90_events[kernel]
    wait = ev.index("griddepcontrol.wait")
    assert wait < ev.index("griddepcontrol.launch_dependents")
    assert _reads(ev) and min(_reads(ev)) > wait


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or not pdl.triton_has_pdl(),
    reason="needs a GPU of compute capability 9.0+ and a Triton with grid dependency control",
)


@needs_hopper
@pytest.mark.parametrize("prefetch", [0.0, 0.5])
@pytest.mark.parametrize("tokens", [1, 16, 64, 128])  # 128: the transform's late trigger (PDL_EARLY_TOKENS)
def test_gpu_graph_chain_with_pdl_equals_serial_launches(monkeypatch, tokens, prefetch):
    """Eight layers of RMSNorm + transform + quantize, then the GEMM with its residual (split-K at decode sizes):
    each launch reads what the previous one wrote. Replayed from a CUDA graph with PDL (with and without the
    weight prefetch) against the same launches without PDL: equal bit for bit, over several replays."""
    monkeypatch.setattr(gw, "PREFETCH_L2_FRACTION", prefetch)
    from flatquant.kernels.kron_quantize import kron_quantize

    g = torch.Generator(device="cuda").manual_seed(tokens)
    n1, n2, layers = 64, 64, 8
    n = n1 * n2
    p1 = [torch.randn(n1, n1, generator=g, device="cuda").div(n1**0.5).bfloat16() for _ in range(layers)]
    p2 = [torch.randn(n2, n2, generator=g, device="cuda").div(n2**0.5).bfloat16() for _ in range(layers)]
    nw = [torch.rand(n, generator=g, device="cuda").add(0.5).bfloat16() for _ in range(layers)]
    w = [gw.pack_int4(torch.randint(-8, 8, (n, n), generator=g, device="cuda")) for _ in range(layers)]
    ws = [torch.rand(n, generator=g, device="cuda").mul(0.02) for _ in range(layers)]
    x0 = torch.randn(tokens, n, generator=g, device="cuda").bfloat16()

    def chain(x):
        for i in range(layers):
            q = kron_quantize(x, p1[i], p2[i], 0.9, 0.9, norm=(nw[i], 1e-5))
            x = gw.w4a4_gemm(q.codes, q.scale, w[i], ws[i], residual=x)
        return x

    monkeypatch.setattr(pdl, "ENABLED", False)
    want = chain(x0.clone())
    torch.cuda.synchronize()
    monkeypatch.setattr(pdl, "ENABLED", True)
    static = x0.clone()
    chain(static)  # tune and compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(static)
    for _ in range(3):
        got.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
