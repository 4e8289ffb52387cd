"""The spec of ToMe token merging (bipartite soft matching + size-weighted mean), also its CPU path.

Layout (:class:`MergeLayout`): ``x (B, L, C)`` = ``P`` protected leading tokens (never merged, kept first) then
the merged region, cut into ``G`` groups of ``S`` consecutive tokens, each split into a source set A and a
destination set B:
  ``joint``  one group (``S = L - P``), A/B alternating over the whole row as ToMe's ``metric[..., ::2, :]`` /
             ``[..., 1::2, :]`` (A = even positions of x): ToMe on images, and on video its spatio-temporal form
  ``frame``  ``G = T`` frames of N tokens, A/B alternating within each frame (A = even in-frame index): ToMe per
             frame, frames stay equal (N - r each), the spatial half of divided space-time merging
  ``time``   ``G = T/2`` frame pairs; A = all tokens of the earlier frame, B = all of the later one: each token of
             frame 2p merges into its most similar token of frame 2p+1 (matching between frames, any position)
In every group each A token finds its most similar B token (cosine similarity of the metric; equal
similarities: the lower B index), the ``r`` A tokens with the highest similarity (a stable descending sort:
equal similarities, the lower A index first) merge into their B tokens, ``r`` capped at ``S // 2`` like ToMe.
Output of a group: its unmerged A tokens in order, then its B tokens in order, each B token the size-weighted
mean ``(s_b x_b + sum s_a x_a) / (s_b + sum s_a)`` of itself and the A tokens merged into it, with size
``s_b + sum s_a``. Ties are decided on the computed similarities: the Triton kernel forms ``<a, b> / (|a| |b|)``
with fp32 accumulation, in another order than this normalise-then-matmul, so similarities equal in exact
arithmetic but not after rounding may order differently; equal computed values break the same way in both.
``dest (B, L)`` gives every input token's row in the output (the protected tokens keep
theirs): ToMe's ``unmerge`` is ``merged[dest]``. Merges compose: after a second merge, ``dest2.gather(1, dest)``.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import rules

MODES = ("joint", "frame", "time")


@dataclasses.dataclass(frozen=True)
class MergeLayout:
    """Where the A and B sets of each group lie: token a of A in group g is at ``P + g*S + a*stride + a_off``."""

    P: int  # protected leading tokens
    G: int  # groups
    S: int  # tokens per group
    nA: int
    nB: int
    stride: int  # 2 (alternating) or 1 (time: whole frames)
    a_off: int
    b_off: int
    r: int  # merged per group (capped)

    @property
    def out_len(self) -> int:
        return self.P + self.G * (self.S - self.r)

    def positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pos_a (G, nA), pos_b (G, nB))`` int64: the rows of x holding each group's A and B tokens."""
        base = self.P + torch.arange(self.G, device=device)[:, None] * self.S
        pos_a = base + torch.arange(self.nA, device=device) * self.stride + self.a_off
        pos_b = base + torch.arange(self.nB, device=device) * self.stride + self.b_off
        return pos_a, pos_b


def layout(L: int, protected: int, mode: str, frames: int, r: int) -> MergeLayout:
    """The :class:`MergeLayout` of a row of ``L`` tokens (``frames`` = T for ``frame`` / ``time``, else 1)."""
    n = L - protected
    if mode == "joint":
        G, S, stride = 1, n, 2
        a_off = protected % 2  # ToMe's A = even positions of the whole row
    elif mode == "frame":
        G, S, stride, a_off = frames, n // frames, 2, 0
    else:  # time
        G, S, stride, a_off = frames // 2, 2 * (n // frames), 1, 0
    if stride == 2:
        nA, nB, b_off = (S - a_off + 1) // 2, (S + a_off) // 2, 1 - a_off
    else:
        nA, nB, b_off = S // 2, S // 2, S // 2
    return MergeLayout(protected, G, S, nA, nB, stride, a_off, b_off, max(0, min(r, S // 2)))


def match_reference(metric: torch.Tensor, lay: MergeLayout):
    """``(score (B, G, nA), best (B, G, nA) int64)``: each A token's highest cosine similarity to a B token of its
    group and that B token's index (the lowest among equals). ToMe's ``metric / metric.norm(...)`` then
    ``a @ b.transpose(-1, -2)``, in fp32 (fp64 for fp64), norms clamped at 1e-15: a zero metric row has
    similarity 0 (ToMe's is NaN)."""
    m = metric.to(rules.compute_dtype(metric.dtype))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-15)
    pos_a, pos_b = lay.positions(metric.device)
    sim = m[:, pos_a] @ m[:, pos_b].transpose(-1, -2)  # (B, G, nA, nB)
    score = sim.max(dim=-1).values
    best = (sim == score[..., None]).to(torch.int8).argmax(dim=-1)  # the first maximum
    return score, best


def merge_destinations(score: torch.Tensor, best: torch.Tensor, lay: MergeLayout, L: int) -> torch.Tensor:
    """``dest (B, L)`` int64 from the matching: the ``r`` best-matched A tokens of each group go to their B
    token's row, the others to their row among the unmerged (original order)."""
    B = score.shape[0]
    device = score.device
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    merged = torch.zeros(score.shape, dtype=torch.bool, device=device).scatter_(-1, order[..., : lay.r], True)
    base = lay.P + torch.arange(lay.G, device=device)[:, None] * (lay.S - lay.r)  # (G, 1) first output row
    b_rows = base + (lay.nA - lay.r)
    unmerged_row = base + torch.cumsum((~merged).to(torch.int64), dim=-1) - 1
    dest_a = torch.where(merged, b_rows + best, unmerged_row)
    dest_b = (b_rows + torch.arange(lay.nB, device=device)).expand(B, lay.G, lay.nB)
    pos_a, pos_b = lay.positions(device)
    dest = torch.arange(L, device=device).repeat(B, 1)  # protected tokens keep their row
    dest[:, pos_a.reshape(-1)] = dest_a.reshape(B, -1)
    dest[:, pos_b.reshape(-1)] = dest_b.reshape(B, -1)
    return dest


def merge_reference(x: torch.Tensor, size: torch.Tensor | None, dest: torch.Tensor, out_len: int):
    """``(merged (B, out_len, C) in x's dtype, size (B, out_len))``: the size-weighted mean of the tokens sent to
    each row (``size`` None: every token has size 1); sizes in float32 (float64 for float64 x)."""
    B, L, C = x.shape
    cd = rules.compute_dtype(x.dtype)
    s = torch.ones(B, L, dtype=cd, device=x.device) if size is None else size.to(cd)
    num = torch.zeros(B, out_len, C, dtype=cd, device=x.device)
    num.scatter_add_(1, dest[..., None].expand(B, L, C), x.to(cd) * s[..., None])
    den = torch.zeros(B, out_len, dtype=cd, device=x.device).scatter_add_(1, dest, s)
    return (num / den[..., None]).to(x.dtype), den


def merge_reference_backward(grad: torch.Tensor, dest: torch.Tensor, size: torch.Tensor | None, new_size):
    """``dx (B, L, C)``: ``grad[dest[l]] * size[l] / new_size[dest[l]]`` (a merged row is a weighted mean)."""
    B, L = dest.shape
    cd = rules.compute_dtype(grad.dtype)
    s = torch.ones(B, L, dtype=cd, device=grad.device) if size is None else size.to(cd)
    w = s / torch.gather(new_size.to(cd), 1, dest)
    g = torch.gather(grad.to(cd), 1, dest[..., None].expand(B, L, grad.shape[2]))
    return (g * w[..., None]).to(grad.dtype)
