"""Token selection kernels: random index draw (DropToken / MAE masking), row gather, scatter-add.

The draw ranks tokens by a 64-bit key ``(random or noise key) << 20 | l`` (unique thanks to the index
bits): ``rank[l] = #{j : key_j < key_l}`` is MAE's ``ids_restore``, and the tokens with rank < K are
kept, ``keep[rank[l]] = l`` (MAE's ``ids_shuffle[:K]``). Keys are a pure function of (seed, row, token),
so each program recomputes the keys it compares against: no sort, no shared state, and every store
goes to a distinct address. Grid: (rows, token blocks), so even one shared row spreads over the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import empty, row_block, warps_for


@triton.jit
def _draw_key(seed, noise_ptr, row64, idx, L, s_noise, HAS_NOISE: tl.constexpr):
    m = idx < L
    idx64 = idx.to(tl.int64)
    if HAS_NOISE:
        nz = tl.load(noise_ptr + row64 * s_noise + idx64, mask=m, other=0.0)
        bits = nz.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        # IEEE-754 bits -> unsigned key in float order (negatives reversed, below the positives)
        key = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
    else:
        r0, r1, r2, r3 = tl.randint4x(seed, row64 * L + idx64)
        key = (r0.to(tl.int64) & 0xFFFFFFFF) * 256 + (r1.to(tl.int64) & 255)  # 40 random bits
    return tl.where(m, key * 1048576 + idx64, 0x3FFFFFFFFFFFFFFF)


@triton.jit
def _draw_kernel(
    seed_ptr,
    noise_ptr,
    keep_ptr,
    inv_ptr,
    mask_ptr,
    L,
    K,
    s_noise,
    HAS_NOISE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row64 = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    im = i < L
    seed = tl.load(seed_ptr)
    ki = _draw_key(seed, noise_ptr, row64, i, L, s_noise, HAS_NOISE)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        kj = _draw_key(seed, noise_ptr, row64, j0 + tl.arange(0, BLOCK_J), L, s_noise, HAS_NOISE)
        rank += tl.sum((kj[None, :] < ki[:, None]).to(tl.int32), axis=1)
    i64 = i.to(tl.int64)
    tl.store(inv_ptr + row64 * L + i64, rank.to(tl.int64), mask=im)
    if HAS_MASK:
        tl.store(mask_ptr + row64 * L + i64, (rank >= K).to(mask_ptr.dtype.element_ty), mask=im)
    tl.store(keep_ptr + row64 * K + rank, i64, mask=im & (rank < K))


def draw(
    rows: int,
    L: int,
    K: int,
    *,
    seed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    mask_dtype: torch.dtype | None = None,
    device=None,
):
    """Per-row uniform random order; returns ``(keep (rows, K), ids_restore (rows, L), mask or None)``.

    ``keep`` are the first K of the shuffle (``ids_shuffle[:, :K]``), ``mask (rows, L)`` (1 = removed) is
    written when ``mask_dtype`` is given. ``noise (rows, L)`` float32 orders tokens like
    ``argsort(noise, stable=True)``; without it keys come from Philox seeded by the int64 tensor ``seed``.
    """
    device = device if device is not None else (noise.device if noise is not None else seed.device)
    keep = empty((rows, K), torch.int64, device)
    inv = empty((rows, L), torch.int64, device)
    mask = empty((rows, L), mask_dtype, device) if mask_dtype is not None else None
    if rows == 0:
        return keep, inv, mask
    BLOCK_I = max(16, min(64, triton.next_power_of_2(L)))
    BLOCK_J = max(16, min(64, triton.next_power_of_2(L)))
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=device)
    _draw_kernel[(rows, triton.cdiv(L, BLOCK_I))](
        seed,
        noise if noise is not None else inv,
        keep,
        inv,
        mask if mask is not None else inv,
        L,
        K,
        noise.stride(0) if noise is not None else 0,
        HAS_NOISE=noise is not None,
        HAS_MASK=mask is not None,
        BLOCK_I=BLOCK_I,
        BLOCK_J=BLOCK_J,
        num_warps=4,
    )
    return keep, inv, mask


@triton.jit
def _gather_kernel(
    src_ptr,
    idx_ptr,
    pos_ptr,
    out_ptr,
    J,
    C,
    n_valid,
    s_sb,
    s_sl,
    s_sc,
    i_sb,
    i_sj,
    p_sl,
    p_sc,
    o_sb,
    o_sj,
    HAS_POS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    jm = j < J
    cm = c < C
    idx = tl.load(idx_ptr + b.to(tl.int64) * i_sb + j * i_sj, mask=jm, other=0).to(tl.int64)
    valid = jm & (idx >= 0) & (idx < n_valid)
    m = valid[:, None] & cm[None, :]
    vals = tl.load(src_ptr + b.to(tl.int64) * s_sb + idx[:, None] * s_sl + c[None, :] * s_sc, mask=m, other=0.0)
    if HAS_POS:
        p = tl.load(pos_ptr + idx[:, None] * p_sl + c[None, :] * p_sc, mask=m, other=0.0)
        vals = (vals.to(tl.float32) + p.to(tl.float32)).to(out_ptr.dtype.element_ty)
    dst = out_ptr + b.to(tl.int64) * o_sb + j.to(tl.int64)[:, None] * o_sj + c[None, :]
    tl.store(dst, vals, mask=jm[:, None] & cm[None, :])


def gather(src: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None, n_valid: int | None = None):
    """out[b, j] = src[b, idx[b, j]] (+ pos[idx[b, j]]) where 0 <= idx < n_valid, else 0.

    src (B, Ls, C) any strides; idx (B, J) or (1, J) (shared by the batch); pos (Ls, C) or None.
    """
    B, Ls, C = src.shape
    J = idx.shape[1]
    out = empty((B, J, C), src.dtype, src.device)
    if out.numel() == 0:
        return out
    n_valid = Ls if n_valid is None else n_valid
    BLOCK_C = row_block(C, src.element_size(), max_bytes=2048)
    BLOCK_J = max(1, min(triton.next_power_of_2(J), 4096 // BLOCK_C))
    grid = (B, triton.cdiv(J, BLOCK_J), triton.cdiv(C, BLOCK_C))
    i_sb = 0 if idx.shape[0] == 1 else idx.stride(0)
    _gather_kernel[grid](
        src,
        idx,
        pos if pos is not None else src,
        out,
        J,
        C,
        n_valid,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        i_sb,
        idx.stride(1),
        pos.stride(0) if pos is not None else 0,
        pos.stride(1) if pos is not None else 0,
        out.stride(0),
        out.stride(1),
        HAS_POS=pos is not None,
        BLOCK_J=BLOCK_J,
        BLOCK_C=BLOCK_C,
        num_warps=warps_for(BLOCK_J * BLOCK_C),
    )
    return out


@triton.jit
def _scatter_add_kernel(
    g_ptr,
    idx_ptr,
    acc_ptr,
    J,
    C,
    L,
    s_gb,
    s_gj,
    s_gc,
    i_sb,
    i_sj,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    jm = j < J
    m = jm[:, None] & (c < C)[None, :]
    idx = tl.load(idx_ptr + b.to(tl.int64) * i_sb + j * i_sj, mask=jm, other=0).to(tl.int64)
    g = tl.load(g_ptr + b.to(tl.int64) * s_gb + j.to(tl.int64)[:, None] * s_gj + c[None, :] * s_gc, mask=m, other=0.0)
    dst = acc_ptr + (b.to(tl.int64) * L + idx[:, None]) * C + c[None, :]
    tl.atomic_add(dst, g.to(tl.float32), mask=m, sem="relaxed")


def scatter_add(grad: torch.Tensor, idx: torch.Tensor, L: int) -> torch.Tensor:
    """out (B, L, C) zeros, out[b, idx[b, j]] += grad[b, j] (duplicates summed, fp32 accumulation)."""
    B, J, C = grad.shape
    acc = torch.zeros((B, L, C), dtype=torch.float32, device=grad.device)
    if grad.numel() == 0:
        return acc.to(grad.dtype)
    BLOCK_C = row_block(C, 4, max_bytes=2048)
    BLOCK_J = max(1, min(triton.next_power_of_2(J), 2048 // BLOCK_C))
    grid = (B, triton.cdiv(J, BLOCK_J), triton.cdiv(C, BLOCK_C))
    i_sb = 0 if idx.shape[0] == 1 else idx.stride(0)
    _scatter_add_kernel[grid](
        grad,
        idx,
        acc,
        J,
        C,
        L,
        grad.stride(0),
        grad.stride(1),
        grad.stride(2),
        i_sb,
        idx.stride(1),
        BLOCK_J=BLOCK_J,
        BLOCK_C=BLOCK_C,
        num_warps=warps_for(BLOCK_J * BLOCK_C),
    )
    return acc if grad.dtype == torch.float32 else acc.to(grad.dtype)
