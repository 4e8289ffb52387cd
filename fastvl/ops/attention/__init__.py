"""Attention: validation, the dispatch plans, the custom ops, the functional API.

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
The backends and how auto ranks them: :mod:`fastvl.ops.attention.backends`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastvl import rules, validate
from fastvl.backends import Call, Plan, Request, custom_op, get, implementation, public_op

from . import backends
from .reference import AttentionOptions, attention_reference, attention_reference_backward, roll_rows

__all__ = [
    "AttentionOptions",
    "attention_reference",
    "attention_reference_backward",
    "flash_attention",
    "flash_attention_varlen",
    "prepare",
    "prepare_varlen",
    "roll_frame_offsets",
    "roll_rows",
]

OP = backends.OP

# ---- custom ops: q, k, v (dout, out, lse), the options flattened, the chosen backend ---------------------

_OPTIONS = AttentionOptions.schema()


@custom_op("flash_attention", f"(Tensor q, Tensor k, Tensor v, {_OPTIONS}, str backend) -> (Tensor, Tensor)")
def _attn_op(q, k, v, *options_and_backend):
    *options, backend = options_and_backend
    return implementation(OP, backend, "forward")(q, k, v, AttentionOptions(*options))


@_attn_op.register_fake
def _(q, k, v, key_padding_mask, shift, cu_seqlens_q, *_):
    rows = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], rows), dtype=torch.float32)


@custom_op(
    "flash_attention_backward",
    f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_OPTIONS}, str backend) "
    "-> (Tensor, Tensor, Tensor)",
)
def _attn_bwd_op(dout, q, k, v, out, lse, *options_and_backend):
    *options, backend = options_and_backend
    return implementation(OP, backend, "backward")(dout, q, k, v, out, lse, AttentionOptions(*options))


@_attn_bwd_op.register_fake
def _(dout, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, kpm, shift, cu_q, cu_k, *scalars = inputs  # max_q, max_k, T, scale, causal, deterministic, backend
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, shift, cu_q, cu_k)
    ctx.scalars = scalars
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kpm, shift, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        return (None,) * (7 + len(ctx.scalars))
    dq, dk, dv = _attn_bwd_op(dout, q, k, v, out, lse, kpm, shift, cu_q, cu_k, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (4 + len(ctx.scalars))


_attn_op.register_autograd(_backward, setup_context=_setup)
backends.register_flops(torch.ops.fastvl.flash_attention, torch.ops.fastvl.flash_attention_backward)


# ---- validation and plans ----------------------------------------------------------------------


def _scale(op: str, softmax_scale, D: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    return validate.number(op, "softmax_scale", softmax_scale, lo=0.0, hi=math.inf, lo_open=True, hi_open=True)


def _check_qkv(op, q, k, v, layout_q, layout_kv, ndim):
    validate.tensor(op, "q", q, ndim=ndim, layout=layout_q)
    validate.tensor(op, "k", k, ndim=ndim, layout=layout_kv)
    validate.tensor(op, "v", v, ndim=ndim, layout=layout_kv)
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


def _attention_call(q, k, v, opts: AttentionOptions, deterministic: bool) -> Call:
    H, D = q.shape[-2:]
    if opts.varlen:
        N, Sq, Sk = opts.cu_seqlens_q.shape[0] - 1, opts.max_seqlen_q, opts.max_seqlen_k
    else:
        N, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    uses = {
        "key_padding_mask": opts.key_padding_mask is not None,
        "frame_offsets": opts.shift is not None,
        "varlen": opts.varlen,
        "deterministic": deterministic,
        "causal": opts.causal,
        "causal_bottom_right": opts.causal and Sq != Sk,
    }
    tensors = {"q": q, "k": k, "v": v, "key_padding_mask": opts.key_padding_mask, "frame_offsets": opts.shift}
    tensors |= {"cu_seqlens_q": opts.cu_seqlens_q, "cu_seqlens_k": opts.cu_seqlens_k}
    params = {"D": D, "NH": N * H, "Sq": Sq, "Sk": Sk, "causal": opts.causal, "num_frames": opts.num_frames}
    return Call(OP, tensors, params, frozenset(f for f, used in uses.items() if used))


@dataclasses.dataclass
class AttentionPlan(Plan):
    options: AttentionOptions
    deterministic: bool


def prepare(
    q, k, v, *, softmax_scale=None, causal=False, key_padding_mask=None, deterministic=False, frame_offsets=None,
    num_frames=1, backend=None,
) -> AttentionPlan:  # fmt: skip
    """Validate a :func:`flash_attention` call and plan its dispatch."""
    _check_qkv(OP, q, k, v, "(N, Sq, H, D)", "(N, Sk, H, D)", 4)
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    validate.flag(OP, "causal", causal)
    validate.flag(OP, "deterministic", deterministic)
    scale = _scale(OP, softmax_scale, D)
    if key_padding_mask is not None:
        validate.tensor(OP, "key_padding_mask", key_padding_mask, ndim=2, layout="(N, Sk)", dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (N, Sk):
            raise ValueError(
                f"{OP}: argument 'key_padding_mask' must have shape (N, Sk)=({N}, {Sk}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
    T = validate.integer(OP, "num_frames", num_frames, minimum=1)
    if frame_offsets is not None:
        validate.tensor(OP, "frame_offsets", frame_offsets, ndim=1, layout="(S,)", dtypes=validate.INDEX)
        if Sq != Sk:
            raise ValueError(f"{OP}: frame_offsets needs self-attention lengths (Sq == Sk), got Sq={Sq}, Sk={Sk}")
        if frame_offsets.shape[0] != Sq:
            raise ValueError(
                f"{OP}: argument 'frame_offsets' must have shape (S,)=({Sq},), got {tuple(frame_offsets.shape)}"
            )
        if N % T != 0:
            raise ValueError(f"{OP}: q.shape[0]={N} must be a multiple of num_frames={T} (layout (B*T, S, H, D))")
    validate.same_device(OP, q=q, k=k, v=v, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets)
    shift = None  # offsets are taken mod T: with T == 1 nothing moves
    if frame_offsets is not None and T > 1:
        shift = torch.remainder(frame_offsets.long(), T).to(torch.int32)
    opts = AttentionOptions(
        key_padding_mask, shift, num_frames=T, scale=scale, causal=causal, deterministic=deterministic
    )
    return AttentionPlan([Request(_attention_call(q, k, v, opts, deterministic), backend)], opts, deterministic)


def _run_peer(name: str, q, k, v, opts: AttentionOptions, deterministic: bool) -> torch.Tensor:
    peer = implementation(OP, name)
    if opts.shift is None:
        return peer(q, k, v, opts.key_padding_mask, opts.scale, opts.causal, deterministic)
    # a peer that accepted offsets (sdpa on the CPU) sees rolled copies; its output is rolled back
    shift, T = opts.shift, opts.num_frames
    q, k, v = (roll_rows(t, shift, T) for t in (q, k, v))
    kpm = None if opts.key_padding_mask is None else roll_rows(opts.key_padding_mask, shift, T)
    return roll_rows(peer(q, k, v, kpm, opts.scale, opts.causal, deterministic), shift, T, inverse=True)


@public_op(prepare)
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
    plan = prepare(
        q, k, v, softmax_scale=softmax_scale, causal=causal, key_padding_mask=key_padding_mask,
        deterministic=deterministic, frame_offsets=frame_offsets, num_frames=num_frames, backend=backend,
    )  # fmt: skip
    (name,) = plan.choose()
    if get(OP, name).peer:
        return _run_peer(name, q, k, v, plan.options, deterministic)
    out, _ = _attn_op(q, k, v, *plan.options.flat(), name)
    return out


def _check_cu(op, name, cu, total, max_seqlen, device):
    validate.tensor(op, name, cu, ndim=1, layout="(batch + 1,)", dtypes=(torch.int32,))
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


def prepare_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None, causal=False,
    deterministic=False, backend=None,
) -> AttentionPlan:  # fmt: skip
    """Validate a :func:`flash_attention_varlen` call and plan its dispatch."""
    op = "flash_attention_varlen"
    _check_qkv(op, q, k, v, "(total_q, H, D)", "(total_k, H, D)", 3)
    max_q = validate.integer(op, "max_seqlen_q", max_seqlen_q, minimum=0)
    max_k = validate.integer(op, "max_seqlen_k", max_seqlen_k, minimum=0)
    _check_cu(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_q, q.device)
    _check_cu(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"{op}: argument 'cu_seqlens_k' must have cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)}, "
            f"got {tuple(cu_seqlens_k.shape)}"
        )
    validate.flag(op, "causal", causal)
    validate.flag(op, "deterministic", deterministic)
    validate.same_device(op, q=q, k=k, v=v)
    scale = _scale(op, softmax_scale, q.shape[-1])
    opts = AttentionOptions(None, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 1, scale, causal, deterministic)
    return AttentionPlan([Request(_attention_call(q, k, v, opts, deterministic), backend)], opts, deterministic)


@public_op(prepare_varlen)
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
    plan = prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
        causal=causal, deterministic=deterministic, backend=backend,
    )  # fmt: skip
    (name,) = plan.choose()
    opts = plan.options
    if get(OP, name).peer:
        return implementation(OP, name, "varlen")(
            q, k, v, opts.cu_seqlens_q, opts.cu_seqlens_k, opts.max_seqlen_q, opts.max_seqlen_k, opts.scale,
            opts.causal, deterministic,
        )  # fmt: skip
    out, _ = _attn_op(q, k, v, *opts.flat(), name)
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
    seq_len = validate.integer(op, "seq_len", seq_len, minimum=1)
    text_len = validate.integer(op, "text_len", text_len, minimum=0)
    steps = validate.integer(op, "steps", steps)
    fraction = rules.roll_fraction(op, fraction)
    if text_len >= seq_len:
        raise ValueError(f"{op}: text_len={text_len} leaves no video tokens in seq_len={seq_len}")
    f = rules.checked_roll_count(op, seq_len - text_len, fraction)
    off = torch.zeros(seq_len, dtype=torch.int64, device=device)
    if f > 0:
        off[text_len + 1 : text_len + 1 + f] = -1
        off[seq_len - f :] = 1
    return off * steps
