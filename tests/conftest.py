"""Tiny randomly initialised models of every supported architecture, built from configs."""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def for_the_interpreter(*modules):
    """Kernel modules as the tests need them: off CUDA, each rebuilt for the Triton interpreter if it was
    imported before TRITON_INTERPRET was set (its kernels would be compiled ones). Pass them in import order."""
    if torch.cuda.is_available():
        return modules
    return tuple(importlib.reload(m) if m.triton is not None and not m._interpreting() else m for m in modules)


_SMALL = dict(
    hidden_size=64,  # 8 x 8
    intermediate_size=96,  # 8 x 12
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=128,
    max_position_embeddings=256,
    attn_implementation="sdpa",
)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),  # q/k norms
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**_SMALL, **extra, **overrides})).eval()
    with torch.no_grad():  # random biases and norm weights, so that merging them is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@torch.no_grad()
def swap_keeps_logits(arch: str, swap) -> torch.nn.Module:
    """A tiny model of ``arch`` after ``swap(model)`` (a module swap), checked to keep its parameter names
    (checkpoints load unchanged) and, on the CPU's reference arithmetic, its logits exactly."""
    model = tiny_model(arch)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    want, names = model(tokens).logits, dict(model.named_parameters()).keys()
    swap(model)
    assert dict(model.named_parameters()).keys() == names
    assert torch.equal(model(tokens).logits, want)
    return model


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 32), generator=g)


@pytest.fixture(autouse=True)
def _decode_attention_untuned(monkeypatch, request):
    """On the GPU, tests run decode attention with its default config (tuning every test's shape would take
    minutes); the candidates are checked one by one, the tuning in the tests named ``*tuned*``/``*tuning*``."""
    if torch.cuda.is_available() and "tun" not in request.node.name:
        import flatquant.kernels.kv_quant as kv_quant

        monkeypatch.setattr(kv_quant, "AUTOTUNE", False)


@pytest.fixture(autouse=True)
def _private_tuning_cache(monkeypatch, tmp_path):
    """Tuning results a test writes stay in its own folder (never in the user's cache)."""
    monkeypatch.setenv("FLATQUANT_CACHE_DIR", str(tmp_path / "flatquant-cache"))
