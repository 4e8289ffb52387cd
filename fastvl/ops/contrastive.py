"""Contrastive losses: CLIP / InfoNCE, VATT's MIL-NCE and SigLIP, without holding the B x B logits.

Features are L2-normalised by the caller and ``logit_scale`` arrives exponentiated (open_clip's
convention); gradients flow to the features, to ``logit_scale`` and to ``logit_bias`` when they are
tensors that require grad.

Two registry primitives carry every loss (``X = scale * q k^T``, ``q (M, D)``, ``k (N, D)``):
  ``contrastive_lse``  row LSE of X over the columns ``col_mask`` keeps, and (symmetric) column LSE over
                       all rows; its backward is the gradient of ``sum(alpha * row) + sum(beta * col)``.
                       CLIP = mean(row + col) / 2 - mean(diag X); MIL-NCE combines row and column LSE per
                       sample; the O(B) remainder is plain PyTorch autograd.
  ``siglip_loss_sum``  ``sum softplus(-y (X + bias))`` with ``y = +1`` on ``n == m + offset``.
Backends: ``reference`` (materialises X: the spec's memory), ``chunked`` (plain PyTorch over row blocks
of at most ``CHUNK_ELEMS`` logits, blocks recomputed in backward: O(B * block) memory on any device),
``triton`` (fused tiles in registers, fp32 accumulation). The plain-PyTorch spec of each loss is
``clip_loss_reference``, ``mil_nce_loss_reference`` and ``siglip_loss_reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from fastvl import _validate as V
from fastvl import backends
from fastvl.backends import Call

from ._dispatch import public, run

OPS = ("clip_loss", "mil_nce_loss", "siglip_loss")
_ROLES = {"clip_loss": ("a", "b"), "mil_nce_loss": ("video", "text"), "siglip_loss": ("a", "b")}

CHUNK_ELEMS = 1 << 22
"""Logits per block of the chunked backend (16 MiB in fp32; rows per block = CHUNK_ELEMS // N)."""

AUTO_CHUNKED_MIN_ELEMS = 1 << 22
"""Under auto, chunked replaces the reference from M * N >= 2^22 logits (B >= 2048 for CLIP). Below it
the logits fit in one chunk anyway (chunked would run the same single block plus its Python loop) and
the reference's handful of M x N fp32 temporaries (< ~100 MiB) do not dominate memory; above it they
grow as B^2 (B = 32768: 4 GiB per matrix) while chunked stays at a few CHUNK_ELEMS blocks."""

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_D = 512  # = fastvl.kernels.contrastive.MAX_D (not imported here: kernels load lazily)


def _cd(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the spec (plain PyTorch, materialised logits) -----------------------------------------


def clip_loss_reference(a: torch.Tensor, b: torch.Tensor, logit_scale) -> torch.Tensor:
    """open_clip's ClipLoss (one process): mean of CE(s a b^T, arange) and CE(s b a^T, arange)."""
    logits = logit_scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def mil_nce_loss_reference(video: torch.Tensor, text: torch.Tensor, logit_scale, valid=None) -> torch.Tensor:
    """VATT's MIL-NCE (design.md 2), literally: per sample i, logsumexp over [s(i, j, p)] ++ [s(j, i, p)]
    minus logsumexp over [s(i, i, p)]; invalid samples' texts leave every denominator, their loss is 0,
    and the mean is taken over the valid samples."""
    if text.dim() == 2:
        text = text[:, None]
    B, P, _ = text.shape
    x = logit_scale * torch.einsum("id,jpd->ijp", video, text)  # s(i, j, p)
    first = x.reshape(B, B * P)
    if valid is not None:
        first = first.masked_fill(~valid.repeat_interleave(P)[None, :], float("-inf"))
    second = x.permute(1, 0, 2).reshape(B, B * P)  # second[i, (j, p)] = s(j, i, p)
    pos = x[torch.arange(B), torch.arange(B)]  # (B, P)
    li = torch.logsumexp(torch.cat([first, second], 1), 1) - torch.logsumexp(pos, 1)
    if valid is None:
        return li.mean()
    return torch.where(valid, li, torch.zeros_like(li)).sum() / valid.sum().clamp(min=1)


def siglip_loss_reference(a: torch.Tensor, b: torch.Tensor, logit_scale, logit_bias) -> torch.Tensor:
    """open_clip's SigLipLoss (one process): -sum log sigmoid(labels * (s a b^T + bias)) / B, labels 2I - 1."""
    logits = logit_scale * a @ b.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = 2 * torch.eye(a.shape[0], device=a.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


# ---- log-sum-exp primitive: reference, chunked, triton -------------------------------------


def _rows(N: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, N))


def _lse_block(x: torch.Tensor, col_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.logsumexp(x if col_mask is None else x.masked_fill(~col_mask[None, :], float("-inf")), 1)


def _lse_weights(x, col_mask, alpha, rho, beta, gamma) -> torch.Tensor:
    """G = alpha_m exp(X - rho_m) on kept columns + beta_n exp(X - gamma_n)."""
    p = alpha[:, None] * torch.exp(x - rho[:, None])
    if col_mask is not None:
        p = p.masked_fill(~col_mask[None, :], 0.0)
    if beta.numel():
        p = p + beta[None, :] * torch.exp(x - gamma[None, :])
    return p


def lse_reference(q, k, scale, col_mask, symmetric):
    """(row LSE (M,), column LSE (N,) or (0,)) of scale * q k^T from the materialised M x N logits."""
    cd = _cd(q.dtype)
    x = (q.to(cd) @ k.to(cd).T) * scale.to(cd)
    col = torch.logsumexp(x, 0) if symmetric else x.new_empty(0)
    return _lse_block(x, col_mask), col


def lse_backward_reference(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    cd = _cd(q.dtype)
    qc, kc, s = q.to(cd), k.to(cd), scale.to(cd)
    dot = qc @ kc.T
    p = _lse_weights(dot * s, col_mask, alpha.to(cd), rho.to(cd), beta.to(cd), gamma.to(cd))
    dq = (s * (p @ kc)).to(q.dtype) if need_q else None
    dk = (s * (p.T @ qc)).to(k.dtype) if need_k else None
    return dq, dk, (p * dot).sum()


def lse_chunked(q, k, scale, col_mask, symmetric):
    """lse_reference over row blocks of CHUNK_ELEMS logits: the column LSE is merged block by block."""
    cd = _cd(q.dtype)
    M, N = q.shape[0], k.shape[0]
    kc, s = k.to(cd), scale.to(cd)
    row = torch.empty(M, dtype=cd, device=q.device)
    col = torch.full((N,) if symmetric else (0,), float("-inf"), dtype=cd, device=q.device)
    R = _rows(N)
    for i in range(0, M, R):
        x = (q[i : i + R].to(cd) @ kc.T) * s
        row[i : i + R] = _lse_block(x, col_mask)
        if symmetric:
            col = torch.logaddexp(col, torch.logsumexp(x, 0))
    return row, col


def lse_backward_chunked(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    cd = _cd(q.dtype)
    M, N = q.shape[0], k.shape[0]
    kc, s = k.to(cd), scale.to(cd)
    alpha, rho, beta, gamma = alpha.to(cd), rho.to(cd), beta.to(cd), gamma.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_k else None
    ds = torch.zeros((), dtype=cd, device=q.device)
    R = _rows(N)
    for i in range(0, M, R):
        qc = q[i : i + R].to(cd)
        dot = qc @ kc.T
        p = _lse_weights(dot * s, col_mask, alpha[i : i + R], rho[i : i + R], beta, gamma)
        ds += (p * dot).sum()
        if need_q:
            dq[i : i + R] = p @ kc
        if need_k:
            dk.addmm_(p.T, qc)
    dq = (dq * s).to(q.dtype) if need_q else None
    dk = (dk * s).to(k.dtype) if need_k else None
    return dq, dk, ds


def _lse_triton(q, k, scale, col_mask, symmetric):
    from fastvl.kernels.contrastive import lse_forward

    return lse_forward(q, k, scale, col_mask, symmetric)


def _lse_backward_triton(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    from fastvl.kernels.contrastive import lse_backward

    return lse_backward(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k)


_LSE = {"reference": lse_reference, "chunked": lse_chunked, "triton": _lse_triton}
_LSE_BWD = {"reference": lse_backward_reference, "chunked": lse_backward_chunked, "triton": _lse_backward_triton}


# ---- SigLIP primitive ----------------------------------------------------------------------


def _signs(rows: torch.Tensor, N: int, offset: int, dtype) -> torch.Tensor:
    """y (len(rows), N): +1 where n == m + offset, else -1."""
    cols = torch.arange(N, device=rows.device)
    return torch.where(cols[None, :] == rows[:, None] + offset, 1.0, -1.0).to(dtype)


def siglip_sum_reference(q, k, scale, bias, offset):
    """sum_{m,n} -log sigmoid(y_mn (scale q_m.k_n + bias)) from the materialised logits."""
    cd = _cd(q.dtype)
    x = (q.to(cd) @ k.to(cd).T) * scale.to(cd) + bias.to(cd)
    y = _signs(torch.arange(q.shape[0], device=q.device), k.shape[0], offset, cd)
    return -F.logsigmoid(y * x).sum()


def siglip_backward_reference(q, k, scale, bias, grad, offset, need_q, need_k):
    cd = _cd(q.dtype)
    qc, kc, s = q.to(cd), k.to(cd), scale.to(cd)
    dot = qc @ kc.T
    y = _signs(torch.arange(q.shape[0], device=q.device), k.shape[0], offset, cd)
    g = -y * torch.sigmoid(-y * (dot * s + bias.to(cd))) * grad.to(cd)
    dq = (s * (g @ kc)).to(q.dtype) if need_q else None
    dk = (s * (g.T @ qc)).to(k.dtype) if need_k else None
    return dq, dk, (g * dot).sum(), g.sum()


def siglip_sum_chunked(q, k, scale, bias, offset):
    cd = _cd(q.dtype)
    kc, s, b = k.to(cd), scale.to(cd), bias.to(cd)
    total = torch.zeros((), dtype=cd, device=q.device)
    R = _rows(k.shape[0])
    for i in range(0, q.shape[0], R):
        qc = q[i : i + R].to(cd)
        y = _signs(torch.arange(i, i + qc.shape[0], device=q.device), k.shape[0], offset, cd)
        total += -F.logsigmoid(y * ((qc @ kc.T) * s + b)).sum()
    return total


def siglip_backward_chunked(q, k, scale, bias, grad, offset, need_q, need_k):
    cd = _cd(q.dtype)
    kc, s, b, gr = k.to(cd), scale.to(cd), bias.to(cd), grad.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_k else None
    ds = torch.zeros((), dtype=cd, device=q.device)
    db = torch.zeros((), dtype=cd, device=q.device)
    R = _rows(k.shape[0])
    for i in range(0, q.shape[0], R):
        qc = q[i : i + R].to(cd)
        dot = qc @ kc.T
        y = _signs(torch.arange(i, i + qc.shape[0], device=q.device), k.shape[0], offset, cd)
        g = -y * torch.sigmoid(-y * (dot * s + b)) * gr
        ds += (g * dot).sum()
        db += g.sum()
        if need_q:
            dq[i : i + R] = g @ kc
        if need_k:
            dk.addmm_(g.T, qc)
    dq = (dq * s).to(q.dtype) if need_q else None
    dk = (dk * s).to(k.dtype) if need_k else None
    return dq, dk, ds, db


def _siglip_triton(q, k, scale, bias, offset):
    from fastvl.kernels.contrastive import siglip_forward

    return siglip_forward(q, k, scale, bias, offset)


def _siglip_backward_triton(q, k, scale, bias, grad, offset, need_q, need_k):
    from fastvl.kernels.contrastive import siglip_backward

    return siglip_backward(q, k, scale, bias, grad.float().reshape(1), offset, need_q, need_k)


_SIG = {"reference": siglip_sum_reference, "chunked": siglip_sum_chunked, "triton": _siglip_triton}
_SIG_BWD = {
    "reference": siglip_backward_reference,
    "chunked": siglip_backward_chunked,
    "triton": _siglip_backward_triton,
}


# ---- registry ------------------------------------------------------------------------------


def _chunked_check(call: Call) -> list[str]:
    if call.explicit:
        return []
    M, N = call.params["M"], call.params["N"]
    if M * N < AUTO_CHUNKED_MIN_ELEMS:
        return [
            f"{M}x{N} logits ({M * N * 4 / 2**20:.1f} MiB in fp32) are below auto's chunking threshold of "
            f"{AUTO_CHUNKED_MIN_ELEMS} logits: one block would hold them all, so the reference is as lean"
        ]
    return []


def _triton_width_check(call: Call) -> list[str]:
    D = call.params["D"]
    if D > TRITON_MAX_D:
        return [f"feature width D={D} > {TRITON_MAX_D}: the fused backward keeps (block, D) tiles in registers"]
    return []


for _op in OPS:
    backends.register(_op, "reference", priority=0, description="materialised B x B logits (plain PyTorch)")
    backends.register(
        _op,
        "chunked",
        priority=10,
        check=_chunked_check,
        description="plain PyTorch over row blocks, online LSE, blocks recomputed in backward: O(B * block) memory",
    )
    backends.register(
        _op,
        "triton",
        priority=20,
        check=backends.all_of(
            backends.triton_device_check, backends.dtype_check(_KERNEL_DTYPES, *_ROLES[_op]), _triton_width_check
        ),
        available=backends.triton_available,
        description="fused tiles in registers, per-row/column LSE, tiles recomputed in backward",
    )


def _call(op: str, q: torch.Tensor, k: torch.Tensor) -> Call:
    na, nb = _ROLES[op]
    return Call(op, {na: q, nb: k}, {"M": q.shape[0], "N": k.shape[0], "D": q.shape[1]})


def _example(op: str, P: int = 1):
    def make(d):
        B, D = 32768, 256
        x = torch.empty(B, D, dtype=torch.float16, device=d)
        return _call(op, x, torch.empty(B * P, D, dtype=torch.float16, device=d))

    return make


backends.register_example("clip_loss", _example("clip_loss"))
backends.register_example("mil_nce_loss", _example("mil_nce_loss", P=3))
backends.register_example("siglip_loss", _example("siglip_loss"))


# ---- custom ops ----------------------------------------------------------------------------


@torch.library.custom_op("fastvl::contrastive_lse", mutates_args=())
def _lse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    col_mask: torch.Tensor | None,
    symmetric: bool,
    op: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return run(_LSE, backend, _call(op, q, k), q, k, scale, col_mask, symmetric)


@_lse_op.register_fake
def _(q, k, scale, col_mask, symmetric, op, backend):
    cd = _cd(q.dtype)
    return q.new_empty(q.shape[0], dtype=cd), q.new_empty(k.shape[0] if symmetric else 0, dtype=cd)


@torch.library.custom_op("fastvl::contrastive_lse_backward", mutates_args=())
def _lse_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    col_mask: torch.Tensor | None,
    alpha: torch.Tensor,
    rho: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    need_q: bool,
    need_k: bool,
    op: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, ds = run(_LSE_BWD, backend, _call(op, q, k), q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k)
    return (
        dq if dq is not None else q.new_empty(0),
        dk if dk is not None else k.new_empty(0),
        ds.reshape(scale.shape).to(scale.dtype),
    )


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


@torch.library.custom_op("fastvl::siglip_loss_sum", mutates_args=())
def _siglip_op(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, op: str, backend: str
) -> torch.Tensor:
    out = run(_SIG, backend, _call(op, q, k), q, k, scale, bias, offset)
    return out.reshape(()).to(_cd(q.dtype))


@_siglip_op.register_fake
def _(q, k, scale, bias, offset, op, backend):
    return q.new_empty((), dtype=_cd(q.dtype))


@torch.library.custom_op("fastvl::siglip_loss_backward", mutates_args=())
def _siglip_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    grad: torch.Tensor,
    offset: int,
    need_q: bool,
    need_k: bool,
    op: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, ds, db = run(_SIG_BWD, backend, _call(op, q, k), q, k, scale, bias, grad, offset, need_q, need_k)
    return (
        dq if dq is not None else q.new_empty(0),
        dk if dk is not None else k.new_empty(0),
        ds.reshape(scale.shape).to(scale.dtype),
        db.reshape(bias.shape).to(bias.dtype),
    )


@_siglip_bwd_op.register_fake
def _(q, k, scale, bias, grad, offset, need_q, need_k, op, backend):
    return (
        q.new_empty(q.shape if need_q else (0,)),
        k.new_empty(k.shape if need_k else (0,)),
        scale.new_empty(scale.shape),
        bias.new_empty(bias.shape),
    )


def _siglip_setup(ctx, inputs, output):
    q, k, scale, bias, offset, op, backend = inputs
    ctx.save_for_backward(q, k, scale, bias)
    ctx.offset, ctx.op, ctx.backend = offset, op, backend


def _siglip_backward(ctx, grad):
    q, k, scale, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, ds, db = _siglip_bwd_op(q, k, scale, bias, grad, ctx.offset, need[0], need[1], ctx.op, ctx.backend)
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        ds if need[2] else None,
        db if need[3] else None,
        None,
        None,
        None,
    )


_siglip_op.register_autograd(_siglip_backward, setup_context=_siglip_setup)


# FLOPs are counted like the reference's autograd: 2*M*N*D for the logits matmul, 2*M*N*D per input
# gradient in backward (the fused backends' recomputation is not counted), so reports agree across backends.
@register_flop_formula([torch.ops.fastvl.contrastive_lse, torch.ops.fastvl.siglip_loss_sum])
def _fwd_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * q_shape[0] * k_shape[0] * q_shape[1]


@register_flop_formula(torch.ops.fastvl.contrastive_lse_backward)
def _lse_bwd_flops(q_shape, k_shape, scale, mask, alpha, rho, beta, gamma, need_q, need_k, *args, out_shape=None):
    return 2 * q_shape[0] * k_shape[0] * q_shape[1] * (int(need_q) + int(need_k))


@register_flop_formula(torch.ops.fastvl.siglip_loss_backward)
def _siglip_bwd_flops(q_shape, k_shape, scale, bias, grad, offset, need_q, need_k, *args, out_shape=None):
    return 2 * q_shape[0] * k_shape[0] * q_shape[1] * (int(need_q) + int(need_k))


# ---- input checks --------------------------------------------------------------------------


def _features(op: str, name: str, x, layout: str = "(B, D)") -> torch.Tensor:
    V.tensor(op, name, x, ndim=2, layout=layout)
    if x.shape[0] == 0:
        raise ValueError(f"{op}: argument '{name}' is an empty batch (shape {tuple(x.shape)}): need B >= 1")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: argument '{name}' has no features (shape {tuple(x.shape)}): need D >= 1")
    return x


def _pair(op: str, a, b, names: tuple[str, str] = ("a", "b")) -> None:
    na, nb = names
    _features(op, na, a)
    V.tensor(op, nb, b, ndim=2, layout="(B, D)")
    if b.shape != a.shape:
        raise ValueError(f"{op}: argument '{nb}' must have {na}'s shape (B, D)={tuple(a.shape)}, got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: argument '{nb}' must have {na}'s dtype {a.dtype}, got {b.dtype}")
    V.same_device(op, **{na: a, nb: b})


def _scalar(op: str, name: str, v, like: torch.Tensor) -> torch.Tensor:
    """A python number or 1-element float tensor -> 0-d tensor in the compute dtype on ``like``'s device."""
    cd = _cd(like.dtype)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(
                f"{op}: argument '{name}' must be a scalar (a python float or a 0-d tensor), got shape {tuple(v.shape)}"
            )
        if not v.is_floating_point():
            raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got {v.dtype}")
        if v.device != like.device and v.device.type != "cpu":
            raise ValueError(f"{op}: argument '{name}' is on {v.device}, the features on {like.device}")
        return v.reshape(()).to(device=like.device, dtype=cd)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a float or a 0-d tensor, got {type(v).__name__}")
    return torch.tensor(float(v), dtype=cd, device=like.device)


def _check_mil(video, text, valid):
    op = "mil_nce_loss"
    _features(op, "video", video)
    V.tensor(op, "text", text, ndim=(2, 3), layout="(B, P, D) or (B, D)")
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
    V.same_device(op, video=video, text=text)
    if valid is not None:
        V.tensor(op, "valid", valid, ndim=1, layout="(B,)", dtypes=(torch.bool,))
        if valid.shape[0] != B:
            raise ValueError(f"{op}: argument 'valid' must have shape (B,)=({B},), got {tuple(valid.shape)}")
        V.same_device(op, video=video, valid=valid)
    return text3


# ---- building blocks (also used by fastvl.nn's distributed losses) --------------------------


def info_nce_rows(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int, op: str, request: str
) -> torch.Tensor:
    """Per-row cross-entropy ``logsumexp_n(s q_m.k_n) - s q_m.k_{m+offset}`` of ``q (M, D)`` against
    ``k (N, D)``, as ``(M,)`` in the compute dtype (one direction of CLIP; distributed local rows)."""
    cd = _cd(q.dtype)
    row, _ = _lse_op(q, k, scale, None, False, op, request)
    pos = scale * (q.to(cd) * k[offset : offset + q.shape[0]].to(cd)).sum(-1)
    return row - pos


def mil_nce_terms(
    video: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None,
    request: str,
    *,
    video_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    valid_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MIL-NCE losses ``(B,)`` (0 for invalid samples) of the local ``video (B, D)``,
    ``text (B, P, D)`` against the global batch (``*_all``; default: the local one). Offsets are implied:
    the caller passes the global rows that match (used by the distributed MILNCELoss)."""
    op = "mil_nce_loss"
    cd = _cd(video.dtype)
    B, P, D = text.shape
    if video_all is None:  # one process: one fused pass gives the row and the column LSE
        cm = None if valid is None else valid.repeat_interleave(P)
        row, col = _lse_op(video, text.reshape(B * P, D), scale, cm, True, op, request)
    else:
        Bg = video_all.shape[0]
        cm = None if valid_all is None else valid_all.repeat_interleave(P)
        row, _ = _lse_op(video, text_all.reshape(Bg * P, D), scale, cm, False, op, request)
        col, _ = _lse_op(text.reshape(B * P, D), video_all, scale, None, False, op, request)
    colg = torch.logsumexp(col.view(B, P), 1)
    pos = torch.logsumexp(scale * (video[:, None].to(cd) * text.to(cd)).sum(-1), 1)  # elementwise: no FLOPs
    li = torch.logaddexp(row, colg) - pos
    return li if valid is None else torch.where(valid, li, torch.zeros_like(li))


def siglip_sum(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, request: str
) -> torch.Tensor:
    """``sum_{m,n} -log sigmoid(y_mn (s q_m.k_n + bias))``, positives at ``n == m + offset`` (0-d)."""
    return _siglip_op(q, k, scale, bias, offset, "siglip_loss", request)


# ---- functional API ------------------------------------------------------------------------


def _clip_make_call(a, b, logit_scale=None, *, backend=None):
    _pair("clip_loss", a, b)
    return _call("clip_loss", a, b)


@public("clip_loss", _clip_make_call)
def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's ClipLoss value): mean of CE(s a b^T, arange) and CE(s b a^T, arange).

    a, b ``(B, D)`` fp16/bf16/fp32/fp64 (L2-normalised by the caller), ``logit_scale`` the exponentiated
    scale (python float or 0-d tensor). Returns a 0-d float32 tensor (float64 for float64 inputs);
    gradients reach a, b and a tensor ``logit_scale``. No backend but ``reference`` holds the B x B logits.
    """
    _pair("clip_loss", a, b)
    s = _scalar("clip_loss", "logit_scale", logit_scale, a)
    request, _ = backends.resolve_request("clip_loss", backend)
    row, col = _lse_op(a, b, s, None, True, "clip_loss", request)
    cd = _cd(a.dtype)
    pos = s * (a.to(cd) * b.to(cd)).sum(-1)
    return 0.5 * (row.mean() + col.mean()) - pos.mean()


def _mil_make_call(video, text, logit_scale=None, valid=None, *, backend=None):
    text3 = _check_mil(video, text, valid)
    return _call("mil_nce_loss", video, text3.reshape(-1, video.shape[1]))


@public("mil_nce_loss", _mil_make_call)
def mil_nce_loss(
    video: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    valid: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """VATT's MIL-NCE (AsymmetricNCE) with P positive texts per clip (design.md 2).

    video ``(B, D)``, text ``(B, P, D)`` (``(B, D)`` means P=1: plain NCE, e.g. video-audio), same dtype;
    ``valid (B,)`` bool marks samples with text: an invalid sample's texts leave every denominator, its
    loss is 0 and the mean runs over the valid samples (0 if none). Returns a 0-d float32 tensor
    (float64 for float64 inputs).
    """
    text3 = _check_mil(video, text, valid)
    s = _scalar("mil_nce_loss", "logit_scale", logit_scale, video)
    request, _ = backends.resolve_request("mil_nce_loss", backend)
    li = mil_nce_terms(video, text3, s, valid, request)
    if valid is None:
        return li.mean()
    return li.sum() / valid.sum().clamp(min=1)


def _siglip_make_call(a, b, logit_scale=None, logit_bias=None, *, backend=None):
    _pair("siglip_loss", a, b)
    return _call("siglip_loss", a, b)


@public("siglip_loss", _siglip_make_call)
def siglip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale, logit_bias, *, backend: str | None = None
) -> torch.Tensor:
    """Sigmoid loss over all pairs (open_clip's SigLipLoss value, one process):
    ``-sum_{i,j} log sigmoid(y_ij (s a_i.b_j + bias)) / B``, ``y = 2I - 1``.

    a, b ``(B, D)``; ``logit_scale``, ``logit_bias`` python floats or 0-d tensors (``logit_bias=None``
    means 0). Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    _pair("siglip_loss", a, b)
    s = _scalar("siglip_loss", "logit_scale", logit_scale, a)
    bias = _scalar("siglip_loss", "logit_bias", 0.0 if logit_bias is None else logit_bias, a)
    request, _ = backends.resolve_request("siglip_loss", backend)
    return siglip_sum(a, b, s, bias, 0, request) / a.shape[0]
