"""Programmatic dependent launch (PDL): each kernel starts while the one before it is still finishing.

On compute capability 9.0 and later a kernel launched with the programmatic-stream-serialization attribute may be
scheduled before its predecessor on the stream has finished: its programs become resident as soon as every
program of the predecessor has executed ``griddepcontrol.launch_dependents`` (or exited), run whatever does not
depend on the predecessor, and block in ``griddepcontrol.wait`` until the predecessor has completed and its
memory writes are visible. A decode step is a chain of several hundred short kernels; without PDL each one's
launch, the ramp of its programs onto the SMs and its first loads wait for the previous kernel to drain.

Every Triton kernel of the decode path takes a ``PDL`` constexpr and calls :func:`wait_previous` before its first
read of anything an earlier kernel may have written (the activations, the KV cache, split-K counters) and after
the reads that no kernel writes (the transform factors, the weight prefetch of the W4A4 GEMM). Launched with PDL,
a kernel that did not wait could read stale inputs, so the launch attribute and the wait always go together:
:func:`launch_options` gives both or neither. ``wait_previous`` then allows the next kernel to launch
(``launch_dependents``): it waits in turn before reading this kernel's output, so the chain stays ordered.

``FLATQUANT_PDL=0`` turns it off (read at import; for comparisons). It is off on CPUs, in the interpreter, on GPUs
before compute capability 9.0 and with a Triton without grid dependency control. PyTorch's own kernels between
ours (embedding, lm_head, sampling) are launched without the attribute and wait as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from .. import envflags as _envflags

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = ["ENV", "ENABLED", "launch_options", "pdl_on", "triton_has_pdl", "wait_previous"]

ENV = "FLATQUANT_PDL"


def _enabled_from_env() -> bool:
    return _envflags.switch(ENV, True, "off", "on")


ENABLED = _enabled_from_env()
# the kernels are built for Triton's CPU interpreter when this is set at import (no grid dependency control there)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_has_pdl() -> bool:
    """Whether this Triton has grid dependency control in the language and the ``launch_pdl`` launch option."""
    if triton is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        has_option = "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
        cuda = tl.extra.cuda
    except (ImportError, AttributeError, TypeError):
        return False
    return has_option and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_on(t: torch.Tensor) -> bool:
    """Whether kernels launched on ``t``'s device use PDL: ``FLATQUANT_PDL`` on (the default), a CUDA tensor on a
    GPU of compute capability 9.0 or later, compiled Triton (not ``TRITON_INTERPRET=1`` at import) with grid
    dependency control. Called at every launch: everything but the tensor's device is read once."""
    if not (ENABLED and t.is_cuda) or _INTERPRET or not triton_has_pdl():
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_options(on: bool) -> dict:
    """Keyword arguments of a launch: the kernel's ``PDL`` constexpr and, when on, Triton's ``launch_pdl``
    option (the launch attribute). Never one without the other: a PDL launch must wait (module doc)."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if triton is not None:

    @triton.jit
    def wait_previous(PDL: tl.constexpr, ALLOW_NEXT: tl.constexpr = True):
        """Block until the previous kernel on the stream has completed (its writes visible), then let the next
        kernel launch (``ALLOW_NEXT``; without it the next kernel launches as this one's programs exit). No code
        without PDL."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            if ALLOW_NEXT:
                tl.extra.cuda.gdc_launch_dependents()
