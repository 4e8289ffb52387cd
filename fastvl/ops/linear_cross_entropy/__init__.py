"""Linear cross-entropy: ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` without the (N, V) logits.

One custom op carries it: ``linear_cross_entropy`` returns the per-row losses (F.cross_entropy's
``reduction="none"``), the rows' log-sum-exp (as the row max and the log-sum above it) and, when hidden needs
a gradient, the gradient to hidden for an upstream weight of 1 (computed in the same pass as the loss); its
autograd calls ``linear_cross_entropy_backward``, which scales that gradient by the upstream row weights and
computes the gradients to weight and bias. The mean / sum over the rows with a target is plain PyTorch around
it. Spec and primitives: :mod:`.reference`; backends: :mod:`.backends`.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from fastvl import validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op
from fastvl.rules import compute_dtype

from . import backends, chunked
from .reference import lce_backward_reference, lce_forward_reference, linear_cross_entropy_reference

__all__ = [
    "chunked",
    "lce_backward_reference",
    "lce_forward_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "prepare",
]

OP = backends.OP
REDUCTIONS = ("mean", "sum", "none")


def _no_autocast(like: torch.Tensor):
    """The backends compute in the inputs' dtype and fp32 as they choose: autocast (already applied to the
    inputs in :func:`prepare`) must not recast their inner products."""
    kind = like.device.type
    return torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu") else contextlib.nullcontext()


@custom_op(
    "linear_cross_entropy",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, float label_smoothing, "
    "bool need_dh, str backend) -> (Tensor, Tensor, Tensor)",
)
def _lce_op(hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh, backend):
    with _no_autocast(hidden):
        fn = implementation(OP, backend, "forward")
        return fn(hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh)


@_lce_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh, backend):
    cd = compute_dtype(hidden.dtype)
    N = hidden.shape[0]
    dh = hidden.new_empty(hidden.shape if need_dh else (0,), dtype=cd)
    return hidden.new_empty(N, dtype=cd), hidden.new_empty((2, N), dtype=cd), dh


@custom_op(
    "linear_cross_entropy_backward",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor dh_unit, Tensor grad, "
    "int ignore_index, float label_smoothing, bool need_dh, bool need_dw, bool need_db, str backend) "
    "-> (Tensor, Tensor, Tensor)",
)
def _lce_bwd_op(*args):
    *args, backend = args
    with _no_autocast(args[0]):
        return implementation(OP, backend, "backward")(*args)


@_lce_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, dh_unit, grad, ignore_index, smoothing, need_dh, need_dw, need_db, backend):
    b = weight if bias is None else bias
    return (
        hidden.new_empty(hidden.shape if need_dh else (0,)),
        weight.new_empty(weight.shape if need_dw else (0,)),
        b.new_empty(b.shape if need_db else (0,)),
    )


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh, backend = inputs
    _, lse, dh_unit = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, dh_unit)
    ctx.ignore_index, ctx.label_smoothing, ctx.need_dh, ctx.backend = ignore_index, label_smoothing, need_dh, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, g_lse, g_dh_unit):
    hidden, weight, bias, targets, lse, dh_unit = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[0] and not ctx.need_dh:
        raise RuntimeError(f"{OP}: hidden needs a gradient, but the forward ran with need_dh=False")
    need_dh, need_dw, need_db = need[0], need[1], bias is not None and need[2]
    if g_loss is None or not (need_dh or need_dw or need_db):
        return (None,) * 8
    dh, dw, db = _lce_bwd_op(
        hidden, weight, bias, targets, lse, dh_unit, g_loss, ctx.ignore_index, ctx.label_smoothing,
        need_dh, need_dw, need_db, ctx.backend,
    )  # fmt: skip
    return dh if need_dh else None, dw if need_dw else None, db if need_db else None, None, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup)
backends.register_flops(torch.ops.fastvl.linear_cross_entropy, torch.ops.fastvl.linear_cross_entropy_backward)


# ---- validation and dispatch -----------------------------------------------------------------


@dataclasses.dataclass
class LinearCrossEntropyPlan(Plan):
    hidden: torch.Tensor  # (N, D), cast to the autocast dtype when autocast is on
    weight: torch.Tensor  # (V, D), hidden's dtype
    bias: torch.Tensor | None  # (V,), hidden's dtype
    ignore_index: int
    label_smoothing: float


def _autocast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Under autocast, the floating inputs in the autocast dtype (what F.linear does before the loss); float64
    stays, as autocast leaves it."""
    first = tensors[0]
    kind = first.device.type
    if not (kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind)):
        return list(tensors)
    dt = torch.get_autocast_dtype(kind)
    return [t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def _check_targets(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """Every target is a class in [0, V) or ignore_index (one device-to-host sync; skipped when compiling)."""
    if not targets.numel() or targets.device.type == "meta" or torch.compiler.is_compiling():
        return
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    if bool(bad.any()):
        values = targets[bad]
        raise ValueError(
            f"{OP}: argument 'targets' must hold class indices in [0, V={V}) or ignore_index={ignore_index}, got "
            f"{int(bad.sum())} other value(s) in [{int(values.min())}, {int(values.max())}]"
        )


def prepare(
    hidden, weight, bias, targets, *, ignore_index=-100, label_smoothing=0.0, reduction="mean", backend=None
) -> LinearCrossEntropyPlan:
    """Validate a :func:`linear_cross_entropy` call and plan its dispatch."""
    validate.tensor(OP, "hidden", hidden, ndim=2, layout="(N, D)")
    validate.tensor(OP, "weight", weight, ndim=2, layout="(V, D)")
    N, D = hidden.shape
    V = weight.shape[0]
    if D < 1:
        raise ValueError(f"{OP}: argument 'hidden' has no features (shape {tuple(hidden.shape)}): need D >= 1")
    if V < 1 or weight.shape[1] != D:
        raise ValueError(
            f"{OP}: argument 'weight' must have shape (V, D) with V >= 1 and hidden's D={D}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        validate.tensor(OP, "bias", bias, ndim=1, layout="(V,)")
        if bias.shape[0] != V:
            raise ValueError(f"{OP}: argument 'bias' must have shape (V,)=({V},), got {tuple(bias.shape)}")
    validate.tensor(OP, "targets", targets, ndim=1, layout="(N,)", dtypes=validate.INDEX)
    if targets.shape[0] != N:
        raise ValueError(f"{OP}: argument 'targets' must have shape (N,)=({N},), got {tuple(targets.shape)}")
    validate.same_device(OP, hidden=hidden, weight=weight, bias=bias, targets=targets)
    ignore_index = validate.integer(OP, "ignore_index", ignore_index)
    eps = validate.number(OP, "label_smoothing", label_smoothing, lo=0.0, hi=1.0, lo_open=False, hi_open=False)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: argument 'reduction' must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    hidden, weight, bias = _autocast(hidden, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{OP}: argument '{name}' must have hidden's dtype {hidden.dtype}, got {t.dtype}")
    _check_targets(targets, V, ignore_index)
    call = Call(OP, {"hidden": hidden, "weight": weight, "bias": bias, "targets": targets}, {"N": N, "V": V, "D": D})
    return LinearCrossEntropyPlan([Request(call, backend)], hidden, weight, bias, ignore_index, eps)


@public_op(prepare)
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without materialising the logits.

    hidden ``(N, D)``, weight ``(V, D)``, bias ``(V,)`` or None, all fp16/bf16/fp32/fp64 of one dtype (under
    autocast: cast to the autocast dtype, as F.linear would); targets ``(N,)`` int32/int64 in ``[0, V)`` or
    ``ignore_index``. Equals ``F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=...,
    label_smoothing=..., reduction=...)`` computed in float32 (float64 for float64): only rows with a target
    count, ``"mean"`` divides by their number (NaN when there is none, like F.cross_entropy), label smoothing
    mixes in the uniform distribution on those rows. Returns a 0-d tensor (``(N,)`` for ``reduction="none"``,
    0 on rows without a target) in float32 (float64 for float64); gradients reach hidden, weight and bias.
    The ``chunked`` and ``triton`` backends never hold the (N, V) logits.
    """
    plan = prepare(
        hidden, weight, bias, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, backend=backend,
    )  # fmt: skip
    (name,) = plan.choose()
    need_dh = torch.is_grad_enabled() and plan.hidden.requires_grad
    rows, _, _ = _lce_op(
        plan.hidden, plan.weight, plan.bias, targets, plan.ignore_index, plan.label_smoothing, need_dh, name
    )
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (targets != plan.ignore_index).sum()
