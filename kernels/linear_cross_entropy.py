"""Fused linear cross-entropy: ``CE(h W^T + b, t)`` over a vocabulary without the (N, V) logits in memory.

Notation: ``h (N, D)`` hidden rows, ``W (V, D)``, ``b (V,)``, targets ``t`` (here int32, -1 on rows without
a target), ``x = h W^T + b`` (only ever a (BLOCK_M, BLOCK_V) tile in registers), label smoothing ``eps``.
For a row with a target, with ``p = softmax(x)``:

    loss     = lse - (1 - eps) x_t - (eps / V) sum_j x_j
    dloss/dx = p_j - (1 - eps) [j = t] - eps / V                                  (=: G0_j)

and with the upstream row weights ``c`` (0 on rows without a target): ``dh = c G0 W``, ``dW = (c G0)^T h``,
``db = sum_rows c G0``.

``lce_forward``  grid (row blocks, vocabulary splits). Each program walks its slice of the vocabulary once:
                 logits tile by ``tl.dot`` over D chunks, online max / sum-exp, the target logit and
                 ``sum_j x_j``. With ``need_dh`` it also carries ``A = sum_{j != t} e^(x_j - m) W_j``,
                 rescaled by ``e^(m_old - m_new)`` as the running max moves: flash attention's output
                 accumulator with W as the values. A (BLOCK_M, D) fp32 accumulator is wider than the register
                 file for D = 768, so it lives in a slab of global memory owned by the program (read,
                 ``tl.dot``-accumulated and written back per vocabulary tile: no other program touches it).
                 The host merges the splits into the row max ``M = max_s m_s`` and ``log L`` with
                 ``L = sum_s l_s e^(m_s - M)`` (kept apart: ``x - M`` is exact near the max, while one float
                 ``lse = M + log L`` would cost ~ulp(M) in every exponent), and

                     dh_unit = sum_s e^(m_s - M) / L A_s + (p_t - (1 - eps)) W_t - (eps / V) sum_j W_j

                 (the gradient to h for c = 1). The target column stays out of the tensor-core product, so
                 ``p_t - (1 - eps)`` is formed in fp32 rather than from a rounded ``p_t``, and ``sum_j W_j``
                 is one column sum of W. The loss and the gradient to h come out of one pass, as in
                 Liger-Kernel's fused linear cross-entropy, but without a chunk of logits in memory.
``lce_backward_weight``  grid (vocabulary tiles, row splits). The gradient to W and b needs every row's
                 final lse, so it is a second pass: each program owns BLOCK_V rows of dW (an fp32 slab) and
                 walks the row blocks: ``x^T`` tile recomputed as ``W_tile h^T`` (so ``G^T`` is already the
                 left operand of the next product), ``G^T = c (e^(x - M - log L) - (1 - eps)[j = t] - eps / V)``,
                 ``dW += G^T h``, ``db += sum G^T``.

Two passes rather than atomics for dW: every output row has one owner, so results are deterministic and no
fp32 atomics hit a V x D buffer once per row block; the price is one more logits product (2NVD of 8NVD
FLOPs in all: forward 2NVD logits + 2NVD for dh, backward 2NVD logits + 2NVD for dW). Splits (vocabulary
in the forward, rows in the backward) fill the GPU when N or V is small; their partial results are summed
in a fixed order on the host, and their memory is bounded by ``target programs x block x D`` floats. The slabs
cost read-modify-write traffic (BLOCK_M x D fp32 per vocabulary tile in the forward, BLOCK_V x D per row block
in the backward) that stays in L2 at these tiles (one 192 KB slab per resident program; untimed: no GPU
figure behind this design yet).

Every product accumulates in fp32. Probabilities and gradient weights fed to the second product are cast to
the input dtype (tensor cores) times ``P_SCALE`` (1024 for fp16, keeping small weights out of fp16's
subnormals); the upstream weights are divided by their largest magnitude first, so ``|G| <= 1``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .utils import empty, on_tensor_device

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch shape of one kernel."""

    block_m: int  # rows of h per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden width per tl.dot step and per slab update
    num_warps: int
    num_stages: int


# sm_90 configurations (bf16/fp16 tiles: every product lowers to wgmma, every tile load to 16-byte cp.async).
# Forward: the (64, 128) logits tile and the (64, BLOCK_D) slab tile in registers; backward: the (64, 128) x^T /
# G^T tile, the left operand of G^T h straight from registers. At D = 768 bf16 (ptxas): forward 246 registers,
# backward 231, no spills, 80 KB shared memory each. 4 warps spill (255 registers) with these tiles.
FORWARD_GPU = Blocks(block_m=64, block_v=128, block_d=64, num_warps=8, num_stages=3)
BACKWARD_GPU = Blocks(block_m=128, block_v=64, block_d=64, num_warps=8, num_stages=3)
# fp32 without TF32 multiplies on the FMA units (no wgmma): the same tiles with 16-wide D steps and two stages
# (forward 198 registers, backward 196, no spills; BLOCK_D = 64 spills ~600 bytes).
FORWARD_FP32 = Blocks(block_m=64, block_v=128, block_d=16, num_warps=8, num_stages=2)
BACKWARD_FP32 = Blocks(block_m=128, block_v=64, block_d=16, num_warps=8, num_stages=2)
# The interpreter pays per operation and, in tl.dot (numpy's matmul loop without BLAS), per padded row: by
# default wide vocabulary tiles (a 30522-word vocabulary in 30) and 16-row blocks (a tiny model's few masked
# positions); the tests run the GPU tiles above through the interpreter explicitly (gpu_blocks).
INTERPRETED_FORWARD = Blocks(block_m=16, block_v=1024, block_d=64, num_warps=4, num_stages=1)
INTERPRETED_BACKWARD = Blocks(block_m=16, block_v=1024, block_d=64, num_warps=4, num_stages=1)
TARGET_PROGRAMS_INTERPRETED = 4  # small, so the vocabulary and row splits are exercised under the interpreter


# ---- shared tile helper --------------------------------------------------------------------


@triton.jit
def _dot_rows(
    a_ptr,
    b_ptr,
    ra,
    rb,
    ma,
    mb,
    D,
    sa0,
    sa1,
    sb0,
    sb1,
    PREC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 (BLOCK_A, BLOCK_B) tile of dot products a[ra] . b[rb], D walked in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        at = tl.load(
            a_ptr + ra.to(tl.int64)[:, None] * sa0 + d[None, :] * sa1, mask=ma[:, None] & dm[None, :], other=0.0
        )
        bt = tl.load(
            b_ptr + rb.to(tl.int64)[:, None] * sb0 + d[None, :] * sb1, mask=mb[:, None] & dm[None, :], other=0.0
        )
        acc = tl.dot(at, tl.trans(bt), acc, input_precision=PREC)
    return acc


# ---- forward: lse, target logit, sum of logits, and the gradient to h ------------------------


@triton.jit
def _lce_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    stats_ptr,
    acc_ptr,
    N,
    V,
    D,
    shm,
    shd,
    swv,
    swd,
    sb,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    NEED_DH: tl.constexpr,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    t = tl.load(t_ptr + rows, mask=rm, other=-1)
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    x_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    slab = acc_ptr + (split.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cv = cols < v_hi
        x = _dot_rows(h_ptr, w_ptr, rows, cols, rm, cv, D, shm, shd, swv, swd, PREC, BLOCK_M, BLOCK_V, BLOCK_D)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols * sb, mask=cv, other=0.0).to(tl.float32)[None, :]
        x = tl.where(cv[None, :], x, float("-inf"))
        # every tile holds at least one column, so m_new is finite; alpha = 0 on the first tile (m_i = -inf)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.exp2((x - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        is_t = (cols[None, :] == t[:, None]) & cv[None, :]  # the target may sit past this split's end
        x_t += tl.sum(tl.where(is_t, x, 0.0), 1)
        x_sum += tl.sum(tl.where(cv[None, :], x, 0.0), 1)
        if NEED_DH:
            pw = (tl.where(is_t, 0.0, p) * P_SCALE).to(w_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                a = tl.load(slab + d[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
                wt = tl.load(
                    w_ptr + cols.to(tl.int64)[:, None] * swv + d[None, :] * swd,
                    mask=cv[:, None] & dm[None, :],
                    other=0.0,
                )
                a = tl.dot(pw, wt, a * alpha[:, None], input_precision=PREC)
                tl.store(slab + d[None, :], a, mask=rm[:, None] & dm[None, :])
        m_i = m_new
    out = stats_ptr + split.to(tl.int64) * 4 * N + rows
    tl.store(out, m_i, mask=rm)
    tl.store(out + N, l_i, mask=rm)
    tl.store(out + 2 * N, x_t, mask=rm)
    tl.store(out + 3 * N, x_sum, mask=rm)


# ---- backward: the gradient to W and b --------------------------------------------------------


@triton.jit
def _lce_bwd_w_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    lse_ptr,
    c_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    D,
    shm,
    shd,
    swv,
    swd,
    sb,
    blocks_per_split,
    target_weight,
    uniform_weight,
    HAS_BIAS: tl.constexpr,
    NEED_DW: tl.constexpr,
    PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_v = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cv = cols < V
    bias = tl.zeros([BLOCK_V], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols * sb, mask=cv, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    m_lo = split * blocks_per_split * BLOCK_M
    m_hi = tl.minimum(N, m_lo + blocks_per_split * BLOCK_M)
    slab = dw_ptr + (split.to(tl.int64) * V + cols.to(tl.int64))[:, None] * D
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < m_hi
        t = tl.load(t_ptr + rows, mask=rm, other=-1)
        m = tl.load(lse_ptr + rows, mask=rm, other=0.0)
        log_sum = tl.load(lse_ptr + N + rows, mask=rm, other=0.0)
        c = tl.load(c_ptr + rows, mask=rm, other=0.0)  # 0 on rows without a target
        xt = _dot_rows(w_ptr, h_ptr, cols, rows, cv, rm, D, swv, swd, shm, shd, PREC, BLOCK_V, BLOCK_M, BLOCK_D)
        xt += bias[:, None]
        p = tl.exp2(((xt - m[None, :]) - log_sum[None, :]) * LOG2E)
        g = p - tl.where(cols[:, None] == t[None, :], target_weight, 0.0) - uniform_weight
        g = tl.where(cv[:, None], g * c[None, :], 0.0)
        db += tl.sum(g, 1)
        if NEED_DW:
            gw = (g * P_SCALE).to(h_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                a = tl.load(slab + d[None, :], mask=cv[:, None] & dm[None, :], other=0.0)
                ht = tl.load(
                    h_ptr + rows.to(tl.int64)[:, None] * shm + d[None, :] * shd,
                    mask=rm[:, None] & dm[None, :],
                    other=0.0,
                )
                a = tl.dot(gw, ht, a, input_precision=PREC)
                tl.store(slab + d[None, :], a, mask=cv[:, None] & dm[None, :])
    tl.store(db_ptr + split.to(tl.int64) * V + cols, db, mask=cv)


# ---- host launchers ------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only when PyTorch's matmuls may (torch.backends.cuda.matmul.allow_tf32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _p_scale(dtype: torch.dtype) -> float:
    return 1024.0 if dtype == torch.float16 else 1.0


def gpu_blocks(dtype: torch.dtype) -> tuple[Blocks, Blocks]:
    """(forward, weight-gradient pass) tiles of a CUDA launch for inputs of ``dtype`` (any D: the kernels walk D
    in BLOCK_D steps)."""
    return (FORWARD_FP32, BACKWARD_FP32) if _prec(dtype) == "ieee" else (FORWARD_GPU, BACKWARD_GPU)


def forward_blocks(dtype: torch.dtype) -> Blocks:
    """The forward's tiles for inputs of ``dtype`` here (GPU tiles, or the interpreter's wide ones)."""
    return INTERPRETED_FORWARD if INTERPRET else gpu_blocks(dtype)[0]


def backward_blocks(dtype: torch.dtype) -> Blocks:
    """The weight-gradient pass's tiles for inputs of ``dtype`` here."""
    return INTERPRETED_BACKWARD if INTERPRET else gpu_blocks(dtype)[1]


def target_programs(device: torch.device) -> int:
    """Programs a launch should offer to fill the device: 2 per SM (the interpreter: a few, so splits run)."""
    if INTERPRET or device.type != "cuda":
        return TARGET_PROGRAMS_INTERPRETED
    return _sm_programs(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_programs(index: int) -> int:
    return 2 * torch.cuda.get_device_properties(index).multi_processor_count


def splits(blocks: int, tiles: int, programs: int) -> tuple[int, int]:
    """(number of splits, tiles per split) that spread ``tiles`` over enough splits for ``blocks * splits`` to
    reach ``programs``, no split empty."""
    want = max(1, min(tiles, triton.cdiv(programs, max(1, blocks))))
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per


@on_tensor_device
def lce_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    label_smoothing: float,
    need_dh: bool,
    blocks: Blocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss ``(N,)``, lse ``(2, N)`` (row max, log-sum-exp above it; fp32) and, with ``need_dh``, ``dh_unit (N, D)`` fp32 (the gradient
    to hidden for an upstream weight of 1 on every row with a target).

    hidden ``(N, D)``, weight ``(V, D)`` fp16/bf16/fp32 of one dtype, any strides; bias ``(V,)`` or None;
    targets ``(N,)`` int32, -1 on rows without a target (their loss and dh_unit are 0).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    loss = empty((N,), torch.float32, dev)
    lse = empty((2, N), torch.float32, dev)
    if N == 0:
        return loss, lse, hidden.new_zeros((0, D), dtype=torch.float32) if need_dh else None
    cfg = blocks or forward_blocks(hidden.dtype)
    n_rb = triton.cdiv(N, cfg.block_m)
    S, per = splits(n_rb, triton.cdiv(V, cfg.block_v), target_programs(dev))
    stats = empty((S, 4, N), torch.float32, dev)
    acc = torch.zeros((S, N, D) if need_dh else (1,), dtype=torch.float32, device=dev)
    p_scale = _p_scale(hidden.dtype)
    _lce_fwd_kernel[(n_rb, S)](
        hidden,
        weight,
        bias if bias is not None else stats,
        targets,
        stats,
        acc,
        N,
        V,
        D,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        per,
        HAS_BIAS=bias is not None,
        NEED_DH=need_dh,
        PREC=_prec(hidden.dtype),
        P_SCALE=p_scale,
        BLOCK_M=cfg.block_m,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    m, l, x_t, x_sum = stats.unbind(1)  # (S, N) each
    row_max = m.max(0).values
    scale = torch.exp(m - row_max)  # (S, N): e^(m_s - M)
    log_sum = torch.log((l * scale).sum(0))
    lse[0], lse[1] = row_max, log_sum
    x_t, x_sum = x_t.sum(0), x_sum.sum(0)
    has_target = targets >= 0
    eps = label_smoothing
    row_loss = (1.0 - eps) * (row_max - x_t) + log_sum  # lse - (1 - eps) x_t - eps mean_j x_j
    if eps:
        row_loss += eps * (row_max - x_sum / V)
    loss.copy_(torch.where(has_target, row_loss, torch.zeros_like(row_loss)))
    if not need_dh:
        return loss, lse, None
    w_split = scale / (torch.exp(log_sum) * p_scale)  # (S, N): e^(m_s - M) / L, the slab's P_SCALE undone
    dh = torch.einsum("sn,snd->nd", w_split, acc) if S > 1 else acc[0].mul_(w_split[0, :, None])
    t_safe = torch.where(has_target, targets, torch.zeros_like(targets)).long()
    coef_t = torch.exp((x_t - row_max) - log_sum) - (1.0 - eps)  # p_t - (1 - eps), in fp32
    dh.addcmul_(coef_t[:, None], weight.index_select(0, t_safe).float())
    if eps:
        dh.sub_((eps / V) * weight.sum(0, dtype=torch.float32))
    dh.mul_(has_target[:, None])
    return loss, lse, dh


def _norm(c: torch.Tensor) -> torch.Tensor:
    """max |c| as a 1-element fp32 device tensor (1 when all zero): no host sync."""
    m = c.abs().max().float() if c.numel() else torch.ones((), device=c.device)
    return torch.where(m > 0, m, torch.ones_like(m)).reshape(1)


@on_tensor_device
def lce_backward_weight(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    label_smoothing: float,
    need_dw: bool,
    need_db: bool,
    blocks: Blocks | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dW (V, D) in weight's dtype or None, db (V,) in bias's dtype or None)`` for upstream row weights
    ``coef (N,)`` (0 on rows without a target), given the forward's ``lse (2, N)``; other arguments as in
    :func:`lce_forward`."""
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if not (need_dw or need_db):
        return None, None
    if N == 0:
        dw = torch.zeros_like(weight) if need_dw else None
        return dw, torch.zeros_like(bias) if need_db else None
    cfg = blocks or backward_blocks(hidden.dtype)
    n_vt = triton.cdiv(V, cfg.block_v)
    R, per = splits(n_vt, triton.cdiv(N, cfg.block_m), target_programs(dev))
    norm = _norm(coef)
    c = (coef.float() / norm).contiguous()
    slab = torch.zeros((R, V, D) if need_dw else (1,), dtype=torch.float32, device=dev)
    db = empty((R, V), torch.float32, dev)
    p_scale = _p_scale(hidden.dtype)
    _lce_bwd_w_kernel[(n_vt, R)](
        hidden,
        weight,
        bias if bias is not None else db,
        targets,
        lse.float().contiguous(),
        c,
        slab,
        db,
        N,
        V,
        D,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        per,
        1.0 - label_smoothing,
        label_smoothing / V,
        HAS_BIAS=bias is not None,
        NEED_DW=need_dw,
        PREC=_prec(hidden.dtype),
        P_SCALE=p_scale,
        BLOCK_M=cfg.block_m,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    dw = None
    if need_dw:
        dw = (slab[0] if R == 1 else slab.sum(0)).mul_(norm / p_scale).to(weight.dtype)
    dbias = (db[0] if R == 1 else db.sum(0)).mul(norm).to(bias.dtype) if need_db else None
    return dw, dbias
