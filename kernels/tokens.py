"""Token selection kernels: random index draw (DropToken / MAE masking), row gather and its backward.

Draw. Tokens are ranked by a 64-bit key ``(random or noise key) << 20 | l`` (unique thanks to the index
bits): ``rank[l] = #{j : key_j < key_l}`` is MAE's ``ids_restore``, and the tokens with rank < K are
kept, ``keep[rank[l]] = l`` (MAE's ``ids_shuffle[:K]``). Keys are a pure function of (seed, row, token),
so each program recomputes the keys it compares against: no sort, no shared state, and every store
goes to a distinct address. Grid: (rows, token blocks), so even one shared row spreads over the GPU.

Gather. ``out[b, j] = src[b, idx[b, j]] (+ pos[idx[b, j]])``, zeros where the index is out of range.
  * by index (:func:`gather`): programs over (j block, c block, batch group), a [BLOCK_B, BLOCK_J, BLOCK_C]
    tile per step. An index row shared by the batch (``idx (1, K)``, VATT's DropToken) and its pos rows are
    loaded once per program and reused for every sample of the group.
  * by inverse map (``gather(..., inv=)``), for per-sample indices with pos: ``inv (B, L)`` maps a token to
    its slot (``inv[b, idx[b, j]] = j``, >= K for tokens not taken). Programs over (l block, c block) loop
    over the batch: each pos row is read once, each taken row of src once, each output row written once.

Backward (:func:`gather_backward`): ``dx (B, L, C)``: zeros with ``dx[b, idx[b, j]] += grad[b, j]``, and
``dpos (L, C) = sum_b dx[b]``, in one pass over grad. Programs over (l block, c block) loop over the batch
(or a group of it when dpos is not needed); every dx element is written once, zeros included, and dpos
is summed in fp32 registers and written once.
  * unique indices (``inv`` known): ``dx[b, l] = grad[b, inv[b, l]]`` if ``inv[b, l] < K`` else 0, copied
    in the gradient's dtype (no fp32 buffer, no atomics).
  * indices that may repeat: a counting sort of each index row (``order``: slots sorted by token, stable;
    ``start``/``count`` per token; built with torch on the small (B, K) index) lists the slots that took a
    token, and the program sums those gradient rows in fp32, in slot order: deterministic, no atomics,
    no zero fill.
Out-of-range indices (< 0 or >= L) take nothing: the forward writes zeros for them and the backward drops
their gradient, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import col_block, draw_key, empty, on_tensor_device, row_block, sm_count, use_gpu_configs, warps_for

TILE = 4096  # elements a program moves per loop step (8 KB of bf16): enough loads in flight per SM


@triton.jit
def _draw_kernel(
    seed_ptr,
    noise_ptr,
    keep_ptr,
    inv_ptr,
    mask_ptr,
    L,
    K,
    s_nr,
    s_nl,
    HAS_NOISE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row64 = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    im = i < L
    seed = tl.load(seed_ptr)
    ki = draw_key(seed, noise_ptr, row64, i, L, s_nr, s_nl, HAS_NOISE)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        kj = draw_key(seed, noise_ptr, row64, j0 + tl.arange(0, BLOCK_J), L, s_nr, s_nl, HAS_NOISE)
        rank += tl.sum((kj[None, :] < ki[:, None]).to(tl.int32), axis=1)
    i64 = i.to(tl.int64)
    tl.store(inv_ptr + row64 * L + i64, rank.to(tl.int64), mask=im)
    if HAS_MASK:
        tl.store(mask_ptr + row64 * L + i64, (rank >= K).to(mask_ptr.dtype.element_ty), mask=im)
    tl.store(keep_ptr + row64 * K + rank, i64, mask=im & (rank < K))


@on_tensor_device
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
    written when ``mask_dtype`` is given. ``noise (rows, L)`` float32, any strides, orders tokens like
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
        noise.stride(1) if noise is not None else 0,
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
    B,
    J,
    C,
    n_valid,
    b_per_prog,
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
    SHARED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    jm = j < J
    cm = c < C
    j64 = j.to(tl.int64)
    if SHARED:  # one index row for the batch: it and its pos rows are loaded once per program
        idx1 = tl.load(idx_ptr + j64 * i_sj, mask=jm, other=-1).to(tl.int64)
        ok1 = jm & (idx1 >= 0) & (idx1 < n_valid)
        if HAS_POS:
            pm = ok1[:, None] & cm[None, :]
            p1 = tl.load(pos_ptr + idx1[:, None] * p_sl + c[None, :] * p_sc, mask=pm, other=0.0).to(tl.float32)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bm = b < b_hi
        b64 = b.to(tl.int64)
        if SHARED:
            idx = tl.broadcast_to(idx1[None, :], (BLOCK_B, BLOCK_J))
            ok = bm[:, None] & ok1[None, :]
        else:
            lm = bm[:, None] & jm[None, :]
            idx = tl.load(idx_ptr + b64[:, None] * i_sb + j64[None, :] * i_sj, mask=lm, other=-1).to(tl.int64)
            ok = lm & (idx >= 0) & (idx < n_valid)
        m = ok[:, :, None] & cm[None, None, :]
        src = src_ptr + b64[:, None, None] * s_sb + idx[:, :, None] * s_sl + c[None, None, :] * s_sc
        vals = tl.load(src, mask=m, other=0.0)
        if HAS_POS:
            if SHARED:
                p = p1[None, :, :]
            else:
                p = tl.load(pos_ptr + idx[:, :, None] * p_sl + c[None, None, :] * p_sc, mask=m, other=0.0)
                p = p.to(tl.float32)
            vals = (vals.to(tl.float32) + p).to(out_ptr.dtype.element_ty)
        dst = out_ptr + b64[:, None, None] * o_sb + j64[None, :, None] * o_sj + c[None, None, :]
        tl.store(dst, vals, mask=bm[:, None, None] & jm[None, :, None] & cm[None, None, :])


@triton.jit
def _gather_inv_kernel(
    src_ptr,
    inv_ptr,
    pos_ptr,
    out_ptr,
    B,
    L,
    K,
    C,
    s_sb,
    s_sl,
    s_sc,
    v_sb,
    v_sl,
    p_sl,
    p_sc,
    o_sb,
    o_sj,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, inv[b, l]] = src[b, l] + pos[l] for inv[b, l] < K: pos read once per (l, c) tile."""
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    lm = l < L
    cm = c < C
    l64 = l.to(tl.int64)
    p = tl.load(pos_ptr + l64[:, None] * p_sl + c[None, :] * p_sc, mask=lm[:, None] & cm[None, :], other=0.0)
    p = p.to(tl.float32)[None, :, :]
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b64 = b.to(tl.int64)
        tm = (b < B)[:, None] & lm[None, :]
        slot = tl.load(inv_ptr + b64[:, None] * v_sb + l64[None, :] * v_sl, mask=tm, other=-1)
        ok = tm & (slot >= 0) & (slot < K)
        m = ok[:, :, None] & cm[None, None, :]
        x = tl.load(src_ptr + b64[:, None, None] * s_sb + l64[None, :, None] * s_sl + c[None, None, :] * s_sc, mask=m)
        dst = out_ptr + b64[:, None, None] * o_sb + slot.to(tl.int64)[:, :, None] * o_sj + c[None, None, :]
        tl.store(dst, (x.to(tl.float32) + p).to(out_ptr.dtype.element_ty), mask=m)


def _pow2_le(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _row_tiles(L: int, C: int, B: int, elem: int, device: torch.device, split_batch: bool):
    """(BLOCK_B, BLOCK_L, BLOCK_C, batch groups, warps) for programs over (l block, c block, group) that
    loop over the batch. On a GPU: ~TILE elements per step and at least 4 programs per SM where L*C allows;
    ``split_batch`` adds batch groups to the grid when the tile grid alone is smaller (no per-(l, c) sum)."""
    if not use_gpu_configs(device):  # interpreter: few, large programs
        BLOCK_C = row_block(C, elem, 1 << 16)
        BLOCK_L = max(1, min(triton.next_power_of_2(L), 16384 // BLOCK_C))
        BLOCK_B = max(1, min(triton.next_power_of_2(B), 16384 // (BLOCK_L * BLOCK_C)))
        return BLOCK_B, BLOCK_L, BLOCK_C, 1, 4
    BLOCK_C = col_block(C, elem, 512)
    want = 4 * sm_count(device)
    tiles_c = triton.cdiv(C, BLOCK_C)
    BLOCK_L = 8
    while BLOCK_L > 1 and triton.cdiv(L, BLOCK_L) * tiles_c < want:
        BLOCK_L //= 2
    BLOCK_L = min(BLOCK_L, triton.next_power_of_2(L))
    BLOCK_B = max(1, min(triton.next_power_of_2(B), TILE // (BLOCK_L * BLOCK_C)))
    groups = 1
    if split_batch:
        groups = min(triton.cdiv(B, BLOCK_B), max(1, triton.cdiv(want, triton.cdiv(L, BLOCK_L) * tiles_c)))
    return BLOCK_B, BLOCK_L, BLOCK_C, groups, warps_for(BLOCK_B * BLOCK_L * BLOCK_C)


@on_tensor_device
def gather(
    src: torch.Tensor,
    idx: torch.Tensor,
    pos: torch.Tensor | None = None,
    n_valid: int | None = None,
    inv: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b, j] = src[b, idx[b, j]] (+ pos[idx[b, j]]) where 0 <= idx < n_valid, else 0.

    src (B, Ls, C) any strides; idx (B, J) or (1, J) (shared by the batch), int32/int64; pos (Ls, C) or None.
    ``inv (B, Ls)`` (optional, int64) is the exact inverse of a per-sample idx whose every entry is valid
    (``inv[b, idx[b, j]] = j``, >= J elsewhere, as a draw returns it): with pos, the output is then written
    through it so each pos row is read once instead of once per sample.
    """
    B, Ls, C = src.shape
    J = idx.shape[1]
    out = empty((B, J, C), src.dtype, src.device)
    if out.numel() == 0:
        return out
    n_valid = Ls if n_valid is None else n_valid
    shared = idx.shape[0] == 1 and B > 1
    if pos is not None and inv is not None and not shared and B * J > Ls:
        BLOCK_B, BLOCK_L, BLOCK_C, _, warps = _row_tiles(Ls, C, B, src.element_size(), src.device, False)
        grid = (triton.cdiv(Ls, BLOCK_L), triton.cdiv(C, BLOCK_C))
        _gather_inv_kernel[grid](
            src, inv, pos, out, B, Ls, J, C, src.stride(0), src.stride(1), src.stride(2), inv.stride(0),
            inv.stride(1), pos.stride(0), pos.stride(1), out.stride(0), out.stride(1),
            BLOCK_B=BLOCK_B, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=warps,
        )  # fmt: skip
        return out
    gpu = use_gpu_configs(src.device)
    BLOCK_C = col_block(C, src.element_size(), 2048) if gpu else row_block(C, src.element_size(), 1 << 16)
    tile = TILE if gpu else 16384
    BLOCK_J = max(1, min(triton.next_power_of_2(J), tile // BLOCK_C))
    want = 4 * sm_count(src.device) if gpu else 1
    rows = 1 if shared else B
    while BLOCK_J > 1 and triton.cdiv(J, BLOCK_J) * triton.cdiv(C, BLOCK_C) * rows < want:
        BLOCK_J //= 2
    if shared:  # the batch loops inside a program; split it only as far as the grid needs
        BLOCK_B = max(1, min(triton.next_power_of_2(B), tile // (BLOCK_J * BLOCK_C)))
        tiles = triton.cdiv(J, BLOCK_J) * triton.cdiv(C, BLOCK_C)
        groups = min(triton.cdiv(B, BLOCK_B), max(1, triton.cdiv(want, tiles)))
        b_per_prog = triton.cdiv(triton.cdiv(B, groups), BLOCK_B) * BLOCK_B
    else:
        BLOCK_B, b_per_prog = 1, 1
    groups = triton.cdiv(B, b_per_prog)
    grid = (triton.cdiv(J, BLOCK_J), triton.cdiv(C, BLOCK_C), groups)
    _gather_kernel[grid](
        src, idx, pos if pos is not None else src, out, B, J, C, n_valid, b_per_prog,
        src.stride(0), src.stride(1), src.stride(2), 0 if idx.shape[0] == 1 else idx.stride(0), idx.stride(1),
        pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0,
        out.stride(0), out.stride(1),
        HAS_POS=pos is not None, SHARED=shared, BLOCK_B=BLOCK_B, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C,
        num_warps=warps_for(BLOCK_B * BLOCK_J * BLOCK_C) if gpu else 4,
    )  # fmt: skip
    return out


@triton.jit
def _gather_bwd_kernel(
    g_ptr,
    map_ptr,
    order_ptr,
    count_ptr,
    dx_ptr,
    dpos_ptr,
    B,
    L,
    K,
    C,
    b_per_prog,
    g_sb,
    g_sj,
    g_sc,
    m_sb,
    m_sl,
    o_sb,
    dx_sb,
    dx_sl,
    UNIQUE: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DPOS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx[b, l] = sum of grad[b, j] over the slots j that took token l; dpos[l] = sum_b dx[b, l].

    UNIQUE: map = inv (the slot of token l, >= K when none). Otherwise map = start and count: the slots
    that took token l are order[start[l] : start[l] + count[l]] (a counting sort of the index row).
    An index map with batch stride 0 is shared by the batch.
    """
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b_lo = tl.program_id(2) * b_per_prog
    b_hi = tl.minimum(b_lo + b_per_prog, B)
    lm = l < L
    cm = c < C
    l64 = l.to(tl.int64)
    dpos = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b64 = b.to(tl.int64)
        tm = (b < b_hi)[:, None] & lm[None, :]
        at = b64[:, None] * m_sb + l64[None, :] * m_sl
        g_row = g_ptr + b64[:, None, None] * g_sb + c[None, None, :] * g_sc
        if UNIQUE:
            slot = tl.load(map_ptr + at, mask=tm, other=-1)
            ok = tm & (slot >= 0) & (slot < K)
            d = tl.load(
                g_row + slot.to(tl.int64)[:, :, None] * g_sj, mask=ok[:, :, None] & cm[None, None, :], other=0.0
            )
            if NEED_DPOS:
                dpos += tl.sum(d.to(tl.float32), axis=0)
        else:
            start = tl.load(map_ptr + at, mask=tm, other=0)
            count = tl.load(count_ptr + at, mask=tm, other=0)
            acc = tl.zeros([BLOCK_B, BLOCK_L, BLOCK_C], dtype=tl.float32)
            for i in range(0, tl.max(tl.max(count, axis=1), axis=0)):
                has = tm & (i < count)
                slot = tl.load(order_ptr + b64[:, None] * o_sb + (start + i), mask=has, other=0).to(tl.int64)
                acc += tl.load(g_row + slot[:, :, None] * g_sj, mask=has[:, :, None] & cm[None, None, :], other=0.0)
            d = acc.to(dx_ptr.dtype.element_ty)
            if NEED_DPOS:
                dpos += tl.sum(acc, axis=0)
        if NEED_DX:
            dst = dx_ptr + b64[:, None, None] * dx_sb + l64[None, :, None] * dx_sl + c[None, None, :]
            tl.store(dst, d, mask=tm[:, :, None] & cm[None, None, :])
    if NEED_DPOS:
        dst = dpos_ptr + l64[:, None] * C + c[None, :]
        tl.store(dst, dpos.to(dpos_ptr.dtype.element_ty), mask=lm[:, None] & cm[None, :])


def counting_sort(idx: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each index row of ``idx (R, K)``: ``order (R, K)``, the slots j sorted by token idx[j] (stable),
    and ``start``, ``count (R, L)`` int32 with token l's slots at ``order[start[l] : start[l] + count[l]]``.
    Out-of-range indices sort last and belong to no token."""
    R = idx.shape[0]
    key = idx.long()
    key = torch.where((key >= 0) & (key < L), key, L)
    order = torch.argsort(key, dim=1, stable=True)
    count = torch.zeros(R, L + 1, dtype=torch.int32, device=idx.device)
    count.scatter_add_(1, key, torch.ones_like(key, dtype=torch.int32))
    start = torch.cumsum(count, 1, dtype=torch.int32) - count
    return order, start[:, :L], count[:, :L]


@on_tensor_device
def gather_backward(
    grad: torch.Tensor,
    idx: torch.Tensor,
    L: int,
    inv: torch.Tensor | None = None,
    need_dx: bool = True,
    need_dpos: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`gather` (and its ``pos``): ``(dx (B, L, C) or None, dpos (L, C) or None)``.

    grad (B, K, C) any strides; idx (B, K) or (1, K) int32/int64 as given to the forward. ``inv (B, L)`` or
    ``(1, L)`` (the slot of each token, >= K when none) promises unique indices: dx is then a copy through
    it. Without it indices may repeat and are summed in fp32. dx and dpos in grad's dtype.
    """
    B, K, C = grad.shape
    dx = empty((B, L, C), grad.dtype, grad.device) if need_dx else None
    dpos = empty((L, C), grad.dtype, grad.device) if need_dpos else None
    if B * L * C == 0 or not (need_dx or need_dpos):
        if dpos is not None:
            dpos.zero_()
        if dx is not None:
            dx.zero_()
        return dx, dpos
    BLOCK_B, BLOCK_L, BLOCK_C, groups, warps = _row_tiles(L, C, B, grad.element_size(), grad.device, not need_dpos)
    b_per_prog = triton.cdiv(triton.cdiv(B, groups), BLOCK_B) * BLOCK_B
    groups = triton.cdiv(B, b_per_prog)
    if inv is not None:
        maps, order, count = inv, inv, inv
    else:
        order, maps, count = counting_sort(idx, L)
    shared = maps.shape[0] == 1
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(C, BLOCK_C), groups)
    _gather_bwd_kernel[grid](
        grad, maps, order, count, dx if dx is not None else grad, dpos if dpos is not None else grad,
        B, L, K, C, b_per_prog, grad.stride(0), grad.stride(1), grad.stride(2),
        0 if shared else maps.stride(0), maps.stride(1), 0 if shared else order.stride(0),
        dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
        UNIQUE=inv is not None, NEED_DX=need_dx, NEED_DPOS=need_dpos,
        BLOCK_B=BLOCK_B, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return dx, dpos
