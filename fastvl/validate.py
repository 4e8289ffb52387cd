"""Argument checks shared by ops, modules and models: a clear error naming the argument, what it got and what
it expected, raised before any kernel launches. Every function takes the op's name first (for the message)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """``(torch.float16, torch.float32)`` -> ``"float16, float32"``."""
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(
    op: str,
    name: str,
    x,
    *,
    ndim: int | Sequence[int] | None = None,
    layout: str = "",
    dtypes: Sequence[torch.dtype] | None = FLOATS,
) -> torch.Tensor:
    """Check that argument ``name`` of ``op`` is a tensor with the given rank and dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{op}: argument '{name}' must be a torch.Tensor{' ' + layout if layout else ''}, got {type(x).__name__}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            ranks = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(
                f"{op}: argument '{name}' must be {ranks}{' ' + layout if layout else ''}, got shape {tuple(x.shape)}"
            )
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{op}: argument '{name}' must have dtype in ({dtype_names(dtypes)}), got {x.dtype}")
    return x


def integer(op: str, name: str, v, *, minimum: int | None = None) -> int:
    """A python int (or a 1-element integer tensor) ``>= minimum``."""
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = int(v)
        else:
            raise TypeError(f"{op}: argument '{name}' must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{op}: argument '{name}' must be >= {minimum}, got {v}")
    return v


def number(op: str, name: str, v, *, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """A python number in the interval ``lo..hi`` (open or closed at each end), returned as float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a float, got {type(v).__name__}")
    v = float(v)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi) or v != v:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{op}: argument '{name}' must be in {interval}, got {v}")
    return v


def flag(op: str, name: str, v) -> bool:
    """A python bool (not an int, not a tensor)."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: argument '{name}' must be a bool, got {type(v).__name__}")
    return v


def same_device(op: str, **tensors) -> None:
    """All the given tensors (None skipped) live on one device."""
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len({str(d) for d in devs.values()}) > 1:
        raise ValueError(
            f"{op}: tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items())
        )


def features(op: str, name: str, x, layout: str = "(B, D)") -> torch.Tensor:
    """A non-empty ``(B, D)`` float feature matrix (B >= 1, D >= 1)."""
    tensor(op, name, x, ndim=2, layout=layout)
    if x.shape[0] == 0:
        raise ValueError(f"{op}: argument '{name}' is an empty batch (shape {tuple(x.shape)}): need B >= 1")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: argument '{name}' has no features (shape {tuple(x.shape)}): need D >= 1")
    return x


def scalar(op: str, name: str, v, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A python number or 1-element float tensor -> 0-d tensor of ``dtype`` on ``like``'s device (a CPU tensor is
    moved; a tensor on another accelerator is an error). Gradients flow through a tensor argument."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(
                f"{op}: argument '{name}' must be a scalar (a python float or a 0-d tensor), got shape {tuple(v.shape)}"
            )
        if not v.is_floating_point():
            raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got {v.dtype}")
        if v.device != like.device and v.device.type != "cpu":
            raise ValueError(f"{op}: argument '{name}' is on {v.device}, the features on {like.device}")
        return v.reshape(()).to(device=like.device, dtype=dtype)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a float or a 0-d tensor, got {type(v).__name__}")
    return torch.tensor(float(v), dtype=dtype, device=like.device)
