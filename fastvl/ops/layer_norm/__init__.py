"""LayerNorm, optionally fused with a pre-norm block's residual add: validation, the dispatch plan, the custom
op, the functional API.

``layer_norm(x, w, b, eps)`` normalises the last dim with fp32 statistics and returns y in x's dtype.
With ``residual``, it returns ``(LN(x + residual), x + residual)``: the sum (the new residual stream, in
x's dtype) is written once and the norm reads it from registers, the pattern of every pre-norm block.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op

from . import backends
from .reference import layer_norm_reference, layer_norm_reference_backward

__all__ = ["layer_norm", "layer_norm_reference", "layer_norm_reference_backward", "prepare"]

OP = backends.OP


@custom_op(
    "layer_norm",
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _ln_op(x, weight, bias, residual, eps, backend):
    return implementation(OP, backend, "forward")(x, weight, bias, residual, eps)


@_ln_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    M = x.shape[0]
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stats = x.new_empty(M, dtype=torch.float32)
    return x.new_empty(x.shape), h, stats, stats.new_empty(M)


@custom_op(
    "layer_norm_backward",
    "(Tensor dy, Tensor? dh, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dw, bool need_db, "
    "str backend) -> (Tensor, Tensor, Tensor)",
)
def _ln_bwd_op(*args):
    *args, backend = args
    return implementation(OP, backend, "backward")(*args)


@_ln_bwd_op.register_fake
def _(dy, dh, x, weight, mean, rstd, need_dw, need_db, backend):
    wd = weight.dtype if weight is not None else x.dtype
    C = x.shape[1]
    dw = x.new_empty(C if need_dw else 0, dtype=wd)
    db = x.new_empty(C if need_db else 0, dtype=wd)
    return x.new_empty(x.shape), dw, db


def _setup(ctx, inputs, output):
    x, weight, bias, residual, eps, backend = inputs
    y, h, mean, rstd = output
    ctx.has_res = residual is not None
    ctx.save_for_backward(h if ctx.has_res else x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh, dmean, drstd):
    xin, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = weight is not None and need[1]
    need_db = ctx.has_bias and need[2]
    dh = dh if ctx.has_res else None
    if dy is None:
        dx, dw, db = dh, None, None
    else:
        dx, dw, db = _ln_bwd_op(dy, dh, xin, weight, mean, rstd, need_dw, need_db, ctx.backend)
        dw = dw if need_dw else None
        db = db if need_db else None
    return dx, dw, db, dx if ctx.has_res else None, None, None


_ln_op.register_autograd(_backward, setup_context=_setup)


@dataclasses.dataclass
class LayerNormPlan(Plan):
    x: torch.Tensor  # (M, C) rows, promoted with the residual
    residual: torch.Tensor | None  # (M, C)
    eps: float


def prepare(x, weight, bias, eps=1e-6, residual=None, *, backend=None) -> LayerNormPlan:
    """Validate a :func:`layer_norm` call and plan its dispatch."""
    validate.tensor(OP, "x", x, layout="(..., C)")
    C = x.shape[-1] if x.dim() else 0
    if C < 1:
        raise ValueError(f"{OP}: argument 'x' has an empty last dim (shape {tuple(x.shape)})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            validate.tensor(OP, name, t, ndim=1, layout="(C,)")
            if t.shape[0] != C:
                raise ValueError(f"{OP}: argument '{name}' must have shape (C,)=({C},), got {tuple(t.shape)}")
    if residual is not None:
        validate.tensor(OP, "residual", residual, layout="like x")
        if residual.shape != x.shape:
            raise ValueError(
                f"{OP}: argument 'residual' must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    eps = validate.number(OP, "eps", eps, lo=0.0, hi=float("inf"), lo_open=False, hi_open=True)
    validate.same_device(OP, x=x, weight=weight, bias=bias, residual=residual)
    if residual is not None and residual.dtype != x.dtype:  # like eager x + residual: promote
        dt = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dt), residual.to(dt)
    rows = x.reshape(-1, C)
    res_rows = residual.reshape(-1, C) if residual is not None else None
    call = Call(OP, {"x": rows, "weight": weight, "bias": bias, "residual": res_rows}, {"C": C, "eps": eps})
    return LayerNormPlan([Request(call, backend)], rows, res_rows, eps)


@public_op(prepare)
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x (..., C)`` (fp16/bf16/fp32, any strides), statistics in fp32.

    ``weight``/``bias`` ``(C,)`` or None. Returns ``y`` in x's dtype; with ``residual`` (x's shape) returns
    ``(y, h)`` where ``h = x + residual`` and ``y = LayerNorm(h)`` (pre-norm blocks: h is the next residual
    stream). Like eager ``x + residual``, mixed dtypes promote (under autocast a bf16 branch output added to an
    fp32 residual stream keeps the stream, and y, in fp32). Gradients flow to x, residual, weight and bias.
    """
    plan = prepare(x, weight, bias, eps, residual, backend=backend)
    (name,) = plan.choose()
    y, h, _, _ = _ln_op(plan.x, weight, bias, plan.residual, plan.eps, name)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))
