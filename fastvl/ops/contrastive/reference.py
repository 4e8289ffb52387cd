"""The spec of the contrastive losses (materialised logits, plain PyTorch) and of the two registry primitives
that carry them, also their CPU path for small batches.

``X = scale * q k^T`` with ``q (M, D)``, ``k (N, D)``:
  ``contrastive_lse``  row LSE of X over the columns ``col_mask`` keeps and (symmetric) column LSE over all
                       rows; backward: the gradient of ``sum(alpha * row) + sum(beta * col)``
  ``siglip_loss_sum``  ``sum softplus(-y (X + bias))`` with ``y = +1`` on ``n == m + offset``, else -1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.rules import compute_dtype

# ---- the losses ----------------------------------------------------------------------------


def clip_loss_reference(a: torch.Tensor, b: torch.Tensor, logit_scale) -> torch.Tensor:
    """open_clip's ClipLoss (one process): mean of CE(s a b^T, arange) and CE(s b a^T, arange)."""
    logits = logit_scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def mil_nce_loss_reference(video: torch.Tensor, text: torch.Tensor, logit_scale, valid=None) -> torch.Tensor:
    """VATT's MIL-NCE, literally: per sample i, logsumexp over [s(i, j, p)] ++ [s(j, i, p)] minus logsumexp over
    [s(i, i, p)]; invalid samples' texts leave every denominator, their loss is 0, and the mean is taken over
    the valid samples."""
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


# ---- log-sum-exp primitive -----------------------------------------------------------------


def masked_row_lse(x: torch.Tensor, col_mask: torch.Tensor | None) -> torch.Tensor:
    """Row LSE of ``x (M, N)`` over the columns ``col_mask (N,)`` keeps (all when None)."""
    return torch.logsumexp(x if col_mask is None else x.masked_fill(~col_mask[None, :], float("-inf")), 1)


def lse_weights(x, col_mask, alpha, rho, beta, gamma) -> torch.Tensor:
    """dLoss/dX: ``alpha_m exp(X - rho_m)`` on kept columns ``+ beta_n exp(X - gamma_n)``."""
    p = alpha[:, None] * torch.exp(x - rho[:, None])
    if col_mask is not None:
        p = p.masked_fill(~col_mask[None, :], 0.0)
    if beta.numel():
        p = p + beta[None, :] * torch.exp(x - gamma[None, :])
    return p


def lse_reference(q, k, scale, col_mask, symmetric):
    """(row LSE (M,), column LSE (N,) or (0,)) of scale * q k^T from the materialised M x N logits."""
    cd = compute_dtype(q.dtype)
    x = (q.to(cd) @ k.to(cd).T) * scale.to(cd)
    col = torch.logsumexp(x, 0) if symmetric else x.new_empty(0)
    return masked_row_lse(x, col_mask), col


def lse_backward_reference(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    """(dq or None, dk or None, d/dscale) of ``sum(alpha * row) + sum(beta * col)``."""
    cd = compute_dtype(q.dtype)
    qc, kc, s = q.to(cd), k.to(cd), scale.to(cd)
    dot = qc @ kc.T
    p = lse_weights(dot * s, col_mask, alpha.to(cd), rho.to(cd), beta.to(cd), gamma.to(cd))
    dq = (s * (p @ kc)).to(q.dtype) if need_q else None
    dk = (s * (p.T @ qc)).to(k.dtype) if need_k else None
    return dq, dk, (p * dot).sum()


# ---- SigLIP primitive ----------------------------------------------------------------------


def pair_signs(rows: torch.Tensor, N: int, offset: int, dtype) -> torch.Tensor:
    """y (len(rows), N): +1 where n == m + offset, else -1."""
    cols = torch.arange(N, device=rows.device)
    return torch.where(cols[None, :] == rows[:, None] + offset, 1.0, -1.0).to(dtype)


def siglip_sum_reference(q, k, scale, bias, offset):
    """sum_{m,n} -log sigmoid(y_mn (scale q_m.k_n + bias)) from the materialised logits."""
    cd = compute_dtype(q.dtype)
    x = (q.to(cd) @ k.to(cd).T) * scale.to(cd) + bias.to(cd)
    y = pair_signs(torch.arange(q.shape[0], device=q.device), k.shape[0], offset, cd)
    return -F.logsigmoid(y * x).sum()


def siglip_weights(dot, y, scale, bias, grad) -> torch.Tensor:
    """d(grad * siglip_sum)/dX at ``X = scale * dot``: ``-y sigmoid(-y (X + bias)) grad``."""
    return -y * torch.sigmoid(-y * (dot * scale + bias)) * grad


def siglip_backward_reference(q, k, scale, bias, grad, offset, need_q, need_k):
    """(dq or None, dk or None, d/dscale, d/dbias) of ``grad * siglip_sum``."""
    cd = compute_dtype(q.dtype)
    qc, kc, s = q.to(cd), k.to(cd), scale.to(cd)
    dot = qc @ kc.T
    y = pair_signs(torch.arange(q.shape[0], device=q.device), k.shape[0], offset, cd)
    g = siglip_weights(dot, y, s, bias.to(cd), grad.to(cd))
    dq = (s * (g @ kc)).to(q.dtype) if need_q else None
    dk = (s * (g.T @ qc)).to(k.dtype) if need_k else None
    return dq, dk, (g * dot).sum(), g.sum()
