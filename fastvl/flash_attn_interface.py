"""flash-attn 2's Python interface over fastvl's attention: change one import.

::

    # from flash_attn import flash_attn_func, flash_attn_varlen_func
    from fastvl.flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    # or: from fastvl import flash_attn_interface as flash_attn

The six functions take flash-attn 2.x's arguments in its positional order with its defaults and return what it
returns: ``out``, or ``(out, softmax_lse, None)`` with ``return_attn_probs=True`` (flash-attn's third value,
``S_dmask``, is None there too unless dropout is on, and is documented as for testing only; asking for it with
``dropout_p > 0`` raises). Semantics are flash-attn's: causal masks and sliding windows aligned to the
bottom-right corner of each sequence's (Sq, Sk) score matrix, a row with no visible key gives zeros and
``softmax_lse = +inf``, GQA/MQA by passing k/v with fewer heads, ``softcap``, ``alibi_slopes``, dropout, and a
``window_size`` entry ``>= seqlen_k`` meaning unbounded (flash-attn's C++ normalisation).

Each call dispatches like :func:`fastvl.ops.flash_attention` (``fastvl.use_backend(...)`` or
``FASTVL_BACKEND`` choose a backend; ``fastvl.explain`` on the fastvl op shows the reasons). The qkv-packed
functions run :func:`fastvl.ops.flash_attention_qkvpacked`, whose backward writes d(qkv) as one buffer like
flash-attn's; the kv-packed ones split kv into views (their d(kv) is assembled by autograd).

Differences from flash-attn 2: any head dim (fastvl's Triton kernel up to 128, the reference beyond), fp32 as
well as fp16/bf16, CPU tensors (the reference and torch SDPA); the dropout pattern is the chosen backend's (same
keep probability and scaling), not bitwise flash-attn's; ``block_table`` (paged KV cache) and
``flash_attn_with_kvcache`` are not provided; the padded fastvl API's ``key_padding_mask`` + ``causal`` aligns
differently from flash-attn's unpad-then-varlen (see docs/attention.md).
"""

from __future__ import annotations

import operator

import torch

from fastvl import ops

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def _window(fn: str, window_size, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's normalisation: an entry >= seqlen_k (or < 0) is unbounded (-1). Entries may be ints or
    integer 0-d tensors (flash-attn's tests pass ``torch.randint(0, seqlen_k, (2,))``)."""
    try:
        left, right = (operator.index(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(
            f"{fn}: argument 'window_size' must be a pair of ints (left, right), got {window_size!r}"
        ) from None
    return tuple(-1 if w < 0 or w >= seqlen_k else w for w in (left, right))


def _softcap(fn: str, softcap) -> float:
    """flash-attn's rule: softcap <= 0 is off."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: argument 'softcap' must be a float (0.0 = off), got {type(softcap).__name__}")
    return float(softcap) if softcap > 0 else 0.0


def _check_probs(fn: str, dropout_p, return_attn_probs) -> None:
    if return_attn_probs and isinstance(dropout_p, (int, float)) and dropout_p > 0:
        raise ValueError(
            f"{fn}: argument 'return_attn_probs=True' with dropout_p={dropout_p} asks for flash-attn's S_dmask "
            "(the dropped-out attention pattern, for its tests only), which fastvl does not materialise; "
            "use dropout_p=0.0 for (out, softmax_lse, None), or fastvl.ops.attention_rows for chosen rows"
        )


def _result(res, return_attn_probs: bool):
    if not return_attn_probs:
        return res
    out, lse = res
    return out, lse, None


def _split(fn: str, name: str, packed: torch.Tensor, n: int, ndim: int, layout: str):
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a tensor {layout}, got {type(packed).__name__}")
    if packed.dim() != ndim or packed.shape[-3] != n:
        raise ValueError(f"{fn}: argument '{name}' must have layout {layout}, got shape {tuple(packed.shape)}")
    return packed.unbind(-3)


def _seqlen(fn: str, name: str, t, dim: int) -> int:
    if not isinstance(t, torch.Tensor) or t.dim() <= dim:
        raise TypeError(f"{fn}: argument '{name}' must be a tensor with at least {dim + 1} dims, got {t!r:.60}")
    return t.shape[dim]


def _int(fn: str, name: str, x) -> int:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        return int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{fn}: argument '{name}' must be an int, got {type(x).__name__}")
    return x


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention of a packed ``qkv`` (flash-attn's ``flash_attn_qkvpacked_func``); the backward writes d(qkv)
    as one tensor (no concatenation of dq, dk, dv). For MQA/GQA use the kv-packed or unpacked functions.

    qkv: (batch_size, seqlen, 3, nheads, headdim), fp16 / bf16 / fp32, any strides.
    dropout_p: float. Dropout probability on the attention weights (set 0.0 for evaluation); kept weights
        are scaled by 1 / (1 - dropout_p), the mask is drawn from torch's default generator of the device.
    softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
    causal: bool. Causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score matrix:
        query i sees key j iff j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros.
    window_size: (left, right). Sliding-window local attention: query i sees keys
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (or >= seqlen_k) is unbounded.
        With causal=True, right is 0.
    softcap: float. > 0 replaces the scaled scores s by softcap * tanh(s / softcap); <= 0 is off.
    alibi_slopes: (nheads,) or (batch_size, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j| to the
        score of query i and key j.
    deterministic: bool. Bitwise-repeatable backward (fastvl's Triton kernel computes dQ in a second pass).
    return_attn_probs: bool. Also return softmax_lse (the natural-log logsumexp of each row of the scaled,
        capped, biased scores; +inf for a row with no visible key) and None in S_dmask's place. Raises with
        dropout_p > 0 (flash-attn's dropout pattern S_dmask is not materialised).

    Returns out (batch_size, seqlen, nheads, headdim) in qkv's dtype; with return_attn_probs,
    (out, softmax_lse (batch_size, nheads, seqlen) fp32, None).
    """
    fn = "flash_attn_qkvpacked_func"
    _check_probs(fn, dropout_p, return_attn_probs)
    _split(fn, "qkv", qkv, 3, 5, "(batch_size, seqlen, 3, nheads, headdim)")
    res = ops.flash_attention_qkvpacked(
        qkv, dropout_p, softmax_scale, causal, window_size=_window(fn, window_size, qkv.shape[1]),
        softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_lse=bool(return_attn_probs),
    )  # fmt: skip
    return _result(res, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention with a packed ``kv`` (flash-attn's ``flash_attn_kvpacked_func``). MQA/GQA: kv may have fewer
    heads than q (nheads % nheads_k == 0); q head h reads kv head h // (nheads / nheads_k).

    q: (batch_size, seqlen_q, nheads, headdim); kv: (batch_size, seqlen_k, 2, nheads_k, headdim), q's dtype.
    dropout_p: float. Dropout probability on the attention weights (set 0.0 for evaluation); kept weights
        are scaled by 1 / (1 - dropout_p), the mask is drawn from torch's default generator of the device.
    softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
    causal: bool. Causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score matrix:
        query i sees key j iff j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros.
    window_size: (left, right). Sliding-window local attention: query i sees keys
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (or >= seqlen_k) is unbounded.
        With causal=True, right is 0.
    softcap: float. > 0 replaces the scaled scores s by softcap * tanh(s / softcap); <= 0 is off.
    alibi_slopes: (nheads,) or (batch_size, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j| to the
        score of query i and key j.
    deterministic: bool. Bitwise-repeatable backward (fastvl's Triton kernel computes dQ in a second pass).
    return_attn_probs: bool. Also return softmax_lse (the natural-log logsumexp of each row of the scaled,
        capped, biased scores; +inf for a row with no visible key) and None in S_dmask's place. Raises with
        dropout_p > 0 (flash-attn's dropout pattern S_dmask is not materialised).

    Returns out (batch_size, seqlen_q, nheads, headdim) in q's dtype; with return_attn_probs,
    (out, softmax_lse (batch_size, nheads, seqlen_q) fp32, None).
    """
    fn = "flash_attn_kvpacked_func"
    _check_probs(fn, dropout_p, return_attn_probs)
    k, v = _split(fn, "kv", kv, 2, 5, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    res = ops.flash_attention(
        q, k, v, dropout_p, softmax_scale, causal, window_size=_window(fn, window_size, kv.shape[1]),
        softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_lse=bool(return_attn_probs),
    )  # fmt: skip
    return _result(res, return_attn_probs)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention (flash-attn's ``flash_attn_func``). MQA/GQA: k/v may have fewer heads than q
    (nheads % nheads_k == 0); q head h reads k/v head h // (nheads / nheads_k).

    q: (batch_size, seqlen_q, nheads, headdim); k, v: (batch_size, seqlen_k, nheads_k, headdim), q's dtype
    (fp16 / bf16 / fp32), any strides.
    dropout_p: float. Dropout probability on the attention weights (set 0.0 for evaluation); kept weights
        are scaled by 1 / (1 - dropout_p), the mask is drawn from torch's default generator of the device.
    softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
    causal: bool. Causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score matrix:
        query i sees key j iff j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros.
    window_size: (left, right). Sliding-window local attention: query i sees keys
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (or >= seqlen_k) is unbounded.
        With causal=True, right is 0.
    softcap: float. > 0 replaces the scaled scores s by softcap * tanh(s / softcap); <= 0 is off.
    alibi_slopes: (nheads,) or (batch_size, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j| to the
        score of query i and key j.
    deterministic: bool. Bitwise-repeatable backward (fastvl's Triton kernel computes dQ in a second pass).
    return_attn_probs: bool. Also return softmax_lse (the natural-log logsumexp of each row of the scaled,
        capped, biased scores; +inf for a row with no visible key) and None in S_dmask's place. Raises with
        dropout_p > 0 (flash-attn's dropout pattern S_dmask is not materialised).

    Returns out (batch_size, seqlen_q, nheads, headdim) in q's dtype; with return_attn_probs,
    (out, softmax_lse (batch_size, nheads, seqlen_q) fp32, None).
    """
    fn = "flash_attn_func"
    _check_probs(fn, dropout_p, return_attn_probs)
    res = ops.flash_attention(
        q, k, v, dropout_p, softmax_scale, causal, window_size=_window(fn, window_size, _seqlen(fn, "k", k, 1)),
        softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_lse=bool(return_attn_probs),
    )  # fmt: skip
    return _result(res, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over variable-length sequences of one packed ``qkv`` (flash-attn's
    ``flash_attn_varlen_qkvpacked_func``); the backward writes d(qkv) as one tensor.

    qkv: (total, 3, nheads, headdim), total = the number of tokens of all sequences.
    cu_seqlens: (batch_size + 1,) int32 offsets of each sequence's rows in qkv.
    max_seqlen: int, at least the longest sequence.
    dropout_p: float. Dropout probability on the attention weights (set 0.0 for evaluation); kept weights
        are scaled by 1 / (1 - dropout_p), the mask is drawn from torch's default generator of the device.
    softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
    causal: bool. Causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score matrix:
        query i sees key j iff j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros.
    window_size: (left, right). Sliding-window local attention: query i sees keys
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (or >= seqlen_k) is unbounded.
        With causal=True, right is 0.
    softcap: float. > 0 replaces the scaled scores s by softcap * tanh(s / softcap); <= 0 is off.
    alibi_slopes: (nheads,) or (batch_size, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j| to the
        score of query i and key j.
    deterministic: bool. Bitwise-repeatable backward (fastvl's Triton kernel computes dQ in a second pass).
    return_attn_probs: bool. Also return softmax_lse (the natural-log logsumexp of each row of the scaled,
        capped, biased scores; +inf for a row with no visible key) and None in S_dmask's place. Raises with
        dropout_p > 0 (flash-attn's dropout pattern S_dmask is not materialised).

    Returns out (total, nheads, headdim) in qkv's dtype; with return_attn_probs,
    (out, softmax_lse (nheads, total) fp32, None).
    """
    fn = "flash_attn_varlen_qkvpacked_func"
    _check_probs(fn, dropout_p, return_attn_probs)
    _split(fn, "qkv", qkv, 3, 4, "(total, 3, nheads, headdim)")
    max_seqlen = _int(fn, "max_seqlen", max_seqlen)
    res = ops.flash_attention_varlen_qkvpacked(
        qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
        window_size=_window(fn, window_size, max_seqlen), softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=bool(return_attn_probs),
    )  # fmt: skip
    return _result(res, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over variable-length sequences with a packed ``kv`` (flash-attn's
    ``flash_attn_varlen_kvpacked_func``); MQA/GQA as :func:`flash_attn_kvpacked_func`.

    q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim).
    cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 offsets of each sequence's rows (from 0, non-decreasing,
        ending at total_q / total_k). Causal masks, windows and ALiBi are aligned per sequence on its own lengths.
    max_seqlen_q, max_seqlen_k: int, at least the longest sequence.
    dropout_p: float. Dropout probability on the attention weights (set 0.0 for evaluation); kept weights
        are scaled by 1 / (1 - dropout_p), the mask is drawn from torch's default generator of the device.
    softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
    causal: bool. Causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score matrix:
        query i sees key j iff j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros.
    window_size: (left, right). Sliding-window local attention: query i sees keys
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (or >= seqlen_k) is unbounded.
        With causal=True, right is 0.
    softcap: float. > 0 replaces the scaled scores s by softcap * tanh(s / softcap); <= 0 is off.
    alibi_slopes: (nheads,) or (batch_size, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j| to the
        score of query i and key j.
    deterministic: bool. Bitwise-repeatable backward (fastvl's Triton kernel computes dQ in a second pass).
    return_attn_probs: bool. Also return softmax_lse (the natural-log logsumexp of each row of the scaled,
        capped, biased scores; +inf for a row with no visible key) and None in S_dmask's place. Raises with
        dropout_p > 0 (flash-attn's dropout pattern S_dmask is not materialised).

    Returns out (total_q, nheads, headdim) in q's dtype; with return_attn_probs,
    (out, softmax_lse (nheads, total_q) fp32, None).
    """
    fn = "flash_attn_varlen_kvpacked_func"
    _check_probs(fn, dropout_p, return_attn_probs)
    k, v = _split(fn, "kv", kv, 2, 4, "(total_k, 2, nheads_k, headdim)")
    max_seqlen_q, max_seqlen_k = _int(fn, "max_seqlen_q", max_seqlen_q), _int(fn, "max_seqlen_k", max_seqlen_k)
    res = ops.flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size=_window(fn, window_size, max_seqlen_k), softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=bool(return_attn_probs),
    )  # fmt: skip
    return _result(res, return_attn_probs)


def flash_attn_varlen_func(
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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over variable-length sequences (flash-attn's ``flash_attn_varlen_func``); MQA/GQA as
    :func:`flash_attn_func`.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), total = the tokens of all sequences.
    cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 offsets of each sequence's rows (from 0, non-decreasing,
        ending at total_q / total_k). Causal masks, windows and ALiBi are aligned per sequence on its own lengths.
    max_seqlen_q, max_seqlen_k: int, at least the longest sequence.
    dropout_p: float. Dropout probability on the attention weights (set 0.0 for evaluation); kept weights
        are scaled by 1 / (1 - dropout_p), the mask is drawn from torch's default generator of the device.
    softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
    causal: bool. Causal mask aligned to the bottom-right corner of the (seqlen_q, seqlen_k) score matrix:
        query i sees key j iff j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros.
    window_size: (left, right). Sliding-window local attention: query i sees keys
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (or >= seqlen_k) is unbounded.
        With causal=True, right is 0.
    softcap: float. > 0 replaces the scaled scores s by softcap * tanh(s / softcap); <= 0 is off.
    alibi_slopes: (nheads,) or (batch_size, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j| to the
        score of query i and key j.
    deterministic: bool. Bitwise-repeatable backward (fastvl's Triton kernel computes dQ in a second pass).
    return_attn_probs: bool. Also return softmax_lse (the natural-log logsumexp of each row of the scaled,
        capped, biased scores; +inf for a row with no visible key) and None in S_dmask's place. Raises with
        dropout_p > 0 (flash-attn's dropout pattern S_dmask is not materialised).
    block_table: must be None (flash-attn's paged KV cache is not supported; raises otherwise).

    Returns out (total_q, nheads, headdim) in q's dtype; with return_attn_probs,
    (out, softmax_lse (nheads, total_q) fp32, None).
    """
    fn = "flash_attn_varlen_func"
    if block_table is not None:
        raise ValueError(
            f"{fn}: argument 'block_table' (a paged KV cache) is not supported by fastvl; pass block_table=None "
            "with k, v holding each sequence's rows contiguously"
        )
    _check_probs(fn, dropout_p, return_attn_probs)
    max_seqlen_q, max_seqlen_k = _int(fn, "max_seqlen_q", max_seqlen_q), _int(fn, "max_seqlen_k", max_seqlen_k)
    res = ops.flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size=_window(fn, window_size, max_seqlen_k), softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=bool(return_attn_probs),
    )  # fmt: skip
    return _result(res, return_attn_probs)
