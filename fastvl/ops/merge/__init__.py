"""ToMe token merging (bipartite soft matching, size-weighted mean) for images and video, and its unmerge.

``merge_tokens(x, size, r)`` equals facebookresearch/ToMe's ``bipartite_soft_matching`` + ``merge_wavg``
(``class_token=True`` for ``protected=1``; ``class_token`` and ``distill_token`` for ``protected=2``): same pairs,
same merged values, same sizes. Layouts, tie rules and the general ``protected`` / video modes:
:mod:`fastvl.ops.merge.reference`. Unlike ToMe with ``class_token=False``, the unmerged tokens always keep their
original order. ``size`` feeds proportional attention as ``key_bias = log(size)``; ``unmerge_tokens`` maps merged
tokens back to the original positions (ToMe's ``unmerge``). Gradients reach x (a merged row is a weighted mean);
the metric and the sizes get none (ToMe matches under ``no_grad``; sizes are counts).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from fastvl import validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op
from fastvl.ops.tokens import gather_tokens, prepare_gather

from . import backends
from .reference import (
    MODES,
    MergeLayout,
    layout,
    match_reference,
    merge_destinations,
    merge_reference,
    merge_reference_backward,
)

__all__ = [
    "MODES",
    "MergeInfo",
    "MergeLayout",
    "layout",
    "match_reference",
    "merge_destinations",
    "merge_reference",
    "merge_reference_backward",
    "merge_tokens",
    "prepare",
    "prepare_unmerge",
    "unmerge_tokens",
]

OP = backends.OP


class MergeInfo(NamedTuple):
    """What a merge did: ``dest (B, L)`` int64, the row of the merged output each input token went to."""

    dest: torch.Tensor


@custom_op(
    "merge_tokens",
    "(Tensor x, Tensor? size, Tensor metric, SymInt r, SymInt protected, str mode, SymInt frames, str backend) "
    "-> (Tensor, Tensor, Tensor)",
)
def _merge_op(x, size, metric, r, protected, mode, frames, backend):
    lay = layout(x.shape[1], protected, mode, frames, r)
    score, best = implementation(OP, backend, "match")(metric, lay)
    dest = merge_destinations(score, best.long(), lay, x.shape[1])
    merged, new_size = implementation(OP, backend, "merge")(x, size, dest, lay.out_len)
    return merged, new_size, dest


@_merge_op.register_fake
def _(x, size, metric, r, protected, mode, frames, backend):
    B, L, C = x.shape
    out = layout(L, protected, mode, frames, r).out_len
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(B, out, C), x.new_empty(B, out, dtype=sd), x.new_empty(B, L, dtype=torch.int64)


@custom_op("merge_tokens_backward", "(Tensor grad, Tensor dest, Tensor? size, Tensor new_size, str backend) -> Tensor")
def _merge_bwd_op(grad, dest, size, new_size, backend):
    return implementation(OP, backend, "backward")(grad, dest, size, new_size)


@_merge_bwd_op.register_fake
def _(grad, dest, size, new_size, backend):
    return grad.new_empty(dest.shape[0], dest.shape[1], grad.shape[2])


def _setup(ctx, inputs, output):
    x, size, *_, backend = inputs
    _, new_size, dest = output
    ctx.save_for_backward(dest, size, new_size)
    ctx.backend = backend
    ctx.mark_non_differentiable(new_size, dest)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _size, _dest):
    dest, size, new_size = ctx.saved_tensors
    dx = None
    if grad is not None and ctx.needs_input_grad[0]:
        dx = _merge_bwd_op(grad, dest, size, new_size, ctx.backend)
    return dx, None, None, None, None, None, None, None


_merge_op.register_autograd(_backward, setup_context=_setup)
backends.register_flops(torch.ops.fastvl.merge_tokens)


# ---- validation and plans ----------------------------------------------------------------------


@dataclasses.dataclass
class MergePlan(Plan):
    layout: MergeLayout
    mode: str
    frames: int
    size: torch.Tensor | None  # (B, L)
    metric: torch.Tensor  # (B, L, Cm)


def _check_size(op, size, x) -> torch.Tensor | None:
    if size is None:
        return None
    validate.tensor(op, "size", size, ndim=(2, 3), layout="(B, L) or (B, L, 1)")
    B, L = x.shape[:2]
    if tuple(size.shape[:2]) != (B, L) or (size.dim() == 3 and size.shape[2] != 1):
        raise ValueError(
            f"{op}: argument 'size' must have shape (B, L)=({B}, {L}) or (B, L, 1), got {tuple(size.shape)}"
        )
    validate.same_device(op, x=x, size=size)
    return size.reshape(B, L)


def _check_metric(op, metric, x) -> torch.Tensor:
    if metric is None:
        return x
    validate.tensor(op, "metric", metric, ndim=3, layout="(B, L, Cm)")
    if tuple(metric.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(
            f"{op}: argument 'metric' must have x's (B, L)={tuple(x.shape[:2])}, got shape {tuple(metric.shape)}"
        )
    if metric.shape[2] < 1:
        raise ValueError(f"{op}: argument 'metric' has no channels (shape {tuple(metric.shape)})")
    validate.same_device(op, x=x, metric=metric)
    return metric


def _check_mode(op, mode, frames, n: int) -> int:
    if mode not in MODES:
        raise ValueError(f"{op}: argument 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "joint":
        return 1
    if frames is None:
        raise ValueError(f"{op}: mode={mode!r} needs argument 'frames' (T frames of equal length after the protected)")
    frames = validate.integer(op, "frames", frames, minimum=1)
    if n % frames:
        raise ValueError(f"{op}: argument 'frames'={frames} must divide the {n} tokens after the protected ones")
    if mode == "time" and frames % 2:
        raise ValueError(f"{op}: mode='time' merges frame pairs: argument 'frames' must be even, got {frames}")
    return frames


def prepare(x, size=None, r=0, *, protected=1, metric=None, mode="joint", frames=None, backend=None) -> MergePlan:
    """Validate a :func:`merge_tokens` call and plan its dispatch (no request when nothing merges)."""
    validate.tensor(OP, "x", x, ndim=3, layout="(B, L, C)")
    r = validate.integer(OP, "r", r, minimum=0)
    protected = validate.integer(OP, "protected", protected, minimum=0)
    if protected > x.shape[1]:
        raise ValueError(f"{OP}: argument 'protected'={protected} exceeds x's {x.shape[1]} tokens")
    size = _check_size(OP, size, x)
    metric = _check_metric(OP, metric, x)
    frames = _check_mode(OP, mode, frames, x.shape[1] - protected)
    lay = layout(x.shape[1], protected, mode, frames, r)
    if lay.r == 0:
        return MergePlan([], lay, mode, frames, size, metric)
    call = Call(
        OP, {"x": x, "metric": metric, "size": size}, {"r": lay.r, "G": lay.G, "S": lay.S, "C": metric.shape[2]}
    )
    return MergePlan([Request(call, backend)], lay, mode, frames, size, metric)


@public_op(prepare)
def merge_tokens(
    x: torch.Tensor,
    size: torch.Tensor | None = None,
    r: int = 0,
    *,
    protected: int = 1,
    metric: torch.Tensor | None = None,
    mode: str = "joint",
    frames: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MergeInfo]:
    """ToMe: merge ``r`` tokens (per group) into their most similar partners by a size-weighted mean.

    x ``(B, L, C)``: ``protected`` leading tokens (CLS, text; never merged, kept first) then the tokens to merge.
    size ``(B, L)`` or ``(B, L, 1)`` float token sizes (None: all 1). metric ``(B, L, Cm)`` (ToMe: the keys
    averaged over heads; default x). ``mode``: ``"joint"`` (one group: ToMe), ``"frame"`` (each of ``frames``
    equal frames on its own, ``r`` per frame) or ``"time"`` (frame pairs, each token of the earlier frame
    matched in the later one, ``r`` per pair). ``r`` is capped at half a group (ToMe's rule).

    Returns ``merged (B, L', C)`` in x's dtype (``L' = P + groups * (S - r)``), ``size (B, L')`` (float32, float64
    for float64 x; ``(B, L', 1)`` if given so) for proportional attention (``key_bias = log(size)``) and the next
    merge, and :class:`MergeInfo` for :func:`unmerge_tokens`.
    """
    plan = prepare(
        x, size, r, protected=protected, metric=metric, mode=mode, frames=frames, backend=backend
    )  # fmt: skip
    B, L = x.shape[:2]
    if not plan.requests:
        new_size = plan.size.float() if plan.size is not None else x.new_ones(B, L, dtype=torch.float32)
        merged, dest = x, torch.arange(L, device=x.device).expand(B, L)
    else:
        (name,) = plan.choose()
        lay = plan.layout
        merged, new_size, dest = _merge_op(
            x, plan.size, plan.metric.detach(), lay.r, lay.P, plan.mode, plan.frames, name
        )  # fmt: skip
    if size is not None and size.dim() == 3:
        new_size = new_size[..., None]
    return merged, new_size, MergeInfo(dest)


def prepare_unmerge(merged, info, *, backend=None):
    """Validate an :func:`unmerge_tokens` call and plan its dispatch (a gather)."""
    op = "unmerge_tokens"
    validate.tensor(op, "merged", merged, ndim=3, layout="(B, L', C)")
    dest = info.dest if isinstance(info, MergeInfo) else info
    validate.tensor(op, "info", dest, ndim=2, layout="MergeInfo or its dest (B, L)", dtypes=validate.INDEX)
    if dest.shape[0] != merged.shape[0]:
        raise ValueError(f"{op}: argument 'info' has batch {dest.shape[0]}, merged has {merged.shape[0]}")
    return prepare_gather(merged, dest, check_bounds=False, backend=backend)


@public_op(prepare_unmerge)
def unmerge_tokens(merged: torch.Tensor, info: MergeInfo | torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """ToMe's unmerge: ``(B, L, C)``, every original token given the row it was merged into (``merged[dest]``).

    Gradients sum over the tokens that share a row (the gather's scatter-add backward).
    """
    prepare_unmerge(merged, info, backend=backend)
    dest = info.dest if isinstance(info, MergeInfo) else info
    return gather_tokens(merged, dest, check_bounds=False, backend=backend)
