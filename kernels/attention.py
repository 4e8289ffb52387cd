"""Flash attention (FA2 style) forward and backward in Triton, with key padding, varlen and roll-aware rows.

Layouts: fixed length q ``(N, Sq, H, D)``, k/v ``(N, Sk, H, D)``; varlen ``(total, H, D)`` with int32
``cu_seqlens``. Any strides. Each program owns one (block of rows, sequence, head).

Forward: online softmax in base 2 (``log2(e)`` folded into the scale), fp32 accumulators, the row
log-sum-exp (base 2, ``+inf`` for a row with no visible key) saved for the backward, so the S x S
matrix is never stored.

Backward: ``delta = rowsum(dO * O)`` first (that kernel also zeroes the fp32 dQ accumulator), then one
program per key block that loops over the query blocks seeing it: it keeps dK, dV in registers and adds
each query block's share of dQ into the fp32 accumulator with atomics, so q, k, v and dO are read once.
Atomics make dQ's summation order vary from run to run; ``deterministic=True`` instead runs that kernel
without dQ and a second kernel per query block that loops over the key blocks for dQ (no atomics: bitwise
repeatable, at the cost of reading q, k, v and dO a second time).

The head dim is a compile-time constant (``HEAD_DIM``) padded to ``BLOCK_D``, a power of two; when they are
equal (D in {16, 32, 64, 128}) tiles load with no mask along D: with unit stride along D, row strides that are
multiples of 16 and 16-byte aligned pointers (which Triton specialises on), each tile row is one run of
16-byte vectors, loaded with cp.async in the loops and pipelined over ``num_stages``. Other D stay correct
through the mask, with narrower loads.

Causal masking is bottom-right aligned like flash-attn: query i sees key j iff ``j <= i + Sk - Sq``.
Roll-aware addressing (All-in-one): with ``SHIFT (S,)`` in ``[0, T)``, sequence ``n = b*T + t`` reads
slot s from batch row ``b*T + (t + SHIFT[s]) % T`` and writes its output (and gradients) there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .utils import device_of, empty, on_tensor_device

LOG2E = 1.4426950408889634


# ---- shared device helpers ----------------------------------------------------------------------


@triton.jit
def _sequence(H, CU_Q, CU_K, Sq, Sk, VARLEN: tl.constexpr):
    """This program's (sequence n, head h, first q row, q length, first k row, k length, first LSE row)."""
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    if VARLEN:
        q0 = tl.load(CU_Q + n)
        len_q = tl.load(CU_Q + n + 1) - q0
        k0 = tl.load(CU_K + n)
        len_k = tl.load(CU_K + n + 1) - k0
        lrow0 = q0
    else:
        q0 = 0
        len_q = Sq
        k0 = 0
        len_k = Sk
        lrow0 = n * Sq
    return n, h, q0, len_q, k0, len_k, lrow0


@triton.jit
def _batch_rows(n, offs, mask, SHIFT, T, ROLL: tl.constexpr):
    """Batch index (int64) of the physical row each slot of sequence ``n`` reads."""
    if ROLL:
        t = n % T
        frame = t + tl.load(SHIFT + offs, mask=mask, other=0)  # in [0, 2T): SHIFT is in [0, T)
        frame = tl.where(frame >= T, frame - T, frame)
        return (n - t + frame).to(tl.int64)
    else:
        return tl.zeros_like(offs).to(tl.int64) + n


@triton.jit
def _rows(nb, row0, offs, sn, ss):
    """Element offset (int64) of each row: batch row ``nb``, sequence row ``row0 + offs``."""
    return nb * sn + (row0 + offs).to(tl.int64) * ss


@triton.jit
def _load_tile(ptr, rows, offs_d, sd, row_mask, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A ``(rows, BLOCK_D)`` tile; zeros outside the rows in ``row_mask`` (when MASK_ROWS) and past HEAD_DIM.
    With ``BLOCK_D == HEAD_DIM`` and no row mask the load has no mask at all."""
    ptrs = ptr + rows[:, None] + offs_d[None, :] * sd
    if offs_d.shape[0] == HEAD_DIM:
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        d_mask = offs_d < HEAD_DIM
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return tile


@triton.jit
def _tile_mask(offs_d, row_mask, HEAD_DIM: tl.constexpr):
    """``(rows, BLOCK_D)`` store / atomic mask: the rows in ``row_mask``, the columns below HEAD_DIM."""
    if offs_d.shape[0] == HEAD_DIM:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _store_tile(ptr, rows, offs_d, sd, row_mask, value, HEAD_DIM: tl.constexpr):
    ptrs = ptr + rows[:, None] + offs_d[None, :] * sd
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=_tile_mask(offs_d, row_mask, HEAD_DIM))


@triton.jit
def _key_visible(offs_n, n_mask, nb, KPM, smn, sms, HAS_KPM: tl.constexpr):
    """(BLOCK_N,) bool: key in range and not padded."""
    ok = n_mask
    if HAS_KPM:
        pad = tl.load(KPM + nb * smn + offs_n * sms, mask=n_mask, other=1)
        ok = ok & (pad == 0)
    return ok


@triton.jit
def _key_bias(ptrs, k0, offs_n, n_mask, sbs):
    """(BLOCK_N,) fp32 bias of each key times log2(e); ``ptrs`` point at each key's (batch row, head)."""
    return tl.load(ptrs + (k0 + offs_n).to(tl.int64) * sbs, mask=n_mask, other=0.0) * 1.4426950408889634


@triton.jit
def _tanh(x):
    """tanh by exp2, saturating to +-1 (no inf / inf)."""
    e = tl.exp2(tl.minimum(tl.abs(x), 30.0) * 2.8853900817779268)  # exp(2|x|)
    t = 1.0 - 2.0 / (e + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dropout_keep(seed, drop_base, qi, kj, Sk, p_drop):
    """Broadcast bool: attention dropout keeps (query ``qi``, key ``kj``) of the (sequence, head) whose first
    logical row is ``drop_base`` (``(n * H + h) * Sq``): Philox at offset ``(drop_base + qi) * Sk + kj``, the same
    draw in the forward and both backward kernels."""
    return tl.rand(seed, (drop_base + qi) * Sk + kj) >= p_drop


@triton.jit
def _modify(s, qi, kj, bias, slope, diag, cap2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The score features on base-2 scores ``s = scale * log2(e) * q.k`` (``qi``, ``kj`` broadcastable row / key
    indices, ``bias`` broadcastable, all in base 2): softcap ``cap2 * tanh(s / cap2)`` (``cap2 = softcap *
    log2(e)``), ALiBi ``- slope * |qi + diag - kj|``, key bias. Returns (scores, tanh or s)."""
    t = s
    if SOFTCAP:
        t = _tanh(s / cap2)
        s = cap2 * t
    if ALIBI:
        s = s - slope * tl.abs(qi + diag - kj).to(tl.float32)
    if HAS_BIAS:
        s = s + bias
    return s, t


@triton.jit
def _window_visible(qi, kj, diag, left, right, n_text, f_len, f_win, WINDOW: tl.constexpr, FRAMES: tl.constexpr,
                    TEMPORAL: tl.constexpr):  # fmt: skip
    """Broadcast bool: key ``kj`` inside query ``qi``'s sliding window (``left``/``right`` bounds; unbounded ones
    come as lengths no index reaches) and frame-block rule (``n_text`` text tokens, frames of ``f_len``, window
    ``f_win``)."""
    ok = (qi >= 0) & (kj >= 0)
    if WINDOW:
        ok = ok & (kj >= qi + diag - left) & (kj <= qi + diag + right)
    if FRAMES:
        rq = tl.maximum(qi - n_text, 0)
        rk = tl.maximum(kj - n_text, 0)
        near = tl.abs(rq // f_len - rk // f_len) <= f_win
        if TEMPORAL:
            near = near & (rq % f_len == rk % f_len)
        ok = ok & ((qi < n_text) | (kj < n_text) | near)
    return ok


@triton.jit
def _span(m0, m_len, n_len, diag, left, right, n_text, f_len, f_win, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
          WINDOW: tl.constexpr, FRAMES: tl.constexpr, KEYS: tl.constexpr):  # fmt: skip
    """The blocks of the other side a block of rows ``[m0, m0 + m_len)`` can see, as loop bounds: ``(text_hi,
    lo, hi)``: blocks ``[0, text_hi)`` (the text tokens, with frame blocks) and ``[lo, hi)``, both multiples of
    BLOCK, disjoint; the other side has ``n_len`` rows. KEYS: rows are queries (a forward / dQ pass), else
    keys (the dK, dV pass: the query range that sees them). Whole blocks outside the window are never visited."""
    m1 = m0 + m_len - 1  # last row of the block
    lo = m0 * 0
    hi = m0 * 0 + n_len
    if KEYS:
        if CAUSAL:
            hi = tl.minimum(hi, m1 + diag + 1)
        if WINDOW:
            lo = tl.maximum(lo, m0 + diag - left)
            hi = tl.minimum(hi, m1 + diag + right + 1)
    else:
        if CAUSAL:
            lo = tl.maximum(lo, m0 - diag)
        if WINDOW:
            lo = tl.maximum(lo, m0 - diag - right)
            hi = tl.minimum(hi, m1 - diag + left + 1)
    text_hi = m0 * 0
    if FRAMES:
        if m0 >= n_text:  # a block of video rows: the frames within f_win of its own, plus the text block(s)
            lo = tl.maximum(lo, n_text + ((m0 - n_text) // f_len - f_win) * f_len)
            hi = tl.minimum(hi, n_text + ((m1 - n_text) // f_len + f_win + 1) * f_len)
            text_hi = tl.minimum((n_text + BLOCK - 1) // BLOCK * BLOCK, (hi + BLOCK - 1) // BLOCK * BLOCK)
            lo = tl.maximum(lo, text_hi)
    lo = lo // BLOCK * BLOCK
    hi = tl.where(m_len > 0, tl.maximum(hi, 0), 0)
    text_hi = tl.where(m_len > 0, text_hi, 0)
    return text_hi, lo, hi


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, K, V, KPM, BIAS, SHIFT, n, T, k0, len_k, start_n, offs_m, offs_m_diag, offs_d,
    skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
    seed, p_drop, drop_base, Sk,
    MASKED: tl.constexpr, ROLL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    FRAMES: tl.constexpr, TEMPORAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax. MASKED: the block may hold keys past the end or, with CAUSAL,
    keys some rows must not see (blocks before it need neither check)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < len_k
    nb = _batch_rows(n, offs_n, n_mask, SHIFT, T, ROLL)
    k = _load_tile(K, _rows(nb, k0, offs_n, skn, sks), offs_d, skd, n_mask, MASKED, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if SOFTCAP or ALIBI or HAS_BIAS:
        bias = 0.0
        if HAS_BIAS:
            bias = _key_bias(BIAS + nb * sbn, k0, offs_n, n_mask, sbs)[None, :]
        qk, _t = _modify(qk, offs_m[:, None], offs_n[None, :], bias, slope, diag, cap2, SOFTCAP, ALIBI, HAS_BIAS)
    if MASKED:
        keep = _key_visible(offs_n, n_mask, nb, KPM, smn, sms, HAS_KPM)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m_diag[:, None])
        if WINDOW or FRAMES:
            keep = keep & _window_visible(offs_m[:, None], offs_n[None, :], diag, left, right, n_text, f_len, f_win, WINDOW,
                                          FRAMES, TEMPORAL)  # fmt: skip
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
    v = _load_tile(V, _rows(nb, k0, offs_n, svn, svs), offs_d, svd, n_mask, MASKED, HEAD_DIM)
    if DROPOUT:  # the normaliser l_i sums the undropped weights; the values see the kept ones, scaled
        kept = _dropout_keep(seed, drop_base, offs_m[:, None], offs_n[None, :], Sk, p_drop)
        p = tl.where(kept, p / (1.0 - p_drop), 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


_SIZES = ["H", "T", "Sq", "Sk", "S_BUCKET"]


@triton.jit(do_not_specialize=_SIZES)
def _attn_fwd(
    Q, K, V, O, LSE, KPM, SHIFT, CU_Q, CU_K, BIAS, ALIBI_S,
    sqn, sqs, sqh, sqd, skn, sks, skh, skd, svn, svs, svh, svd, son, sos, soh, sod, smn, sms, slh,
    sbn, sbh, sbs, san, sah,
    H, T, Sq, Sk, qk_scale, GROUP, cap2, left, right, n_text, f_len, f_win, seed, p_drop,
    S_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ROLL: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    WINDOW: tl.constexpr, FRAMES: tl.constexpr, TEMPORAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    n, h, q0, len_q, k0, len_k, lrow0 = _sequence(H, CU_Q, CU_K, Sq, Sk, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    nb_q = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    q = _load_tile(Q + h.to(tl.int64) * sqh, _rows(nb_q, q0, offs_m, sqn, sqs), offs_d, sqd, m_mask, True, HEAD_DIM)
    diag = len_k - len_q  # bottom-right causal alignment
    offs_m_diag = offs_m + diag
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hk = (h // GROUP).to(tl.int64)  # GQA: this head's k/v head
    drop_base = (n * H + h).to(tl.int64) * Sq
    K_h = K + hk * skh
    V_h = V + hk * svh
    B_h = BIAS + h.to(tl.int64) * sbh
    slope = 0.0
    if ALIBI:
        slope = tl.load(ALIBI_S + n * san + h * sah) * 1.4426950408889634
    if WINDOW or FRAMES:
        # only the key blocks inside the window: the text block(s), then the window's span, all masked
        text_hi, lo, hi = _span(start_m, tl.minimum(BLOCK_M, len_q - start_m), len_k, diag, left, right, n_text, f_len, f_win,
                                BLOCK_N, CAUSAL, WINDOW, FRAMES, True)  # fmt: skip
        if FRAMES:
            for start_n in range(0, text_hi, BLOCK_N):
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, offs_m_diag, offs_d,
                    skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
                    seed, p_drop, drop_base, Sk,
                    True, ROLL, HAS_KPM, CAUSAL, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES, TEMPORAL, DROPOUT,
                    BLOCK_N, HEAD_DIM, PRECISION,
                )  # fmt: skip
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, offs_m_diag, offs_d,
                skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
                seed, p_drop, drop_base, Sk,
                True, ROLL, HAS_KPM, CAUSAL, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES, TEMPORAL, DROPOUT,
                BLOCK_N, HEAD_DIM, PRECISION,
            )  # fmt: skip
    else:
        # key blocks [0, full) need no bounds/causal mask; [full, hi) do
        if CAUSAL:
            hi = tl.minimum(len_k, start_m + BLOCK_M + diag)
            full = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N, len_k // BLOCK_N) * BLOCK_N
        else:
            hi = len_k
            full = len_k // BLOCK_N * BLOCK_N
        hi = tl.where(start_m < len_q, tl.maximum(hi, 0), 0)
        full = tl.minimum(full, hi)
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, offs_m_diag, offs_d,
                skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
                seed, p_drop, drop_base, Sk,
                False, ROLL, HAS_KPM, CAUSAL, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES, TEMPORAL, DROPOUT,
                BLOCK_N, HEAD_DIM, PRECISION,
            )  # fmt: skip
        for start_n in range(full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, offs_m_diag, offs_d,
                skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
                seed, p_drop, drop_base, Sk,
                True, ROLL, HAS_KPM, CAUSAL, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES, TEMPORAL, DROPOUT,
                BLOCK_N, HEAD_DIM, PRECISION,
            )  # fmt: skip
    empty_row = l_i == 0.0  # no visible key: output 0, LSE +inf (so the backward sees p = 0)
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("inf"), m_i + tl.log2(l_safe))
    _store_tile(O + h.to(tl.int64) * soh, _rows(nb_q, q0, offs_m, son, sos), offs_d, sod, m_mask, out, HEAD_DIM)
    tl.store(LSE + h.to(tl.int64) * slh + lrow0 + offs_m, lse, mask=m_mask)


# ---- backward -----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "T", "Sq"])
def _attn_bwd_pre(
    O, DO, DELTA, DQ_ACC, SHIFT, CU_Q,
    son, sos, soh, sod, sdn, sds, sdh, sdd, san, sas, sah, sad, slh,
    H, T, Sq,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ROLL: tl.constexpr, ZERO_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta[h, row] = sum_d dO * O (fp32), at the logical rows of the LSE; ZERO_DQ: dq_acc[rows] = 0."""
    n, h, q0, len_q, k0, len_k, lrow0 = _sequence(H, CU_Q, CU_Q, Sq, Sq, VARLEN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    nb = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    hh = h.to(tl.int64)
    o = _load_tile(O + hh * soh, _rows(nb, q0, offs_m, son, sos), offs_d, sod, m_mask, True, HEAD_DIM)
    do = _load_tile(DO + hh * sdh, _rows(nb, q0, offs_m, sdn, sds), offs_d, sdd, m_mask, True, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + hh * slh + lrow0 + offs_m, delta, mask=m_mask)
    if ZERO_DQ:
        zero = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        _store_tile(DQ_ACC + hh * sah, _rows(nb, q0, offs_m, san, sas), offs_d, sad, m_mask, zero, HEAD_DIM)


@triton.jit(do_not_specialize=["H", "Sq"])
def _attn_bwd_dq_cast(
    DQ_ACC, DQ, CU_Q, san, sas, sah, sad, sqn, sqs, sqh, sqd, H, Sq,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dq = dq_acc in dq's dtype, row by row (physical rows: the roll does not matter here)."""
    n, h, q0, len_q, k0, len_k, lrow0 = _sequence(H, CU_Q, CU_Q, Sq, Sq, VARLEN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    nb = tl.zeros_like(offs_m).to(tl.int64) + n
    hh = h.to(tl.int64)
    acc = _load_tile(DQ_ACC + hh * sah, _rows(nb, q0, offs_m, san, sas), offs_d, sad, m_mask, True, HEAD_DIM)
    _store_tile(DQ + hh * sqh, _rows(nb, q0, offs_m, sqn, sqs), offs_d, sqd, m_mask, acc, HEAD_DIM)


@triton.jit
def _bwd_kv_block(
    dk, dv, dbias, k, v, key_ok, bias, Q_h, DO_h, DQ_h, L_h, D_h, SHIFT, n, T, q0, len_q, start_m, offs_n, offs_d,
    sqn, sqs, sqd, sdon, sdos, sdod, san, sas, sad, qk_scale, sm_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
    seed, p_drop, drop_base, Sk,
    ROLL: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, FRAMES: tl.constexpr,
    TEMPORAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One query block's share of dK, dV (and dQ, the key bias's gradient) for a block of keys."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_mask = offs_m < len_q
    nb_q = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    q = _load_tile(Q_h, _rows(nb_q, q0, offs_m, sqn, sqs), offs_d, sqd, m_mask, True, HEAD_DIM)
    do = _load_tile(DO_h, _rows(nb_q, q0, offs_m, sdon, sdos), offs_d, sdod, m_mask, True, HEAD_DIM)
    lse = tl.load(L_h + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(D_h + offs_m, mask=m_mask, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    t = st
    if SOFTCAP or ALIBI or HAS_BIAS:
        st, t = _modify(st, offs_m[None, :], offs_n[:, None], bias, slope, diag, cap2, SOFTCAP, ALIBI, HAS_BIAS)
    pt = tl.exp2(st - lse[None, :])
    keep = key_ok[:, None] & m_mask[None, :]
    if CAUSAL:
        keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
    if WINDOW or FRAMES:
        keep = keep & _window_visible(offs_m[None, :], offs_n[:, None], diag, left, right, n_text, f_len, f_win, WINDOW, FRAMES,
                                      TEMPORAL)  # fmt: skip
    pt = tl.where(keep, pt, 0.0)
    if DROPOUT:  # dV sees the kept weights, dP the kept entries (both scaled); dS = P (dP - delta)
        kept = _dropout_keep(seed, drop_base, offs_m[None, :], offs_n[:, None], Sk, p_drop)
        dv = tl.dot(tl.where(kept, pt / (1.0 - p_drop), 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.where(kept, tl.dot(v, tl.trans(do), input_precision=PRECISION) / (1.0 - p_drop), 0.0)
    else:
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    if HAS_BIAS:
        dbias += tl.sum(dst, 1)
    if SOFTCAP:
        dst = dst * (1.0 - t * t)
    dst = dst.to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION) * sm_scale
        dq_ptrs = DQ_h + _rows(nb_q, q0, offs_m, san, sas)[:, None] + offs_d[None, :] * sad
        tl.atomic_add(dq_ptrs, dq, mask=_tile_mask(offs_d, m_mask, HEAD_DIM), sem="relaxed")
    return dk, dv, dbias


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_kv(
    Q, K, V, DO, DK, DV, DQ_ACC, LSE, DELTA, KPM, SHIFT, CU_Q, CU_K, BIAS, DBIAS, ALIBI_S,
    sqn, sqs, sqh, sqd, skn, sks, skh, skd, svn, svs, svh, svd, sdon, sdos, sdoh, sdod,
    sdkn, sdks, sdkh, sdkd, sdvn, sdvs, sdvh, sdvd, san, sas, sah, sad, smn, sms, slh,
    sbn, sbh, sbs, sgn, sgh, sal_n, sal_h,
    H, T, Sq, Sk, qk_scale, sm_scale, GROUP, cap2, left, right, n_text, f_len, f_win, seed, p_drop,
    S_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ROLL: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    WINDOW: tl.constexpr, FRAMES: tl.constexpr, TEMPORAL: tl.constexpr, DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV of one block of keys for one q head (GQA: of the k/v head ``h // GROUP`` it reads), looping over the
    query blocks that can see it, in transposed tiles (keys on rows): ``P^T = exp2(K Q^T * scale - lse)``,
    ``dV += n_text^T dO``, ``dS^T = n_text^T (V dO^T - delta)``, ``dK += dS^T Q``; ATOMIC_DQ: also ``dQ[rows] += scale dS K``
    into the fp32 accumulator; HAS_BIAS: ``dbias[h, key] = sum over queries of dS`` (per q head)."""
    n, h, q0, len_q, k0, len_k, lrow0 = _sequence(H, CU_Q, CU_K, Sq, Sk, VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < len_k
    nb_k = _batch_rows(n, offs_n, n_mask, SHIFT, T, ROLL)
    hh = h.to(tl.int64)
    hk = (h // GROUP).to(tl.int64)  # GQA: the k/v head this q head reads
    k = _load_tile(K + hk * skh, _rows(nb_k, k0, offs_n, skn, sks), offs_d, skd, n_mask, True, HEAD_DIM)
    v = _load_tile(V + hk * svh, _rows(nb_k, k0, offs_n, svn, svs), offs_d, svd, n_mask, True, HEAD_DIM)
    key_ok = _key_visible(offs_n, n_mask, nb_k, KPM, smn, sms, HAS_KPM)
    diag = len_k - len_q
    if WINDOW or FRAMES:
        text_hi, lo, hi = _span(start_n, tl.minimum(BLOCK_N, len_k - start_n), len_q, diag, left, right, n_text,
                                f_len, f_win, BLOCK_M, CAUSAL, WINDOW, FRAMES, False)  # fmt: skip
    else:
        text_hi = 0
        if CAUSAL:
            lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        else:
            lo = 0
        hi = tl.where(start_n < len_k, len_q, 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    Q_h = Q + hh * sqh
    DO_h = DO + hh * sdoh
    DQ_h = DQ_ACC + hh * sah
    L_h = LSE + hh * slh + lrow0
    D_h = DELTA + hh * slh + lrow0
    drop_base = (n * H + h).to(tl.int64) * Sq
    dbias = tl.zeros([BLOCK_N], tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = _key_bias(BIAS + nb_k * sbn + hh * sbh, k0, offs_n, n_mask, sbs)[:, None]
    slope = 0.0
    if ALIBI:
        slope = tl.load(ALIBI_S + n * sal_n + h * sal_h) * 1.4426950408889634
    if FRAMES:
        for start_m in range(0, text_hi, BLOCK_M):
            dk, dv, dbias = _bwd_kv_block(
                dk, dv, dbias, k, v, key_ok, bias, Q_h, DO_h, DQ_h, L_h, D_h, SHIFT, n, T, q0, len_q, start_m, offs_n,
                offs_d, sqn, sqs, sqd, sdon, sdos, sdod, san, sas, sad, qk_scale, sm_scale, slope, cap2, diag, left,
                right, n_text, f_len, f_win, seed, p_drop, drop_base, Sk, ROLL, CAUSAL, ATOMIC_DQ, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES,
                TEMPORAL, DROPOUT, BLOCK_M, HEAD_DIM, PRECISION,
            )  # fmt: skip
    for start_m in range(lo, hi, BLOCK_M):
        dk, dv, dbias = _bwd_kv_block(
            dk, dv, dbias, k, v, key_ok, bias, Q_h, DO_h, DQ_h, L_h, D_h, SHIFT, n, T, q0, len_q, start_m, offs_n,
            offs_d, sqn, sqs, sqd, sdon, sdos, sdod, san, sas, sad, qk_scale, sm_scale, slope, cap2, diag, left,
            right, n_text, f_len, f_win, seed, p_drop, drop_base, Sk, ROLL, CAUSAL, ATOMIC_DQ, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES,
            TEMPORAL, DROPOUT, BLOCK_M, HEAD_DIM, PRECISION,
        )  # fmt: skip
    if HAS_BIAS:
        tl.store(DBIAS + nb_k * sgn + hh * sgh + (k0 + offs_n).to(tl.int64), dbias, mask=n_mask)
    # dK, dV of this q head: into dk / dv (GROUP == 1) or a per-q-head fp32 scratch the launcher sums per group
    _store_tile(DK + hh * sdkh, _rows(nb_k, k0, offs_n, sdkn, sdks), offs_d, sdkd, n_mask, dk * sm_scale, HEAD_DIM)
    _store_tile(DV + hh * sdvh, _rows(nb_k, k0, offs_n, sdvn, sdvs), offs_d, sdvd, n_mask, dv, HEAD_DIM)


@triton.jit
def _bwd_q_block(
    dq, q, do, lse, delta, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, m_mask, offs_d,
    skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
    seed, p_drop, drop_base, Sk,
    ROLL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, FRAMES: tl.constexpr,
    TEMPORAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block's share of dQ (the deterministic backward)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < len_k
    nb_k = _batch_rows(n, offs_n, n_mask, SHIFT, T, ROLL)
    k = _load_tile(K_h, _rows(nb_k, k0, offs_n, skn, sks), offs_d, skd, n_mask, True, HEAD_DIM)
    v = _load_tile(V_h, _rows(nb_k, k0, offs_n, svn, svs), offs_d, svd, n_mask, True, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    t = s
    if SOFTCAP or ALIBI or HAS_BIAS:
        bias = 0.0
        if HAS_BIAS:
            bias = _key_bias(B_h + nb_k * sbn, k0, offs_n, n_mask, sbs)[None, :]
        s, t = _modify(s, offs_m[:, None], offs_n[None, :], bias, slope, diag, cap2, SOFTCAP, ALIBI, HAS_BIAS)
    p = tl.exp2(s - lse[:, None])
    keep = _key_visible(offs_n, n_mask, nb_k, KPM, smn, sms, HAS_KPM)[None, :] & m_mask[:, None]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
    if WINDOW or FRAMES:
        keep = keep & _window_visible(offs_m[:, None], offs_n[None, :], diag, left, right, n_text, f_len, f_win, WINDOW, FRAMES,
                                      TEMPORAL)  # fmt: skip
    p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        kept = _dropout_keep(seed, drop_base, offs_m[:, None], offs_n[None, :], Sk, p_drop)
        dp = tl.where(kept, dp / (1.0 - p_drop), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_q(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, SHIFT, CU_Q, CU_K, BIAS, ALIBI_S,
    sqn, sqs, sqh, sqd, skn, sks, skh, skd, svn, svs, svh, svd, sdon, sdos, sdoh, sdod,
    sdqn, sdqs, sdqh, sdqd, smn, sms, slh, sbn, sbh, sbs, sal_n, sal_h,
    H, T, Sq, Sk, qk_scale, sm_scale, GROUP, cap2, left, right, n_text, f_len, f_win, seed, p_drop,
    S_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ROLL: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    WINDOW: tl.constexpr, FRAMES: tl.constexpr, TEMPORAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ of one block of queries, looping over the visible key blocks (the deterministic backward)."""
    n, h, q0, len_q, k0, len_k, lrow0 = _sequence(H, CU_Q, CU_K, Sq, Sk, VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    nb_q = _batch_rows(n, offs_m, m_mask, SHIFT, T, ROLL)
    hh = h.to(tl.int64)
    q = _load_tile(Q + hh * sqh, _rows(nb_q, q0, offs_m, sqn, sqs), offs_d, sqd, m_mask, True, HEAD_DIM)
    do = _load_tile(DO + hh * sdoh, _rows(nb_q, q0, offs_m, sdon, sdos), offs_d, sdod, m_mask, True, HEAD_DIM)
    lse = tl.load(LSE + hh * slh + lrow0 + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + hh * slh + lrow0 + offs_m, mask=m_mask, other=0.0)
    diag = len_k - len_q
    if WINDOW or FRAMES:
        text_hi, lo, hi = _span(start_m, tl.minimum(BLOCK_M, len_q - start_m), len_k, diag, left, right, n_text, f_len, f_win,
                                BLOCK_N, CAUSAL, WINDOW, FRAMES, True)  # fmt: skip
    else:
        text_hi = 0
        lo = 0
        if CAUSAL:
            hi = tl.minimum(len_k, start_m + BLOCK_M + diag)
        else:
            hi = len_k
        hi = tl.where(start_m < len_q, tl.maximum(hi, 0), 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hk = (h // GROUP).to(tl.int64)
    K_h = K + hk * skh
    V_h = V + hk * svh
    B_h = BIAS + hh * sbh
    drop_base = (n * H + h).to(tl.int64) * Sq
    slope = 0.0
    if ALIBI:
        slope = tl.load(ALIBI_S + n * sal_n + h * sal_h) * 1.4426950408889634
    if FRAMES:
        for start_n in range(0, text_hi, BLOCK_N):
            dq = _bwd_q_block(
                dq, q, do, lse, delta, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, m_mask, offs_d,
                skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
                seed, p_drop, drop_base, Sk,
                ROLL, HAS_KPM, CAUSAL, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES, TEMPORAL, DROPOUT, BLOCK_N, HEAD_DIM, PRECISION,
            )  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        dq = _bwd_q_block(
            dq, q, do, lse, delta, K_h, V_h, KPM, B_h, SHIFT, n, T, k0, len_k, start_n, offs_m, m_mask, offs_d,
            skn, sks, skd, svn, svs, svd, smn, sms, sbn, sbs, qk_scale, slope, cap2, diag, left, right, n_text, f_len, f_win,
            seed, p_drop, drop_base, Sk,
            ROLL, HAS_KPM, CAUSAL, HAS_BIAS, SOFTCAP, ALIBI, WINDOW, FRAMES, TEMPORAL, DROPOUT, BLOCK_N, HEAD_DIM, PRECISION,
        )  # fmt: skip
    _store_tile(DQ + hh * sdqh, _rows(nb_q, q0, offs_m, sdqn, sdqs), offs_d, sdqd, m_mask, dq * sm_scale, HEAD_DIM)


# ---- configurations --------------------------------------------------------------------------
# The interpreter runs one fixed tiling (each program costs ~ms there: big blocks, few programs). On a GPU
# each launcher autotunes over a short list of tilings per (kernel, dot class, BLOCK_D, gather): FA2/FA3-style
# Hopper tiles (128-row query tiles in the forward; in the backward every bf16/fp16 dot has >= 64 rows per
# warpgroup, so all of them lower to wgmma). Every listed tiling was compiled for sm_90a at D = BLOCK_D
# (and D = 96), with and without key padding + roll offsets + causal, and uses no more than 227 KB of shared
# memory and spills no register (``python -m benchmarks.attention_sm90 --configs`` prints the figures).
# "gather" (roll offsets or key padding) costs 20-60 registers a thread (row indices and the padding mask
# are loaded per key block), so some tilings are listed only without it. Before a launch the list is also
# pruned to the tilings whose shared-memory estimate fits (a guard for the device, not the tuning).
# fp32: tf32 dots where torch's float32 matmul precision allows; otherwise exact fp32 dots, which run on the
# FMA units and hold whole operand rows in registers: one small tiling each, compiling in seconds.
# A tiling: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts query rows, BLOCK_N key rows.

Tiling = tuple[int, int, int, int]
_TILES: dict[tuple[str, str, int, bool], list[Tiling]] = {}
_SMALL_D, _ALL_D = (16, 32, 64), (16, 32, 64, 128)


def _tiles(kernel: str, cls: str, block_ds, tiles: list[Tiling], gather: list[Tiling] | None = None) -> None:
    for bd in block_ds:
        _TILES[(kernel, cls, bd, False)] = tiles
        _TILES[(kernel, cls, bd, True)] = tiles if gather is None else gather


# forward
_tiles(
    "fwd",
    "16",
    _SMALL_D,
    [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
    [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
)
_tiles(
    "fwd",
    "16",
    (128,),
    [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
)
# fused backward (dK, dV, atomic dQ): the dQ dot has BLOCK_M rows, so BLOCK_M >= 64 for wgmma
_tiles("kv_dq", "16", _SMALL_D, [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)])
_tiles("kv_dq", "16", (128,), [(64, 64, 8, 2), (64, 64, 8, 3)], [(64, 64, 8, 3)])
# deterministic backward: dK, dV per key block, then dQ per query block
_tiles("kv", "16", _SMALL_D, [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)])
_tiles("kv", "16", (128,), [(64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2)])
_tiles("q", "16", _SMALL_D, [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)])
_tiles("q", "16", (128,), [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2)])
# fp32, tf32 dots
for _k in ("fwd", "kv_dq", "q"):
    _tiles(_k, "tf32", _ALL_D, [(64, 32, 8, 2)])
_tiles("kv", "tf32", _ALL_D, [(32, 64, 8, 2)])
# fp32, exact dots
_tiles("fwd", "ieee", _ALL_D, [(32, 16, 8, 2)])
for _k in ("kv", "q"):
    _tiles(_k, "ieee", _ALL_D, [(32, 32, 8, 2)])
_tiles("kv_dq", "ieee", _SMALL_D, [(32, 32, 8, 2)])
_tiles("kv_dq", "ieee", (128,), [(16, 32, 4, 2)])

_INTERPRET_TILES = {"BLOCK_M": 64, "BLOCK_N": 64}
SMEM_LIMIT = 227 * 1024  # sm_90's shared memory per block


def _config(t: Tiling) -> triton.Config:
    m, n, w, s = t
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _dot_class(dtype: torch.dtype, precision: str) -> str:
    return "16" if dtype in (torch.float16, torch.bfloat16) else precision


def gpu_configs(
    kernel: str, dtype: torch.dtype, head_dim: int, *, gather: bool = False, precision: str = "ieee"
) -> list[triton.Config]:
    """The tilings a GPU launch autotunes over for ``kernel`` (``'fwd'``; ``'kv_dq'``, the fused backward;
    ``'kv'`` and ``'q'``, the deterministic backward) at ``dtype`` and ``head_dim``, before the shared-memory
    guard. ``gather``: with roll offsets or a key padding mask. ``precision``: fp32's dot precision
    (``'ieee'`` or ``'tf32'``)."""
    key = (kernel, _dot_class(dtype, precision), _block_d(head_dim), gather)
    return [_config(t) for t in _TILES[key]]


def tilings(kernel: str) -> list[triton.Config]:
    """Every distinct tiling ``kernel`` may run on a GPU (any dtype, head dim or flags)."""
    return [_config(t) for t in sorted({t for key, ts in _TILES.items() if key[0] == kernel for t in ts})]


def smem_estimate(kernel: str, config: triton.Config, block_d: int, elem: int) -> int:
    """Shared memory (bytes) ``kernel`` needs with ``config`` by the sm_90 compiles: the dot operands it stages,
    the pipelined ones ``num_stages`` deep, plus the dS tile and a second copy of K for the atomic dQ dot."""
    m, n, s = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    small = 2048  # LSE, delta, masks, barriers
    if kernel == "fwd":  # q resident; k, v pipelined
        return (m * block_d + 2 * s * n * block_d) * elem + small
    if kernel == "q":  # q, dO resident; k, v pipelined
        return (2 * m * block_d + 2 * s * n * block_d) * elem + small
    kv = (2 * n * block_d + 2 * s * m * block_d) * elem + small  # k, v resident; q, dO pipelined
    return kv if kernel == "kv" else kv + (n * block_d + 2 * m * n) * elem


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        dtype = named_args["Q"].dtype
        bd = kwargs["BLOCK_D"]
        features = ("ROLL", "HAS_KPM", "HAS_BIAS", "SOFTCAP", "ALIBI", "WINDOW", "FRAMES", "DROPOUT")
        gather = any(kwargs[f] for f in features)
        cands = [_config(t) for t in _TILES[(kernel, _dot_class(dtype, kwargs["PRECISION"]), bd, gather)]]
        fit = [c for c in cands if smem_estimate(kernel, c, bd, dtype.itemsize) <= SMEM_LIMIT]
        return fit or cands[-1:]

    return prune


def _autotuned(fn, kernel: str, **extra):
    key = [
        "S_BUCKET",
        "HEAD_DIM",
        "VARLEN",
        "ROLL",
        "HAS_KPM",
        "CAUSAL",
        "PRECISION",
        "HAS_BIAS",
        "SOFTCAP",
        "ALIBI",
        "WINDOW",
        "FRAMES",
        "TEMPORAL",
        "GROUP",
    ]
    return triton.autotune(tilings(kernel), key=key, prune_configs_by={"early_config_prune": _pruner(kernel)},
                           **extra)(fn)  # fmt: skip


if INTERPRET:
    _fwd, _kv_dq, _kv, _q = _attn_fwd, _attn_bwd_kv, _attn_bwd_kv, _attn_bwd_q
else:
    _fwd = _autotuned(_attn_fwd, "fwd")
    # timing a tiling re-runs the kernel: its atomics must start from zero each time
    _kv_dq = _autotuned(_attn_bwd_kv, "kv_dq", reset_to_zero=["DQ_ACC"])
    _kv = _autotuned(_attn_bwd_kv, "kv")
    _q = _autotuned(_attn_bwd_q, "q")


def _run(tuned, raw, grid, args, flags, config: triton.Config | None) -> None:
    """Launch with ``config`` when given (the GPU tiling forced, also in the interpreter), else the
    interpreter's fixed tiling or the autotuner."""
    if config is not None:
        raw[grid](*args, **flags, **config.all_kwargs())
    elif INTERPRET:
        raw[grid](*args, **flags, **_INTERPRET_TILES)
    else:
        tuned[grid](*args, **flags)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 in the interpreter and when torch's fp32 matmul precision is
    'highest' (its default); tf32 otherwise, like torch's own matmuls. fp16/bf16 use the tensor cores."""
    if dtype != torch.float32:
        return "tf32"  # the default; has no effect on 16-bit inputs
    if INTERPRET or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides; a varlen (total, H, D) tensor has no batch stride."""
    if varlen:
        return (0, *x.stride())
    return tuple(x.stride())


def _row_block(block_d: int, elem: int) -> int:
    """Rows per program of the elementwise backward kernels (delta, the dQ cast): 16 KB tiles."""
    return 64 if INTERPRET else max(16, min(128, 16384 // (block_d * elem)))


class _Launch:
    """Shapes, flags and per-call arguments shared by the forward and backward launchers."""

    def __init__(self, q, k, scale, causal, kpm, shift, num_frames, cu_q, cu_k, max_q, max_k, features):
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
        self.Hk = k.shape[-2]
        self.group = self.H // self.Hk
        self.dummy = torch.empty(1, dtype=torch.int32, device=q.device)
        self.kpm = kpm.view(torch.uint8) if kpm is not None else self.dummy
        self.smn, self.sms = (kpm.stride(0), kpm.stride(1)) if kpm is not None else (0, 0)
        self.shift = shift if shift is not None else self.dummy
        self.cu_q = cu_q if cu_q is not None else self.dummy
        self.cu_k = cu_k if cu_k is not None else self.dummy
        self.T = int(num_frames)
        self.block_d = _block_d(self.D)
        f = features
        bias, alibi = f.key_bias, f.alibi_slopes
        self.bias = bias if bias is not None else self.dummy.float()
        self.bias_strides = (0 if self.varlen else bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2)) if bias is not None \
            else (0, 0, 0)  # fmt: skip
        self.alibi = alibi if alibi is not None else self.dummy.float()
        self.alibi_strides = (alibi.stride(0) if alibi.shape[0] > 1 else 0, alibi.stride(1)) if alibi is not None \
            else (0, 0)  # fmt: skip
        unbounded = self.Sq + self.Sk + 1  # a window bound no index difference reaches
        left, right = f.window
        frames = f.frame_tokens > 0
        F = max(1, f.frame_tokens)
        W = f.frame_window if f.frame_window >= 0 else self.Sk // F + 1
        self.extra = (
            self.group, float(f.softcap) * LOG2E, left if left >= 0 else unbounded,
            right if right >= 0 else unbounded, f.text_tokens, F, W, int(f.seed), float(f.dropout_p),
        )  # fmt: skip
        self.flags = {
            "HEAD_DIM": self.D,
            "VARLEN": self.varlen,
            "ROLL": shift is not None,
            "HAS_KPM": kpm is not None,
            "CAUSAL": bool(causal),
            "HAS_BIAS": bias is not None,
            "SOFTCAP": f.softcap > 0,
            "ALIBI": alibi is not None,
            "WINDOW": left >= 0 or right >= 0,
            "FRAMES": frames,
            "TEMPORAL": frames and f.temporal,
            "DROPOUT": f.dropout_p > 0,
            "BLOCK_D": self.block_d,
            "PRECISION": _precision(q.dtype),
        }
        self.scale = float(scale)
        self.bucket = max(64, triton.next_power_of_2(max(self.Sq, self.Sk, 1)))


@dataclasses.dataclass(frozen=True)
class Features:
    """The score features and windows of one call: ``key_bias`` fp32 ``(N, Hb, Sk)`` (varlen ``(1, Hb,
    total_k)``), Hb in {1, H}: added to the scores of each key (addressed like k: roll-aware); ``window=(left, right)``: flash-attn's sliding window (-1 = unbounded);
    ``softcap > 0``: ``softcap * tanh(s / softcap)``; ``alibi_slopes`` fp32 ``(Na, H)``, Na in {1, N}:
    ``- slope * |i + Sk - Sq - j|``; ``frame_tokens > 0``: frame blocks (``text_tokens`` leading tokens see and
    are seen by all; video tokens see the frames within ``frame_window`` of their own, -1 = all; ``temporal``:
    the same spatial position only); ``dropout_p > 0``: attention dropout drawn by Philox from ``seed`` at each
    (sequence, head, query, key) (:func:`dropout_mask` returns it), regenerated in the backward. k, v may have
    ``H_k`` heads dividing H (GQA). With a window or frame blocks only the key blocks inside it are visited."""

    key_bias: torch.Tensor | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    frame_tokens: int = 0
    frame_window: int = -1
    text_tokens: int = 0
    temporal: bool = False
    dropout_p: float = 0.0
    seed: int = 0


@on_tensor_device
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
    features: Features = Features(),
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward. q ``(N, Sq, H, D)`` / k, v ``(N, Sk, H_k, D)``, or varlen ``(total, H, D)`` with int32
    ``cu_seqlens_q/k (batch + 1,)``; fp16 / bf16 / fp32, any strides; ``key_padding_mask (N, Sk)`` bool (True =
    padded); ``shift (S,)`` int32 in ``[0, num_frames)``: roll-aware rows. ``features``: :class:`Features`.
    ``config``: run this tiling (one of :func:`gpu_configs`) instead of autotuning. Returns ``(out, lse)``: out
    contiguous in q's shape and dtype, lse ``(H, rows)`` fp32 in base 2."""
    L = _Launch(
        q, k, scale, causal, key_padding_mask, shift, num_frames, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, features,
    )  # fmt: skip
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((L.H, L.rows), torch.float32, q.device)
    if out.numel() == 0 or L.N == 0 or L.Sq == 0:
        return out, lse
    vl = L.varlen
    args = (
        q, k, v, out, lse, L.kpm, L.shift, L.cu_q, L.cu_k, L.bias, L.alibi,
        *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(out, vl), L.smn, L.sms, lse.stride(0),
        *L.bias_strides, *L.alibi_strides, L.H, L.T, L.Sq, L.Sk, L.scale * LOG2E, *L.extra, L.bucket,
    )  # fmt: skip
    _run(_fwd, _attn_fwd, lambda meta: (triton.cdiv(L.Sq, meta["BLOCK_M"]), L.N * L.H), args, L.flags, config)
    return out, lse


def _out_arg(name: str, given: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if given is None:
        return empty(like.shape, like.dtype, like.device)
    if not isinstance(given, torch.Tensor):
        raise TypeError(f"attention_backward: argument '{name}' must be a tensor, got {type(given).__name__}")
    if given.shape != like.shape or given.dtype != like.dtype or given.device != like.device:
        raise ValueError(
            f"attention_backward: argument '{name}' must have shape {tuple(like.shape)}, dtype {like.dtype} and "
            f"device {like.device}, got {tuple(given.shape)}, {given.dtype}, {given.device}"
        )
    return given


@on_tensor_device
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
    features: Features = Features(),
    deterministic: bool = False,
    dlse: torch.Tensor | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    config: Mapping[str, triton.Config] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Attention backward: ``(dq, dk, dv)`` in the shapes and dtypes of q, k, v, and with a key bias
    ``(dq, dk, dv, dbias)``, dbias fp32 in the bias's shape.

    Arguments as :func:`attention_forward`, plus ``dout`` (q's shape) and the forward's ``out`` and ``lse``.
    ``deterministic``: bitwise-repeatable gradients (a separate dQ pass instead of fp32 atomics).
    ``dlse (H, rows)``: the gradient of the natural-log LSE, when the caller uses it: ``d lse_i / d s_ij = P_ij``,
    so it enters as ``dS = P (dP - delta + dlse)``, i.e. ``delta -= dlse``.
    ``dq``, ``dk``, ``dv``: optional outputs to write into, any strides (e.g. the three views
    ``g[:, :, i]`` of one ``(N, S, 3, H, D)`` gradient of a packed qkv); fresh contiguous tensors otherwise.
    ``config``: tilings to run instead of autotuning, by kernel (``'kv_dq'``, or ``'kv'`` and ``'q'`` when
    deterministic; see :func:`gpu_configs`)."""
    L = _Launch(
        q, k, scale, causal, key_padding_mask, shift, num_frames, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, features,
    )  # fmt: skip
    dq = _out_arg("dq", dq, q)
    dk = _out_arg("dk", dk, k)
    dv = _out_arg("dv", dv, v)
    bias = features.key_bias
    # dbias per q head (one writer per element: the program of its key block and k/v head), summed below
    dbias = None
    if bias is not None:
        dbias = empty((bias.shape[0], L.H, bias.shape[2]), torch.float32, q.device)
    if L.N == 0 or L.H == 0 or L.D == 0:
        return (dq, dk, dv) if bias is None else (dq, dk, dv, torch.zeros_like(bias, dtype=torch.float32))
    config = config or {}
    vl = L.varlen
    atomic = not deterministic and L.Sk > 0
    # the fp32 dQ accumulator: dq itself when fp32, else a contiguous scratch cast into dq at the end
    dq_acc = dq if not atomic or dq.dtype == torch.float32 else empty(q.shape, torch.float32, q.device)
    delta = empty((L.H, L.rows), torch.float32, q.device)
    rows_m = _row_block(L.block_d, q.element_size())
    if L.Sq > 0:
        _attn_bwd_pre[(triton.cdiv(L.Sq, rows_m), L.N * L.H)](
            out, dout, delta, dq_acc, L.shift, L.cu_q,
            *_strides(out, vl), *_strides(dout, vl), *_strides(dq_acc, vl), delta.stride(0), L.H, L.T, L.Sq,
            HEAD_DIM=L.D, VARLEN=vl, ROLL=L.flags["ROLL"], ZERO_DQ=atomic, BLOCK_M=rows_m, BLOCK_D=L.block_d,
        )  # fmt: skip
    if dlse is not None and L.Sq > 0:
        delta.sub_(dlse)
    sizes = (L.smn, L.sms, lse.stride(0), *L.bias_strides)
    tail = (L.H, L.T, L.Sq, L.Sk, L.scale * LOG2E, L.scale, *L.extra, L.bucket)
    # GQA: dK, dV per q head in fp32, summed over each group of q heads after the kernel
    dk_h = dk if L.group == 1 else empty((*k.shape[:-2], L.H, L.D), torch.float32, q.device)
    dv_h = dv if L.group == 1 else empty((*v.shape[:-2], L.H, L.D), torch.float32, q.device)
    if L.Sk > 0:
        kv = _kv_dq if atomic else _kv
        g_strides = (0 if vl else dbias.stride(0), dbias.stride(1)) if dbias is not None else (0, 0)
        args = (
            q, k, v, dout, dk_h, dv_h, dq_acc, lse, delta, L.kpm, L.shift, L.cu_q, L.cu_k, L.bias,
            dbias if dbias is not None else L.dummy.float(), L.alibi,
            *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(dout, vl),
            *_strides(dk_h, vl), *_strides(dv_h, vl), *_strides(dq_acc, vl), *sizes, *g_strides, *L.alibi_strides,
            *tail,
        )  # fmt: skip
        grid = lambda meta: (triton.cdiv(L.Sk, meta["BLOCK_N"]), L.N * L.H)
        flags = dict(L.flags, ATOMIC_DQ=atomic)
        _run(kv, _attn_bwd_kv, grid, args, flags, config.get("kv_dq" if atomic else "kv"))
    if L.Sq > 0 and not atomic:
        args = (
            q, k, v, dout, dq, lse, delta, L.kpm, L.shift, L.cu_q, L.cu_k, L.bias, L.alibi,
            *_strides(q, vl), *_strides(k, vl), *_strides(v, vl), *_strides(dout, vl), *_strides(dq, vl), *sizes,
            *L.alibi_strides, *tail,
        )  # fmt: skip
        _run(_q, _attn_bwd_q, lambda meta: (triton.cdiv(L.Sq, meta["BLOCK_M"]), L.N * L.H), args, L.flags,
             config.get("q"))  # fmt: skip
    if atomic and dq_acc is not dq and L.Sq > 0:
        # physical rows: a varlen tensor is one sequence of `total` rows here
        n_seq, s_rows = (1, q.shape[0]) if vl else (L.N, L.Sq)
        acc_st = (0, *dq_acc.stride()) if vl else dq_acc.stride()
        dq_st = (0, *dq.stride()) if vl else dq.stride()
        _attn_bwd_dq_cast[(triton.cdiv(s_rows, rows_m), n_seq * L.H)](
            dq_acc, dq, L.cu_q, *acc_st, *dq_st, L.H, s_rows,
            HEAD_DIM=L.D, VARLEN=False, BLOCK_M=rows_m, BLOCK_D=L.block_d,
        )  # fmt: skip
    if L.group > 1:
        for grad, per_head in ((dk, dk_h), (dv, dv_h)):
            if L.Sk > 0:
                grad.copy_(per_head.unflatten(-2, (L.Hk, L.group)).sum(-2))
            else:
                grad.zero_()
    if bias is None:
        return dq, dk, dv
    if L.Sk == 0:
        dbias.zero_()
    return dq, dk, dv, dbias if bias.shape[1] == L.H else dbias.sum(1, keepdim=True)


# ---- attention rows ------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "R", "Sk"])
def _attn_rows(
    Q, K, LSE, BIAS, KPM, OUT,
    sqb, sqr, sqh, sqd, skb, sks, skh, skd, slb, slh, slr, sbb, sbh, sbs, smb, sms, sob, soh, sor, sos,
    H, R, Sk, GROUP, qk_scale, cap2,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``out[b, h, r, j] = exp2(s(q_r, k_j) - lse[b, h, r] * log2(e))`` for one (key block, row block, b*h): the
    scores as the forward computes them (base 2, softcap, key bias), zero at padded keys and rows with
    ``lse = +inf``."""
    start_n = tl.program_id(0) * BLOCK_N
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(2) // H
    h = tl.program_id(2) % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = offs_r < R
    n_mask = offs_n < Sk
    bb = b.to(tl.int64)
    q = _load_tile(Q + bb * sqb + h.to(tl.int64) * sqh, offs_r.to(tl.int64) * sqr, offs_d, sqd, r_mask, True, HEAD_DIM)
    hk = (h // GROUP).to(tl.int64)
    k = _load_tile(K + bb * skb + hk * skh, offs_n.to(tl.int64) * sks, offs_d, skd, n_mask, True, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    bias = 0.0
    if HAS_BIAS:
        bias = _key_bias(BIAS + bb * sbb + h.to(tl.int64) * sbh, 0, offs_n, n_mask, sbs)[None, :]
    s, _t = _modify(s, 0, 0, bias, 0.0, 0, cap2, SOFTCAP, False, HAS_BIAS)
    lse = tl.load(LSE + bb * slb + h.to(tl.int64) * slh + offs_r * slr, mask=r_mask, other=float("inf"))
    keep = (lse < float("inf"))[:, None] & n_mask[None, :]
    if HAS_KPM:
        pad = tl.load(KPM + bb * smb + offs_n * sms, mask=n_mask, other=1)
        keep = keep & (pad == 0)[None, :]
    lse2 = tl.where(lse < float("inf"), lse * 1.4426950408889634, 0.0)
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    ptrs = OUT + bb * sob + h.to(tl.int64) * soh + offs_r.to(tl.int64)[:, None] * sor + offs_n[None, :] * sos
    tl.store(ptrs, p, mask=r_mask[:, None] & n_mask[None, :])


@on_tensor_device
def attention_rows_forward(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    key_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax rows from a saved LSE: q_rows ``(B, R, H, D)``, k ``(B, Sk, H_k, D)``, lse ``(B, H, R)`` natural
    log fp32, ``key_bias`` fp32 ``(B, Hb, Sk)`` (Hb in {1, H}), ``key_padding_mask (B, Sk)`` bool -> ``(B, H, R,
    Sk)`` fp32. One program per (key block, row block, b * h); never more than the output in memory."""
    B, R, H, D = q_rows.shape
    Sk, Hk = k.shape[1], k.shape[2]
    out = empty((B, H, R, Sk), torch.float32, q_rows.device)
    if out.numel() == 0:
        return out
    dummy = torch.empty(1, dtype=torch.float32, device=q_rows.device)
    bias = key_bias if key_bias is not None else dummy
    bst = (bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2)) if key_bias is not None \
        else (0, 0, 0)  # fmt: skip
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else dummy
    mst = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    block_d = _block_d(D)
    block_r = max(16, min(64, triton.next_power_of_2(R)))
    block_n = 64 if INTERPRET else (128 if block_d <= 64 else 64)
    grid = (triton.cdiv(Sk, block_n), triton.cdiv(R, block_r), B * H)
    _attn_rows[grid](
        q_rows, k, lse, bias, kpm, out, *q_rows.stride(), *k.stride(), *lse.stride(), *bst, *mst, *out.stride(),
        H, R, Sk, H // Hk, float(scale) * LOG2E, float(softcap) * LOG2E,
        HEAD_DIM=D, HAS_BIAS=key_bias is not None, HAS_KPM=key_padding_mask is not None, SOFTCAP=softcap > 0,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q_rows.dtype),
        num_warps=4 if INTERPRET or block_r * block_n <= 4096 else 8,
    )  # fmt: skip
    return out


# ---- the dropout mask, for tests ---------------------------------------------------------------------


@triton.jit
def _dropout_mask_kernel(OUT, seed, p_drop, H, Sq, Sk, BLOCK: tl.constexpr):
    """OUT[n, h, i, j] (uint8) = the keep decision of :func:`_dropout_keep` (one program per (n * H + h, i))."""
    nh = tl.program_id(0)
    i = tl.program_id(1)
    base = nh.to(tl.int64) * Sq
    for j0 in range(0, Sk, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, base, i, j, Sk, p_drop)
        tl.store(OUT + (base + i) * Sk + j, keep.to(tl.uint8), mask=j < Sk)


def dropout_mask(seed: int, dropout_p: float, N: int, H: int, Sq: int, Sk: int, device) -> torch.Tensor:
    """``(N, H, Sq, Sk)`` bool: the keep mask the kernels draw for ``seed`` and ``dropout_p`` (dense layout; for
    varlen, sequence b's entries are ``[b, :, :len_q, :len_k]`` with ``Sq, Sk = max_seqlen_q, max_seqlen_k``)."""
    out = torch.empty((N, H, Sq, Sk), dtype=torch.uint8, device=device)
    if out.numel():
        with device_of(out):
            _dropout_mask_kernel[(N * H, Sq)](out, int(seed), float(dropout_p), H, Sq, Sk, BLOCK=64)
    return out.bool()


__all__ = [
    "LOG2E",
    "SMEM_LIMIT",
    "Features",
    "attention_backward",
    "attention_forward",
    "attention_rows_forward",
    "dropout_mask",
    "gpu_configs",
    "smem_estimate",
    "tilings",
]
