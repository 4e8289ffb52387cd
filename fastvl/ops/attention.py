"""Attention: reference, Triton flash attention, peers (torch SDPA, flash_attn, xformers), custom ops, API.

``flash_attention`` takes ``(N, S, H, D)`` tensors, ``flash_attention_varlen`` packed ``(total, H, D)``
tensors with int32 ``cu_seqlens`` (flash-attn's argument order). Softmax in fp32, output in q's dtype.
``key_padding_mask (N, Sk)`` bool: True marks a padded key (``nn.MultiheadAttention``'s meaning); a row
with no visible key gives zeros (and zero gradients), not NaN. ``causal`` is bottom-right aligned like
flash-attn: query i sees key j iff ``j <= i + Sk - Sq``.

Roll-aware addressing (All-in-one): with ``frame_offsets (S,)`` and ``num_frames=T`` the batch axis
``N = B*T`` holds frame-sequences ``n = b*T + t``; logical sequence (b, t) reads slot s from physical row
``(b*T + (t + frame_offsets[s]) % T, s)`` and writes its output there, i.e.
``out = unroll(attn(roll(q), roll(k), roll(v)))`` with ``roll(x)[b, t, s] = x[b, (t + off[s]) % T, s]``.
The key padding mask is addressed like k. :func:`roll_frame_offsets` gives All-in-one's offsets.

Backends and why auto ranks them as it does (not measured on a GPU yet; revisit with benchmarks/results):
  flash_attn (40)  the reference FA2/FA3 CUDA kernels when installed: the fastest known for plain
                   fp16/bf16 attention; no key padding (fastvl does not unpad for it), no roll offsets
  sdpa (30)        torch SDPA, which picks its flash / cuDNN kernels for fp16/bf16 without a mask:
                   tuned per GPU by PyTorch; auto takes it only where it keeps those kernels
  xformers (25)    memory-efficient CUTLASS kernels when installed
  triton (20)      fastvl's kernel: the one that serves key padding without leaving the fast path,
                   roll offsets, varlen, fp32, deterministic gradients, any S
  reference (0)    plain PyTorch math in fp32 (the spec; the CPU path)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvl import _validate as V
from fastvl import backends
from fastvl.backends import Call

from ._dispatch import public, run

OP = "flash_attention"
_HALF = (torch.float16, torch.bfloat16)

# ---- reference (the spec; also the CPU path) ---------------------------------------------------


def roll_rows(x: torch.Tensor, shift: torch.Tensor, num_frames: int, inverse: bool = False) -> torch.Tensor:
    """``x (B*T, S, ...)`` -> ``out[b*T + t, s] = x[b*T + (t + shift[s]) % T, s]`` (``inverse``: the unroll)."""
    N, S = x.shape[0], x.shape[1]
    T = num_frames
    sh = -shift.long() if inverse else shift.long()
    frame = (torch.arange(T, device=x.device)[:, None] + sh[None, :]) % T  # (T, S)
    xv = x.reshape(N // T, T, S, -1)
    return xv[:, frame, torch.arange(S, device=x.device)].reshape(x.shape)


def _visible(N, Sq, Sk, causal, kpm, device) -> torch.Tensor:
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _varlen_split(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    shift: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_frames: int,
    scale: float,
    causal: bool,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention in fp32 (fp64 for fp64 inputs). Returns ``(out, lse)``: out in q's shape and
    dtype, lse ``(H, rows)`` natural-log row log-sum-exp. Differentiable when called outside the op (that is
    how modules apply attention dropout)."""
    if cu_seqlens_q is not None:
        outs, lses = [], []
        for (a, b), (c, d) in zip(_varlen_split(cu_seqlens_q), _varlen_split(cu_seqlens_k)):
            o, lse = attention_reference(
                q[a:b][None], k[c:d][None], v[c:d][None], None, None, None, None, 0, 0, 1, scale, causal, dropout_p
            )
            outs.append(o[0])
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    if shift is not None:
        q, k, v = (roll_rows(t, shift, num_frames) for t in (q, k, v))
        if key_padding_mask is not None:
            key_padding_mask = roll_rows(key_padding_mask, shift, num_frames)
    ct = _compute_dtype(q.dtype)
    qf, kf, vf = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    p, lse = _probs(qf, kf, scale, _visible(N, Sq, Sk, causal, key_padding_mask, q.device))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = (p @ vf).transpose(1, 2)
    if shift is not None:
        out = roll_rows(out, shift, num_frames, inverse=True)
    return out.to(q.dtype).contiguous(), lse.permute(1, 0, 2).reshape(H, N * Sq)


def attention_reference_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    shift: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_frames: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention backward written out (P recomputed): ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum)``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``, in fp32 (fp64 for fp64)."""
    if cu_seqlens_q is not None:
        grads = [[], [], []]
        for (a, b), (c, d) in zip(_varlen_split(cu_seqlens_q), _varlen_split(cu_seqlens_k)):
            g = attention_reference_backward(
                dout[a:b][None], q[a:b][None], k[c:d][None], v[c:d][None], None, None, None, None, None, None,
                0, 0, 1, scale, causal,
            )  # fmt: skip
            for acc, t in zip(grads, g):
                acc.append(t[0])
        return tuple(torch.cat(g) for g in grads)
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    if shift is not None:
        q, k, v, dout = (roll_rows(t, shift, num_frames) for t in (q, k, v, dout))
        if key_padding_mask is not None:
            key_padding_mask = roll_rows(key_padding_mask, shift, num_frames)
    ct = _compute_dtype(q.dtype)
    qf, kf, vf, dof = (t.to(ct).transpose(1, 2) for t in (q, k, v, dout))
    p, _ = _probs(qf, kf, scale, _visible(N, Sq, Sk, causal, key_padding_mask, q.device))
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    grads = [g.transpose(1, 2) for g in (dq, dk, dv)]
    if shift is not None:
        grads = [roll_rows(g, shift, num_frames, inverse=True) for g in grads]
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


# ---- Triton backend ----------------------------------------------------------------------------


def _triton_fwd(q, k, v, kpm, shift, cu_q, cu_k, max_q, max_k, num_frames, scale, causal):
    from fastvl.kernels.attention import attention_forward

    return attention_forward(
        q, k, v, scale=scale, causal=causal, key_padding_mask=kpm, shift=shift, num_frames=num_frames,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
    )  # fmt: skip


def _triton_bwd(dout, q, k, v, out, lse, kpm, shift, cu_q, cu_k, max_q, max_k, num_frames, scale, causal, det=False):
    from fastvl.kernels.attention import attention_backward

    return attention_backward(
        dout, q, k, v, out, lse, scale=scale, causal=causal, key_padding_mask=kpm, shift=shift,
        num_frames=num_frames, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        deterministic=det,
    )  # fmt: skip


_FWD = {"reference": attention_reference, "triton": _triton_fwd}


def _reference_bwd(*args):
    """The reference backward, called with the trailing ``deterministic`` flag (it always is)."""
    return attention_reference_backward(*args[:-1])


_BWD = {"reference": _reference_bwd, "triton": _triton_bwd}


# ---- peers: called with their own autograd, outside fastvl's custom op -------------------------


def _sdpa(q, k, v, kpm, scale, causal, deterministic):
    mask, empty_rows = None, None
    if kpm is not None:
        empty_rows = kpm.all(1)  # sequences with every key padded: attend to all, then zero (no NaN)
        mask = (~(kpm & ~empty_rows[:, None]))[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=scale
    ).transpose(1, 2)
    if empty_rows is not None:
        out = out * (~empty_rows)[:, None, None, None].to(out.dtype)
    return out


def _flash_attn(q, k, v, kpm, scale, causal, deterministic):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, deterministic=deterministic)


def _flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, deterministic):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=causal,
        deterministic=deterministic,
    )  # fmt: skip


def _xformers(q, k, v, kpm, scale, causal, deterministic):
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


_PEERS = {"sdpa": _sdpa, "flash_attn": _flash_attn, "xformers": _xformers}


# ---- registry ----------------------------------------------------------------------------------


def _q(call: Call) -> torch.Tensor:
    return call.tensors["q"]


def _shapes(call: Call) -> tuple[int, int, int]:
    p = call.params
    if p.get("varlen"):
        return p["max_seqlen_q"], p["max_seqlen_k"], _q(call).shape[-1]
    return _q(call).shape[1], call.tensors["k"].shape[1], _q(call).shape[-1]


def _triton_check(call: Call) -> list[str]:
    q = _q(call)
    out = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        out.append(f"q dtype {q.dtype}: the kernel takes float16, bfloat16, float32")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        out.append("bfloat16 on the CPU: the Triton interpreter's bf16 arithmetic is wrong (checked on a GPU only)")
    D = q.shape[-1]
    if D > 128:
        out.append(f"head dim D={D} > 128: the kernel keeps a (block, D) tile of q, k, v and the accumulator on chip")
    N = len(call.tensors["cu_seqlens_q"]) - 1 if call.params.get("varlen") else q.shape[0]
    H = q.shape[-2]
    if N * H > 65535:
        out.append(f"N*H={N * H} > 65535 (the launch grid's second dimension)")
    return out


def _cuda(call: Call, what: str) -> list[str]:
    q = _q(call)
    if q.device.type != "cuda":
        return [f"q is on {q.device.type}: {what} runs on CUDA tensors"]
    return []


def _common_peer(call: Call, name: str, *, fp32: bool) -> list[str]:
    q = _q(call)
    out = []
    if call.tensors.get("frame_offsets") is not None:
        out.append(f"frame_offsets: roll-aware addressing is fastvl's own ({name} would need rolled copies of q, k, v)")
    allowed = _HALF + ((torch.float32,) if fp32 else ())
    if q.dtype not in allowed:
        out.append(f"q dtype {q.dtype}: {name} takes {', '.join(str(d).replace('torch.', '') for d in allowed)}")
    D = q.shape[-1]
    if D % 8 != 0 or D > 256:
        out.append(f"head dim D={D}: {name}'s fused kernels need D % 8 == 0 and D <= 256")
    return out


def _sdpa_check(call: Call) -> list[str]:
    q = _q(call)
    p = call.params
    Sq, Sk, _ = _shapes(call)
    out = []
    if p.get("varlen"):
        out.append("varlen: torch SDPA has no cu_seqlens interface")
    if p.get("causal") and Sq != Sk:
        out.append(f"causal with Sq={Sq} != Sk={Sk}: SDPA's is_causal is top-left aligned, fastvl's bottom-right")
    if q.device.type == "cpu":
        # the CPU path: torch's fused CPU attention; roll-aware offsets by gathering rows (as the reference does)
        if q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
            out.append(f"q dtype {q.dtype} on the CPU: sdpa takes float32, float64, bfloat16 there")
        if p.get("causal") and call.tensors.get("key_padding_mask") is not None:
            out.append("causal with key_padding_mask: SDPA takes either is_causal or an attn_mask")
        return out
    out += _cuda(call, "the sdpa backend")
    # fp32 is accepted only by name: SDPA then leaves its flash/cuDNN kernels
    out += _common_peer(call, "sdpa's flash/cuDNN path", fp32=call.explicit)
    if p.get("deterministic"):
        out.append("deterministic=True: SDPA's fused backward kernels do not promise bitwise-repeatable gradients")
    if call.tensors.get("key_padding_mask") is not None:
        if p.get("causal"):
            out.append("causal with key_padding_mask: SDPA takes either is_causal or an attn_mask")
        elif not call.explicit:
            out.append(
                "key_padding_mask: a mask moves SDPA off its flash/cuDNN kernels; fastvl's triton kernel masks "
                "natively (name backend='sdpa' to use SDPA's masked path anyway)"
            )
    return out


def _flash_attn_check(call: Call) -> list[str]:
    out = _cuda(call, "flash_attn") + _common_peer(call, "flash_attn", fp32=False)
    if call.tensors.get("key_padding_mask") is not None:
        out.append("key_padding_mask: fastvl does not unpad for flash_attn (pass packed sequences to the varlen op)")
    return out


def _xformers_check(call: Call) -> list[str]:
    out = _cuda(call, "xformers") + _common_peer(call, "xformers", fp32=True)
    p = call.params
    Sq, Sk, _ = _shapes(call)
    if p.get("varlen"):
        out.append("varlen: fastvl does not build xformers' block-diagonal bias")
    if call.tensors.get("key_padding_mask") is not None:
        out.append("key_padding_mask: fastvl does not build an xformers bias for it")
    if p.get("deterministic"):
        out.append("deterministic=True: xformers' backward is not bitwise repeatable")
    if p.get("causal") and Sq != Sk:
        out.append(f"causal with Sq={Sq} != Sk={Sk}: xformers' LowerTriangularMask is top-left aligned")
    return out


backends.register(OP, "reference", priority=0, description="plain PyTorch math in fp32 (the spec)")
backends.register(
    OP,
    "triton",
    priority=20,
    check=backends.all_of(backends.triton_device_check, _triton_check),
    available=backends.triton_available,
    description="FA2-style flash attention: key padding, varlen, roll offsets, deterministic backward",
)
backends.register(
    OP, "sdpa", priority=30, check=_sdpa_check,
    description="torch scaled_dot_product_attention (CUDA flash/cuDNN; on the CPU torch's fused kernel)",
)  # fmt: skip
backends.register(
    OP,
    "flash_attn",
    priority=40,
    check=_flash_attn_check,
    available=lambda: backends._module_reasons("flash_attn", "flash_attn"),
    description="flash-attn package (flash_attn_func / flash_attn_varlen_func)",
)
backends.register(
    OP,
    "xformers",
    priority=25,
    check=_xformers_check,
    available=lambda: backends._module_reasons("xformers", "xformers"),
    description="xformers memory_efficient_attention",
)


def _example(d):
    # All-in-one-B fused block: B*T = 32*3 sequences of 40 text + 197 video tokens, 12 heads of 64, text padding
    q = torch.empty(96, 237, 12, 64, dtype=torch.bfloat16, device=d)
    return Call(
        OP,
        {
            "q": q,
            "k": q,
            "v": q,
            "key_padding_mask": torch.empty(96, 237, dtype=torch.bool, device=d),
            "frame_offsets": torch.empty(237, dtype=torch.int64, device=d),
        },
        {"causal": False, "deterministic": False, "varlen": False, "num_frames": 3},
    )


backends.register_example(OP, _example)


# ---- custom ops --------------------------------------------------------------------------------


def _call(q, k, v, kpm, frame_offsets, cu_q, cu_k, max_q, max_k, num_frames, causal, deterministic) -> Call:
    return Call(
        OP,
        {
            "q": q,
            "k": k,
            "v": v,
            "key_padding_mask": kpm,
            "frame_offsets": frame_offsets,
            "cu_seqlens_q": cu_q,
            "cu_seqlens_k": cu_k,
        },
        {
            "causal": causal,
            "deterministic": deterministic,
            "varlen": cu_q is not None,
            "max_seqlen_q": max_q,
            "max_seqlen_k": max_k,
            "num_frames": num_frames,
        },
    )


@torch.library.custom_op("fastvl::flash_attention", mutates_args=())
def _attn_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    shift: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_frames: int,
    scale: float,
    causal: bool,
    backend: str,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    call = _call(
        q,
        k,
        v,
        key_padding_mask,
        shift,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        num_frames,
        causal,
        deterministic,
    )
    return run(
        _FWD, backend, call, q, k, v, key_padding_mask, shift, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, num_frames, scale, causal,
    )  # fmt: skip


def _rows(q: torch.Tensor, varlen: bool) -> int:
    return q.shape[0] if varlen else q.shape[0] * q.shape[1]


@_attn_op.register_fake
def _(
    q,
    k,
    v,
    key_padding_mask,
    shift,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    num_frames,
    scale,
    causal,
    backend,
    deterministic=False,
):
    rows = _rows(q, cu_seqlens_q is not None)
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], rows), dtype=torch.float32)


@torch.library.custom_op("fastvl::flash_attention_backward", mutates_args=())
def _attn_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    shift: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_frames: int,
    scale: float,
    causal: bool,
    backend: str,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call(
        q,
        k,
        v,
        key_padding_mask,
        shift,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        num_frames,
        causal,
        deterministic,
    )
    return run(
        _BWD, backend, call, dout, q, k, v, out, lse, key_padding_mask, shift, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, num_frames, scale, causal, deterministic,
    )  # fmt: skip


@_attn_bwd_op.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    key_padding_mask,
    shift,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    num_frames,
    scale,
    causal,
    backend,
    deterministic=False,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, kpm, shift, cu_q, cu_k, max_q, max_k, T, scale, causal, backend, *det = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, shift, cu_q, cu_k)
    ctx.args = (max_q, max_k, T, scale, causal, backend, bool(det and det[0]))
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kpm, shift, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        return (None,) * 14
    dq, dk, dv = _attn_bwd_op(dout, q, k, v, out, lse, kpm, shift, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv) + (None,) * 11


_attn_op.register_autograd(_backward, setup_context=_setup)


# ---- FLOP formulas (FlopCounterMode): 4 N H Sq Sk D forward (half when causal), 2.5x that backward
# (the recomputed QK^T plus four matmuls), the same count torch gives its own flash / efficient SDPA.


def _pairs(q, k, cu_q, cu_k, max_q, max_k) -> int:
    """Sum over sequences of Sq * Sk (exact for varlen when the offsets can be read, else an upper bound)."""
    if cu_q is None:
        return q.shape[0] * q.shape[1] * k.shape[1]
    try:
        lq = torch.diff(cu_q).tolist()
        lk = torch.diff(cu_k).tolist()
        return sum(a * b for a, b in zip(lq, lk))
    except Exception:  # fake tensors under compile: no values
        return (cu_q.shape[0] - 1) * max_q * max_k


def _attn_flops(q, k, v, kpm, shift, cu_q, cu_k, max_q, max_k, T, scale, causal, backend, *_, **__) -> int:
    f = 4 * _pairs(q, k, cu_q, cu_k, max_q, max_k) * q.shape[-2] * q.shape[-1]
    return f // 2 if causal else f


def _attn_bwd_flops(dout, q, k, v, out, lse, kpm, shift, cu_q, cu_k, max_q, max_k, T, scale, causal, backend, *_, **__):
    return 5 * _attn_flops(q, k, v, kpm, shift, cu_q, cu_k, max_q, max_k, T, scale, causal, backend) // 2


def _register_flops() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for op, fn in (
        (torch.ops.fastvl.flash_attention, _attn_flops),
        (torch.ops.fastvl.flash_attention_backward, _attn_bwd_flops),
    ):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(fn)
    # torch charges nothing for its fused CPU attention (the sdpa backend's CPU path): count it like the
    # CUDA variants, 4*B*H*Sq*Sk*D forward and 2.5x that backward, so FLOP reports do not depend on the device
    aten = torch.ops.aten
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_bwd_flops),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry and op.default not in flop_registry:
            register_flop_formula(op)(fn)


def _cpu_sdpa_flops(
    query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs
) -> int:
    b, h, sq, d = query_shape
    f = 4 * b * h * sq * key_shape[2] * d
    return f // 2 if is_causal else f  # fastvl's convention: causal attention does half the work


def _cpu_sdpa_bwd_flops(
    grad_out_shape,
    query_shape,
    key_shape,
    value_shape,
    out_shape_=None,
    lse_shape=None,
    dropout_p=0.0,
    is_causal=False,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return 5 * _cpu_sdpa_flops(query_shape, key_shape, value_shape, dropout_p, is_causal) // 2


_register_flops()


# ---- functional API ----------------------------------------------------------------------------


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{OP}: argument '{name}' must be a bool, got {type(value).__name__}")
    return value


def _scale(op: str, softmax_scale, D: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    return V.number(op, "softmax_scale", softmax_scale, lo=0.0, hi=math.inf, lo_open=True, hi_open=True)


def _check_qkv(op, q, k, v, layout_q, layout_kv, ndim):
    V.tensor(op, "q", q, ndim=ndim, layout=layout_q)
    V.tensor(op, "k", k, ndim=ndim, layout=layout_kv)
    V.tensor(op, "v", v, ndim=ndim, layout=layout_kv)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: argument '{name}' must have q's dtype {q.dtype}, got {t.dtype}")
    if ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(
            f"{op}: argument 'k' must have q's batch N={q.shape[0]}, got shape {tuple(k.shape)} (q {tuple(q.shape)})"
        )
    if k.shape[-2:] != q.shape[-2:]:
        raise ValueError(
            f"{op}: argument 'k' must have q's (H, D)={tuple(q.shape[-2:])}, got shape {tuple(k.shape)} "
            f"(q {tuple(q.shape)})"
        )
    if v.shape != k.shape:
        raise ValueError(f"{op}: argument 'v' must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: head dim D must be >= 1, got q shape {tuple(q.shape)}")


def _check(q, k, v, softmax_scale, causal, key_padding_mask, deterministic, frame_offsets, num_frames):
    _check_qkv(OP, q, k, v, "(N, Sq, H, D)", "(N, Sk, H, D)", 4)
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    _flag("causal", causal)
    _flag("deterministic", deterministic)
    scale = _scale(OP, softmax_scale, D)
    if key_padding_mask is not None:
        V.tensor(OP, "key_padding_mask", key_padding_mask, ndim=2, layout="(N, Sk)", dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (N, Sk):
            raise ValueError(
                f"{OP}: argument 'key_padding_mask' must have shape (N, Sk)=({N}, {Sk}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
    T = V.integer(OP, "num_frames", num_frames, minimum=1)
    if frame_offsets is not None:
        V.tensor(OP, "frame_offsets", frame_offsets, ndim=1, layout="(S,)", dtypes=V.INDEX)
        if Sq != Sk:
            raise ValueError(f"{OP}: frame_offsets needs self-attention lengths (Sq == Sk), got Sq={Sq}, Sk={Sk}")
        if frame_offsets.shape[0] != Sq:
            raise ValueError(
                f"{OP}: argument 'frame_offsets' must have shape (S,)=({Sq},), got {tuple(frame_offsets.shape)}"
            )
        if N % T != 0:
            raise ValueError(f"{OP}: q.shape[0]={N} must be a multiple of num_frames={T} (layout (B*T, S, H, D))")
    V.same_device(OP, q=q, k=k, v=v, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets)
    return scale, T


def _make_call(
    q,
    k,
    v,
    *,
    softmax_scale=None,
    causal=False,
    key_padding_mask=None,
    deterministic=False,
    frame_offsets=None,
    num_frames=1,
    **_,
) -> Call:
    _, T = _check(q, k, v, softmax_scale, causal, key_padding_mask, deterministic, frame_offsets, num_frames)
    frame_offsets = frame_offsets if T > 1 else None
    return _call(q, k, v, key_padding_mask, frame_offsets, None, None, 0, 0, T, causal, deterministic)


@public(OP, _make_call)
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    deterministic: bool = False,
    frame_offsets: torch.Tensor | None = None,
    num_frames: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T * scale) v`` per head, softmax in fp32.

    q ``(N, Sq, H, D)``, k/v ``(N, Sk, H, D)`` (fp16/bf16/fp32, any strides) -> ``(N, Sq, H, D)`` in q's
    dtype. ``softmax_scale`` defaults to ``1/sqrt(D)``. ``causal``: bottom-right aligned (flash-attn).
    ``key_padding_mask (N, Sk)`` bool, True = padded key to ignore; rows with no visible key give zeros.
    ``deterministic``: bitwise-repeatable gradients (fastvl's Triton backward then computes dQ in a second
    pass instead of adding it up with fp32 atomics; peers that cannot are skipped). ``frame_offsets (S,)``
    int with ``num_frames=T``: roll-aware addressing (module docstring).
    fp32 inputs: the Triton kernel's dots are exact fp32 unless ``torch.get_float32_matmul_precision()`` allows
    tf32 (then ~1e-3 relative error, like torch's own tf32 matmuls).
    """
    scale, T = _check(q, k, v, softmax_scale, causal, key_padding_mask, deterministic, frame_offsets, num_frames)
    if T == 1:
        frame_offsets = None  # offsets are taken mod T: nothing moves
    request, _ = backends.resolve_request(OP, backend)
    call = _call(q, k, v, key_padding_mask, frame_offsets, None, None, 0, 0, T, causal, deterministic)
    name = backends.select(OP, request, call)
    shift = None if frame_offsets is None else torch.remainder(frame_offsets.long(), T).to(torch.int32)
    if name in _PEERS:
        if shift is None:
            return _PEERS[name](q, k, v, key_padding_mask, scale, causal, deterministic)
        # a peer that accepted offsets (sdpa on the CPU) sees rolled copies; its output is rolled back
        q, k, v = (roll_rows(t, shift, T) for t in (q, k, v))
        kpm = None if key_padding_mask is None else roll_rows(key_padding_mask, shift, T)
        return roll_rows(_PEERS[name](q, k, v, kpm, scale, causal, deterministic), shift, T, inverse=True)
    out, _ = _attn_op(q, k, v, key_padding_mask, shift, None, None, 0, 0, T, scale, causal, name, deterministic)
    return out


def _check_cu(op, name, cu, total, max_seqlen, device):
    V.tensor(op, name, cu, ndim=1, layout="(batch + 1,)", dtypes=(torch.int32,))
    if cu.shape[0] < 2:
        raise ValueError(f"{op}: argument '{name}' must hold batch + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on q's device {device}, got {cu.device}")
    if torch.compiler.is_compiling():
        return
    c = cu.tolist()  # one small device-to-host copy: the values decide the launch, so check them
    lens = [b - a for a, b in zip(c[:-1], c[1:])]
    if c[0] != 0 or min(lens) < 0:
        shown = c if len(c) <= 12 else c[:12] + ["..."]
        raise ValueError(f"{op}: argument '{name}' must start at 0 and be increasing (non-decreasing), got {shown}")
    if c[-1] != total:
        raise ValueError(f"{op}: argument '{name}' must end at the number of rows {total}, got {c[-1]}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{op}: max_seqlen {max_seqlen} is smaller than the longest sequence {max(lens)} in '{name}'")


def _varlen_check(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, deterministic):
    op = "flash_attention_varlen"
    _check_qkv(op, q, k, v, "(total_q, H, D)", "(total_k, H, D)", 3)
    max_q = V.integer(op, "max_seqlen_q", max_q, minimum=0)
    max_k = V.integer(op, "max_seqlen_k", max_k, minimum=0)
    _check_cu(op, "cu_seqlens_q", cu_q, q.shape[0], max_q, q.device)
    _check_cu(op, "cu_seqlens_k", cu_k, k.shape[0], max_k, q.device)
    if cu_k.shape != cu_q.shape:
        raise ValueError(
            f"{op}: argument 'cu_seqlens_k' must have cu_seqlens_q's shape {tuple(cu_q.shape)}, got {tuple(cu_k.shape)}"
        )
    _flag("causal", causal)
    _flag("deterministic", deterministic)
    V.same_device(op, q=q, k=k, v=v)
    return _scale(op, softmax_scale, q.shape[-1]), max_q, max_k


def _varlen_make_call(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    softmax_scale=None,
    causal=False,
    deterministic=False,
    **_,
) -> Call:
    _, max_q, max_k = _varlen_check(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, deterministic
    )
    return _call(q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 1, causal, deterministic)


@public(OP, _varlen_make_call)
def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    deterministic: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (flash-attn's ``flash_attn_varlen_func`` order).

    q ``(total_q, H, D)``, k/v ``(total_k, H, D)``; ``cu_seqlens_q/k`` int32 ``(batch + 1,)`` offsets from 0,
    non-decreasing, ending at total; ``max_seqlen_q/k`` at least the longest sequence. Sequence b attends
    ``q[cu_q[b]:cu_q[b+1]]`` to ``k/v[cu_k[b]:cu_k[b+1]]``. Returns ``(total_q, H, D)`` in q's dtype.
    """
    scale, max_q, max_k = _varlen_check(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, deterministic
    )
    request, _ = backends.resolve_request(OP, backend)
    call = _call(q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 1, causal, deterministic)
    name = backends.select(OP, request, call)
    if name == "flash_attn":
        return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal, deterministic)
    out, _ = _attn_op(
        q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 1, scale, causal, name, deterministic
    )
    return out


def roll_frame_offsets(
    seq_len: int, text_len: int, fraction: float = 0.125, steps: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """All-in-one's temporal roll as per-slot frame offsets for ``flash_attention(frame_offsets=...)``.

    Slots ``text_len+1 .. text_len+f`` get ``-steps`` (they read frame t-1 per roll), the last ``f`` slots
    ``+steps`` (frame t+1), every other slot 0; ``f = floor((seq_len - text_len) * fraction)`` exactly as
    :func:`fastvl.ops.temporal_token_roll`. ``steps=k`` is the cumulative offset before block k. Returns an
    int64 tensor ``(seq_len,)``.
    """
    op = "roll_frame_offsets"
    seq_len = V.integer(op, "seq_len", seq_len, minimum=1)
    text_len = V.integer(op, "text_len", text_len, minimum=0)
    steps = V.integer(op, "steps", steps)
    fraction = V.number(op, "fraction", fraction, lo=0.0, hi=0.5, lo_open=False, hi_open=True)
    if text_len >= seq_len:
        raise ValueError(f"{op}: text_len={text_len} leaves no video tokens in seq_len={seq_len}")
    L = seq_len - text_len
    f = math.floor(L * fraction + 1e-9)
    if fraction > 0 and f == 0:
        raise ValueError(f"{op}: L={L} video tokens is too small for fraction={fraction} (floor(L*fraction)=0)")
    if 2 * f + 1 > L:
        raise ValueError(f"{op}: fraction={fraction} rolls 2*{f} of L={L} tokens, needs 2f+1 <= L (slot 0 fixed)")
    off = torch.zeros(seq_len, dtype=torch.int64, device=device)
    if f > 0:
        off[text_len + 1 : text_len + 1 + f] = -1
        off[seq_len - f :] = 1
    return off * steps
