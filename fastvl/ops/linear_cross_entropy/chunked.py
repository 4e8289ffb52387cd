"""The ``chunked`` backend of ``linear_cross_entropy``: plain PyTorch over row chunks of at most ``CHUNK_ELEMS``
logits, logits recomputed in backward, so it holds one chunk of logits at a time on any device. Same
signatures as the primitives in :mod:`.reference`.

The forward computes the gradient to the hidden states of each chunk while its logits are at hand (Liger-Kernel's
scheme); the gradient to the weight and bias needs the upstream row weights, so the backward recomputes each
chunk's logits (it is skipped when only the hidden states need a gradient).
"""

from __future__ import annotations

import torch

from fastvl.rules import compute_dtype

from .reference import absent, backward_setup, logits_block, row_losses, safe_targets, unit_gradient_

CHUNK_ELEMS = 1 << 22
"""Logits per chunk (16 MiB in fp32; rows per chunk = CHUNK_ELEMS // V)."""


def rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, V))


def lce_forward_chunked(hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh):
    """Row chunks of the logits, each reduced to its losses (and gradient to hidden) before the next."""
    cd = compute_dtype(hidden.dtype)
    N, D = hidden.shape
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    t, valid = safe_targets(targets, ignore_index)
    loss = torch.empty(N, dtype=cd, device=hidden.device)
    lse = torch.empty((2, N), dtype=cd, device=hidden.device)
    dh = torch.empty((N, D), dtype=cd, device=hidden.device) if need_dh else absent(loss)
    R = rows_per_chunk(weight.shape[0])
    for i in range(0, N, R):
        rows = slice(i, i + R)
        x = logits_block(hidden[rows], w, b)
        loss[rows], lse[:, rows] = row_losses(x, t[rows], valid[rows], label_smoothing)
        if need_dh:
            torch.mm(unit_gradient_(x, lse[:, rows], t[rows], valid[rows], label_smoothing), w, out=dh[rows])
        del x
    return loss, lse, dh


def lce_backward_chunked(
    hidden, weight, bias, targets, lse, dh_unit, grad, ignore_index, label_smoothing, need_dh, need_dw, need_db
):
    """The gradients of the reference's backward, the logits recomputed one row chunk at a time."""
    cd, t, valid, c, dh = backward_setup(hidden, targets, dh_unit, grad, ignore_index, need_dh)
    dw, db = absent(weight), absent(weight if bias is None else bias)
    if not (need_dw or need_db):
        return dh, dw, db
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    lse = lse.to(cd)
    gw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_dw else None
    gb = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_db else None
    R = rows_per_chunk(weight.shape[0])
    for i in range(0, hidden.shape[0], R):
        rows = slice(i, i + R)
        g = unit_gradient_(logits_block(hidden[rows], w, b), lse[:, rows], t[rows], valid[rows], label_smoothing)
        g.mul_(c[rows, None])
        if need_dw:
            gw.addmm_(g.T, hidden[rows].to(cd))
        if need_db:
            gb += g.sum(0)
        del g
    if need_dw:
        dw = gw.to(weight.dtype)
    if need_db:
        db = gb.to(bias.dtype)
    return dh, dw, db
