"""Rules the ops, modules and models share, written once: compute dtypes, token counts and their ranges.

Token counts round down with a small epsilon so that fractions which are exact in decimal but not in binary
(``0.3 * 10``, ``(1 - 0.7) * 10``) count the tokens a reader expects.
"""

from __future__ import annotations

import math

import torch

from fastvl import validate

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The floating dtypes fastvl's Triton and CUDA kernels take (float64 goes to the reference)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op accumulates in for inputs of ``dtype``: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- temporal token rolling (All-in-one) -------------------------------------------------------


def roll_count(L: int, fraction: float) -> int:
    """``f = floor(L * fraction)``: how many of ``L`` video tokens roll in each direction."""
    return math.floor(L * fraction + 1e-9)


def roll_fraction(op: str, fraction) -> float:
    """``fraction`` in ``[0, 0.5)``: both directions together roll fewer than all tokens."""
    return validate.number(op, "fraction", fraction, lo=0.0, hi=0.5, lo_open=False, hi_open=True)


def checked_roll_count(op: str, L: int, fraction: float) -> int:
    """:func:`roll_count` for ``L`` video tokens, refusing a fraction that rolls nothing or too much."""
    f = roll_count(L, fraction)
    if fraction > 0 and f == 0:
        raise ValueError(
            f"{op}: L={L} video tokens is too small for fraction={fraction}: floor(L*fraction)=0 tokens would "
            "roll; use fraction >= 1/L, or fraction=0 for no rolling"
        )
    if 2 * f + 1 > L:
        raise ValueError(f"{op}: fraction={fraction} rolls 2*{f} of L={L} tokens, needs 2f+1 <= L (slot 0 fixed)")
    return f


# ---- token dropping and masking (VATT DropToken, MAE/MAC masking) ---------------------------------


def keep_count(L, keep: float):
    """``K = floor(L * keep)`` tokens kept of ``L`` (an int, or a long tensor for a tensor of lengths)."""
    if isinstance(L, torch.Tensor):
        return (L * keep + 1e-6).floor().long()
    return int(L * keep + 1e-6)


def keep_rate(op: str, rate) -> float:
    """DropToken's ``keep_rate`` in ``(0, 1]``."""
    return validate.number(op, "keep_rate", rate, lo=0.0, hi=1.0, lo_open=True, hi_open=False)


def mask_ratio(op: str, ratio) -> float:
    """MAE's ``mask_ratio`` in ``[0, 1)``."""
    return validate.number(op, "mask_ratio", ratio, lo=0.0, hi=1.0, lo_open=False, hi_open=True)


# ---- random draws (DropToken, MAE / tube masking) ----------------------------------------------


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The ``(1,)`` int64 seed a kernel's draw keys Philox with, in ``[0, 2**62)``: taken from ``generator`` (or
    the global generator of ``device``'s type) on its own device, then moved to ``device`` without a sync."""
    gdev = generator.device if generator is not None else device
    s = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return s.to(device, non_blocking=True)
