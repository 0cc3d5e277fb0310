"""Scale-out benchmark: calibration wall time and peak GPU memory on 1 and 2 GPUs.

Runs, each in its own ``torchrun`` job (one process per GPU):

* ``smollm2-135m``: the default model, paper preset (128 x 2048 windows, 15 epochs), the first
  ``--smollm-blocks`` of its 30 blocks (the whole model takes ~8 min on one H100; the time per block is what
  scales);
* ``llama-2-7b-config``: LLaMA-2-7B's shapes with random bfloat16 weights generated here and streamed from
  safetensors shards, ``--llama-blocks`` blocks with a fixed, small number of training steps per block
  (``--llama-samples`` x 2048 windows, ``--llama-epochs``): timing only.

One job per model with ``--gpus`` processes: each process first calibrates one throwaway block with the same
shapes (``torch.compile`` warm-up, reported separately); then rank 0 calibrates the blocks alone (1 GPU),
then all ranks together (timed up to the gathered result), each on a fresh copy of the model. Prints a
table and the 70B projection, and writes ``benchmarks/results/scale.json``.

    python benchmarks/scale.py                 # on a machine with 2 GPUs, about 7 minutes
    python benchmarks/scale.py --quick         # CPU, gloo, 2 processes, toy sizes (a smoke test)
    python benchmarks/scale.py --gpus 3 --share-gpu --models smollm2-135m --smollm-blocks 6 \
        --out benchmarks/results/scale_shared.json   # 3 processes on one GPU (host-bound small blocks)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
LLAMA2_7B_QUICK = dict(  # same structure, toy sizes
    hidden_size=128,
    intermediate_size=344,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1000,
    max_position_embeddings=256,
)
# LLaMA-3-70B block: hidden 8192, MLP 28672, 64 heads / 8 KV heads (head_dim 128), 80 blocks
BLOCK_PARAMS_70B = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
BLOCK_PARAMS_7B = 4 * 4096 * 4096 + 3 * 4096 * 11008
PAPER_STEPS = 15 * 128 // 4  # epochs x steps per epoch


def write_random_llama(folder: str, blocks: int, quick: bool) -> None:
    """A LLaMA-2-7B-config checkpoint with random weights, one safetensors shard per block."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(LLAMA2_7B_QUICK if quick else LLAMA2_7B), num_hidden_layers=blocks)
    dtype = torch.float32 if quick else torch.bfloat16
    config.dtype = dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in skeleton.named_parameters():
        parts = name.split(".")
        shard = f"block-{int(parts[2]):03d}.safetensors" if name.startswith("model.layers.") else "rest.safetensors"
        if "norm" in name:
            value = torch.ones(p.shape, dtype=dtype)
        else:
            value = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
        shards.setdefault(shard, {})[name] = value
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, os.path.join(folder, shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.save_pretrained(folder)


def worker(spec: dict) -> None:
    """One rank of one run (started by torchrun)."""

    import flatquant as fq
    from flatquant import distributed
    from flatquant.calibrate import calibrate
    from flatquant.data import calibration_mixture
    from flatquant.loading import load_model

    ctx = distributed.setup(timeout=600)
    if spec["model"].startswith("smollm2"):
        model, tokenizer = load_model(spec["source"])
        cfg = fq.preset(spec["preset"], **spec["overrides"])
        windows = calibration_mixture(tokenizer, spec["calib_data"], cfg.nsamples, cfg.seqlen, cfg.seed)
    else:
        model = fq.StreamingModel(spec["folder"])
        cfg = fq.preset(spec["preset"], **spec["overrides"])
        g = torch.Generator().manual_seed(0)
        windows = torch.randint(0, model.config.vocab_size, (cfg.nsamples, cfg.seqlen), generator=g)
    # warm-up: one block, one step, the same shapes (torch.compile), in every process
    t0 = time.perf_counter()
    calibrate(
        fresh(model),
        cfg.replace(nsamples=cfg.batch_size, epochs=1),
        windows[: cfg.batch_size],
        ctx.device,
        progress=False,
        blocks=[0],
    )
    warmup = time.perf_counter() - t0
    records = []
    for procs in sorted({1, ctx.world}):  # rank 0 alone, then every rank
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if ctx.group is not None:
            torch.distributed.barrier(group=ctx.group)
        if procs < ctx.world and ctx.rank != 0:
            continue
        t0 = time.perf_counter()
        if procs == 1:
            result = calibrate(fresh(model), cfg, windows, ctx.device, progress=False, blocks=range(spec["blocks"]))
        else:
            result = distributed.calibrate_distributed(
                fresh(model), cfg, windows, device=ctx.device, progress=False, blocks=range(spec["blocks"]), timeout=600
            )
        seconds = time.perf_counter() - t0
        steps = cfg.epochs * math.ceil(cfg.nsamples / cfg.batch_size)
        records.append(
            {
                "model": spec["model"],
                "gpus": min(procs, torch.cuda.device_count()) if ctx.device.type == "cuda" else 0,
                "processes": procs,
                "calib_seconds": seconds,
                "peak_gpu_bytes": result.peak_gpu_bytes,
                "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
                "blocks": spec["blocks"],
                "model_blocks": spec["model_blocks"],
                "nsamples": cfg.nsamples,
                "seqlen": cfg.seqlen,
                "epochs": cfg.epochs,
                "steps_per_block": steps,
                "seconds_per_block": seconds / math.ceil(spec["blocks"] / procs),
                "warmup_seconds": warmup,
                "note": spec["note"],
                "torch": torch.__version__,
            }
        )
        if ctx.rank == 0:  # after every run: a job stopped by the time limit keeps what it measured
            with open(spec["record"], "w") as f:
                json.dump(records, f)
    if ctx.group is not None:
        torch.distributed.destroy_process_group()


def fresh(model):
    """An untouched model for each run: calibrating a model in memory prepares its blocks in place."""
    if getattr(model, "streams_blocks", False):
        return model
    import copy

    return copy.deepcopy(model)


def run(spec: dict, procs: int, timeout: float) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        spec = {**spec, "record": f.name}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd += [os.path.abspath(__file__), "--worker", json.dumps(spec)]
    src = os.path.join(os.path.dirname(HERE), "src")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if spec["quick"] else "8")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    # a session of its own, so that on the time limit the launcher and its workers are stopped together
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            print(out[-2000:], err[-4000:], sep="\n")
            raise SystemExit(f"{spec['model']} on {procs} process(es) failed (exit {proc.returncode})")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        print(f"{spec['model']}: stopped after {timeout:.0f} s (time budget); keeping the runs it finished")
    with open(spec["record"]) as f:
        text = f.read()
    os.unlink(spec["record"])
    records = json.loads(text) if text else []
    for r in records:
        r["job_seconds"] = time.perf_counter() - t0  # both runs of the job, start-up and warm-up included
    return records


def projection(records: list[dict]) -> list[str]:
    """The 70B estimate from the measured 7B-config cost per training step (see docs/scale-out.md)."""
    lines = []
    one = [r for r in records if r["model"] == "llama-2-7b-config" and r["processes"] == 1]
    if one:
        r = one[0]
        step = r["seconds_per_block"] / r["steps_per_block"]
        ratio = BLOCK_PARAMS_70B / BLOCK_PARAMS_7B
        for g in (1, 2, 4, 8):
            hours = math.ceil(80 / g) * PAPER_STEPS * ratio * step / 3600
            lines.append(
                f"70B projection, {g} GPU(s): ceil(80/{g}) blocks x {PAPER_STEPS} steps x {ratio:.2f} x {step:.4f} s"
                f" = {hours:.2f} h"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU, gloo, toy sizes: proves the script runs")
    p.add_argument("--gpus", type=int, default=2, help="processes of the job: measures 1 and this many [2]")
    p.add_argument("--share-gpu", action="store_true", help="allow more processes than GPUs (round-robin)")
    p.add_argument("--models", nargs="+", default=["llama-2-7b-config", "smollm2-135m"])
    p.add_argument("--smollm-blocks", type=int, default=4)
    p.add_argument("--smollm-model", default=None, help="SmolLM2 checkpoint or GGUF file [default: the built-in]")
    p.add_argument("--calib-data", default="wiki-summaries", help="SmolLM2 calibration text: name, file or mixture A+B")
    p.add_argument("--llama-blocks", type=int, default=6)
    p.add_argument("--llama-samples", type=int, default=32)
    p.add_argument("--llama-epochs", type=int, default=12)
    p.add_argument("--budget", type=float, default=450, help="seconds; runs that would start later are skipped")
    p.add_argument("--out", default=None, help="[default benchmarks/results/scale.json; --quick: a temporary file]")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return worker(json.loads(args.worker))
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
    from flatquant.files import atomic_write_json

    start = time.perf_counter()
    gpus = torch.cuda.device_count()
    if not args.quick and (gpus == 0 or (gpus < args.gpus and not args.share_gpu)):
        raise SystemExit(f"--gpus {args.gpus} needs {args.gpus} GPUs (or --share-gpu and one), found {gpus}")
    tmp = tempfile.mkdtemp(prefix="flatquant-scale-")
    out = args.out or (os.path.join(tmp, "scale.json") if args.quick else os.path.join(HERE, "results", "scale.json"))
    specs = []
    for model in args.models:
        if model == "llama-2-7b-config":
            blocks = 2 if args.quick else args.llama_blocks
            folder = os.path.join(tmp, "llama")
            os.makedirs(folder)
            t0 = time.perf_counter()
            write_random_llama(folder, blocks, args.quick)
            print(f"wrote random {model} weights ({blocks} blocks) in {time.perf_counter() - t0:.1f} s")
            n, e = (4, 1) if args.quick else (args.llama_samples, args.llama_epochs)
            overrides = {"nsamples": n, "seqlen": 64 if args.quick else 2048, "epochs": e}
            overrides["autocast_dtype"] = "float32" if args.quick else "bfloat16"
            note = (
                f"random weights, timing only; {blocks} of 32 blocks, {n} x {overrides['seqlen']} windows, {e} epochs"
            )
            spec = dict(model=model, folder=folder, preset="paper", overrides=overrides, blocks=blocks, model_blocks=32)
        elif model == "smollm2-135m":
            blocks = 2 if args.quick else args.smollm_blocks
            overrides = {"nsamples": 4, "seqlen": 64, "epochs": 1} if args.quick else {}
            note = f"paper preset, first {blocks} of 30 blocks" + (" (--quick: 4 x 64 windows, 1 epoch)" * args.quick)
            spec = dict(model=model, preset="quick" if args.quick else "paper", overrides=overrides, blocks=blocks)
            spec.update(model_blocks=30, source=args.smollm_model, calib_data=args.calib_data)
        else:
            raise SystemExit(f"--models: {model!r} is not one of llama-2-7b-config, smollm2-135m")
        specs.append({**spec, "note": note, "quick": args.quick})
    records = []
    for spec in specs:
        left = args.budget - (time.perf_counter() - start)
        if left < 30:
            print(f"skipped {spec['model']}: time budget used up")
            continue
        for record in run(spec, args.gpus, timeout=max(left, 60)):
            records.append(record)
            print(
                f"{record['model']:<20} {record['processes']} proc  {record['calib_seconds']:8.1f} s  "
                f"{(record['peak_gpu_bytes'] or 0) / 1e9:6.2f} GB  warm-up {record['warmup_seconds']:.1f} s  "
                f"job {record['job_seconds']:.1f} s  [{record['device']}]"
            )
    print()
    print("| model | GPUs / processes | blocks | calib s | s / block / rank | speed-up | peak GPU GB | device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        base = [b for b in records if b["model"] == r["model"] and b["processes"] == 1]
        speedup = base[0]["calib_seconds"] / r["calib_seconds"] if base else float("nan")
        r["speedup_vs_1"] = speedup
        print(
            f"| {r['model']} | {r['gpus'] or 'CPU'} / {r['processes']} | {r['blocks']} | "
            f"{r['calib_seconds']:.1f} | {r['seconds_per_block']:.2f} | {speedup:.2f}x | "
            f"{(r['peak_gpu_bytes'] or 0) / 1e9:.2f} | {r['device']} |"
        )
    for line in projection(records):
        print(line)
    atomic_write_json(out, records)
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
