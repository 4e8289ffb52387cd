"""TokenMerger: ToMe token merging over fastvl.ops.merge_tokens."""

from __future__ import annotations

import torch
from torch import nn

from fastvl import ops, validate


class TokenMerger(nn.Module):
    """ToMe between blocks: ``forward(x, size=None, metric=None, r=None) -> (merged, size, info)``.

    Merges ``r`` tokens (per frame or frame pair in the video modes; ``r`` given to forward wins over the
    module's) of ``x (B, L, C)`` whose ``protected`` leading tokens (CLS, text) are never merged; ``mode`` and
    ``frames`` as in :func:`fastvl.ops.merge_tokens`. Pass the returned ``size`` to the next merge and to
    attention as ``key_bias = size.log()`` (proportional attention); ``info`` unmerges
    (:func:`fastvl.ops.unmerge_tokens`).
    """

    def __init__(
        self,
        r: int = 0,
        protected: int = 1,
        mode: str = "joint",
        frames: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.r = validate.integer("TokenMerger", "r", r, minimum=0)
        self.protected = validate.integer("TokenMerger", "protected", protected, minimum=0)
        self.mode, self.frames, self.backend = mode, frames, backend

    def forward(
        self,
        x: torch.Tensor,
        size: torch.Tensor | None = None,
        metric: torch.Tensor | None = None,
        r: int | None = None,
    ):
        return ops.merge_tokens(
            x, size, self.r if r is None else r, protected=self.protected, metric=metric, mode=self.mode,
            frames=self.frames, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        frames = f", frames={self.frames}" if self.frames is not None else ""
        return f"r={self.r}, protected={self.protected}, mode={self.mode!r}{frames}"
