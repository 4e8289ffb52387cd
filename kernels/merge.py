"""ToMe token merging: bipartite matching (similarity + argmax fused), the size-weighted merge and its backward.

  match    per (row, group, block of A tokens): cosine similarity to every B token of the group in (BLOCK_A,
           BLOCK_B) tiles, ``tl.dot`` over channel chunks with fp32 accumulation, ``cos = <a, b> / (|a| |b|)``,
           and a running max / argmax (ties: the lower B index, within a tile by ``tie_break_left`` and across
           tiles by a strict ``>``). Only ``(score, best)`` per A token leave the chip, never the A x B matrix.
  merge    out[j] = sum_{l -> j} s_l x_l / sum_{l -> j} s_l over the tokens sent to row j (``dest``), read
           through a CSR list of each row's sources in ascending order: deterministic, no atomics, each output
           row written once, fp32 accumulation; the new size ``sum s_l`` comes from the same pass.
  backward d merged_j / d x_l = s_l / S_j for every l -> j, so ``dx[l] = grad[dest[l]] * s_l / S[dest[l]]``: a
           gather with a per-row weight, every row of dx written once.
The sort of the matches (which r A tokens merge) and the destinations are a few (B, L) integer ops done by
``fastvl.ops.merge`` with torch, shared with the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import empty, on_tensor_device, warps_for


@triton.jit
def _match_kernel(
    m_ptr,
    score_ptr,
    best_ptr,
    Cm,
    G,
    S,
    nA,
    nB,
    P,
    STRIDE,
    A_OFF,
    B_OFF,
    s_mb,
    s_ml,
    s_mc,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):
    grp = tl.program_id(0).to(tl.int64)
    base = m_ptr + (grp // G) * s_mb + (P + (grp % G) * S) * s_ml
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    am = a < nA
    rows_a = (a * STRIDE + A_OFF).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    # |a|^2 in fp32 (with one chunk the A tile stays in registers for every B tile)
    if ONE_CHUNK:
        ma = tl.load(base + rows_a[:, None] * s_ml + c[None, :] * s_mc, mask=am[:, None] & (c < Cm)[None, :], other=0.0)
        na2 = tl.sum(ma.to(tl.float32) * ma.to(tl.float32), axis=1)
    else:
        na2 = tl.zeros([BLOCK_A], dtype=tl.float32)
        for c0 in range(0, Cm, BLOCK_C):
            cc = c0 + c
            mc = tl.load(
                base + rows_a[:, None] * s_ml + cc[None, :] * s_mc, mask=am[:, None] & (cc < Cm)[None, :], other=0.0
            )
            na2 += tl.sum(mc.to(tl.float32) * mc.to(tl.float32), axis=1)
    inv_a = 1.0 / tl.sqrt(tl.maximum(na2, 1e-30))  # |a| clamped at 1e-15: a zero row has similarity 0
    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, nB, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        bm = bb < nB
        rows_b = (bb * STRIDE + B_OFF).to(tl.int64)
        if ONE_CHUNK:
            mb = tl.load(
                base + rows_b[:, None] * s_ml + c[None, :] * s_mc, mask=bm[:, None] & (c < Cm)[None, :], other=0.0
            )
            nb2 = tl.sum(mb.to(tl.float32) * mb.to(tl.float32), axis=1)
            if IEEE:
                dots = tl.dot(ma, tl.trans(mb), input_precision="ieee")
            else:
                dots = tl.dot(ma, tl.trans(mb))
        else:
            dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
            nb2 = tl.zeros([BLOCK_B], dtype=tl.float32)
            for c0 in range(0, Cm, BLOCK_C):
                cc = c0 + c
                cm = (cc < Cm)[None, :]
                ma = tl.load(base + rows_a[:, None] * s_ml + cc[None, :] * s_mc, mask=am[:, None] & cm, other=0.0)
                mb = tl.load(base + rows_b[:, None] * s_ml + cc[None, :] * s_mc, mask=bm[:, None] & cm, other=0.0)
                nb2 += tl.sum(mb.to(tl.float32) * mb.to(tl.float32), axis=1)
                if IEEE:
                    dots = tl.dot(ma, tl.trans(mb), dots, input_precision="ieee")
                else:
                    dots = tl.dot(ma, tl.trans(mb), dots)
        cos = dots * inv_a[:, None] * (1.0 / tl.sqrt(tl.maximum(nb2, 1e-30)))[None, :]
        cos = tl.where(bm[None, :], cos, float("-inf"))
        tile_max = tl.max(cos, axis=1)
        tile_idx = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32)
        take = tile_max > best  # strict: an earlier tile keeps a tie
        best = tl.where(take, tile_max, best)
        best_idx = tl.where(take, b0 + tile_idx, best_idx)
    tl.store(score_ptr + grp * nA + a, best, mask=am)
    tl.store(best_ptr + grp * nA + a, best_idx, mask=am)


@triton.jit
def _merge_kernel(
    x_ptr,
    size_ptr,
    order_ptr,
    off_ptr,
    out_ptr,
    nsize_ptr,
    L,
    Lo,
    C,
    s_xb,
    s_xl,
    s_xc,
    HAS_SIZE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < Lo
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    start = tl.load(off_ptr + b * (Lo + 1) + j, mask=jm, other=0)
    cnt = tl.load(off_ptr + b * (Lo + 1) + j + 1, mask=jm, other=0) - start
    num = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    den = tl.zeros([BLOCK_J], dtype=tl.float32)
    for t in range(0, tl.max(cnt, axis=0)):  # sources of each row in ascending order
        mt = t < cnt
        src = tl.load(order_ptr + b * L + start + t, mask=mt, other=0).to(tl.int64)
        if HAS_SIZE:
            s = tl.load(size_ptr + b * L + src, mask=mt, other=0.0)
        else:
            s = mt.to(tl.float32)
        v = tl.load(x_ptr + b * s_xb + src[:, None] * s_xl + c[None, :] * s_xc, mask=mt[:, None] & cm[None, :])
        num += s[:, None] * v.to(tl.float32)
        den += s
    m = jm[:, None] & cm[None, :]
    dst = out_ptr + (b * Lo + j.to(tl.int64))[:, None] * C + c[None, :]
    tl.store(dst, (num / tl.where(jm, den, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=m)
    if tl.program_id(2) == 0:
        tl.store(nsize_ptr + b * Lo + j, den, mask=jm)


@triton.jit
def _merge_backward_kernel(
    g_ptr,
    dest_ptr,
    size_ptr,
    nsize_ptr,
    dx_ptr,
    L,
    Lo,
    C,
    s_gb,
    s_gl,
    s_gc,
    HAS_SIZE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lrow = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = lrow < L
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = lm[:, None] & (c < C)[None, :]
    d = tl.load(dest_ptr + b * L + lrow, mask=lm, other=0)
    if HAS_SIZE:
        s = tl.load(size_ptr + b * L + lrow, mask=lm, other=1.0)
    else:
        s = tl.full([BLOCK_L], 1.0, dtype=tl.float32)
    w = s / tl.load(nsize_ptr + b * Lo + d, mask=lm, other=1.0)
    g = tl.load(g_ptr + b * s_gb + d[:, None] * s_gl + c[None, :] * s_gc, mask=m, other=0.0)
    dst = dx_ptr + (b * L + lrow.to(tl.int64))[:, None] * C + c[None, :]
    tl.store(dst, (g.to(tl.float32) * w[:, None]).to(dx_ptr.dtype.element_ty), mask=m)


def _tile(C: int) -> tuple[int, int]:
    """(rows, channels) of a row tile: 16 rows, up to 256 channels."""
    return 16, max(16, min(triton.next_power_of_2(C), 256))


@on_tensor_device
def match(
    metric: torch.Tensor, P: int, G: int, S: int, nA: int, nB: int, stride: int, a_off: int, b_off: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B match of every A token: ``(score (B, G, nA) float32, best (B, G, nA) int32)``.

    metric ``(B, L, Cm)`` fp16/bf16/fp32, any row stride; token a of A in group g is row
    ``P + g*S + a*stride + a_off`` (B tokens: ``b_off``). fp32 metrics are multiplied in IEEE fp32, not TF32.
    """
    B, _, Cm = metric.shape
    score = empty((B, G, nA), torch.float32, metric.device)
    best = empty((B, G, nA), torch.int32, metric.device)
    if score.numel() == 0 or nB == 0:
        return score, best
    one_chunk = Cm <= 128
    block_c = max(16, triton.next_power_of_2(Cm)) if one_chunk else 64
    block_a = max(16, min(64, triton.next_power_of_2(nA)))
    block_b = max(16, min(64, triton.next_power_of_2(nB)))
    _match_kernel[(B * G, triton.cdiv(nA, block_a))](
        metric, score, best, Cm, G, S, nA, nB, P, stride, a_off, b_off, metric.stride(0), metric.stride(1),
        metric.stride(2), BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c, ONE_CHUNK=one_chunk,
        IEEE=metric.dtype == torch.float32, num_warps=4, num_stages=3,
    )  # fmt: skip
    return score, best


def _sources(dest: torch.Tensor, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the tokens sent to each output row: ``(order (B, L) int32, offsets (B, out_len + 1) int32)``."""
    B, L = dest.shape
    order = torch.sort(dest, dim=1, stable=True).indices.to(torch.int32)
    counts = torch.zeros(B, out_len, dtype=torch.int32, device=dest.device)
    counts.scatter_add_(1, dest, torch.ones(B, L, dtype=torch.int32, device=dest.device))
    off = torch.zeros(B, out_len + 1, dtype=torch.int32, device=dest.device)
    torch.cumsum(counts, dim=1, out=off[:, 1:])
    return order.contiguous(), off


@on_tensor_device
def merge_forward(
    x: torch.Tensor, size: torch.Tensor | None, dest: torch.Tensor, out_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged (B, out_len, C) in x's dtype, new size (B, out_len) float32)``: the size-weighted mean of the
    tokens ``dest (B, L)`` sends to each row. x any strides; size ``(B, L)`` or None (all 1)."""
    B, L, C = x.shape
    merged = empty((B, out_len, C), x.dtype, x.device)
    new_size = empty((B, out_len), torch.float32, x.device)
    if merged.numel() == 0:
        return merged, new_size
    order, off = _sources(dest, out_len)
    s = size.to(torch.float32).contiguous() if size is not None else order
    block_j, block_c = _tile(C)
    _merge_kernel[(B, triton.cdiv(out_len, block_j), triton.cdiv(C, block_c))](
        x, s, order, off, merged, new_size, L, out_len, C, x.stride(0), x.stride(1), x.stride(2),
        HAS_SIZE=size is not None, BLOCK_J=block_j, BLOCK_C=block_c, num_warps=warps_for(block_j * block_c),
    )  # fmt: skip
    return merged, new_size


@on_tensor_device
def merge_backward(
    grad: torch.Tensor, dest: torch.Tensor, size: torch.Tensor | None, new_size: torch.Tensor
) -> torch.Tensor:
    """``dx (B, L, C)`` = ``grad[dest[l]] * size[l] / new_size[dest[l]]`` in grad's dtype (grad any strides)."""
    B, L = dest.shape
    Lo, C = grad.shape[1], grad.shape[2]
    dx = empty((B, L, C), grad.dtype, grad.device)
    if dx.numel() == 0:
        return dx
    s = size.to(torch.float32).contiguous() if size is not None else new_size
    block_l, block_c = _tile(C)
    _merge_backward_kernel[(B, triton.cdiv(L, block_l), triton.cdiv(C, block_c))](
        grad, dest.contiguous(), s, new_size.to(torch.float32).contiguous(), dx, L, Lo, C, grad.stride(0),
        grad.stride(1), grad.stride(2), HAS_SIZE=size is not None, BLOCK_L=block_l, BLOCK_C=block_c,
        num_warps=warps_for(block_l * block_c),
    )  # fmt: skip
    return dx
