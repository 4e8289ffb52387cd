"""The spec of the masked video modeling ops (tube masking, the MAE decoder input, the masked patch loss), also
their CPU path. Sums and statistics in fp32 (fp64 for fp64), results rounded once to the output dtype."""

from __future__ import annotations

import torch

from fastvl.rules import compute_dtype

NORM_NONE = 0  # the target is the pixels
NORM_PATCH = 1  # MAE's norm_pix_loss: (x - mean) / sqrt(var + 1e-6) over the whole patch, unbiased var
NORM_CHANNEL = 2  # VideoMAE / SimVTP: (x - mean) / (std + 1e-6) per channel of the patch, unbiased std
NORM_EPS = 1e-6


# ---- tube masking ----------------------------------------------------------------------------


def tube_ranks(seed: torch.Tensor, noise: torch.Tensor | None, B: int, n_tubes: int, N: int, device) -> torch.Tensor:
    """``(B, n_tubes, N)`` rank of every token in its tube's order ``argsort(noise, stable=True)``; without
    ``noise``, ``torch.rand(B, n_tubes, N)`` from a generator seeded with ``seed``."""
    if noise is None:
        g = torch.Generator(device=device).manual_seed(int(seed.reshape(-1)[0]) & ((1 << 63) - 1))
        noise = torch.rand(B, n_tubes, N, generator=g, device=device)
    order = torch.argsort(noise.reshape(B, n_tubes, N), dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def clip_ids_restore(ranks: torch.Tensor, T: int, tube: int, K: int) -> torch.Tensor:
    """Clip-level ``ids_restore (B, T*N)`` from per-tube ranks: frame t's token of rank r goes to ``t*K + r`` when
    kept (r < K), else to ``T*K + t*(N-K) + r - K``: MAE's convention over the clip sequence
    ``[visible of frame 0, ..., of frame T-1; masked of frame 0, ...]``, each frame's tokens in its tube's order."""
    B, _, N = ranks.shape
    r = ranks[:, torch.arange(T, device=ranks.device) // tube]  # (B, T, N)
    t = torch.arange(T, device=ranks.device)[:, None]
    return torch.where(r < K, t * K + r, T * K + t * (N - K) + r - K).reshape(B, T * N)


def clip_pos(pos: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """``(T*N, C)`` positions of the clip's tokens from ``(N, C)`` (every frame alike) or ``(T*N, C)``."""
    return pos if pos.shape[0] == T * N else pos.repeat(T, 1)


def tube_masking_reference(x, num_frames, tube, K, seed, noise, pos, mask_dtype):
    """``(visible (B, T*K, C), mask (B, T*N), ids_restore (B, T*N))`` for ``x (B*T, N, C)``: ``visible[b, t*K + j]``
    is frame t's j-th kept token in its tube's order (+ its position), ``mask`` 1 where masked."""
    BT, N, C = x.shape
    T = num_frames
    B = BT // T
    n_tubes = -(-T // tube)
    ids_restore = clip_ids_restore(tube_ranks(seed, noise, B, n_tubes, N, x.device), T, tube, K)
    mask = (ids_restore >= T * K).to(mask_dtype)
    ids_keep = torch.argsort(ids_restore, dim=1)[:, : T * K]
    vis = torch.gather(x.reshape(B, T * N, C), 1, ids_keep[..., None].expand(B, T * K, C))
    if pos is not None:
        cd = compute_dtype(x.dtype)
        vis = (vis.to(cd) + clip_pos(pos, T, N)[ids_keep].to(cd)).to(x.dtype)
    return vis.contiguous(), mask, ids_restore


def tube_masking_reference_backward(grad, ids_restore, num_frames, pos_rows, need_x, need_pos):
    """``(grad x (B*T, N, C), grad pos (pos_rows, C))`` from ``grad (B, T*K, C)``: each kept token's row back in
    its place, zeros elsewhere; pos's gradient summed over the batch (and the frames, for ``(N, C)`` positions)."""
    B, L, C = grad.shape[0], ids_restore.shape[1], grad.shape[2]
    T = num_frames
    gx = restore_reference(grad, ids_restore, None, None, None)
    gpos = None
    if need_pos:
        gpos = gx.sum(0, dtype=compute_dtype(grad.dtype))
        if pos_rows != L:
            gpos = gpos.reshape(T, L // T, C).sum(0)
    return gx.reshape(B * T, L // T, C) if need_x else None, gpos


# ---- restore: the MAE decoder input ----------------------------------------------------------


def keep_inverse(keep: torch.Tensor, L: int) -> torch.Tensor:
    """``(B, L)`` int64: ``i`` where ``keep[b, i] = l``, else -1 (``keep (B, M)`` unique per row)."""
    B, M = keep.shape
    inv = torch.full((B, L), -1, dtype=torch.int64, device=keep.device)
    return inv.scatter_(1, keep.long(), torch.arange(M, device=keep.device).expand(B, M))


def restore_reference(visible, ids_restore, mask_token, pos, keep):
    """The decoder input in ``visible``'s dtype.

    ``keep`` None (MAE): ``(B, L, C)``, ``out[b, l] = (visible[b, ids_restore[b, l]] if < K else mask_token)
    + pos[l]``. ``keep (B, M)`` (VideoMAE V2): ``(B, K + M, C)``, ``out[b, j] = visible[b, j] + pos[place of j]``
    for ``j < K``, ``out[b, K + i] = mask_token + pos[keep[b, i]]``. A missing mask token fills zeros.
    """
    B, K, C = visible.shape
    L = ids_restore.shape[1]
    cd = compute_dtype(visible.dtype)
    ids = ids_restore.long()
    token = mask_token.to(cd).reshape(C) if mask_token is not None else torch.zeros(C, dtype=cd, device=visible.device)
    if keep is None:
        full = torch.cat([visible.to(cd), token.expand(B, L - K, C)], dim=1)
        out = torch.gather(full, 1, ids[..., None].expand(B, L, C))
        if pos is not None:
            out = out + pos.to(cd)
        return out.to(visible.dtype)
    keep = keep.long()
    top = visible.to(cd)
    bottom = token.expand(B, keep.shape[1], C)
    if pos is not None:
        top = top + pos.to(cd)[torch.argsort(ids, dim=1)[:, :K]]
        bottom = bottom + pos.to(cd)[keep]
    return torch.cat([top, bottom], dim=1).to(visible.dtype)


def restore_reference_backward(grad, ids_restore, K, keep, need_visible, need_token, need_pos):
    """``(grad visible (B, K, C), grad mask token (C,), grad pos (L, C))`` of :func:`restore_reference` (fp32 sums
    for the token and pos, in ``grad``'s dtype for visible); entries not needed are None."""
    B, _, C = grad.shape
    L = ids_restore.shape[1]
    cd = compute_dtype(grad.dtype)
    ids = ids_restore.long()
    ids_keep = torch.argsort(ids, dim=1)[:, :K]  # the place of every visible token
    g = grad.to(cd)
    if keep is None:
        gvis = torch.gather(grad, 1, ids_keep[..., None].expand(B, K, C)) if need_visible else None
        gtok = (g * (ids >= K)[..., None]).sum((0, 1)) if need_token else None
        gpos = g.sum(0) if need_pos else None
        return gvis, gtok, gpos
    gvis = grad[:, :K] if need_visible else None
    gtok = g[:, K:].sum((0, 1)) if need_token else None
    gpos = None
    if need_pos:
        gpos = torch.zeros(L, C, dtype=cd, device=grad.device)
        gpos.index_add_(0, ids_keep.reshape(-1), g[:, :K].reshape(-1, C))
        gpos.index_add_(0, keep.long().reshape(-1), g[:, K:].reshape(-1, C))
    return gvis, gtok, gpos


# ---- masked patch loss -----------------------------------------------------------------------


def patchify(video: torch.Tensor, patch: int, tubelet: int) -> torch.Tensor:
    """``(B, T, 3, H, W)`` -> ``(B, P, tubelet*patch*patch, 3)``: patches in ``(t, h, w)`` order, elements in
    ``(dt, dy, dx)`` order, channel last (VideoMAE's ``'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c'``)."""
    B, T, Ch, H, W = video.shape
    u, p = tubelet, patch
    v = video.reshape(B, T // u, u, Ch, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 5, 7, 3)
    return v.reshape(B, (T // u) * (H // p) * (W // p), u * p * p, Ch)


def patch_targets(video, patch, tubelet, norm, affine=()) -> torch.Tensor:
    """``(B, P, D)`` reconstruction targets in the compute dtype (``affine``: per-channel scale then shift first)."""
    cd = compute_dtype(video.dtype)
    x = patchify(video.to(cd), patch, tubelet)
    if affine:
        x = x * torch.tensor(affine[:3], dtype=cd, device=x.device) + torch.tensor(
            affine[3:], dtype=cd, device=x.device
        )
    B, P, n, Ch = x.shape
    if norm == NORM_PATCH:
        x = x.reshape(B, P, n * Ch)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=True, keepdim=True)
        return (x - mean) / (var + NORM_EPS) ** 0.5
    if norm == NORM_CHANNEL:
        mean = x.mean(-2, keepdim=True)
        std = x.var(-2, unbiased=True, keepdim=True).sqrt()
        x = (x - mean) / (std + NORM_EPS)
    return x.reshape(B, P, n * Ch)


def _rows(pred, mask, idx):
    """(targets' patch index of every pred row (B, R), weight = mask at that patch (B, R))."""
    B, R, _ = pred.shape
    idx = torch.arange(R, device=pred.device).expand(B, R) if idx is None else idx.long()
    return idx, torch.gather(mask, 1, idx)


def masked_patch_loss_reference(pred, video, mask, idx, count, patch, tubelet, norm, affine):
    """``sum_{b,r} w[b,r] mean_d (pred[b,r] - target[b, idx[b,r]])^2 / count`` with ``w = mask[b, idx[b,r]]``
    (``idx`` None: row r is patch r), a 0-d tensor in the compute dtype. ``count`` is ``w.sum()`` (0-d)."""
    cd = compute_dtype(torch.promote_types(pred.dtype, video.dtype))
    target = patch_targets(video, patch, tubelet, norm, affine).to(cd)
    idx, w = _rows(pred, mask, idx)
    target = torch.gather(target, 1, idx[..., None].expand(-1, -1, target.shape[-1]))
    per_row = ((pred.to(cd) - target) ** 2).mean(-1)
    return (per_row * w).sum() / count.to(cd)


def masked_patch_loss_reference_backward(grad, pred, video, mask, idx, count, patch, tubelet, norm, affine):
    """Gradient of ``pred`` (its dtype): ``grad * 2 (pred - target) w / (D * count)``."""
    cd = compute_dtype(torch.promote_types(pred.dtype, video.dtype))
    target = patch_targets(video, patch, tubelet, norm, affine).to(cd)
    idx, w = _rows(pred, mask, idx)
    target = torch.gather(target, 1, idx[..., None].expand(-1, -1, target.shape[-1]))
    D = pred.shape[-1]
    g = grad.to(cd) * 2 * (pred.to(cd) - target) * w[..., None] / (D * count.to(cd))
    return g.to(pred.dtype)
