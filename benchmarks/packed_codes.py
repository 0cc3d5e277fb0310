"""Where the real-quant and the fake-quant model differ: integer codes per block and quantizer, same inputs.

Usage:
    PYTHONPATH=src python benchmarks/packed_codes.py --checkpoint runs/smollm2-w4a4kv4 \\
        [--model smollm2-135m] [--eval-data wiki] [--eval-seqlen 256] [--out benchmarks/results/packed_codes.json]

The fake-quant model runs one window and records every block's input and the input of each of its quantizers
(q/k/v input, K, V, o_proj input, gate/up input, down_proj input). The packed model (float32, the same
arithmetic) then runs with each block's input replaced by the fake-quant one, so every block is compared on
identical inputs, and records the integer codes its quantizers produce. For each quantizer the script counts
the codes that differ from the fake quantizer's codes and, for those, how far the fake-quant value x / scale
lies from the rounding boundary (in code steps). A block's first differing quantizer (in data-flow order:
q/k/v input, K, V, o_proj, gate/up, down_proj) holds its "root" flips; later quantizers of the block differ
because of them. Root flips at a distance of a few fp32 ulps (about 1e-6 steps) are rounding ties decided by
summation order; anything larger would be a real difference in how the two models compute.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import flatquant as fq
from flatquant.arch import spec_for
from flatquant.data import eval_windows, load_text, tokenize
from flatquant.files import atomic_write_json
from flatquant.loading import DEFAULT_MODEL, load_model
from flatquant.packed import pack
from flatquant.quantizer import ActivationQuantizer
from flatquant.report import device_name

SITES = ("qkv", "k", "v", "o", "gate_up", "down")  # data-flow order within a block


def fake_sites(layer, spec) -> dict[str, ActivationQuantizer]:
    attn, mlp = layer.get_submodule(spec.attn), layer.get_submodule(spec.mlp)
    return {
        "qkv": layer.get_submodule(spec.input_norm).transform.quant,
        "k": attn.flatquant_attn.k_quant,
        "v": attn.flatquant_attn.v_quant,
        "o": attn.get_submodule(spec.o).input_transform.quant,
        "gate_up": layer.get_submodule(spec.post_norm).transform.quant,
        "down": mlp.get_submodule(spec.down).input_transform.quant,
    }


def fake_codes(x: torch.Tensor, q: ActivationQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, x / scale) of the fake quantizer ``q`` (the operations of ``quantizer.fake_quantize``)."""
    xf = x.float()
    xmax, xmin = xf.amax(-1, keepdim=True).clamp_min(0), xf.amin(-1, keepdim=True).clamp_max(0)
    if q.clip_max is not None:
        xmax, xmin = xmax * torch.sigmoid(q.clip_max), xmin * torch.sigmoid(q.clip_min)
    if q.symmetric:
        qmax = 2 ** (q.bits - 1) - 1
        r = xf / (torch.maximum(xmax, -xmin).clamp_min(1e-8) / qmax)
        return r.round().clamp(-qmax - 1, qmax), r
    qmax = 2**q.bits - 1
    scale = (xmax - xmin).clamp_min(1e-8) / qmax
    r = xf / scale
    return (r.round() + torch.round(-xmin / scale)).clamp(0, qmax), r


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)


@torch.no_grad()
def compare(model, real, ids: torch.Tensor) -> list[dict]:
    spec = spec_for(model)
    fake_layers, real_layers = model.get_submodule(spec.layers), real.get_submodule(spec.layers)
    fake_in, block_in, block_out, real_ops, real_out = {}, {}, {}, {}, {}

    def keep(store, key):
        return lambda m, args, out=None: store.__setitem__(key, (args[0] if out is None else out).detach().clone())

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    hooks = []
    for i, layer in enumerate(fake_layers):
        for s, q in fake_sites(layer, spec).items():
            hooks.append(q.register_forward_pre_hook(keep(fake_in, (i, s))))
        hooks.append(layer.register_forward_pre_hook(keep(block_in, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: block_out.__setitem__(i, first(out))))
    model(ids, use_cache=False)
    for h in hooks:
        h.remove()

    hooks, patched = [], []
    for i, layer in enumerate(real_layers):
        attn, mlp = layer.get_submodule(spec.attn), layer.get_submodule(spec.mlp)
        shared = (attn.get_submodule(spec.q)._source[0], mlp.get_submodule(spec.gate)._source[0])
        for s, mod in zip(("qkv", "gate_up"), shared, strict=True):
            hooks.append(mod.register_forward_hook(lambda m, a, out, key=(i, s): real_ops.__setitem__(key, out)))
        for s, lin in (("o", attn.get_submodule(spec.o)), ("down", mlp.get_submodule(spec.down))):

            def quantize_input(x, orig=lin.quantize_input, key=(i, s)):
                real_ops[key] = op = orig(x)
                return op

            lin.quantize_input = quantize_input
            patched.append((lin, "quantize_input"))

        def quantize(k, v, orig=attn.kv_quant.quantize, i=i):
            real_ops[(i, "k")], real_ops[(i, "v")] = qk, qv = orig(k, v)
            return qk, qv

        def quantize_dequantize(k, v, dtype, out=None, kvq=attn.kv_quant, i=i):
            # a prompt into an empty cache (or no cache) quantizes and dequantizes in one launch: record the
            # codes it writes (quantize gives the same bits) and return what it returns
            real_ops[(i, "k")], real_ops[(i, "v")] = type(kvq).quantize(kvq, k, v)
            return type(kvq).quantize_dequantize(kvq, k, v, dtype, out)

        attn.kv_quant.quantize = quantize
        attn.kv_quant.quantize_dequantize = quantize_dequantize
        patched += [(attn.kv_quant, "quantize"), (attn.kv_quant, "quantize_dequantize")]

        def same_input(m, args, kwargs, i=i):  # the fake-quant model's input of this block
            if args:
                return (block_in[i],) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": block_in[i]}

        hooks.append(layer.register_forward_pre_hook(same_input, with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: real_out.__setitem__(i, first(out))))
    try:
        real(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for mod, name in patched:
            delattr(mod, name)

    rows = []
    for i, layer in enumerate(fake_layers):
        row = {"block": i, "root": None}
        for s, q in fake_sites(layer, spec).items():
            fc, r = fake_codes(fake_in[(i, s)], q)
            rc = real_ops[(i, s)][0]
            rc = (unpack_nibbles(rc) if s in ("k", "v") else rc).float().reshape(fc.shape)
            diff = rc != fc
            dist = (r - r.floor() - 0.5).abs()[diff]  # distance of each differing value to its boundary
            row[s] = {
                "codes": fc.numel(),
                "differ": int(diff.sum()),
                "max_boundary_dist": float(dist.max()) if dist.numel() else 0.0,
                "max_code_diff": float((rc - fc).abs().max()),
            }
            if row["root"] is None and row[s]["differ"]:
                row["root"] = s
        o_f, o_r = block_out[i].float(), real_out[i].float()
        row["out_rel_diff"] = float((o_f - o_r).norm() / o_f.norm())
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a folder written by 'flatquant quantize'")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model the calibration was made for")
    p.add_argument("--eval-data", default="wiki", help="text (name or file) of the window")
    p.add_argument("--eval-seqlen", type=int, default=256, help="tokens of the one window compared")
    p.add_argument("--packed", default=None, help="an existing packed checkpoint of the same calibration")
    p.add_argument("--out", default=None, help="results JSON (e.g. benchmarks/results/packed_codes.json)")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    fq.load_quantized(model, args.checkpoint, "cpu")
    model.eval()
    ids = eval_windows(tokenize(tokenizer, load_text(args.eval_data)), args.eval_seqlen, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.packed or pack(model, f"{tmp}/packed")
        # unfused: one GEMM per linear and the layer norms as modules, so every quantizer runs as its own call
        real = fq.load_packed(path, "cpu", torch.float32, fuse=False)
    rows = compare(model, real, ids)

    print(f"\n{'block':>5}{'root':>9}" + "".join(f"{s:>10}" for s in SITES) + f"{'root dist':>12}{'out rel':>10}")
    for r in rows:
        root = r["root"]
        dist = f"{r[root]['max_boundary_dist']:.1e}" if root else "-"
        cells = "".join(f"{r[s]['differ']:>10}" for s in SITES)
        print(f"{r['block']:>5}{root or '-':>9}{cells}{dist:>12}{r['out_rel_diff']:>10.1e}")
    codes = sum(r[s]["codes"] for r in rows for s in SITES)
    roots = [r[r["root"]] for r in rows if r["root"]]
    worst = max((x["max_boundary_dist"] for x in roots), default=0.0)
    clean = [r["out_rel_diff"] for r in rows if not r["root"]]
    print(
        f"\n{codes} codes compared; {len(roots)} of {len(rows)} blocks have root flips "
        f"({sum(x['differ'] for x in roots)} codes), all within {worst:.1e} code steps of a rounding boundary; "
        f"blocks without a flip: outputs agree to {max(clean, default=0.0):.1e} (relative)"
    )
    if args.out:
        record = {"device": device_name(torch.device("cpu")), "settings": vars(args), "blocks": rows}
        atomic_write_json(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
