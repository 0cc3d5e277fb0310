"""Where calibration activations live: on the device, in pinned CPU memory, or in a memory-mapped file.

A block's calibration needs its inputs and its full-precision outputs, (N, T, H) each. For a 70B model with
the paper's 128 x 2048 windows that is 4.3 GB per tensor in bfloat16; with more windows, longer windows or
a smaller GPU they are kept off the device and copied in one batch at a time.
"""

from __future__ import annotations

import os
import tempfile

import torch

PLACEMENTS = ("auto", "device", "cpu", "disk")


def choose_placement(
    nbytes: int, device: torch.device, offload: str = "auto", memory_budget: float | None = None
) -> str:
    """'device', 'cpu' or 'disk' for activations of ``nbytes`` (inputs and targets together).

    auto, on a GPU: the device when they take at most half of ``memory_budget`` (GB; default the device's
    total memory), the rest being left for the block and its training; else pinned CPU memory, or files
    when they do not fit the available CPU memory either. On the CPU: in memory when they take at most half
    of ``memory_budget`` (default: 80% of the available memory), else files.
    """
    if offload not in PLACEMENTS:
        raise ValueError(f"offload={offload!r} is not one of {PLACEMENTS}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory_budget={memory_budget} must be a positive number of GB")
    if offload != "auto":
        return offload
    fits_ram = nbytes <= 0.8 * _available_ram()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total = memory_budget * 1e9 if memory_budget is not None else props.total_memory
        return "device" if nbytes <= total / 2 else "cpu" if fits_ram else "disk"
    if memory_budget is not None:
        return "device" if nbytes <= memory_budget * 1e9 / 2 else "disk"
    return "device" if fits_ram else "disk"


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume it fits
        return 1 << 62


class Activations:
    """(N, T, H) hidden states at one block boundary; rows are served on ``device`` one batch at a time."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, where: str, folder: str | None = None):
        if where not in PLACEMENTS[1:]:
            raise ValueError(f"where={where!r} is not one of {PLACEMENTS[1:]}")
        self.shape, self.dtype, self.device, self.where = tuple(shape), dtype, torch.device(device), where
        self.path = None
        if where == "device":
            self.data = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif where == "cpu":
            self.data = torch.empty(self.shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        else:
            if folder is not None:
                os.makedirs(folder, exist_ok=True)
            fd, self.path = tempfile.mkstemp(dir=folder, prefix="activations-", suffix=".bin")
            numel = 1
            for s in self.shape:
                numel *= s
            os.ftruncate(fd, numel * dtype.itemsize)
            os.close(fd)
            self.data = torch.from_file(self.path, shared=True, size=numel, dtype=dtype).view(self.shape)

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> Activations:
        """A device-resident store around an existing tensor (no copy)."""
        store = cls.__new__(cls)
        store.shape, store.dtype, store.device, store.where = tuple(tensor.shape), tensor.dtype, tensor.device, "device"
        store.path, store.data = None, tensor
        return store

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def index_device(self) -> torch.device:
        """Where row indices should live: the device for device-resident data, else the CPU."""
        return self.device if self.where == "device" else torch.device("cpu")

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` on the device (from pinned memory: asynchronous copies, one per row)."""
        if self.where == "device":
            return self.data[idx]
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype, device=self.device)
        for k, j in enumerate(idx.tolist()):
            out[k].copy_(self.data[j], non_blocking=True)
        return out

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.where == "device":
            return self.data[start:stop]
        return self.data[start:stop].to(self.device, non_blocking=True)

    def write(self, start: int, value: torch.Tensor) -> None:
        self.data[start : start + value.shape[0]].copy_(value)

    def close(self) -> None:
        """Free the memory, or remove the file."""
        self.data = None
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)


def as_activations(x: torch.Tensor | Activations) -> Activations:
    return Activations.wrap(x) if torch.is_tensor(x) else x
