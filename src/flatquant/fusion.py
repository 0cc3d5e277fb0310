"""Optional torch.compile of the small pure functions that dominate a calibration step on a GPU.

One training step of a block runs well over a thousand tiny kernels (factor construction, weight
transforms, fake quantizers), so it is bound by launch overhead, not by the GPU. Compiled, each of these
functions becomes a few fused kernels. Each is compiled once per shape and then reused by every block.
Compilation is used only inside :func:`fused_calibration` and only for CUDA tensors; setting the
environment variable ``FLATQUANT_COMPILE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from . import envflags

_ENABLED = False
_DEVICE_TYPES = {"cuda"}  # where compiling pays off; tests may add "cpu"


def fusable(fn):
    """Run ``fn`` compiled while :func:`fused_calibration` is active and its first argument is on CUDA."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if _ENABLED and args[0].device.type in _DEVICE_TYPES:
            if compiled is None:
                compiled = torch.compile(fn, dynamic=False)
            return compiled(*args)
        return fn(*args)

    return wrapper


_LINALG_BACKENDS = ("cusolver", "magma", "default")


def linalg_backend(device: torch.device) -> str | None:
    """The linear-algebra backend a calibration on ``device`` uses (None: not a CUDA device, left alone)."""
    if device.type != "cuda":
        return None
    return envflags.choice("FLATQUANT_LINALG", "cusolver", _LINALG_BACKENDS)


@contextlib.contextmanager
def fused_calibration(device: torch.device):
    """Enable compiled fake-quant functions for a calibration on ``device`` (CUDA only).

    On CUDA the batched solve of the transform factors is also routed to cuSOLVER/cuBLAS: PyTorch's default
    heuristic sends a batch of small matrices to MAGMA, which synchronises the host with the GPU inside the
    call (a stall per solve, forward and backward) and cannot be captured in a CUDA graph.
    ``FLATQUANT_LINALG=default`` (or ``magma``) keeps PyTorch's choice.
    """
    global _ENABLED
    wanted = device.type in _DEVICE_TYPES and envflags.switch("FLATQUANT_COMPILE", True, "eager", "compiled")
    if wanted:
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo, name):  # one entry per distinct layer shape: allow many
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    setattr(dynamo, name, max(getattr(dynamo, name), 256))
    outer, _ENABLED = _ENABLED, wanted
    backend = linalg_backend(device)
    previous = torch.backends.cuda.preferred_linalg_library() if backend is not None else None
    if backend is not None:
        torch.backends.cuda.preferred_linalg_library(backend)
    try:
        yield
    finally:
        _ENABLED = outer
        if previous is not None:
            torch.backends.cuda.preferred_linalg_library(previous)
