"""The spec of attention (dense, varlen, roll-aware), also its CPU path: plain PyTorch in fp32 (fp64 for fp64).

:class:`AttentionOptions` bundles everything but q, k, v that defines one attention call; custom ops take it
flattened (``flat()``, in their schema's order) and rebuild it with ``AttentionOptions(*flat)``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fastvl.rules import compute_dtype


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Everything but q, k, v: ``key_padding_mask (N, Sk)`` bool (True = padded key), ``shift (S,)`` int32 frame
    offsets already taken mod ``num_frames`` (roll-aware addressing), ``cu_seqlens_q/k`` int32 ``(batch + 1,)``
    and ``max_seqlen_q/k`` (varlen; None and 0 for dense), ``num_frames``, the softmax ``scale``, ``causal`` and
    ``deterministic`` (bitwise-repeatable gradients asked for: the Triton backward then runs its dQ pass)."""

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

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def flat(self) -> tuple:
        """The fields in order: the custom ops' arguments after q, k, v (and dout, out, lse)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def schema(cls) -> str:
        """The fields as a custom-op schema fragment, ``"Tensor? key_padding_mask, ..., bool causal"``."""
        types = {"torch.Tensor | None": "Tensor?", "int": "SymInt", "float": "float", "bool": "bool"}
        return ", ".join(f"{types[f.type]} {f.name}" for f in dataclasses.fields(cls))


def roll_rows(x: torch.Tensor, shift: torch.Tensor, num_frames: int, inverse: bool = False) -> torch.Tensor:
    """``x (B*T, S, ...)`` -> ``out[b*T + t, s] = x[b*T + (t + shift[s]) % T, s]`` (``inverse``: the unroll)."""
    N, S = x.shape[0], x.shape[1]
    T = num_frames
    sh = -shift.long() if inverse else shift.long()
    frame = (torch.arange(T, device=x.device)[:, None] + sh[None, :]) % T  # (T, S)
    xv = x.reshape(N // T, T, S, -1)
    return xv[:, frame, torch.arange(S, device=x.device)].reshape(x.shape)


def _visible(Sq, Sk, causal, kpm, device) -> torch.Tensor:
    """(N or 1, 1, Sq, Sk) bool: key j visible to query i."""
    vis = torch.ones(1, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        vis = vis & (j <= i + (Sk - Sq))
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    return vis


def _probs(qf, kf, scale, vis):
    """Softmax probabilities (N, H, Sq, Sk) and LSE (N, H, Sq); rows with no visible key: p = 0, LSE = +inf."""
    s = (qf @ kf.transpose(-1, -2)) * scale
    if s.shape[-1] == 0:  # no keys at all
        return s, torch.full(s.shape[:-1], float("inf"), dtype=s.dtype, device=s.device)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = torch.where(denom == 0, torch.full_like(denom, float("inf")), m + torch.log(denom))
    return p, lse[..., 0]


def _sequences(opts: AttentionOptions) -> list[tuple[slice, slice, AttentionOptions]]:
    """Varlen: (rows of q, rows of k, dense options) per sequence."""
    cq, ck = opts.cu_seqlens_q.tolist(), opts.cu_seqlens_k.tolist()
    dense = AttentionOptions(scale=opts.scale, causal=opts.causal)
    return [(slice(a, b), slice(c, d), dense) for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])]


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention in fp32 (fp64 for fp64 inputs). Returns ``(out, lse)``: out in q's shape and
    dtype, lse ``(H, rows)`` natural-log row log-sum-exp. Differentiable when called outside the op (that is
    how modules apply attention dropout)."""
    if opts.varlen:
        outs, lses = [], []
        for rq, rk, dense in _sequences(opts):
            o, lse = attention_reference(q[rq][None], k[rk][None], v[rk][None], dense, dropout_p)
            outs.append(o[0])
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    kpm, shift, T = opts.key_padding_mask, opts.shift, opts.num_frames
    if shift is not None:
        q, k, v = (roll_rows(t, shift, T) for t in (q, k, v))
        kpm = roll_rows(kpm, shift, T) if kpm is not None else None
    ct = compute_dtype(q.dtype)
    qf, kf, vf = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    p, lse = _probs(qf, kf, opts.scale, _visible(Sq, Sk, opts.causal, kpm, q.device))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = (p @ vf).transpose(1, 2)
    if shift is not None:
        out = roll_rows(out, shift, T, inverse=True)
    return out.to(q.dtype).contiguous(), lse.permute(1, 0, 2).reshape(H, N * Sq)


def attention_reference_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    opts: AttentionOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The attention backward written out (P recomputed): ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum)``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``, in fp32 (fp64 for fp64)."""
    if opts.varlen:
        grads = [[], [], []]
        for rq, rk, dense in _sequences(opts):
            g = attention_reference_backward(dout[rq][None], q[rq][None], k[rk][None], v[rk][None], None, None, dense)
            for acc, t in zip(grads, g):
                acc.append(t[0])
        return tuple(torch.cat(g) for g in grads)
    Sq, Sk = q.shape[1], k.shape[1]
    kpm, shift, T = opts.key_padding_mask, opts.shift, opts.num_frames
    if shift is not None:
        q, k, v, dout = (roll_rows(t, shift, T) for t in (q, k, v, dout))
        kpm = roll_rows(kpm, shift, T) if kpm is not None else None
    ct = compute_dtype(q.dtype)
    qf, kf, vf, dof = (t.to(ct).transpose(1, 2) for t in (q, k, v, dout))
    p, _ = _probs(qf, kf, opts.scale, _visible(Sq, Sk, opts.causal, kpm, q.device))
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds @ kf) * opts.scale
    dk = (ds.transpose(-1, -2) @ qf) * opts.scale
    grads = [g.transpose(1, 2) for g in (dq, dk, dv)]
    if shift is not None:
        grads = [roll_rows(g, shift, T, inverse=True) for g in grads]
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))
