"""Block-by-block calibration (method.md section 4) with a resumable state on disk.

For each block: full-precision outputs of the original block are the targets and the next block's inputs;
the block is then swapped for its FlatQuant version and its transforms, scalings and clipping logits are
trained to match those targets. One block sits on the accelerator at a time. After every block its
calibrated parameters are written (atomically) to ``state_dir``, so an interrupted run continues from the
last finished block.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from .arch import spec_for
from .config import FlatQuantConfig
from .files import atomic_write, atomic_write_json
from .fusion import fused_calibration
from .prepare import CALIBRATED_TYPES, calibration_state, load_calibration_state, prepare_block
from .transforms import factor_cache, precompute_factors

_STATE_VERSION = 1


class _StopForward(Exception):
    pass


@dataclass
class CalibrationResult:
    """What calibration produced: the config and every block's calibrated tensors (CPU)."""

    config: FlatQuantConfig
    state: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    rounded: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # GPTQ codes per block


def fingerprint(config: FlatQuantConfig, model: nn.Module, data: torch.Tensor | None) -> str:
    """Identifies a calibration job: config, model shape and calibration tokens."""
    h = hashlib.sha256(json.dumps(config.calibration_dict(), indent=2, sort_keys=True).encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    if data is not None:
        h.update(data.numpy().tobytes())
    return h.hexdigest()[:16]


class _ResumeState:
    """``state_dir/progress.json`` plus one safetensors file per finished block."""

    def __init__(self, state_dir: str | None, fp: str):
        self.dir, self.fp, self.done, self.seconds = state_dir, fp, {}, {}
        if state_dir is None:
            return
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(state_dir, "progress.json")
        if os.path.exists(path):
            with open(path) as f:
                prog = json.load(f)
            if prog.get("fingerprint") != fp:
                raise ValueError(
                    f"{state_dir} holds a calibration of another job (fingerprint {prog.get('fingerprint')} "
                    f"!= {fp}); use another state directory or delete it"
                )
            self.done = {int(k): v for k, v in prog.get("losses", {}).items()}
            self.seconds = {int(k): v for k, v in prog.get("seconds", {}).items()}

    def block_path(self, i: int) -> str:
        return os.path.join(self.dir, f"block_{i:04d}.safetensors")

    def load(self, i: int) -> dict[str, torch.Tensor] | None:
        if self.dir is None or i not in self.done or not os.path.exists(self.block_path(i)):
            return None
        return load_file(self.block_path(i))

    def save(self, i: int, state: dict[str, torch.Tensor], loss: float, seconds: float) -> None:
        if self.dir is None:
            return
        atomic_write(self.block_path(i), save({k: v.contiguous() for k, v in state.items()}))
        self.done[i], self.seconds[i] = loss, seconds
        atomic_write_json(
            os.path.join(self.dir, "progress.json"),
            {"version": _STATE_VERSION, "fingerprint": self.fp, "losses": self.done, "seconds": self.seconds},
        )


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device):
    """Hidden states entering block 0, (N, T, H) on ``device``, and the block's keyword arguments."""
    layers = model.get_submodule(spec_for(model).layers)
    home = model.get_input_embeddings().weight.device
    _move_except_layers(model, layers, device)  # everything but the blocks goes to the device
    captured, kwargs_box = [], {}

    def hook(_module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hs.detach())
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
    return torch.cat(captured, 0), kwargs


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
def _fp_forward(layer, spec, x, kwargs, batch_size, collect_stats: bool):
    """Full-precision outputs (same shape as x) and per-channel max|input| of the quantized linears."""
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
        out = torch.empty_like(x)
        for s in range(0, x.shape[0], batch_size):
            out[s : s + batch_size] = _block_out(layer(x[s : s + batch_size], **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out, stats


def _lr_lambda(total_steps: int):
    def f(step: int) -> float:  # cosine from 1 to 1e-3 of the base rate
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    return f


def _train_block(layer, x, y, kwargs, cfg: FlatQuantConfig, lr_scale: float, bar) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]
    clip = [p for n, p in layer.named_parameters() if p.requires_grad and "clip_" in n]
    clip_ids = {id(p) for p in clip}
    rest = [p for p in params if id(p) not in clip_ids]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": cfg.lr * lr_scale}, {"params": clip, "lr": cfg.clip_lr * lr_scale}],
        weight_decay=cfg.weight_decay,
        fused=x.device.type == "cuda",  # one kernel for all the small tensors: the steps are launch-bound
    )
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.epochs * steps_per_epoch))
    amp_dtype = getattr(torch, cfg.autocast_dtype)
    device_type = x.device.type
    g = torch.Generator().manual_seed(cfg.seed)
    loss_value = float("nan")
    for epoch in range(cfg.epochs):
        total = torch.zeros((), device=x.device)
        perm = torch.randperm(n, generator=g).to(x.device)  # one host-to-device copy per epoch, not per step
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            with factor_cache():
                with torch.autocast(device_type, enabled=False):
                    precompute_factors(layer)
                with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                    out = _block_out(layer(x[idx], **kwargs))
            loss = torch.nn.functional.mse_loss(out.float(), y[idx].float())
            objective = loss / loss.detach() if cfg.loss == "log-mse" else loss  # log-mse: gradient of log(MSE)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        loss_value = float(total) / steps_per_epoch  # one sync per epoch
        if not math.isfinite(loss_value):
            return loss_value
        if bar is not None:
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_value:.3g}")
    return loss_value


def calibrate(
    model: nn.Module,
    cfg: FlatQuantConfig,
    windows: torch.Tensor | None,
    device: torch.device | str | None = None,
    state_dir: str | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Swap every block of ``model`` in place and calibrate it; returns the calibrated tensors.

    windows: (N, T) token ids; needed when ``cfg.trains`` (FlatQuant) and for the scaling init.
    The blocks are left unmerged; call :func:`flatquant.merge_model` next.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = spec_for(model)
    layers = model.get_submodule(spec.layers)
    needs_data = cfg.method == "flatquant"
    if needs_data and windows is None:
        raise ValueError("method='flatquant' needs calibration windows (N, T) of token ids")
    resume = _ResumeState(state_dir, fingerprint(cfg, model, windows if needs_data else None))
    result = CalibrationResult(cfg)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    x = kwargs = None
    if needs_data:
        x, kwargs = capture_block_inputs(model, windows, device)
    bar = tqdm(range(len(layers)), desc="calibrating blocks", disable=not progress)
    for i in bar:
        block_start = time.perf_counter()
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        saved = resume.load(i)
        y = stats = None
        if needs_data:
            y, stats = _fp_forward(layer, spec, x, kwargs, cfg.batch_size, saved is None)
        prepare_block(layer, spec, model.config, cfg, stats, generator=g, layer_name=f"{spec.layers}.{i}")
        layer.to(device)
        if saved is not None:
            load_calibration_state(layer, saved)
            loss = resume.done[i]
        elif cfg.trains:
            loss = _calibrate_one(layer, x, y, kwargs, cfg, bar, i)
        else:
            loss = float("nan")
        state = calibration_state(layer)
        if saved is None:
            resume.save(i, state, loss, time.perf_counter() - block_start)
        else:  # count the time this block took when it was calibrated, not the reload
            start -= resume.seconds.get(i, 0.0) - (time.perf_counter() - block_start)
        result.state[i], result.losses[i] = state, loss
        for p in layer.parameters():
            p.requires_grad_(False)
        layer.to(home)
        x = y
        bar.set_postfix(block=i, loss=f"{loss:.3g}")
    result.seconds = time.perf_counter() - start
    return result


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
        with fused_calibration(x.device):
            loss = _train_block(layer, x, y, kwargs, cfg, lr_scale, bar)
        if math.isfinite(loss):
            return loss
        load_calibration_state(layer, initial)
        lr_scale /= 10
        tqdm.write(f"block {index}: non-finite loss, restarting at learning rate x{lr_scale:g}")
    raise RuntimeError(f"block {index}: the calibration loss stayed non-finite after lowering the learning rate")
