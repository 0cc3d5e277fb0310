"""The Hopper kernels build for sm_90 with no register spills and within shared memory: Triton's bundled
ptxas compiles them on the CPU (no GPU needed), so a kernel change that only a GPU run would show as a compile
error or a spill (slow) is caught here. A subset of benchmarks/sm90_report.py, which covers every candidate."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_build_for_sm90_without_spills(tmp_path):
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    out = tmp_path / "sm90.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sm90_report.py"), "--kron", "86x128", "--gemm", ""]
    cmd += ["--rope", "128", "--decode", "1", "--silu", "11008", "--int8-head", "128", "--query", "128", "--gemv", "4"]
    cmd += ["--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    kernels = {"kron_quantize", "kron_quantize_pieces", "rope", "decode_attention", "silu_mul", "int8_head"}
    kernels |= {"w4a4_gemv"}
    assert {r["kernel"] for r in records} == kernels | {"query_transform", "dense_unpack"}
    # the transform kernels also build with e4m3 codes (the dense FP8 GEMM path's operand), in both token buckets,
    # symmetric and asymmetric (centred codes)
    e4m3 = {(r["kernel"], r["bucket"], r["symmetric"]) for r in records if r.get("codes") == "e4m3"}
    kinds = ("kron_quantize", "kron_quantize_pieces")
    assert e4m3 == {(k, b, sym) for k in kinds for b in (0, 1) for sym in (True, False)}
    capped = [r for r in records if r.get("maxnreg")]  # two programs per SM: the cap holds, spills allowed
    assert {r["kernel"] for r in capped} == {"kron_quantize", "kron_quantize_pieces"}
    assert all(r["regs"] <= r["maxnreg"] for r in capped)
    assert any(not r.get("mma", True) for r in records if r["kernel"] == "decode_attention")  # CUDA-core variant
    bad = [r for r in records if not r["ok"]]
    assert not bad, bad[:3]
    # the CUDA-core decode GEMM: dp4a, no tensor cores, the candidates kept for four tokens (none spills)
    gemv = [r for r in records if r["kernel"] == "w4a4_gemv"]
    assert len(gemv) >= 10 and all(r["wgmma"] == r["mma_sync"] == 0 for r in gemv)
    records = [r for r in records if r["kernel"] != "dense_unpack"]  # launched without PDL (before cuBLAS)
    # built as sm_90 launches them: every kernel waits for the previous one and lets the next one launch right
    # after, except the transform above 64 tokens (bucket 1: as its programs exit, kron_quantize.PDL_EARLY_TOKENS)
    assert all(r["pdl"] for r in records)
    late = [r for r in records if r["kernel"].startswith("kron_quantize") and r["bucket"] == 1]
    assert late and not any(r["pdl_early"] for r in late)
    assert all(r["pdl_early"] for r in records if r not in late)
    # the two-pass one-row loop (scores, then values) has no block barrier in either of its two loops and writes
    # the scores from inside one of them; the one-pass loop it replaces reduces over the block's tokens (barriers)
    decode = [r for r in records if r["kernel"] == "decode_attention" and r.get("flat")]
    two_pass = [r for r in decode if r["two_pass"]]
    assert two_pass and all(r["loop_barriers"][:2] == [0, 0] and sum(r["loop_stores"][:2]) >= 1 for r in two_pass)
    assert all(r["loop_barriers"][0] > 0 for r in decode if not r["two_pass"])
    # the tensor-core loop in two passes keeps only its operand staging's barriers (no maximum over the warps)
    tiles = [
        r
        for r in records
        if r["kernel"] == "decode_attention" and r["mma"] and (r["block_n"], r["num_warps"]) == (64, 4)
    ]
    one, two = [r for r in tiles if not r["two_pass"]], [r for r in tiles if r["two_pass"]]
    assert one and two and max(max(r["loop_barriers"][:2]) for r in two) < min(r["loop_barriers"][0] for r in one)
    assert all(sum(r["loop_stores"][:2]) >= 1 for r in two)  # the scores, written inside pass 1


PROBE = """
import re, sys
sys.path.insert(0, sys.argv[1])
import triton, triton.language as tl
import sm90_report as r
from flatquant.kernels import kv_quant as kv

@triton.jit
def probe(p_ptr, lo_ptr, hi_ptr):
    i = tl.arange(0, 128)  # one warp: four consecutive bytes per thread, one 32-bit register
    lo, hi = kv._unpack_biased_f32(tl.load(p_ptr + i), False, True)
    tl.store(lo_ptr + i, lo)
    tl.store(hi_ptr + i, hi)

sig = {"p_ptr": "*u8", "lo_ptr": "*fp32", "hi_ptr": "*fp32"}
ptx = r.compile_sm90(probe, sig, {}, list(sig), dict(num_warps=1)).asm["ptx"]
asm = re.search(r"\\{ \\.reg \\.b32 l, h;(.*?)\\}", ptx).group(1)
outs = re.findall(r"prmt\\.b32 (%r\\d+),", asm)
stores = re.findall(r"st\\.global\\.v4\\.b32 \\[[^]]*\\], \\{ ([^}]*) \\}", ptx)
print(" ".join(outs))
print("|".join(s.replace(" ", "") for s in stores))
"""


def test_fp32_unpack_outputs_are_the_registers_triton_stores_in_order(tmp_path):
    """The fp32 unpacking PTX of the decode loop writes byte i's low nibble to output register i and its high
    nibble to register 4 + i (what the PTX emulator test checks); Triton must read them back in that order:
    element i of the first result = asm register i, of the second = register 4 + i. Checked on the sm_90 PTX
    of a probe kernel that stores both results."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "benchmarks")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    outs, stores = run.stdout.split("\n")[:2]
    outs = outs.split()
    assert len(outs) == 8
    assert stores.split("|") == [",".join(outs[:4]), ",".join(outs[4:])]
