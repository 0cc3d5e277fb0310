"""Smoke tests of benchmark scripts in their --quick mode (tiny models on the CPU): they run and write records."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick_output(script: str, tmp_path, *extra: str):
    """Run ``benchmarks/<script> --quick [extra]`` in a fresh interpreter; the JSON it wrote."""
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _quick_records(script: str, tmp_path) -> list[dict]:
    """The records ``benchmarks/<script> --quick`` wrote."""
    data = _quick_output(script, tmp_path)
    return data["records"] if isinstance(data, dict) else data


def test_e2e_quick_writes_prefill_and_decode_records_with_graphed_decode(tmp_path):
    data = _quick_output("e2e.py", tmp_path)
    records = data["records"]
    env = {k: v for k, v in os.environ.items() if k.startswith("FLATQUANT_")}
    env.setdefault("FLATQUANT_AUTOTUNE_CACHE", "0")  # the benchmark's own default: tune afresh
    assert data["env"] == env  # the switches in force are part of the results
    parts = data["breakdown"]["tiny-llama"]
    graphs = {"prefill-graph", "decode-graph", "decode-graph-serial"}
    assert set(parts["w4a4"]) == {"prefill", "decode", *graphs} and set(parts["bf16"]) == {"prefill", "decode"}
    assert parts["w4a4"]["decode-graph"]["pdl"] is False  # no PDL off CUDA; on CUDA the as-served capture has it
    assert parts["w4a4"]["decode-graph-serial"]["ms"]["gemm"] > 0 and parts["w4a4"]["decode-graph"]["steps"] == 4
    assert parts["w4a4"]["prefill-graph"]["ms"]["gemm"] > 0
    for r in records:  # against the faster BF16 run
        best = min(r["bf16_ms"], r["bf16_graphed_ms"])
        assert r["speedup_best_bf16"] == pytest.approx(best / r["w4a4_graphed_ms"])
    phases = {r["phase"] for r in records}
    assert phases == {"prefill", "decode"}
    for r in records:
        assert r["bf16_ms"] > 0 and r["w4a4_ms"] > 0 and r["weights_bytes_bf16"] > 3 * r["weights_bytes_w4a4"]
        # the static-cache paths ran (eagerly: no CUDA graphs on the CPU), prefill and decode
        assert r["bf16_graphed_ms"] > 0 and r["w4a4_graphed_ms"] > 0 and r["w4a4_graphed_is_graph"] is False
        if r["phase"] == "decode":
            assert r["kv_bytes_bf16"] > 3 * r["kv_bytes_w4a4"]


def test_e2e_decode_only_with_random_cache_contents(tmp_path):
    """--decode-fill random writes the prompt's cache positions directly (no prefill) for every decode run of
    both models; the steps still run and the cache sizes are those of a filled cache."""
    data = _quick_output("e2e.py", tmp_path, "--prefill-batches", "--no-breakdown", "--decode-fill", "random")
    records = data["records"]
    assert data["settings"]["decode_fill"] == "random" and not any(data["breakdown"]["tiny-llama"].values())
    assert [r["phase"] for r in records] == ["decode", "decode"]
    for r in records:
        assert r["bf16_ms"] > 0 and r["w4a4_ms"] > 0 and r["bf16_graphed_ms"] > 0 and r["w4a4_graphed_ms"] > 0
        assert r["kv_bytes_bf16"] > 3 * r["kv_bytes_w4a4"] > 0


def test_e2e_breakdown_of_the_decode_phase_alone(tmp_path):
    """--breakdown-phases decode profiles the decode steps (eager, and replayed from graphs with and without
    programmatic dependent launch) and no prefill."""
    args = ("--prefill-batches", "--decode-batches", "1", "--breakdown-phases", "decode", "--decode-fill", "random")
    parts = _quick_output("e2e.py", tmp_path, *args)["breakdown"]["tiny-llama"]
    assert set(parts["w4a4"]) == {"decode", "decode-graph", "decode-graph-serial"} and set(parts["bf16"]) == {"decode"}
    for p in parts["w4a4"].values():
        assert p["batch"] == 4 and p["steps"] == 4 and p["ms"]["gemm"] > 0
        assert p["launches_per_layer_step"]["gemm"] == parts["w4a4"]["decode"]["launches_per_layer_step"]["gemm"]


def test_e2e_asymmetric_activations_build_an_asymmetric_runtime(tmp_path):
    """--act-asymmetric times the packed runtime with per-token asymmetric activations (as ``--preset accurate``
    calibrates): every W4A4 linear quantizes asymmetrically, the run records the setting, and it runs."""
    spec = importlib.util.spec_from_file_location("e2e_bench", os.path.join(ROOT, "benchmarks", "e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    for sym in (True, False):
        model = e2e.w4a4_model(e2e.QUICK["tiny-llama"], "cpu", torch.float32, act_symmetric=sym)
        flags = {m.act_symmetric for m in model.modules() if hasattr(m, "act_symmetric")}
        assert flags == {sym}
    out = tmp_path / "e2e.json"
    e2e.main(["--quick", "--out", str(out), "--act-asymmetric", "--kinds", "w4a4", "--decode-batches", "1",
              "--prefill-batches", "1", "--no-breakdown"])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["settings"]["act_asymmetric"] is True
    assert all(r["w4a4_ms"] > 0 for r in data["records"])


def test_e2e_saves_what_it_measured_when_a_model_fails(tmp_path, monkeypatch):
    """A failure that is not out-of-memory (on a GPU, a faulting kernel leaves the device unusable) stops the run,
    but the records measured before it are written, with the failure named, and the exit says so."""
    spec = importlib.util.spec_from_file_location("e2e_bench", os.path.join(ROOT, "benchmarks", "e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    real_decode = e2e.decode

    def decode(model, kind, *args):
        if kind == "w4a4":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_decode(model, kind, *args)

    monkeypatch.setattr(e2e, "decode", decode)
    out = tmp_path / "e2e.json"
    with pytest.raises(SystemExit, match="illegal memory access"):
        e2e.main(["--quick", "--out", str(out), "--prefill-batches", "1", "--decode-batches", "1"])
    data = json.loads(out.read_text())
    assert "illegal memory access" in data["stopped"]
    by_phase = {r["phase"]: r for r in data["records"]}
    assert by_phase["prefill"]["bf16_ms"] > 0 and by_phase["prefill"]["w4a4_ms"] > 0  # measured before the failure
    assert by_phase["decode"]["bf16_ms"] > 0 and by_phase["decode"]["w4a4_ms"] is None
    assert "illegal memory access" in by_phase["decode"]["note"]


@pytest.mark.parametrize("rows", ["masked", "clamped"])
def test_decode_tiles_quick_times_each_candidate_of_every_layer_gemm(tmp_path, rows):
    data = _quick_output("decode_tiles.py", tmp_path, "--rows", rows)
    assert data["rows"] == rows
    records = data["records"]
    assert [(r["layer"], r["residual"]) for r in records] == [
        ("qkv", False),
        ("o", True),
        ("gate_up", False),
        ("down", True),
    ]
    for r in records:
        assert len(r["candidates"]) == 2 and all(c["us"] > 0 for c in r["candidates"])
        assert r["best_us"] == min(c["us"] for c in r["candidates"])
        assert r["best_config"] in [c["config"] for c in r["candidates"]]
    qkv = records[0]
    assert (qkv["K"], qkv["N"]) == (64, 64 + 2 * 2 * 16)  # hidden + 2 x KV heads x head dim


def test_decode_tiles_quick_times_the_cuda_core_candidates_alone_and_after_the_transform(tmp_path):
    data = _quick_output("decode_tiles.py", tmp_path, "--path", "gemv")
    assert data["path"] == "gemv"
    records = data["records"]
    assert [r["layer"] for r in records] == ["qkv", "o", "gate_up", "down"]
    for r in records:
        cands = r["candidates"]
        assert len(cands) == 2 and all(c["us"] > 0 and c["layer_us"] > 0 and "error" not in c for c in cands)
        assert all(c["config"]["BLOCK_KW0"] >= c["config"]["BLOCK_KW"] for c in cands)
        assert r["best_us"] == min(c["us"] for c in cands)
        assert r["best_layer_us"] == min(c["layer_us"] for c in cands)
        assert r["best_config_layer_us"] == next(c["layer_us"] for c in cands if c["config"] == r["best_config"])
        assert r["transform_us"] > 0


def test_kron_quantize_quick_writes_records_naming_their_timing(tmp_path):
    records = _quick_records("kron_quantize.py", tmp_path)
    assert {r["tokens"] for r in records} == {1, 16, 67}
    for r in records:
        assert r["kernel_us"] > 0 and r["gemm_bf16_us"] > 0 and r["input_copies"] >= 1
        assert r["timing"].startswith("wall clock") and "do_bench" not in r["timing"]
    # the 40 x 128 toy shape runs the pieces kernel and times the padded tile beside it
    pieces = [r for r in records if (r["n1"], r["n2"]) == (40, 128)]
    assert len(pieces) == 3 and all(r["kernel_path"] == "pieces" and r["kernel_padded_us"] > 0 for r in pieces)
    assert all(r["kernel_path"] == "padded" and "kernel_padded_us" not in r for r in records if r not in pieces)


def test_kron_quantize_quick_filters_hidden_sizes_and_token_counts(tmp_path):
    records = _quick_output("kron_quantize.py", tmp_path, "--hidden", "256", "--tokens", "16")["records"]
    assert [(r["n"], r["tokens"]) for r in records] == [(256, 16)]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "kron_quantize.py"), "--quick", "--tokens", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--tokens [2]: not among" in proc.stderr


def test_kron_tokens_quick_times_every_candidate_of_both_paths(tmp_path):
    from flatquant.kernels import kron_quantize as kq

    data = _quick_output("kron_tokens.py", tmp_path, "--hidden", "256", "--tokens", "3", "--pdl-early-tokens", "0")
    assert data["pdl_early_tokens"] == 0
    (layer,) = data["layers"]  # the layer table's code path on the CPU (reference ops): 256 -> 64 at 3 tokens
    assert (layer["K"], layer["N"], layer["M"]) == (256, 64, 3)
    assert all(layer[k] > 0 for k in ("bf16_us", "layer_us", "transform_us", "gemm_us"))
    assert layer["layer_minus_parts_us"] == round(layer["layer_us"] - layer["transform_us"] - layer["gemm_us"], 2)
    (rec,) = data["records"]
    assert (rec["n"], rec["tokens"], rec["bucket"]) == (256, 3, 0)
    want = [("latency", c) for c in kq.candidate_configs(16, 16, 0)] + [
        ("throughput", c) for c in kq.candidate_configs(16, 16, 1)
    ]
    got = [(c["path"], c["config"]) for c in rec["configs"]]
    assert got == [(p, {k: v for k, v in c.items() if v is not None}) for p, c in want]
    assert all(c["us"] > 0 and c["code_mismatch"] < 0.01 for c in rec["configs"])
    assert rec["best_latency_us"] == min(c["us"] for c in rec["configs"] if c["path"] == "latency")
    assert rec["tuned_us"] > 0


def test_dense_crossover_quick_checks_exactness_and_times_both_paths(tmp_path):
    data = _quick_output("dense_crossover.py", tmp_path, "--tokens", "5")
    assert {(r["K"], r["codes"], r["use_fast_accum"]) for r in data["exactness"]} == {
        (k, c, f)
        for k in (64, 160)
        for c in ("random", "largest", "centred-random", "centred-largest")
        for f in (False, True)
    }
    assert all(r["exact"] for r in data["exactness"] if not r["use_fast_accum"])
    recs = data["records"]
    assert [(r["K"], r["N"], r["M"]) for r in recs] == [(96, 32, 5), (160, 32, 5), (96, 48, 5)]
    for r in recs:
        assert all(r[k] > 0 for k in ("bf16_us", "int8_us", "dense_us"))
        assert ("dense_residual_us" in r) == (r["N"] == 32)  # the residual rows: the first shape's N


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), os.path.join(ROOT, "benchmarks", script))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_suite_assigns_longest_first_to_the_least_loaded_gpu():
    suite = _load("gpu_suite.py")
    jobs = [suite.Job(n, [], m) for n, m in (("a", 1), ("b", 6), ("c", 3), ("d", 6), ("e", 2))]
    queues = suite.assign(jobs, 2)
    assert [[j.name for j in q] for q in queues] == [["b", "c"], ["d", "e", "a"]]  # loads 9 and 9
    assert sorted(j.name for q in suite.assign(jobs, 9) for j in q) == list("abcde")
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        suite.assign(jobs, 0)
    # jobs that share a GPU fill one up to their share before the next GPU is taken
    shared = [suite.Job(f"s{i}", [], 8, share=2) for i in range(4)] + [suite.Job("x", [], 6), suite.Job("y", [], 6)]
    queues = suite.assign(shared, 4)
    assert [[j.name for j in q] for q in queues] == [["s0", "s1"], ["s2", "s3"], ["x"], ["y"]]


def test_gpu_suite_runs_every_queue_and_records_failures(tmp_path):
    """Each job in its own process with its GPU set; a failing job is recorded and does not stop the rest."""
    suite = _load("gpu_suite.py")
    py = sys.executable
    ok = [py, "-c", "import os; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'])"]
    bad = suite.Job("bad", [py, "-c", "raise SystemExit(3)"], 1)
    queues = [[suite.Job("ok0", ok, 1), bad], [suite.Job("ok1", ok, 1)]]
    status = suite.run(queues, str(tmp_path), timeout_s=120)
    assert {n: (s["gpu"], s["rc"]) for n, s in status.items()} == {"ok0": (0, 0), "bad": (0, 3), "ok1": (1, 0)}
    assert (tmp_path / "logs" / "ok1.log").read_text().strip() == "gpu 1"
    saved = json.loads((tmp_path / "suite.json").read_text())["jobs"]
    assert saved["bad"]["rc"] == 3 and saved["ok0"]["state"] == "done"


def test_gpu_suite_plans_accuracy_runs_from_preset_and_seed(capsys):
    suite = _load("gpu_suite.py")
    assert suite.main(["out", "--gpus", "2", "--only", "accuracy", "--accuracy", "accurate:3", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy-accurate-seed3:" in printed and "--preset accurate" in printed and "seed=3" in printed
    assert "e2e" not in printed


def test_gpu_suite_covers_every_kernel_test_file_and_sizes_calibrations_by_epochs(capsys):
    """Every test file that imports a kernel module runs in one of the suite's GPU test jobs (a new kernel's tests
    would otherwise never run at full shapes); a calibration's planned minutes grow with its epochs."""
    suite = _load("gpu_suite.py")
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)))
    imports = re.compile(r"^(import|from) flatquant\.kernels", re.M)
    kernel_tests = {f for f in os.listdir(tests) if f.startswith("test_") and imports.search(_read(tests, f))}
    kernel_tests -= {"test_sm90_build.py"}  # compiles for sm_90 on the CPU: no GPU involved
    covered = {f for files in suite.GPU_TESTS.values() for f in files}
    assert kernel_tests and kernel_tests <= covered, sorted(kernel_tests - covered)
    assert suite.main(["out", "--gpus", "1", "--only", "accuracy", "--accuracy", "accurate:2:epochs=90",
                       "accurate:3", "--dry-run"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "seed2-epochs90 (~16.4 min)" in printed and "seed3 (~8 min)" in printed


def _read(folder: str, name: str) -> str:
    with open(os.path.join(folder, name)) as f:
        return f.read()


def test_gpu_suite_accuracy_runs_take_overrides_and_share_a_gpu(tmp_path, capsys):
    """PRESET[:SEED[:KEY=VALUE,...]] items become accuracy.py runs with --set overrides; with
    --accuracy-per-gpu 2 two calibrations queued one after the other on a GPU run side by side (each job here
    waits for the other's file, so run one after the other both would time out)."""
    suite = _load("gpu_suite.py")
    assert suite.parse_accuracy("accurate:2:epochs=60,lr=0.02") == ("accurate", 2, ["epochs=60", "lr=0.02"])
    assert suite.parse_accuracy("paper") == ("paper", 0, [])
    for bad in ("accurate:x", "accurate:2:epochs", ":2"):
        with pytest.raises(ValueError, match="PRESET"):
            suite.parse_accuracy(bad)
    assert suite.main(["out", "--gpus", "1", "--only", "accuracy", "--accuracy", "accurate:3:epochs=60",
                       "--dry-run"]) == 0  # fmt: skip
    assert "--set seed=3 epochs=60" in capsys.readouterr().out
    # calib=SPEC becomes that run's --calib-data (not a config override); the job is named by base names
    assert suite.main(["out", "--gpus", "1", "--only", "accuracy", "--accuracy",
                       "accurate:4:calib=/d/s.json+/d/tiny.utf8,epochs=30", "--dry-run"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "accuracy-accurate-seed4-epochs30-calib-s+tiny:" in printed
    assert "--calib-data /d/s.json+/d/tiny.utf8" in printed and "--set seed=4 epochs=30" in printed
    assert "calib=" not in printed
    # without --calib-data the runs take their preset's own text (accuracy.py's default): no --calib-data passed
    assert suite.main(["out", "--gpus", "1", "--only", "accuracy", "--accuracy", "accurate:5", "--dry-run"]) == 0
    assert "--calib-data" not in capsys.readouterr().out
    py = sys.executable

    def waiter(me, other):
        code = (f"import pathlib, time; pathlib.Path({str(tmp_path / me)!r}).touch(); t = time.time()\n"
                f"while not pathlib.Path({str(tmp_path / other)!r}).exists():\n"
                "    assert time.time() - t < 20; time.sleep(0.05)")  # fmt: skip
        return suite.Job(me, [py, "-c", code], 1, share=2)

    jobs = [waiter("a", "b"), waiter("b", "a"), suite.Job("c", [py, "-c", "pass"], 1)]
    queue = suite.assign(jobs, 1)[0]
    assert [[j.name for j in b] for b in suite.batches(queue)] == [["a", "b"], ["c"]]
    status = suite.run([queue], str(tmp_path / "out"), timeout_s=60)
    assert {n: s["rc"] for n, s in status.items()} == {"a": 0, "b": 0, "c": 0}


def test_host_profile_quick_reports_host_time_per_layer_and_its_functions(tmp_path):
    out = tmp_path / "host.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "host_profile.py"), "--quick", "--layers", "2"]
    proc = subprocess.run(
        [*cmd, "--reps", "2", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["layers"] == 2
    for phase in ("prefill", "decode"):
        r = data[phase]
        assert 0 < r["host_ms"] <= r["wall_ms"] and r["host_ms_per_layer"] == pytest.approx(r["host_ms"] / 2)
        own = [f["own_ms"] for f in r["top"]]
        assert own == sorted(own, reverse=True) and any("forward" in f["function"] for f in r["top"])
        assert all(os.sep not in f["function"] for f in r["top"])  # base names: no paths of this machine


def test_accuracy_records_name_a_local_model_by_its_base_name(tmp_path):
    spec = importlib.util.spec_from_file_location("accuracy_bench", os.path.join(ROOT, "benchmarks", "accuracy.py"))
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    gguf = tmp_path / "models" / "smollm2.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert accuracy.model_label(str(gguf)) == "smollm2.gguf"
    assert accuracy.model_label(str(gguf.parent) + os.sep) == "models"
    assert accuracy.model_label("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id as given


def test_e2e_sizes_count_the_8_bit_head_as_codes_plus_row_scales():
    """--sizes counts the weights on the meta device: the 8-bit head saves exactly the BF16 embedding and lm_head
    minus their int8 codes and fp32 row scales."""
    e2e = _load("e2e.py")
    r = e2e.weight_sizes("llama-3-8b")
    v, h = e2e.CONFIGS["llama-3-8b"]["vocab_size"], e2e.CONFIGS["llama-3-8b"]["hidden_size"]
    saved = r["weights_bytes_w4a4_head16"] - r["weights_bytes_w4a4_head8"]
    assert saved == 2 * (v * h * 2) - 2 * (v * h + 4 * v)  # two matrices: bf16 -> int8 codes + fp32 scales
    assert r["ratio_head16"] == round(r["weights_bytes_bf16"] / r["weights_bytes_w4a4_head16"], 3)


def test_gpu_suite_e2e_variants_time_a_feature_against_its_absence_in_one_run(capsys):
    """--e2e-variants adds short e2e runs with the residual additions as separate launches (environment switch),
    the same runs with the current defaults as their baseline, and LLaMA-3-8B with the 8-bit head."""
    import types

    suite = _load("gpu_suite.py")
    args = types.SimpleNamespace(out="o", accuracy=[], accuracy_per_gpu=1, only=None, e2e_variants=True)
    args.model, args.calib_data, args.wiki, args.c4 = "m", "c", "w", "c4"
    listed = {j.name: j for j in suite.jobs(args)}
    sep = listed["e2e-llama-2-7b-separate-residual"]
    assert sep.env == {"FLATQUANT_FUSE_RESIDUAL": "0"} and listed["e2e-llama-2-7b-short"].env is None
    assert sep.argv[2:][:-2] == listed["e2e-llama-2-7b-short"].argv[2:][:-2]  # same measurements
    assert "--head-bits" in listed["e2e-llama-3-8b-head8"].argv
    on, off = listed["e2e-llama-2-7b-b64-medium128"], listed["e2e-llama-2-7b-b64-medium16"]
    assert on.env == {"FLATQUANT_MEDIUM_M": "128"} and off.env == {"FLATQUANT_MEDIUM_M": "16"}
    assert on.argv[2:][:-2] == off.argv[2:][:-2] and "64" in on.argv  # same measurements, decode batch 64
    assert "gemm-medium" in listed and "--tokens" in listed["gemm-medium"].argv
    base, pdl0, qkernel = (listed[f"e2e-llama-2-7b-decode-{v}"] for v in ("base", "pdl0", "qkernel0"))
    assert base.env is None and pdl0.env == {"FLATQUANT_PDL": "0"} and qkernel.env == {"FLATQUANT_QUERY_KERNEL": "0"}
    assert base.argv[2:][:-2] == pdl0.argv[2:][:-2] == qkernel.argv[2:][:-2] and "--no-breakdown" in base.argv
    assert listed["e2e-llama-2-7b-decode-append0"].env == {"FLATQUANT_FUSE_KV_APPEND": "0"}
    assert listed["e2e-llama-2-7b-decode-pieces0"].env == {"FLATQUANT_KRON_PIECES": "0"}
    assert listed["e2e-llama-2-7b-decode-pdllate"].env == {"FLATQUANT_PDL_EARLY_TOKENS": "0"}
    assert "kron-tokens" in listed and "kron_tokens.py" in listed["kron-tokens"].argv[1]
    for b in ("1", "16"):  # decode-only profiles from CUDA graphs
        argv = listed[f"e2e-llama-2-7b-decode-profile-b{b}"].argv
        assert (
            argv[argv.index("--breakdown-phases") + 1] == "decode" and argv[argv.index("--breakdown-batches") + 2] == b
        )
    assert "decode-tiles" in listed
    assert not any(
        n.endswith("separate-residual")
        for n in (j.name for j in suite.jobs(types.SimpleNamespace(**{**vars(args), "e2e_variants": False})))
    )


def test_accuracy_records_name_their_calibration_text_without_paths(tmp_path):
    """Files by base name, shares kept, a '+' inside one existing file's name kept; a mixture goes into the notes
    (part of the key by which records replace each other), and so does the calibration text itself."""
    acc = _load("accuracy.py")
    plus = tmp_path / "x+y.txt"
    plus.write_text("text")
    assert acc.calib_label(str(plus)) == "x+y.txt"
    assert acc.calib_label(f"{tmp_path}/s.json+tiny+{tmp_path}/s.json") == "s.json+s.json+tiny"
    cfg = acc.fq.preset("accurate")
    assert (
        acc._notes(cfg, {"seed": 2}, "wiki-summaries+technical+tiny") == "seed=2; calib=wiki-summaries+technical+tiny"
    )
    assert acc._notes(cfg, {"seed": 2}, "wiki-summaries") == "seed=2"
    assert acc._notes(cfg, {}, None) is None
    out = tmp_path / "r.json"
    rec = {"model": "m", "method": "flatquant", "w_bits": 4, "a_bits": 4, "kv_bits": 4, "weights": "rtn", "notes": None}
    acc._merge_results(str(out), [{**rec, "calib": "wiki-summaries", "wiki_ppl": 1.0}])
    acc._merge_results(str(out), [{**rec, "calib": "technical", "wiki_ppl": 2.0}])
    acc._merge_results(str(out), [{**rec, "calib": "technical", "wiki_ppl": 3.0}])
    assert sorted(r["wiki_ppl"] for r in json.loads(out.read_text())) == [1.0, 3.0]


def test_gemm_quick_times_the_cuda_core_decode_path_by_name(tmp_path):
    """``gemm.py --paths auto,gemv``: the forced CUDA-core path is timed and recorded as taken, and the exactness check
    of the dispatcher's choice passes (the interpreter on the CPU; ``auto`` there is the INT8 kernel)."""
    data = _quick_output("gemm.py", tmp_path, "--paths", "auto,gemv", "--tokens", "1", "2")
    records = data["records"]
    assert {(r["M"], r["K"]) for r in records} == {(m, k) for m in (1, 2) for k in (96, 160)}
    for r in records:
        assert r["gemm_gemv_taken"] == "gemv" and 0 < r["gemm_gemv_us"] < float("inf")
        assert r["gemm_auto_taken"] == "int8" and r["exact"] is True
