"""TokenSelector: SMAUG-style space-time token sparsification over fastvl.ops.select_space_time."""

from __future__ import annotations

import torch
from torch import nn

from fastvl import ops, rules, validate

SCORERS = ("attention", "linear")


def _count(name: str, v, n: int) -> int:
    """A keep setting as a count of ``n``: a float in (0, 1] is a fraction (at least 1), an int a count."""
    if isinstance(v, float):
        return max(1, rules.keep_count(n, validate.number("TokenSelector", name, v, lo=0, hi=1, lo_open=True,
                                                          hi_open=False)))  # fmt: skip
    v = validate.integer("TokenSelector", name, v, minimum=1)
    if v > n:
        raise ValueError(f"TokenSelector: argument '{name}'={v} exceeds the {n} available")
    return v


class TokenSelector(nn.Module):
    """Keep the important regions of each frame and the important frames of each clip (SMAUG).

    ``forward(x, attn=None) -> (kept, ids)`` on ``x (B, P + T*N, C)``: the ``P = protected`` leading tokens (CLS,
    text) are always kept; the ``keep_frames`` frames of highest mean token score (default all; a float is a
    fraction of T, an int a count) and, in each, the ``keep`` highest-scoring patch tokens (fraction of N or
    count), in order. ``kept (B, P + F*k, C)``, ``ids (B, P + F*k)`` int64 positions in x.

    Scores: ``scorer="attention"`` takes ``attn (B, H, R, P + T*N)``, the softmax rows of the R protected
    queries (``fastvl.ops.attention_rows``), and scores each patch token by the attention it receives, averaged
    over heads and rows; ``scorer="linear"`` scores each patch token with ``nn.Linear(dim, 1)``. A hard top-k
    gives the scorer no gradient; with ``straight_through`` (linear scorer) the kept tokens are multiplied by
    ``1 + s - s.detach()`` (value 1), so the scorer learns from ``<grad, token>`` of the tokens it kept.
    """

    def __init__(
        self,
        num_frames: int,
        keep: float | int = 0.5,
        keep_frames: float | int | None = None,
        protected: int = 1,
        scorer: str = "attention",
        dim: int | None = None,
        straight_through: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        if scorer not in SCORERS:
            raise ValueError(f"TokenSelector: argument 'scorer' must be one of {', '.join(SCORERS)}, got {scorer!r}")
        if scorer == "linear" and dim is None:
            raise ValueError("TokenSelector: scorer='linear' needs argument 'dim' (the token width)")
        self.num_frames = validate.integer("TokenSelector", "num_frames", num_frames, minimum=1)
        self.protected = validate.integer("TokenSelector", "protected", protected, minimum=0)
        _count("keep", keep, 1 << 30)  # checked now, counted per call
        if keep_frames is not None:
            _count("keep_frames", keep_frames, self.num_frames)
        self.keep, self.keep_frames, self.scorer, self.backend = keep, keep_frames, scorer, backend
        self.straight_through = validate.flag("TokenSelector", "straight_through", straight_through)
        self.score = nn.Linear(dim, 1) if scorer == "linear" else None

    def scores(self, x: torch.Tensor, attn: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T*N)`` scores of the patch tokens of ``x``."""
        if self.scorer == "attention":
            if attn is None:
                raise ValueError("TokenSelector: scorer='attention' needs argument 'attn' (B, H, R, L)")
            validate.tensor("TokenSelector", "attn", attn, ndim=4, layout="(B, H, R, L)")
            if attn.shape[-1] != x.shape[1]:
                raise ValueError(
                    f"TokenSelector: argument 'attn' must cover x's {x.shape[1]} keys, got shape {tuple(attn.shape)}"
                )
            return ops.received_attention(attn, skip=self.protected)
        return self.score(x[:, self.protected :]).squeeze(-1)

    def forward(self, x: torch.Tensor, attn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        P, T = self.protected, self.num_frames
        N = (x.shape[1] - P) // T
        k = _count("keep", self.keep, N)
        F = T if self.keep_frames is None else _count("keep_frames", self.keep_frames, T)
        s = self.scores(x, attn)
        kept, ids = ops.select_space_time(x, s, k, frames=T, keep_frames=F, protected=P, backend=self.backend)
        if self.scorer == "linear" and self.straight_through and torch.is_grad_enabled() and s.requires_grad:
            sk = torch.gather(s, 1, ids[:, P:] - P)
            gate = torch.cat([sk.new_ones(sk.shape[0], P), 1 + sk - sk.detach()], dim=1)
            kept = kept * gate[..., None].to(kept.dtype)
        return kept, ids

    def extra_repr(self) -> str:
        return (
            f"num_frames={self.num_frames}, keep={self.keep}, keep_frames={self.keep_frames}, "
            f"protected={self.protected}, scorer={self.scorer!r}"
        )
