"""LayerNorm over the last dim, optionally fused with the residual add of a pre-norm block.

Forward: ``h = x + residual`` (rounded to x's dtype and returned), ``y = (h - mean) * rstd * w + b`` with
fp32 statistics; mean and rstd are saved. A persistent grid (a few programs per SM) of programs that each
own a contiguous block of rows, BLOCK_R whole rows per step: w and b are read once per program.
Backward: ``dx = rstd * (w*dy - mean(w*dy) - xhat * mean(xhat * w*dy)) (+ dh)``, with dW/dB reduced in
two stages: each program (two per SM) owns a block of rows and sums ``dy * xhat`` and ``dy`` over them into
1-D fp32 vectors over the columns (the column sum of a step stays inside each thread: warps split the
columns), stored as one partial row; a second kernel sums the partials over programs (no atomics:
deterministic). The partials cost 16 bytes per column per program, about 2% of the rows' bytes at the
suite's shapes. Rows wider than ONE_PASS_COLS do not fit registers: their backward first computes the two
row sums over column chunks (``_ln_bwd_stats``), then a second kernel walks (row block, column chunk) tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import empty, on_tensor_device, sm_count, use_gpu_configs, warps_for

MAX_COLS = 16384  # wider rows fall back to the reference
ONE_PASS_COLS = 8192  # widest row whose backward keeps the row in registers (no spills at 16 warps)
CHUNK_COLS = 2048  # column chunk of the wide-row backward


@triton.jit
def _ln_fwd(
    X,
    R,
    W,
    B,
    Y,
    HS,
    MEAN,
    RSTD,
    M,
    C,
    rows_per_prog,
    sxm,
    sxc,
    srm,
    src,
    sym,
    shm,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(B + cols, mask=c_mask, other=0.0).to(tl.float32)
    row0 = tl.program_id(0) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for r in range(row0, row_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        r_mask = rows < row_end
        mask = r_mask[:, None] & c_mask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * sxm + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            res = tl.load(R + r64[:, None] * srm + cols[None, :] * src, mask=mask, other=0.0).to(tl.float32)
            h = (x + res).to(HS.dtype.element_ty)  # the residual stream keeps x's dtype; y normalises exactly it
            tl.store(HS + r64[:, None] * shm + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        mean = tl.sum(x, 1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * w[None, :]
        if HAS_B:
            y = y + b[None, :]
        tl.store(Y + r64[:, None] * sym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=r_mask)
        tl.store(RSTD + rows, rstd, mask=r_mask)


@triton.jit
def _ln_bwd(
    DY,
    DH,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PART,
    DB_PART,
    M,
    C,
    rows_per_prog,
    sdym,
    sdyc,
    sdhm,
    sdhc,
    sxm,
    sxc,
    sdxm,
    HAS_DH: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(c_mask, 1.0, 0.0)
    dw_acc = tl.zeros([BLOCK_C], tl.float32)  # 1-D: a step's column sum stays in the threads owning the column
    db_acc = tl.zeros([BLOCK_C], tl.float32)
    row0 = g * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for r in range(row0, row_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        r_mask = rows < row_end
        mask = r_mask[:, None] & c_mask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * sxm + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdym + cols[None, :] * sdyc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=r_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, 1) / C
        c2 = tl.sum(wdy, 1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + r64[:, None] * sdhm + cols[None, :] * sdhc, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64[:, None] * sdxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, 0)
        if NEED_DB:
            db_acc += tl.sum(dy, 0)
    if NEED_DW:
        tl.store(DW_PART + g * C + cols, dw_acc, mask=c_mask)
    if NEED_DB:
        tl.store(DB_PART + g * C + cols, db_acc, mask=c_mask)


@triton.jit
def _ln_bwd_stats(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    STATS,
    M,
    C,
    sdym,
    sdyc,
    sxm,
    sxc,
    HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Wide rows, pass 1: STATS[row] = (mean(xhat * w*dy), mean(w*dy)), summed over column chunks."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < M
    r64 = rows.to(tl.int64)
    mean = tl.load(MEAN + rows, mask=r_mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
    s1 = tl.zeros([BLOCK_R], tl.float32)
    s2 = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_mask = cols < C
        mask = r_mask[:, None] & c_mask[None, :]
        x = tl.load(X + r64[:, None] * sxm + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdym + cols[None, :] * sdyc, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            dy = dy * tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        s1 += tl.sum(xhat * dy, 1)
        s2 += tl.sum(dy, 1)
    tl.store(STATS + r64 * 2, s1 / C, mask=r_mask)
    tl.store(STATS + r64 * 2 + 1, s2 / C, mask=r_mask)


@triton.jit
def _ln_bwd_chunked(
    DY,
    DH,
    X,
    W,
    MEAN,
    RSTD,
    STATS,
    DX,
    DW_PART,
    DB_PART,
    M,
    C,
    rows_per_prog,
    sdym,
    sdyc,
    sdhm,
    sdhc,
    sxm,
    sxc,
    sdxm,
    HAS_DH: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Wide rows, pass 2: programs over (row block, column chunk); dx of the tile, dW/dB partials of the chunk."""
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(c_mask, 1.0, 0.0)
    dw_acc = tl.zeros([BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_C], tl.float32)
    row0 = g * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for r in range(row0, row_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        r_mask = rows < row_end
        mask = r_mask[:, None] & c_mask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * sxm + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdym + cols[None, :] * sdyc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=r_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=r_mask, other=0.0)
        c1 = tl.load(STATS + r64 * 2, mask=r_mask, other=0.0)
        c2 = tl.load(STATS + r64 * 2 + 1, mask=r_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = (dy * w[None, :] - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + r64[:, None] * sdhm + cols[None, :] * sdhc, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64[:, None] * sdxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, 0)
        if NEED_DB:
            db_acc += tl.sum(dy, 0)
    if NEED_DW:
        tl.store(DW_PART + g * C + cols, dw_acc, mask=c_mask)
    if NEED_DB:
        tl.store(DB_PART + g * C + cols, db_acc, mask=c_mask)


@triton.jit
def _col_sum(PART, OUT, G, C, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[c] = sum_g PART[g, c] in fp32, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    acc = tl.zeros([BLOCK_C], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        part = tl.load(PART + gs[:, None] * C + cols[None, :], mask=(gs < G)[:, None] & c_mask[None, :], other=0.0)
        acc += tl.sum(part, 0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=c_mask)


def _fwd_config(C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps, programs per SM) of the forward: whole rows, ~4K elements per step on a
    GPU (the interpreter takes 16K: fewer steps), 4 persistent programs per SM."""
    BLOCK_C = max(16, triton.next_power_of_2(C))
    budget = 4096 if use_gpu_configs(device) else 16384
    BLOCK_R = max(1, min(64, budget // BLOCK_C))
    return BLOCK_R, BLOCK_C, min(16, max(warps_for(BLOCK_R * BLOCK_C), BLOCK_R * BLOCK_C // 1024)), 4


def _bwd_config(C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps, programs per SM) of the backward. Each program writes a partial row of
    16 bytes per column, so the grid is two programs per SM; 8-16 warps each keep the SM busy. Rows wider
    than ONE_PASS_COLS: column chunks of CHUNK_COLS."""
    if C > ONE_PASS_COLS:
        return 4, CHUNK_COLS, 8, 2
    BLOCK_C = max(16, triton.next_power_of_2(C))
    if not use_gpu_configs(device):
        return max(1, min(64, 16384 // BLOCK_C)), BLOCK_C, 4, 2
    BLOCK_R = max(1, min(8, 4096 // BLOCK_C))
    return BLOCK_R, BLOCK_C, min(16, max(8, BLOCK_R * BLOCK_C // 512)), 2


def _programs(M: int, BLOCK_R: int, per_sm: int, min_rows: int, device: torch.device) -> int:
    """Persistent grid: per_sm programs per SM, each owning at least min_rows rows (a program's fixed
    traffic, w and b or a partial row, is C elements: min_rows bounds it against its rows' traffic)."""
    tiles = triton.cdiv(M, BLOCK_R)
    if not use_gpu_configs(device):
        return max(1, min(tiles, 4))
    return max(1, min(tiles, per_sm * sm_count(device), M // min_rows))


@on_tensor_device
def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """x, residual ``(M, C)`` (any strides) -> ``(y, h or None, mean (M,), rstd (M,))``; y and h contiguous."""
    M, C = x.shape
    y = empty((M, C), x.dtype, x.device)
    h = empty((M, C), x.dtype, x.device) if residual is not None else None
    mean = empty((M,), torch.float32, x.device)
    rstd = empty((M,), torch.float32, x.device)
    if M == 0:
        return y, h, mean, rstd
    BLOCK_R, BLOCK_C, warps, per_sm = _fwd_config(C, x.device)
    G = _programs(M, BLOCK_R, per_sm, 8, x.device)
    rows_per_prog = triton.cdiv(triton.cdiv(M, G), BLOCK_R) * BLOCK_R
    G = triton.cdiv(M, rows_per_prog)
    r = residual if residual is not None else x
    _ln_fwd[(G,)](
        x, r, weight if weight is not None else x, bias if bias is not None else x, y, h if h is not None else y,
        mean, rstd, M, C, rows_per_prog, x.stride(0), x.stride(1), r.stride(0), r.stride(1), y.stride(0),
        h.stride(0) if h is not None else 0, float(eps),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps,
    )  # fmt: skip
    return y, h, mean, rstd


@on_tensor_device
def layer_norm_backward(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``dy``, ``dh`` (grad of the returned sum, or None), the normalised input ``x`` ``(M, C)`` ->
    ``(dx, dw, db)``; dx is also the residual's gradient. dw/db in the weight's dtype."""
    M, C = x.shape
    dx = empty((M, C), x.dtype, x.device)
    wdtype = weight.dtype if weight is not None else x.dtype
    BLOCK_R, BLOCK_C, warps, per_sm = _bwd_config(C, x.device)
    wide = C > ONE_PASS_COLS
    chunks = triton.cdiv(C, BLOCK_C) if wide else 1
    G = _programs(M, BLOCK_R, max(1, per_sm // chunks) if wide else per_sm, 16, x.device) if M else 0
    rows_per_prog = triton.cdiv(triton.cdiv(M, G), BLOCK_R) * BLOCK_R if M else 0
    G = triton.cdiv(M, rows_per_prog) if M else 0
    dw_part = empty((G, C), torch.float32, x.device) if need_dw else None
    db_part = empty((G, C), torch.float32, x.device) if need_db else None
    if G > 0:
        w = weight if weight is not None else x
        dh_ = dh if dh is not None else dy
        parts = (dw_part if dw_part is not None else mean, db_part if db_part is not None else mean)
        strides = (dy.stride(0), dy.stride(1), dh_.stride(0) if dh is not None else 0,
                   dh_.stride(1) if dh is not None else 0, x.stride(0), x.stride(1), dx.stride(0))  # fmt: skip
        flags = dict(HAS_DH=dh is not None, HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db)
        if wide:
            stats = empty((M, 2), torch.float32, x.device)
            _ln_bwd_stats[(triton.cdiv(M, BLOCK_R),)](
                dy, x, w, mean, rstd, stats, M, C, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                HAS_W=weight is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps,
            )  # fmt: skip
            _ln_bwd_chunked[(G, chunks)](
                dy, dh_, x, w, mean, rstd, stats, dx, *parts, M, C, rows_per_prog, *strides,
                **flags, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps,
            )  # fmt: skip
        else:
            _ln_bwd[(G,)](
                dy, dh_, x, w, mean, rstd, dx, *parts, M, C, rows_per_prog, *strides,
                **flags, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps,
            )  # fmt: skip
    outs = []
    for part in (dw_part, db_part):
        if part is None:
            outs.append(None)
            continue
        out = empty((C,), wdtype, x.device)
        if G == 0:
            out.zero_()
        else:  # enough programs over C: 32 columns (128 B of fp32) each
            SUM_C = min(32, max(16, triton.next_power_of_2(C)))
            BLOCK_G = min(64, max(1, triton.next_power_of_2(G)))
            _col_sum[(triton.cdiv(C, SUM_C),)](part, out, G, C, BLOCK_G=BLOCK_G, BLOCK_C=SUM_C, num_warps=4)
        outs.append(out)
    return dx, outs[0], outs[1]
