"""Score-based token selection: keep the k highest-scoring tokens of each group, in their original order.

Row layout ``(B, P + GS*S, C)``: P protected leading tokens (always kept, copied first) then GS equal groups of S
scored tokens; output group g reads source group ``frames[b, g]`` when a frame choice is given (SMAUG's frame
selection), else group g.

Two forward launches and one backward launch, no sort and no separate gather:
  rank   ``rank[l] = #{j in l's group : key_j beats key_l}`` by pairwise comparison in (BLOCK_I, BLOCK_J) tiles,
         where j beats l iff ``score_j > score_l`` or (equal scores and ``j < l``): a strict total order, so the
         ranks of a group are a permutation of ``0..S-1`` and ``rank < k`` keeps exactly k tokens (stable top-k)
  place  per block of tokens: ``pos = #{kept j < l}`` (the kept tokens before the block, then a cumsum inside it),
         ``ids[pos] = l``, ``inv[l] = pos`` (or -1), and the kept rows of x copied to ``out[pos]``
  back   ``dx[l] = grad[inv[l]]`` where kept, else 0: a gather through the inverse map, every row written once

Scores compare as int32 keys made from their fp32 bits (negative floats' magnitude bits flipped, so integer order
is float order), after ``-0.0`` is made ``+0.0`` and every NaN the canonical positive NaN: NaN ranks above
``+inf`` (``torch.sort(descending=True)``'s order) and ties among NaNs go to the lower index like other ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import empty, on_tensor_device, warps_for


@triton.jit
def _score_key(s_ptr, idx, S):
    """int32 keys in float order for the scores at ``idx`` of one group (INT32_MIN where ``idx >= S``)."""
    m = idx < S
    s = tl.load(s_ptr + idx, mask=m, other=0.0) + 0.0  # -0.0 + 0.0 = +0.0
    s = tl.where(s != s, float("nan"), s)
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # arithmetic shift: flips the magnitude of negatives only
    return tl.where(m, key, -2147483648)


@triton.jit
def _source_group(frames_ptr, grp, G, HAS_FRAMES: tl.constexpr):
    """(b, g, the source group read by output group g of row b) for program row ``grp = b*G + g``."""
    b = grp // G
    g = grp % G
    if HAS_FRAMES:
        src = tl.load(frames_ptr + grp).to(tl.int64)
    else:
        src = g
    return b, g, src


@triton.jit
def _rank_kernel(
    s_ptr, frames_ptr, rank_ptr, S, G, GS, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, HAS_FRAMES: tl.constexpr
):  # fmt: skip
    grp = tl.program_id(0).to(tl.int64)
    b, g, src = _source_group(frames_ptr, grp, G, HAS_FRAMES)
    base = s_ptr + (b * GS + src) * S  # the scores are (B, GS*S) contiguous
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ki = _score_key(base, i, S)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, S, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        kj = _score_key(base, j, S)
        beats = (kj[None, :] > ki[:, None]) | ((kj[None, :] == ki[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((beats & (j < S)[None, :]).to(tl.int32), axis=1)
    tl.store(rank_ptr + grp * S + i, rank, mask=i < S)


@triton.jit
def _place_kernel(
    rank_ptr,
    frames_ptr,
    x_ptr,
    out_ptr,
    ids_ptr,
    inv_ptr,
    S,
    K,
    G,
    GS,
    P,
    C,
    s_xb,
    s_xl,
    s_xc,
    s_ob,
    s_ol,
    HAS_FRAMES: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    grp = tl.program_id(0).to(tl.int64)
    b, g, src = _source_group(frames_ptr, grp, G, HAS_FRAMES)
    n_out = P + G * K  # rows of kept / ids
    n_in = P + GS * S  # rows of x / inv
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if (g == 0) & (tl.program_id(1) == 0):  # the protected leading tokens: always kept, first, in order
        for p0 in range(0, P, BLOCK_I):
            p = p0 + tl.arange(0, BLOCK_I)
            pm = p < P
            p64 = p.to(tl.int64)
            if tl.program_id(2) == 0:
                tl.store(ids_ptr + b * n_out + p64, p64, mask=pm)
                tl.store(inv_ptr + b * n_in + p64, p, mask=pm)
            m = pm[:, None] & cm[None, :]
            vals = tl.load(x_ptr + b * s_xb + p64[:, None] * s_xl + c[None, :] * s_xc, mask=m)
            tl.store(out_ptr + b * s_ob + p64[:, None] * s_ol + c[None, :], vals, mask=m)
    start = tl.program_id(1) * BLOCK_I
    i = start + tl.arange(0, BLOCK_I)
    rank = tl.load(rank_ptr + grp * S + i, mask=i < S, other=K)
    kept = rank < K
    before = tl.zeros([BLOCK_I], dtype=tl.int32)  # kept tokens of the group before this block
    for j0 in range(0, start, BLOCK_I):
        rj = tl.load(rank_ptr + grp * S + j0 + tl.arange(0, BLOCK_I))  # j0 + BLOCK_I <= start < S
        before += (rj < K).to(tl.int32)
    pos = tl.sum(before, axis=0) + tl.cumsum(kept.to(tl.int32), axis=0) - 1
    out_row = P + g * K + pos.to(tl.int64)
    in_row = P + src * S + i.to(tl.int64)
    if tl.program_id(2) == 0:
        tl.store(ids_ptr + b * n_out + out_row, in_row, mask=kept)
        tl.store(inv_ptr + b * n_in + in_row, tl.where(kept, out_row.to(tl.int32), -1), mask=i < S)
    m = kept[:, None] & cm[None, :]
    vals = tl.load(x_ptr + b * s_xb + in_row[:, None] * s_xl + c[None, :] * s_xc, mask=m)
    tl.store(out_ptr + b * s_ob + out_row[:, None] * s_ol + c[None, :], vals, mask=m)


@triton.jit
def _backward_kernel(
    g_ptr, inv_ptr, dx_ptr, L, C, s_gb, s_gk, s_gc, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    lrow = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    lm = lrow < L
    cm = c < C
    inv = tl.load(inv_ptr + b * L + lrow, mask=lm, other=-1).to(tl.int64)
    vals = tl.load(
        g_ptr + b * s_gb + inv[:, None] * s_gk + c[None, :] * s_gc, mask=(inv >= 0)[:, None] & cm[None, :], other=0.0
    )
    dst = dx_ptr + (b * L + lrow.to(tl.int64))[:, None] * C + c[None, :]
    tl.store(dst, vals, mask=lm[:, None] & cm[None, :])


def _tile(C: int) -> tuple[int, int]:
    """(rows, channels) of a copy tile: 16 rows (the cumsum's block), up to 4096 elements."""
    block_c = max(16, min(triton.next_power_of_2(C), 256))
    return 16, block_c


@on_tensor_device
def select_forward(
    x: torch.Tensor, scores: torch.Tensor, k: int, groups: int, protected: int = 0, frames: torch.Tensor | None = None
):
    """Keep the ``k`` highest-scoring tokens of each chosen group of every row, in order, after ``protected`` tokens.

    x ``(B, P + GS*S, C)`` any dtype and strides: ``P = protected`` leading tokens, then ``GS`` equal groups of S
    tokens; scores ``(B, GS*S)`` float (compared in fp32); ``frames (B, G)`` int64 picks the groups read (output
    group g reads group ``frames[b, g]``), else all ``G = GS = groups``. Returns ``kept (B, P + G*k, C)``,
    ``ids (B, P + G*k)`` int64 (positions in x) and ``inv (B, P + GS*S)`` int32 (each token's row in ``kept``,
    -1 if dropped).
    """
    B, L, C = x.shape
    GS = groups
    S = (L - protected) // GS
    G = frames.shape[1] if frames is not None else GS
    s = scores.to(torch.float32).contiguous()
    kept = empty((B, protected + G * k, C), x.dtype, x.device)
    ids = empty((B, protected + G * k), torch.int64, x.device)
    # tokens of groups no program reads (frames given) must read -1
    inv = torch.full((B, L), -1, dtype=torch.int32, device=x.device) if G < GS else empty((B, L), torch.int32, x.device)
    if B == 0 or G == 0:
        return kept, ids, inv
    fr = frames.contiguous() if frames is not None else s
    rank = torch.empty((B * G, S), dtype=torch.int32, device=x.device)
    block = max(16, min(64, triton.next_power_of_2(S)))
    _rank_kernel[(B * G, triton.cdiv(S, block))](
        s, fr, rank, S, G, GS, BLOCK_I=block, BLOCK_J=block, HAS_FRAMES=frames is not None, num_warps=4
    )
    block_i, block_c = _tile(C)
    _place_kernel[(B * G, triton.cdiv(S, block_i), triton.cdiv(C, block_c))](
        rank, fr, x, kept, ids, inv, S, k, G, GS, protected, C, x.stride(0), x.stride(1), x.stride(2),
        kept.stride(0), kept.stride(1), HAS_FRAMES=frames is not None, BLOCK_I=block_i, BLOCK_C=block_c,
        num_warps=warps_for(block_i * block_c),
    )  # fmt: skip
    return kept, ids, inv


@on_tensor_device
def select_backward(grad: torch.Tensor, inv: torch.Tensor, L: int) -> torch.Tensor:
    """``dx (B, L, C)``: ``grad[b, inv[b, l]]`` where ``inv >= 0``, zeros elsewhere (grad any strides)."""
    B, _, C = grad.shape
    dx = empty((B, L, C), grad.dtype, grad.device)
    if dx.numel() == 0:
        return dx
    block_l, block_c = _tile(C)
    _backward_kernel[(B, triton.cdiv(L, block_l), triton.cdiv(C, block_c))](
        grad, inv, dx, L, C, grad.stride(0), grad.stride(1), grad.stride(2), BLOCK_L=block_l, BLOCK_C=block_c,
        num_warps=warps_for(block_l * block_c),
    )  # fmt: skip
    return dx
