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
    cmd += ["--rope", "128", "--decode", "1", "--silu", "11008", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert {r["kernel"] for r in records} == {"kron_quantize", "rope", "decode_attention", "silu_mul"}
    assert any(not r.get("mma", True) for r in records if r["kernel"] == "decode_attention")  # CUDA-core variant
    bad = [r for r in records if not r["ok"]]
    assert not bad, bad[:3]
