"""Host (Python) time of the packed W4A4 runtime per decoder layer, and where it goes (cProfile).

A prefill of one 2048-token sequence on a 7B-size model is host-bound: its kernels take ~40 ms of device
time, but enqueueing them takes longer. This script builds the packed runtime of ``e2e.py`` with fewer layers
(the host cost per layer does not depend on the layer count), times a prefill and an eager decode step, and
reports host milliseconds per layer (time to enqueue, before synchronising) against the wall time, with the
functions that take the host time.

    PYTHONPATH=src python benchmarks/host_profile.py [--model llama-2-7b] [--layers 4] [--out F.json]
    PYTHONPATH=src python benchmarks/host_profile.py --quick        # tiny model on the CPU (torch paths)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import CONFIGS, QUICK, _sync, new_cache, w4a4_model  # noqa: E402

from flatquant.files import atomic_write_json  # noqa: E402
from flatquant.kvcache import cache_kwargs  # noqa: E402
from flatquant.report import device_name  # noqa: E402


def _host_and_wall(fn, device, reps: int) -> tuple[float, float]:
    """Median (host ms to return from ``fn``, wall ms until the device is done) over ``reps`` runs."""
    host, wall = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(device)
        host.append(1000 * (t1 - t0))
        wall.append(1000 * (time.perf_counter() - t0))
    return sorted(host)[reps // 2], sorted(wall)[reps // 2]


def _top(prof: cProfile.Profile, calls: int, rows: int) -> list[dict]:
    """The functions with the most own time, per call of the profiled step."""
    stats = pstats.Stats(prof)
    out = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{os.path.basename(file)}:{line}({name})"
        out.append({"function": where, "calls": ncalls / calls, "own_ms": 1000 * tottime / calls,
                    "cum_ms": 1000 * cumtime / calls})  # fmt: skip
    return sorted(out, key=lambda r: -r["own_ms"])[:rows]


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b", choices=sorted(CONFIGS))
    p.add_argument("--layers", type=int, default=4, help="decoder layers to build")
    p.add_argument("--seqlen", type=int, default=2048, help="prefill tokens")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=30, help="functions to list")
    p.add_argument("--quick", action="store_true", help="tiny model (CPU: the torch paths, not the kernels)")
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        name, cfg, args.seqlen = "tiny-llama", dict(QUICK["tiny-llama"]), min(args.seqlen, 64)
    else:
        name, cfg = args.model, dict(CONFIGS[args.model])
    if args.layers < 1:
        raise SystemExit(f"--layers {args.layers}: need at least 1")
    cfg["num_hidden_layers"] = args.layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = w4a4_model(cfg, device, dtype)
    ids = torch.randint(0, cfg["vocab_size"], (1, args.seqlen), device=device)
    cache = {}

    def prefill():
        cache["c"] = new_cache(model, "w4a4", args.seqlen + 64)
        out = model(ids, logits_to_keep=1, **cache_kwargs(model, cache["c"]))
        cache["next"] = out.logits[:, -1:].argmax(-1)

    def decode():
        out = model(cache["next"], logits_to_keep=1, **cache_kwargs(model, cache["c"]))
        cache["next"] = out.logits[:, -1:].argmax(-1)

    result = {"device": device_name(device), "model": name, "layers": args.layers, "seqlen": args.seqlen}
    for phase, fn in (("prefill", prefill), ("decode", decode)):
        fn()  # warm-up: autotuning and compilation for this shape
        fn()
        host, wall = _host_and_wall(fn, device, args.reps)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.reps):
            fn()
        prof.disable()
        _sync(device)
        top = _top(prof, args.reps, args.rows)
        result[phase] = {"host_ms": host, "wall_ms": wall, "host_ms_per_layer": host / args.layers, "top": top}
        print(f"{name} {phase} (batch 1, {args.layers} layers) on {result['device']}: host {host:.2f} ms "
              f"({host / args.layers:.3f} ms per layer), wall {wall:.2f} ms")  # fmt: skip
        buf = io.StringIO()
        buf.write(f"{'own ms':>8} {'cum ms':>8} {'calls':>7}  function (per step)\n")
        for r in top:
            buf.write(f"{r['own_ms']:8.3f} {r['cum_ms']:8.3f} {r['calls']:7.1f}  {r['function']}\n")
        print(buf.getvalue())
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
