"""Temporal token rolling (All-in-one): validation, the dispatch plan, the custom op, the functional API.

Layout ``x (B*T, text_len + L, C)``: each frame is its own sequence, text first (copied per frame), then the
frame's video tokens, slot 0 of which is the frame CLS. With ``f = floor(L * fraction)``, video slots
``1..f`` take frame t-1's tokens, the last ``f`` slots take frame t+1's, cyclic in t; every other slot and all
text stay. The backward is the inverse roll.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import rules, validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op

from . import backends
from .reference import roll_reference

__all__ = ["prepare", "roll_reference", "temporal_token_roll"]

OP = backends.OP


@custom_op(
    "temporal_token_roll",
    "(Tensor x, SymInt num_frames, SymInt text_len, SymInt f, SymInt direction, str backend) -> Tensor",
)
def _roll_op(x, num_frames, text_len, f, direction, backend):
    return implementation(OP, backend)(x, num_frames, text_len, f, direction)


@_roll_op.register_fake
def _(x, *sizes_and_backend):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    _, ctx.num_frames, ctx.text_len, ctx.f, ctx.direction, ctx.backend = inputs


def _backward(ctx, grad):
    g = _roll_op(grad, ctx.num_frames, ctx.text_len, ctx.f, -ctx.direction, ctx.backend)
    return g, None, None, None, None, None


_roll_op.register_autograd(_backward, setup_context=_setup)


@dataclasses.dataclass
class RollPlan(Plan):
    num_frames: int
    text_len: int
    f: int


def prepare(x, num_frames, *, text_len=0, fraction=0.125, backend=None) -> RollPlan:
    """Validate a :func:`temporal_token_roll` call and plan its dispatch (no request when nothing moves)."""
    validate.tensor(OP, "x", x, ndim=3, layout="(B*T, text_len + L, C)")
    num_frames = validate.integer(OP, "num_frames", num_frames, minimum=1)
    text_len = validate.integer(OP, "text_len", text_len, minimum=0)
    fraction = rules.roll_fraction(OP, fraction)
    N, S, _ = x.shape
    if N % num_frames != 0:
        raise ValueError(f"{OP}: x.shape[0]={N} must be a multiple of num_frames={num_frames} (layout (B*T, S, C))")
    if text_len >= S:
        raise ValueError(f"{OP}: text_len={text_len} leaves no video tokens in a sequence of S={S}")
    f = rules.checked_roll_count(OP, S - text_len, fraction)
    if num_frames == 1 or f == 0:
        return RollPlan([], num_frames, text_len, f)
    call = Call(OP, {"x": x}, {"num_frames": num_frames, "text_len": text_len, "f": f})
    return RollPlan([Request(call, backend)], num_frames, text_len, f)


@public_op(prepare)
def temporal_token_roll(
    x: torch.Tensor,
    num_frames: int,
    *,
    text_len: int = 0,
    fraction: float = 0.125,
    backend: str | None = None,
) -> torch.Tensor:
    """All-in-one temporal token rolling.

    x: ``(B*T, text_len + L, C)`` float tensor (any strides). Returns a contiguous tensor of the same
    shape: video slot 0 kept, slots ``1..f`` from frame t-1, the last ``f`` from frame t+1 (cyclic),
    text untouched, ``f = floor(L * fraction)``. ``num_frames=1`` or ``fraction=0`` return ``x`` itself.
    """
    plan = prepare(x, num_frames, text_len=text_len, fraction=fraction, backend=backend)
    if not plan.requests:
        return x
    (name,) = plan.choose()
    return _roll_op(x, plan.num_frames, plan.text_len, plan.f, 1, name)
