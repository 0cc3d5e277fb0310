"""Packed real-quant checkpoints: ``pack`` a calibrated, merged model, ``load_packed`` it without its weights.

A packed checkpoint is a folder with ``flatquant-packed.json`` (format name and version, the model's Hugging Face
config, the architecture spec, bits and transform sizes) and ``model.safetensors`` (int4 weights two per byte,
scales, transform factors, clipping ratios, and the unquantized embeddings, norms and lm_head). The layout is
specified in docs/packed-format.md.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from . import envflags
from .arch import (
    BUILTIN_ARCHITECTURES,
    ArchSpec,
    register_architecture,
    set_submodule,
    spec_for,
    supported_architectures,
)
from .files import atomic_directory, read_format_json
from .kernels.gemm_w4a4 import pack_int4
from .kernels.rmsnorm import fuse_rms_norms
from .kernels.rope import fuse_rotary
from .kernels.silu_mul import FusedGatedMLP, fuse_silu_mul
from .kernels.w4a4_linear import W4A4Linear
from .modules import FlatQuantLinear, OnlineTransform
from .prepare import _dims
from .runtime import (
    DeferredRMSNorm,
    Int8Embedding,
    Int8Linear,
    KVQuant,
    ResidualFusedLayer,
    SharedInputLinear,
    SharedInputQuant,
    quantize_rows_int8,
    residual_fused_class,
    use_packed_attention,
)

FORMAT = "flatquant-packed"
FORMAT_VERSION = 1
CONFIG_FILE, TENSORS_FILE = "flatquant-packed.json", "model.safetensors"
_FP32_TENSORS = ("w_scale", "weight_scale", "act_clip", "k_clip", "v_clip", "p_h", "p_h_inv")
# the input embedding and lm_head: int8 codes + fp32 scales (one per HEAD_GROUP columns of a row), or unquantized
HEAD_BITS = (8, 16)
HEAD_GROUP = 128


def head_group_for(hidden: int, group: int | None = HEAD_GROUP) -> int | None:
    """The scale group of an 8-bit head over ``hidden`` columns: ``group`` if it divides ``hidden``; for the
    default, the largest of 128 / 64 / 32 / 16 that does (None when none does: one scale per row); None stays
    None. A group the kernel cannot use (not a multiple of 16, or not dividing ``hidden``) is an error."""
    if group is None:
        return None
    if group < 16 or group % 16 or hidden % group:
        if group == HEAD_GROUP:
            return next((g for g in (64, 32, 16) if hidden % g == 0), None)
        raise ValueError(f"head_group={group!r} must be a multiple of 16 that divides the hidden size {hidden}")
    return group


def _as_stored(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A packed tensor in ``dtype`` if it is one of the unquantized float tensors (not codes, not fp32 ones)."""
    return t.to(dtype) if t.is_floating_point() and not name.endswith(_FP32_TENSORS) else t


# ------------------------------------------------------------------------------------------------- packing
def _check_packable(model: nn.Module) -> ArchSpec:
    spec = spec_for(model)
    layers = model.get_submodule(spec.layers)
    q = layers[0].get_submodule(spec.attn).get_submodule(spec.q)
    if not isinstance(q, FlatQuantLinear) or not q.merged:
        raise ValueError("pack needs a calibrated, merged model: run flatquant.quantize or load_quantized first")
    result = getattr(model, "flatquant", None)
    if result is not None:
        want = dict(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_group_size=None, w_symmetric=True)
        want.update(kv_symmetric=False, overrides={})
        bad = {k: getattr(result.config, k) for k, v in want.items() if getattr(result.config, k) != v}
        if bad:
            raise ValueError(f"the packed runtime supports {want}; this model has {bad}")
    if getattr(q, "weight_scale", None) is None:
        raise ValueError("the merged model has no weight scales (16-bit weights, or merged by an older flatquant)")
    return spec


def _transform(t: OnlineTransform) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(P1, P2) of a merged online transform, P2 the identity where only P1 is learned (P_o)."""
    p1 = getattr(t, "p1_fixed", None)
    if p1 is None:
        return None
    p2 = t.p2_fixed
    if p2 is None:
        p2 = torch.eye(t.n // p1.shape[0], dtype=p1.dtype, device=p1.device)
    return p1, p2


def _input_tensors(t: OnlineTransform, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {"act_clip": torch.tensor(t.quant.clip_ratios(), dtype=torch.float32)}
    pair = _transform(t)
    if pair is not None:
        out["p1"], out["p2"] = (p.to(dtype) for p in pair)
    return out


def _weight_tensors(lin: FlatQuantLinear, dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """Packed codes, fp32 scale and bias of a merged layer; its weight holds codes * scale."""
    scale = lin.weight_scale.reshape(-1).double()  # (N,)
    ratio = lin.weight.detach().double() / scale[:, None]  # (N, K), integers up to the weight dtype's rounding
    codes = torch.round(ratio)
    if (ratio - codes).abs().max() > 0.1 or codes.min() < -8 or codes.max() > 7:
        raise ValueError(f"{name}: the merged weight is not a 4-bit grid times its scale; was it merged by flatquant?")
    out = {"w_packed": pack_int4(codes.to(torch.int8)), "w_scale": lin.weight_scale.reshape(-1).float()}
    if lin.bias is not None:
        out["bias"] = lin.bias.detach().to(dtype)
    return out


def _block_tensors(layer: nn.Module, spec: ArchSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The packed tensors of one merged block, named relative to the block."""
    attn, mlp = layer.get_submodule(spec.attn), layer.get_submodule(spec.mlp)
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        out.update({f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()})

    for norm_path in (spec.input_norm, spec.post_norm):
        put(norm_path, {"weight": layer.get_submodule(norm_path).norm.weight})
    put(f"{spec.attn}.qkv_quant", _input_tensors(layer.get_submodule(spec.input_norm).transform, dtype))
    put(f"{spec.mlp}.gate_up_quant", _input_tensors(layer.get_submodule(spec.post_norm).transform, dtype))
    linears = [(attn, spec.attn, n) for n in (spec.q, spec.k, spec.v, spec.o)]
    linears += [(mlp, spec.mlp, n) for n in (spec.gate, spec.up, spec.down)]
    for parent, path, n in linears:
        lin = parent.get_submodule(n)
        put(f"{path}.{n}", _weight_tensors(lin, dtype, f"{path}.{n}"))
        if lin.owns_input:  # o_proj (P_o ⊗ I), down_proj (P_d)
            put(f"{path}.{n}", _input_tensors(lin.input_transform, dtype))
    for sub_name, sub in attn.named_children():  # q/k norms and anything else left unquantized
        if sub_name not in (spec.q, spec.k, spec.v, spec.o, "flatquant_attn"):
            put(f"{spec.attn}.{sub_name}", sub.state_dict())
    aq = attn.flatquant_attn
    kv = {"k_clip": torch.tensor(aq.k_quant.clip_ratios()), "v_clip": torch.tensor(aq.v_quant.clip_ratios())}
    if aq.p_h is not None:
        kv["p_h"], kv["p_h_inv"] = aq.ph_fixed.float(), aq.ph_inv_fixed.float()
    put(f"{spec.attn}.kv_quant", kv)
    return out


def _structure(layer: nn.Module, spec: ArchSpec) -> dict:
    """Transform sizes (or None), P_h presence and activation symmetry, the same in every block."""

    def size(t: OnlineTransform):
        pair = _transform(t)
        return None if pair is None else [int(p.shape[0]) for p in pair]

    t_a = layer.get_submodule(spec.input_norm).transform
    return {
        "qkv": size(t_a),
        "gate_up": size(layer.get_submodule(spec.post_norm).transform),
        "o": size(layer.get_submodule(spec.attn).get_submodule(spec.o).input_transform),
        "down": size(layer.get_submodule(spec.mlp).get_submodule(spec.down).input_transform),
        "p_h": layer.get_submodule(spec.attn).flatquant_attn.p_h is not None,
        "act_symmetric": t_a.quant.symmetric,
    }


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, structure) of a calibrated, merged fake-quant model, named as in the loaded runtime model."""
    spec = _check_packable(model)
    dtype = model.get_input_embeddings().weight.dtype
    layers = model.get_submodule(spec.layers)
    # embeddings, final norm, lm_head: everything outside the blocks, unquantized
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith(spec.layers + ".")}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop(_output_weight_name(model), None)
    for i, layer in enumerate(layers):
        tensors.update({f"{spec.layers}.{i}.{k}": v for k, v in _block_tensors(layer, spec, dtype).items()})
    return tensors, _structure(layers[0], spec)


def _output_weight_name(model: nn.Module) -> str:
    out = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is out) + ".weight"


def _input_embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


def _quantize_head(model: nn.Module, tensors: dict[str, torch.Tensor], group: int | None) -> None:
    """Replace the input embedding's and the lm_head's weights (one matrix when tied) by int8 codes
    (``weight_q``) and fp32 scales (``weight_scale``), one per row or per ``group`` columns."""
    for name in (_input_embedding_name(model) + ".weight", _output_weight_name(model)):
        if name in tensors:
            codes, scale = quantize_rows_int8(tensors.pop(name), group)
            base = name.removesuffix(".weight")
            tensors[f"{base}.weight_q"], tensors[f"{base}.weight_scale"] = codes, scale


PACK_DTYPES = ("float32", "bfloat16", "float16")


def pack(
    model: nn.Module,
    path: str,
    overwrite: bool = False,
    metadata: dict | None = None,
    dtype: torch.dtype | str | None = None,
    head_bits: int = 16,
    head_group: int | None = HEAD_GROUP,
) -> str:
    """Write the real-quant checkpoint of a calibrated, merged model to folder ``path`` (atomically).

    head_bits: 16 keeps the input embedding and lm_head as they are (the method's choice); 8 stores them as
    int8 codes and fp32 scales (about half their bytes: for LLaMA-3-8B, whose 128256 x 4096 embedding and
    lm_head are 2.1 GB in BF16, the packed weights go from 2.87x to about 3.5x smaller than BF16).
    head_group: with head_bits 8, one scale per this many consecutive columns of a row (a multiple of 16 that
    divides the hidden size; default 128, falling back to 64 / 32 / 16 where 128 does not divide it), or None
    for one scale per row.

    dtype: store the unquantized float tensors (embeddings, norms, lm_head, biases, transform factors) in this
    dtype (``torch.bfloat16`` or ``"bfloat16"`` halves them against a float32 model); default: the model's.
    Scales, clipping ratios and P_h stay float32 in any case.
    """
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if name not in PACK_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {PACK_DTYPES}")
        dtype = getattr(torch, name)
    if head_bits not in HEAD_BITS:
        raise ValueError(f"head_bits={head_bits!r} is not one of {HEAD_BITS}")
    tensors, structure = packed_state(model)
    if head_bits == 8:
        head_group = head_group_for(model.config.hidden_size, head_group)
        _quantize_head(model, tensors, head_group)
    else:
        head_group = None
    dtype = dtype or model.get_input_embeddings().weight.dtype
    tensors = {k: _as_stored(k, v, dtype) for k, v in tensors.items()}
    spec = spec_for(model)
    result = getattr(model, "flatquant", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "bits": {"w": 4, "a": 4, "k": 4, "v": 4},
        "head_bits": head_bits,
        "head_group": head_group,
        "transforms": structure,
        "architecture": dataclasses.asdict(spec),
        "hf_config": model.config.to_dict(),
        "flatquant_config": None if result is None else result.config.to_dict(),
        "metadata": metadata or {},
    }
    with atomic_directory(path, overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, TENSORS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, default=str)
    return path


# ------------------------------------------------------------------------------------------------- loading
def read_packed_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(path, TENSORS_FILE)):
        raise FileNotFoundError(f"{path} is not a packed flatquant checkpoint (needs {CONFIG_FILE}, {TENSORS_FILE})")
    meta = read_format_json(cfg_path, FORMAT, FORMAT_VERSION)
    return meta


def _install_runtime(model: nn.Module, spec: ArchSpec, tr: dict, dtype: torch.dtype) -> None:
    """Swap every block's linears for real-quant modules (on the meta device; tensors come later)."""
    head_dim = _dims(model.config)[2]
    kw = dict(out_dtype=dtype, device="meta")
    sizes = lambda key: None if tr[key] is None else tuple(tr[key])  # noqa: E731
    for layer in model.get_submodule(spec.layers):
        attn, mlp = layer.get_submodule(spec.attn), layer.get_submodule(spec.mlp)
        for parent, shared_name, key, names, own in (
            (attn, "qkv_quant", "qkv", (spec.q, spec.k, spec.v), (spec.o, "o")),
            (mlp, "gate_up_quant", "gate_up", (spec.gate, spec.up), (spec.down, "down")),
        ):
            first = parent.get_submodule(names[0])
            shared = SharedInputQuant(
                first.in_features, sizes(key), len(names), tr["act_symmetric"], dtype=dtype, device="meta"
            )
            setattr(parent, shared_name, shared)
            for n in names:
                lin = parent.get_submodule(n)
                new = SharedInputLinear(lin.in_features, lin.out_features, lin.bias is not None, shared, **kw)
                set_submodule(parent, n, new)
            lin = parent.get_submodule(own[0])
            new = W4A4Linear(
                lin.in_features, lin.out_features, lin.bias is not None, sizes(own[1]), tr["act_symmetric"], **kw
            )
            set_submodule(parent, own[0], new)
        attn.kv_quant = KVQuant(head_dim, tr["p_h"], device="meta")


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    if attr == "act_clip":
        mod.act_clip_max, mod.act_clip_min = (float(c) for c in t)
    elif attr in ("k_clip", "v_clip"):
        setattr(mod, attr, tuple(float(c) for c in t))
    elif attr in mod._parameters or attr in mod._buffers:
        old = mod._parameters.get(attr, mod._buffers.get(attr))
        if old is None or old.shape != t.shape:
            shape = None if old is None else tuple(old.shape)
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, the model expects {shape}")
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    else:
        raise ValueError(f"unexpected tensor {name!r} in the packed checkpoint")


def packed_skeleton(
    config,
    transforms: dict,
    dtype: torch.dtype,
    spec: ArchSpec | None = None,
    head_bits: int = 16,
    head_group: int | None = None,
) -> nn.Module:
    """The real-quant model of a Hugging Face ``config`` on the meta device (no memory), to be filled.

    transforms: the ``transforms`` entry of the packed config (docs/packed-format.md). head_bits: 8 for an int8
    input embedding and lm_head (:class:`~flatquant.runtime.Int8Embedding`, :class:`~flatquant.runtime.Int8Linear`)
    with one scale per ``head_group`` columns (None: per row).
    Fill it with :func:`load_packed`, or with ``to_empty`` and your own tensors followed by
    :func:`finish_packed_model`.
    """
    if head_bits not in HEAD_BITS:
        raise ValueError(f"head_bits={head_bits!r} is not one of {HEAD_BITS}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    _install_runtime(model, spec or spec_for(model), transforms, dtype)
    if head_bits == 8:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        model.set_input_embeddings(Int8Embedding(emb.num_embeddings, emb.embedding_dim, dtype, "meta", head_group))
        model.set_output_embeddings(Int8Linear(out.in_features, out.out_features, "meta", head_group))
    return model


def defer_norms(model: nn.Module, spec: ArchSpec | None = None) -> int:
    """Fold each decoder layer's input and post-attention RMSNorm into the transform + quantize launch of the
    q/k/v (gate/up) input it feeds: the norm module becomes a :class:`~flatquant.runtime.DeferredRMSNorm`
    that passes its input through, and the :class:`~flatquant.runtime.SharedInputQuant` applies the norm
    (the same arithmetic; in the Triton kernel for token tiles below 128 x 128, i.e. hidden sizes up to 8192,
    else as a separate step). Returns how many norms were folded."""
    spec = spec or spec_for(model)
    folded = 0
    for layer in model.get_submodule(spec.layers):
        for norm_name, first_reader in (
            (spec.input_norm, f"{spec.attn}.{spec.q}"),
            (spec.post_norm, f"{spec.mlp}.{spec.gate}"),
        ):
            norm = layer.get_submodule(norm_name)
            reader = layer.get_submodule(first_reader)
            shared = reader._source[0] if isinstance(reader, SharedInputLinear) else None
            weight = getattr(norm, "weight", None)
            if isinstance(norm, DeferredRMSNorm) or not isinstance(shared, SharedInputQuant):
                continue
            if not isinstance(weight, nn.Parameter) or not hasattr(norm, "variance_epsilon"):
                continue
            if not shared.takes_norm(weight):
                continue
            deferred = DeferredRMSNorm(weight, norm.variance_epsilon)
            set_submodule(layer, norm_name, deferred)
            shared.norm[:] = [deferred]
            folded += 1
    return folded


# model types whose decoder layers are exactly h = x + attn(norm(x)); h + mlp(norm(h)) (transformers' layers)
PLAIN_RESIDUAL_LAYERS = BUILTIN_ARCHITECTURES


def fuse_residuals(model: nn.Module, spec: ArchSpec | None = None) -> int:
    """Let each decoder layer whose o_proj and down_proj are W4A4 linears (plain, not shared-input ones) and
    whose MLP is a :class:`~flatquant.kernels.silu_mul.FusedGatedMLP` add its two residuals in those GEMMs'
    epilogues (:class:`~flatquant.runtime.ResidualFusedLayer`): two element-wise launches and two passes over
    the hidden states fewer per layer, the same bits. Only for the model types in ``PLAIN_RESIDUAL_LAYERS``
    (an architecture added with ``register_architecture`` keeps its own layer forward). Returns how many
    layers were changed."""
    if getattr(model.config, "model_type", None) not in PLAIN_RESIDUAL_LAYERS:
        return 0  # a registered architecture's layer may do more than add (e.g. scale the branch first)
    spec = spec or spec_for(model)
    fused = 0
    for layer in model.get_submodule(spec.layers):
        if isinstance(layer, ResidualFusedLayer):
            continue
        o_proj = layer.get_submodule(spec.attn).get_submodule(spec.o)
        mlp = layer.get_submodule(spec.mlp)
        down = getattr(mlp, spec.down, None)
        plain = [type(m) is W4A4Linear for m in (o_proj, down)]
        if all(plain) and isinstance(mlp, FusedGatedMLP):
            layer.__class__ = residual_fused_class(type(layer))
            layer._fq_spec = spec
            fused += 1
    return fused


def finish_packed_model(model: nn.Module, device: torch.device | str, fuse: bool = True) -> nn.Module:
    """Tie the output embedding, compute the rotary tables on ``device``, select the packed attention, swap the
    RMSNorm modules for :class:`~flatquant.kernels.rmsnorm.FusedRMSNorm`, rotate q and k in one launch
    (:func:`~flatquant.kernels.rope.fuse_rotary`), run the MLP's SiLU and product in one
    (:func:`~flatquant.kernels.silu_mul.fuse_silu_mul`); with
    ``fuse``, the linears of a shared input (q/k/v, gate/up) run as one GEMM (``SharedInputQuant.fuse``) and
    each decoder layer's two norms run inside the transform + quantize of the input they feed
    (:func:`defer_norms`; environment ``FLATQUANT_FUSE_NORMS=0`` keeps them separate)."""
    if getattr(model.config, "tie_word_embeddings", False):
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        if isinstance(emb, Int8Embedding):  # one int8 matrix for both
            out._buffers["weight_q"], out._buffers["weight_scale"] = emb.weight_q, emb.weight_scale
        else:
            out.weight = emb.weight
    for mod_name, mod in list(model.named_modules()):  # rotary tables are computed from the config, not stored
        if "inv_freq" in mod._buffers and hasattr(mod, "config"):
            parent, _, attr = mod_name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent), attr, type(mod)(config=model.config))
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"the packed checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    use_packed_attention(model)
    fuse_rms_norms(model)  # one launch per norm on CUDA (same arithmetic; the reference elsewhere)
    fuse_rotary(model)  # one launch for RoPE of q and k on CUDA (same bits; transformers' function elsewhere)
    fuse_silu_mul(model, spec_for(model).mlp)  # SiLU(gate) * up in one launch on CUDA (the reference elsewhere)
    if fuse:
        if envflags.switch("FLATQUANT_FUSE_NORMS", True, "separate norm launches", "norms in the transform"):
            defer_norms(model)
        if envflags.switch("FLATQUANT_FUSE_RESIDUAL", True, "separate additions", "in the GEMM epilogues"):
            fuse_residuals(model)
        consumers: dict[int, list[SharedInputLinear]] = {}
        for mod in model.modules():
            if isinstance(mod, SharedInputLinear):
                consumers.setdefault(id(mod._source[0]), []).append(mod)
        for linears in consumers.values():
            linears[0]._source[0].fuse(linears)
    return model.eval()


def load_packed(
    path: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, fuse: bool = True
) -> nn.Module:
    """Build the real-quant model of a packed checkpoint on ``device`` (default: cuda when present).

    The model is created on the meta device from the stored Hugging Face config, its linears are swapped for
    real-quant modules, and only then are the stored tensors loaded, so no full-precision copy is ever made.
    dtype: convert the unquantized float tensors (embeddings, norms, biases, factors) to this dtype.
    fuse: run q/k/v (gate/up) as one GEMM over their concatenated weights (same results, fewer launches).
    """
    meta = read_packed_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf = dict(meta["hf_config"])
    spec = ArchSpec(**meta["architecture"])
    if hf["model_type"] not in supported_architectures():
        register_architecture(hf["model_type"], spec)
    dtype = dtype or getattr(torch, meta["dtype"])
    head = (meta.get("head_bits", 16), meta.get("head_group"))
    model = packed_skeleton(AutoConfig.for_model(**hf), meta["transforms"], dtype, spec, *head)
    try:
        tensors = load_file(os.path.join(path, TENSORS_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{os.path.join(path, TENSORS_FILE)} is corrupt: {e}") from e
    for name, t in tensors.items():
        _set_tensor(model, name, _as_stored(name, t, dtype))
    finish_packed_model(model, device, fuse)
    model.flatquant_packed = meta
    return model
