"""Smoke tests of benchmark scripts in their --quick mode (tiny models on the CPU): they run and write records."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_quick_writes_prefill_and_decode_records_with_graphed_decode(tmp_path):
    out = tmp_path / "e2e.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "e2e.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    records = data["records"] if isinstance(data, dict) else data
    phases = {r["phase"] for r in records}
    assert phases == {"prefill", "decode"}
    for r in records:
        assert r["bf16_ms"] > 0 and r["w4a4_ms"] > 0 and r["weights_bytes_bf16"] > 3 * r["weights_bytes_w4a4"]
        if r["phase"] == "decode":  # the static-cache paths ran (eagerly: no CUDA graphs on the CPU)
            assert r["bf16_graphed_ms"] > 0 and r["w4a4_graphed_ms"] > 0
            assert r["kv_bytes_bf16"] > 3 * r["kv_bytes_w4a4"]
