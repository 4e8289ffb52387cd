"""Attention over a packed qkv: the gradient is one ``d(qkv)`` buffer.

``flash_attention_qkvpacked(qkv (N, S, 3, H, D))`` and ``flash_attention_varlen_qkvpacked(qkv (total, 3, H, D),
cu_seqlens, max_seqlen)`` compute :func:`~fastvl.ops.flash_attention` of the three views ``qkv.unbind(-3)``. What
differs is the backward. Autograd through ``unbind`` allocates dq, dk and dv and stacks them into d(qkv): one more
read and write of ``3 N S H D`` elements after the attention backward. Here the backward allocates d(qkv) once and
fastvl's Triton kernel writes dq, dk and dv straight into its three strided views (flash-attn's
``flash_attn_qkvpacked_func`` does the same with its CUDA kernel).

Dispatch: the registry op ``flash_attention_qkvpacked`` has the backends of ``flash_attention`` with the same
declarations, and its call is the call :func:`~fastvl.ops.attention.prepare` builds for the three views, so auto
picks the backend it would pick for ``flash_attention(q, k, v, ...)``. Peers (SDPA, flash-attn, xformers) run on
the views with their own autograd (their gradients then go through ``unbind``'s stack); the reference
computes dq, dk, dv and stacks them (it is the spec, not a fast path).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from fastvl import backends, rules, validate
from fastvl.backends import Request, custom_op, get, implementation, public_op

from . import OP as ATTENTION_OP
from . import AttentionPlan, prepare, prepare_varlen
from .reference import AttentionOptions, attention_reference_backward, roll_rows

__all__ = [
    "OP",
    "flash_attention_qkvpacked",
    "flash_attention_varlen_qkvpacked",
    "prepare_qkvpacked",
    "prepare_varlen_qkvpacked",
    "qkvpacked_reference_backward",
    "qkvpacked_triton_backward",
]

OP = "flash_attention_qkvpacked"
_OPTIONS = AttentionOptions.schema()
_FIELDS = [f.name for f in dataclasses.fields(AttentionOptions)]
_BIAS = _FIELDS.index("key_bias")


def _views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv.unbind(-3)


def _no_bias(qkv: torch.Tensor) -> torch.Tensor:
    return qkv.new_empty(0, dtype=torch.float32)


# ---- backends: the forward is flash_attention's on the views; the backwards return (d(qkv), dbias) ----------


# Features fields named otherwise than the options they come from: field -> (value, the options it consumes)
_FEATURE_RENAMES = {
    "window": (lambda o: (o.window_left, o.window_right), ("window_left", "window_right")),
    "seed": (lambda o: o.dropout_seed, ("dropout_seed",)),
}


def kernel_arguments(opts: AttentionOptions) -> dict:
    """The keyword arguments of ``fastvl.kernels.attention.attention_backward`` for ``opts``: the options named
    like its keywords, and its ``features`` (a ``Features``) from the options named like Features' fields and
    :data:`_FEATURE_RENAMES`. An option in use that neither takes raises (never a silently different backward);
    ``return_lse`` is handled by the caller, on the host."""
    from fastvl.kernels.attention import attention_backward

    takes = inspect.signature(attention_backward).parameters
    args = {name: getattr(opts, name) for name in _FIELDS if name in takes}
    used = set(args) | {"return_lse"}
    if "features" in takes:
        features_type = type(takes["features"].default)
        names = {f.name for f in dataclasses.fields(features_type)}
        renamed = {n: (get(opts), fields) for n, (get, fields) in _FEATURE_RENAMES.items() if n in names}
        args["features"] = features_type(
            **{n: getattr(opts, n) for n in names if n in _FIELDS}, **{n: v for n, (v, _) in renamed.items()}
        )
        used |= names | {f for _, fields in renamed.values() for f in fields}
    unused = [f.name for f in dataclasses.fields(AttentionOptions) if f.name not in used and _in_use(opts, f)]
    if unused:
        raise NotImplementedError(
            f"{OP}: fastvl.kernels.attention.attention_backward takes no {', '.join(map(repr, unused))}; "
            "the Triton backend's declared features and its kernel disagree"
        )
    return args


def _in_use(opts: AttentionOptions, field: dataclasses.Field) -> bool:
    value = getattr(opts, field.name)
    if isinstance(value, torch.Tensor) or field.default is None:
        return value is not None
    return value != field.default


def qkvpacked_triton_backward(dout, qkv, out, lse, dlse, opts: AttentionOptions):
    """fastvl's Triton backward writing dq, dk, dv into the three views of one d(qkv)."""
    from fastvl.kernels.attention import LOG2E, attention_backward
    from fastvl.kernels.utils import empty

    if opts.return_lse:  # the forward returned the natural-log LSE; the kernel reads base 2
        lse = lse * LOG2E
    dqkv = empty(qkv.shape, qkv.dtype, qkv.device)
    dq, dk, dv = _views(dqkv)
    grads = attention_backward(
        dout, *_views(qkv), out, lse, dlse=dlse, dq=dq, dk=dk, dv=dv, **kernel_arguments(opts)
    )  # (dq, dk, dv), and dbias with a key bias
    return dqkv, (grads[3] if len(grads) > 3 else _no_bias(qkv))


def qkvpacked_reference_backward(dout, qkv, out, lse, dlse, opts: AttentionOptions):
    """The reference backward (plain PyTorch, fp32), its three gradients stacked: the spec, not a fast path."""
    dq, dk, dv, dbias = attention_reference_backward(dout, *_views(qkv), out, lse, dlse, opts)
    return torch.stack((dq, dk, dv), dim=-3), dbias


def _register() -> None:
    for name, backward in (("reference", qkvpacked_reference_backward), ("triton", qkvpacked_triton_backward)):
        b = get(ATTENTION_OP, name)
        backends.register(
            OP, name, b.priority, b.capabilities, check=b.check, requires=b.requires, description=b.description,
            forward=b.impls["forward"], backward=backward,
        )  # fmt: skip
    for b in backends.backends(ATTENTION_OP):
        if b.peer:
            backends.register(
                OP, b.name, b.priority, b.capabilities, check=b.check, requires=b.requires, peer=True,
                description=b.description, **b.impls,
            )  # fmt: skip


_register()


# ---- the custom ops --------------------------------------------------------------------------------


@custom_op(OP, f"(Tensor qkv, {_OPTIONS}, str backend) -> (Tensor, Tensor)")
def _packed_op(qkv, *options_and_backend):
    *options, backend = options_and_backend
    return implementation(OP, backend, "forward")(*_views(qkv), AttentionOptions(*options))


@_packed_op.register_fake
def _(qkv, key_padding_mask, shift, cu_seqlens_q, *_):
    q = qkv.select(-3, 0)
    rows = q.shape[0] if cu_seqlens_q is not None else q.shape[0] * q.shape[1]
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], rows), dtype=rules.compute_dtype(q.dtype))


@custom_op(
    f"{OP}_backward",
    f"(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? dlse, {_OPTIONS}, str backend) -> (Tensor, Tensor)",
)
def _packed_bwd_op(dout, qkv, out, lse, dlse, *options_and_backend):
    *options, backend = options_and_backend
    return implementation(OP, backend, "backward")(dout, qkv, out, lse, dlse, AttentionOptions(*options))


@_packed_bwd_op.register_fake
def _(dout, qkv, out, lse, dlse, *options_and_backend):
    bias = options_and_backend[_BIAS]
    return qkv.new_empty(qkv.shape), (bias.new_empty(bias.shape) if bias is not None else _no_bias(qkv))


def _setup(ctx, inputs, output):
    qkv, *options = inputs[:-1]
    out, lse = output
    tensors = [x if isinstance(x, torch.Tensor) else None for x in options]
    ctx.save_for_backward(qkv, out, lse, *tensors)
    ctx.scalars = [None if isinstance(x, torch.Tensor) else x for x in options] + [inputs[-1]]
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    qkv, out, lse, *tensors = ctx.saved_tensors
    *scalars, backend = ctx.scalars
    options = [t if s is None else s for t, s in zip(tensors, scalars)]
    grads = [None] * (len(options) + 1)
    if dout is None and dlse is None:
        return (None, *grads)
    if dout is None:
        dout = torch.zeros_like(out)
    dqkv, dbias = _packed_bwd_op(dout, qkv, out, lse, dlse, *options, backend)
    if options[_BIAS] is not None:
        grads[_BIAS] = dbias
    return (dqkv, *grads)


_packed_op.register_autograd(_backward, setup_context=_setup)


def packed_flops(qkv, *flat_options_and_backend, **_) -> int:
    """Forward FLOPs: flash_attention's formula on the three views."""
    from .backends import attention_flops

    return attention_flops(*_views(qkv), *flat_options_and_backend)


def packed_backward_flops(dout, qkv, out, lse, dlse, *flat_options_and_backend, **_) -> int:
    """Backward FLOPs: 2.5x the forward (the recomputed QK^T plus four matmuls), as flash_attention's."""
    return 5 * packed_flops(qkv, *flat_options_and_backend) // 2


def _register_flops() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for op, fn in (
        (torch.ops.fastvl.flash_attention_qkvpacked, packed_flops),
        (torch.ops.fastvl.flash_attention_qkvpacked_backward, packed_backward_flops),
    ):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(fn)


_register_flops()


# ---- validation, plans, the public functions -------------------------------------------------------


def _check_packed(op: str, qkv, ndim: int, layout: str) -> None:
    validate.tensor(op, "qkv", qkv, ndim=ndim, layout=layout)
    if qkv.shape[-3] != 3:
        raise ValueError(f"{op}: argument 'qkv' must have layout {layout} with 3 at dim -3, got {tuple(qkv.shape)}")


def _packed(plan: AttentionPlan, backend) -> AttentionPlan:
    call = dataclasses.replace(plan.requests[0].call, op=OP)
    return AttentionPlan([Request(call, backend)], plan.options, plan.deterministic, plan.generator)


def prepare_qkvpacked(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, *, backend=None, **options
) -> AttentionPlan:
    """Validate a :func:`flash_attention_qkvpacked` call and plan its dispatch."""
    _check_packed(OP, qkv, 5, "(N, S, 3, H, D)")
    plan = prepare(*_views(qkv), dropout_p, softmax_scale, causal, backend=backend, **options)
    return _packed(plan, backend)


def prepare_varlen_qkvpacked(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, *, backend=None, **options
) -> AttentionPlan:
    """Validate a :func:`flash_attention_varlen_qkvpacked` call and plan its dispatch."""
    _check_packed("flash_attention_varlen_qkvpacked", qkv, 4, "(total, 3, H, D)")
    q, k, v = _views(qkv)
    plan = prepare_varlen(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, backend=backend,
        **options,
    )  # fmt: skip
    return _packed(plan, backend)


def _with_seed(opts: AttentionOptions, generator, device) -> AttentionOptions:
    """The dropout seed of one call, drawn from ``generator`` (torch's default one of the device when None), as
    :func:`fastvl.ops.flash_attention` draws it; the backward regenerates the keep mask from it."""
    if opts.dropout_p == 0:
        return opts
    where = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=where)
    return dataclasses.replace(opts, dropout_seed=int(seed))


def _run_peer(name: str, qkv: torch.Tensor, opts: AttentionOptions):
    q, k, v = _views(qkv)
    if opts.varlen:
        return implementation(OP, name, "varlen")(q, k, v, opts)
    peer = implementation(OP, name)
    if opts.shift is None:
        return peer(q, k, v, opts)
    # a peer that accepts roll offsets (sdpa on the CPU) sees rolled copies; its output is rolled back
    shift, T = opts.shift, opts.num_frames
    q, k, v = (roll_rows(t, shift, T) for t in (q, k, v))
    kpm, bias = opts.key_padding_mask, opts.key_bias
    kpm = None if kpm is None else roll_rows(kpm, shift, T)
    bias = None if bias is None else roll_rows(bias.transpose(1, 2), shift, T).transpose(1, 2)
    out, lse = peer(q, k, v, dataclasses.replace(opts, key_padding_mask=kpm, key_bias=bias, shift=None))
    return roll_rows(out, shift, T, inverse=True), lse


def _run(qkv: torch.Tensor, plan: AttentionPlan):
    """(out, lse (H, rows) natural log, or None from a peer without return_lse)."""
    (name,) = plan.choose()
    if get(OP, name).peer:
        return _run_peer(name, qkv, plan.options)
    opts = _with_seed(plan.options, plan.generator, qkv.device)
    return _packed_op(qkv, *opts.flat(), name)


@public_op(prepare_qkvpacked)
def flash_attention_qkvpacked(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    backend: str | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of a packed ``qkv (N, S, 3, H, D)`` (fp16/bf16/fp32, any strides) -> ``(N, S, H, D)`` in
    qkv's dtype: ``flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...)`` whose gradient is one
    ``(N, S, 3, H, D)`` tensor written by the attention backward (no stack of dq, dk, dv).

    ``dropout_p``, ``softmax_scale`` (default ``1/sqrt(D)``), ``causal`` and every keyword of
    :func:`fastvl.ops.flash_attention` in ``options`` (``window_size``, ``softcap``, ``alibi_slopes``,
    ``key_bias``, ``key_padding_mask (N, S)``, frame blocks, ``frame_offsets`` / ``num_frames``,
    ``deterministic``, ``generator``, ``return_lse``) mean what they mean there. Returns ``out``, or
    ``(out, lse (N, H, S) fp32)`` with ``return_lse=True``.
    """
    plan = prepare_qkvpacked(qkv, dropout_p, softmax_scale, causal, backend=backend, **options)
    out, lse = _run(qkv, plan)
    if not plan.options.return_lse:
        return out
    N, S, _, H, _ = qkv.shape
    return out, lse.view(H, N, S).transpose(0, 1)


@public_op(prepare_varlen_qkvpacked)
def flash_attention_varlen_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    backend: str | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Self-attention over packed variable-length sequences of one ``qkv (total, 3, H, D)`` -> ``(total, H, D)``:
    :func:`fastvl.ops.flash_attention_varlen` of the three views with ``cu_seqlens`` int32 ``(batch + 1,)`` for
    both q and k and ``max_seqlen`` at least the longest sequence; the gradient is one ``(total, 3, H, D)``
    tensor. ``options``: the keywords of :func:`fastvl.ops.flash_attention_varlen`. Returns ``out``, or
    ``(out, lse (H, total) fp32)`` with ``return_lse=True``.
    """
    plan = prepare_varlen_qkvpacked(
        qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, backend=backend, **options
    )
    out, lse = _run(qkv, plan)
    return (out, lse) if plan.options.return_lse else out


def example(device: torch.device, small: bool):
    """All-in-one-B's self-attention on its qkv projection: 96 sequences of 237 tokens, 12 heads of 64 (bf16),
    text padding."""
    N, S, H, D = (3, 11, 2, 16) if small else (96, 237, 12, 64)
    new = torch.randn if small else torch.empty
    qkv = new(N, S, 3, H, D, dtype=torch.bfloat16, device=device)
    kpm = torch.zeros(N, S, dtype=torch.bool, device=device)
    kpm[:, 2:4] = True
    return "flash_attention_qkvpacked", (qkv,), {"key_padding_mask": kpm}


def example_varlen(device: torch.device, small: bool):
    """Packed sequences of 3 lengths in one qkv, causal (fp16)."""
    lengths = (5, 11, 2) if small else (512, 1024, 77)
    H, D = (2, 16) if small else (12, 64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    new = torch.randn if small else torch.empty
    qkv = new(sum(lengths), 3, H, D, dtype=torch.float16, device=device)
    return "flash_attention_varlen_qkvpacked", (qkv, cu, max(lengths)), {"causal": True}


backends.register_example(OP, example)
backends.register_example(OP, example_varlen)
