"""The spec of attention (dense, varlen, roll-aware, every score feature), also its CPU path: plain PyTorch in
fp32 (fp64 for fp64).

:class:`AttentionOptions` bundles everything but q, k, v that defines one attention call; custom ops take it
flattened (``flat()``, in their schema's order) and rebuild it with ``AttentionOptions(*flat)``.

The score of query i and key j (per sequence, head h; ``diag = Sk - Sq``, flash-attn's bottom-right alignment):

    s = scale * q_i . k_j                      (k, v head h // (H / H_k): GQA / MQA)
    s = softcap * tanh(s / softcap)            (softcap > 0)
    s = s - slope_h * |i + diag - j|           (alibi_slopes)
    s = s + key_bias[j] (or key_bias[h, j])    (key_bias, fp32, differentiable)

and j is visible to i iff every active rule allows it: not padded (key_padding_mask), ``j <= i + diag``
(causal), ``i + diag - left <= j <= i + diag + right`` (window_size, -1 = unbounded), and the frame-block
rule: with ``frame_tokens=F`` the tokens after ``text_tokens`` leading ones form frames of F tokens; a text
token sees and is seen by every token; video tokens i, j in frames f_i, f_j at spatial positions p_i, p_j see
each other iff ``|f_i - f_j| <= frame_window`` (-1 = every frame) and, with ``temporal``, ``p_i == p_j``.
``P = softmax_j(s)`` over the visible keys (rows with none: P = 0, LSE = +inf), ``out = dropout(P) v`` with
dropout keeping each entry with probability ``1 - dropout_p`` and scaling it by ``1 / (1 - dropout_p)``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fastvl.rules import compute_dtype


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Everything but q, k, v.

    ``key_padding_mask (N, Sk)`` bool (True = padded key); ``shift (S,)`` int32 frame offsets already taken mod
    ``num_frames`` (roll-aware addressing); ``cu_seqlens_q/k`` int32 ``(batch + 1,)`` and ``max_seqlen_q/k``
    (varlen; None and 0 for dense); ``num_frames``; the softmax ``scale``; ``causal``; ``deterministic``
    (bitwise-repeatable gradients asked for); ``key_bias`` fp32 ``(N, Hb, Sk)`` (varlen ``(1, Hb, total_k)``),
    Hb in {1, H}; ``window_left/right`` (-1 = unbounded); ``softcap`` (0 = off); ``alibi_slopes`` fp32
    ``(Na, H)``, Na in {1, N}; ``frame_tokens`` (0 = no frame blocks), ``frame_window`` (-1 = every frame),
    ``text_tokens``, ``temporal`` (same spatial position only); ``dropout_p`` and ``dropout_seed`` (the seed
    both the forward and the backward regenerate the keep mask from); ``return_lse`` (the forward's LSE is
    returned to the caller: natural log, differentiable)."""

    key_padding_mask: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    num_frames: int = 1
    scale: float = 1.0
    causal: bool = False
    deterministic: bool = False
    key_bias: torch.Tensor | None = None
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    frame_tokens: int = 0
    frame_window: int = -1
    text_tokens: int = 0
    temporal: bool = False
    dropout_p: float = 0.0
    dropout_seed: int = 0
    return_lse: bool = False

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    def flat(self) -> tuple:
        """The fields in order: the custom ops' arguments after q, k, v (and dout, out, lse)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def schema(cls) -> str:
        """The fields as a custom-op schema fragment, ``"Tensor? key_padding_mask, ..., bool causal"``."""
        types = {"torch.Tensor | None": "Tensor?", "int": "SymInt", "float": "float", "bool": "bool"}
        return ", ".join(f"{types[f.type]} {f.name}" for f in dataclasses.fields(cls))

    @classmethod
    def index(cls, name: str) -> int:
        """Position of field ``name`` in :meth:`flat`."""
        return [f.name for f in dataclasses.fields(cls)].index(name)


def roll_rows(x: torch.Tensor, shift: torch.Tensor, num_frames: int, inverse: bool = False) -> torch.Tensor:
    """``x (B*T, S, ...)`` -> ``out[b*T + t, s] = x[b*T + (t + shift[s]) % T, s]`` (``inverse``: the unroll)."""
    N, S = x.shape[0], x.shape[1]
    T = num_frames
    sh = -shift.long() if inverse else shift.long()
    frame = (torch.arange(T, device=x.device)[:, None] + sh[None, :]) % T  # (T, S)
    xv = x.reshape(N // T, T, S, -1)
    return xv[:, frame, torch.arange(S, device=x.device)].reshape(x.shape)


def frame_block_visible(S: int, frame_tokens: int, frame_window: int, text_tokens: int, temporal: bool, device=None):
    """``(S, S)`` bool: the frame-block rule (module docstring) between every query and key of one sequence."""
    idx = torch.arange(S, device=device)
    video = idx >= text_tokens
    rel = (idx - text_tokens).clamp_min(0)
    frame, pos = rel // frame_tokens, rel % frame_tokens
    both = video[:, None] & video[None, :]
    ok = torch.ones(S, S, dtype=torch.bool, device=device)
    if frame_window >= 0:
        ok = ok & ((frame[:, None] - frame[None, :]).abs() <= frame_window)
    if temporal:
        ok = ok & (pos[:, None] == pos[None, :])
    return ~both | ok


def visible(Sq: int, Sk: int, opts: AttentionOptions, kpm: torch.Tensor | None, device) -> torch.Tensor:
    """``(N or 1, 1, Sq, Sk)`` bool: key j visible to query i (every rule of the module docstring)."""
    vis = torch.ones(1, 1, Sq, Sk, dtype=torch.bool, device=device)
    i = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
    j = torch.arange(Sk, device=device)[None, :]
    if opts.causal:
        vis = vis & (j <= i)
    if opts.window_left >= 0:
        vis = vis & (j >= i - opts.window_left)
    if opts.window_right >= 0:
        vis = vis & (j <= i + opts.window_right)
    if opts.frame_tokens > 0:
        vis = (
            vis
            & frame_block_visible(Sk, opts.frame_tokens, opts.frame_window, opts.text_tokens, opts.temporal, device)[
                -Sq:
            ]
        )
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    return vis


def scores(qf: torch.Tensor, kf: torch.Tensor, opts: AttentionOptions, bias, alibi, Sq: int, Sk: int) -> torch.Tensor:
    """``(N, H, Sq, Sk)`` scores before masking: qf ``(N, H, Sq, D)``, kf ``(N, H, Sk, D)`` (heads already
    repeated for GQA), bias ``(N, Hb, Sk)`` or None, alibi ``(Na, H)`` slopes or None."""
    s = (qf @ kf.transpose(-1, -2)) * opts.scale
    if opts.softcap > 0:
        s = opts.softcap * torch.tanh(s / opts.softcap)
    if alibi is not None:
        dist = (torch.arange(Sq, device=s.device)[:, None] + (Sk - Sq) - torch.arange(Sk, device=s.device)).abs()
        s = s - alibi.to(s.dtype)[:, :, None, None] * dist.to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)[:, :, None, :]
    return s


def softmax_rows(s: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and natural LSE of scores ``s`` over the visible keys; rows with no visible key:
    p = 0, LSE = +inf (differentiable: no NaN gradient from an empty row)."""
    if s.shape[-1] == 0:  # no keys at all
        return s, torch.full(s.shape[:-1], float("inf"), dtype=s.dtype, device=s.device)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("inf")), m + torch.log(safe))
    return p / safe, lse[..., 0]


def dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """The reference's keep mask ``(N, H, Sq, Sk)`` bool: Bernoulli(1 - p) draws of a generator seeded ``seed``
    (the same mask in the forward and the backward)."""
    g = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=g, device=device) >= p


def _rolled(q, k, v, opts: AttentionOptions):
    """(q, k, v, key padding, key bias) as the logical sequences see them (the roll applied)."""
    kpm, shift, T, bias = opts.key_padding_mask, opts.shift, opts.num_frames, opts.key_bias
    if shift is not None:
        q, k, v = (roll_rows(t, shift, T) for t in (q, k, v))
        kpm = roll_rows(kpm, shift, T) if kpm is not None else None
        if bias is not None:
            bias = roll_rows(bias.transpose(1, 2), shift, T).transpose(1, 2)
    return q, k, v, kpm, bias


def _heads(t: torch.Tensor, H: int, ct) -> torch.Tensor:
    """``(N, S, H_k, D)`` -> ``(N, H, S, D)`` in the compute dtype, k/v heads repeated for GQA."""
    t = t.to(ct).transpose(1, 2)
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


def _dense(q, k, v, opts: AttentionOptions, keep: torch.Tensor | None = None):
    """Dense attention in the compute dtype: ``(out (N, Sq, H, D), lse (N, H, Sq))`` (differentiable outside
    the op)."""
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    q, k, v, kpm, bias = _rolled(q, k, v, opts)
    ct = compute_dtype(q.dtype)
    qf, kf, vf = _heads(q, H, ct), _heads(k, H, ct), _heads(v, H, ct)
    s = scores(qf, kf, opts, bias, opts.alibi_slopes, Sq, Sk)
    p, lse = softmax_rows(s, visible(Sq, Sk, opts, kpm, q.device))
    if opts.dropout_p > 0:
        if keep is None:
            keep = dropout_keep(p.shape, opts.dropout_p, opts.dropout_seed, q.device)
        p = p * keep.to(p.dtype) / (1.0 - opts.dropout_p)
    out = (p @ vf).transpose(1, 2)
    if opts.shift is not None:
        out = roll_rows(out, opts.shift, opts.num_frames, inverse=True)
    return out, lse


def _group_sum(g: torch.Tensor, Hk: int) -> torch.Tensor:
    """``(N, H, S, D)`` per-q-head gradient -> ``(N, S, H_k, D)``, summed over each GQA group."""
    N, H, S, D = g.shape
    return g.reshape(N, Hk, H // Hk, S, D).sum(2).transpose(1, 2)


def _dense_backward(dout, q, k, v, dlse, opts: AttentionOptions):
    """The backward written out (P recomputed, the dropout mask regenerated): ``dV = (P o M)^T dO``,
    ``dS = P o (dO V^T o M - delta + dlse)`` with ``delta = rowsum(dO o O)``, through the softcap's
    ``1 - tanh^2``: ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dbias = column sums of dS``. Returns
    ``(dq, dk, dv, dbias or None)`` in the compute dtype, physical rows."""
    N, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    shift, T = opts.shift, opts.num_frames
    q, k, v, kpm, bias = _rolled(q, k, v, opts)
    if shift is not None:
        dout = roll_rows(dout, shift, T)
    ct = compute_dtype(q.dtype)
    qf, kf, vf, dof = _heads(q, H, ct), _heads(k, H, ct), _heads(v, H, ct), dout.to(ct).transpose(1, 2)
    raw = (qf @ kf.transpose(-1, -2)) * opts.scale
    s = scores(qf, kf, opts, bias, opts.alibi_slopes, Sq, Sk)
    p, _ = softmax_rows(s, visible(Sq, Sk, opts, kpm, q.device))
    pm = p
    dp = dof @ vf.transpose(-1, -2)
    if opts.dropout_p > 0:
        m = dropout_keep(p.shape, opts.dropout_p, opts.dropout_seed, q.device).to(ct) / (1.0 - opts.dropout_p)
        pm, dp = p * m, dp * m
    dv = pm.transpose(-1, -2) @ dof
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    if dlse is not None:
        ds = ds + p * dlse.to(ct)[..., None]
    dbias = None
    if bias is not None:
        dbias = ds.sum(2) if bias.shape[1] == H else ds.sum((1, 2))[:, None]
        if shift is not None:
            dbias = roll_rows(dbias.transpose(1, 2), shift, T, inverse=True).transpose(1, 2)
    if opts.softcap > 0:
        ds = ds * (1 - torch.tanh(raw / opts.softcap) ** 2)
    dq = ((ds @ kf) * opts.scale).transpose(1, 2)
    dk = _group_sum((ds.transpose(-1, -2) @ qf) * opts.scale, Hk)
    dv = _group_sum(dv, Hk)
    grads = [dq, dk, dv]
    if shift is not None:
        grads = [roll_rows(g, shift, T, inverse=True) for g in grads]
    return (*grads, dbias)


def _sequences(opts: AttentionOptions) -> list[tuple[slice, slice, AttentionOptions]]:
    """Varlen: (rows of q, rows of k, dense options) per sequence; key bias and alibi slopes sliced to it."""
    cq, ck = opts.cu_seqlens_q.tolist(), opts.cu_seqlens_k.tolist()
    out = []
    for b, (a, e, c, d) in enumerate(zip(cq[:-1], cq[1:], ck[:-1], ck[1:])):
        alibi = opts.alibi_slopes
        if alibi is not None:
            alibi = alibi[b if alibi.shape[0] > 1 else 0][None]
        bias = opts.key_bias[:, :, c:d] if opts.key_bias is not None else None
        dense = dataclasses.replace(
            opts, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, key_bias=bias,
            alibi_slopes=alibi, dropout_seed=opts.dropout_seed + b,
        )  # fmt: skip
        out.append((slice(a, e), slice(c, d), dense))
    return out


def _forward(q, k, v, opts: AttentionOptions, keep=None):
    """(out, lse (H, rows)) in the compute dtype, differentiable."""
    if opts.varlen:
        outs, lses = [], []
        for rq, rk, dense in _sequences(opts):
            o, lse = _dense(q[rq][None], k[rk][None], v[rk][None], dense)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)
    out, lse = _dense(q, k, v, opts, keep)
    N, H, Sq = lse.shape
    return out, lse.permute(1, 0, 2).reshape(H, N * Sq)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention in fp32 (fp64 for fp64 inputs). Returns ``(out, lse)``: out in q's shape and
    dtype, lse ``(H, rows)`` natural-log row log-sum-exp (rows = N * Sq, or total_q for varlen).
    Differentiable when called outside the op. ``dropout_p`` (outside the op, how modules apply attention
    dropout with torch's RNG) is applied on top of ``opts.dropout_p`` with ``F.dropout``."""
    if dropout_p > 0:
        if opts.varlen or opts.dropout_p > 0:
            raise ValueError("attention_reference: dropout_p is for dense calls without opts.dropout_p")
        N, Sq, H = q.shape[:3]
        keep = F.dropout(torch.ones(N, H, Sq, k.shape[1], device=q.device), dropout_p) > 0
        opts = dataclasses.replace(opts, dropout_p=dropout_p)
        out, lse = _forward(q, k, v, opts, keep)
    else:
        out, lse = _forward(q, k, v, opts)
    return out.to(q.dtype).contiguous(), lse


def attention_reference_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, opts: AttentionOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The attention backward written out (:func:`_dense_backward`), in fp32 (fp64 for fp64): ``(dq, dk, dv,
    dbias)`` in the dtypes of q, k, v and of the key bias (an empty fp32 tensor without one). ``dlse (H, rows)``:
    the gradient of the returned LSE, or None."""
    if opts.varlen:
        grads = [[], [], [], []]
        for rq, rk, dense in _sequences(opts):
            dl = dlse[:, rq][None] if dlse is not None else None
            g = _dense_backward(dout[rq][None], q[rq][None], k[rk][None], v[rk][None], dl, dense)
            for acc, t in zip(grads, g):
                acc.append(t[0] if t is not None else None)
        dq, dk, dv = (torch.cat(g) for g in grads[:3])
        dbias = torch.cat(grads[3], dim=-1)[None] if opts.key_bias is not None else None
    else:
        N, Sq, H = q.shape[:3]
        dl = dlse.reshape(H, N, Sq).transpose(0, 1) if dlse is not None else None
        dq, dk, dv, dbias = _dense_backward(dout, q, k, v, dl, opts)
    dq, dk, dv = (g.to(t.dtype).contiguous() for g, t in zip((dq, dk, dv), (q, k, v)))
    if dbias is None:
        return dq, dk, dv, q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dbias.to(opts.key_bias.dtype).reshape(opts.key_bias.shape)


# ---- attention rows ----------------------------------------------------------------------------


def attention_rows_reference(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax rows ``exp(s - lse)`` of R queries against every key, from the LSE the forward saved:
    q_rows ``(B, R, H, D)``, k ``(B, Sk, H_k, D)``, lse ``(B, H, R)`` natural log, key_bias ``(B, Hb, Sk)``,
    key_padding_mask ``(B, Sk)`` -> ``(B, H, R, Sk)`` fp32 (fp64 for fp64); padded keys and rows with
    ``lse = +inf`` give 0. Differentiable in q_rows, k, lse and key_bias."""
    ct = compute_dtype(q_rows.dtype)
    H, Hk = q_rows.shape[2], k.shape[2]
    qf, kf = (t.to(ct).transpose(1, 2) for t in (q_rows, k))
    if Hk != H:
        kf = kf.repeat_interleave(H // Hk, dim=1)
    opts = AttentionOptions(scale=scale, softcap=softcap)
    s = scores(qf, kf, opts, key_bias, None, 0, 0)
    finite = torch.isfinite(lse)
    l_ = torch.where(finite, lse, torch.zeros_like(lse)).to(ct)
    p = torch.exp(s - l_[..., None])
    keep = finite[..., None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    return torch.where(keep, p, torch.zeros_like(p))
