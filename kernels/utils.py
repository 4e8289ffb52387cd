"""Host-side helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton


def poison_enabled() -> bool:
    return os.environ.get("FASTVL_POISON", "0") == "1"


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN / -1-filled when FASTVL_POISON=1 so unwritten elements show in tests."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def row_block(n_cols: int, elem_bytes: int, max_bytes: int = 8192) -> int:
    """Power-of-two block covering a row of ``n_cols`` elements, capped at ``max_bytes`` per block."""
    return max(16, min(triton.next_power_of_2(n_cols), max(16, max_bytes // elem_bytes)))


def warps_for(block_elems: int) -> int:
    if block_elems >= 8192:
        return 8
    if block_elems >= 2048:
        return 4
    return 2 if block_elems >= 512 else 1


def device_of(*tensors) -> contextlib.AbstractContextManager:
    """``torch.cuda.device`` of the first CUDA tensor given (a no-op for CPU tensors and the interpreter).

    Triton launches on the *current* device; a tensor on ``cuda:1`` while ``cuda:0`` is current would
    otherwise be read by a kernel running on the wrong device.
    """
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator for a host launcher: runs it under the device of its first CUDA tensor argument."""

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        with device_of(*args, *kwargs.values()):
            return launcher(*args, **kwargs)

    return wrapped
