"""Attention: validation, the dispatch plans, the custom ops, the functional API.

``flash_attention`` takes ``(N, S, H, D)`` tensors, ``flash_attention_varlen`` packed ``(total, H, D)``
tensors with int32 ``cu_seqlens`` (flash-attn's argument order: ``dropout_p``, ``softmax_scale``, ``causal``
positional). k and v may have fewer heads ``H_k`` dividing q's ``H`` (GQA / MQA: q head h reads k/v head
``h // (H / H_k)``). Softmax in fp32, output in q's dtype. The score of every feature (softcap, ALiBi, key
bias) and the visibility rules (key padding, causal, sliding window, frame blocks) are defined once, in
:mod:`fastvl.ops.attention.reference`. ``key_padding_mask (N, Sk)`` bool: True marks a padded key
(``nn.MultiheadAttention``'s meaning); a row with no visible key gives zeros (and zero gradients), not NaN,
and LSE ``+inf``. ``causal`` and ``window_size`` are bottom-right aligned like flash-attn: query i sees key j
iff ``j <= i + Sk - Sq`` (causal). With ``key_padding_mask`` the alignment is to the padded lengths; flash-attn's
unpad-then-varlen aligns each sequence to its own unpadded lengths (they agree when padding is at the end and
Sq == Sk only for the padded query rows that are discarded anyway).

Roll-aware addressing (All-in-one): with ``frame_offsets (S,)`` and ``num_frames=T`` the batch axis
``N = B*T`` holds frame-sequences ``n = b*T + t``; logical sequence (b, t) reads slot s from physical row
``(b*T + (t + frame_offsets[s]) % T, s)`` and writes its output there, i.e.
``out = unroll(attn(roll(q), roll(k), roll(v)))`` with ``roll(x)[b, t, s] = x[b, (t + off[s]) % T, s]``.
The key padding mask and the key bias are addressed like k. :func:`roll_frame_offsets` gives All-in-one's
offsets. The backends and how auto ranks them: :mod:`fastvl.ops.attention.backends`.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import rules, validate
from fastvl.backends import Call, Plan, Request, custom_op, get, implementation, public_op

from . import backends, checks
from .reference import AttentionOptions, attention_reference, attention_reference_backward, roll_rows
from .rows import attention_rows, prepare_rows

__all__ = [
    "AttentionOptions",
    "attention_reference",
    "attention_reference_backward",
    "attention_rows",
    "flash_attention",
    "flash_attention_varlen",
    "prepare",
    "prepare_rows",
    "prepare_varlen",
    "roll_frame_offsets",
    "roll_rows",
]

OP = backends.OP

# ---- custom ops: q, k, v (dout, out, lse, dlse), the options flattened, the chosen backend ---------------

_OPTIONS = AttentionOptions.schema()
_FIELDS = [f.name for f in dataclasses.fields(AttentionOptions)]
_BIAS = _FIELDS.index("key_bias")


@custom_op("flash_attention", f"(Tensor q, Tensor k, Tensor v, {_OPTIONS}, str backend) -> (Tensor, Tensor)")
def _attn_op(q, k, v, *options_and_backend):
    *options, backend = options_and_backend
    return implementation(OP, backend, "forward")(q, k, v, AttentionOptions(*options))


@_attn_op.register_fake
def _(q, k, v, key_padding_mask, shift, cu_seqlens_q, *_):
    rows = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], rows), dtype=rules.compute_dtype(q.dtype))


@custom_op(
    "flash_attention_backward",
    f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, {_OPTIONS}, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _attn_bwd_op(dout, q, k, v, out, lse, dlse, *options_and_backend):
    *options, backend = options_and_backend
    return implementation(OP, backend, "backward")(dout, q, k, v, out, lse, dlse, AttentionOptions(*options))


@_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, *options_and_backend):
    bias = options_and_backend[_BIAS]
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup(ctx, inputs, output):
    q, k, v, *options = inputs[:-1]
    out, lse = output
    tensors = [x if isinstance(x, torch.Tensor) else None for x in options]
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.scalars = [None if isinstance(x, torch.Tensor) else x for x in options] + [inputs[-1]]
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    *scalars, backend = ctx.scalars
    options = [t if s is None else s for t, s in zip(tensors, scalars)]
    none = (None,) * (len(options) + 1)
    if dout is None and dlse is None:
        return (None, None, None) + none
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = _attn_bwd_op(dout, q, k, v, out, lse, dlse, *options, backend)
    grads = list(none)
    if options[_BIAS] is not None:
        grads[_BIAS] = dbias
    return (dq, dk, dv, *grads)


_attn_op.register_autograd(_backward, setup_context=_setup)
backends.register_flops(torch.ops.fastvl.flash_attention, torch.ops.fastvl.flash_attention_backward)


# ---- validation and plans ----------------------------------------------------------------------


def _attention_call(q, k, v, opts: AttentionOptions, generator=None) -> Call:
    H, D = q.shape[-2:]
    if opts.varlen:
        N, Sq, Sk = opts.cu_seqlens_q.shape[0] - 1, opts.max_seqlen_q, opts.max_seqlen_k
    else:
        N, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    uses = {
        "key_padding_mask": opts.key_padding_mask is not None,
        "frame_offsets": opts.shift is not None,
        "varlen": opts.varlen,
        "deterministic": opts.deterministic,
        "causal": opts.causal,
        "causal_bottom_right": opts.causal and Sq != Sk,
        "gqa": k.shape[-2] != H,
        "key_bias": opts.key_bias is not None,
        "window": opts.windowed,
        "window_bottom_right": opts.windowed and Sq != Sk,
        "frame_blocks": opts.frame_tokens > 0 and not opts.temporal,
        "temporal_only": opts.temporal,
        "softcap": opts.softcap > 0,
        "alibi": opts.alibi_slopes is not None,
        "dropout": opts.dropout_p > 0,
        "generator": opts.dropout_p > 0 and generator is not None,
        "return_lse": opts.return_lse,
    }
    tensors = {"q": q, "k": k, "v": v, "key_padding_mask": opts.key_padding_mask, "frame_offsets": opts.shift}
    tensors |= {"cu_seqlens_q": opts.cu_seqlens_q, "cu_seqlens_k": opts.cu_seqlens_k, "key_bias": opts.key_bias}
    tensors |= {"alibi_slopes": opts.alibi_slopes}
    params = {"D": D, "NH": N * H, "Sq": Sq, "Sk": Sk, "causal": opts.causal, "num_frames": opts.num_frames,
              "H": H, "Hk": k.shape[-2]}  # fmt: skip
    return Call(OP, tensors, params, frozenset(f for f, used in uses.items() if used))


@dataclasses.dataclass
class AttentionPlan(Plan):
    options: AttentionOptions
    deterministic: bool
    generator: torch.Generator | None = None


def prepare(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    key_bias=None, frame_tokens=None, frame_window=None, text_tokens=0, spatial_only=False, temporal_only=False,
    return_lse=False, key_padding_mask=None, deterministic=False, frame_offsets=None, num_frames=1, generator=None,
    backend=None,
) -> AttentionPlan:  # fmt: skip
    """Validate a :func:`flash_attention` call and plan its dispatch."""
    checks.qkv(OP, q, k, v, "(N, Sq, H, D)", "(N, Sk, H_k, D)", 4)
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    p = checks.dropout(OP, dropout_p, generator)
    validate.flag(OP, "causal", causal)
    validate.flag(OP, "deterministic", deterministic)
    validate.flag(OP, "return_lse", return_lse)
    scale = checks.scale(OP, softmax_scale, D)
    left, right = checks.window(OP, window_size)
    cap = checks.softcap(OP, softcap)
    alibi = checks.alibi(OP, alibi_slopes, N, H, q.device)
    bias = checks.key_bias(OP, key_bias, N, H, Sk, q, varlen=False)
    frames = checks.frames(OP, frame_tokens, frame_window, text_tokens, spatial_only, temporal_only, Sq, Sk)
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
    validate.same_device(
        OP, q=q, k=k, v=v, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets, key_bias=key_bias,
        alibi_slopes=alibi_slopes,
    )  # fmt: skip
    shift = None  # offsets are taken mod T: with T == 1 nothing moves
    if frame_offsets is not None and T > 1:
        shift = torch.remainder(frame_offsets.long(), T).to(torch.int32)
    opts = AttentionOptions(
        key_padding_mask, shift, num_frames=T, scale=scale, causal=causal, deterministic=deterministic,
        key_bias=bias, window_left=left, window_right=right, softcap=cap, alibi_slopes=alibi,
        frame_tokens=frames[0], frame_window=frames[1], text_tokens=frames[2], temporal=frames[3], dropout_p=p,
        return_lse=return_lse,
    )  # fmt: skip
    call = _attention_call(q, k, v, opts, generator)
    return AttentionPlan([Request(call, backend)], opts, deterministic, generator)


def _draw_seed(opts: AttentionOptions, generator, device) -> AttentionOptions:
    """The dropout seed of one call, drawn from ``generator`` (torch's default generator of the device when
    None); fastvl's backends regenerate the keep mask from it in the backward."""
    if opts.dropout_p == 0:
        return opts
    where = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=where)
    return dataclasses.replace(opts, dropout_seed=int(seed))


def _run_peer(name: str, q, k, v, opts: AttentionOptions):
    """A peer's (out, lse or None)."""
    peer = implementation(OP, name)
    if opts.shift is None:
        return peer(q, k, v, opts)
    # a peer that accepted offsets (sdpa on the CPU) sees rolled copies; its output is rolled back
    shift, T = opts.shift, opts.num_frames
    q, k, v = (roll_rows(t, shift, T) for t in (q, k, v))
    kpm = None if opts.key_padding_mask is None else roll_rows(opts.key_padding_mask, shift, T)
    bias = opts.key_bias
    if bias is not None:
        bias = roll_rows(bias.transpose(1, 2), shift, T).transpose(1, 2)
    out, lse = peer(q, k, v, dataclasses.replace(opts, key_padding_mask=kpm, key_bias=bias, shift=None))
    return roll_rows(out, shift, T, inverse=True), lse


def _run(plan: AttentionPlan, q, k, v):
    """(out, lse (H, rows) natural log or None) of the planned call."""
    (name,) = plan.choose()
    opts = plan.options
    if get(OP, name).peer:
        return _run_peer(name, q, k, v, opts)
    opts = _draw_seed(opts, plan.generator, q.device)
    return _attn_op(q, k, v, *opts.flat(), name)


@public_op(prepare)
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    frame_tokens: int | None = None,
    frame_window: int | None = None,
    text_tokens: int = 0,
    spatial_only: bool = False,
    temporal_only: bool = False,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    deterministic: bool = False,
    frame_offsets: torch.Tensor | None = None,
    num_frames: int = 1,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention ``softmax(q k^T * scale + bias) v`` per head, softmax in fp32.

    q ``(N, Sq, H, D)``, k/v ``(N, Sk, H_k, D)`` with ``H % H_k == 0`` (GQA / MQA), fp16/bf16/fp32 (fp64 on
    the reference), any strides -> ``(N, Sq, H, D)`` in q's dtype.

    ``dropout_p``: attention dropout (keep probability ``1 - p``, kept weights scaled by ``1 / (1 - p)``; the
    mask is drawn from ``generator``, torch's default one of the device when None, and regenerated in the
    backward). ``softmax_scale`` defaults to ``1/sqrt(D)``. ``causal``: bottom-right aligned (flash-attn).
    ``window_size=(left, right)``: query i sees keys ``i + Sk - Sq - left .. i + Sk - Sq + right`` (-1 =
    unbounded; flash-attn's sliding window). ``softcap > 0``: scores become ``softcap * tanh(s / softcap)``.
    ``alibi_slopes (H,)`` or ``(N, H)`` fp32: ``- slope * |i + Sk - Sq - j|`` added to the scores.
    ``key_bias (N, Sk)`` or ``(N, H, Sk)`` fp32: added to every query's score of key j (ToMe's proportional
    attention passes ``log(size)``); differentiable.
    Frame blocks (video, self-attention): ``frame_tokens=F`` tokens per frame after ``text_tokens`` leading
    tokens that see and are seen by every token; ``frame_window=w`` lets a video token attend to the frames
    within w of its own (0: its own frame); ``spatial_only`` is ``frame_window=0`` and ``temporal_only`` keeps
    the keys at the same spatial position in every frame (TimeSformer's divided space-time attention).
    ``return_lse``: also return the natural-log row log-sum-exp ``(N, H, Sq)`` fp32 (fp64 for fp64; ``+inf``
    for a row with no visible key), differentiable. ``key_padding_mask (N, Sk)`` bool, True = padded key to
    ignore; rows with no visible key give zeros. ``deterministic``: bitwise-repeatable gradients (fastvl's
    Triton backward then computes dQ in a second pass instead of adding it up with fp32 atomics; peers that
    cannot are skipped).
    ``frame_offsets (S,)`` int with ``num_frames=T``: roll-aware addressing (module docstring).
    fp32 inputs: the Triton kernel's dots are exact fp32 unless ``torch.get_float32_matmul_precision()`` allows
    tf32 (then ~1e-3 relative error, like torch's own tf32 matmuls).
    Returns ``out``, or ``(out, lse)`` with ``return_lse``.
    """
    plan = prepare(
        q, k, v, dropout_p, softmax_scale, causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, key_bias=key_bias, frame_tokens=frame_tokens, frame_window=frame_window,
        text_tokens=text_tokens, spatial_only=spatial_only, temporal_only=temporal_only, return_lse=return_lse,
        key_padding_mask=key_padding_mask, deterministic=deterministic, frame_offsets=frame_offsets,
        num_frames=num_frames, generator=generator, backend=backend,
    )  # fmt: skip
    out, lse = _run(plan, q, k, v)
    if not return_lse:
        return out
    N, Sq, H = q.shape[:3]
    return out, lse.view(H, N, Sq).transpose(0, 1)


def prepare_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
    *, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, key_bias=None, return_lse=False, deterministic=False,
    generator=None, backend=None,
) -> AttentionPlan:  # fmt: skip
    """Validate a :func:`flash_attention_varlen` call and plan its dispatch."""
    op = "flash_attention_varlen"
    checks.qkv(op, q, k, v, "(total_q, H, D)", "(total_k, H_k, D)", 3)
    max_q = validate.integer(op, "max_seqlen_q", max_seqlen_q, minimum=0)
    max_k = validate.integer(op, "max_seqlen_k", max_seqlen_k, minimum=0)
    checks.cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_q, q.device)
    checks.cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_k, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"{op}: argument 'cu_seqlens_k' must have cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)}, "
            f"got {tuple(cu_seqlens_k.shape)}"
        )
    p = checks.dropout(op, dropout_p, generator)
    validate.flag(op, "causal", causal)
    validate.flag(op, "deterministic", deterministic)
    validate.flag(op, "return_lse", return_lse)
    H = q.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    left, right = checks.window(op, window_size)
    cap = checks.softcap(op, softcap)
    alibi = checks.alibi(op, alibi_slopes, batch, H, q.device)
    bias = checks.key_bias(op, key_bias, 1, H, k.shape[0], q, varlen=True)
    validate.same_device(op, q=q, k=k, v=v, key_bias=key_bias, alibi_slopes=alibi_slopes)
    scale = checks.scale(op, softmax_scale, q.shape[-1])
    opts = AttentionOptions(
        None, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 1, scale, causal, deterministic, key_bias=bias,
        window_left=left, window_right=right, softcap=cap, alibi_slopes=alibi, dropout_p=p, return_lse=return_lse,
    )  # fmt: skip
    call = _attention_call(q, k, v, opts, generator)
    return AttentionPlan([Request(call, backend)], opts, deterministic, generator)


@public_op(prepare_varlen)
def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed variable-length sequences (flash-attn's ``flash_attn_varlen_func`` order).

    q ``(total_q, H, D)``, k/v ``(total_k, H_k, D)`` (``H % H_k == 0``); ``cu_seqlens_q/k`` int32
    ``(batch + 1,)`` offsets from 0, non-decreasing, ending at total; ``max_seqlen_q/k`` at least the longest
    sequence. Sequence b attends ``q[cu_q[b]:cu_q[b+1]]`` to ``k/v[cu_k[b]:cu_k[b+1]]``, each sequence aligned
    bottom-right on its own lengths (causal, window_size, alibi). ``alibi_slopes (H,)`` or ``(batch, H)``;
    ``key_bias (total_k,)`` or ``(H, total_k)`` fp32. The other arguments as :func:`flash_attention`.
    Returns ``(total_q, H, D)`` in q's dtype, or ``(out, lse)`` with lse ``(H, total_q)`` fp32 (flash-attn's
    varlen layout) with ``return_lse``.
    """
    plan = prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, key_bias=key_bias,
        return_lse=return_lse, deterministic=deterministic, generator=generator, backend=backend,
    )  # fmt: skip
    (name,) = plan.choose()
    opts = plan.options
    if get(OP, name).peer:
        out, lse = implementation(OP, name, "varlen")(q, k, v, opts)
    else:
        opts = _draw_seed(opts, plan.generator, q.device)
        out, lse = _attn_op(q, k, v, *opts.flat(), name)
    return (out, lse) if return_lse else out


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
