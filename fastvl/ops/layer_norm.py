"""LayerNorm, optionally fused with a pre-norm block's residual add: reference, Triton, custom op, API.

``layer_norm(x, w, b, eps)`` normalises the last dim with fp32 statistics and returns y in x's dtype.
With ``residual``, it returns ``(LN(x + residual), x + residual)``: the sum (the new residual stream, in
x's dtype) is written once and the norm reads it from registers, the pattern of every pre-norm block.
"""

from __future__ import annotations

import torch

from fastvl import _validate as V
from fastvl import backends
from fastvl.backends import Call

from ._dispatch import public, run

OP = "layer_norm"


def _ct(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _opt(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual ``(M, C)`` -> ``(y, h, mean, rstd)``: ``h = x + residual`` in x's dtype (empty without a
    residual), y = LayerNorm(h) computed in fp32 (fp64 for fp64), mean/rstd ``(M,)``."""
    h = x + residual if residual is not None else x
    ct = _ct(x.dtype)
    y, mean, rstd = torch.native_layer_norm(h.to(ct), (x.shape[-1],), _opt(weight, ct), _opt(bias, ct), eps)
    hs = h if residual is not None else x.new_empty(0)
    return y.to(x.dtype), hs, mean.reshape(-1).float(), rstd.reshape(-1).float()


def layer_norm_reference_backward(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dx = rstd * (w dy - mean(w dy) - xhat * mean(xhat * w dy)) + dh``, ``dw = sum(dy * xhat)``,
    ``db = sum(dy)`` over rows (torch's native LayerNorm backward in fp32, fp64 for fp64). Absent gradients
    are empty tensors."""
    ct = _ct(x.dtype)
    wdtype = weight.dtype if weight is not None else x.dtype
    dyf = dy.to(ct)
    dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
        dyf, x.to(ct), [x.shape[-1]], mean.to(ct)[:, None], rstd.to(ct)[:, None], _opt(weight, ct), None,
        [True, need_dw, False],
    )  # fmt: skip
    if dh is not None:
        dx = dx + dh.to(ct)
    dw = dw.to(wdtype) if need_dw else x.new_empty(0)
    db = dyf.sum(0).to(wdtype) if need_db else x.new_empty(0)
    return dx.to(x.dtype), dw, db


def _triton_fwd(x, weight, bias, residual, eps):
    from fastvl.kernels.layer_norm import layer_norm_forward

    y, h, mean, rstd = layer_norm_forward(x, weight, bias, eps, residual)
    return y, h if h is not None else x.new_empty(0), mean, rstd


def _triton_bwd(dy, dh, x, weight, mean, rstd, need_dw, need_db):
    from fastvl.kernels.layer_norm import layer_norm_backward

    dx, dw, db = layer_norm_backward(dy, dh, x, weight, mean, rstd, need_dw, need_db)
    return dx, dw if dw is not None else x.new_empty(0), db if db is not None else x.new_empty(0)


_FWD = {"reference": layer_norm_reference, "triton": _triton_fwd}
_BWD = {"reference": layer_norm_reference_backward, "triton": _triton_bwd}


def _triton_check(call: Call) -> list[str]:
    from fastvl.kernels.layer_norm import MAX_COLS

    x = call.tensors["x"]
    out = []
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        out.append(f"x dtype {x.dtype}: the kernel takes float16, bfloat16, float32")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        out.append("bfloat16 on the CPU: the Triton interpreter's bf16 arithmetic is wrong (checked on a GPU only)")
    if x.shape[-1] > MAX_COLS:
        out.append(f"row width C={x.shape[-1]} > {MAX_COLS}: the kernel keeps a whole row on chip")
    return out


backends.register(OP, "reference", priority=0, description="torch.native_layer_norm in fp32 (+ the add)")
backends.register(
    OP,
    "triton",
    priority=20,
    check=backends.all_of(backends.triton_device_check, _triton_check),
    available=backends.triton_available,
    description="fused residual add + LayerNorm, two-stage dW/dB",
)
backends.register_example(
    OP,
    lambda d: Call(
        OP,
        {
            "x": torch.empty(96 * 237, 768, dtype=torch.bfloat16, device=d),
            "weight": torch.empty(768, dtype=torch.float32, device=d),
            "bias": torch.empty(768, dtype=torch.float32, device=d),
            "residual": torch.empty(96 * 237, 768, dtype=torch.bfloat16, device=d),
        },
        {"eps": 1e-6},
    ),
)


def _call(x, weight, bias, residual, eps) -> Call:
    return Call(OP, {"x": x, "weight": weight, "bias": bias, "residual": residual}, {"eps": eps})


@torch.library.custom_op("fastvl::layer_norm", mutates_args=())
def _ln_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run(_FWD, backend, _call(x, weight, bias, residual, eps), x, weight, bias, residual, eps)


@_ln_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    M = x.shape[0]
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stats = x.new_empty(M, dtype=torch.float32)
    return x.new_empty(x.shape), h, stats, stats.new_empty(M)


@torch.library.custom_op("fastvl::layer_norm_backward", mutates_args=())
def _ln_bwd_op(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool,
    need_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call(x, weight, None, dh, 0.0)
    return run(_BWD, backend, call, dy, dh, x, weight, mean, rstd, need_dw, need_db)


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


def _check(x, weight, bias, eps, residual):
    V.tensor(OP, "x", x, layout="(..., C)")
    C = x.shape[-1] if x.dim() else 0
    if C < 1:
        raise ValueError(f"{OP}: argument 'x' has an empty last dim (shape {tuple(x.shape)})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            V.tensor(OP, name, t, ndim=1, layout="(C,)")
            if t.shape[0] != C:
                raise ValueError(f"{OP}: argument '{name}' must have shape (C,)=({C},), got {tuple(t.shape)}")
    if residual is not None:
        V.tensor(OP, "residual", residual, layout="like x")
        if residual.shape != x.shape:
            raise ValueError(
                f"{OP}: argument 'residual' must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    eps = V.number(OP, "eps", eps, lo=0.0, hi=float("inf"), lo_open=False, hi_open=True)
    V.same_device(OP, x=x, weight=weight, bias=bias, residual=residual)
    return eps


def _make_call(x, weight, bias, eps=1e-6, residual=None, **_) -> Call:
    eps = _check(x, weight, bias, eps, residual)
    if residual is not None and residual.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dt), residual.to(dt)
    return _call(x.reshape(-1, x.shape[-1]), weight, bias, residual, eps)


@public(OP, _make_call)
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
    eps = _check(x, weight, bias, eps, residual)
    if residual is not None and residual.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dt), residual.to(dt)
    C = x.shape[-1]
    request, _ = backends.resolve_request(OP, backend)
    r2 = residual.reshape(-1, C) if residual is not None else None
    y, h, _, _ = _ln_op(x.reshape(-1, C), weight, bias, r2, eps, request)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))
