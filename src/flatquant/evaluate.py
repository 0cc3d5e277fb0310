"""Perplexity with the papers' protocol: non-overlapping windows, PPL = exp(mean token NLL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """exp of the mean next-token NLL over all windows (W, T); each window is scored independently."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    was_training = model.training
    model.eval()
    home = model.get_input_embeddings().weight.device
    model.to(device)
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for s in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
            ids = windows[s : s + batch_size].to(device)  # (B, T)
            logits = model(ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            targets = ids[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            count += targets.numel()
    finally:
        model.to(home)
        model.train(was_training)
    value = float(nll) / count
    if not math.isfinite(value):
        raise FloatingPointError(f"{desc}: the mean NLL is {value}; the model produced non-finite logits")
    return math.exp(value)
