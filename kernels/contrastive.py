"""Contrastive-loss kernels: tiles of ``X = scale * Q K^T`` live in registers only, never in memory.

Log-sum-exp pair (CLIP / InfoNCE, MIL-NCE), for ``q (M, D)``, ``k (N, D)``:
  ``lse_forward``   row LSE (over the columns ``col_mask`` keeps) and, when ``symmetric``, column LSE
                    (over all rows). A program owns a block of rows and one column span; it walks its
                    span in column tiles with an online row LSE (partial LSEs of several spans are
                    merged on the host). Programs are persistent over row blocks: the column LSE of the
                    rows a program visits is folded into its private ``(programs, N)`` fp32 slot
                    (read-modify-write, no races, merged on the host), so memory is O(programs * N),
                    never O(M * N).
  ``lse_backward``  the gradient of ``sum(alpha * row_lse) + sum(beta * col_lse)``:
                    ``G = alpha_m [mask_n] exp(X - rho_m) + beta_n exp(X - gamma_n)`` recomputed per
                    tile; ``dq = s G k`` and ``dk = s G^T q``.
SigLIP: the same tiling for ``sum softplus(-y (s QK^T + bias))``, ``y = +1`` on ``n == m + offset``.

One gradient kernel serves both losses and both sides: a program keeps a block of *resident* rows
(q's rows for dq, k's rows for dk) and streams the other side's rows in tiles; for dk it forms the
transposed tile ``K Q^T`` directly, so both gradients are the same ``acc += G_tile @ streamed`` and
``G`` is never transposed in registers. When a launch would have too few programs for the GPU, the
streamed range is split across programs (fp32 partial gradients summed on the host).

Hopper tiles: every dot has >= 64 resident rows (a warpgroup's wgmma M). 16-bit features: the resident
block holds all of D (``BLOCK_D >= D``), loaded once per program; only the streamed tiles move. fp32
features use 3xTF32 (``tf32x3``: each operand split into TF32 hi + lo, three TF32 dots, fp32-level
accuracy on tensor cores) unless PyTorch allows TF32 matmuls; the split copies do not fit beside a
resident fp32 block, so both sides are walked in ``BLOCK_D`` feature chunks and a gradient program
covers ``BLOCK_O`` of the D output features. Launch shapes come from ``CANDIDATES``, pruned by a
shared-memory estimate against the device before launch.

Every product accumulates in fp32 whatever the input dtype. The probabilities fed to the second
matmul are cast to the input dtype (tensor cores), times ``P_SCALE`` (1024 for fp16, to keep
small probabilities out of fp16's subnormal range). Logits and LSEs stay in natural units; each
exponent ``x - m`` is formed before the base-2 scaling (``exp2((x - m) * log2 e)``) so no rounding of a
large ``x * log2 e`` is added to PyTorch's own.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .utils import empty, on_tensor_device

MAX_D = 512  # the widest D the tile tables serve (16-bit gradients keep a (rows, D) fp32 accumulator)
LOG2E = tl.constexpr(1.4426950408889634)


# ---- tile helpers --------------------------------------------------------------------------


@triton.jit
def _tile(ptr, idx, valid, d0, s_row, s_col, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of a (rows, D) matrix, features ``d0 .. d0 + BLOCK_D`` (0 outside), input dtype."""
    d = d0 + tl.arange(0, BLOCK_D)
    offs = idx.to(tl.int64)[:, None] * s_row + d[None, :] * s_col
    if D % BLOCK_D == 0:
        return tl.load(ptr + offs, mask=valid[:, None], other=0.0)
    return tl.load(ptr + offs, mask=valid[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _tf32(x):
    """fp32 ``x`` rounded to TF32 (10 mantissa bits, ties away from zero; the low 13 bits 0): a TF32
    tensor-core dot reads it exactly, and the interpreter's fp32 dot of such operands computes what the
    GPU does."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` on tensor cores. ``PREC == "tf32x3"``: fp32 operands split as hi + lo (both TF32,
    the split exact), three TF32 dots (lo.hi + hi.lo + hi.hi): ~2^-21 relative error per product."""
    if PREC == "tf32x3":
        a_hi = _tf32(a)
        b_hi = _tf32(b)
        acc = tl.dot(_tf32(a - a_hi), b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, _tf32(b - b_hi), acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _chunked_dot(
    a_ptr,
    b_ptr,
    ia,
    va,
    ib,
    vb,
    sa0,
    sa1,
    sb0,
    sb1,
    D: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 ``(BLOCK_A, BLOCK_B)`` tile of ``a[ia] . b[ib]``, both sides loaded in ``BLOCK_D`` feature chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        at = _tile(a_ptr, ia, va, d0, sa0, sa1, D, BLOCK_D)
        bt = _tile(b_ptr, ib, vb, d0, sb0, sb1, D, BLOCK_D)
        acc = _mma(at, tl.trans(bt), acc, PREC)
    return acc


@triton.jit
def _resident(ptr, rows, valid, s_row, s_col, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's resident block (rows x all of D) when ``BLOCK_D`` covers D (read once), else a
    placeholder the chunked path never reads."""
    if BLOCK_D >= D:
        t = _tile(ptr, rows, valid, 0, s_row, s_col, D, BLOCK_D)
    else:
        t = tl.zeros([rows.shape[0], BLOCK_D], dtype=ptr.dtype.element_ty)
    return t


@triton.jit
def _scores(
    qt, q_ptr, rows, rm, sqm, sqd, k_ptr, cols, cn, skn, skd, D: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr
):
    """fp32 tile ``q[rows] . k[cols]``: the resident ``qt`` (rows, all of D) against a streamed (cols, all
    of D) tile when ``BD`` covers D, else both sides in ``BD`` feature chunks."""
    if BD >= D:
        kt = _tile(k_ptr, cols, cn, 0, skn, skd, D, BD)
        x = _mma(qt, tl.trans(kt), tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32), PREC)
    else:
        x = _chunked_dot(
            q_ptr, k_ptr, rows, rm, cols, cn, sqm, sqd, skn, skd, D, PREC, rows.shape[0], cols.shape[0], BD
        )
    return x


@triton.jit
def _span(n, spans, BLOCK: tl.constexpr):
    """This program's streamed range ``[lo, hi)``: span ``program_id(1)`` of ``spans`` over ``n`` rows.
    Grid sizes come as arguments, so a launch with one span is specialised (an argument equal to 1
    is a compile-time constant on CUDA)."""
    per = tl.cdiv(tl.cdiv(n, BLOCK), spans) * BLOCK
    lo = tl.program_id(1) * per
    return lo, tl.minimum(n, lo + per)


@triton.jit
def _log(x):
    """Natural log with log(0) = -inf, without evaluating log2(0)."""
    return tl.where(x > 0, tl.log2(tl.where(x > 0, x, 1.0)) * 0.6931471805599453, float("-inf"))


@triton.jit
def _safe(m):
    """A finite stand-in for a running max that is still -inf (no element seen), so exp2(x - m) is 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _bcast(v, AXIS: tl.constexpr):
    """A vector laid along ``AXIS`` of a 2-D tile (0: one value per tile row, 1: per tile column)."""
    if AXIS == 0:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


# ---- per-tile losses and weights -----------------------------------------------------------


@triton.jit
def _q_side(alpha_ptr, rho_ptr, idx, valid, inv):
    """alpha / max|alpha, beta| and rho for q's rows ``idx`` (rho = +inf outside: exp(x - rho) = 0)."""
    a = tl.load(alpha_ptr + idx, mask=valid, other=0.0).to(tl.float32) * inv
    r = tl.load(rho_ptr + idx, mask=valid, other=float("inf")).to(tl.float32)
    return a, r


@triton.jit
def _k_side(mask_ptr, beta_ptr, gamma_ptr, idx, valid, inv, HAS_MASK: tl.constexpr, HAS_COL: tl.constexpr):
    """For k's rows ``idx``: kept by the row LSE's column mask, beta / max|alpha, beta|, gamma."""
    keep = valid
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + idx, mask=valid, other=0) != 0)
    b = tl.zeros(idx.shape, dtype=tl.float32)
    g = tl.zeros(idx.shape, dtype=tl.float32)
    if HAS_COL:
        b = tl.load(beta_ptr + idx, mask=valid, other=0.0).to(tl.float32) * inv
        g = tl.load(gamma_ptr + idx, mask=valid, other=float("inf")).to(tl.float32)
    return keep, b, g


@triton.jit
def _lse_weights(x, a, r, keep, b, g, valid, Q_AXIS: tl.constexpr, HAS_COL: tl.constexpr):
    """G / max|alpha, beta| on a logits tile whose q index runs along ``Q_AXIS``: alpha_m exp(X - rho_m) on
    kept columns (+ beta_n exp(X - gamma_n)), 0 outside ``valid`` (a padded row's X = 0 could overflow
    exp(X - gamma)). X - rho is formed in natural units before the base-2 scaling."""
    K_AXIS: tl.constexpr = 1 - Q_AXIS
    p = tl.where(_bcast(keep, K_AXIS), _bcast(a, Q_AXIS) * tl.exp2((x - _bcast(r, Q_AXIS)) * LOG2E), 0.0)
    if HAS_COL:
        p += _bcast(b, K_AXIS) * tl.exp2((x - _bcast(g, K_AXIS)) * LOG2E)
    return tl.where(valid, p, 0.0)


@triton.jit
def _siglip_signs(qi, ki, offset, Q_AXIS: tl.constexpr):
    """True on the positives ``k index == q index + offset`` of a tile whose q index runs along ``Q_AXIS``."""
    return _bcast(ki, 1 - Q_AXIS) == _bcast(qi, Q_AXIS) + offset


@triton.jit
def _siglip_weights(x, pos, valid):
    """d(-log sigmoid(z))/dx = -y sigmoid(-z) with z = y x, y = +1 on the positives; 0 outside."""
    z = tl.where(pos, x, -x)
    e = tl.exp(-tl.abs(z))
    sg = tl.where(z > 0, e, 1.0) / (1.0 + e)  # sigmoid(-z) without overflow
    return tl.where(valid, tl.where(pos, -sg, sg), 0.0)


# ---- log-sum-exp forward -------------------------------------------------------------------


@triton.jit
def _lse_fwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    mask_ptr,
    row_ptr,
    colp_ptr,
    M,
    N,
    sqm,
    sqd,
    skn,
    skd,
    n_row,
    spans,
    D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (row programs, column spans). Writes the row LSE over this span to ``row_ptr[span]`` and
    folds the column LSE of its rows into its slot ``colp_ptr[row program]`` (written on its first row
    block, merged after)."""
    pid = tl.program_id(0)
    lo, hi = _span(N, spans, BLOCK_N)
    s = tl.load(scale_ptr).to(tl.float32)
    slot = colp_ptr + pid.to(tl.int64) * N
    out = row_ptr + tl.program_id(1).to(tl.int64) * M
    for rb in range(pid, tl.cdiv(M, BLOCK_M), n_row):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < M
        qt = _resident(q_ptr, rows, rm, sqm, sqd, D, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cn = cols < hi
            x = _scores(qt, q_ptr, rows, rm, sqm, sqd, k_ptr, cols, cn, skn, skd, D, PREC, BLOCK_D)
            x = x * s
            keep = cn
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + cols, mask=cn, other=0) != 0)
            xr = tl.where(keep[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(xr, 1))
            ms = _safe(m_new)
            l_i = l_i * tl.exp2((m_i - ms) * LOG2E) + tl.sum(tl.exp2((xr - ms[:, None]) * LOG2E), 1)
            m_i = m_new
            if SYMMETRIC:
                xc = tl.where(rm[:, None], x, float("-inf"))
                cs = _safe(tl.max(xc, 0))
                tile = cs + _log(tl.sum(tl.exp2((xc - cs[None, :]) * LOG2E), 0))
                old = tl.load(slot + cols, mask=cn & (rb != pid), other=float("-inf"))
                top = _safe(tl.maximum(old, tile))
                both = tl.exp2((old - top) * LOG2E) + tl.exp2((tile - top) * LOG2E)
                tl.store(slot + cols, top + _log(both), mask=cn)
        tl.store(out + rows, m_i + _log(l_i), mask=rm)


# ---- SigLIP forward ------------------------------------------------------------------------


@triton.jit
def _siglip_fwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    offset,
    sqm,
    sqd,
    skn,
    skd,
    spans,
    D: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (row blocks, column spans): each program writes the sum of its rows x span to ``out_ptr[program]``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    lo, hi = _span(N, spans, BLOCK_N)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    qt = _resident(q_ptr, rows, rm, sqm, sqd, D, BLOCK_D)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cn = cols < hi
        x = _scores(qt, q_ptr, rows, rm, sqm, sqd, k_ptr, cols, cn, skn, skd, D, PREC, BLOCK_D)
        x = x * s + bias
        z = tl.where(_siglip_signs(rows, cols, offset, 0), x, -x)
        # -log sigmoid(z) = max(-z, 0) + log1p(exp(-|z|)); log1p(e) = log(u) * e / (u - 1), u = 1 + e
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        l1p = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        v = tl.maximum(-z, 0.0) + l1p
        total += tl.sum(tl.where(rm[:, None] & cn[None, :], v, 0.0), 1)
    tl.store(out_ptr + tl.program_id(0) * spans + tl.program_id(1), tl.sum(total, 0))


# ---- gradients (both losses, both sides) ---------------------------------------------------


@triton.jit
def _grad_kernel(
    r_ptr,
    s_ptr,
    scale_ptr,
    fac_ptr,
    bias_ptr,
    mask_ptr,
    alpha_ptr,
    rho_ptr,
    beta_ptr,
    gamma_ptr,
    out_ptr,
    part_ptr,
    R,
    S,
    offset,
    srr,
    srd,
    sss,
    ssd,
    spans,
    D: tl.constexpr,
    BLOCK_O: tl.constexpr,
    SIGLIP: tl.constexpr,
    DK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_COL: tl.constexpr,
    NEED_OUT: tl.constexpr,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (resident blocks, streamed spans, feature slices of BLOCK_O). Resident rows ``r`` (q's for dq, k's for dk when ``DK``),
    streamed rows ``s`` (the other side); ``acc = sum over the span of G_tile @ s_tile`` with ``G`` the
    loss's logit gradient laid (resident, streamed). Writes ``out[span, rows, slice] = s * fac * acc`` (the
    final gradient when the grid has one span, else fp32 partials) and, for dq, the span's
    ``(sum G * QK^T, sum G) * fac`` to ``part_ptr[program]`` (the scale and bias gradients).
    ``fac``: max|alpha, beta| (LSE: G was divided by it) or the upstream gradient (SigLIP)."""
    tl.static_assert(BLOCK_D < D or BLOCK_O >= D, "a resident block's gradient covers all of D")
    pid = tl.program_id(0)
    Q_AXIS: tl.constexpr = 1 if DK else 0  # the tile axis that runs over q's rows
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < R
    lo, hi = _span(S, spans, BLOCK_N)
    s = tl.load(scale_ptr).to(tl.float32)
    fac = tl.load(fac_ptr).to(tl.float32)
    inv = 1.0 / fac  # LSE weights are divided by max|alpha, beta| before the cast
    bias = tl.load(bias_ptr).to(tl.float32)
    rt = _resident(r_ptr, rows, rm, srr, srd, D, BLOCK_D)
    if not SIGLIP:  # the resident side's loss vectors, loaded once
        if DK:
            keep_r, b_r, g_r = _k_side(mask_ptr, beta_ptr, gamma_ptr, rows, rm, inv, HAS_MASK, HAS_COL)
        else:
            a_r, r_r = _q_side(alpha_ptr, rho_ptr, rows, rm, inv)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    o_lo = tl.program_id(2) * BLOCK_O  # this program's output features
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cn = cols < hi
        st = _tile(s_ptr, cols, cn, o_lo, sss, ssd, D, BLOCK_O)  # the second dot's operand
        if BLOCK_D >= D:
            dot = _mma(rt, tl.trans(st), zero, PREC)
        else:
            dot = _chunked_dot(r_ptr, s_ptr, rows, rm, cols, cn, srr, srd, sss, ssd, D, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = rm[:, None] & cn[None, :]
        if SIGLIP:
            qi = cols if DK else rows
            ki = rows if DK else cols
            p = _siglip_weights(dot * s + bias, _siglip_signs(qi, ki, offset, Q_AXIS), valid)
        elif DK:
            a_s, r_s = _q_side(alpha_ptr, rho_ptr, cols, cn, inv)
            p = _lse_weights(dot * s, a_s, r_s, keep_r, b_r, g_r, valid, Q_AXIS, HAS_COL)
        else:
            keep_s, b_s, g_s = _k_side(mask_ptr, beta_ptr, gamma_ptr, cols, cn, inv, HAS_MASK, HAS_COL)
            p = _lse_weights(dot * s, a_r, r_r, keep_s, b_s, g_s, valid, Q_AXIS, HAS_COL)
        if not DK:
            ds += tl.sum(p * dot, 1)
            db += tl.sum(p, 1)
        if NEED_OUT:
            acc = _mma((p * P_SCALE).to(st.dtype), st, acc, PREC)
    if not DK:  # every feature slice saw the same G: the first one reports it
        slot = pid * spans + tl.program_id(1)
        first = tl.program_id(2) == 0
        tl.store(part_ptr + 2 * slot, tl.sum(ds, 0) * fac, mask=first)
        tl.store(part_ptr + 2 * slot + 1, tl.sum(db, 0) * fac, mask=first)
    if NEED_OUT:
        d = o_lo + tl.arange(0, BLOCK_O)
        out = out_ptr + tl.program_id(1).to(tl.int64) * R * D + rows.to(tl.int64)[:, None] * D + d[None, :]
        dm = rm[:, None] if D % BLOCK_O == 0 else rm[:, None] & (d < D)[None, :]
        tl.store(out, (acc * (s * fac / P_SCALE)).to(out_ptr.dtype.element_ty), mask=dm)


# ---- launch configurations -----------------------------------------------------------------


class Tiles(NamedTuple):
    """One launch shape: ``block_r`` resident rows per program, ``block_s`` streamed rows per tile,
    ``block_d`` features per dot step (>= D: the resident block holds all of D and is read once)."""

    block_r: int
    block_s: int
    block_d: int
    warps: int
    stages: int
    block_o: int = 0  # gradient features per program (0: all of D)


# Per (kernel, element bytes): (largest padded D served, tiles), best first; block_d / block_o = 0 mean
# "all of D". Chosen by compiling every launch for sm_90 at B=32768, D in {128, 256, 512} (wgmma, no
# spills, within shared memory); the later entries serve GPUs with less shared memory.
#  - 16-bit: the resident block holds all of D. Forward 128 rows (one warpgroup per 64); gradients keep a
#    (rows, D) fp32 accumulator, so 128 rows up to D=256 and 64 at D=512 (where both warpgroups of the
#    first dot hold the same 64 rows: Triton lays a dot that feeds another along M only).
#  - fp32 (3xTF32): the TF32 hi/lo split of every operand lives in registers, so both sides are walked
#    in narrow D chunks by one warpgroup (4 warps: the three chained dots of a split share one layout)
#    and the gradient covers at most 256 features per program.
CANDIDATES: dict[tuple[str, int], tuple[tuple[int, Tiles], ...]] = {
    ("fwd", 2): ((256, Tiles(128, 64, 0, 8, 3)), (512, Tiles(128, 32, 0, 8, 2)), (512, Tiles(64, 64, 64, 4, 3))),
    ("fwd", 4): ((512, Tiles(64, 128, 32, 4, 3)), (512, Tiles(64, 64, 32, 4, 2))),
    ("grad", 2): (
        (256, Tiles(128, 32, 0, 8, 3)),
        (512, Tiles(64, 32, 0, 8, 3)),
        (512, Tiles(64, 32, 64, 4, 2, 128)),
    ),
    ("grad", 4): ((512, Tiles(64, 16, 16, 4, 2, 256)),),
}
INTERPRET_TILES = {"fwd": Tiles(128, 128, 0, 4, 1), "grad": Tiles(128, 128, 0, 4, 1)}
"""Few, large programs under the interpreter: it pays per operation, not per element."""

SMEM_SLACK = 8192
"""Bytes added to every estimate for Triton's reduction and layout-conversion scratch."""


def smem_estimate(kind: str, t: Tiles, D: int, elem: int) -> int:
    """Shared memory (bytes) a launch of ``kind`` ('fwd' or 'grad') with tiles ``t`` needs at feature
    width D, an upper bound of Triton's sm_90 allocation: the resident block and pipelined streamed
    tiles (or both sides' pipelined chunks), for fp32 the TF32 hi/lo copies of the streamed operands,
    the gradient's operand staging, and (gradient) the epilogue's fp32 accumulator layout conversion."""
    t = resolve(t, D)
    d_pad = max(16, triton.next_power_of_2(D))
    split = 2 if elem == 4 else 0  # 3xTF32: hi and lo copies
    if t.block_d >= d_pad:  # resident block, pipelined streamed tiles
        need = (t.block_r + t.stages * t.block_s) * d_pad * elem
    else:  # both sides in pipelined chunks
        need = (t.stages * (t.block_r + t.block_s) + split * t.block_s) * t.block_d * elem
        if kind == "grad":  # the streamed (block_s, block_o) operand of the gradient dot
            need += (1 + split) * t.block_s * t.block_o * elem
    if kind == "fwd":
        return need + SMEM_SLACK
    need += (1 + split) * t.block_r * t.block_s * elem  # G staged as the gradient dot's operand
    return max(need + SMEM_SLACK, t.block_r * t.block_o * 4)


@functools.cache
def _device_limits(index: int) -> tuple[int, int]:
    """(streaming multiprocessors, opt-in shared memory per block in bytes) of CUDA device ``index``."""
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return props["multiprocessor_count"], props["max_shared_mem"]


def device_limits(device: torch.device) -> tuple[int, int] | None:
    """(SMs, shared memory per block) of a CUDA ``device``; None under the interpreter or off CUDA."""
    if INTERPRET or device.type != "cuda":
        return None
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


INTERPRET_LIMITS = (2, 232448)
"""What the interpreter plans for: 2 SMs (few programs, the persistent and split paths still taken)."""


def resolve(t: Tiles, D: int) -> Tiles:
    """``t`` with its 0 ("all of D") feature blocks replaced by D padded to a power of 2 (>= 16)."""
    d_pad = max(16, triton.next_power_of_2(D))
    bd = d_pad if t.block_d == 0 else min(t.block_d, d_pad)
    return t._replace(block_d=bd, block_o=d_pad if t.block_o == 0 or bd >= d_pad else min(t.block_o, d_pad))


def pick_tiles(kind: str, D: int, dtype: torch.dtype, smem: int) -> Tiles:
    """The first candidate of ``kind`` ('fwd' or 'grad') that serves D and whose shared-memory estimate
    fits in ``smem`` bytes, resolved for D (``block_d >= D`` means resident)."""
    elem = dtype.itemsize
    d_pad = max(16, triton.next_power_of_2(D))
    for max_d, t in CANDIDATES[(kind, elem)]:
        if d_pad <= max_d and smem_estimate(kind, t, D, elem) <= smem:
            return resolve(t, D)
    raise ValueError(f"no contrastive tile configuration fits {smem} bytes of shared memory at D={D}, {dtype}")


def _tiles(kind: str, D: int, dtype: torch.dtype, device: torch.device, tiles: Tiles | None) -> Tiles:
    if tiles is not None:
        return resolve(tiles, D)
    limits = device_limits(device)
    if limits is None:
        return resolve(INTERPRET_TILES[kind], D)
    return pick_tiles(kind, D, dtype, limits[1])


def _grid(blocks: int, streamed: int, t: Tiles, device: torch.device, smem: int) -> tuple[int, int]:
    """(a wave: programs the SMs run at once, 1 or 2 each as shared memory allows; spans of the streamed
    range). The streamed range is split only when the resident blocks alone fill less than a wave."""
    sms, limit = device_limits(device) or INTERPRET_LIMITS
    wave = sms * max(1, min(limit // smem, 2))
    tiles = triton.cdiv(streamed, t.block_s)
    spans = max(1, min(tiles, triton.cdiv(wave, blocks)))
    return wave, triton.cdiv(tiles, triton.cdiv(tiles, spans))


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 when PyTorch's matmuls may (torch.backends.cuda.matmul.allow_tf32), else
    3xTF32 (fp32-level accuracy on tensor cores)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _p_scale(dtype: torch.dtype) -> float:
    return 1024.0 if dtype == torch.float16 else 1.0


# ---- host launchers ------------------------------------------------------------------------


def _tile_meta(t: Tiles, q: torch.Tensor) -> dict:
    """The constexprs and launch options every kernel takes from its tiles and q."""
    return dict(
        D=q.shape[1],
        PREC=_prec(q.dtype),
        BLOCK_M=t.block_r,
        BLOCK_N=t.block_s,
        BLOCK_D=t.block_d,
        num_warps=t.warps,
        num_stages=t.stages,
    )


@on_tensor_device
def lse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    col_mask: torch.Tensor | None,
    symmetric: bool,
    *,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row LSE ``(M,)`` of ``scale * q k^T`` over the columns ``col_mask (N,)`` keeps, and column LSE ``(N,)``
    over all rows when ``symmetric`` (else an empty tensor). q ``(M, D)``, k ``(N, D)`` fp16/bf16/fp32, any
    strides; ``scale`` a 1-element tensor; outputs fp32. ``tiles`` forces a launch shape (tests)."""
    M, D = q.shape
    N = k.shape[0]
    t = _tiles("fwd", D, q.dtype, q.device, tiles)
    blocks = triton.cdiv(M, t.block_r)
    wave, spans = _grid(blocks, N, t, q.device, smem_estimate("fwd", t, D, q.element_size()))
    row_progs = min(blocks, wave)  # persistent: each program owns a (N,) column-LSE slot
    row = empty((spans, M), torch.float32, q.device)
    colp = empty((row_progs, N) if symmetric else (1, 1), torch.float32, q.device)
    mask = col_mask.view(torch.uint8) if col_mask is not None else row
    _lse_fwd_kernel[(row_progs, spans)](
        q,
        k,
        scale,
        mask,
        row,
        colp,
        M,
        N,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        row_progs,
        spans,
        HAS_MASK=col_mask is not None,
        SYMMETRIC=symmetric,
        **_tile_meta(t, q),
    )
    row = row[0] if spans == 1 else torch.logsumexp(row, dim=0)
    if not symmetric:
        return row, torch.empty(0, dtype=torch.float32, device=q.device)
    return row, colp[0] if row_progs == 1 else torch.logsumexp(colp, dim=0)


def _norm(*ws: torch.Tensor | None) -> torch.Tensor:
    """max |w| over the weight vectors (1 if all zero), a device tensor: no host sync."""
    m = torch.stack([w.abs().max().float() for w in ws if w is not None and w.numel()])
    m = m.max()
    return torch.where(m > 0, m, torch.ones_like(m)).reshape(1)


def _gradients(
    q, k, scale, fac, bias, offset, vectors, siglip, has_mask, has_col, need_q, need_k, tiles
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """dq (when ``need_q``), dk (when ``need_k``) and the (programs, 2) ``(dscale, dbias)`` partials:
    one ``_grad_kernel`` launch per side."""
    D = q.shape[1]
    t = _tiles("grad", D, q.dtype, q.device, tiles)
    smem = smem_estimate("grad", t, D, q.element_size())
    common = dict(
        BLOCK_O=t.block_o,
        SIGLIP=siglip,
        HAS_MASK=has_mask,
        HAS_COL=has_col,
        P_SCALE=_p_scale(q.dtype),
        **_tile_meta(t, q),
    )
    outs = []
    parts = None
    for res, other, dk, need in ((q, k, False, True), (k, q, True, need_k)):
        if not need:
            outs.append(None)
            continue
        R, Sn = res.shape[0], other.shape[0]
        blocks = triton.cdiv(R, t.block_r)
        spans = _grid(blocks, Sn, t, q.device, smem)[1]
        need_out = dk or need_q
        out = None
        if need_out:
            out = (
                empty((R, D), res.dtype, res.device) if spans == 1 else empty((spans, R, D), torch.float32, res.device)
            )
        if not dk:
            parts = empty((blocks * spans, 2), torch.float32, q.device)
        _grad_kernel[(blocks, spans, triton.cdiv(D, t.block_o))](
            res,
            other,
            scale,
            fac,
            bias,
            *vectors,
            out if need_out else parts,
            parts,
            R,
            Sn,
            offset,
            res.stride(0),
            res.stride(1),
            other.stride(0),
            other.stride(1),
            spans,
            DK=dk,
            NEED_OUT=need_out,
            **common,
        )
        if need_out and spans > 1:
            out = out.sum(0).to(res.dtype)
        outs.append(out)
    return outs[0], outs[1], parts


@on_tensor_device
def lse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    col_mask: torch.Tensor | None,
    alpha: torch.Tensor,
    rho: torch.Tensor,
    beta: torch.Tensor | None,
    gamma: torch.Tensor | None,
    need_q: bool = True,
    need_k: bool = True,
    *,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of ``sum_m alpha_m row_lse_m + sum_n beta_n col_lse_n`` (rho, gamma: the forward's LSEs;
    rho = +inf where alpha = 0). Returns ``(dq (M, D) or None, dk (N, D) or None, dscale (1,) fp32)``."""
    has_col = beta is not None and beta.numel() > 0
    norm = _norm(alpha, beta if has_col else None)
    alpha, rho = alpha.float().contiguous(), rho.float().contiguous()
    if has_col:
        beta, gamma = beta.float().contiguous(), gamma.float().contiguous()
    else:
        beta, gamma = alpha, rho
    mask = col_mask.view(torch.uint8) if col_mask is not None else alpha
    dq, dk, parts = _gradients(
        q, k, scale, norm, norm, 0, (mask, alpha, rho, beta, gamma), False, col_mask is not None, has_col,
        need_q, need_k, tiles,
    )  # fmt: skip
    return dq, dk, parts[:, 0].sum().reshape(1)


@on_tensor_device
def siglip_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    offset: int,
    *,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """``sum_{m,n} -log sigmoid(y_mn (scale q_m.k_n + bias))``, ``y = +1`` iff ``n == m + offset``; fp32 (1,)."""
    M, D = q.shape
    N = k.shape[0]
    t = _tiles("fwd", D, q.dtype, q.device, tiles)
    blocks = triton.cdiv(M, t.block_r)
    spans = _grid(blocks, N, t, q.device, smem_estimate("fwd", t, D, q.element_size()))[1]
    parts = empty((blocks * spans,), torch.float32, q.device)
    _siglip_fwd_kernel[(blocks, spans)](
        q,
        k,
        scale,
        bias,
        parts,
        M,
        N,
        offset,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        spans,
        **_tile_meta(t, q),
    )
    return parts.sum().reshape(1)


@on_tensor_device
def siglip_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    grad: torch.Tensor,
    offset: int,
    need_q: bool = True,
    need_k: bool = True,
    *,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of ``grad * siglip_forward(...)`` (``grad`` a 1-element tensor): ``(dq, dk, dscale (1,), dbias (1,))``."""
    dq, dk, parts = _gradients(q, k, scale, grad, bias, offset, (grad,) * 5, True, False, False, need_q, need_k, tiles)
    return dq, dk, parts[:, 0].sum().reshape(1), parts[:, 1].sum().reshape(1)
