"""Every GPU measurement of the project in one command, spread over the GPUs of one machine.

Each job (GPU tests in four groups, end-to-end per model, the kernel benchmarks, calibration and host profiles,
accuracy runs) runs in its own process on one GPU (``CUDA_VISIBLE_DEVICES``); jobs are assigned longest first to
the least-loaded GPU, and each GPU's queue runs in order (``--accuracy-per-gpu`` calibrations side by side).
Every job writes its log to ``OUT/logs/NAME.log`` and its results to ``OUT/NAME.json``;
``OUT/suite.json`` records each job's GPU, exit status and seconds and is rewritten as jobs finish, so a run cut
short keeps what finished. A job that fails does not stop the others.

    python benchmarks/gpu_suite.py OUT                          # everything, on all visible GPUs
    python benchmarks/gpu_suite.py OUT --only e2e decode --gpus 2
    python benchmarks/gpu_suite.py OUT --model smollm2.gguf --calib-data summaries.json --wiki wiki.utf8 --c4 c4.utf8 \\
        --accuracy accurate:2 accurate:3 paper:0                 # model and texts as files (machines without them)
    python benchmarks/gpu_suite.py OUT --only accuracy --accuracy accurate:2:epochs=60 accurate:3:epochs=60 \
        --accuracy-per-gpu 2                                     # two small-model calibrations per GPU
    python benchmarks/gpu_suite.py OUT --dry-run                 # print the plan only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

from flatquant.files import atomic_write_json  # noqa: E402

# GPU test jobs: each group in its own process, every test named in its log with the failures' tracebacks
GPU_TESTS = {
    "tests-kron": ["test_kron_quantize.py"],
    "tests-kv": ["test_kv_quant.py"],
    "tests-gemm-packed": ["test_gemm_w4a4.py", "test_gemv_w4a4.py", "test_gemm_dense.py", "test_packed.py"],
    "tests-small": [
        "test_rope.py",
        "test_rmsnorm.py",
        "test_silu_mul.py",
        "test_int8_linear.py",
        "test_calib_inputs.py",
        "test_pdl.py",
        "test_decode_tuning.py",
        "test_rows_matmul.py",
        "test_envflags.py",
    ],
}
PYTEST = ["-m", "pytest", "-v", "--tb=short", "-rfE", "--durations=12", "-p", "no:cacheprovider"]


@dataclass
class Job:
    name: str
    argv: list[str]
    minutes: float  # rough duration on one H100, for the assignment only
    env: dict | None = None
    share: int = 1  # jobs of this kind that may run at once on one GPU (calibrations of a small model)


def parse_accuracy(item: str) -> tuple[str, int, list[str]]:
    """``PRESET[:SEED[:KEY=VALUE,...]]`` -> (preset, seed, config overrides for accuracy.py --set)."""
    preset, _, rest = item.partition(":")
    seed, _, extra = rest.partition(":")
    overrides = [o for o in extra.split(",") if o]
    if not preset or (seed and not seed.isdigit()) or any("=" not in o for o in overrides):
        raise ValueError(f"accuracy run {item!r} is not PRESET[:SEED[:KEY=VALUE,...]] (e.g. accurate:2:epochs=60)")
    return preset, int(seed or 0), overrides


def jobs(args) -> list[Job]:
    """The suite, each job with the files it writes under args.out."""
    py, out = sys.executable, args.out
    bench = lambda script: os.path.join(HERE, script)  # noqa: E731
    listed = [
        Job(name, [py, *PYTEST, *(os.path.join(ROOT, "tests", f) for f in files)], 3)
        for name, files in GPU_TESTS.items()
    ]
    listed += [
        Job("decode", [py, bench("decode_attention.py"), "--out", f"{out}/decode_attention.json"], 3),
        Job("kron", [py, bench("kron_quantize.py"), "--out", f"{out}/kron_quantize.json"], 3),
        Job("gemm", [py, bench("gemm.py"), "--out", f"{out}/gemm.json"], 4),
        # the dense FP8 path against the INT8 kernel around DENSE_M, and cuBLAS FP8's exactness on 4-bit codes
        Job("dense-crossover", [py, bench("dense_crossover.py"), "--out", f"{out}/dense_crossover.json"], 2),
        # batched decode (17-128 tokens): the batched-decode tiles against the prefill tiles, in one process
        Job(
            "gemm-medium", [py, bench("gemm.py"), "--tokens", "32", "64", "128", "--out", f"{out}/gemm_medium.json"], 4
        ),
        # the transform's configs at 32-512 tokens; the layer against its parts (docs/kernels-pdl.md)
        Job("kron-tokens", [py, bench("kron_tokens.py"), "--out", f"{out}/kron_tokens.json"], 3),
        # every decode tile of each decode GEMM from HBM, against the tuning modes' picks (FLATQUANT_DECODE_TUNE)
        Job("decode-tiles", [py, bench("decode_tiles.py"), "--out", f"{out}/decode_tiles.json"], 3),
        # the CUDA-core decode kernel's candidates alone and after the layer's transform, against the tuner's pick
        Job("decode-gemv", [py, bench("decode_tiles.py"), "--path", "gemv", "--out", f"{out}/decode_gemv.json"], 4),
        Job("calib-profile", [py, bench("calibration_profile.py"), "--out", f"{out}/calibration_profile.json"], 1),
        Job("host-profile", [py, bench("host_profile.py"), "--out", f"{out}/host_profile.json"], 1),
    ]

    def e2e(name: str, model: str, *extra: str, minutes: float = 4, env: dict | None = None) -> Job:
        argv = [py, bench("e2e.py"), "--models", model, *extra, "--out", f"{out}/{name}.json"]
        return Job(name, argv, minutes, env=env)

    listed += [e2e(f"e2e-{model}", model, minutes=6) for model in ("llama-2-7b", "llama-3-8b")]
    if args.e2e_variants:  # the same measurements of the current code without a feature, for a same-run baseline
        short = ["--prefill-batches", "1", "--decode-batches", "1", "16", "--breakdown-batches", "1", "16"]
        for model in ("llama-2-7b", "llama-3-8b"):
            listed.append(e2e(f"e2e-{model}-short", model, *short))
            listed.append(e2e(f"e2e-{model}-separate-residual", model, *short, env={"FLATQUANT_FUSE_RESIDUAL": "0"}))
        listed.append(e2e("e2e-llama-3-8b-head8", "llama-3-8b", *short, "--head-bits", "8"))
        batch64 = ["--prefill-batches", "--decode-batches", "64", "--breakdown-batches", "1", "64"]
        for medium in ("128", "16"):  # batch-64 decode with and without the batched-decode GEMM tiles
            env = {"FLATQUANT_MEDIUM_M": medium}
            listed.append(e2e(f"e2e-llama-2-7b-b64-medium{medium}", "llama-2-7b", *batch64, env=env))
        # decode at batch 1 and 16 with the defaults, without programmatic dependent launch, with the queries'
        # transform as PyTorch's matmul instead of the PDL-launched Triton kernel, with K and V appended in two
        # launches, with the down projection's input on the padded 128 x 128 tile instead of its 64 + 32 pieces, with
        # the transform letting the GEMM launch only as its programs exit at every token count (docs/kernels-pdl.md)
        decode = ["--prefill-batches", "--decode-batches", "1", "16", "--no-breakdown", "--decode-fill", "random"]
        for variant, env in (
            ("base", None),
            ("pdl0", {"FLATQUANT_PDL": "0"}),
            ("qkernel0", {"FLATQUANT_QUERY_KERNEL": "0"}),
            ("append0", {"FLATQUANT_FUSE_KV_APPEND": "0"}),
            ("pieces0", {"FLATQUANT_KRON_PIECES": "0"}),
            ("pdllate", {"FLATQUANT_PDL_EARLY_TOKENS": "0"}),
        ):
            listed.append(e2e(f"e2e-llama-2-7b-decode-{variant}", "llama-2-7b", *decode, env=env))
        # where a W4A4 decode step's time goes at batch 1 and 16: kernels profiled from CUDA graphs, no timing runs
        for b in ("1", "16"):
            profile = ["--kinds", "w4a4", "--prefill-batches", "--decode-batches", "--breakdown-phases", "decode"]
            profile += ["--breakdown-batches", "1", b, "--decode-fill", "random"]
            listed.append(e2e(f"e2e-llama-2-7b-decode-profile-b{b}", "llama-2-7b", *profile, minutes=2))
    for item in args.accuracy:
        preset, seed, overrides = parse_accuracy(item)
        calib = [o.split("=", 1)[1] for o in overrides if o.startswith("calib=")]  # a per-run calibration text
        overrides = [o for o in overrides if not o.startswith("calib=")]
        name = f"accuracy-{preset}-seed{seed}" + "".join(f"-{o.replace('=', '')}" for o in overrides)
        if calib:
            name += "-calib-" + "+".join(os.path.splitext(os.path.basename(c))[0] for c in calib[-1].split("+"))
        argv = [py, bench("accuracy.py"), "--runs", "flatquant-w4a4kv4", "--preset", preset, "--model", args.model]
        text = calib[-1] if calib else args.calib_data  # None: the preset's own text (accuracy.py's default)
        argv += (["--calib-data", text] if text else []) + ["--wiki", args.wiki, "--c4", args.c4]
        argv += ["--results", f"{out}/{name}.json", "--set", f"seed={seed}", *overrides]
        minutes = 4 if preset == "paper" else 8
        epochs = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("epochs=")]
        if epochs:  # ~9 s per epoch over SmolLM2's 30 blocks with two calibrations on one H100, plus evaluation
            minutes = 2 + 0.16 * epochs[-1]
        listed.append(Job(name, argv, minutes, share=args.accuracy_per_gpu))
    if args.only:
        listed = [j for j in listed if any(j.name.startswith(p) for p in args.only)]
    return listed


def assign(listed: list[Job], gpus: int) -> list[list[Job]]:
    """Longest job first to the GPU where it ends soonest (shared jobs fill a GPU up to their share); one queue
    per GPU."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    queues: list[list[Job]] = [[] for _ in range(gpus)]

    def load(queue: list[Job]) -> float:  # jobs batched side by side take the time of their longest
        return sum(max(j.minutes for j in batch) for batch in batches(queue))

    for job in sorted(listed, key=lambda j: -j.minutes):
        g = min(range(gpus), key=lambda i: (load(queues[i] + [job]), i))
        queues[g].append(job)
    return queues


def batches(queue: list[Job]) -> list[list[Job]]:
    """A GPU's queue in the order it runs: consecutive jobs that share a GPU run together, up to their share."""
    out: list[list[Job]] = []
    for job in queue:
        last = out[-1] if out else None
        if last and job.share > 1 and last[0].share > 1 and len(last) < min(job.share, last[0].share):
            last.append(job)
        else:
            out.append([job])
    return out


def _visible_gpus() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def run(queues: list[list[Job]], out: str, timeout_s: float) -> dict:
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    status: dict[str, dict] = {j.name: {"gpu": g, "state": "queued"} for g, q in enumerate(queues) for j in q}
    lock = threading.Lock()
    summary = os.path.join(out, "suite.json")

    def save():
        with lock:
            atomic_write_json(summary, {"jobs": status})

    def one(g: int, job: Job):
        env = {**os.environ, **(job.env or {}), "CUDA_VISIBLE_DEVICES": str(g)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
        status[job.name].update(state="running", started=time.strftime("%H:%M:%S"))
        save()
        t0 = time.perf_counter()
        with open(os.path.join(out, "logs", f"{job.name}.log"), "w") as log:
            try:
                rc = subprocess.run(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = "timeout"
        status[job.name].update(state="done", rc=rc, seconds=round(time.perf_counter() - t0, 1))
        save()
        print(f"[gpu {g}] {job.name}: rc {rc} in {status[job.name]['seconds']} s", flush=True)

    def worker(g: int, queue: list[Job]):
        for batch in batches(queue):  # a batch of shared jobs runs side by side on the GPU
            side = [threading.Thread(target=one, args=(g, job)) for job in batch]
            for t in side:
                t.start()
            for t in side:
                t.join()

    save()
    threads = [threading.Thread(target=worker, args=(g, q)) for g, q in enumerate(queues) if q]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the results, logs and suite.json")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use [default: all visible]")
    p.add_argument("--only", nargs="*", default=None, help="job name prefixes to run (e2e, decode, accuracy, ...)")
    p.add_argument(
        "--e2e-variants",
        action="store_true",
        help="also e2e at prefill batch 1 / decode batch 1, 16 with the residual additions as separate launches "
        "(FLATQUANT_FUSE_RESIDUAL=0), the same without (baseline), LLaMA-3-8B with the 8-bit head, and LLaMA-2-7B "
        "decode at batch 64 with and without the batched-decode GEMM tiles (FLATQUANT_MEDIUM_M=128 / 16)",
    )
    p.add_argument(
        "--accuracy", nargs="*", default=["paper:0", "accurate:0"],
        help="calibrations PRESET[:SEED[:KEY=VALUE,...]], e.g. accurate:2 accurate:3:epochs=30,lr=0.02; the key calib "
        "sets that run's calibration text (accurate:2:calib=a.json+b.utf8)",
    )  # fmt: skip
    p.add_argument("--accuracy-per-gpu", type=int, default=1, help="calibrations run side by side on one GPU")
    p.add_argument("--model", default="smollm2-135m", help="model of the accuracy runs: name, folder or GGUF file")
    p.add_argument(
        "--calib-data", default=None, help="calibration text of every accuracy run: name, file or mixture A+B "
        "[default: each preset's own text, flatquant.config.calibration_for]",
    )  # fmt: skip
    p.add_argument("--wiki", default="wiki", help="wiki evaluation text: name or file")
    p.add_argument("--c4", default="c4", help="c4 evaluation text: name or file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if args.accuracy_per_gpu < 1:
        raise SystemExit(f"--accuracy-per-gpu {args.accuracy_per_gpu}: need at least 1")
    gpus = args.gpus or _visible_gpus()
    if gpus < 1:
        raise SystemExit("no GPU visible (nvidia-smi lists none); pass --gpus N to plan anyway with --dry-run")
    queues = assign(jobs(args), gpus)
    for g, queue in enumerate(queues):
        plan = [" + ".join(f"{j.name} (~{j.minutes:g} min)" for j in batch) for batch in batches(queue)]
        print(f"gpu {g}: " + ", then ".join(plan), flush=True)
    if args.dry_run:
        for queue in queues:
            for job in queue:
                print(f"{job.name}: {' '.join(job.argv)}")
        return 0
    status = run(queues, args.out, args.timeout)
    failed = [n for n, s in status.items() if s.get("rc") != 0]
    print(f"{len(status) - len(failed)} of {len(status)} jobs succeeded" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
