"""Input checks shared by the ops: clear errors, raised before any kernel launches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)


def _fmt_dtypes(dtypes: Sequence[torch.dtype]) -> str:
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
        raise TypeError(f"{op}: argument '{name}' must have dtype in ({_fmt_dtypes(dtypes)}), got {x.dtype}")
    return x


def integer(op: str, name: str, v, *, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = int(v)
        else:
            raise TypeError(f"{op}: argument '{name}' must be an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{op}: argument '{name}' must be >= {minimum}, got {v}")
    return v


def number(op: str, name: str, v, *, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a float, got {type(v).__name__}")
    v = float(v)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not (ok_lo and ok_hi) or v != v:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{op}: argument '{name}' must be in {interval}, got {v}")
    return v


def same_device(op: str, **tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len({str(d) for d in devs.values()}) > 1:
        raise ValueError(
            f"{op}: tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devs.items())
        )
