"""Argument checks of the attention ops: each raises naming the argument, what it got and what it expected."""

from __future__ import annotations

import math

import torch

from fastvl import validate


def scale(op: str, softmax_scale, D: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    return validate.number(op, "softmax_scale", softmax_scale, lo=0.0, hi=math.inf, lo_open=True, hi_open=True)


def qkv(op, q, k, v, layout_q, layout_kv, ndim):
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
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{op}: argument 'k' must have q's head dim D={q.shape[-1]}, got shape {tuple(k.shape)} "
            f"(q {tuple(q.shape)})"
        )
    H, Hk = q.shape[-2], k.shape[-2]
    if Hk < 1 or H % Hk != 0:
        raise ValueError(
            f"{op}: argument 'k' must have a number of heads H_k dividing q's H={H} (GQA / MQA), got H_k={Hk} "
            f"(shape {tuple(k.shape)})"
        )
    if v.shape != k.shape:
        raise ValueError(f"{op}: argument 'v' must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: head dim D must be >= 1, got q shape {tuple(q.shape)}")


def dropout(op, dropout_p, generator) -> float:
    p = validate.number(op, "dropout_p", dropout_p, lo=0.0, hi=1.0, lo_open=False, hi_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: argument 'generator' must be a torch.Generator or None, got {type(generator).__name__}")
    return p


def window(op, window_size) -> tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{op}: argument 'window_size' must be a pair (left, right) of ints, got {window_size!r}")
    left = validate.integer(op, "window_size[0]", window_size[0], minimum=-1)
    right = validate.integer(op, "window_size[1]", window_size[1], minimum=-1)
    return left, right


def softcap(op, softcap) -> float:
    return validate.number(op, "softcap", softcap, lo=0.0, hi=math.inf, lo_open=False, hi_open=True)


def alibi(op, alibi_slopes, batch, H, device):
    if alibi_slopes is None:
        return None
    validate.tensor(op, "alibi_slopes", alibi_slopes, ndim=(1, 2), layout="(H,) or (batch, H)",
                    dtypes=(torch.float32,))  # fmt: skip
    if tuple(alibi_slopes.shape) not in ((H,), (batch, H)):
        raise ValueError(
            f"{op}: argument 'alibi_slopes' must have shape (H,)=({H},) or (batch, H)=({batch}, {H}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != device:
        raise ValueError(f"{op}: argument 'alibi_slopes' must be on q's device {device}, got {alibi_slopes.device}")
    return alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]


def key_bias(op, key_bias, batch, H, Sk, q, varlen):
    """The bias as ``(batch, Hb, Sk)`` (varlen: ``(1, Hb, total_k)``), a view of the argument."""
    if key_bias is None:
        return None
    shapes = ("(total_k,) or (H, total_k)", [(Sk,), (H, Sk)]) if varlen else ("(N, Sk) or (N, H, Sk)",
                                                                           [(batch, Sk), (batch, H, Sk)])  # fmt: skip
    layout, allowed = shapes
    dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    validate.tensor(op, "key_bias", key_bias, ndim=(1, 2) if varlen else (2, 3), layout=layout, dtypes=dtypes)
    if tuple(key_bias.shape) not in allowed:
        want = " or ".join(str(s) for s in allowed)
        raise ValueError(f"{op}: argument 'key_bias' must have shape {layout} = {want}, got {tuple(key_bias.shape)}")
    if varlen:
        return key_bias[None, None] if key_bias.dim() == 1 else key_bias[None]
    return key_bias[:, None] if key_bias.dim() == 2 else key_bias


def frames(op, frame_tokens, frame_window, text_tokens, spatial_only, temporal_only, Sq, Sk):
    """(frame_tokens, frame_window, text_tokens, temporal) of the frame-block rule; (0, -1, 0, False) when off."""
    validate.flag(op, "spatial_only", spatial_only)
    validate.flag(op, "temporal_only", temporal_only)
    text = validate.integer(op, "text_tokens", text_tokens, minimum=0)
    if frame_tokens is None:
        for name, used in (("frame_window", frame_window is not None), ("text_tokens", text != 0),
                           ("spatial_only", spatial_only), ("temporal_only", temporal_only)):  # fmt: skip
            if used:
                raise ValueError(f"{op}: argument '{name}' needs frame_tokens (the tokens per frame), got None")
        return 0, -1, 0, False
    F = validate.integer(op, "frame_tokens", frame_tokens, minimum=1)
    window = -1 if frame_window is None else validate.integer(op, "frame_window", frame_window, minimum=0)
    if spatial_only and temporal_only:
        raise ValueError(f"{op}: spatial_only and temporal_only are exclusive (each is half of divided attention)")
    if spatial_only:
        if window > 0:
            raise ValueError(f"{op}: spatial_only means frame_window=0, got frame_window={window}")
        window = 0
    if Sq != Sk:
        raise ValueError(f"{op}: frame_tokens needs self-attention lengths (Sq == Sk), got Sq={Sq}, Sk={Sk}")
    if text > Sk or (Sk - text) % F != 0:
        raise ValueError(
            f"{op}: the {Sk} tokens must be text_tokens={text} followed by whole frames of frame_tokens={F}, "
            f"got {Sk - text} video tokens"
        )
    return F, window, text, temporal_only


def cu_seqlens(op, name, cu, total, max_seqlen, device):
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
