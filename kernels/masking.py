"""Masked video modeling kernels: tube masking (draw + gather in one launch), the MAE decoder input (restore:
unshuffle + mask token + positions in one launch, its one-pass backward), and the masked patch loss
(patchify + per-patch normalisation + MSE, the target never stored).

**Tube masking.** ``x (B*T, N, C)``; frames ``t`` with the same ``t // tube`` share one random order of their
``N`` tokens. A token's rank in its tube is ``#{j : key_j < key_n}`` over 64-bit keys ``(random or noise key)
<< 20 | n`` (unique thanks to the index bits; a noise key orders like ``argsort(noise, stable=True)``). Keys
are a pure function of (seed, tube, token), so no sort and no shared state: a program ranks its tube's tokens
pairwise once, then for each frame of the tube writes the clip-level ``ids_restore`` / ``mask`` (first
channel split only) and copies the kept rows (rank < K) of every channel block it owns to their slot
``t*K + rank``. Clip-level ``ids_restore[b, t*N + n]`` is ``t*K + r`` for a kept token of rank ``r`` and
``T*K + t*(N-K) + r - K`` for a masked one: MAE's convention for the clip sequence ``[visible; masked]``.

**Restore.** ``out[b, l] = (src[b, ids[b, l]] if ids[b, l] < K else fill) + pos[l]``. A program owns an
``(l, c)`` tile and walks a group of batch rows, so ``pos`` and the fill are read once per program and the
backward sums ``pos``'s gradient over the batch in registers (no atomics, no second pass over the gradient);
the mask token's gradient is summed per program and the few partial rows are added on the host. The same
kernel with no fill and no pos is tube masking's backward (the gradient of ``x``), with the column sum giving
``pos``'s gradient. With ``decoder_keep`` (VideoMAE V2) the output is ``[visible + pos at their places;
mask token + pos[keep]]``.

**Masked patch loss.** One program per prediction row: it gathers its patch from the clip ``(B, T, 3, H, W)``
(any strides; each channel plane a run along W, so 16-byte loads), normalises it in registers (MAE: over the
whole patch, ``(x - mean) / sqrt(var + 1e-6)``; VideoMAE: per channel, ``(x - mean) / (std + 1e-6)``,
unbiased variances) and compares it with ``pred``'s row in VideoMAE's element order ``(dt, dy, dx, c)``, read
as one contiguous vector and regrouped by channel on chip. The backward recomputes the target rather than
storing a gradient or a target the size of the clip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import draw_key, empty, on_tensor_device, sm_count

NORM_NONE = 0
NORM_PATCH = 1  # MAE's norm_pix_loss: statistics over the whole patch, (x - mean) / sqrt(var + eps)
NORM_CHANNEL = 2  # VideoMAE / SimVTP: statistics per channel, (x - mean) / (std + eps)
MAX_PATCH_PIXELS = 2048  # tubelet * patch * patch, each rounded up to a power of 2: one patch held on chip
MAX_TOKENS = (1 << 20) - 1  # the draw packs token indices in 20 bits


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _warps(elems: int) -> int:
    return 8 if elems >= 8192 else (4 if elems >= 1024 else 2)


# ---- tube masking ----------------------------------------------------------------------------


@triton.jit
def _tube_mask_kernel(
    x_ptr,
    pos_ptr,
    seed_ptr,
    noise_ptr,
    vis_ptr,
    mask_ptr,
    ids_ptr,
    T,
    N,
    K,
    C,
    n_tubes,
    TUBE,
    C_SPLIT,
    s_xr,
    s_xn,
    s_xc,
    s_pt,
    s_pn,
    s_pc,
    s_nt,
    s_nn,
    HAS_NOISE: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tube64 = tl.program_id(0).to(tl.int64)  # b * n_tubes + tube
    split = tl.program_id(1)
    b64 = tube64 // n_tubes
    t0 = (tube64 % n_tubes) * TUBE
    t1 = tl.minimum(t0 + TUBE, T)
    seed = tl.load(seed_ptr)
    TK = T * K
    for i0 in range(0, N, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        im = i < N
        ki = draw_key(seed, noise_ptr, tube64, i, N, s_nt, s_nn, HAS_NOISE)
        rank = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_N):
            kj = draw_key(seed, noise_ptr, tube64, j0 + tl.arange(0, BLOCK_N), N, s_nt, s_nn, HAS_NOISE)
            rank += tl.sum((kj[None, :] < ki[:, None]).to(tl.int32), axis=1)
        kept = im & (rank < K)
        r64 = rank.to(tl.int64)
        i64 = i.to(tl.int64)
        for t in range(t0, t1):
            if split == 0:
                ids = tl.where(rank < K, t * K + r64, TK + t * (N - K) + r64 - K)
                row = b64 * T * N + t * N + i64
                tl.store(ids_ptr + row, ids, mask=im)
                tl.store(mask_ptr + row, (rank >= K).to(mask_ptr.dtype.element_ty), mask=im)
            src = x_ptr + (b64 * T + t) * s_xr + i64[:, None] * s_xn
            dst = vis_ptr + (b64 * TK + t * K + r64)[:, None] * C
            for c0 in range(split * BLOCK_C, C, C_SPLIT * BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                m = kept[:, None] & (c < C)[None, :]
                v = tl.load(src + c[None, :] * s_xc, mask=m, other=0.0)
                if HAS_POS:
                    p = tl.load(pos_ptr + t * s_pt + i64[:, None] * s_pn + c[None, :] * s_pc, mask=m, other=0.0)
                    v = (v.to(tl.float32) + p.to(tl.float32)).to(vis_ptr.dtype.element_ty)
                tl.store(dst + c[None, :], v, mask=m)


@on_tensor_device
def tube_mask(
    x: torch.Tensor,
    num_frames: int,
    tube: int,
    K: int,
    *,
    seed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    mask_dtype: torch.dtype = torch.float32,
    c_split: int | None = None,
):
    """Tube masking of ``x (B*T, N, C)`` (any strides): ``(visible (B, T*K, C), mask (B, T*N), ids_restore (B, T*N))``.

    Frames ``t // tube`` share one order; ``noise (B * n_tubes, N)`` float32 orders tokens like
    ``argsort(noise, stable=True)``, else Philox keys seeded by the int64 tensor ``seed``. ``pos`` is ``(N, C)``
    (every frame) or ``(T*N, C)`` (per clip position), added to the kept rows. ``c_split``: programs per tube
    sharing the channel blocks (default: enough programs to fill the GPU).
    """
    BT, N, C = x.shape
    T = num_frames
    B = BT // T
    n_tubes = triton.cdiv(T, tube)
    vis = empty((B, T * K, C), x.dtype, x.device)
    mask = empty((B, T * N), mask_dtype, x.device)
    ids = empty((B, T * N), torch.int64, x.device)
    if B == 0:
        return vis, mask, ids
    # 32 x 32 rank tiles and 32 x 64 row tiles: 56 registers, no spills on sm_90 (64-wide rank tiles spill)
    BLOCK_N = min(32, _pow2(N, 16))
    BLOCK_C = max(16, min(_pow2(C), 64))
    n_cblocks = triton.cdiv(C, BLOCK_C)
    if c_split is None:
        c_split = max(1, min(n_cblocks, triton.cdiv(4 * sm_count(x.device), B * n_tubes)))
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    s_pt = (N * pos.stride(0) if pos.shape[0] == T * N else 0) if pos is not None else 0
    _tube_mask_kernel[(B * n_tubes, c_split)](
        x,
        pos if pos is not None else x,
        seed,
        noise if noise is not None else x,
        vis,
        mask,
        ids,
        T,
        N,
        K,
        C,
        n_tubes,
        tube,
        c_split,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        s_pt,
        pos.stride(0) if pos is not None else 0,
        pos.stride(1) if pos is not None else 0,
        noise.stride(0) if noise is not None else 0,
        noise.stride(1) if noise is not None else 0,
        HAS_NOISE=noise is not None,
        HAS_POS=pos is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C,
        num_warps=_warps(BLOCK_N * BLOCK_C),
    )
    return vis, mask, ids


# ---- restore (the MAE decoder input) ---------------------------------------------------------


def _restore_blocks(L: int, C: int, B: int, device: torch.device, splits: int | None):
    """(BLOCK_L, BLOCK_C, rows per program, batch splits) for an (L, C) grid walking the batch."""
    BLOCK_C = max(16, min(_pow2(C), 256))
    BLOCK_L = max(1, min(_pow2(L), 4096 // BLOCK_C))
    n_lc = triton.cdiv(L, BLOCK_L) * triton.cdiv(C, BLOCK_C)
    if splits is None:
        splits = triton.cdiv(4 * sm_count(device), n_lc)
    rows = triton.cdiv(B, max(1, min(B, splits)))
    return BLOCK_L, BLOCK_C, rows, triton.cdiv(B, rows)


@triton.jit
def _restore_kernel(
    src_ptr,
    ids_ptr,
    fill_ptr,
    pos_ptr,
    out_ptr,
    colsum_ptr,
    B,
    L,
    K,
    C,
    ROWS,
    s_sb,
    s_sk,
    s_sc,
    s_ib,
    s_il,
    s_pl,
    s_pc,
    HAS_FILL: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_COLSUM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    lm = l < L
    cm = c < C
    m = lm[:, None] & cm[None, :]
    l64 = l.to(tl.int64)
    if HAS_FILL:
        fill = tl.load(fill_ptr + c, mask=cm, other=0.0).to(tl.float32)
    else:
        fill = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_POS:
        p = tl.load(pos_ptr + l64[:, None] * s_pl + c[None, :] * s_pc, mask=m, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    b0 = split.to(tl.int64) * ROWS
    for k in range(0, tl.minimum(ROWS, B - b0)):
        b64 = b0 + k
        r = tl.load(ids_ptr + b64 * s_ib + l64 * s_il, mask=lm, other=0).to(tl.int64)
        vis = r < K
        v = tl.load(src_ptr + b64 * s_sb + r[:, None] * s_sk + c[None, :] * s_sc, mask=m & vis[:, None], other=0.0)
        val = tl.where(vis[:, None], v.to(tl.float32), fill[None, :])
        if HAS_POS:
            val += p
        tl.store(out_ptr + (b64 * L + l64)[:, None] * C + c[None, :], val.to(out_ptr.dtype.element_ty), mask=m)
        if HAS_COLSUM:
            acc += val
    if HAS_COLSUM:
        tl.store(colsum_ptr + (split * L + l64)[:, None] * C + c[None, :], acc, mask=m)


@on_tensor_device
def restore(
    src: torch.Tensor,
    ids_restore: torch.Tensor,
    fill: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    *,
    colsum: bool = False,
    splits: int | None = None,
):
    """``out[b, l] = (src[b, ids[b, l]] if ids[b, l] < K else fill) + pos[l]`` -> ``(out (B, L, C), colsum)``.

    src ``(B, K, C)`` any strides; ids_restore ``(B, L)`` int; fill ``(C,)`` or None (zeros); pos ``(L, C)`` or
    None. With ``colsum``, also ``out.sum(0)`` in fp32 ``(L, C)`` (summed over the batch in registers), else None.
    ``splits``: programs sharing the batch per tile (default: enough to fill the GPU).
    """
    B, K, C = src.shape
    L = ids_restore.shape[1]
    out = empty((B, L, C), src.dtype, src.device)
    BLOCK_L, BLOCK_C, rows, splits = _restore_blocks(L, C, B, src.device, splits)
    part = empty((splits, L, C), torch.float32, src.device) if colsum else None
    if out.numel() == 0:
        return out, (torch.zeros(L, C, device=src.device) if colsum else None)
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(C, BLOCK_C), splits)
    _restore_kernel[grid](
        src,
        ids_restore,
        fill if fill is not None else src,
        pos if pos is not None else src,
        out,
        part if part is not None else out,
        B,
        L,
        K,
        C,
        rows,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        ids_restore.stride(0),
        ids_restore.stride(1),
        pos.stride(0) if pos is not None else 0,
        pos.stride(1) if pos is not None else 0,
        HAS_FILL=fill is not None,
        HAS_POS=pos is not None,
        HAS_COLSUM=colsum,
        BLOCK_L=BLOCK_L,
        BLOCK_C=BLOCK_C,
        num_warps=_warps(BLOCK_L * BLOCK_C),
    )
    if not colsum:
        return out, None
    return out, part[0] if splits == 1 else part.sum(0)


@triton.jit
def _restore_keep_kernel(
    vis_ptr,
    ids_ptr,
    keep_ptr,
    fill_ptr,
    pos_ptr,
    out_ptr,
    B,
    L,
    K,
    M,
    C,
    ROWS,
    n_lblocks,
    s_vb,
    s_vk,
    s_vc,
    s_ib,
    s_il,
    s_kb,
    s_km,
    s_pl,
    s_pc,
    HAS_POS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Programs below ``n_lblocks`` place the visible rows (out[b, j] = vis[b, j] + pos[place of j], found by
    walking positions l with ids[b, l] = j < K); the others write out[b, K + i] = fill + pos[keep[b, i]]."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    b0 = tl.program_id(2).to(tl.int64) * ROWS
    S = K + M
    if pid < n_lblocks:
        l = pid * BLOCK_L + tl.arange(0, BLOCK_L)
        lm = l < L
        l64 = l.to(tl.int64)
        if HAS_POS:
            p = tl.load(pos_ptr + l64[:, None] * s_pl + c[None, :] * s_pc, mask=lm[:, None] & cm[None, :], other=0.0)
            p = p.to(tl.float32)
        for k in range(0, tl.minimum(ROWS, B - b0)):
            b64 = b0 + k
            r = tl.load(ids_ptr + b64 * s_ib + l64 * s_il, mask=lm, other=0).to(tl.int64)
            m = (lm & (r < K))[:, None] & cm[None, :]
            v = tl.load(vis_ptr + b64 * s_vb + r[:, None] * s_vk + c[None, :] * s_vc, mask=m, other=0.0)
            if HAS_POS:
                v = v.to(tl.float32) + p
            tl.store(out_ptr + (b64 * S + r)[:, None] * C + c[None, :], v.to(out_ptr.dtype.element_ty), mask=m)
    else:
        i = (pid - n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        im = i < M
        m = im[:, None] & cm[None, :]
        fill = tl.load(fill_ptr + c, mask=cm, other=0.0).to(tl.float32)
        for k in range(0, tl.minimum(ROWS, B - b0)):
            b64 = b0 + k
            val = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32) + fill[None, :]
            if HAS_POS:
                q = tl.load(keep_ptr + b64 * s_kb + i * s_km, mask=im, other=0).to(tl.int64)
                val += tl.load(pos_ptr + q[:, None] * s_pl + c[None, :] * s_pc, mask=m, other=0.0).to(tl.float32)
            dst = out_ptr + (b64 * S + K + i.to(tl.int64))[:, None] * C + c[None, :]
            tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=m)


@on_tensor_device
def restore_keep(
    visible: torch.Tensor,
    ids_restore: torch.Tensor,
    keep: torch.Tensor,
    fill: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    splits: int | None = None,
):
    """VideoMAE V2's decoder input ``(B, K + M, C)``: ``[visible + pos at their places; fill + pos[keep]]``.

    visible ``(B, K, C)`` any strides; ids_restore ``(B, L)`` (``ids < K`` marks visible j's place); keep
    ``(B, M)`` int places of the mask tokens; fill ``(C,)``; pos ``(L, C)`` or None.
    """
    B, K, C = visible.shape
    L, M = ids_restore.shape[1], keep.shape[1]
    out = empty((B, K + M, C), visible.dtype, visible.device)
    if out.numel() == 0:
        return out
    BLOCK_L, BLOCK_C, rows, splits = _restore_blocks(max(L, M), C, B, visible.device, splits)
    n_lblocks = triton.cdiv(L, BLOCK_L)
    grid = (n_lblocks + triton.cdiv(M, BLOCK_L), triton.cdiv(C, BLOCK_C), splits)
    _restore_keep_kernel[grid](
        visible,
        ids_restore,
        keep,
        fill,
        pos if pos is not None else visible,
        out,
        B,
        L,
        K,
        M,
        C,
        rows,
        n_lblocks,
        visible.stride(0),
        visible.stride(1),
        visible.stride(2),
        ids_restore.stride(0),
        ids_restore.stride(1),
        keep.stride(0),
        keep.stride(1),
        pos.stride(0) if pos is not None else 0,
        pos.stride(1) if pos is not None else 0,
        HAS_POS=pos is not None,
        BLOCK_L=BLOCK_L,
        BLOCK_C=BLOCK_C,
        num_warps=_warps(BLOCK_L * BLOCK_C),
    )
    return out


@triton.jit
def _restore_backward_kernel(
    g_ptr,
    ids_ptr,
    kinv_ptr,
    gvis_ptr,
    gtok_ptr,
    gpos_ptr,
    B,
    L,
    K,
    C,
    ROWS,
    s_gb,
    s_gs,
    s_gc,
    s_ib,
    s_il,
    s_kb,
    s_kl,
    KEEP: tl.constexpr,
    NEED_VIS: tl.constexpr,
    NEED_TOKEN: tl.constexpr,
    NEED_POS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One read of the output gradient. MAE order (out row l = place l): visible j's gradient is row l where
    ids[b, l] = j, the mask token's the sum of the other rows, pos's the sum over the batch. With ``KEEP`` (out
    = [visible; mask tokens]): place l collects row ids[b, l] (if visible) and row K + kinv[b, l] (if kept)."""
    pid_l = tl.program_id(0)
    l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    lm = l < L
    cm = c < C
    m = lm[:, None] & cm[None, :]
    l64 = l.to(tl.int64)
    gp = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    gt = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    b0 = split.to(tl.int64) * ROWS
    for k in range(0, tl.minimum(ROWS, B - b0)):
        b64 = b0 + k
        r = tl.load(ids_ptr + b64 * s_ib + l64 * s_il, mask=lm, other=0).to(tl.int64)
        vis = r < K
        if KEEP:
            mv = m & vis[:, None]
            gv = tl.load(g_ptr + b64 * s_gb + r[:, None] * s_gs + c[None, :] * s_gc, mask=mv, other=0.0)
            q = tl.load(kinv_ptr + b64 * s_kb + l64 * s_kl, mask=lm, other=-1).to(tl.int64)
            mq = m & (q >= 0)[:, None]
            gm = tl.load(g_ptr + b64 * s_gb + (K + q)[:, None] * s_gs + c[None, :] * s_gc, mask=mq, other=0.0)
            gm = gm.to(tl.float32)
            gp += gv.to(tl.float32) + gm
            gt += gm
        else:
            gr = tl.load(g_ptr + b64 * s_gb + l64[:, None] * s_gs + c[None, :] * s_gc, mask=m, other=0.0)
            if NEED_VIS:
                dst = gvis_ptr + (b64 * K + r)[:, None] * C + c[None, :]
                tl.store(dst, gr.to(gvis_ptr.dtype.element_ty), mask=m & vis[:, None])
            gr = gr.to(tl.float32)
            gp += gr
            gt += tl.where(vis[:, None], 0.0, gr)
    if NEED_POS:
        tl.store(gpos_ptr + (split * L + l64)[:, None] * C + c[None, :], gp, mask=m)
    if NEED_TOKEN:
        row = split * tl.num_programs(0) + pid_l
        tl.store(gtok_ptr + row.to(tl.int64) * C + c, tl.sum(gt, axis=0), mask=cm)


@on_tensor_device
def restore_backward(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    K: int,
    keep_inv: torch.Tensor | None = None,
    *,
    need_visible: bool = True,
    need_token: bool = True,
    need_pos: bool = True,
    splits: int | None = None,
):
    """Gradients of :func:`restore` (``keep_inv`` None) or :func:`restore_keep` from ``grad (B, S, C)``.

    Returns ``(grad visible (B, K, C) or None, grad fill (C,) fp32 or None, grad pos (L, C) fp32 or None)``.
    ``keep_inv (B, L)`` int: ``i`` where ``keep[b, i] = l``, else -1. With ``keep_inv`` the visible gradient
    is ``grad[:, :K]`` (a view).
    """
    B, S, C = grad.shape
    L = ids_restore.shape[1]
    dev = grad.device
    keep = keep_inv is not None
    gvis = None
    if need_visible:
        gvis = grad[:, :K] if keep else empty((B, K, C), grad.dtype, dev)
    BLOCK_L, BLOCK_C, rows, splits = _restore_blocks(L, C, B, dev, splits)
    n_lblocks = triton.cdiv(L, BLOCK_L)
    gpos = empty((splits, L, C), torch.float32, dev) if need_pos else None
    gtok = empty((splits * n_lblocks, C), torch.float32, dev) if need_token else None
    if B * L * C == 0:
        zeros = torch.zeros(L, C, device=dev)
        return gvis, zeros[0] if need_token else None, zeros if need_pos else None
    _restore_backward_kernel[(n_lblocks, triton.cdiv(C, BLOCK_C), splits)](
        grad,
        ids_restore,
        keep_inv if keep else ids_restore,
        gvis if need_visible and not keep else grad,
        gtok if gtok is not None else grad,
        gpos if gpos is not None else grad,
        B,
        L,
        K,
        C,
        rows,
        grad.stride(0),
        grad.stride(1),
        grad.stride(2),
        ids_restore.stride(0),
        ids_restore.stride(1),
        keep_inv.stride(0) if keep else 0,
        keep_inv.stride(1) if keep else 0,
        KEEP=keep,
        NEED_VIS=need_visible and not keep,
        NEED_TOKEN=need_token,
        NEED_POS=need_pos,
        BLOCK_L=BLOCK_L,
        BLOCK_C=BLOCK_C,
        num_warps=_warps(BLOCK_L * BLOCK_C),
    )
    if gpos is not None:
        gpos = gpos[0] if splits == 1 else gpos.sum(0)
    return gvis, gtok.sum(0) if gtok is not None else None, gpos


# ---- masked patch loss -----------------------------------------------------------------------


@triton.jit
def _channel(v_ptr, s_vc, offs, valid, CH: tl.constexpr, scale, shift, AFFINE: tl.constexpr):
    x = tl.load(v_ptr + CH * s_vc + offs, mask=valid, other=0.0).to(tl.float32)
    if AFFINE:
        x = x * scale + shift
    return tl.where(valid, x, 0.0)


@triton.jit
def _centre(x, valid, n):
    mean = tl.sum(x, axis=0) / n
    return tl.where(valid, x - mean, 0.0)


@triton.jit
def _patch_loss_kernel(
    pred_ptr,
    video_ptr,
    idx_ptr,
    mask_ptr,
    gout_ptr,
    count_ptr,
    out_ptr,
    R,
    Hp,
    Wp,
    s_pb,
    s_pr,
    s_pd,
    s_vb,
    s_vt,
    s_vc,
    s_vh,
    s_vw,
    s_ib,
    s_ir,
    s_mb,
    s_mp,
    sc0,
    sc1,
    sc2,
    sh0,
    sh1,
    sh2,
    U: tl.constexpr,
    P: tl.constexpr,
    NORM: tl.constexpr,
    HAS_IDX: tl.constexpr,
    AFFINE: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward: out[b*R + r] = mask[b, q] * mean_d (pred[b, r] - target[b, q])^2 with q = idx[b, r] (or r).
    Backward: out = grad pred = g * 2 (pred - target) mask[b, q] / (D * count).

    The patch is a tile of ``BLOCK_U * BLOCK_P**2`` pixels k = (dt, dy, dx), one vector per channel (the clip's
    planes load as runs along W). ``pred``'s row is ``(dt, dy, dx, c)`` with c fastest: it is loaded (and the
    gradient stored) as one contiguous vector and moved between the two orders with ``tl.gather`` (through
    shared memory), so both sides use wide accesses."""
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    r = row % R
    if HAS_IDX:
        q = tl.load(idx_ptr + b * s_ib + r * s_ir).to(tl.int64)
    else:
        q = r
    w = tl.load(mask_ptr + b * s_mb + q * s_mp) != 0
    PIX: tl.constexpr = U * P * P
    D: tl.constexpr = 3 * PIX
    TILE: tl.constexpr = BLOCK_U * BLOCK_P * BLOCK_P
    k = tl.arange(0, TILE)
    dt = k // (BLOCK_P * BLOCK_P)
    dy = (k // BLOCK_P) % BLOCK_P
    dx = k % BLOCK_P
    valid = (dt < U) & (dy < P) & (dx < P)
    e = tl.arange(0, 4 * TILE)  # pred's row, flat
    ev = e < D
    o_row = out_ptr + row * D
    if w:
        tp = q // (Hp * Wp)
        hp = (q // Wp) % Hp
        wp = q % Wp
        v_row = video_ptr + b * s_vb + (tp * U) * s_vt + (hp * P) * s_vh + (wp * P) * s_vw
        offs = dt.to(tl.int64) * s_vt + dy.to(tl.int64) * s_vh + dx.to(tl.int64) * s_vw
        x0 = _channel(v_row, s_vc, offs, valid, 0, sc0, sh0, AFFINE)
        x1 = _channel(v_row, s_vc, offs, valid, 1, sc1, sh1, AFFINE)
        x2 = _channel(v_row, s_vc, offs, valid, 2, sc2, sh2, AFFINE)
        if NORM == 1:  # MAE: one mean / unbiased variance over the patch, / sqrt(var + eps)
            mean = (tl.sum(x0, axis=0) + tl.sum(x1, axis=0) + tl.sum(x2, axis=0)) / D
            x0 = tl.where(valid, x0 - mean, 0.0)
            x1 = tl.where(valid, x1 - mean, 0.0)
            x2 = tl.where(valid, x2 - mean, 0.0)
            var = (tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (D - 1)
            inv = 1.0 / tl.sqrt(var + 1e-6)
            x0 *= inv
            x1 *= inv
            x2 *= inv
        if NORM == 2:  # VideoMAE: per channel, / (std + eps)
            x0 = _centre(x0, valid, PIX)
            x1 = _centre(x1, valid, PIX)
            x2 = _centre(x2, valid, PIX)
            x0 /= tl.sqrt(tl.sum(x0 * x0, axis=0) / (PIX - 1)) + 1e-6
            x1 /= tl.sqrt(tl.sum(x1 * x1, axis=0) / (PIX - 1)) + 1e-6
            x2 /= tl.sqrt(tl.sum(x2 * x2, axis=0) / (PIX - 1)) + 1e-6
        flat = tl.load(pred_ptr + b * s_pb + r * s_pr + e.to(tl.int64) * s_pd, mask=ev, other=0.0)
        at = tl.where(valid, ((dt * P + dy) * P + dx) * 3, 0)  # pixel k's first element in pred's row
        d0 = tl.where(valid, tl.gather(flat, at, 0).to(tl.float32) - x0, 0.0)
        d1 = tl.where(valid, tl.gather(flat, at + 1, 0).to(tl.float32) - x1, 0.0)
        d2 = tl.where(valid, tl.gather(flat, at + 2, 0).to(tl.float32) - x2, 0.0)
        if BACKWARD:
            f = tl.load(gout_ptr).to(tl.float32) * 2.0 / (D * tl.load(count_ptr).to(tl.float32))
            # [TILE, 2, 2] -> k*4 + c order (c = 0, 1, 2, pad), then pred's order: element e is pixel e // 3
            quad = tl.reshape(tl.join(tl.join(d0 * f, d2 * f), tl.join(d1 * f, tl.zeros_like(d0))), [4 * TILE])
            pix = e // 3
            kk = ((pix // (P * P)) * BLOCK_P + (pix // P) % P) * BLOCK_P + pix % P
            g = tl.gather(quad, tl.where(ev, kk * 4 + e % 3, 0), 0)
            tl.store(o_row + e, g.to(out_ptr.dtype.element_ty), mask=ev)
        else:
            sq = tl.sum(d0 * d0, axis=0) + tl.sum(d1 * d1, axis=0) + tl.sum(d2 * d2, axis=0)
            tl.store(out_ptr + row, sq / D)
    else:
        if BACKWARD:
            tl.store(o_row + e, tl.zeros([4 * TILE], dtype=out_ptr.dtype.element_ty), mask=ev)
        else:
            tl.store(out_ptr + row, 0.0)


def patch_blocks(patch: int, tubelet: int) -> tuple[int, int]:
    """(BLOCK_U, BLOCK_P): the on-chip tile of one patch (dispatch keeps ``BLOCK_U * BLOCK_P**2 <= MAX_PATCH_PIXELS``)."""
    return _pow2(tubelet), _pow2(patch)


@on_tensor_device
def patch_loss(
    pred: torch.Tensor,
    video: torch.Tensor,
    mask: torch.Tensor,
    idx: torch.Tensor | None,
    count: torch.Tensor,
    *,
    patch: int,
    tubelet: int,
    norm: int,
    affine: tuple[float, ...] = (),
    grad: torch.Tensor | None = None,
):
    """Masked patch loss rows (forward) or the gradient of ``pred`` (``grad`` given: the loss's 0-d gradient).

    pred ``(B, R, D)`` any strides, ``D = 3 * tubelet * patch**2`` in VideoMAE's order; video ``(B, T, 3, H, W)``
    any strides; mask ``(B, P)`` bool over the clip's patches; idx ``(B, R)`` int patch of each row (None: row r
    is patch r, R = P); count: 0-d fp32 tensor, the number of rows whose patch is masked; affine: 6 floats
    ``(scale[3], shift[3])`` applied to the clip first (VideoMAE's un-normalisation) or ().
    Forward returns fp32 ``(B*R,)`` per-row ``mask * mean_d (pred - target)^2``; backward ``(B, R, D)``.
    """
    B, R, D = pred.shape
    _, T, _, H, W = video.shape
    Hp, Wp = H // patch, W // patch
    BLOCK_U, BLOCK_P = patch_blocks(patch, tubelet)
    backward = grad is not None
    out = empty((B, R, D) if backward else (B * R,), pred.dtype if backward else torch.float32, pred.device)
    if B * R == 0:
        return out
    sc = affine[:3] if affine else (1.0, 1.0, 1.0)
    sh = affine[3:] if affine else (0.0, 0.0, 0.0)
    _patch_loss_kernel[(B * R,)](
        pred,
        video,
        idx if idx is not None else mask,
        mask,
        grad if backward else count,
        count,
        out,
        R,
        Hp,
        Wp,
        pred.stride(0),
        pred.stride(1),
        pred.stride(2),
        *video.stride(),
        idx.stride(0) if idx is not None else 0,
        idx.stride(1) if idx is not None else 0,
        mask.stride(0),
        mask.stride(1),
        *(float(v) for v in sc),
        *(float(v) for v in sh),
        U=tubelet,
        P=patch,
        NORM=norm,
        HAS_IDX=idx is not None,
        AFFINE=bool(affine),
        BACKWARD=backward,
        BLOCK_U=BLOCK_U,
        BLOCK_P=BLOCK_P,
        num_warps=max(1, min(8, BLOCK_U * BLOCK_P * BLOCK_P // 128)),
    )
    return out
