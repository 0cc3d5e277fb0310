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
import os
import warnings

import torch

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


@contextlib.contextmanager
def fused_calibration(device: torch.device):
    """Enable compiled fake-quant functions for a calibration on ``device`` (CUDA only)."""
    global _ENABLED
    wanted = device.type in _DEVICE_TYPES and os.environ.get("FLATQUANT_COMPILE", "1") != "0"
    if wanted:
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo, name):  # one entry per distinct layer shape: allow many
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    setattr(dynamo, name, max(getattr(dynamo, name), 256))
    outer, _ENABLED = _ENABLED, wanted
    try:
        yield
    finally:
        _ENABLED = outer
