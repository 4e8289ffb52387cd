"""Contrastive losses: CLIP / InfoNCE, VATT's MIL-NCE and SigLIP, without holding the B x B logits.

Features are L2-normalised by the caller and ``logit_scale`` arrives exponentiated (open_clip's
convention); gradients flow to the features, to ``logit_scale`` and to ``logit_bias`` when they are
tensors that require grad.

Two custom ops carry every loss (``X = scale * q k^T``, ``q (M, D)``, ``k (N, D)``; spec in :mod:`.reference`):
``contrastive_lse`` (CLIP = mean(row + col) / 2 - mean(diag X); MIL-NCE combines row and column LSE per
sample; the O(B) remainder is plain PyTorch autograd) and ``siglip_loss_sum``. The backends:
:mod:`.backends`. The building blocks :func:`info_nce_rows`, :func:`mil_nce_terms` and :func:`siglip_sum`
also serve ``fastvl.nn``'s distributed losses.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op
from fastvl.rules import compute_dtype

from . import backends, chunked
from .chunked import lse_backward_chunked, lse_chunked, siglip_backward_chunked, siglip_sum_chunked
from .reference import (
    clip_loss_reference,
    lse_backward_reference,
    lse_reference,
    mil_nce_loss_reference,
    siglip_backward_reference,
    siglip_loss_reference,
    siglip_sum_reference,
)

__all__ = [
    "check_mil",
    "check_pair",
    "choose_backend",
    "chunked",
    "clip_loss",
    "clip_loss_reference",
    "info_nce_rows",
    "lse_backward_chunked",
    "lse_backward_reference",
    "lse_chunked",
    "lse_reference",
    "mil_nce_loss",
    "mil_nce_loss_reference",
    "mil_nce_terms",
    "prepare_clip",
    "prepare_mil_nce",
    "prepare_siglip",
    "siglip_backward_chunked",
    "siglip_backward_reference",
    "siglip_loss",
    "siglip_loss_reference",
    "siglip_sum",
    "siglip_sum_chunked",
    "siglip_sum_reference",
]

# ---- custom ops (``op``: the loss whose backends serve the call; ``backend``: the chosen one) ----------


@custom_op(
    "contrastive_lse",
    "(Tensor q, Tensor k, Tensor scale, Tensor? col_mask, bool symmetric, str op, str backend) -> (Tensor, Tensor)",
)
def _lse_op(q, k, scale, col_mask, symmetric, op, backend):
    return implementation(op, backend, "lse")(q, k, scale, col_mask, symmetric)


@_lse_op.register_fake
def _(q, k, scale, col_mask, symmetric, op, backend):
    cd = compute_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=cd), q.new_empty(k.shape[0] if symmetric else 0, dtype=cd)


def _present(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops return tensors: an absent gradient travels as an empty one."""
    return grad if grad is not None else like.new_empty(0)


@custom_op(
    "contrastive_lse_backward",
    "(Tensor q, Tensor k, Tensor scale, Tensor? col_mask, Tensor alpha, Tensor rho, Tensor beta, Tensor gamma, "
    "bool need_q, bool need_k, str op, str backend) -> (Tensor, Tensor, Tensor)",
)
def _lse_bwd_op(*args):
    *args, op, backend = args
    q, k, scale = args[:3]
    dq, dk, ds = implementation(op, backend, "lse_backward")(*args)
    return _present(dq, q), _present(dk, k), ds.reshape(scale.shape).to(scale.dtype)


@_lse_bwd_op.register_fake
def _(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k, op, backend):
    return (
        q.new_empty(q.shape if need_q else (0,)),
        k.new_empty(k.shape if need_k else (0,)),
        scale.new_empty(scale.shape),
    )


def _lse_setup(ctx, inputs, output):
    q, k, scale, col_mask, symmetric, op, backend = inputs
    ctx.save_for_backward(q, k, scale, col_mask, *output)
    ctx.symmetric, ctx.op, ctx.backend = symmetric, op, backend


def _sanitised(grad: torch.Tensor | None, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, LSE with +inf where the weight is 0): rows without gradient add exp(-inf) = 0, never NaN."""
    grad = torch.zeros_like(lse) if grad is None else grad
    return grad, torch.where(grad != 0, lse, torch.full_like(lse, float("inf")))


def _lse_backward(ctx, g_row, g_col):
    q, k, scale, col_mask, row, col = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    alpha, rho = _sanitised(g_row, row)
    beta, gamma = _sanitised(g_col, col) if ctx.symmetric else (col.new_empty(0), col.new_empty(0))
    dq, dk, ds = _lse_bwd_op(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k, ctx.op, ctx.backend)
    return (
        dq if need_q else None,
        dk if need_k else None,
        ds if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup)


@custom_op(
    "siglip_loss_sum", "(Tensor q, Tensor k, Tensor scale, Tensor bias, SymInt offset, str op, str backend) -> Tensor"
)
def _siglip_op(q, k, scale, bias, offset, op, backend):
    out = implementation(op, backend, "siglip")(q, k, scale, bias, offset)
    return out.reshape(()).to(compute_dtype(q.dtype))


@_siglip_op.register_fake
def _(q, k, scale, bias, offset, op, backend):
    return q.new_empty((), dtype=compute_dtype(q.dtype))


@custom_op(
    "siglip_loss_backward",
    "(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor grad, SymInt offset, bool need_q, bool need_k, "
    "str op, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _siglip_bwd_op(*args):
    *args, op, backend = args
    q, k, scale, bias = args[:4]
    dq, dk, ds, db = implementation(op, backend, "siglip_backward")(*args)
    return (
        _present(dq, q),
        _present(dk, k),
        ds.reshape(scale.shape).to(scale.dtype),
        db.reshape(bias.shape).to(bias.dtype),
    )


@_siglip_bwd_op.register_fake
def _(q, k, scale, bias, grad, offset, need_q, need_k, op, backend):
    dq, dk = q.new_empty(q.shape if need_q else (0,)), k.new_empty(k.shape if need_k else (0,))
    return dq, dk, scale.new_empty(scale.shape), bias.new_empty(bias.shape)


def _siglip_setup(ctx, inputs, output):
    q, k, scale, bias, offset, op, backend = inputs
    ctx.save_for_backward(q, k, scale, bias)
    ctx.offset, ctx.op, ctx.backend = offset, op, backend


def _siglip_backward(ctx, grad):
    q, k, scale, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, ds, db = _siglip_bwd_op(q, k, scale, bias, grad, ctx.offset, need[0], need[1], ctx.op, ctx.backend)
    grads = (dq, dk, ds, db)
    return tuple(g if n else None for g, n in zip(grads, need[:4])) + (None, None, None)


_siglip_op.register_autograd(_siglip_backward, setup_context=_siglip_setup)
backends.register_flops(
    torch.ops.fastvl.contrastive_lse,
    torch.ops.fastvl.contrastive_lse_backward,
    torch.ops.fastvl.siglip_loss_sum,
    torch.ops.fastvl.siglip_loss_backward,
)


# ---- input checks --------------------------------------------------------------------------


def check_pair(op: str, a, b, names: tuple[str, str] = ("a", "b")) -> None:
    """Two ``(B, D)`` feature matrices of one shape, dtype and device (``names``: how errors call them)."""
    na, nb = names
    validate.features(op, na, a)
    validate.tensor(op, nb, b, ndim=2, layout="(B, D)")
    if b.shape != a.shape:
        raise ValueError(f"{op}: argument '{nb}' must have {na}'s shape (B, D)={tuple(a.shape)}, got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: argument '{nb}' must have {na}'s dtype {a.dtype}, got {b.dtype}")
    validate.same_device(op, **{na: a, nb: b})


def check_mil(video, text, valid) -> torch.Tensor:
    """MIL-NCE's ``video (B, D)``, ``text (B, P, D)`` or ``(B, D)``, ``valid (B,)`` bool; returns text as 3-D."""
    op = "mil_nce_loss"
    validate.features(op, "video", video)
    validate.tensor(op, "text", text, ndim=(2, 3), layout="(B, P, D) or (B, D)")
    text3 = text[:, None] if text.dim() == 2 else text
    B, D = video.shape
    if text3.shape[0] != B:
        raise ValueError(f"{op}: argument 'text' has batch {text3.shape[0]}, expected video's batch B={B}")
    if text3.shape[2] != D:
        raise ValueError(f"{op}: argument 'text' has feature width {text3.shape[2]}, expected video's D={D}")
    if text3.shape[1] == 0:
        raise ValueError(f"{op}: argument 'text' has P=0 texts per sample (shape {tuple(text.shape)})")
    if text.dtype != video.dtype:
        raise TypeError(f"{op}: argument 'text' must have video's dtype {video.dtype}, got {text.dtype}")
    validate.same_device(op, video=video, text=text)
    if valid is not None:
        validate.tensor(op, "valid", valid, ndim=1, layout="(B,)", dtypes=(torch.bool,))
        if valid.shape[0] != B:
            raise ValueError(f"{op}: argument 'valid' must have shape (B,)=({B},), got {tuple(valid.shape)}")
        validate.same_device(op, video=video, valid=valid)
    return text3


def _scalar(op: str, name: str, v, like: torch.Tensor) -> torch.Tensor:
    return validate.scalar(op, name, v, like, compute_dtype(like.dtype))


def _request(op: str, q: torch.Tensor, k: torch.Tensor, backend: str | None) -> Request:
    na, nb = backends.ROLES[op]
    return Request(Call(op, {na: q, nb: k}, {"M": q.shape[0], "N": k.shape[0], "D": q.shape[1]}), backend)


def choose_backend(op: str, q: torch.Tensor, k: torch.Tensor, backend: str | None) -> str:
    """The backend that serves loss ``op``'s primitive over ``q (M, D)`` against ``k (N, D)`` (distributed
    losses: a rank's rows against the global batch)."""
    return _request(op, q, k, backend).choose()


@dataclasses.dataclass
class LossPlan(Plan):
    scale: torch.Tensor  # 0-d, compute dtype
    bias: torch.Tensor | None = None  # 0-d, compute dtype (SigLIP)
    text: torch.Tensor | None = None  # (B, P, D) (MIL-NCE)


def prepare_clip(a, b, logit_scale, *, backend=None) -> LossPlan:
    """Validate a :func:`clip_loss` call and plan its dispatch."""
    check_pair("clip_loss", a, b)
    s = _scalar("clip_loss", "logit_scale", logit_scale, a)
    return LossPlan([_request("clip_loss", a, b, backend)], s)


def prepare_mil_nce(video, text, logit_scale, valid=None, *, backend=None) -> LossPlan:
    """Validate a :func:`mil_nce_loss` call and plan its dispatch."""
    text3 = check_mil(video, text, valid)
    s = _scalar("mil_nce_loss", "logit_scale", logit_scale, video)
    return LossPlan([_request("mil_nce_loss", video, text3.reshape(-1, video.shape[1]), backend)], s, text=text3)


def prepare_siglip(a, b, logit_scale, logit_bias, *, backend=None) -> LossPlan:
    """Validate a :func:`siglip_loss` call and plan its dispatch."""
    check_pair("siglip_loss", a, b)
    s = _scalar("siglip_loss", "logit_scale", logit_scale, a)
    bias = _scalar("siglip_loss", "logit_bias", 0.0 if logit_bias is None else logit_bias, a)
    return LossPlan([_request("siglip_loss", a, b, backend)], s, bias)


# ---- building blocks (also used by fastvl.nn's distributed losses) --------------------------


def info_nce_rows(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int, op: str, backend: str
) -> torch.Tensor:
    """Per-row cross-entropy ``logsumexp_n(s q_m.k_n) - s q_m.k_{m+offset}`` of ``q (M, D)`` against
    ``k (N, D)``, as ``(M,)`` in the compute dtype (one direction of CLIP; distributed local rows), on
    ``backend`` of loss ``op``."""
    cd = compute_dtype(q.dtype)
    row, _ = _lse_op(q, k, scale, None, False, op, backend)
    pos = scale * (q.to(cd) * k[offset : offset + q.shape[0]].to(cd)).sum(-1)
    return row - pos


def mil_nce_terms(
    video: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None,
    backend: str,
    *,
    video_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    valid_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MIL-NCE losses ``(B,)`` (0 for invalid samples) of the local ``video (B, D)``,
    ``text (B, P, D)`` against the global batch (``*_all``; default: the local one). Offsets are implied:
    the caller passes the global rows that match (used by the distributed MILNCELoss)."""
    op = "mil_nce_loss"
    cd = compute_dtype(video.dtype)
    B, P, D = text.shape
    if video_all is None:  # one process: one fused pass gives the row and the column LSE
        cm = None if valid is None else valid.repeat_interleave(P)
        row, col = _lse_op(video, text.reshape(B * P, D), scale, cm, True, op, backend)
    else:
        Bg = video_all.shape[0]
        cm = None if valid_all is None else valid_all.repeat_interleave(P)
        row, _ = _lse_op(video, text_all.reshape(Bg * P, D), scale, cm, False, op, backend)
        col, _ = _lse_op(text.reshape(B * P, D), video_all, scale, None, False, op, backend)
    colg = torch.logsumexp(col.view(B, P), 1)
    pos = torch.logsumexp(scale * (video[:, None].to(cd) * text.to(cd)).sum(-1), 1)  # elementwise: no FLOPs
    li = torch.logaddexp(row, colg) - pos
    return li if valid is None else torch.where(valid, li, torch.zeros_like(li))


def siglip_sum(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, backend: str
) -> torch.Tensor:
    """``sum_{m,n} -log sigmoid(y_mn (s q_m.k_n + bias))``, positives at ``n == m + offset`` (0-d), on
    ``backend`` of ``siglip_loss``."""
    return _siglip_op(q, k, scale, bias, offset, "siglip_loss", backend)


# ---- functional API ------------------------------------------------------------------------


@public_op(prepare_clip)
def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's ClipLoss value): mean of CE(s a b^T, arange) and CE(s b a^T, arange).

    a, b ``(B, D)`` fp16/bf16/fp32/fp64 (L2-normalised by the caller), ``logit_scale`` the exponentiated
    scale (python float or 0-d tensor). Returns a 0-d float32 tensor (float64 for float64 inputs);
    gradients reach a, b and a tensor ``logit_scale``. No backend but ``reference`` holds the B x B logits.
    """
    plan = prepare_clip(a, b, logit_scale, backend=backend)
    (name,) = plan.choose()
    s = plan.scale
    row, col = _lse_op(a, b, s, None, True, "clip_loss", name)
    cd = compute_dtype(a.dtype)
    pos = s * (a.to(cd) * b.to(cd)).sum(-1)
    return 0.5 * (row.mean() + col.mean()) - pos.mean()


@public_op(prepare_mil_nce)
def mil_nce_loss(
    video: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    valid: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """VATT's MIL-NCE (AsymmetricNCE) with P positive texts per clip (spec: :func:`mil_nce_loss_reference`).

    video ``(B, D)``, text ``(B, P, D)`` (``(B, D)`` means P=1: plain NCE, e.g. video-audio), same dtype;
    ``valid (B,)`` bool marks samples with text: an invalid sample's texts leave every denominator, its
    loss is 0 and the mean runs over the valid samples (0 if none). Returns a 0-d float32 tensor
    (float64 for float64 inputs).
    """
    plan = prepare_mil_nce(video, text, logit_scale, valid, backend=backend)
    (name,) = plan.choose()
    li = mil_nce_terms(video, plan.text, plan.scale, valid, name)
    if valid is None:
        return li.mean()
    return li.sum() / valid.sum().clamp(min=1)


@public_op(prepare_siglip)
def siglip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale, logit_bias, *, backend: str | None = None
) -> torch.Tensor:
    """Sigmoid loss over all pairs (open_clip's SigLipLoss value, one process):
    ``-sum_{i,j} log sigmoid(y_ij (s a_i.b_j + bias)) / B``, ``y = 2I - 1``.

    a, b ``(B, D)``; ``logit_scale``, ``logit_bias`` python floats or 0-d tensors (``logit_bias=None``
    means 0). Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    plan = prepare_siglip(a, b, logit_scale, logit_bias, backend=backend)
    (name,) = plan.choose()
    return siglip_sum(a, b, plan.scale, plan.bias, 0, name) / a.shape[0]
