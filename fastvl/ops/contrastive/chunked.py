"""The ``chunked`` backend of the contrastive primitives: plain PyTorch over row blocks of at most
``CHUNK_ELEMS`` logits, blocks recomputed in backward, so memory is O(B * block) on any device. Same
signatures as the references in :mod:`.reference`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvl.rules import compute_dtype

from .reference import lse_weights, masked_row_lse, pair_signs

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


def lse_backward_chunked(q, k, scale, col_mask, alpha, rho, beta, gamma, need_q, need_k):
    cd = compute_dtype(q.dtype)
    M, N = q.shape[0], k.shape[0]
    kc, s = k.to(cd), scale.to(cd)
    alpha, rho, beta, gamma = alpha.to(cd), rho.to(cd), beta.to(cd), gamma.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_k else None
    ds = torch.zeros((), dtype=cd, device=q.device)
    R = rows_per_block(N)
    for i in range(0, M, R):
        qc = q[i : i + R].to(cd)
        dot = qc @ kc.T
        p = lse_weights(dot * s, col_mask, alpha[i : i + R], rho[i : i + R], beta, gamma)
        ds += (p * dot).sum()
        if need_q:
            dq[i : i + R] = p @ kc
        if need_k:
            dk.addmm_(p.T, qc)
    dq = (dq * s).to(q.dtype) if need_q else None
    dk = (dk * s).to(k.dtype) if need_k else None
    return dq, dk, ds


def siglip_sum_chunked(q, k, scale, bias, offset):
    cd = compute_dtype(q.dtype)
    kc, s, b = k.to(cd), scale.to(cd), bias.to(cd)
    total = torch.zeros((), dtype=cd, device=q.device)
    R = rows_per_block(k.shape[0])
    for i in range(0, q.shape[0], R):
        qc = q[i : i + R].to(cd)
        y = pair_signs(torch.arange(i, i + qc.shape[0], device=q.device), k.shape[0], offset, cd)
        total += -F.logsigmoid(y * ((qc @ kc.T) * s + b)).sum()
    return total


def siglip_backward_chunked(q, k, scale, bias, grad, offset, need_q, need_k):
    cd = compute_dtype(q.dtype)
    kc, s, b, gr = k.to(cd), scale.to(cd), bias.to(cd), grad.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=cd, device=k.device) if need_k else None
    ds = torch.zeros((), dtype=cd, device=q.device)
    db = torch.zeros((), dtype=cd, device=q.device)
    R = rows_per_block(k.shape[0])
    for i in range(0, q.shape[0], R):
        qc = q[i : i + R].to(cd)
        dot = qc @ kc.T
        y = pair_signs(torch.arange(i, i + qc.shape[0], device=q.device), k.shape[0], offset, cd)
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
