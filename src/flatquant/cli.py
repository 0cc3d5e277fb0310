"""Command line: ``flatquant quantize``, ``pack``, ``eval``, ``generate`` and ``report``.

The quantization options are generated from :class:`FlatQuantConfig`'s fields, so defaults live in one
place (the dataclass and its presets); an option left out takes the preset's value.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import types
import typing

import torch

from . import distributed
from .checkpoint import apply_calibration, load_quantized, save_quantized, write_calibration
from .config import PRESETS, FlatQuantConfig, calibration_for, describe_overrides, preset
from .data import (
    DEFAULT_CALIBRATION,
    DEFAULT_EVALUATION,
    calibration_mixture,
    check_text,
    eval_windows,
    load_text,
    tokenize,
)
from .evaluate import perplexity
from .files import atomic_write_json
from .loading import DEFAULT_MODEL, eos_token_ids, load_model, load_tokenizer
from .offload import PLACEMENTS
from .packed import HEAD_BITS, HEAD_GROUP, PACK_DTYPES, TENSORS_FILE, head_group_for, load_packed, pack
from .pipeline import quantize
from .report import device_name, library_versions, load_records, markdown_table, write_report
from .streaming import StreamingModel


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(FlatQuantConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    return (args[0] if optional else hint), optional


_SHORT_BITS = {"w": ("w_bits",), "a": ("a_bits",), "k": ("k_bits",), "v": ("v_bits",), "kv": ("k_bits", "v_bits")}


def parse_override(text: str) -> tuple[str, dict[str, int]]:
    """``PATTERN:SPEC`` -> (pattern, bits); SPEC is e.g. ``w8a8``, ``a8,w8`` or ``kv8`` (keys w, a, k, v, kv)."""
    pattern, sep, spec = text.rpartition(":")
    items = re.findall(r"(kv|w|a|k|v)(\d+)", spec)
    if not sep or not pattern or not items or re.sub(r"(kv|w|a|k|v)\d+|,", "", spec):
        raise argparse.ArgumentTypeError(
            f"--override {text!r}: expected PATTERN:BITS such as 'down_proj:a8,w8' or 'layers.0.:w8a8' "
            f"(bit keys {sorted(_SHORT_BITS)})"
        )
    bits = {key: int(value) for short, value in items for key in _SHORT_BITS[short]}
    return pattern, bits


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization options (default: the preset's value)")
    for f in dataclasses.fields(FlatQuantConfig):
        typ, optional = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = "{}" if f.default is dataclasses.MISSING else f.default
        help_text = f"{f.metadata.get('help', '')} [default {default}]"
        if typing.get_origin(typ) is dict:  # overrides: repeatable --override PATTERN:BITS
            group.add_argument(
                flag.rstrip("s"), dest=f.name, action="append", type=parse_override, default=None, help=help_text
            )
        elif typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif optional:

            def parse(s: str, typ=typ):
                return None if s.lower() == "none" else typ(s)

            group.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_text + " ('none' allowed)")
        else:
            group.add_argument(flag, type=typ, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> FlatQuantConfig:
    overrides = {}
    for f in dataclasses.fields(FlatQuantConfig):
        if f.name == "overrides" and getattr(args, f.name, None) is not None:
            merged: dict[str, dict[str, int]] = {}
            for pattern, bits in args.overrides:  # a repeated pattern adds to (and updates) its bits
                merged[pattern] = {**merged.pop(pattern, {}), **bits}
            overrides[f.name] = merged
        elif hasattr(args, f.name) and getattr(args, f.name) is not None:
            overrides[f.name] = getattr(args, f.name)
        elif hasattr(args, f.name) and _field_type(f)[1]:
            overrides[f.name] = None  # an explicit 'none' for an optional field
    return preset(args.preset, **overrides)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, folder or .gguf [default {DEFAULT_MODEL}]")
    parser.add_argument("--dtype", default=None, help="load dtype, e.g. bfloat16 [default: the checkpoint's]")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu [default: cuda when present]")
    parser.add_argument("--eval-data", nargs="*", default=list(DEFAULT_EVALUATION), help="names or files; none to skip")
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluate at most this many windows")
    parser.add_argument("--results-json", default=None, help="append result records to this JSON list")
    parser.add_argument("--tasks", nargs="*", default=[], help="lm-eval zero-shot tasks, e.g. arc_easy piqa")
    parser.add_argument("--tasks-path", default=None, help="folder of extra lm-eval task YAMLs (local data)")
    parser.add_argument("--limit", type=_limit, default=None, help="zero-shot: at most N documents per task")
    parser.add_argument("--zeroshot-batch-size", type=int, default=1, help="zero-shot: lm-eval batch size")
    parser.add_argument("--report", default=None, help="write report.json/.md (and a plot) into this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _limit(s: str) -> int | float:
    value = float(s)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit {s}: must be > 0 (a count, or a fraction below 1)")
    return int(value) if value >= 1 else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate, merge, evaluate and save a FlatQuant model")
    _add_common(q)
    q.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="base settings [default paper]")
    q.add_argument(
        "--calib-data",
        default=None,
        help="calibration text: a name or file, or a mixture NAME+NAME+... (equal shares; repeat a name for more) "
        f"[default: the preset's, {DEFAULT_CALIBRATION} except accurate: {calibration_for('accurate')}]",
    )
    q.add_argument("--output", default=None, help="checkpoint folder [default flatquant-out/<model>-<method>]")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--baselines", action="store_true", help="also evaluate FP, RTN and fixed rotation")
    s = q.add_argument_group(
        "scale-out (see docs/scale-out.md; several GPUs: torchrun --nproc-per-node N -m flatquant.cli)"
    )
    s.add_argument("--stream", action="store_true", help="read blocks one at a time from a local safetensors folder")
    s.add_argument("--offload", choices=PLACEMENTS, default="auto", help="where activations live [default auto]")
    s.add_argument("--offload-dir", default=None, help="folder of --offload disk files [default: the temp folder]")
    s.add_argument("--memory-budget", type=float, default=None, help="GB of GPU memory to plan with [default: all]")
    s.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds to wait for another rank [1800]")
    _add_config_options(q)
    p = sub.add_parser("pack", help="write the real 4-bit checkpoint of a calibration (or quantize first)")
    _add_common(p)
    p.set_defaults(eval_data=[])
    p.add_argument("--checkpoint", default=None, help="a folder written by 'flatquant quantize' [default: quantize]")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="without --checkpoint [default paper]")
    p.add_argument("--calib-data", default=None, help="without --checkpoint: calibration text [the preset's]")
    p.add_argument("--output", required=True, help="packed checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--packed-dtype",
        choices=PACK_DTYPES,
        default=None,
        help="dtype of the unquantized tensors (embeddings, norms, lm_head) in the checkpoint [default: the model's]",
    )
    p.add_argument(
        "--head-bits",
        type=int,
        choices=HEAD_BITS,
        default=16,
        help="8: input embedding and lm_head as int8 codes + scales (about half their bytes) [default 16]",
    )
    p.add_argument(
        "--head-group",
        type=int,
        default=HEAD_GROUP,
        help=f"with --head-bits 8: columns per scale, a multiple of 16 dividing the hidden size; 0 = one scale per "
        f"row [default {HEAD_GROUP}, or the largest of 64/32/16 that divides the hidden size]",
    )
    _add_config_options(p)
    e = sub.add_parser("eval", help="perplexity of the original model, a saved calibration or a packed model")
    _add_common(e)
    e.add_argument("--checkpoint", default=None, help="a folder written by 'flatquant quantize'")
    e.add_argument("--packed", default=None, help="a folder written by 'flatquant pack' (real 4-bit inference)")
    g = sub.add_parser("generate", help="generate text with a packed model (INT4 cache, graph-replayed decode on CUDA)")
    g.add_argument("--packed", required=True, help="a folder written by 'flatquant pack'")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"where the tokenizer comes from [default {DEFAULT_MODEL}]")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens up to p")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu [default: cuda when present]")
    g.add_argument("--dtype", default=None, help="dtype of the unquantized tensors, e.g. bfloat16")
    g.add_argument("--no-graph", action="store_true", help="decode eagerly (no CUDA graph)")
    r = sub.add_parser("report", help="render result files of several runs side by side")
    r.add_argument("results", nargs="+", help="--results-json files or report.json files")
    r.add_argument("--out", default=None, help="also write report.json, report.md (and a plot) here")
    return parser


def _text_label(name: str) -> str:
    """'wiki' for the named text 'wiki', 'notes' for the file 'data/notes.txt'."""
    return os.path.splitext(os.path.basename(name))[0]


def _evaluate(model, tokenizer, args, label: str) -> dict[str, float]:
    out = {}
    for name in args.eval_data:
        windows = eval_windows(tokenize(tokenizer, load_text(name)), args.eval_seqlen, args.eval_windows)
        text = _text_label(name)
        out[text] = perplexity(model, windows, args.device, progress=not args.quiet, desc=f"{label} {text}")
    return out


def _zeroshot(model, tokenizer, args) -> dict | None:
    if not args.tasks:
        return None
    from .zeroshot import run_tasks

    return run_tasks(
        model,
        tokenizer,
        args.tasks,
        include_path=args.tasks_path,
        limit=args.limit,
        batch_size=args.zeroshot_batch_size,
        device=args.device,
    )


def _record(
    args, method: str, cfg: FlatQuantConfig | None, ppl: dict, seconds: float | None, zs: dict | None = None
) -> dict:
    bits = (16, 16, 16) if cfg is None else (cfg.w_bits, cfg.a_bits, cfg.k_bits)
    return {
        "model": args.model,
        "method": method,
        "w_bits": bits[0],
        "a_bits": bits[1],
        "kv_bits": bits[2],
        "v_bits": 16 if cfg is None else cfg.v_bits,
        "weights": cfg.weight_method if cfg is not None else None,
        "notes": None if cfg is None else describe_overrides(cfg.overrides),
        **{f"{name}_ppl": value for name, value in ppl.items()},
        "eval_windows": args.eval_windows,
        "eval_seqlen": args.eval_seqlen,
        "calib_seconds": seconds,
        # the calibration text, where this command calibrated (FlatQuant training or GPTQ's Hessians)
        "calib": getattr(args, "calib_data", None)
        if cfg is not None and _calibrates(cfg) and getattr(args, "checkpoint", None) is None
        else None,
        "preset": getattr(args, "preset", None),
        "device": device_name(args.device),
        **(
            {}
            if zs is None
            else {"zeroshot": zs["scores"], "paper_mean": zs["paper_mean"], "zeroshot_settings": zs["settings"]}
        ),
        "checkpoint": getattr(args, "checkpoint", None),
        "config": None if cfg is None else dataclasses.asdict(cfg),
        "versions": library_versions(),
    }


def _print_table(records: list[dict], names: list[str]) -> None:
    header = f"{'method':<12}{'weights':<9}{'W/A/KV':<10}" + "".join(f"{n + ' PPL':>14}" for n in names)
    header += f"{'calib s':>10}  notes"
    print(header)
    print("-" * len(header))
    for r in records:
        bits = f"{r['w_bits']}/{r['a_bits']}/{r['kv_bits']}"
        ppl = "".join(f"{r.get(f'{n}_ppl', float('nan')):>14.3f}" for n in names)
        secs = f"{'':>10}" if r["calib_seconds"] is None else f"{r['calib_seconds']:>10.1f}"
        print(f"{r['method']:<12}{r['weights'] or '-':<9}{bits:<10}{ppl}{secs}  {r['notes'] or ''}")


def _append_json(path: str, records: list[dict]) -> None:
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    atomic_write_json(path, existing + records)


def _offload_options(args) -> dict:
    return {"offload": args.offload, "offload_dir": args.offload_dir, "memory_budget": args.memory_budget}


def _calibrates(cfg: FlatQuantConfig) -> bool:
    return cfg.method == "flatquant" or cfg.weight_method == "gptq"


def _calibration_windows(tokenizer, args, cfg: FlatQuantConfig):
    if not _calibrates(cfg):
        return None
    return calibration_mixture(tokenizer, args.calib_data, cfg.nsamples, cfg.seqlen, cfg.seed)


def cmd_quantize(args) -> list[dict]:
    cfg = config_from_args(args)
    model_name = os.path.basename(os.path.normpath(args.model))
    output = args.output or os.path.join("flatquant-out", f"{model_name}-{cfg.method}")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite or choose another --output")
    if args.stream or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _quantize_scaled(args, cfg, output)
    model, tokenizer = load_model(args.model, args.dtype)
    original = copy.deepcopy(model) if args.baselines else None
    windows = _calibration_windows(tokenizer, args, cfg)  # GPTQ baselines use them too
    records = []
    if args.baselines:
        ppl = _evaluate(original, tokenizer, args, "fp")
        records.append(_record(args, "fp", None, ppl, None, _zeroshot(original, tokenizer, args)))
        for method in ("rtn", "rotation"):
            base = copy.deepcopy(original)
            bcfg = cfg.replace(method=method)
            seconds = _timed_quantize(base, bcfg, windows, args)
            ppl = _evaluate(base, tokenizer, args, method)
            records.append(_record(args, method, bcfg, ppl, seconds, _zeroshot(base, tokenizer, args)))
            del base
    seconds = _timed_quantize(model, cfg, windows, args, output + ".state", **_offload_options(args))
    save_quantized(model, output, overwrite=args.overwrite, metadata={"model": args.model, "calib": args.calib_data})
    shutil.rmtree(output + ".state", ignore_errors=True)  # the checkpoint now holds everything
    print(f"saved calibration to {output}")
    ppl = _evaluate(model, tokenizer, args, cfg.method)
    records.append(_record(args, cfg.method, cfg, ppl, seconds, _zeroshot(model, tokenizer, args)))
    return records


def _quantize_scaled(args, cfg: FlatQuantConfig, output: str) -> list[dict]:
    """Streamed and/or multi-process calibration: every rank calibrates its blocks, rank 0 writes and evaluates."""
    if args.baselines:
        raise ValueError("--baselines needs a single process without --stream")
    if cfg.weight_method == "gptq":
        raise ValueError(
            "--weight-method gptq needs a single process without --stream (GPTQ runs on the merged model); "
            "calibrate here with --weight-method rtn"
        )
    ctx = distributed.setup(args.device, args.dist_timeout)
    warning = slow_on_cpu(cfg, str(ctx.device))
    if warning and ctx.rank == 0:
        print(warning, file=sys.stderr)
    if args.stream:
        model = StreamingModel(args.model, args.dtype)
        tokenizer = load_tokenizer(args.model) if cfg.method == "flatquant" else None
    else:
        model, tokenizer = load_model(args.model, args.dtype)
    result = distributed.calibrate_distributed(
        model,
        cfg,
        _calibration_windows(tokenizer, args, cfg),
        device=ctx.device,
        state_dir=output + ".state",
        progress=not args.quiet,
        timeout=args.dist_timeout,
        **_offload_options(args),
    )
    if ctx.group is not None:  # the group this command joined: no more collectives
        torch.distributed.destroy_process_group()
    if ctx.rank != 0:
        return []
    meta = {
        "model": args.model,
        "calib": args.calib_data,
        "processes": ctx.world,
        "peak_gpu_bytes": result.peak_gpu_bytes,
    }
    write_calibration(result, model.config, output, overwrite=args.overwrite, metadata=meta)
    shutil.rmtree(output + ".state", ignore_errors=True)  # the checkpoint now holds everything
    peak = "" if result.peak_gpu_bytes is None else f", peak GPU memory {result.peak_gpu_bytes / 1e9:.2f} GB"
    print(f"saved calibration to {output} ({ctx.world} process(es), {result.seconds:.1f} s{peak})")
    ppl, zs = {}, None
    if args.stream:
        if args.eval_data or args.tasks:
            print(f"not evaluated (--stream); where it fits: flatquant eval --model {args.model} --checkpoint {output}")
    elif args.eval_data or args.tasks:
        model, tokenizer = load_model(args.model, args.dtype)  # a fresh copy: rank 0 prepared only its own blocks
        apply_calibration(model, result, ctx.device)
        ppl, zs = _evaluate(model, tokenizer, args, cfg.method), _zeroshot(model, tokenizer, args)
    record = _record(args, cfg.method, cfg, ppl, result.seconds, zs)
    record.update(processes=ctx.world, peak_gpu_bytes=result.peak_gpu_bytes, checkpoint=output)
    return [record]


def slow_on_cpu(cfg: FlatQuantConfig, device: str | None) -> str | None:
    """A warning when a FlatQuant calibration would train on the CPU with much more work than the quick preset
    (calibration tokens x epochs), which takes minutes there; None otherwise."""
    on_cpu = torch.device(device).type == "cpu" if device else not torch.cuda.is_available()
    quick = preset("quick")
    ratio = (cfg.nsamples * cfg.seqlen * cfg.epochs) / (quick.nsamples * quick.seqlen * quick.epochs)
    if cfg.method != "flatquant" or not on_cpu or ratio <= 4:
        return None
    return (
        f"warning: calibrating on the CPU with {cfg.nsamples} x {cfg.seqlen} tokens for {cfg.epochs} epochs, "
        f"{ratio:.0f}x the work of --preset quick (minutes on a few cores): expect many hours. A GPU takes minutes; "
        f"on the CPU --preset quick is the demonstration. Interrupted, the same command resumes."
    )


def _timed_quantize(model, cfg: FlatQuantConfig, windows, args, state_dir: str | None = None, **options) -> float:
    """Quantize ``model`` in place (resumable in ``state_dir``); the seconds it took."""
    warning = slow_on_cpu(cfg, args.device)
    if warning:
        print(warning, file=sys.stderr)
    t0 = time.perf_counter()
    quantize(model, cfg, windows, device=args.device, state_dir=state_dir, progress=not args.quiet, **options)
    return time.perf_counter() - t0


def _sixteen_bit_bytes(model) -> tuple[int, int]:
    """(all weights, input embedding + lm_head) of a model in bytes at 16 bits, a tied matrix once."""
    params = {id(p): p for p in model.parameters()}  # a shared (tied) tensor once
    ends = (model.get_input_embeddings(), model.get_output_embeddings())
    head = {id(m.weight): m.weight for m in ends if m is not None and id(m.weight) in params}
    return sum(2 * p.numel() for p in params.values()), sum(2 * w.numel() for w in head.values())


def _human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _size_summary(sixteen_bit: tuple[int, int], packed_bytes: int, head_bits: int, stored_bits: int = 16) -> str:
    """How much smaller the packed tensors are than the model's weights at 16 bits; where the unquantized
    embedding and lm_head (stored_bits each) are a large share of the packed tensors, the option that shrinks
    them."""
    total, head = sixteen_bit
    head = head * stored_bits // 16  # as stored
    line = (
        f"packed tensors {_human_bytes(packed_bytes)}: {total / max(packed_bytes, 1):.2f}x smaller than the "
        f"weights at 16 bits ({_human_bytes(total)})"
    )
    if head_bits == 16 and head >= 0.25 * packed_bytes:
        line += (
            f"; {_human_bytes(head)} of them are the input embedding and lm_head, kept in {stored_bits} bits "
            f"(--head-bits 8 stores those as int8 codes)"
        )
    return line


def cmd_pack(args) -> list[dict]:
    """Pack a saved (or fresh) calibration; with --eval-data, perplexity of the fake- and real-quant models."""
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite or choose another --output")
    if args.head_bits != 8 and args.head_group != HEAD_GROUP:
        raise ValueError(
            f"--head-group {args.head_group} applies to --head-bits 8 only (got --head-bits {args.head_bits})"
        )
    model, tokenizer = load_model(args.model, args.dtype)
    sixteen_bit = _sixteen_bit_bytes(model)  # before calibration adds its transforms
    group = args.head_group or None
    if args.head_bits == 8:  # a group that cannot work fails here, not after the calibration
        group = head_group_for(model.config.hidden_size, group)
    if args.checkpoint is not None:
        load_quantized(model, args.checkpoint, args.device)
    else:
        cfg = config_from_args(args)
        _timed_quantize(model, cfg, _calibration_windows(tokenizer, args, cfg), args, args.output + ".state")
    meta = {"model": args.model, "checkpoint": args.checkpoint}
    if args.checkpoint is None:  # calibrated here: on what
        meta["calib"] = args.calib_data
    pack(
        model,
        args.output,
        overwrite=args.overwrite,
        metadata=meta,
        dtype=args.packed_dtype,
        head_bits=args.head_bits,
        head_group=group,
    )
    shutil.rmtree(args.output + ".state", ignore_errors=True)
    print(f"saved packed model to {args.output}")
    stored = getattr(torch, args.packed_dtype) if args.packed_dtype else model.get_input_embeddings().weight.dtype
    packed_bytes = os.path.getsize(os.path.join(args.output, TENSORS_FILE))
    print(_size_summary(sixteen_bit, packed_bytes, args.head_bits, torch.finfo(stored).bits))
    cfg, seconds = model.flatquant.config, model.flatquant.seconds
    records = []
    if args.eval_data:
        records.append(_record(args, cfg.method, cfg, _evaluate(model, tokenizer, args, cfg.method), seconds))
        del model
        packed = load_packed(args.output, args.device)
        records.append(_record(args, "packed", cfg, _evaluate(packed, tokenizer, args, "packed"), seconds))
    return records


def cmd_eval(args) -> list[dict]:
    if args.packed is not None:
        if args.checkpoint is not None:
            raise ValueError("give either --checkpoint (fake quantization) or --packed (real 4-bit), not both")
        tokenizer = load_tokenizer(args.model)
        model = load_packed(args.packed, args.device)
        stored = model.flatquant_packed["flatquant_config"]
        cfg = None if stored is None else FlatQuantConfig.from_dict(stored)
        ppl = _evaluate(model, tokenizer, args, "packed")
        return [_record(args, "packed", cfg, ppl, None, _zeroshot(model, tokenizer, args))]
    model, tokenizer = load_model(args.model, args.dtype)
    if args.checkpoint is None:
        ppl = _evaluate(model, tokenizer, args, "fp")
        return [_record(args, "fp", None, ppl, None, _zeroshot(model, tokenizer, args))]
    load_quantized(model, args.checkpoint, args.device)
    cfg = model.flatquant.config
    ppl = _evaluate(model, tokenizer, args, cfg.method)
    return [_record(args, cfg.method, cfg, ppl, model.flatquant.seconds, _zeroshot(model, tokenizer, args))]


def cmd_generate(args) -> int:
    """Print each prompt's continuation and the decode speed."""
    from .kvcache import GenerationSession

    tokenizer = load_tokenizer(args.model)
    eos = eos_token_ids(args.model, tokenizer)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model = load_packed(args.packed, args.device, dtype)
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [(p, tokenizer(p, return_tensors="pt").input_ids.to(device)) for p in args.prompt]
    # one session for all prompts: its cache and CUDA graphs are made once and reused
    longest = max(ids.shape[1] for _, ids in prompts) + max(args.max_new_tokens, 1) - 1  # last token not cached
    session = GenerationSession(model, longest, use_graph=False if args.no_graph else None)
    for prompt, ids in prompts:
        t0 = time.perf_counter()
        out = session.generate(
            ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, eos_token_id=eos or None, generator=generator,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        new = out.shape[1] - ids.shape[1]
        print(f"{prompt}{tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}")
        print(f"  [{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s incl. prefill, {device_name(device)}]")
    return 0


def cmd_report(args) -> int:
    records = load_records(args.results)
    print(markdown_table(records), end="")
    if args.out:
        for path in write_report(records, args.out).values():
            print(f"wrote {path}")
    return 0


def _check_tasks(args) -> None:
    """Fail on an unknown task or a missing lm-eval before minutes of loading and calibration."""
    if args.tasks:
        from .zeroshot import task_manager

        task_manager(args.tasks, args.tasks_path)


def _check_eval_data(args) -> None:
    """``--eval-data none`` (or no value) skips evaluation; any other text must exist before calibration starts."""
    names = getattr(args, "eval_data", None)
    if not names:
        return
    if names == ["none"] and not os.path.isfile("none"):
        args.eval_data = []
        return
    for name in names:
        check_text(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "calib_data", "") is None:  # the preset's own calibration text
        args.calib_data = calibration_for(args.preset)
    try:
        if args.command == "report":
            return cmd_report(args)
        if args.command == "generate":
            return cmd_generate(args)
        _check_tasks(args)
        _check_eval_data(args)
        commands = {"quantize": cmd_quantize, "pack": cmd_pack, "eval": cmd_eval}
        records = commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, distributed.DistributedCalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:  # a rank other than 0 of a multi-process run: rank 0 reports
        return 0
    if args.eval_data:
        _print_table(records, [_text_label(n) for n in args.eval_data])
    if args.tasks:
        print(markdown_table(records), end="")
    if args.results_json:
        _append_json(args.results_json, records)
    if args.report:
        for path in write_report(records, args.report).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
