"""The ``chunked`` backend of the contrastive primitives: plain PyTorch over row blocks of at most
``CHUNK_ELEMS`` logits, blocks recomputed in backward, so memory is O(B * block) on any device. Same
signatures as the references in :mod:`.reference`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastvl.rules import compute_dtype

from .reference import lse_weights, masked_row_lse, pair_signs, siglip_weights

CHUNK_ELEMS = 1 << 22
"""Logits per block (16 MiB in fp32; rows per block = CHUNK_ELEMS // N)."""


def rows_per_block(N: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, N))


def lse_chunked(q, k, scale, col_mask, symmetric):
    """lse_reference over row blocks: the column LSE is merged block by block."""
    cd = compute_dtype(q.dtype)
    M, N = q.shape[0], k.shape[0]
    kc, s = k.to(cd), scale.to(cd)
    row = torch.empty(M, dtype=cd, device=q.device)
    col = torch.full((N,) if symmetric else (0,), float("-inf"), dtype=cd, device=q.device)
    R = rows_per_block(N)
    for i in range(0, M, R):
        x = (q[i : i + R].to(cd) @ kc.T) * s
        row[i : i + R] = masked_row_lse(x, col_mask)
        if symmetric:
            col = torch.logaddexp(col, torch.logsumexp(x, 0))
    return row, col


def siglip_sum_chunked(q, k, scale, bias, offset):
    """siglip_sum_reference over row blocks."""
    cd = compute_dtype(q.dtype)
    kc, s, b = k.to(cd), scale.to(cd), bias.to(cd)
    total = torch.zeros((), dtype=cd, device=q.device)
    R = rows_per_block(k.shape[0])
    for i in range(0, q.shape[0], R):
        qc = q[i : i + R].to(cd)
        y = pair_signs(torch.arange(i, i + qc.shape[0], device=q.device), k.shape[0], offset, cd)
        total += -F.logsigmoid(y * ((qc @ kc.T) * s + b)).sum()
    return total


def _backward_blocks(q, k, s, need_q, need_k, weights: Callable[[int, torch.Tensor], torch.Tensor]):
    """The loop both backwards share. Per row block starting at row ``i``, ``G = weights(i, dot)`` is the loss's
    gradient with respect to the block's logits (``dot = q_block k^T``). Returns ``dq = s G k`` and
    ``dk = s G^T q`` (None where not needed), ``sum(G * dot)`` (d/dscale) and ``sum(G)`` (d/dbias)."""
    cd = s.dtype
    kc = k.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_k else None
    g_dot = torch.zeros((), dtype=cd, device=q.device)
    g_sum = torch.zeros((), dtype=cd, device=q.device)
    R = rows_per_block(k.shape[0])
    for i in range(0, q.shape[0], R):
        qc = q[i : i + R].to(cd)
        dot = qc @ kc.T
        g = weights(i, dot)
        g_dot += (g * dot).sum()
        g_sum += g.sum()
        if need_q:
            dq[i : i + R] = g @ kc
        if need_k:
            dk.addmm_(g.T, qc)
    dq = (dq * s).to(q.dtype) if need_q else None
    dk = (dk * s).to(k.dtype) if need_k else None
    return dq, dk, g_dot, g_sum


def lse_backward_chunked(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    """lse_backward_reference over row blocks."""
    cd = compute_dtype(q.dtype)
    s = scale.to(cd)
    alpha, rho, beta, gamma = alpha.to(cd), rho.to(cd), beta.to(cd), gamma.to(cd)

    def weights(i, dot):
        rows = slice(i, i + dot.shape[0])
        return lse_weights(dot * s, col_mask, alpha[rows], rho[rows], beta, gamma)

    dq, dk, ds, _ = _backward_blocks(q, k, s, need_q, need_k, weights)
    return dq, dk, ds


def siglip_backward_chunked(q, k, scale, bias, grad, offset, need_q, need_k):
    """siglip_backward_reference over row blocks."""
    cd = compute_dtype(q.dtype)
    s, b, gr = scale.to(cd), bias.to(cd), grad.to(cd)

    def weights(i, dot):
        y = pair_signs(torch.arange(i, i + dot.shape[0], device=q.device), k.shape[0], offset, cd)
        return siglip_weights(dot, y, s, b, gr)

    return _backward_blocks(q, k, s, need_q, need_k, weights)
