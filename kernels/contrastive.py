"""Contrastive-loss kernels: tiles of ``X = scale * Q K^T`` live in registers only, never in memory.

Log-sum-exp pair (CLIP / InfoNCE, MIL-NCE), for ``q (M, D)``, ``k (N, D)``:
  ``lse_forward``   row LSE (over the columns ``col_mask`` keeps) and, when ``symmetric``, column LSE
                    (over all rows). Each program walks its row blocks over every column tile with an
                    online row LSE; the column LSE of its own rows is folded into a private
                    ``(programs, N)`` fp32 slot (read-modify-write, no races, merged on the host), so
                    memory is O(programs * N), never O(M * N).
  ``lse_backward``  the gradient of ``sum(alpha * row_lse) + sum(beta * col_lse)``:
                    ``G = alpha_m [mask_n] exp(X - rho_m) + beta_n exp(X - gamma_n)`` recomputed per
                    tile; ``dq = s G k`` (row-major kernel, which also sums ``G * QK^T`` for d scale) and
                    ``dk = s G^T q`` (column-major kernel).
SigLIP: the same tiling for ``sum softplus(-y (s QK^T + bias))``, ``y = +1`` on ``n == m + offset``.

Every product accumulates in fp32 whatever the input dtype. The probabilities fed to the second
matmul are cast to the input dtype (tensor cores), times ``P_SCALE`` (1024 for fp16, to keep
small probabilities out of fp16's subnormal range). Logits and LSEs stay in natural units; each
exponent ``x - m`` is formed before the base-2 scaling (``exp2((x - m) * log2 e)``) so no rounding of a
large ``x * log2 e`` is added to PyTorch's own.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .utils import empty

MAX_D = 512  # the backward keeps (BLOCK, D) operand and accumulator tiles in registers


# ---- shared tile helpers -------------------------------------------------------------------


@triton.jit
def _qk_tile(
    q_ptr,
    k_ptr,
    rows,
    cols,
    rm,
    cn,
    D,
    sqm,
    sqd,
    skn,
    skd,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Raw fp32 dot products q[rows] . k[cols] as a (BLOCK_M, BLOCK_N) tile, D walked in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        qt = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd, mask=rm[:, None] & dm[None, :], other=0.0
        )
        kt = tl.load(
            k_ptr + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd, mask=cn[:, None] & dm[None, :], other=0.0
        )
        acc = tl.dot(qt, tl.trans(kt), acc, input_precision=PREC)
    return acc


@triton.jit
def _log(x):
    """Natural log with log(0) = -inf, without evaluating log2(0)."""
    return tl.where(x > 0, tl.log2(tl.where(x > 0, x, 1.0)) * 0.6931471805599453, float("-inf"))


@triton.jit
def _safe(m):
    """A finite stand-in for a running max that is still -inf (no element seen), so exp2(x - m) is 0, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _lse_weights(dot, s, a, r, b, g, cvalid, valid, HAS_COL: tl.constexpr):
    """G / max|alpha, beta| for one tile: alpha_m exp(X - rho_m) on kept columns (+ beta_n exp(X - gamma_n)).
    X - rho is formed in natural units before the base-2 scaling (PyTorch's rounding, not worse)."""
    x = dot * s
    p = tl.where(cvalid[None, :], a[:, None] * tl.exp2((x - r[:, None]) * 1.4426950408889634), 0.0)
    if HAS_COL:
        p += b[None, :] * tl.exp2((x - g[None, :]) * 1.4426950408889634)
    return tl.where(valid, p, 0.0)


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
    D,
    sqm,
    sqd,
    skn,
    skd,
    n_prog,
    HAS_MASK: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    num_rb = tl.cdiv(M, BLOCK_M)
    slot = colp_ptr + pid.to(tl.int64) * N
    for rb in range(pid, num_rb, n_prog):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < M
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cn = cols < N
            x = _qk_tile(q_ptr, k_ptr, rows, cols, rm, cn, D, sqm, sqd, skn, skd, PREC, BLOCK_M, BLOCK_N, BLOCK_D) * s
            keep = cn
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + cols, mask=cn, other=0) != 0)
            xr = tl.where(keep[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(xr, 1))
            ms = _safe(m_new)
            l_i = l_i * tl.exp2((m_i - ms) * 1.4426950408889634) + tl.sum(
                tl.exp2((xr - ms[:, None]) * 1.4426950408889634), 1
            )
            m_i = m_new
            if SYMMETRIC:
                xc = tl.where(rm[:, None], x, float("-inf"))
                cs = _safe(tl.max(xc, 0))
                tile = cs + _log(tl.sum(tl.exp2((xc - cs[None, :]) * 1.4426950408889634), 0))
                old = tl.load(slot + cols, mask=cn, other=float("-inf"))
                hi = _safe(tl.maximum(old, tile))
                both = tl.exp2((old - hi) * 1.4426950408889634) + tl.exp2((tile - hi) * 1.4426950408889634)
                tl.store(slot + cols, hi + _log(both), mask=cn)
        tl.store(row_ptr + rows, m_i + _log(l_i), mask=rm)


# ---- log-sum-exp backward ------------------------------------------------------------------


@triton.jit
def _lse_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    norm_ptr,
    mask_ptr,
    alpha_ptr,
    rho_ptr,
    beta_ptr,
    gamma_ptr,
    dq_ptr,
    ds_ptr,
    M,
    N,
    D,
    sqm,
    sqd,
    skn,
    skd,
    HAS_MASK: tl.constexpr,
    HAS_COL: tl.constexpr,
    NEED_DQ: tl.constexpr,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    inv = 1.0 / tl.load(norm_ptr).to(tl.float32)  # weights are divided by max|alpha, beta| before the cast
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    qt = tl.load(q_ptr + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd, mask=rm[:, None] & dm[None, :], other=0.0)
    a = tl.load(alpha_ptr + rows, mask=rm, other=0.0).to(tl.float32) * inv
    r = tl.load(rho_ptr + rows, mask=rm, other=float("inf")).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cn = cols < N
        kt = tl.load(
            k_ptr + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd, mask=cn[:, None] & dm[None, :], other=0.0
        )
        dot = tl.dot(qt, tl.trans(kt), input_precision=PREC)
        keep = cn
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + cols, mask=cn, other=0) != 0)
        b = tl.zeros([BLOCK_N], dtype=tl.float32)
        g = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_COL:
            b = tl.load(beta_ptr + cols, mask=cn, other=0.0).to(tl.float32) * inv
            g = tl.load(gamma_ptr + cols, mask=cn, other=float("inf")).to(tl.float32)
        p = _lse_weights(dot, s, a, r, b, g, keep, rm[:, None] & cn[None, :], HAS_COL)
        ds += tl.sum(p * dot, 1)
        if NEED_DQ:
            acc = tl.dot((p * P_SCALE).to(kt.dtype), kt, acc, input_precision=PREC)
    nrm = tl.load(norm_ptr).to(tl.float32)
    tl.store(ds_ptr + pid, tl.sum(ds, 0) * nrm)
    if NEED_DQ:
        dq = acc * (s * nrm / P_SCALE)
        tl.store(
            dq_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
            dq.to(dq_ptr.dtype.element_ty),
            mask=rm[:, None] & dm[None, :],
        )


@triton.jit
def _lse_bwd_dk_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    norm_ptr,
    mask_ptr,
    alpha_ptr,
    rho_ptr,
    beta_ptr,
    gamma_ptr,
    dk_ptr,
    M,
    N,
    D,
    sqm,
    sqd,
    skn,
    skd,
    HAS_MASK: tl.constexpr,
    HAS_COL: tl.constexpr,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    inv = 1.0 / tl.load(norm_ptr).to(tl.float32)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cn = cols < N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    kt = tl.load(k_ptr + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd, mask=cn[:, None] & dm[None, :], other=0.0)
    keep = cn
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + cols, mask=cn, other=0) != 0)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    g = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_COL:
        b = tl.load(beta_ptr + cols, mask=cn, other=0.0).to(tl.float32) * inv
        g = tl.load(gamma_ptr + cols, mask=cn, other=float("inf")).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < M
        qt = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd, mask=rm[:, None] & dm[None, :], other=0.0
        )
        a = tl.load(alpha_ptr + rows, mask=rm, other=0.0).to(tl.float32) * inv
        r = tl.load(rho_ptr + rows, mask=rm, other=float("inf")).to(tl.float32)
        dot = tl.dot(qt, tl.trans(kt), input_precision=PREC)
        p = _lse_weights(dot, s, a, r, b, g, keep, rm[:, None] & cn[None, :], HAS_COL)
        acc = tl.dot(tl.trans((p * P_SCALE).to(qt.dtype)), qt, acc, input_precision=PREC)
    dk = acc * (s * tl.load(norm_ptr).to(tl.float32) / P_SCALE)
    tl.store(
        dk_ptr + cols.to(tl.int64)[:, None] * D + d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=cn[:, None] & dm[None, :],
    )


# ---- SigLIP --------------------------------------------------------------------------------


@triton.jit
def _siglip_fwd_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    D,
    offset,
    sqm,
    sqd,
    skn,
    skd,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cn = cols < N
        x = (
            _qk_tile(q_ptr, k_ptr, rows, cols, rm, cn, D, sqm, sqd, skn, skd, PREC, BLOCK_M, BLOCK_N, BLOCK_D) * s
            + bias
        )
        z = tl.where(cols[None, :] == rows[:, None] + offset, x, -x)
        # -log sigmoid(z) = max(-z, 0) + log1p(exp(-|z|)); log1p(e) = log(u) * e / (u - 1), u = 1 + e
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        l1p = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        v = tl.maximum(-z, 0.0) + l1p
        total += tl.sum(tl.where(rm[:, None] & cn[None, :], v, 0.0), 1)
    tl.store(out_ptr + pid, tl.sum(total, 0))


@triton.jit
def _siglip_weights(dot, s, bias, rows, cols, offset, valid):
    """d(-log sigmoid(z))/dx = -y sigmoid(-z) with z = y x, y = +1 on the positives."""
    x = dot * s + bias
    pos = cols[None, :] == rows[:, None] + offset
    z = tl.where(pos, x, -x)
    e = tl.exp(-tl.abs(z))
    sg = tl.where(z > 0, e, 1.0) / (1.0 + e)  # sigmoid(-z) without overflow
    return tl.where(valid, tl.where(pos, -sg, sg), 0.0)


@triton.jit
def _siglip_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    grad_ptr,
    dq_ptr,
    part_ptr,
    M,
    N,
    D,
    offset,
    sqm,
    sqd,
    skn,
    skd,
    NEED_DQ: tl.constexpr,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    qt = tl.load(q_ptr + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd, mask=rm[:, None] & dm[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cn = cols < N
        kt = tl.load(
            k_ptr + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd, mask=cn[:, None] & dm[None, :], other=0.0
        )
        dot = tl.dot(qt, tl.trans(kt), input_precision=PREC)
        p = _siglip_weights(dot, s, bias, rows, cols, offset, rm[:, None] & cn[None, :])
        ds += tl.sum(p * dot, 1)
        db += tl.sum(p, 1)
        if NEED_DQ:
            acc = tl.dot((p * P_SCALE).to(kt.dtype), kt, acc, input_precision=PREC)
    g = tl.load(grad_ptr).to(tl.float32)
    tl.store(part_ptr + 2 * pid, tl.sum(ds, 0) * g)
    tl.store(part_ptr + 2 * pid + 1, tl.sum(db, 0) * g)
    if NEED_DQ:
        dq = acc * (s * g / P_SCALE)
        tl.store(
            dq_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
            dq.to(dq_ptr.dtype.element_ty),
            mask=rm[:, None] & dm[None, :],
        )


@triton.jit
def _siglip_bwd_dk_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    bias_ptr,
    grad_ptr,
    dk_ptr,
    M,
    N,
    D,
    offset,
    sqm,
    sqd,
    skn,
    skd,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cn = cols < N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    kt = tl.load(k_ptr + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd, mask=cn[:, None] & dm[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < M
        qt = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd, mask=rm[:, None] & dm[None, :], other=0.0
        )
        dot = tl.dot(qt, tl.trans(kt), input_precision=PREC)
        p = _siglip_weights(dot, s, bias, rows, cols, offset, rm[:, None] & cn[None, :])
        acc = tl.dot(tl.trans((p * P_SCALE).to(qt.dtype)), qt, acc, input_precision=PREC)
    dk = acc * (s * tl.load(grad_ptr).to(tl.float32) / P_SCALE)
    tl.store(
        dk_ptr + cols.to(tl.int64)[:, None] * D + d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=cn[:, None] & dm[None, :],
    )


# ---- host launchers ------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only when PyTorch's matmuls may (torch.backends.cuda.matmul.allow_tf32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _p_scale(dtype: torch.dtype) -> float:
    return 1024.0 if dtype == torch.float16 else 1.0


def _config(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a feature width D (untuned heuristics for sm80/sm90)."""
    d_pad = max(16, triton.next_power_of_2(D))
    if INTERPRET:  # few, large programs: the interpreter pays per operation, not per element
        return 128, 128, d_pad, 4
    if d_pad <= 128:
        return 128, 64, d_pad, 8
    if d_pad <= 256:
        return 64, 64, d_pad, 8
    return 32, 64, d_pad, 8


def _max_programs(device: torch.device) -> int:
    """Programs of the persistent forward (each owns a (programs, N) column-LSE slot): 2 per SM."""
    if INTERPRET or device.type != "cuda":
        return 2  # small, so the persistent loop is exercised under the interpreter
    return _sm_programs(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_programs(index: int) -> int:
    return 2 * torch.cuda.get_device_properties(index).multi_processor_count


def lse_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, col_mask: torch.Tensor | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row LSE ``(M,)`` of ``scale * q k^T`` over the columns ``col_mask (N,)`` keeps, and column LSE ``(N,)``
    over all rows when ``symmetric`` (else an empty tensor). q ``(M, D)``, k ``(N, D)`` fp16/bf16/fp32, any
    strides; ``scale`` a 1-element tensor; outputs fp32."""
    M, D = q.shape
    N = k.shape[0]
    row = empty((M,), torch.float32, q.device)
    if col_mask is not None:
        col_mask = col_mask.view(torch.uint8)
    BM, BN, _, warps = _config(D)
    BD = min(64, max(16, triton.next_power_of_2(D)))
    n_prog = max(1, min(triton.cdiv(M, BM), _max_programs(q.device)))
    colp = torch.full((n_prog, N) if symmetric else (1, 1), float("-inf"), dtype=torch.float32, device=q.device)
    _lse_fwd_kernel[(n_prog,)](
        q,
        k,
        scale,
        col_mask if col_mask is not None else row,
        row,
        colp,
        M,
        N,
        D,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        n_prog,
        HAS_MASK=col_mask is not None,
        SYMMETRIC=symmetric,
        PREC=_prec(q.dtype),
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_D=BD,
        num_warps=warps,
    )
    if not symmetric:
        return row, torch.empty(0, dtype=torch.float32, device=q.device)
    return row, torch.logsumexp(colp, dim=0)


def _norm(*ws: torch.Tensor | None) -> torch.Tensor:
    """max |w| over the weight vectors (1 if all zero), a device tensor: no host sync."""
    m = torch.stack([w.abs().max().float() for w in ws if w is not None and w.numel()])
    m = m.max()
    return torch.where(m > 0, m, torch.ones_like(m)).reshape(1)


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of ``sum_m alpha_m row_lse_m + sum_n beta_n col_lse_n`` (rho, gamma: the forward's LSEs;
    rho = +inf where alpha = 0). Returns ``(dq (M, D) or None, dk (N, D) or None, dscale (1,) fp32)``."""
    M, D = q.shape
    N = k.shape[0]
    BM, BN, BD, warps = _config(D)
    has_col = beta is not None and beta.numel() > 0
    norm = _norm(alpha, beta if has_col else None)
    alpha, rho = alpha.float().contiguous(), rho.float().contiguous()
    if has_col:
        beta, gamma = beta.float().contiguous(), gamma.float().contiguous()
    dq = empty((M, D), q.dtype, q.device) if need_q else None
    parts = empty((triton.cdiv(M, BM),), torch.float32, q.device)
    mask = col_mask.view(torch.uint8) if col_mask is not None else alpha
    common = dict(HAS_MASK=col_mask is not None, HAS_COL=has_col, PREC=_prec(q.dtype), P_SCALE=_p_scale(q.dtype))
    _lse_bwd_dq_kernel[(triton.cdiv(M, BM),)](
        q,
        k,
        scale,
        norm,
        mask,
        alpha,
        rho,
        beta if has_col else alpha,
        gamma if has_col else rho,
        dq if need_q else parts,
        parts,
        M,
        N,
        D,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        NEED_DQ=need_q,
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_D=BD,
        num_warps=warps,
        **common,
    )
    dk = None
    if need_k:
        dk = empty((N, D), k.dtype, k.device)
        _lse_bwd_dk_kernel[(triton.cdiv(N, BN),)](
            q,
            k,
            scale,
            norm,
            mask,
            alpha,
            rho,
            beta if has_col else alpha,
            gamma if has_col else rho,
            dk,
            M,
            N,
            D,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            BLOCK_M=BM,
            BLOCK_N=BN,
            BLOCK_D=BD,
            num_warps=warps,
            **common,
        )
    return dq, dk, parts.sum().reshape(1)


def siglip_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int
) -> torch.Tensor:
    """``sum_{m,n} -log sigmoid(y_mn (scale q_m.k_n + bias))``, ``y = +1`` iff ``n == m + offset``; fp32 (1,)."""
    M, D = q.shape
    N = k.shape[0]
    BM, BN, _, warps = _config(D)
    BD = min(64, max(16, triton.next_power_of_2(D)))
    parts = empty((triton.cdiv(M, BM),), torch.float32, q.device)
    _siglip_fwd_kernel[(triton.cdiv(M, BM),)](
        q,
        k,
        scale,
        bias,
        parts,
        M,
        N,
        D,
        offset,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        PREC=_prec(q.dtype),
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_D=BD,
        num_warps=warps,
    )
    return parts.sum().reshape(1)


def siglip_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    grad: torch.Tensor,
    offset: int,
    need_q: bool = True,
    need_k: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of ``grad * siglip_forward(...)`` (``grad`` a 1-element tensor): ``(dq, dk, dscale (1,), dbias (1,))``."""
    M, D = q.shape
    N = k.shape[0]
    BM, BN, BD, warps = _config(D)
    common = dict(PREC=_prec(q.dtype), P_SCALE=_p_scale(q.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps)
    dq = empty((M, D), q.dtype, q.device) if need_q else None
    parts = empty((triton.cdiv(M, BM), 2), torch.float32, q.device)
    _siglip_bwd_dq_kernel[(triton.cdiv(M, BM),)](
        q,
        k,
        scale,
        bias,
        grad,
        dq if need_q else parts,
        parts,
        M,
        N,
        D,
        offset,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        NEED_DQ=need_q,
        **common,
    )
    dk = None
    if need_k:
        dk = empty((N, D), k.dtype, k.device)
        _siglip_bwd_dk_kernel[(triton.cdiv(N, BN),)](
            q,
            k,
            scale,
            bias,
            grad,
            dk,
            M,
            N,
            D,
            offset,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            **common,
        )
    return dq, dk, parts[:, 0].sum().reshape(1), parts[:, 1].sum().reshape(1)
