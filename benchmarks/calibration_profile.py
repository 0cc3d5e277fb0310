"""Where a calibration step's time goes: one block of a model config, random weights, torch.profiler.

python benchmarks/calibration_profile.py --steps 30   # on a GPU; prints ms/step and the top ops
python benchmarks/calibration_profile.py --steps 30 --graph 0 --out /tmp/eager.json   # eager (default: graph replays)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flatquant as fq
from flatquant import calibrate as calib
from flatquant.fusion import fused_calibration
from flatquant.prepare import CALIBRATED_TYPES, prepare_block, use_flatquant_attention

SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    num_hidden_layers=1,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--graph", type=int, default=1, help="0: eager steps; 1: replayed from a CUDA graph (the default)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration_profile.json"))
    args = p.parse_args()
    dev = torch.device("cuda")
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="sdpa")).eval()
    use_flatquant_attention(model)
    ids = torch.randint(0, 49152, (args.nsamples, 2048))
    x, kwargs = calib.capture_block_inputs(model, ids, dev)
    print("block kwargs:", {k: (tuple(v.shape) if torch.is_tensor(v) else type(v).__name__) for k, v in kwargs.items()})
    layer = model.model.layers[0].to(dev)
    y, stats = calib._fp_forward(layer, fq.arch.spec_for(model), x, kwargs, 4, True)
    cfg = fq.FlatQuantConfig(epochs=1, nsamples=args.nsamples)
    prepare_block(layer, fq.arch.spec_for(model), model.config, cfg, stats, torch.Generator().manual_seed(0))
    layer.to(dev)
    for q in layer.parameters():
        q.requires_grad_(False)
    for m in layer.modules():
        if isinstance(m, CALIBRATED_TYPES):
            for q in m.parameters():
                q.requires_grad_(True)
    os.environ["FLATQUANT_COMPILE"] = str(args.compile)
    calib.CALIB_GRAPH = bool(args.graph)
    timings = {}
    with fused_calibration(dev):
        for label, profile in (("warm-up", False), ("timed", False), ("profiled", True)):
            cfg = fq.FlatQuantConfig(epochs=max(1, args.steps * 4 // args.nsamples), nsamples=args.nsamples)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if profile:
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                ) as prof:
                    calib._train_block(layer, x, y, kwargs, cfg, 1.0, None)
            else:
                calib._train_block(layer, x, y, kwargs, cfg, 1.0, None)
            torch.cuda.synchronize()
            steps = cfg.epochs * (args.nsamples // 4)
            timings[label] = 1000 * (time.perf_counter() - t0) / steps
            print(f"{label}: {timings[label]:.2f} ms/step over {steps} steps")
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1000 / steps
    print(f"GPU busy per step: {gpu_total:.2f} ms")
    record = {
        "model_config": "SmolLM2-135M block (random weights)",
        "ms_per_step": timings["timed"],
        "gpu_busy_ms_per_step": gpu_total,
        "compile": bool(args.compile),
        "graph": bool(args.graph),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump([record], f, indent=2)
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    print(events.table(sort_by="self_device_time_total", row_limit=15))


if __name__ == "__main__":
    main()
