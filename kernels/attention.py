"""Flash attention (FA2 style) forward and backward in Triton, with key padding, varlen and roll-aware rows.

Layouts: fixed length q ``(N, Sq, H, D)``, k/v ``(N, Sk, H, D)``; varlen ``(total, H, D)`` with int32
``cu_seqlens``. Any strides. Each program owns one (block of rows, sequence, head).

Forward: online softmax in base 2 (``log2(e)`` folded into the scale), fp32 accumulators, the row
log-sum-exp (base 2, ``+inf`` for a row with no visible key) saved for the backward, so the S x S
matrix is never stored. Backward: ``delta = rowsum(dO * O)``, then one kernel per key block (dK, dV,
looping over query blocks) and one per query block (dQ, looping over key blocks): no atomics, so the
gradients are bitwise reproducible.

Causal masking is bottom-right aligned like flash-attn: query i sees key j iff ``j <= i + Sk - Sq``.
Roll-aware addressing (All-in-one): with ``SHIFT (S,)`` in ``[0, T)``, sequence ``n = b*T + t`` reads
slot s from batch row ``b*T + (t + SHIFT[s]) % T`` and writes its output (and gradients) there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .utils import empty

LOG2E = 1.4426950408889634


@triton.jit
def _batch_rows(n, offs, mask, SHIFT, T, ROLL: tl.constexpr):
    """Batch index (int64) of the physical row each slot of sequence ``n`` reads."""
    if ROLL:
        sh = tl.load(SHIFT + offs, mask=mask, other=0)
        t = n % T
        return (n - t + (t + sh) % T).to(tl.int64)
    else:
        return tl.zeros_like(offs).to(tl.int64) + n


@triton.jit
def _seq_bounds(CU_Q, CU_K, n, Sq, Sk, VARLEN: tl.constexpr):
    """(first q row, q length, first k row, k length, first logical row of the LSE) of sequence n."""
    if VARLEN:
        q0 = tl.load(CU_Q + n)
        len_q = tl.load(CU_Q + n + 1) - q0
        k0 = tl.load(CU_K + n)
        len_k = tl.load(CU_K + n + 1) - k0
        return q0, len_q, k0, len_k, q0
    else:
        return 0, Sq, 0, Sk, n * Sq


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    KPM,
    SHIFT,
    n,
    T,
    k0,
    len_k,
    start_n,
    offs_m_diag,
    offs_d,
    d_mask,
    skn,
    sks,
    skd,
    svn,
    svs,
    svd,
    smn,
    sms,
    qk_scale,
    MASKED: tl.constexpr,
    ROLL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < len_k
    nb = _batch_rows(n, offs_n, n_mask, SHIFT, T, ROLL)
    k_rows = nb * skn + (k0 + offs_n).to(tl.int64) * sks
    v_rows = nb * svn + (k0 + offs_n).to(tl.int64) * svs
    if MASKED:
        kt = tl.load(K + k_rows[None, :] + offs_d[:, None] * skd, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    else:
        kt = tl.load(K + k_rows[None, :] + offs_d[:, None] * skd, mask=d_mask[:, None], other=0.0)
    qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if MASKED:
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m_diag[:, None])
        if HAS_KPM:
            pad = tl.load(KPM + nb * smn + offs_n * sms, mask=n_mask, other=1)
            keep = keep & (pad == 0)[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    elif HAS_KPM:
        pad = tl.load(KPM + nb * smn + offs_n * sms)
        qk = tl.where((pad == 0)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays exactly 0
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(V + v_rows[:, None] + offs_d[None, :] * svd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        v = tl.load(V + v_rows[:, None] + offs_d[None, :] * svd, mask=d_mask[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


_SIZES = ["H", "T", "Sq", "Sk", "D", "S_BUCKET"]


@triton.jit(do_not_specialize=_SIZES)
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    KPM,
    SHIFT,
    CU_Q,
    CU_K,
    sqn,
    sqs,
    sqh,
    sqd,
    skn,
    sks,
    skh,
    skd,
    svn,
    svs,
    svh,
    svd,
    son,
    sos,
    soh,
    sod,
    smn,
    sms,
    slh,
    H,
    T,
    Sq,
    Sk,
    D,
    qk_scale,
    S_BUCKET,  # autotune key only
    VARLEN: tl.constexpr,
    ROLL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    q0, len_q, k0, len_k, lrow0 = _seq_bounds(CU_Q, CU_K, n, Sq, Sk, VARLEN)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < D
    nb_q = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    q_rows = nb_q * sqn + (q0 + offs_m).to(tl.int64) * sqs
    q = tl.load(
        Q + h.to(tl.int64) * sqh + q_rows[:, None] + offs_d[None, :] * sqd,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    diag = len_k - len_q  # bottom-right causal alignment
    offs_m_diag = offs_m + diag
    # key blocks [0, full) need no bounds/causal mask; [full, hi) do
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M + diag)
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N, len_k // BLOCK_N) * BLOCK_N
    else:
        hi = len_k
        full = len_k // BLOCK_N * BLOCK_N
    hi = tl.where(start_m < len_q, tl.maximum(hi, 0), 0)
    full = tl.minimum(full, hi)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    K_h = K + h.to(tl.int64) * skh
    V_h = V + h.to(tl.int64) * svh
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K_h, V_h, KPM, SHIFT, n, T, k0, len_k, start_n, offs_m_diag, offs_d, d_mask,
            skn, sks, skd, svn, svs, svd, smn, sms, qk_scale,
            False, ROLL, HAS_KPM, CAUSAL, BLOCK_N, PRECISION,
        )  # fmt: skip
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K_h, V_h, KPM, SHIFT, n, T, k0, len_k, start_n, offs_m_diag, offs_d, d_mask,
            skn, sks, skd, svn, svs, svd, smn, sms, qk_scale,
            True, ROLL, HAS_KPM, CAUSAL, BLOCK_N, PRECISION,
        )  # fmt: skip
    empty_row = l_i == 0.0  # no visible key: output 0, LSE +inf (so the backward sees p = 0)
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("inf"), m_i + tl.log2(l_safe))
    o_rows = nb_q * son + (q0 + offs_m).to(tl.int64) * sos
    tl.store(
        O + h.to(tl.int64) * soh + o_rows[:, None] + offs_d[None, :] * sod,
        out.to(O.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(LSE + h.to(tl.int64) * slh + lrow0 + offs_m, lse, mask=m_mask)


@triton.jit(do_not_specialize=["H", "T", "Sq", "D"])
def _attn_bwd_pre(
    O,
    DO,
    DELTA,
    SHIFT,
    CU_Q,
    son,
    sos,
    soh,
    sod,
    sdn,
    sds,
    sdh,
    sdd,
    slh,
    H,
    T,
    Sq,
    D,
    VARLEN: tl.constexpr,
    ROLL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[h, row] = sum_d dO * O (fp32), at the logical rows of the LSE."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    q0, len_q, k0, len_k, lrow0 = _seq_bounds(CU_Q, CU_Q, n, Sq, Sq, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    mask = m_mask[:, None] & (offs_d < D)[None, :]
    nb = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    rows = (q0 + offs_m).to(tl.int64)
    o = tl.load(
        O + h.to(tl.int64) * soh + (nb * son + rows * sos)[:, None] + offs_d[None, :] * sod, mask=mask, other=0.0
    )
    do = tl.load(
        DO + h.to(tl.int64) * sdh + (nb * sdn + rows * sds)[:, None] + offs_d[None, :] * sdd, mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h.to(tl.int64) * slh + lrow0 + offs_m, delta, mask=m_mask)


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    KPM,
    SHIFT,
    CU_Q,
    CU_K,
    sqn,
    sqs,
    sqh,
    sqd,
    skn,
    sks,
    skh,
    skd,
    svn,
    svs,
    svh,
    svd,
    sdon,
    sdos,
    sdoh,
    sdod,
    sdkn,
    sdks,
    sdkh,
    sdkd,
    sdvn,
    sdvs,
    sdvh,
    sdvd,
    smn,
    sms,
    slh,
    H,
    T,
    Sq,
    Sk,
    D,
    qk_scale,
    sm_scale,
    S_BUCKET,  # autotune key only
    VARLEN: tl.constexpr,
    ROLL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV for one block of keys, looping over the query blocks that can see it (transposed tiles)."""
    pid_n = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    q0, len_q, k0, len_k, lrow0 = _seq_bounds(CU_Q, CU_K, n, Sq, Sk, VARLEN)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < len_k
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    nb_k = _batch_rows(n, offs_n, n_mask, SHIFT, T, ROLL)
    krow = (k0 + offs_n).to(tl.int64)
    k = tl.load(
        K + h.to(tl.int64) * skh + (nb_k * skn + krow * sks)[:, None] + offs_d[None, :] * skd, mask=nd_mask, other=0.0
    )
    v = tl.load(
        V + h.to(tl.int64) * svh + (nb_k * svn + krow * svs)[:, None] + offs_d[None, :] * svd, mask=nd_mask, other=0.0
    )
    key_ok = n_mask
    if HAS_KPM:
        pad = tl.load(KPM + nb_k * smn + offs_n * sms, mask=n_mask, other=1)
        key_ok = key_ok & (pad == 0)
    diag = len_k - len_q
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
    else:
        lo = 0
    hi = tl.where(start_n < len_k, len_q, 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    Q_h = Q + h.to(tl.int64) * sqh
    DO_h = DO + h.to(tl.int64) * sdoh
    L_h = LSE + h.to(tl.int64) * slh + lrow0
    D_h = DELTA + h.to(tl.int64) * slh + lrow0
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < len_q
        md_mask = m_mask[:, None] & d_mask[None, :]
        nb_q = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
        qrow = (q0 + offs_m).to(tl.int64)
        q = tl.load(Q_h + (nb_q * sqn + qrow * sqs)[:, None] + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
        do = tl.load(DO_h + (nb_q * sdon + qrow * sdos)[:, None] + offs_d[None, :] * sdod, mask=md_mask, other=0.0)
        lse = tl.load(L_h + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(D_h + offs_m, mask=m_mask, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.exp2(st - lse[None, :])
        keep = key_ok[:, None] & m_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
        pt = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK + h.to(tl.int64) * sdkh + (nb_k * sdkn + krow * sdks)[:, None] + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=nd_mask,
    )
    tl.store(
        DV + h.to(tl.int64) * sdvh + (nb_k * sdvn + krow * sdvs)[:, None] + offs_d[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=nd_mask,
    )


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    KPM,
    SHIFT,
    CU_Q,
    CU_K,
    sqn,
    sqs,
    sqh,
    sqd,
    skn,
    sks,
    skh,
    skd,
    svn,
    svs,
    svh,
    svd,
    sdon,
    sdos,
    sdoh,
    sdod,
    sdqn,
    sdqs,
    sdqh,
    sdqd,
    smn,
    sms,
    slh,
    H,
    T,
    Sq,
    Sk,
    D,
    qk_scale,
    sm_scale,
    S_BUCKET,  # autotune key only
    VARLEN: tl.constexpr,
    ROLL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ for one block of queries, looping over the visible key blocks."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    q0, len_q, k0, len_k, lrow0 = _seq_bounds(CU_Q, CU_K, n, Sq, Sk, VARLEN)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    nb_q = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    qrow = (q0 + offs_m).to(tl.int64)
    q = tl.load(
        Q + h.to(tl.int64) * sqh + (nb_q * sqn + qrow * sqs)[:, None] + offs_d[None, :] * sqd, mask=md_mask, other=0.0
    )
    do = tl.load(
        DO + h.to(tl.int64) * sdoh + (nb_q * sdon + qrow * sdos)[:, None] + offs_d[None, :] * sdod,
        mask=md_mask,
        other=0.0,
    )
    lse = tl.load(LSE + h.to(tl.int64) * slh + lrow0 + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * slh + lrow0 + offs_m, mask=m_mask, other=0.0)
    diag = len_k - len_q
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M + diag)
    else:
        hi = len_k
    hi = tl.where(start_m < len_q, tl.maximum(hi, 0), 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    K_h = K + h.to(tl.int64) * skh
    V_h = V + h.to(tl.int64) * svh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < len_k
        nd_mask = n_mask[:, None] & d_mask[None, :]
        nb_k = _batch_rows(n, offs_n, n_mask, SHIFT, T, ROLL)
        krow = (k0 + offs_n).to(tl.int64)
        k = tl.load(K_h + (nb_k * skn + krow * sks)[:, None] + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
        v = tl.load(V_h + (nb_k * svn + krow * svs)[:, None] + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        keep = n_mask[None, :] & m_mask[:, None]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        if HAS_KPM:
            pad = tl.load(KPM + nb_k * smn + offs_n * sms, mask=n_mask, other=1)
            keep = keep & (pad == 0)[None, :]
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ + h.to(tl.int64) * sdqh + (nb_q * sdqn + qrow * sdqs)[:, None] + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=md_mask,
    )


# ---- configurations --------------------------------------------------------------------------
# The interpreter runs one fixed configuration (each program costs ~ms there: big blocks, few programs).
# On a GPU the launchers autotune over a few FA2-style tilings per (head-dim block, dtype, flags, length
# bucket); configs that do not fit in shared memory are pruned by the autotuner. Not yet measured on a GPU.


def _cfgs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


_KEY = ["S_BUCKET", "BLOCK_D", "VARLEN", "ROLL", "HAS_KPM", "CAUSAL", "PRECISION"]
_FWD_CFGS = _cfgs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)])
_DKDV_CFGS = _cfgs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2)])
_DQ_CFGS = _cfgs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (64, 16, 4, 2)])

if INTERPRET:
    _fwd, _dkdv, _dq = _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq
    _FIXED = {"BLOCK_M": 64, "BLOCK_N": 64}
else:
    _fwd = triton.autotune(_FWD_CFGS, key=_KEY)(_attn_fwd)
    _dkdv = triton.autotune(_DKDV_CFGS, key=_KEY)(_attn_bwd_dkdv)
    _dq = triton.autotune(_DQ_CFGS, key=_KEY)(_attn_bwd_dq)
    _FIXED = {}


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 in the interpreter and when torch's fp32 matmul precision is
    'highest' (its default); tf32 otherwise, like torch's own matmuls. fp16/bf16 use the tensor cores."""
    if dtype != torch.float32:
        return "tf32"  # the default; has no effect on 16-bit inputs
    if INTERPRET or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides; a varlen (total, H, D) tensor has no batch stride."""
    if varlen:
        return (0, *x.stride())
    return tuple(x.stride())


class _Launch:
    """Shapes, flags and per-call arguments shared by the forward and backward launchers."""

    def __init__(self, q, k, kpm, shift, num_frames, cu_q, cu_k, max_q, max_k, causal, scale):
        self.varlen = cu_q is not None
        if self.varlen:
            self.N = cu_q.numel() - 1
            self.Sq, self.Sk = int(max_q), int(max_k)
            self.H, self.D = q.shape[1], q.shape[2]
            self.rows = q.shape[0]
        else:
            self.N, self.Sq, self.H, self.D = q.shape
            self.Sk = k.shape[1]
            self.rows = self.N * self.Sq
        self.dummy = torch.empty(1, dtype=torch.int32, device=q.device)
        self.kpm = kpm.view(torch.uint8) if kpm is not None else self.dummy
        self.smn, self.sms = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
        self.shift = shift if shift is not None else self.dummy
        self.cu_q = cu_q if cu_q is not None else self.dummy
        self.cu_k = cu_k if cu_k is not None else self.dummy
        self.T = int(num_frames)
        self.flags = {
            "VARLEN": self.varlen,
            "ROLL": shift is not None,
            "HAS_KPM": kpm is not None,
            "CAUSAL": bool(causal),
            "BLOCK_D": max(16, triton.next_power_of_2(self.D)),
            "PRECISION": _precision(q.dtype),
        }
        self.scale = float(scale)
        self.bucket = max(64, triton.next_power_of_2(max(self.Sq, self.Sk, 1)))


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    num_frames: int = 1,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``: out contiguous in q's shape and dtype, lse ``(H, rows)`` fp32 in base 2."""
    L = _Launch(
        q, k, key_padding_mask, shift, num_frames, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
    )
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((L.H, L.rows), torch.float32, q.device)
    if out.numel() == 0 or L.N == 0 or L.Sq == 0:
        return out, lse
    vl = L.varlen
    grid = lambda meta: (triton.cdiv(L.Sq, meta["BLOCK_M"]), L.N * L.H)
    _fwd[grid](
        q, k, v, out, lse, L.kpm, L.shift, L.cu_q, L.cu_k,
        *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(out, vl), L.smn, L.sms, lse.stride(0),
        L.H, L.T, L.Sq, L.Sk, L.D, L.scale * LOG2E, L.bucket,
        **L.flags, **_FIXED,
    )  # fmt: skip
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    num_frames: int = 1,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns contiguous ``(dq, dk, dv)``; deterministic (no atomics)."""
    L = _Launch(
        q, k, key_padding_mask, shift, num_frames, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
    )
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    if L.N == 0 or L.H == 0 or L.D == 0:
        return dq, dk, dv
    vl = L.varlen
    delta = empty((L.H, L.rows), torch.float32, q.device)
    BLOCK_D = L.flags["BLOCK_D"]
    if L.Sq > 0:
        pre_m = 64 if INTERPRET else max(16, min(128, 8192 // BLOCK_D))
        _attn_bwd_pre[(triton.cdiv(L.Sq, pre_m), L.N * L.H)](
            out, dout, delta, L.shift, L.cu_q,
            *_strides(out, vl), *_strides(dout, vl), delta.stride(0), L.H, L.T, L.Sq, L.D,
            VARLEN=vl, ROLL=L.flags["ROLL"], BLOCK_M=pre_m, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    common = (L.smn, L.sms, lse.stride(0), L.H, L.T, L.Sq, L.Sk, L.D, L.scale * LOG2E, L.scale, L.bucket)
    if L.Sk > 0:
        _dkdv[(lambda meta: (triton.cdiv(L.Sk, meta["BLOCK_N"]), L.N * L.H))](
            q, k, v, dout, dk, dv, lse, delta, L.kpm, L.shift, L.cu_q, L.cu_k,
            *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(dout, vl),
            *_strides(dk, vl), *_strides(dv, vl), *common,
            **L.flags, **_FIXED,
        )  # fmt: skip
    if L.Sq > 0:
        _dq[(lambda meta: (triton.cdiv(L.Sq, meta["BLOCK_M"]), L.N * L.H))](
            q, k, v, dout, dq, lse, delta, L.kpm, L.shift, L.cu_q, L.cu_k,
            *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(dout, vl), *_strides(dq, vl), *common,
            **L.flags, **_FIXED,
        )  # fmt: skip
    return dq, dk, dv


__all__ = ["LOG2E", "attention_backward", "attention_forward"]
