"""Attention backends: fastvl's Triton kernel and the peers, their declared capabilities, registration, the
example calls and the FLOP formulas.

Roles: ``forward(q, k, v, opts) -> (out, lse)``, ``backward(dout, q, k, v, out, lse, dlse, opts) -> (dq, dk, dv,
dbias)`` in fastvl's custom op (``lse (H, rows)``: the backend's own, natural log when ``opts.return_lse``; dbias
empty without a key bias); peers, outside it: ``forward(q, k, v, opts) -> (out, lse or None)``, flash_attn's
``varlen(q, k, v, opts)``; ``attention_rows``: ``forward(q_rows, k, lse, key_bias, kpm, scale, softcap)``.

Features a call can use (``Call.features``): ``key_padding_mask``, ``frame_offsets`` (roll-aware addressing),
``varlen`` (cu_seqlens), ``deterministic`` (bitwise-repeatable gradients), ``causal``, ``causal_bottom_right``
(causal with Sq != Sk: flash-attn's bottom-right alignment), ``gqa`` (fewer k/v heads), ``key_bias``,
``window`` (flash-attn's sliding window), ``window_bottom_right`` (a window with Sq != Sk), ``frame_blocks``
(frame-local windows), ``temporal_only`` (divided attention's temporal half), ``softcap``, ``alibi``,
``dropout``, ``generator`` (dropout drawn from a given torch.Generator), ``return_lse``.

Why auto ranks them as it does (not measured on a GPU yet; revisit with benchmarks/results):
  flash_attn (40)  the reference FA2/FA3 CUDA kernels when installed: the fastest known for plain
                   fp16/bf16 attention; no key padding (fastvl does not unpad for it), no roll offsets
  sdpa (30)        torch SDPA, which picks its flash / cuDNN kernels for fp16/bf16 without a mask:
                   tuned per GPU by PyTorch; auto takes it only where it keeps those kernels
  xformers (25)    memory-efficient CUTLASS kernels when installed
  triton (20)      fastvl's kernel: the one that serves key padding without leaving the fast path,
                   roll offsets, varlen, fp32, deterministic gradients, any S, and the score features
  reference (0)    plain PyTorch math in fp32 (the spec; the CPU path)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fastvl import backends
from fastvl.backends import Call
from fastvl.capabilities import Capabilities, Limit, triton_kernel
from fastvl.rules import KERNEL_DTYPES, roll_count

from .reference import (
    AttentionOptions,
    attention_reference,
    attention_reference_backward,
    attention_rows_reference,
    visible,
)

OP = "flash_attention"
ROWS_OP = "attention_rows"
FEATURES = frozenset(
    {
        "key_padding_mask", "frame_offsets", "varlen", "deterministic", "causal", "causal_bottom_right", "gqa",
        "key_bias", "window", "window_bottom_right", "frame_blocks", "temporal_only", "softcap", "alibi", "dropout",
        "generator", "return_lse",
    }
)  # fmt: skip
ROWS_FEATURES = frozenset({"gqa", "key_bias", "key_padding_mask", "softcap"})
_HALF = (torch.float16, torch.bfloat16)
LN2 = math.log(2.0)

# ---- fastvl's kernel ---------------------------------------------------------------------------

TRITON_FEATURES = FEATURES  # what fastvl's Triton kernels serve: every feature of the reference


def _kernel_args(opts: AttentionOptions) -> dict:
    from fastvl.kernels.attention import Features

    features = Features(
        key_bias=opts.key_bias, window=(opts.window_left, opts.window_right), softcap=opts.softcap,
        alibi_slopes=opts.alibi_slopes, frame_tokens=opts.frame_tokens, frame_window=opts.frame_window,
        text_tokens=opts.text_tokens, temporal=opts.temporal, dropout_p=opts.dropout_p, seed=opts.dropout_seed,
    )  # fmt: skip
    return {
        "scale": opts.scale,
        "causal": opts.causal,
        "key_padding_mask": opts.key_padding_mask,
        "shift": opts.shift,
        "num_frames": opts.num_frames,
        "cu_seqlens_q": opts.cu_seqlens_q,
        "cu_seqlens_k": opts.cu_seqlens_k,
        "max_seqlen_q": opts.max_seqlen_q,
        "max_seqlen_k": opts.max_seqlen_k,
        "features": features,
    }


def attention_triton(q, k, v, opts: AttentionOptions):
    """FA2-style flash attention: key padding, varlen, roll offsets, GQA, key bias, windows and frame blocks that
    skip the tiles outside them, softcap, ALiBi, Philox dropout, deterministic backward."""
    from fastvl.kernels.attention import attention_forward

    out, lse = attention_forward(q, k, v, **_kernel_args(opts))
    # the kernel's LSE is base 2; a returned one is the natural log (the backward converts it back)
    return out, (lse * LN2 if opts.return_lse else lse)


def attention_triton_backward(dout, q, k, v, out, lse, dlse, opts: AttentionOptions):
    from fastvl.kernels.attention import LOG2E, attention_backward

    if opts.return_lse:
        lse = lse * LOG2E
    grads = attention_backward(
        dout, q, k, v, out, lse, deterministic=opts.deterministic, dlse=dlse, **_kernel_args(opts)
    )
    if opts.key_bias is None:
        return (*grads, q.new_empty(0, dtype=torch.float32))
    return grads


def attention_rows_triton(q_rows, k, lse, key_bias, key_padding_mask, scale, softcap):
    """Softmax rows from the saved LSE, one program per (row block, key block, head)."""
    from fastvl.kernels.attention import attention_rows_forward

    return attention_rows_forward(q_rows, k, lse, scale=scale, key_bias=key_bias, key_padding_mask=key_padding_mask,
                                  softcap=softcap)  # fmt: skip


def attention_rows_reference_forward(q_rows, k, lse, key_bias, key_padding_mask, scale, softcap):
    """plain PyTorch exp(s - lse) (the spec)"""
    return attention_rows_reference(q_rows, k, lse, scale, key_bias, key_padding_mask, softcap)


# ---- peers: called with their own autograd, outside fastvl's custom op -------------------------


def _sdpa_mask(opts: AttentionOptions, N: int, Sk: int, device):
    """(attn_mask, rows with every key padded): a bool mask for key padding alone, a float one with a key bias."""
    kpm, bias = opts.key_padding_mask, opts.key_bias
    empty_rows = None
    if kpm is not None:
        empty_rows = kpm.all(1)  # sequences with every key padded: attend to all, then zero (no NaN)
        kpm = kpm & ~empty_rows[:, None]
    if bias is None:
        return (None if kpm is None else (~kpm)[:, None, None, :]), empty_rows
    mask = bias[:, :, None, :]
    if kpm is not None:
        mask = mask.masked_fill(kpm[:, None, None, :], float("-inf"))
    return mask, empty_rows


def sdpa(q, k, v, opts: AttentionOptions):
    """torch scaled_dot_product_attention (CUDA flash/cuDNN; on the CPU torch's fused kernel)."""
    mask, empty_rows = _sdpa_mask(opts, q.shape[0], k.shape[1], q.device)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=opts.dropout_p,
        is_causal=opts.causal, scale=opts.scale, **gqa,
    ).transpose(1, 2)  # fmt: skip
    if empty_rows is not None:
        out = out * (~empty_rows)[:, None, None, None].to(out.dtype)
    return out, None


def _flash_attn_kwargs(opts: AttentionOptions) -> dict:
    kw = dict(dropout_p=opts.dropout_p, softmax_scale=opts.scale, causal=opts.causal,
              window_size=(opts.window_left, opts.window_right), alibi_slopes=opts.alibi_slopes,
              deterministic=opts.deterministic, return_attn_probs=opts.return_lse)  # fmt: skip
    if opts.softcap > 0:
        kw["softcap"] = opts.softcap
    if kw["alibi_slopes"] is not None and kw["alibi_slopes"].shape[0] == 1:
        kw["alibi_slopes"] = kw["alibi_slopes"][0]
    return kw


def flash_attn(q, k, v, opts: AttentionOptions):
    """flash-attn package (flash_attn_func / flash_attn_varlen_func)."""
    from flash_attn import flash_attn_func

    res = flash_attn_func(q, k, v, **_flash_attn_kwargs(opts))
    if not opts.return_lse:
        return res, None
    out, lse = res[0], res[1]  # lse (N, H, Sq)
    return out, lse.transpose(0, 1).reshape(lse.shape[1], -1)


def flash_attn_varlen(q, k, v, opts: AttentionOptions):
    from flash_attn import flash_attn_varlen_func

    res = flash_attn_varlen_func(
        q, k, v, opts.cu_seqlens_q, opts.cu_seqlens_k, opts.max_seqlen_q, opts.max_seqlen_k, **_flash_attn_kwargs(opts)
    )
    return (res[0], res[1]) if opts.return_lse else (res, None)


def xformers(q, k, v, opts: AttentionOptions):
    """xformers memory_efficient_attention."""
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if opts.causal else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=opts.dropout_p, scale=opts.scale), None


# ---- declarations ------------------------------------------------------------------------------

_TOP_LEFT = "causal with Sq={Sq} != Sk={Sk}: {what} is top-left aligned, fastvl's bottom-right"
_NO_LSE = "return_lse: {what} does not return the log-sum-exp"
_NO_GEN = "generator: {what} draws dropout from torch's default generator, not a given one"
_FRAMES = "{f}: frame-block windows are fastvl's own ({what} would need a materialised mask)"


def _peer_notes(what: str, served: set[str]) -> dict[str, str]:
    notes = {
        "return_lse": _NO_LSE.format(what=what),
        "generator": _NO_GEN.format(what=what),
        "frame_blocks": _FRAMES.format(f="frame_blocks", what=what),
        "temporal_only": _FRAMES.format(f="temporal_only", what=what),
        "key_bias": f"key_bias: {what} takes no per-key bias",
        "window": f"window: {what} has no sliding window",
        "window_bottom_right": f"window_bottom_right: {what} has no sliding window",
        "softcap": f"softcap: {what} has no tanh soft-capping",
        "alibi": f"alibi: {what} takes no ALiBi slopes",
        "gqa": f"gqa: fastvl does not pass grouped k/v heads to {what}",
        "dropout": f"dropout: {what} has no attention dropout",
    }
    return {f: n for f, n in notes.items() if f not in served}


def fused_peer(name: str, dtypes, features: set[str], **notes: str) -> Capabilities:
    """A peer library's fused CUDA attention: head dims that are multiples of 8 up to 256, no roll offsets."""
    rolled = f"frame_offsets: roll-aware addressing is fastvl's own ({name} would need rolled copies of q, k, v)"
    return Capabilities(
        devices=("cuda",),
        dtypes=dtypes,
        dtype_args=("q",),
        limits=(Limit("D", "head dim D", 256, 8, why=f"{name}'s fused kernels need D % 8 == 0 and D <= 256"),),
        features=frozenset(features),
        notes={"frame_offsets": rolled} | _peer_notes(name, set(features)) | notes,
    )


def sdpa_special_case(call: Call) -> list[str]:
    """SDPA takes either is_causal or an attn_mask, not both."""
    masked = call.tensors.get("key_padding_mask") is not None or call.tensors.get("key_bias") is not None
    if call.params["causal"] and masked:
        return ["causal with key_padding_mask or key_bias: SDPA takes either is_causal or an attn_mask"]
    return []


TRITON = triton_kernel(
    dtype_args=("q",),
    limits=(
        Limit("D", "head dim D", 128, why="the kernel keeps a (block, D) tile of q, k, v and the accumulator on chip"),
        Limit("NH", "N*H", 65535, why="the launch grid's second dimension"),
    ),
    features=TRITON_FEATURES,
)
_SDPA_NOTES = {
    "varlen": "varlen: torch SDPA has no cu_seqlens interface",
    "causal_bottom_right": _TOP_LEFT.replace("{what}", "SDPA's is_causal"),
}
_SDPA_SERVES = {"key_padding_mask", "causal", "gqa", "key_bias", "dropout"}
SDPA = (
    # the CPU path: torch's fused CPU attention; roll-aware offsets by gathering rows (as the reference does)
    Capabilities(
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64, torch.bfloat16),
        dtype_args=("q",),
        features=frozenset(_SDPA_SERVES | {"frame_offsets", "deterministic"}),
        notes=_peer_notes("SDPA", _SDPA_SERVES) | _SDPA_NOTES,
    ),
    dataclasses.replace(
        fused_peer(
            "sdpa",
            KERNEL_DTYPES,
            _SDPA_SERVES,
            **_SDPA_NOTES,
            auto_dtypes="SDPA leaves its flash/cuDNN kernels for float32",
            deterministic="deterministic=True: SDPA's fused backward kernels do not promise bitwise-repeatable "
            "gradients",
            key_padding_mask="key_padding_mask: a mask moves SDPA off its flash/cuDNN kernels; fastvl's triton "
            "kernel masks natively (name backend='sdpa' to use SDPA's masked path anyway)",
            key_bias="key_bias: an additive mask moves SDPA off its flash/cuDNN kernels (name backend='sdpa' to use "
            "SDPA's masked path anyway)",
        ),
        auto_dtypes=_HALF,  # float32 only by name: SDPA then leaves its flash/cuDNN kernels
        named_only=frozenset({"key_padding_mask", "key_bias"}),
    ),
)
FLASH_ATTN = fused_peer(
    "flash_attn",
    _HALF,
    {
        "varlen",
        "deterministic",
        "causal",
        "causal_bottom_right",
        "gqa",
        "window",
        "window_bottom_right",
        "softcap",
        "alibi",
        "dropout",
        "return_lse",
    },  # fmt: skip
    key_padding_mask="key_padding_mask: fastvl does not unpad for flash_attn (pass packed sequences to the varlen op)",
)
XFORMERS = fused_peer(
    "xformers",
    KERNEL_DTYPES,
    {"causal", "dropout"},
    varlen="varlen: fastvl does not build xformers' block-diagonal bias",
    key_padding_mask="key_padding_mask: fastvl does not build an xformers bias for it",
    deterministic="deterministic=True: xformers' backward is not bitwise repeatable",
    causal_bottom_right=_TOP_LEFT.replace("{what}", "xformers' LowerTriangularMask"),
)

backends.register(
    OP, "reference", 0, Capabilities(features=FEATURES), forward=attention_reference,
    backward=attention_reference_backward, description="plain PyTorch math in fp32 (the spec)",
)  # fmt: skip
backends.register(
    OP, "triton", 20, TRITON, requires="triton", forward=attention_triton, backward=attention_triton_backward
)
backends.register(OP, "sdpa", 30, SDPA, check=sdpa_special_case, peer=True, forward=sdpa)
backends.register(
    OP, "flash_attn", 40, FLASH_ATTN, requires="flash_attn", peer=True, forward=flash_attn, varlen=flash_attn_varlen
)
backends.register(OP, "xformers", 25, XFORMERS, requires="xformers", peer=True, forward=xformers)

backends.register(ROWS_OP, "reference", 0, Capabilities(features=ROWS_FEATURES),
                  forward=attention_rows_reference_forward)  # fmt: skip
ROWS_TRITON = triton_kernel(
    dtype_args=("q_rows",),
    limits=(Limit("D", "head dim D", 128, why="the kernel keeps a (block, D) tile of q and k on chip"),),
    features=ROWS_FEATURES,
)
backends.register(ROWS_OP, "triton", 20, ROWS_TRITON, requires="triton", forward=attention_rows_triton)


def example(device: torch.device, small: bool):
    """All-in-one-B's fused block: B*T = 32*3 sequences of 40 text + 197 video tokens, 12 heads of 64 (bf16),
    text padding, rolled by frame offsets."""
    B, T, text, L, H, D = (2, 3, 4, 13, 2, 16) if small else (32, 3, 40, 197, 12, 64)
    new = torch.randn if small else torch.empty
    q, k, v = (new(B * T, text + L, H, D, dtype=torch.bfloat16, device=device) for _ in range(3))
    kpm = torch.zeros(B * T, text + L, dtype=torch.bool, device=device)
    kpm[:, text // 2 : text] = True
    f = roll_count(L, 0.125)  # All-in-one's offsets before the first block (fastvl.ops.roll_frame_offsets)
    offsets = torch.zeros(text + L, dtype=torch.int64, device=device)
    offsets[text + 1 : text + 1 + f], offsets[text + L - f :] = -1, 1
    return OP, (q, k, v), {"key_padding_mask": kpm, "frame_offsets": offsets, "num_frames": T}


def example_varlen(device: torch.device, small: bool):
    """Packed sequences of 3 lengths, causal (fp16)."""
    lengths = (5, 11, 2) if small else (512, 1024, 77)
    H, D = (2, 16) if small else (12, 64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    new = torch.randn if small else torch.empty
    q, k, v = (new(sum(lengths), H, D, dtype=torch.float16, device=device) for _ in range(3))
    return "flash_attention_varlen", (q, k, v, cu, cu, max(lengths), max(lengths)), {"causal": True}


def example_rows(device: torch.device, small: bool):
    """SMAUG-style scoring at VATT-M's video tokens: the CLS row of 8 clips x 12 heads over 1 + 1568 keys,
    with ToMe's proportional-attention bias (fp16 q, k; fp32 LSE)."""
    B, R, S, H, D = (2, 1, 23, 2, 16) if small else (8, 1, 1569, 12, 64)
    new = torch.randn if small else torch.empty
    q = new(B, R, H, D, dtype=torch.float16, device=device)
    k = new(B, S, H, D, dtype=torch.float16, device=device)
    lse = torch.full((B, H, R), 5.0, device=device)
    bias = torch.zeros(B, S, device=device)
    return ROWS_OP, (q, k, lse), {"key_bias": bias}


backends.register_example(OP, example)
backends.register_example(OP, example_varlen)
backends.register_example(ROWS_OP, example_rows)


# ---- FLOP formulas (FlopCounterMode): 4 N H Sq Sk D forward (half when causal; the attended pairs with a
# window or frame blocks), 2.5x that backward
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


def attention_flops(q, k, v, *flat_options_and_backend, **_) -> int:
    """Dense with a window or frame blocks: the attended (query, key) pairs (key padding not subtracted)."""
    opts = AttentionOptions(*flat_options_and_backend[:-1])
    H, D = q.shape[-2], q.shape[-1]
    if not opts.varlen and (opts.windowed or opts.frame_tokens > 0):
        try:
            Sq, Sk = q.shape[1], k.shape[1]
            pairs = int(visible(Sq, Sk, opts, None, "cpu").sum())
            return 4 * q.shape[0] * pairs * H * D
        except Exception:  # symbolic sizes under compile: the dense count below
            pass
    f = 4 * _pairs(q, k, opts.cu_seqlens_q, opts.cu_seqlens_k, opts.max_seqlen_q, opts.max_seqlen_k) * H * D
    return f // 2 if opts.causal else f


def attention_backward_flops(dout, q, k, v, out, lse, dlse, *flat_options_and_backend, **_) -> int:
    return 5 * attention_flops(q, k, v, *flat_options_and_backend) // 2


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


def register_flops(forward_op, backward_op) -> None:
    """Count fastvl's attention custom ops, and torch's fused CPU attention (the sdpa backend's CPU path, which
    torch charges nothing) like the CUDA variants, so FLOP reports do not depend on the device."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for op, fn in ((forward_op, attention_flops), (backward_op, attention_backward_flops)):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(fn)
    aten = torch.ops.aten
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_bwd_flops),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry and op.default not in flop_registry:
            register_flop_formula(op)(fn)
