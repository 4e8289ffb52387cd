"""fastvl.flash_attn_interface against flash-attn 2's own test grid, and the qkv-packed op's one-buffer gradient.

The helpers below are ported from flash-attn's ``tests/test_flash_attn.py`` and ``flash_attn/bert_padding.py``
(``attention_ref``, ``construct_local_mask``, ``attn_bias_from_alibi_slopes``, ``generate_random_padding_mask``,
``unpad_input`` / ``pad_input``, ``generate_qkv``) with flash-attn's meaning of a padding mask: True = a valid
token. The grid keeps each of flash-attn's axes (unequal lengths, head dims 32..128 including odd ones, causal,
local windows, softcap, ALiBi, MHA/GQA/MQA, deterministic, random padding through unpad/varlen, the packed
variants) at sizes the Triton interpreter affords, and its tolerance rule: the error against float64 is at most
2x the error of eager PyTorch in the same dtype (``fastvl.testing.assert_close``). Every case runs on each
backend that serves it (the declared capabilities decide, at collection).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils._python_dispatch import TorchDispatchMode

import fastvl
from fastvl import BackendError, backends
from fastvl import flash_attn_interface as flash_attn
from fastvl.testing import assert_close, device, kernel_backends

DEV = device()
BACKENDS = ["reference", "sdpa"] + kernel_backends("triton")


# ---- ported from flash-attn's tests (bert_padding.py, test_flash_attn.py) --------------------------------


def generate_random_padding_mask(max_seqlen, batch_size, device, mode="random"):
    """(batch, max_seqlen) bool, True = valid token; 'random': lengths in [max(1, max_seqlen - 20), max_seqlen]."""
    assert mode in ["full", "random", "third"]
    if mode == "full":
        lengths = torch.full((batch_size, 1), max_seqlen, device=device, dtype=torch.int32)
    elif mode == "random":
        lengths = torch.randint(max(1, max_seqlen - 20), max_seqlen + 1, (batch_size, 1), device=device)
    else:
        lengths = torch.randint(max_seqlen // 3, max_seqlen + 1, (batch_size, 1), device=device)
    return repeat(torch.arange(max_seqlen, device=device), "s -> b s", b=batch_size) < lengths


def unpad_input(hidden_states, attention_mask):
    """(batch, seqlen, ...) -> (total, ...), indices, cu_seqlens int32, max_seqlen, seqlens."""
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = rearrange(hidden_states, "b s ... -> (b s) ...")
    return flat[indices], indices, cu_seqlens, int(seqlens.max()), seqlens


def pad_input(hidden_states, indices, batch, seqlen):
    """(total, ...) -> (batch, seqlen, ...) with zeros at the padded positions."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return rearrange(out, "(b s) ... -> b s ...", b=batch)


def generate_qkv(q, k, v, query_padding_mask=None, key_padding_mask=None, kvpacked=False, qkvpacked=False):
    """flash-attn's generate_qkv: the unpadded (varlen) inputs of padded q, k, v and the functions that pad
    the varlen outputs and gradients back."""
    batch_size, seqlen_q, nheads, d = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    if query_padding_mask is not None:
        q_unpad, indices_q, cu_seqlens_q, max_seqlen_q, _ = unpad_input(q, query_padding_mask)
        output_pad_fn = lambda out: pad_input(out, indices_q, batch_size, seqlen_q)  # noqa: E731
    else:
        q_unpad = rearrange(q, "b s h d -> (b s) h d")
        cu_seqlens_q = torch.arange(0, (batch_size + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
        max_seqlen_q = seqlen_q
        output_pad_fn = lambda out: rearrange(out, "(b s) ... -> b s ...", b=batch_size)  # noqa: E731
    if key_padding_mask is not None:
        k_unpad, indices_k, cu_seqlens_k, max_seqlen_k, _ = unpad_input(k, key_padding_mask)
        v_unpad = unpad_input(v, key_padding_mask)[0]
        k_pad_fn = lambda g: pad_input(g, indices_k, batch_size, seqlen_k)  # noqa: E731
    else:
        k_unpad, v_unpad = (rearrange(t, "b s h d -> (b s) h d") for t in (k, v))
        cu_seqlens_k = torch.arange(0, (batch_size + 1) * seqlen_k, seqlen_k, dtype=torch.int32, device=k.device)
        max_seqlen_k = seqlen_k
        k_pad_fn = lambda g: rearrange(g, "(b s) ... -> b s ...", b=batch_size)  # noqa: E731
    if qkvpacked:
        assert nheads == nheads_k and (query_padding_mask == key_padding_mask).all()
        qkv_unpad = torch.stack([q_unpad, k_unpad, v_unpad], dim=1)
        return qkv_unpad.detach().requires_grad_(), cu_seqlens_q, max_seqlen_q, output_pad_fn
    if kvpacked:
        kv_unpad = torch.stack([k_unpad, v_unpad], dim=1)
        return (
            q_unpad.detach().requires_grad_(), kv_unpad.detach().requires_grad_(), cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, output_pad_fn, k_pad_fn,
        )  # fmt: skip
    return (
        q_unpad.detach().requires_grad_(), k_unpad.detach().requires_grad_(), v_unpad.detach().requires_grad_(),
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, output_pad_fn, k_pad_fn,
    )  # fmt: skip


def attn_bias_from_alibi_slopes(slopes, seqlen_q, seqlen_k, query_padding_mask=None, key_padding_mask=None):
    """-slope * |i + sk - sq - j| with each sequence's own lengths (flash-attn's non-causal form, which is also
    its causal bias up to a constant per row; this one keeps the LSE exact)."""
    slopes = rearrange(slopes, "b h -> b h 1 1")
    row_idx = rearrange(torch.arange(seqlen_q, device=slopes.device, dtype=torch.long), "s -> s 1")
    col_idx = torch.arange(seqlen_k, device=slopes.device, dtype=torch.long)
    sk = seqlen_k if key_padding_mask is None else rearrange(key_padding_mask.sum(-1), "b -> b 1 1 1")
    sq = seqlen_q if query_padding_mask is None else rearrange(query_padding_mask.sum(-1), "b -> b 1 1 1")
    relative_pos = torch.abs(row_idx + sk - sq - col_idx)
    return -slopes * relative_pos.to(dtype=slopes.dtype)


def construct_local_mask(seqlen_q, seqlen_k, window_size=(-1, -1), query_padding_mask=None, key_padding_mask=None,
                         device=None):  # fmt: skip
    """True = masked out by the (bottom-right aligned, per-sequence) window."""
    row_idx = rearrange(torch.arange(seqlen_q, device=device, dtype=torch.long), "s -> s 1")
    col_idx = torch.arange(seqlen_k, device=device, dtype=torch.long)
    sk = seqlen_k if key_padding_mask is None else rearrange(key_padding_mask.sum(-1), "b -> b 1 1 1")
    sq = seqlen_q if query_padding_mask is None else rearrange(query_padding_mask.sum(-1), "b -> b 1 1 1")
    if window_size[0] < 0:
        return col_idx > row_idx + sk - sq + window_size[1]
    sk = torch.full_like(col_idx, seqlen_k) if key_padding_mask is None else sk
    return torch.logical_or(
        col_idx > torch.minimum(row_idx + sk - sq + window_size[1], sk), col_idx < row_idx + sk - sq - window_size[0]
    )


def attention_ref(q, k, v, query_padding_mask=None, key_padding_mask=None, attn_bias=None, causal=False,
                  window_size=(-1, -1), softcap=0.0, upcast=True, reorder_ops=False):  # fmt: skip
    """flash-attn's attention_ref (no dropout), also returning the LSE ``(b, h, sq)`` (+inf for a row with no
    visible key, flash-attn's convention). ``upcast=False`` computes in the inputs' dtype (float64 inputs: the
    float64 reference; fp16: eager PyTorch in fp16, with ``reorder_ops`` scaling k instead of q)."""
    if causal:
        window_size = (window_size[0], 0)
    dtype_og = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    k = repeat(k, "b s h d -> b s (h g) d", g=q.shape[2] // k.shape[2])
    v = repeat(v, "b s h d -> b s (h g) d", g=q.shape[2] // v.shape[2])
    d = q.shape[-1]
    if not reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if key_padding_mask is not None:
        scores = scores.masked_fill(rearrange(~key_padding_mask, "b s -> b 1 1 s"), float("-inf"))
    local = window_size[0] >= 0 or window_size[1] >= 0
    if local:
        local_mask = construct_local_mask(seqlen_q, seqlen_k, window_size, query_padding_mask, key_padding_mask,
                                          q.device)  # fmt: skip
        scores = scores.masked_fill(local_mask, float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    lse = torch.logsumexp(scores.double() if upcast else scores, dim=-1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    attention = torch.softmax(scores, dim=-1).to(v.dtype)
    if local:  # rows with every key masked: zeros, not NaN
        attention = attention.masked_fill(torch.all(local_mask, dim=-1, keepdim=True), 0.0)
    if query_padding_mask is not None:
        attention = attention.masked_fill(rearrange(~query_padding_mask, "b s -> b 1 s 1"), 0.0)
    output = torch.einsum("bhts,bshd->bthd", attention, v)
    if query_padding_mask is not None:
        output = output.masked_fill(rearrange(~query_padding_mask, "b s -> b s 1 1"), 0.0)
    return output.to(dtype=dtype_og), lse


# ---- the grid ------------------------------------------------------------------------------------------

# (kind, seqlen_q, seqlen_k, d, mha_type, causal, local, softcap, alibi, deterministic, dtype)
_F32, _F16 = torch.float32, torch.float16
CASES = [
    ("func", 113, 203, 32, "mha", True, False, 0.0, False, False, _F16),
    ("func", 108, 256, 59, "gqa", False, False, 0.0, True, False, _F16),
    ("func", 113, 203, 128, "mqa", True, True, 0.0, False, False, _F32),
    ("func", 113, 211, 111, "mha", True, False, 0.0, True, True, _F32),
    ("func", 256, 512, 64, "mha", False, False, 50.0, False, False, _F32),
    ("func", 113, 203, 64, "gqa", False, False, 0.0, False, False, _F32),
    ("kvpacked", 1, 239, 40, "mqa", False, True, 0.0, False, False, _F32),
    ("kvpacked", 203, 113, 96, "mha", True, False, 0.0, False, True, _F16),
    ("qkvpacked", 97, 97, 64, "mha", True, False, 0.0, False, False, _F16),
    ("qkvpacked", 128, 128, 32, "mha", False, True, 0.0, True, False, _F32),
    ("qkvpacked", 97, 97, 40, "mha", False, False, 50.0, False, True, _F16),
    ("qkvpacked", 77, 77, 32, "mha", True, False, 0.0, False, False, _F32),
    ("varlen", 113, 203, 64, "mha", True, False, 0.0, False, False, _F16),
    ("varlen", 1, 239, 32, "mha", False, True, 0.0, False, False, _F32),
    ("varlen", 108, 256, 59, "mqa", False, False, 0.0, True, True, _F16),
    ("varlen", 128, 217, 32, "gqa", True, False, 50.0, False, False, _F32),
    ("varlen_kvpacked", 113, 203, 96, "gqa", True, True, 0.0, False, False, _F16),
    ("varlen_qkvpacked", 97, 97, 64, "mha", True, False, 0.0, False, False, _F32),
    ("varlen_qkvpacked", 128, 128, 128, "mha", False, False, 0.0, True, False, _F16),
]
BATCH = 2


def _heads(mha: str) -> tuple[int, int]:
    """(nheads, nheads_k): 2 heads (MQA: 1 k/v head), GQA 4 query heads on 2 k/v heads."""
    return {"mha": (2, 2), "mqa": (2, 1), "gqa": (4, 2)}[mha]


def _case_id(c) -> str:
    kind, sq, sk, d, mha, causal, local, cap, alibi, det, dtype = c
    flags = [n for n, on in (("causal", causal), ("local", local), ("softcap", cap), ("alibi", alibi),
                             ("det", det)) if on]  # fmt: skip
    return f"{kind}-{sq}x{sk}-d{d}-{mha}-{'+'.join(flags) or 'plain'}-{str(dtype)[6:]}"


def _inputs(case, dtype):
    """Fresh float64 draws (q scaled by softcap like flash-attn's test), the padding masks (varlen kinds),
    window, ALiBi slopes and bias. Values are rounded to ``dtype`` first so every computation sees the same."""
    kind, sq, sk, d, mha, causal, local, cap, alibi, det, _ = case
    h, hk = _heads(mha)
    q = torch.randn(BATCH, sq, h, d, dtype=torch.float64) * (cap if cap > 0 else 1.0)
    k = torch.randn(BATCH, sk, hk, d, dtype=torch.float64)
    v = torch.randn(BATCH, sk, hk, d, dtype=torch.float64)
    q, k, v = (t.to(dtype).double().to(DEV) for t in (q, k, v))
    window = tuple(torch.randint(0, sk, (2,)).tolist()) if local else (-1, -1)
    qmask = kmask = None
    if kind.startswith("varlen"):
        qmask = generate_random_padding_mask(sq, BATCH, DEV)
        kmask = qmask if kind == "varlen_qkvpacked" else generate_random_padding_mask(sk, BATCH, DEV)
    slopes = bias = None
    if alibi:
        slopes = (torch.rand(BATCH, h, dtype=torch.float32) * 0.3).to(DEV)
        bias = attn_bias_from_alibi_slopes(slopes.double(), sq, sk, qmask, kmask)
    return q, k, v, window, qmask, kmask, slopes, bias


def _run_interface(case, dtype, q, k, v, window, qmask, kmask, slopes, with_lse=True):
    """Call the flash-attn function of ``case`` flash-attn style (dropout_p positional, return_attn_probs=True)
    in ``dtype``; returns (out padded to (b, sq, h, d), lse (b, h, sq) with NaN at padded queries, leaves,
    function mapping the leaves' grads to padded (dq, dk, dv))."""
    kind, sq, sk, d, mha, causal, local, cap, alibi, det, _ = case
    kw = dict(causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes, deterministic=det,
              return_attn_probs=with_lse)  # fmt: skip
    call = _three if with_lse else _one
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if kind in ("func", "kvpacked", "qkvpacked"):
        if kind == "func":
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse, probs = call(flash_attn.flash_attn_func, *leaves, 0.0, **kw)
            grads = lambda g: g  # noqa: E731
        elif kind == "kvpacked":
            leaves = [q.clone().requires_grad_(), torch.stack([k, v], dim=2).requires_grad_()]
            out, lse, probs = call(flash_attn.flash_attn_kvpacked_func, *leaves, 0.0, **kw)
            grads = lambda g: (g[0], *g[1].unbind(2))  # noqa: E731
        else:
            leaves = [torch.stack([q, k, v], dim=2).requires_grad_()]
            out, lse, probs = call(flash_attn.flash_attn_qkvpacked_func, *leaves, 0.0, **kw)
            grads = lambda g: g[0].unbind(2)  # noqa: E731
        assert probs is None
        return out, lse, leaves, grads
    if kind == "varlen_qkvpacked":
        qkv, cu, max_s, out_pad = generate_qkv(q, k, v, qmask, kmask, qkvpacked=True)
        out, lse, probs = call(flash_attn.flash_attn_varlen_qkvpacked_func, qkv, cu, max_s, 0.0, **kw)
        leaves = [qkv]
        grads = lambda g: tuple(out_pad(t) for t in g[0].unbind(1))  # noqa: E731
        k_pad = out_pad
    elif kind == "varlen_kvpacked":
        q_u, kv_u, cu_q, cu_k, mq, mk, out_pad, k_pad = generate_qkv(q, k, v, qmask, kmask, kvpacked=True)
        out, lse, probs = call(flash_attn.flash_attn_varlen_kvpacked_func, q_u, kv_u, cu_q, cu_k, mq, mk, 0.0, **kw)
        leaves = [q_u, kv_u]
        grads = lambda g: (out_pad(g[0]), *(k_pad(t) for t in g[1].unbind(1)))  # noqa: E731
    else:
        q_u, k_u, v_u, cu_q, cu_k, mq, mk, out_pad, k_pad = generate_qkv(q, k, v, qmask, kmask)
        out, lse, probs = call(flash_attn.flash_attn_varlen_func, q_u, k_u, v_u, cu_q, cu_k, mq, mk, 0.0, **kw)
        leaves = [q_u, k_u, v_u]
        grads = lambda g: (out_pad(g[0]), k_pad(g[1]), k_pad(g[2]))  # noqa: E731
    assert probs is None
    if lse is None:
        return out_pad(out), None, leaves, grads
    assert lse.shape == (q.shape[2], out.shape[0]) and lse.dtype == torch.float32  # flash-attn's varlen layout
    lse_pad = rearrange(out_pad(rearrange(lse, "h t -> t h").float()), "b s h -> b h s")
    lse_pad = lse_pad.masked_fill(rearrange(~qmask, "b s -> b 1 s"), float("nan"))
    return out_pad(out), lse_pad, leaves, grads


def _three(fn, *args, **kw):
    """A call with return_attn_probs=True: (out, softmax_lse, None)."""
    return fn(*args, **kw)


def _one(fn, *args, **kw):
    """A call without return_attn_probs: out alone (LSE and S_dmask None here)."""
    return fn(*args, **kw), None, None


def _fastvl_call(case, dtype):
    """The fastvl op and arguments the interface calls for ``case`` (empty tensors): to ask the dispatch
    which backends serve it."""
    kind, sq, sk, d, mha, causal, local, cap, alibi, det, _ = case
    h, hk = _heads(mha)
    kw = dict(causal=causal, window_size=(3, 5) if local else (-1, -1), softcap=cap, deterministic=det,
              alibi_slopes=torch.zeros(h, device=DEV) if alibi else None)  # fmt: skip
    new = lambda *s: torch.empty(*s, dtype=dtype, device=DEV)  # noqa: E731
    if kind in ("func", "kvpacked"):
        return fastvl.ops.flash_attention, (new(1, sq, h, d), new(1, sk, hk, d), new(1, sk, hk, d)), kw
    if kind == "qkvpacked":
        return fastvl.ops.flash_attention_qkvpacked, (new(1, sq, 3, h, d),), kw
    cu_q = torch.tensor([0, sq], dtype=torch.int32, device=DEV)
    if kind == "varlen_qkvpacked":
        return fastvl.ops.flash_attention_varlen_qkvpacked, (new(sq, 3, h, d), cu_q, sq), kw
    cu_k = torch.tensor([0, sk], dtype=torch.int32, device=DEV)
    args = (new(sq, h, d), new(sk, hk, d), new(sk, hk, d), cu_q, cu_k, sq, sk)
    return fastvl.ops.flash_attention_varlen, args, kw


def serves(backend: str, case, return_lse: bool = True) -> bool:
    fn, args, kw = _fastvl_call(case, case[-1])
    try:
        fn.prepare(*args, backend=backend, **kw, return_lse=return_lse).choose()
    except BackendError:
        return False
    return True


def _grid():
    """(case, backend, with_lse): every backend that serves the case; return_attn_probs=True where the backend
    returns the LSE (SDPA does not: there the case runs with return_attn_probs=False)."""
    for case in CASES:
        for b in BACKENDS:
            for lse in (True, False):
                if serves(b, case, lse):
                    yield pytest.param(case, b, lse, id=f"{_case_id(case)}-{b}" + ("" if lse else "-nolse"))
                    break


GRID = list(_grid())


def test_the_grid_runs_where_it_should():
    """The collection filter is not vacuous: the reference serves every case, fastvl's Triton kernel (when it
    can run here) at least the plain causal ones of every kind it declares, SDPA some dense fp32 ones."""
    assert all(serves("reference", c) for c in CASES)
    ran = {(p.values[0][0], p.values[1]) for p in GRID}
    if "triton" in BACKENDS:
        assert {k for k, b in ran if b == "triton"} >= {"func", "kvpacked", "qkvpacked", "varlen", "varlen_qkvpacked"}
    assert {k for k, b in ran if b == "sdpa"} >= {"func", "qkvpacked"}


def _atol(ref: torch.Tensor, dtype: torch.dtype) -> float | None:
    """fp32: within 1e-5 of the tensor's scale (sums of a few hundred terms; the project's fp32 attention rule);
    fp16/bf16: the per-dtype tolerance, or 2x PyTorch's error (flash-attn's rule)."""
    return 1e-5 * max(1.0, ref.abs().max().item()) if dtype == torch.float32 else None


def _check_lse(lse, ref_lse, cap):
    """LSE (fp32 whatever the inputs) within fp32's tolerance of the float64 one; +inf where no key is visible;
    NaN marks padded queries (varlen), which have no LSE."""
    valid = ~torch.isnan(lse)
    assert torch.equal(torch.isinf(lse[valid]), torch.isinf(ref_lse[valid])), "softmax_lse: +inf rows differ"
    finite = valid & torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], torch.float32, rtol=2e-5, atol=2e-5 * max(1.0, cap),
                 name="softmax_lse")  # fmt: skip


@pytest.mark.parametrize("case,backend,with_lse", GRID)
def test_flash_attn_output(case, backend, with_lse):
    """Output, softmax_lse and the gradients against flash-attn's attention_ref in float64: at most 2x the error
    of eager PyTorch in the same dtype (flash-attn's rule), for the function kind of ``case``."""
    dtype = case[-1]
    kind, sq, sk, d, mha, causal, local, cap, alibi, det, _ = case
    q, k, v, window, qmask, kmask, slopes, bias = _inputs(case, dtype)
    with fastvl.use_backend(backend):
        out, lse, leaves, grads_of = _run_interface(case, dtype, q, k, v, window, qmask, kmask, slopes, with_lse)
    assert out.dtype == dtype and out.shape == q.shape
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    pt_leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    common = dict(attn_bias=bias, causal=causal, window_size=window, softcap=cap)
    ref, ref_lse = attention_ref(*ref_leaves, qmask, kmask, upcast=False, **common)
    pt, _ = attention_ref(*pt_leaves, qmask, kmask, upcast=False, reorder_ops=True, **common)
    assert_close(out, ref, dtype, torch_same_dtype=pt, atol=_atol(ref, dtype), name=f"out ({backend})")
    if with_lse:
        _check_lse(lse, ref_lse, cap)
    g = torch.randn(out.shape, dtype=torch.float64, device=DEV).to(dtype)
    if qmask is not None:
        g = g.masked_fill(rearrange(~qmask, "b s -> b s 1 1"), 0.0)
    got = grads_of(torch.autograd.grad(out, leaves, g))
    ref_g = torch.autograd.grad(ref, ref_leaves, g.double())
    pt_g = torch.autograd.grad(pt, pt_leaves, g)
    for name, a, r, p in zip(("dq", "dk", "dv"), got, ref_g, pt_g):
        assert_close(a, r, dtype, torch_same_dtype=p, atol=_atol(r, dtype), name=f"{name} ({backend})")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] in ("func", "qkvpacked", "varlen")], ids=lambda c: _case_id(c)[: -len("-float16")]
)
def test_flash_attn_output_bf16_gpu(case):
    """bf16 (the interpreter cannot run it): the same rule on the GPU, under auto dispatch."""
    dtype = torch.bfloat16
    kind, sq, sk, d, mha, causal, local, cap, alibi, det, _ = case
    q, k, v, window, qmask, kmask, slopes, bias = _inputs(case, dtype)
    out, lse, leaves, grads_of = _run_interface(case, dtype, q, k, v, window, qmask, kmask, slopes)
    common = dict(attn_bias=bias, causal=causal, window_size=window, softcap=cap)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    pt_leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref, _ = attention_ref(*ref_leaves, qmask, kmask, upcast=False, **common)
    pt, _ = attention_ref(*pt_leaves, qmask, kmask, upcast=False, reorder_ops=True, **common)
    assert_close(out, ref, dtype, torch_same_dtype=pt, name="out")
    g = torch.randn(out.shape, dtype=torch.float64, device=DEV).to(dtype)
    if qmask is not None:
        g = g.masked_fill(rearrange(~qmask, "b s -> b s 1 1"), 0.0)
    got = grads_of(torch.autograd.grad(out, leaves, g))
    for name, a, r, p in zip(
        ("dq", "dk", "dv"), got, torch.autograd.grad(ref, ref_leaves, g.double()), torch.autograd.grad(pt, pt_leaves, g)
    ):
        assert_close(a, r, dtype, torch_same_dtype=p, name=name)


# ---- drop-in: signatures, a flash-attn-style codebase, what is refused ---------------------------------

# flash-attn 2.x's signatures (flash_attn/flash_attn_interface.py): names, order, defaults
_COMMON = [
    ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
    ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False),
]  # fmt: skip
_REQUIRED = {
    "flash_attn_qkvpacked_func": ["qkv"],
    "flash_attn_kvpacked_func": ["q", "kv"],
    "flash_attn_func": ["q", "k", "v"],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
}


@pytest.mark.parametrize("name", sorted(_REQUIRED))
def test_signatures_are_flash_attn_2(name):
    params = list(inspect.signature(getattr(flash_attn, name)).parameters.values())
    expect = [(p, inspect.Parameter.empty) for p in _REQUIRED[name]] + _COMMON
    if name == "flash_attn_varlen_func":
        expect.append(("block_table", None))
    assert [(p.name, p.default) for p in params] == expect
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    doc = getattr(flash_attn, name).__doc__
    assert "headdim" in doc and "Returns" in doc and "softmax_lse" in doc


class FlashStyleSelfAttention(torch.nn.Module):
    """A module written against flash-attn (as in its own ``flash_attn.modules.mha``): a qkv Linear packed to
    (b, s, 3, h, d), ``flash_attn_qkvpacked_func(qkv, dropout, softmax_scale=..., causal=...)`` with dropout
    positional, and the varlen kernel for unpadded batches."""

    def __init__(self, fa, dim=32, heads=2, dropout=0.0, causal=True):
        super().__init__()
        self.fa, self.heads, self.dropout, self.causal = fa, heads, dropout, causal
        self.Wqkv = torch.nn.Linear(dim, 3 * dim)
        self.out_proj = torch.nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        qkv = rearrange(self.Wqkv(x), "... (three h d) -> ... three h d", three=3, h=self.heads)
        p = self.dropout if self.training else 0.0
        if cu_seqlens is None:
            ctx = self.fa.flash_attn_qkvpacked_func(qkv, p, softmax_scale=None, causal=self.causal)
        else:
            ctx = self.fa.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, p, None, self.causal)
        return self.out_proj(rearrange(ctx, "... h d -> ... (h d)"))


def test_a_flash_attn_codebase_runs_unchanged():
    torch.manual_seed(0)
    m = FlashStyleSelfAttention(flash_attn).eval()
    x = torch.randn(2, 13, 32, device=DEV)
    m.to(DEV)
    y = m(x)
    q, k, v = rearrange(m.Wqkv(x), "b s (three h d) -> three b s h d", three=3, h=2)
    expect = fastvl.ops.flash_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(y, m.out_proj(rearrange(expect, "b s h d -> b s (h d)")), rtol=1e-5, atol=1e-5)
    # unpadded batch: the same module through the varlen path equals the per-sequence dense calls
    lens = [5, 13]
    xs = torch.cat([x[0, :5], x[1]])
    cu = torch.tensor([0, 5, 18], dtype=torch.int32, device=DEV)
    y_var = m(xs, cu, max(lens))
    torch.testing.assert_close(y_var[:5], m(x[:1, :5])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_var[5:], y[1], rtol=1e-5, atol=1e-5)
    # the calls a codebase writes positionally, and the three-value return
    out, lse, s_dmask = flash_attn.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, True)
    assert s_dmask is None and lse.shape == (2, 2, 13) and lse.dtype == torch.float32
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    q_u, k_u, v_u = (rearrange(t, "b s h d -> (b s) h d") for t in (q, k, v))
    cu2 = torch.tensor([0, 13, 26], dtype=torch.int32, device=DEV)
    out_v, lse_v, _ = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu2, cu2, 13, 13, 0.0, None, True,
                                                        return_attn_probs=True)  # fmt: skip
    torch.testing.assert_close(out_v, rearrange(expect, "b s h d -> (b s) h d"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_v, rearrange(lse, "b h s -> h (b s)"), rtol=1e-5, atol=1e-5)
    # training with dropout: runs, is seeded by torch's generator, and differs from eval
    m.train()
    m.dropout = 0.3
    torch.manual_seed(5)
    y1 = m(x)
    torch.manual_seed(5)
    y2 = m(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y)
    y1.sum().backward()
    assert m.Wqkv.weight.grad is not None and torch.isfinite(m.Wqkv.weight.grad).all()


def test_window_entries_beyond_seqlen_k_are_unbounded():
    # flash-attn's C++ turns a window entry >= seqlen_k into -1; with seqlen_q > 2 seqlen_k the literal bound
    # would hide keys from the last queries
    q = torch.randn(1, 40, 2, 16, device=DEV)
    k, v = torch.randn(2, 1, 12, 2, 16, device=DEV)
    a = flash_attn.flash_attn_func(q, k, v, window_size=(12, 12))
    torch.testing.assert_close(a, flash_attn.flash_attn_func(q, k, v), rtol=0, atol=0)
    b = flash_attn.flash_attn_func(q, k, v, window_size=torch.tensor([3, 40]))  # flash-attn tests pass tensors
    torch.testing.assert_close(b, fastvl.ops.flash_attention(q, k, v, window_size=(3, -1)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda q: flash_attn.flash_attn_func(q, q, q, 0.1, return_attn_probs=True), ValueError,
         "'return_attn_probs=True' with dropout_p=0.1"),
        (lambda q: flash_attn.flash_attn_varlen_func(
            q[0], q[0], q[0], torch.tensor([0, 7], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32), 7,
            7, block_table=torch.zeros(1, 1, dtype=torch.int32)), ValueError, "'block_table'"),
        (lambda q: flash_attn.flash_attn_func(q, q, q, window_size=(1, 2, 3)), TypeError, "'window_size'"),
        (lambda q: flash_attn.flash_attn_func(q, q, q, softcap="big"), TypeError, "'softcap'"),
        (lambda q: flash_attn.flash_attn_kvpacked_func(q, q), ValueError,
         r"'kv' must have layout \(batch_size, seqlen_k, 2, nheads_k, headdim\)"),
        (lambda q: flash_attn.flash_attn_qkvpacked_func(q), ValueError, "'qkv' must have layout"),
        (lambda q: flash_attn.flash_attn_varlen_qkvpacked_func(
            torch.stack([q[0]] * 3, 1), torch.tensor([0, 7], dtype=torch.int32), 7.5),
         TypeError, "'max_seqlen' must be an int"),
    ],
)  # fmt: skip
def test_unsupported_and_bad_arguments_raise_naming_them(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(1, 7, 2, 16))


# ---- the qkv-packed op: one d(qkv) buffer ----------------------------------------------------------------


class _AtenLog(TorchDispatchMode):
    """Every op dispatched inside the ``with``: names (``aten.stack``, ``fastvl.flash_attention...``) and, per
    op, the shapes of its tensor arguments and of its results."""

    def __init__(self):
        super().__init__()
        self.ops, self.args, self.results = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.args.append([tuple(t.shape) for t in args if isinstance(t, torch.Tensor)])
        self.results.append([tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)])
        return out


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_gradients_match_reference(backend, dtype):
    N, S, H, D = 3, 37, 2, 32
    qkv64 = torch.randn(N, S, 3, H, D, dtype=torch.float64, device=DEV).to(dtype).double()
    kpm = torch.rand(N, S, device=DEV) < 0.2
    off = fastvl.ops.roll_frame_offsets(S, 4, fraction=0.25).to(DEV)
    kw = dict(key_padding_mask=kpm, frame_offsets=off, num_frames=3)
    qkv = qkv64.to(dtype).requires_grad_()
    out = fastvl.ops.flash_attention_qkvpacked(qkv, backend=backend, **kw)
    ref_leaf, pt_leaf = qkv64.clone().requires_grad_(), qkv64.to(dtype).requires_grad_()
    ref = fastvl.ops.flash_attention(*ref_leaf.unbind(2), backend="reference", **kw)
    pt = fastvl.ops.flash_attention(*pt_leaf.unbind(2), backend="reference", **kw)
    g = torch.randn(out.shape, dtype=torch.float64, device=DEV).to(dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    assert_close(out, ref, dtype, torch_same_dtype=pt, name="out")
    assert_close(dqkv, torch.autograd.grad(ref, ref_leaf, g.double())[0], dtype,
                 torch_same_dtype=torch.autograd.grad(pt, pt_leaf, g)[0], name="d(qkv)")  # fmt: skip


@pytest.mark.skipif(not kernel_backends("triton"), reason="no Triton backend here")
def test_packed_backward_writes_one_buffer_without_stack():
    """nn.Attention's backward through the Triton kernel: no aten stack / cat / copy of dq, dk, dv anywhere
    (autograd's graph, the op's backward), and the kernel writes every element of the one d(qkv)."""
    m = fastvl.nn.Attention(64, num_heads=2, qkv_bias=True, backend="triton").to(DEV)
    x = torch.randn(3, 21, 64, device=DEV, requires_grad=True)
    kpm = torch.zeros(3, 21, dtype=torch.bool, device=DEV)
    kpm[1, 15:] = True
    y = m(x, kpm)
    with _AtenLog() as log:
        y.backward(torch.randn_like(y))
    assert "fastvl.flash_attention_qkvpacked_backward" in log.ops
    assert not {"aten.stack", "aten.cat", "aten.copy_", "aten.clone"} & set(log.ops), log.ops
    # inside the op: the Triton backward allocates d(qkv) once and writes it through its views
    from fastvl.ops.attention.packed import qkvpacked_triton_backward

    qkv = torch.randn(2, 21, 3, 2, 32, device=DEV)
    plan = fastvl.ops.flash_attention_qkvpacked.prepare(qkv, key_padding_mask=kpm[:2])
    out, lse = torch.ops.fastvl.flash_attention_qkvpacked(qkv, *plan.options.flat(), "triton")
    with _AtenLog() as inner:
        dqkv, _ = qkvpacked_triton_backward(torch.randn_like(out), qkv, out, lse, None, plan.options)
    assert not {"aten.stack", "aten.cat", "aten.clone"} & set(inner.ops), inner.ops
    made = [op for op, sh in zip(inner.ops, inner.results) if tuple(qkv.shape) in sh]
    from fastvl.kernels.utils import poison_enabled

    # d(qkv) allocated once (NaN-filled when poisoned), then only written by the kernels
    assert made == ["aten.empty"] + (["aten.fill_"] if poison_enabled() else []), made
    # copies: only the interpreter's flat host round trips of each launch argument (none on a GPU)
    assert all(len(s) == 1 for op, sh in zip(inner.ops, inner.args) if op == "aten.copy_" for s in sh)
    assert torch.isfinite(dqkv).all()  # poisoned with NaN when allocated (FASTVL_POISON=1)
    # the unpacked op on the same views: autograd stacks dq, dk, dv (what the packed op saves)
    leaf = qkv.clone().requires_grad_()
    o = fastvl.ops.flash_attention(*leaf.unbind(2), backend="triton")
    with _AtenLog() as unpacked:
        o.backward(torch.ones_like(o))
    assert "aten.stack" in unpacked.ops  # the check above can see a stack


def test_attention_module_uses_the_packed_op_and_keeps_numbers():
    torch.manual_seed(0)
    m = fastvl.nn.Attention(32, num_heads=2, qkv_bias=True, backend="reference").to(DEV)
    x = torch.randn(2, 9, 32, device=DEV)
    with _AtenLog() as log:
        y = m(x, is_causal=True)
    assert "fastvl.flash_attention_qkvpacked" in log.ops
    q, k, v = m.qkv(x).view(2, 9, 3, 2, 16).unbind(2)
    o = fastvl.ops.flash_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(y, m.proj(o.reshape(2, 9, 32)), rtol=1e-6, atol=1e-6)
    # q/k norms leave the buffer: the unpacked op
    n = fastvl.nn.Attention(32, num_heads=2, qk_norm=True, backend="reference").to(DEV)
    with _AtenLog() as log:
        n(x)
    assert "fastvl.flash_attention" in log.ops and "fastvl.flash_attention_qkvpacked" not in log.ops


def test_packed_dispatch_is_flash_attentions():
    qkv = torch.randn(2, 11, 3, 2, 16)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[0, 8:] = True
    for kw in ({}, {"key_padding_mask": kpm}, {"causal": True}, {"key_padding_mask": kpm, "causal": True}):
        packed = fastvl.explain(fastvl.ops.flash_attention_qkvpacked, qkv, **kw)
        plain = fastvl.explain(fastvl.ops.flash_attention, *qkv.unbind(2), **kw)
        assert packed.replace("flash_attention_qkvpacked", "flash_attention") == plain
    assert {b.name for b in backends.backends("flash_attention_qkvpacked")} == {
        b.name for b in backends.backends("flash_attention")
    }


def test_packed_flops_opcheck_and_fake():
    from torch.utils.flop_counter import FlopCounterMode

    qkv = torch.randn(2, 9, 3, 2, 16, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = fastvl.ops.flash_attention_qkvpacked(qkv, backend="reference")
        out.sum().backward()
    counts = fc.get_flop_counts()["Global"]
    fwd = 4 * 2 * 9 * 9 * 2 * 16
    assert counts[torch.ops.fastvl.flash_attention_qkvpacked] == fwd
    assert counts[torch.ops.fastvl.flash_attention_qkvpacked_backward] == 5 * fwd // 2
    plan = fastvl.ops.flash_attention_qkvpacked.prepare(qkv, causal=True)
    torch.library.opcheck(torch.ops.fastvl.flash_attention_qkvpacked.default, (qkv, *plan.options.flat(), "reference"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq = torch.empty(6, 11, 3, 3, 32)
        assert fastvl.ops.flash_attention_qkvpacked(fq).shape == (6, 11, 3, 32)


def test_docs_alignment_example_holds():
    """docs/attention.md's example of padded (fastvl) vs unpadded (flash-attn) causal alignment runs as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "attention.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    example = next(b for b in blocks if "flash_attn_varlen_func" in b and "assert" in b)
    exec(compile(example, "docs/attention.md", "exec"), {})


@pytest.mark.skipif(DEV.type != "cpu", reason="auto's choices asserted here are the CPU's (no fused peers)")
def test_auto_takes_sdpa_where_it_serves_exactly_and_says_why_not(monkeypatch):
    """Under auto (no backend named) an interface call runs torch SDPA where SDPA computes exactly that call, and
    otherwise the reference on the CPU (Triton runs in the interpreter only when named); the reasons name the
    feature SDPA lacks."""
    ran = []
    for op in ("flash_attention", "flash_attention_qkvpacked"):
        for b in backends.backends(op):
            for role, fn in b.impls.items():
                monkeypatch.setitem(
                    b.impls, role, lambda *a, _f=fn, _at=(op, b.name, role), **k: ran.append(_at) or _f(*a, **k)
                )
    q, k, v = torch.randn(3, 2, 9, 2, 16)
    ran.clear()
    flash_attn.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), 0.0, None, True)
    assert ran == [("flash_attention_qkvpacked", "sdpa", "forward")]
    cases = [  # (flash-attn keywords, the fastvl op's, what auto runs, the feature SDPA lacks)
        ({"causal": True}, {"causal": True}, "sdpa", None),
        ({"return_attn_probs": True}, {"return_lse": True}, "reference", "return_lse"),
        ({"window_size": (2, 0)}, {"window_size": (2, 0)}, "reference", "window"),
        ({"softcap": 5.0}, {"softcap": 5.0}, "reference", "softcap"),
        ({"alibi_slopes": torch.ones(2)}, {"alibi_slopes": torch.ones(2)}, "reference", "alibi"),
    ]
    for fa_kw, kw, expect, feature in cases:
        ran.clear()
        flash_attn.flash_attn_func(q, k, v, **fa_kw)
        assert ran == [("flash_attention", expect, "forward")], (fa_kw, ran)
        report = fastvl.explain(fastvl.ops.flash_attention, q, k, v, **kw)
        assert f"[chosen] {expect}" in report
        if feature:
            assert feature in next(line for line in report.splitlines() if "] sdpa" in line), report


def test_packed_triton_backward_refuses_options_its_kernel_does_not_take(monkeypatch):
    """The packed Triton backward passes the kernel the options named like its keywords (and its Features); an
    option in use that the kernel lacks raises instead of computing a different gradient."""
    import fastvl.kernels.attention as kernels

    from fastvl.ops.attention.packed import kernel_arguments
    from fastvl.ops.attention.reference import AttentionOptions

    opts = AttentionOptions(scale=0.5, causal=True, return_lse=True, window_left=3, softcap=2.0, frame_tokens=4)
    args = kernel_arguments(opts)
    assert args["scale"] == 0.5 and args["causal"] is True and "return_lse" not in args
    assert (args["features"].window, args["features"].softcap, args["features"].frame_tokens) == ((3, -1), 2.0, 4)

    def plain_kernel(dout, q, k, v, out, lse, *, scale, causal=False, deterministic=False, dq=None, dk=None, dv=None):
        """a kernel launcher without score features"""

    monkeypatch.setattr(kernels, "attention_backward", plain_kernel)
    with pytest.raises(NotImplementedError, match="takes no 'window_left', 'softcap', 'frame_tokens'"):
        kernel_arguments(opts)
    assert kernel_arguments(AttentionOptions(scale=0.5, causal=True)) == {"scale": 0.5, "causal": True,
                                                                         "deterministic": False}  # fmt: skip


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("triton"))
def test_packed_dropout_and_features_equal_the_unpacked_op(backend):
    """The packed op is flash_attention on the three views: the same dropout draw (seeded from torch's default
    generator the same way), window, softcap, ALiBi, key bias and LSE give the same output, LSE and gradients
    (d(qkv) = [dq, dk, dv]), and the key bias gets its gradient."""
    N, S, H, D = 2, 29, 2, 16
    qkv = torch.randn(N, S, 3, H, D, device=DEV)
    bias = torch.randn(N, S, device=DEV)
    kw = dict(window_size=(7, 3), softcap=4.0, alibi_slopes=torch.rand(H, device=DEV), return_lse=True)
    grads = []
    for packed in (True, False):
        leaf, b = qkv.clone().requires_grad_(), bias.clone().requires_grad_()
        torch.manual_seed(11)
        if packed:
            out, lse = fastvl.ops.flash_attention_qkvpacked(leaf, 0.25, key_bias=b, backend=backend, **kw)
        else:
            out, lse = fastvl.ops.flash_attention(*leaf.unbind(2), 0.25, key_bias=b, backend=backend, **kw)
        (out.square().sum() + lse.sum()).backward()
        grads.append((out, lse, leaf.grad, b.grad))
    for name, a, b in zip(("out", "lse", "d(qkv)", "d(key_bias)"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
