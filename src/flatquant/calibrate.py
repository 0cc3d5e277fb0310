"""Block-by-block calibration (method.md section 4) with a resumable state on disk.

For each block: full-precision outputs of the original block are the targets and the next block's inputs;
the block is then swapped for its FlatQuant version and its transforms, scalings and clipping logits are
trained to match those targets. One block sits on the accelerator at a time. After every block its
calibrated parameters are written (atomically) to ``state_dir``, so an interrupted run continues from the
last finished block.

With ``calib_inputs="quantized"`` (an option, not the method's default) each block instead trains on the
outputs of the already calibrated, fake-quantized blocks before it, against the same full-precision targets,
so it can also make up for the error that reaches it; the blocks are then no longer independent.

Given their full-precision inputs the blocks are independent: ``blocks=`` calibrates a subset (the
multi-process driver in :mod:`flatquant.distributed` gives each rank a contiguous range), and the model can
be a :class:`flatquant.streaming.StreamingModel` that materialises one block at a time from safetensors
shards. Activations live on the device, in pinned CPU memory or in a memory-mapped file (:mod:`.offload`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

from . import envflags
from .arch import spec_for
from .config import FlatQuantConfig
from .files import atomic_write, atomic_write_json
from .fusion import fused_calibration
from .offload import Activations, as_activations, choose_placement
from .prepare import (
    CALIBRATED_TYPES,
    calibration_state,
    load_calibration_state,
    prepare_block,
    use_flatquant_attention,
)
from .transforms import factor_cache, precompute_factors

_STATE_VERSION = 2


class _StopForward(Exception):
    pass


@dataclass
class CalibrationResult:
    """What calibration produced: the config and every block's calibrated tensors (CPU)."""

    config: FlatQuantConfig
    state: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated during calibration (max over ranks)
    rounded: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # GPTQ codes per block


def fingerprint(config: FlatQuantConfig, model: nn.Module, data: torch.Tensor | None) -> str:
    """Identifies a calibration job: config, model shape and calibration tokens."""
    h = hashlib.sha256(json.dumps(config.calibration_dict(), indent=2, sort_keys=True).encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    if data is not None:
        h.update(data.numpy().tobytes())
    return h.hexdigest()[:16]


class _ResumeState:
    """``state_dir/progress.json`` (format and job fingerprint) plus one safetensors file per finished block.

    A block's loss and time are kept in its own file's metadata, so several processes calibrating different
    blocks can share one directory, and a restart with any number of processes skips every finished block.
    """

    def __init__(self, state_dir: str | None, fp: str):
        self.dir, self.fp = state_dir, fp
        if state_dir is None:
            return
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(state_dir, "progress.json")
        if os.path.exists(path):
            with open(path) as f:
                prog = json.load(f)
            if prog.get("version") != _STATE_VERSION:
                raise ValueError(
                    f"{state_dir} was written by another version of flatquant (state format "
                    f"{prog.get('version')}, this one reads {_STATE_VERSION}); use another state directory or delete it"
                )
            if prog.get("fingerprint") != fp:
                raise ValueError(
                    f"{state_dir} holds a calibration of another job (fingerprint {prog.get('fingerprint')} "
                    f"!= {fp}); use another state directory or delete it"
                )
        else:  # every process writes the same content: a race between them is harmless
            atomic_write_json(path, {"version": _STATE_VERSION, "fingerprint": fp})

    def block_path(self, i: int) -> str:
        return os.path.join(self.dir, f"block_{i:04d}.safetensors")

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], float, float] | None:
        """(calibrated tensors, loss, seconds) of a finished block, or None."""
        if self.dir is None or not os.path.exists(self.block_path(i)):
            return None
        with safe_open(self.block_path(i), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        return state, float(meta.get("loss", "nan")), float(meta.get("seconds", "0"))

    def save(self, i: int, state: dict[str, torch.Tensor], loss: float, seconds: float) -> None:
        if self.dir is None:
            return
        meta = {"loss": repr(float(loss)), "seconds": repr(float(seconds))}
        atomic_write(self.block_path(i), save({k: v.contiguous() for k, v in state.items()}, metadata=meta))


def block_generator(seed: int, index: int) -> torch.Generator:
    """The generator of block ``index``'s random starts: independent of which process calibrates it."""
    digest = hashlib.sha256(f"flatquant:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class _ModelBlocks:
    """The blocks of a model held in memory: calibrated in place, one at a time on the device."""

    in_place = True

    def __init__(self, model: nn.Module):
        use_flatquant_attention(model)  # the calibrated blocks run their K/V quantizers in it (idempotent)
        self.model, self.config = model, model.config
        self.layers = model.get_submodule(spec_for(model).layers)
        self._homes: dict[int, torch.device] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def capture(self, windows, device, make_store=None):
        return capture_block_inputs(self.model, windows, device, make_store)

    def block(self, i: int, device) -> nn.Module:
        layer = self.layers[i]
        self._homes[i] = next(layer.parameters()).device
        return layer.to(device)

    def release(self, i: int, layer: nn.Module) -> None:
        layer.to(self._homes.pop(i))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device, make_store=None):
    """Hidden states entering block 0, (N, T, H) on ``device``, and the block's keyword arguments.

    make_store: ``(shape, dtype) -> Activations``; when given, the rows are written there as they come and
    the store is returned instead of one tensor.
    """
    layers = model.get_submodule(spec_for(model).layers)
    home = model.get_input_embeddings().weight.device
    _move_except_layers(model, layers, device)  # everything but the blocks goes to the device
    captured, kwargs_box, store = [], {}, []

    def hook(_module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        if make_store is None:
            captured.append(hs.detach())
        else:
            if not store:
                store.append(make_store((len(windows), *hs.shape[1:]), hs.dtype))
            store[0].write(len(captured), hs.detach())
            captured.append(None)
        if not kwargs_box:
            kwargs_box.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in windows:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_except_layers(model, layers, home)
    kwargs = dict(kwargs_box)
    for key in ("use_cache",):
        kwargs[key] = False
    for key in ("past_key_values", "cache", "past_key_value"):
        kwargs.pop(key, None)
    return (torch.cat(captured, 0) if make_store is None else store[0]), kwargs


def _move_except_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    layer_ids = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) in layer_ids:
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                module._buffers[name] = b.to(device)


def _block_out(out):
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def _fp_forward(layer, spec, x, kwargs, batch_size, collect_stats: bool, out: Activations | None = None):
    """Full-precision outputs (same shape as x) and per-channel max|input| of the quantized linears.

    x: a tensor or :class:`Activations`; the outputs go to ``out`` (default: a tensor like x).
    """
    raw = torch.is_tensor(x)
    x = as_activations(x)
    out = out if out is not None else Activations.wrap(torch.empty_like(x.data))
    stats, handles = {}, []
    if collect_stats:
        targets = {
            "qkv": layer.get_submodule(f"{spec.attn}.{spec.q}"),
            "upgate": layer.get_submodule(f"{spec.mlp}.{spec.up}"),
            "down": layer.get_submodule(f"{spec.mlp}.{spec.down}"),
        }
        for key, mod in targets.items():

            def hook(_m, args, key=key):
                cur = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                stats[key] = cur if key not in stats else torch.maximum(stats[key], cur)

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        for s in range(0, len(x), batch_size):
            out.write(s, _block_out(layer(x.read(s, s + batch_size), **kwargs)))
    finally:
        for h in handles:
            h.remove()
    return (out.data if raw else out), stats


@torch.no_grad()
def _quant_forward(layer, x, kwargs, cfg: FlatQuantConfig, out: Activations) -> None:
    """Outputs of a calibrated (fake-quantized) block for all rows of ``x``, in the training precision."""
    amp_dtype = getattr(torch, cfg.autocast_dtype)
    device_type = x.device.type
    with fused_calibration(x.device), factor_cache():  # the compiled fake-quant functions, as in training
        with torch.autocast(device_type, enabled=False):
            precompute_factors(layer)
        for s in range(0, len(x), cfg.batch_size):
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                out.write(s, _block_out(layer(x.read(s, s + cfg.batch_size), **kwargs)))


def _lr_lambda(total_steps: int):
    def f(step: int) -> float:  # cosine from 1 to 1e-3 of the base rate
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    return f


# On CUDA each training step is replayed from a CUDA graph (FLATQUANT_CALIB_GRAPH=0 turns it off). A SmolLM2 step
# is ~7 ms of GPU work; run eagerly it took 28 ms of host time (docs/pipeline.md), replayed 11 ms. The batched
# factor solve runs on cuSOLVER inside the calibration (fusion.fused_calibration): MAGMA, PyTorch's default for
# batches of small matrices, synchronises with the host and cannot be captured. A step that still cannot be
# captured runs eagerly, and the warning names the innermost frames of the failure.
CALIB_GRAPH = envflags.switch("FLATQUANT_CALIB_GRAPH", True, "eager steps", "CUDA-graph replays")
_GRAPH_WARMUP_STEPS = 3  # eager steps (compilation, optimiser state) before the capture


def _graphable(x, y, n: int, batch_size: int) -> bool:
    """Whether the training steps can be captured: CUDA, activations on the device (rows are gathered by a
    device-side index, no host copy), and full batches only (one captured shape)."""
    return (
        CALIB_GRAPH
        and x.device.type == "cuda"
        and x.where == "device"
        and y.where == "device"
        and n % batch_size == 0
        and n // batch_size > _GRAPH_WARMUP_STEPS
    )


def _block_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The block objective: plain MSE, or (``token-mse``) each token's squared error over its target's squared
    norm, averaged over tokens, so that the few tokens with huge residual norms do not outweigh the rest."""
    if kind != "token-mse":
        return torch.nn.functional.mse_loss(out, target)
    err = (out - target).square().sum(-1)
    return (err / target.square().sum(-1).clamp_min(1e-12)).mean()


def _train_block(layer, x, y, kwargs, cfg: FlatQuantConfig, lr_scale: float, bar) -> float:
    x, y = as_activations(x), as_activations(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    clip = [p for n, p in layer.named_parameters() if p.requires_grad and "clip_" in n]
    clip_ids = {id(p) for p in clip}
    rest = [p for p in params if id(p) not in clip_ids]
    n = len(x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    graphed = _graphable(x, y, n, cfg.batch_size)
    base = (cfg.lr * lr_scale, cfg.clip_lr * lr_scale)
    # a captured step reads its learning rates from device tensors, set in place before each replay
    lrs = [torch.tensor(b, device=x.device) for b in base] if graphed else list(base)
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": lrs[0]}, {"params": clip, "lr": lrs[1]}],
        weight_decay=cfg.weight_decay,
        fused=x.device.type == "cuda",  # one kernel for all the small tensors: the steps are launch-bound
        capturable=graphed,
    )
    lr_factor = _lr_lambda(cfg.epochs * steps_per_epoch)  # cosine to 1e-3 of the rate, stepped per batch
    amp_dtype = getattr(torch, cfg.autocast_dtype)
    device_type = x.device.type
    g = torch.Generator().manual_seed(cfg.seed)
    total = torch.zeros((), device=x.device)
    idx_buf = torch.zeros(cfg.batch_size, dtype=torch.long, device=x.index_device)

    def step(idx: torch.Tensor) -> None:
        """One optimiser step on rows ``idx``; adds its loss to ``total`` (no host synchronisation)."""
        with factor_cache():
            with torch.autocast(device_type, enabled=False):
                precompute_factors(layer)
            with torch.autocast(
                device_type, dtype=amp_dtype, enabled=amp_dtype != torch.float32, cache_enabled=not graphed
            ):
                out = _block_out(layer(x.rows(idx), **kwargs))
        loss = _block_loss(out.float(), y.rows(idx).float(), cfg.loss)
        objective = loss / loss.detach() if cfg.loss == "log-mse" else loss  # log-mse: gradient of log(MSE)
        opt.zero_grad(set_to_none=not graphed)  # a captured step keeps its gradient tensors
        objective.backward()
        opt.step()
        total.add_(loss.detach())

    graph, k = None, 0
    loss_value = float("nan")
    for epoch in range(cfg.epochs):
        total.zero_()
        perm = torch.randperm(n, generator=g).to(x.index_device)  # one host-to-device copy per epoch, not per step
        for s in range(0, n, cfg.batch_size):
            for group, b in zip(opt.param_groups, base, strict=True):
                if graphed:
                    group["lr"].fill_(b * lr_factor(k))
                else:
                    group["lr"] = b * lr_factor(k)
            if not graphed:
                step(perm[s : s + cfg.batch_size])
            else:
                idx_buf.copy_(perm[s : s + cfg.batch_size])
                if graph is None and k >= _GRAPH_WARMUP_STEPS:
                    graph = _capture(step, idx_buf)
                    graphed = graph is not None  # not capturable: this step and the rest run eagerly
                if graph is not None:
                    graph.replay()
                else:
                    _side_stream_step(step, idx_buf)
            k += 1
        loss_value = float(total) / steps_per_epoch  # one sync per epoch
        if not math.isfinite(loss_value):
            return loss_value
        if bar is not None:
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_value:.3g}")
    return loss_value


def _side_stream_step(step, idx: torch.Tensor) -> None:
    """An eager step on a side stream, as CUDA-graph warm-up wants (lazy initialisations off the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(idx)
    torch.cuda.current_stream().wait_stream(side)


def _capture(step, idx: torch.Tensor):
    """A CUDA graph of ``step(idx)`` (nothing executed yet), or None with a warning if it cannot be captured."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step(idx)
    except Exception as err:  # e.g. a host synchronisation inside the step
        frames = traceback.extract_tb(err.__traceback__)[-4:]  # where in the step: the innermost frames
        where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)
        first = str(err).splitlines()[0][:200] if str(err) else ""
        tqdm.write(f"calibration step not capturable ({type(err).__name__}: {first}; at {where}); running eagerly")
        return None
    return graph


def calibrate(
    model,
    cfg: FlatQuantConfig,
    windows: torch.Tensor | None,
    device: torch.device | str | None = None,
    state_dir: str | None = None,
    progress: bool = True,
    *,
    blocks=None,
    offload: str = "auto",
    memory_budget: float | None = None,
    offload_dir: str | None = None,
    before_block=None,
    after_block=None,
) -> CalibrationResult:
    """Swap every block of ``model`` in place and calibrate it; returns the calibrated tensors.

    model: a model in memory (calibrated in place), or a :class:`flatquant.streaming.StreamingModel`
    (blocks materialised one at a time; only the returned tensors are kept).
    windows: (N, T) token ids; needed when ``cfg.trains`` (FlatQuant) and for the scaling init.
    blocks: the block indices to calibrate (default all); the others only run in full precision, and only
    as far as needed to produce the inputs of the last block to train.
    offload: where the activations live, ``auto``, ``device``, ``cpu`` (pinned) or ``disk`` (memory-mapped
    files in ``offload_dir``, default the system's temporary folder); memory_budget: GB of GPU memory
    that ``auto`` plans with (see :func:`flatquant.offload.choose_placement`).
    before_block: called with the index of every block about to be worked on (full precision or
    calibration); after_block: with the index of each calibrated block once it is done.
    The blocks are left unmerged; call :func:`flatquant.merge_model` next.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = spec_for(model)
    source = model if getattr(model, "streams_blocks", False) else _ModelBlocks(model)
    n = len(source)
    todo = sorted(set(range(n) if blocks is None else blocks))
    if any(not 0 <= i < n for i in todo):
        raise ValueError(f"blocks={todo} must lie in 0..{n - 1}")
    needs_data = cfg.method == "flatquant"
    if needs_data and windows is None:
        raise ValueError("method='flatquant' needs calibration windows (N, T) of token ids")
    choose_placement(0, device, offload, memory_budget)  # validates the options
    quantized_inputs = needs_data and cfg.trains and cfg.calib_inputs == "quantized"
    if quantized_inputs and todo != list(range(n)):
        raise ValueError(
            f"calib_inputs='quantized' needs every block calibrated in one process (got blocks={todo} of {n}): "
            "each block's inputs come from the calibrated blocks before it; use calib_inputs='fp' to split the work"
        )
    resume = _ResumeState(state_dir, fingerprint(cfg, source, windows if needs_data else None))
    saved = {i: resume.load(i) for i in todo}
    train = [i for i in todo if saved[i] is None]
    last = max(train) if needs_data and train else -1  # blocks up to here run in full precision
    result = CalibrationResult(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()

    def make_store(shape, dtype):
        # inputs and targets, and the quantized model's inputs and outputs with calib_inputs="quantized"
        nbytes = (4 if quantized_inputs else 2) * dtype.itemsize * math.prod(shape)
        return Activations(shape, dtype, device, choose_placement(nbytes, device, offload, memory_budget), offload_dir)

    x = y = xq = kwargs = None
    if last >= 0:
        x, kwargs = source.capture(windows, device, make_store)
        if quantized_inputs:  # block 0's inputs: the embeddings, which are not quantized
            xq = make_store(x.shape, x.dtype)
            for s in range(0, len(x), cfg.batch_size):
                xq.write(s, x.read(s, s + cfg.batch_size))
    bar = tqdm(total=len(todo), desc="calibrating blocks", disable=not progress)
    try:
        for i in range(n):
            full_precision, mine = i <= last, i in saved
            if not full_precision and not (mine and (source.in_place or saved[i] is None)):
                if mine:  # finished earlier and nothing to apply it to: take the saved tensors
                    result.state[i], result.losses[i], seconds = saved[i]
                    start -= seconds
                    bar.update()
                continue
            if before_block is not None:
                before_block(i)
            block_start = time.perf_counter()
            layer = source.block(i, device)
            y = stats = None
            if full_precision:
                out = make_store(x.shape, x.dtype)
                y, stats = _fp_forward(layer, spec, x, kwargs, cfg.batch_size, mine and saved[i] is None, out)
            if mine:
                inputs = xq if quantized_inputs and full_precision else x
                loss = _calibrate_block(
                    layer, i, spec, source.config, cfg, stats, saved[i], inputs, y, kwargs, bar, device
                )
                if quantized_inputs and full_precision and i < last:  # the next block's quantized inputs
                    xq_next = make_store(x.shape, x.dtype)
                    _quant_forward(layer, xq, kwargs, cfg, xq_next)
                    xq.close()
                    xq = xq_next
                state = calibration_state(layer)
                if saved[i] is None:
                    resume.save(i, state, loss, time.perf_counter() - block_start)
                else:  # count the time this block took when it was calibrated, not the reload
                    start -= saved[i][2] - (time.perf_counter() - block_start)
                result.state[i], result.losses[i] = state, loss
            source.release(i, layer)
            if full_precision:
                x.close()
                x = y
            if mine:
                bar.update()
                loss_i = result.losses[i]  # NaN: nothing trained in this block (e.g. RTN, rotation, 16 bits)
                bar.set_postfix(block=i, loss="-" if math.isnan(loss_i) else f"{loss_i:.3g}")
                if after_block is not None:
                    after_block(i)
    finally:  # free the activations (remove their files), also after an error
        for store in (x, y, xq):
            if store is not None:
                store.close()
        bar.close()
    result.seconds = time.perf_counter() - start
    if device.type == "cuda":
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _calibrate_block(layer, i, spec, model_config, cfg, stats, saved, x, y, kwargs, bar, device) -> float:
    """Swap block ``i``'s modules, then load its saved calibration or train it; returns its loss."""
    prepare_block(
        layer, spec, model_config, cfg, stats, generator=block_generator(cfg.seed, i), layer_name=f"{spec.layers}.{i}"
    )
    layer.to(device)
    if saved is not None:
        load_calibration_state(layer, saved[0])
        loss = saved[1]
    elif cfg.trains:
        loss = _calibrate_one(layer, x, y, kwargs, cfg, bar, i)
    else:
        loss = float("nan")
    for p in layer.parameters():
        p.requires_grad_(False)
    return loss


def _calibrate_one(layer, x, y, kwargs, cfg, bar, index: int) -> float:
    """Train one block; on a non-finite loss restart it from its start at a tenth of the rate (twice)."""
    for p in layer.parameters():
        p.requires_grad_(False)
    trainable = calibration_state(layer)
    initial = {k: v.clone() for k, v in trainable.items()}
    for m in layer.modules():
        if isinstance(m, CALIBRATED_TYPES):
            for p in m.parameters():
                p.requires_grad_(True)
    if not any(p.requires_grad for p in layer.parameters()):
        return float("nan")  # nothing in this block is quantized (e.g. a block kept in 16 bits)
    lr_scale = 1.0
    for _attempt in range(3):
        with fused_calibration(as_activations(x).device):
            loss = _train_block(layer, x, y, kwargs, cfg, lr_scale, bar)
        if math.isfinite(loss):
            return loss
        load_calibration_state(layer, initial)
        lr_scale /= 10
        tqdm.write(f"block {index}: non-finite loss, restarting at learning rate x{lr_scale:g}")
    raise RuntimeError(f"block {index}: the calibration loss stayed non-finite after lowering the learning rate")
