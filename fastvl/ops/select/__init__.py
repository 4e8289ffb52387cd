"""Score-based token selection: keep the highest-scoring tokens, and SMAUG-style space-time sparsification.

``select_tokens(x, scores, k, groups=T)`` keeps, in each of the T equal groups of a row (frames), the ``k``
tokens with the highest scores, in their original order. Ties: equal scores keep the lower index (a stable
descending sort); NaN counts as the highest score and ``-0.0`` equals ``+0.0`` (``torch.sort``'s order).
Gradients flow to x (scattered back to the kept positions, zeros elsewhere); the scores get none: a hard
top-k has no useful derivative (:class:`fastvl.nn.TokenSelector` offers a straight-through gate for a learned
scorer).

``select_space_time`` is SMAUG's space-time sparsification on ``x (B, P + T*N, C)``: the P leading tokens
(CLS, text) always kept, the ``keep_frames`` frames of highest mean score (in time order) and, in each, its
``k`` highest-scoring tokens, in one launch pair. Scores come from :func:`received_attention` (the attention the
CLS / text rows give each patch token, averaged over heads and rows) or from a learned scorer.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op

from . import backends
from .reference import frame_scores, received_attention, select_ids, select_reference, select_reference_backward

__all__ = [
    "frame_scores",
    "prepare",
    "prepare_space_time",
    "received_attention",
    "select_ids",
    "select_reference",
    "select_reference_backward",
    "select_space_time",
    "select_tokens",
]

OP = backends.OP


@custom_op(
    "select_tokens",
    "(Tensor x, Tensor scores, Tensor? frames, SymInt k, SymInt groups, SymInt protected, str backend) "
    "-> (Tensor, Tensor, Tensor)",
)
def _select_op(x, scores, frames, k, groups, protected, backend):
    return implementation(OP, backend, "forward")(x, scores, k, groups, protected, frames)


@_select_op.register_fake
def _(x, scores, frames, k, groups, protected, backend):
    B, L, C = x.shape
    n = protected + (frames.shape[1] if frames is not None else groups) * k
    return x.new_empty(B, n, C), x.new_empty(B, n, dtype=torch.int64), x.new_empty(B, L, dtype=torch.int32)


@custom_op("select_tokens_backward", "(Tensor grad, Tensor inv, Tensor ids, SymInt L, str backend) -> Tensor")
def _select_bwd_op(grad, inv, ids, L, backend):
    return implementation(OP, backend, "backward")(grad, inv, ids, L)


@_select_bwd_op.register_fake
def _(grad, inv, ids, L, backend):
    return grad.new_empty(grad.shape[0], L, grad.shape[2])


def _setup(ctx, inputs, output):
    x, *_, backend = inputs
    _, ids, inv = output
    ctx.save_for_backward(inv, ids)
    ctx.L, ctx.backend = x.shape[1], backend


def _backward(ctx, grad, _ids, _inv):
    inv, ids = ctx.saved_tensors
    dx = _select_bwd_op(grad, inv, ids, ctx.L, ctx.backend) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, None, None, None


_select_op.register_autograd(_backward, setup_context=_setup)


# ---- validation and plans ----------------------------------------------------------------------


@dataclasses.dataclass
class SelectPlan(Plan):
    k: int
    groups: int  # equal groups of the scored tokens
    keep_frames: int  # groups read (== groups unless frames are selected)
    protected: int


def _check_count(op: str, name: str, v, S: int, what: str) -> int:
    v = validate.integer(op, name, v, minimum=1)
    if v > S:
        raise ValueError(f"{op}: argument '{name}'={v} exceeds the {S} {what}")
    return v


def _check_scores(op: str, x, scores, P: int) -> None:
    validate.tensor(op, "scores", scores, ndim=2, layout="(B, L)")
    want = (x.shape[0], x.shape[1] - P)
    if tuple(scores.shape) != want:
        raise ValueError(
            f"{op}: argument 'scores' must have shape (B, L)={want}"
            + (f" (the tokens after the {P} protected)" if P else "")
            + f", got {tuple(scores.shape)}"
        )
    validate.same_device(op, x=x, scores=scores)


def _check_groups(op: str, name: str, groups, L: int) -> int:
    groups = validate.integer(op, name, groups, minimum=1)
    if L % groups:
        raise ValueError(f"{op}: argument '{name}'={groups} must divide the {L} scored tokens into equal groups")
    return groups


def _plan(x, scores, k, groups, keep_frames, protected, backend) -> SelectPlan:
    S = (x.shape[1] - protected) // groups
    if k == S and keep_frames == groups:
        return SelectPlan([], k, groups, keep_frames, protected)
    call = Call(OP, {"x": x, "scores": scores}, {"S": S, "k": k, "groups": keep_frames})
    return SelectPlan([Request(call, backend)], k, groups, keep_frames, protected)


def prepare(x, scores, k, *, groups=None, backend=None) -> SelectPlan:
    """Validate a :func:`select_tokens` call and plan its dispatch (no request when every token is kept)."""
    validate.tensor(OP, "x", x, ndim=3, layout="(B, L, C)")
    _check_scores(OP, x, scores, 0)
    groups = _check_groups(OP, "groups", 1 if groups is None else groups, x.shape[1])
    k = _check_count(OP, "k", k, x.shape[1] // groups, "tokens per group")
    return _plan(x, scores, k, groups, groups, 0, backend)


@public_op(prepare)
def select_tokens(
    x: torch.Tensor, scores: torch.Tensor, k: int, *, groups: int | None = None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` highest-scoring tokens of each row (or of each of its ``groups`` equal groups), in order.

    x ``(B, L, C)``; scores ``(B, L)`` float. With ``groups=T`` the row holds T groups of ``L/T`` tokens (frames)
    and ``k`` are kept in each. Returns ``kept (B, k or T*k, C)`` and ``ids (B, k or T*k)`` int64, the kept
    positions in ascending order (group by group). Equal scores keep the lower index. Gradients reach x (zeros at
    the dropped tokens), not the scores. ``k`` equal to the group size returns x itself.
    """
    plan = prepare(x, scores, k, groups=groups, backend=backend)
    if not plan.requests:
        return x, torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    (name,) = plan.choose()
    kept, ids, _ = _select_op(x, scores.detach(), None, plan.k, plan.groups, 0, name)
    return kept, ids


def prepare_space_time(x, scores, k, *, frames, keep_frames=None, protected=0, backend=None) -> SelectPlan:
    """Validate a :func:`select_space_time` call and plan its dispatch."""
    op = "select_space_time"
    validate.tensor(op, "x", x, ndim=3, layout="(B, P + T*N, C)")
    protected = validate.integer(op, "protected", protected, minimum=0)
    if protected >= x.shape[1]:
        raise ValueError(f"{op}: argument 'protected'={protected} leaves no tokens of x's {x.shape[1]} to select")
    _check_scores(op, x, scores, protected)
    frames = _check_groups(op, "frames", frames, scores.shape[1])
    keep_frames = frames if keep_frames is None else _check_count(op, "keep_frames", keep_frames, frames, "frames")
    k = _check_count(op, "k", k, scores.shape[1] // frames, "tokens per frame")
    return _plan(x, scores, k, frames, keep_frames, protected, backend)


@public_op(prepare_space_time)
def select_space_time(
    x: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    *,
    frames: int,
    keep_frames: int | None = None,
    protected: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SMAUG-style space-time selection: the best frames of each clip, the best regions of each kept frame.

    x ``(B, P + T*N, C)``: ``P = protected`` leading tokens (CLS, text; always kept) then T frames of N patch
    tokens; scores ``(B, T*N)`` for the patch tokens. Keeps the ``keep_frames`` frames (default all) whose mean
    score is highest (ties: the earlier frame), in time order, and in each its ``k`` highest-scoring tokens in
    order. Returns ``kept (B, P + keep_frames*k, C)`` and ``ids (B, P + keep_frames*k)`` int64 positions in x.
    Gradients reach x, not the scores.
    """
    plan = prepare_space_time(
        x, scores, k, frames=frames, keep_frames=keep_frames, protected=protected, backend=backend
    )  # fmt: skip
    if not plan.requests:
        return x, torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    (name,) = plan.choose()
    chosen = None
    if plan.keep_frames < plan.groups:
        chosen = select_ids(frame_scores(scores.detach(), plan.groups), plan.keep_frames, 1)
    kept, ids, _ = _select_op(x, scores.detach(), chosen, plan.k, plan.groups, plan.protected, name)
    return kept, ids
