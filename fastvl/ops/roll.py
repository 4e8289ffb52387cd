"""Temporal token rolling (All-in-one): reference, Triton and CUDA backends, custom op, functional API.

Layout ``x (B*T, text_len + L, C)``: each frame is its own sequence, text first (copied per frame),
then the frame's video tokens, slot 0 of which is the frame CLS. With ``f = floor(L * fraction)``,
video slots ``1..f`` take frame t-1's tokens, the last ``f`` slots take frame t+1's, cyclic in t;
every other slot and all text stay. The backward is the inverse roll.
"""

from __future__ import annotations

import math

import torch

from fastvl import _validate as V
from fastvl import backends
from fastvl.backends import Call

from ._dispatch import public, run

OP = "temporal_token_roll"


def roll_reference(x: torch.Tensor, num_frames: int, text_len: int, f: int, direction: int = 1) -> torch.Tensor:
    """Plain-PyTorch spec (All-in-one's slice + torch.roll). Returns a new contiguous tensor."""
    N, S, C = x.shape
    out = x.contiguous().clone()
    if f == 0 or num_frames == 1:
        return out
    v = x.reshape(N // num_frames, num_frames, S, C)
    o = out.view(N // num_frames, num_frames, S, C)
    a = text_len + 1
    o[:, :, a : a + f] = torch.roll(v[:, :, a : a + f], direction, dims=1)
    o[:, :, S - f :] = torch.roll(v[:, :, S - f :], -direction, dims=1)
    return out


def _triton(x, num_frames, text_len, f, direction):
    from fastvl.kernels.roll import roll

    return roll(x, num_frames, text_len, f, direction)


def _cuda(x, num_frames, text_len, f, direction):
    from fastvl import _ext
    from fastvl.kernels.utils import empty

    out = empty(x.shape, x.dtype, x.device)
    _ext.module().roll(x, out, num_frames, text_len, f, direction)
    return out


_IMPLS = {"reference": roll_reference, "triton": _triton, "cuda": _cuda}


def _last_dim_contiguous(call: Call) -> list[str]:
    x = call.tensors["x"]
    return [] if x.stride(-1) == 1 or x.size(-1) == 1 else [f"x has channel stride {x.stride(-1)}, needs 1"]


backends.register(OP, "reference", priority=0, description="torch.roll on slices (All-in-one's code)")
backends.register(
    OP,
    "triton",
    priority=20,
    check=backends.triton_device_check,
    available=backends.triton_available,
    description="strided gather copy, any strides",
)
backends.register(
    OP,
    "cuda",
    priority=30,
    check=backends.all_of(backends.cuda_device_check, _last_dim_contiguous),
    available=backends.cuda_ext_available,
    description="16-byte vectorised row copy (fastvl._C)",
)


backends.register_example(
    OP,
    lambda d: Call(
        OP,
        {"x": torch.empty(96, 40 + 197, 768, dtype=torch.float16, device=d)},
        {"num_frames": 3, "text_len": 40, "f": 24},
    ),
)


@torch.library.custom_op("fastvl::temporal_token_roll", mutates_args=())
def _roll_op(x: torch.Tensor, num_frames: int, text_len: int, f: int, direction: int, backend: str) -> torch.Tensor:
    call = Call(OP, {"x": x}, {"num_frames": num_frames, "text_len": text_len, "f": f})
    return run(_IMPLS, backend, call, x, num_frames, text_len, f, direction)


@_roll_op.register_fake
def _(x, num_frames, text_len, f, direction, backend):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    _, ctx.num_frames, ctx.text_len, ctx.f, ctx.direction, ctx.backend = inputs


def _backward(ctx, grad):
    g = _roll_op(grad, ctx.num_frames, ctx.text_len, ctx.f, -ctx.direction, ctx.backend)
    return g, None, None, None, None, None


_roll_op.register_autograd(_backward, setup_context=_setup)


def _check(x, num_frames, text_len, fraction) -> int:
    V.tensor(OP, "x", x, ndim=3, layout="(B*T, text_len + L, C)")
    num_frames = V.integer(OP, "num_frames", num_frames, minimum=1)
    text_len = V.integer(OP, "text_len", text_len, minimum=0)
    fraction = V.number(OP, "fraction", fraction, lo=0.0, hi=0.5, lo_open=False, hi_open=True)
    N, S, _ = x.shape
    if N % num_frames != 0:
        raise ValueError(f"{OP}: x.shape[0]={N} must be a multiple of num_frames={num_frames} (layout (B*T, S, C))")
    if text_len >= S:
        raise ValueError(f"{OP}: text_len={text_len} leaves no video tokens in a sequence of S={S}")
    L = S - text_len
    f = math.floor(L * fraction + 1e-9)
    if fraction > 0 and f == 0:
        raise ValueError(
            f"{OP}: L={L} video tokens is too small for fraction={fraction}: floor(L*fraction)=0 tokens would "
            "roll; use fraction >= 1/L, or fraction=0 for no rolling"
        )
    if 2 * f + 1 > L:
        raise ValueError(f"{OP}: fraction={fraction} rolls 2*{f} of L={L} tokens, needs 2f+1 <= L (slot 0 fixed)")
    return f


def _make_call(x, num_frames, *, text_len=0, fraction=0.125, backend=None):
    f = _check(x, num_frames, text_len, fraction)
    return Call(OP, {"x": x}, {"num_frames": num_frames, "text_len": text_len, "f": f})


@public(OP, _make_call)
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
    f = _check(x, num_frames, text_len, fraction)
    if num_frames == 1 or f == 0:
        return x
    request, _ = backends.resolve_request(OP, backend)
    return _roll_op(x, num_frames, text_len, f, 1, request)
