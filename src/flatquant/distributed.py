"""Calibration across processes: one per GPU, launched by ``torchrun``.

Given their full-precision inputs the blocks are independent, so each rank takes a contiguous range of
blocks (balanced: the sizes differ by at most one), runs the full-precision pass itself up to its last block
(no activations cross the network; a full-precision forward costs a few percent of a block's training) and
calibrates its range with the single-process code. After every calibrated block the ranks exchange a status
word; a failure on one rank stops all of them with a message naming the rank and the block, and a rank that
dies or hangs is noticed within ``timeout`` seconds. The calibrated tensors (kilobytes to megabytes per block)
are gathered on every rank as safetensors bytes; rank 0 writes the one checkpoint.

Control traffic goes through a gloo group of small CPU tensors, whatever the backend of the default group
(``cpu:gloo,cuda:nccl`` when this module creates it on a CUDA machine, plain gloo when ranks share GPUs).

More processes than GPUs share them round-robin (local rank r uses GPU r mod count). For a small model
that helps on one GPU too: a block's training step launches many small kernels and is bound by the host,
so two or three processes keep the GPU busier than one (``torchrun --nproc-per-node 3`` on one GPU).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load, save

from .arch import spec_for
from .calibrate import CalibrationResult, calibrate


class DistributedCalibrationError(RuntimeError):
    """A rank failed (or stopped answering); raised on every rank."""


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    group: object | None  # the gloo control group; None in a single process


def assign_blocks(blocks, world: int) -> list[list[int]]:
    """Contiguous, balanced ranges of ``blocks`` (sorted) for ``world`` ranks: sizes differ by at most one."""
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    blocks = sorted(blocks)
    bounds = [r * len(blocks) // world for r in range(world + 1)]
    return [blocks[bounds[r] : bounds[r + 1]] for r in range(world)]


def local_device(local_rank: int, gpus: int, device: torch.device | str | None = None) -> torch.device:
    """The device of a local rank: the CPU without GPUs (or when asked), else GPU ``local_rank mod gpus``
    (a bare ``cuda`` too), or exactly the GPU named with an index."""
    device = torch.device(device or ("cuda" if gpus > 0 else "cpu"))
    if device.type != "cuda":
        return device
    if gpus < 1:
        raise ValueError(f"device={device} was asked for but no GPU is visible")
    return torch.device("cuda", local_rank % gpus if device.index is None else device.index)


def setup(device: torch.device | str | None = None, timeout: float = 1800.0) -> Context:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` etc.), or run alone.

    device: default ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; a bare ``cuda`` also means
    the local rank's GPU.
    """
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be a positive number of seconds")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), None)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not dist.is_initialized():
        # NCCL refuses two ranks on one GPU; nothing here needs it then (control and gathers go through gloo)
        backend = "cpu:gloo,cuda:nccl" if 0 < local_world <= gpus else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = local_device(local, gpus, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return Context(rank, world, device, group)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _all_gather_bytes(payload: bytes, group) -> list[bytes]:
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(1, max(int(s) for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [b[: int(s)].numpy().tobytes() for b, s in zip(bufs, sizes, strict=True)]


class _Status:
    """The status word every rank posts after each of its blocks (or on failure)."""

    def __init__(self, ctx: Context, timeout: float):
        self.ctx, self.timeout = ctx, timeout

    def post(self, failed_block: int | None = None, message: str = "") -> None:
        failed = failed_block is not None
        word = torch.tensor([int(failed), failed_block if failed else -1], dtype=torch.int64)
        words = [torch.empty_like(word) for _ in range(self.ctx.world)]
        try:
            dist.all_gather(words, word, group=self.ctx.group)
            bad = [(r, int(w[1])) for r, w in enumerate(words) if w[0]]
            messages = _all_gather_bytes(message.encode(), self.ctx.group) if bad else []
        except RuntimeError as e:
            raise DistributedCalibrationError(
                f"rank {self.ctx.rank}: no answer from the other ranks (waited up to {self.timeout:g} s; "
                f"a rank died or hangs, see its output): {e}"
            ) from e
        if bad:
            detail = "; ".join(
                f"rank {r} failed on {f'block {b}' if b >= 0 else 'start-up'}: {messages[r].decode()}" for r, b in bad
            )
            raise DistributedCalibrationError(f"calibration stopped on all {self.ctx.world} ranks: {detail}")


def num_blocks(model) -> int:
    return len(model) if getattr(model, "streams_blocks", False) else len(model.get_submodule(spec_for(model).layers))


def calibrate_distributed(
    model,
    cfg,
    windows: torch.Tensor | None,
    *,
    device: torch.device | str | None = None,
    state_dir: str | None = None,
    progress: bool = True,
    blocks=None,
    timeout: float = 1800.0,
    **options,
) -> CalibrationResult:
    """Calibrate ``model`` with every process of the group; every rank returns the whole result.

    Run it in each process started by ``torchrun`` (or with the process group already initialised); in a
    single process it is :func:`flatquant.calibrate.calibrate`. model: the same model on every rank, in
    memory or a :class:`flatquant.StreamingModel`; blocks: the blocks to calibrate (default all), shared out
    in contiguous ranges. state_dir: shared by all ranks (one file per finished block); a restarted run,
    with any number of processes, skips the finished blocks. timeout: seconds a rank waits for the others
    at each block boundary (longer than one block's calibration). options: as for ``calibrate``.
    The blocks a rank calibrated are left prepared in its in-memory model; :func:`flatquant.checkpoint.
    apply_calibration` prepares a fresh model with the whole result.
    """
    ctx = setup(device, timeout)
    if ctx.world == 1:
        return calibrate(model, cfg, windows, ctx.device, state_dir, progress, blocks=blocks, **options)
    if cfg.calib_inputs == "quantized":
        raise ValueError(
            f"calib_inputs='quantized' cannot be shared out over {ctx.world} processes: each block's inputs come "
            "from the calibrated blocks before it; run it in one process or use calib_inputs='fp'"
        )
    shares = assign_blocks(range(num_blocks(model)) if blocks is None else blocks, ctx.world)
    rounds, mine = max(len(s) for s in shares), shares[ctx.rank]
    status = _Status(ctx, timeout)
    current, done = [-1], [0]

    def before(i: int) -> None:
        current[0] = i

    def after(_i: int) -> None:
        done[0] += 1
        status.post()

    try:
        local = calibrate(
            model,
            cfg,
            windows,
            ctx.device,
            state_dir,
            progress and ctx.rank == 0,
            blocks=mine,
            before_block=before,
            after_block=after,
            **options,
        )
    except DistributedCalibrationError:
        raise
    except BaseException as e:
        status.post(current[0], f"{type(e).__name__}: {e}")  # raises on every rank, this one included
        raise
    while done[0] < rounds:  # ranks with one block fewer keep answering
        done[0] += 1
        status.post()
    return _gather(local, ctx)


def _gather(local: CalibrationResult, ctx: Context) -> CalibrationResult:
    tensors = {f"{i}.{k}": v.contiguous() for i, st in local.state.items() for k, v in st.items()}
    summary = {
        "losses": {str(i): v for i, v in local.losses.items()},
        "seconds": local.seconds,
        "peak_gpu_bytes": local.peak_gpu_bytes,
    }
    t0 = time.perf_counter()
    payloads = _all_gather_bytes(save(tensors), ctx.group)
    summaries = [json.loads(b) for b in _all_gather_bytes(json.dumps(summary).encode(), ctx.group)]
    states: dict[int, dict] = {}
    for payload in payloads:
        for key, value in load(payload).items():
            block, name = key.split(".", 1)
            states.setdefault(int(block), {})[name] = value
    result = CalibrationResult(local.config)
    losses = {int(i): v for s in summaries for i, v in s["losses"].items()}
    for i in sorted(losses):  # a block without calibrated tensors (RTN) has a loss entry all the same
        result.state[i], result.losses[i] = states.get(i, {}), losses[i]
    result.seconds = max(s["seconds"] for s in summaries) + time.perf_counter() - t0
    peaks = [s["peak_gpu_bytes"] for s in summaries if s["peak_gpu_bytes"] is not None]
    result.peak_gpu_bytes = max(peaks) if peaks else None
    return result
