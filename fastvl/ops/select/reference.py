"""The spec of score-based token selection (also its CPU path) and the scores it is fed with.

``select_reference``: in each of the equal groups of a row, the ``k`` tokens first in
``torch.sort(scores, descending=True, stable=True)`` order (equal scores: the lower index first; NaN above
everything; ``-0.0 == +0.0``), returned in their original order, after the protected leading tokens.
"""

from __future__ import annotations

import torch

from fastvl import rules


def select_ids(scores: torch.Tensor, k: int, groups: int, frames: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, G*k)`` int64: the kept positions in ``scores (B, groups*S)`` of the groups read (``frames (B, G)``,
    else all ``G = groups``), ascending within each group."""
    B, L = scores.shape
    S = L // groups
    s = scores.to(rules.compute_dtype(scores.dtype)).reshape(B, groups, S)
    src = torch.arange(groups, device=scores.device).expand(B, groups) if frames is None else frames
    s = torch.gather(s, 1, src[..., None].expand(B, src.shape[1], S))
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    top = torch.sort(top, dim=-1).values + src[..., None] * S
    return top.reshape(B, -1)


def select_reference(
    x: torch.Tensor, scores: torch.Tensor, k: int, groups: int, protected: int = 0, frames: torch.Tensor | None = None
):
    """``(kept (B, P + G*k, C), ids (B, P + G*k) int64, inv (B, L) int32)`` for ``x (B, L = P + groups*S, C)``:
    the ``P = protected`` leading tokens, then the top ``k`` of each group read (:func:`select_ids`) in order.
    ``inv[l]`` is the row of token ``l`` in ``kept``, or -1."""
    B, L, C = x.shape
    top = select_ids(scores, k, groups, frames) + protected
    lead = torch.arange(protected, device=x.device).expand(B, protected)
    ids = torch.cat([lead, top], dim=1)
    kept = torch.gather(x, 1, ids[..., None].expand(B, ids.shape[1], C))
    inv = torch.full((B, L), -1, dtype=torch.int32, device=x.device)
    rows = torch.arange(ids.shape[1], dtype=torch.int32, device=x.device).expand_as(ids).contiguous()
    return kept, ids, inv.scatter_(1, ids, rows)


def select_reference_backward(grad: torch.Tensor, inv: torch.Tensor, ids: torch.Tensor, L: int) -> torch.Tensor:
    """``dx (B, L, C)``: the gradient rows scattered back to the kept positions, zeros elsewhere."""
    B, K, C = grad.shape
    dx = torch.zeros(B, L, C, dtype=grad.dtype, device=grad.device)
    return dx.scatter_(1, ids[..., None].expand(B, K, C), grad)


# ---- scores ------------------------------------------------------------------------------------


def received_attention(rows: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """The attention each key receives, averaged over heads and query rows: ``rows (B, H, R, L)`` (softmax rows
    of R queries, e.g. the CLS / text tokens, over L keys) -> ``(B, L - skip)`` (float32; float64 for float64
    rows), the first ``skip`` keys (the querying tokens themselves) left out."""
    return rows[..., skip:].to(rules.compute_dtype(rows.dtype)).mean(dim=(1, 2))


def frame_scores(scores: torch.Tensor, frames: int) -> torch.Tensor:
    """A frame's score is the mean of its tokens' scores: ``(B, T*N)`` -> ``(B, T)``."""
    B, L = scores.shape
    return scores.to(rules.compute_dtype(scores.dtype)).reshape(B, frames, L // frames).mean(-1)
