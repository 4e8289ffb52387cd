"""The spec of ``linear_cross_entropy`` (materialised logits, plain PyTorch) and of the two registry primitives
that carry it, also its CPU path for small calls.

For ``h (N, D)``, ``W (V, D)``, ``b (V,)`` or None, targets ``t (N,)`` (``ignore_index`` marks rows without a
target) and label smoothing ``eps``, with ``x = h W^T + b`` and ``p = softmax(x)`` per row:

  ``forward(h, W, b, t, ignore_index, eps, need_dh) -> (loss (N,), lse (2, N), dh_unit (N, D) or (0,))``
      ``loss_i = lse_i - (1 - eps) x_it - (eps / V) sum_j x_ij`` (F.cross_entropy with ``reduction="none"``:
      0 on rows without a target); ``lse`` holds the row max ``m`` and ``log sum_j e^(x_j - m)`` apart (their
      sum rounded to one float would lose ~ulp(m) in every ``x - lse``: 3e-5 at logits of 300 in fp32);
      ``dh_unit_i = sum_j G0_ij W_j`` with
      ``G0 = p - (1 - eps) onehot(t) - eps / V`` (dloss_i / dx_i), 0 on rows without a target.
  ``backward(h, W, b, t, lse, dh_unit, grad, ignore_index, eps, need_dh, need_dw, need_db) -> (dh, dW, db)``
      for upstream row weights ``c = grad`` (0 on rows without a target): ``dh = c dh_unit``,
      ``dW = (c G0)^T h``, ``db = sum_i c_i G0_i``; the ones not needed as empty tensors.

Everything is computed in float32 (float64 for float64 inputs), like the spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.rules import compute_dtype


def linear_cross_entropy_reference(
    hidden, weight, bias, targets, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, ...)`` in float32 (float64 for float64); the
    arguments as :func:`fastvl.ops.linear_cross_entropy` takes them."""
    cd = compute_dtype(hidden.dtype)
    logits = F.linear(hidden.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
    return F.cross_entropy(
        logits, targets.long(), ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


# ---- building blocks over a block of rows (the reference holds all rows, chunked one chunk) ----------


def safe_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets as int64 with 0 on rows without a target, the rows with one as a bool mask)."""
    valid = targets != ignore_index
    return torch.where(valid, targets, torch.zeros_like(targets)).long(), valid


def logits_block(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + b`` in ``w``'s (compute) dtype: ``h (R, D)`` in any float dtype, ``w (V, D)``, ``b (V,)``."""
    x = h.to(w.dtype) @ w.T
    return x.add_(b) if b is not None else x


def row_loss(m, log_sum, x_t, x_mean, eps: float) -> torch.Tensor:
    """``lse - (1 - eps) x_t - eps mean_j x_j`` with ``lse = m + log_sum``, each logit taken from the row max
    first (the differences are exact where it matters: PyTorch's log_softmax order)."""
    loss = (1.0 - eps) * (m - x_t) + log_sum
    return loss + eps * (m - x_mean) if eps else loss


def row_losses(x: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss (R,), lse (2, R): row max and log-sum-exp above it) of the logits block ``x (R, V)``; the
    loss is 0 on rows without a target."""
    m = x.max(1).values
    log_sum = torch.log(torch.exp(x - m[:, None]).sum(1))
    loss = row_loss(m, log_sum, x.gather(1, t[:, None]).squeeze(1), x.mean(1) if eps else None, eps)
    return torch.where(valid, loss, torch.zeros_like(loss)), torch.stack([m, log_sum])


def unit_gradient_(
    x: torch.Tensor, lse: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, eps: float
) -> torch.Tensor:
    """``G0 = softmax(x) - (1 - eps) onehot(t) - eps / V`` written over the logits block ``x`` (its memory is
    reused), rows without a target zeroed; ``lse (2, R)`` as :func:`row_losses` returns it."""
    x.sub_(lse[0, :, None]).sub_(lse[1, :, None]).exp_()
    x.scatter_add_(1, t[:, None], torch.full_like(lse[0], eps - 1.0)[:, None])
    if eps:
        x.sub_(eps / x.shape[1])
    return x.mul_(valid[:, None])


def absent(like: torch.Tensor) -> torch.Tensor:
    """An absent output of a primitive (custom ops return tensors)."""
    return like.new_empty(0)


def backward_setup(hidden, targets, dh_unit, grad, ignore_index: int, need_dh: bool):
    """What every backward starts from: (compute dtype, safe targets, valid rows, the upstream row weights
    ``c`` (0 on rows without a target), dh = c * dh_unit in hidden's dtype or absent)."""
    cd = compute_dtype(hidden.dtype)
    t, valid = safe_targets(targets, ignore_index)
    c = torch.where(valid, grad.to(cd), torch.zeros((), dtype=cd, device=grad.device))
    dh = (c[:, None] * dh_unit).to(hidden.dtype) if need_dh else absent(hidden)
    return cd, t, valid, c, dh


# ---- the primitives over materialised logits ------------------------------------------------------


def lce_forward_reference(hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh):
    """(loss (N,), lse (N,), dh_unit (N, D) or (0,)) from the materialised (N, V) logits."""
    cd = compute_dtype(hidden.dtype)
    w = weight.to(cd)
    t, valid = safe_targets(targets, ignore_index)
    x = logits_block(hidden, w, None if bias is None else bias.to(cd))
    loss, lse = row_losses(x, t, valid, label_smoothing)
    dh = unit_gradient_(x, lse, t, valid, label_smoothing) @ w if need_dh else absent(loss)
    return loss, lse, dh


def lce_backward_reference(
    hidden, weight, bias, targets, lse, dh_unit, grad, ignore_index, label_smoothing, need_dh, need_dw, need_db
):
    """(dh, dW, db) for upstream row weights ``grad``, from the materialised logits."""
    cd, t, valid, c, dh = backward_setup(hidden, targets, dh_unit, grad, ignore_index, need_dh)
    dw, db = absent(weight), absent(weight if bias is None else bias)
    if need_dw or need_db:
        x = logits_block(hidden, weight.to(cd), None if bias is None else bias.to(cd))
        g = unit_gradient_(x, lse.to(cd), t, valid, label_smoothing).mul_(c[:, None])
        if need_dw:
            dw = (g.T @ hidden.to(cd)).to(weight.dtype)
        if need_db:
            db = g.sum(0).to(bias.dtype)
    return dh, dw, db
