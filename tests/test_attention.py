import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fastvl
from fastvl import BackendError
from fastvl.ops.roll import roll_reference
from fastvl.testing import assert_close, device, dtypes_to_test, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference"] + KERNELS


# ---- independent oracle: textbook attention, autograd in float64 ------------------------------


def naive_attention(q, k, v, scale, causal=False, kpm=None):
    """masked_fill + softmax on (N, S, H, D); causal bottom-right (j <= i + Sk - Sq); rows with no visible key -> 0."""
    N, Sq, H, D = q.shape
    Sk = k.shape[1]
    s = torch.einsum("nqhd,nkhd->nhqk", q, k) * scale
    vis = torch.ones(N, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    if causal:
        vis = vis & (torch.arange(Sk, device=q.device)[None, :] <= torch.arange(Sq, device=q.device)[:, None] + Sk - Sq)
    any_vis = vis.any(-1, keepdim=True)
    p = s.masked_fill(~vis, float("-inf")).masked_fill(~any_vis, 0).softmax(-1) * any_vis
    return torch.einsum("nhqk,nkhd->nqhd", p, v)


def naive_roll(x, off, T, inverse=False):
    """roll(x)[b*T + t, s] = x[b*T + (t + off[s]) % T, s], frame by frame (inverse: write back there)."""
    out = torch.empty_like(x)
    S = x.shape[1]
    slots = torch.arange(S, device=x.device)
    for b in range(x.shape[0] // T):
        for t in range(T):
            src = b * T + (t + off.to(x.device).long()) % T
            if inverse:
                out[src, slots] = x[b * T + t]
            else:
                out[b * T + t] = x[src, slots]
    return out


def _inputs(N, Sq, Sk, H, D, dtype, layout):
    """Fresh fp64 draws cast to dtype, laid out as asked; returns (q, k, v) leaves requiring grad."""
    q64, k64, v64 = (randn(N, s, H, D, dtype=torch.float64) for s in (Sq, Sk, Sk))
    if layout == "packed" and Sq == Sk:  # q, k, v as strided views of one (N, S, 3, H, D) buffer, like a qkv Linear
        buf = torch.stack([q64, k64, v64], dim=2).to(dtype).requires_grad_(True)
        return buf, buf.unbind(2)
    ts = [t.to(dtype) for t in (q64, k64, v64)]
    if layout in ("rows", "channels"):
        ts = [noncontiguous(t, layout) for t in ts]
    ts = [t.requires_grad_(True) for t in ts]
    return None, ts


def _check_against_oracle(backend, dtype, q, k, v, scale, causal, kpm, leaves):
    out = fastvl.ops.flash_attention(q, k, v, softmax_scale=scale, causal=causal, key_padding_mask=kpm, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    g64 = randn(*out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g64.to(dtype))
    # float64 oracle on the same (dtype-rounded) values, and PyTorch's own math in dtype
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    same_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]

    def qkv(ls):
        return ls[0].unbind(2) if len(ls) == 1 else ls

    ref = naive_attention(*qkv(ref_leaves), scale, causal, kpm)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g64.to(dtype).double())
    same = naive_attention(*qkv(same_leaves), scale, causal, kpm)
    same_grads = torch.autograd.grad(same, same_leaves, g64.to(dtype))
    assert_close(out, ref, dtype, torch_same_dtype=same, name="out")
    for name, g, r, s in zip("qkv" if len(leaves) == 3 else ["qkv"], grads, ref_grads, same_grads):
        assert_close(g, r, dtype, torch_same_dtype=s, name=f"grad {name}")


# ---- the reference against hand values and public semantics ----------------------------------


def test_reference_hand_case():
    # one head, D=1: scores are products; check the softmax weights by hand, and the masks
    q = torch.tensor([[[[1.0]], [[2.0]]]], dtype=torch.float64)  # (1, 2, 1, 1)
    k = torch.tensor([[[[1.0]], [[0.0]], [[-1.0]]]], dtype=torch.float64)  # (1, 3, 1, 1)
    v = torch.tensor([[[[10.0]], [[20.0]], [[30.0]]]], dtype=torch.float64)
    out = fastvl.ops.flash_attention(q, k, v, softmax_scale=1.0)
    for i, qi in enumerate([1.0, 2.0]):
        w = [math.exp(qi * kj) for kj in (1.0, 0.0, -1.0)]
        assert out[0, i, 0, 0].item() == pytest.approx(sum(wj * vj for wj, vj in zip(w, (10, 20, 30))) / sum(w))
    # causal, bottom-right (Sq=2, Sk=3): query 0 sees keys 0..1, query 1 sees keys 0..2
    out = fastvl.ops.flash_attention(q, k, v, softmax_scale=1.0, causal=True)
    w0 = [math.exp(1.0), 1.0]
    assert out[0, 0, 0, 0].item() == pytest.approx((w0[0] * 10 + w0[1] * 20) / sum(w0))
    # padding the first two keys leaves only key 2; padding all three gives zeros, not NaN
    kpm = torch.tensor([[True, True, False]])
    assert fastvl.ops.flash_attention(q, k, v, key_padding_mask=kpm).flatten().tolist() == [30.0, 30.0]
    out = fastvl.ops.flash_attention(q, k, v, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    assert out.flatten().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("causal,pad", [(False, False), (True, False), (False, True)])
def test_reference_matches_torch_sdpa(causal, pad):
    N, S, H, D = 3, 29, 2, 16
    q, k, v = (randn(N, S, H, D, dtype=torch.float64, device="cpu") for _ in range(3))
    kpm = None
    mask = None
    if pad:  # text-style padding: the last keys of each sequence (MultiheadAttention's True = ignore)
        kpm = torch.arange(S)[None, :] >= torch.tensor([29, 20, 7])[:, None]
        mask = ~kpm[:, None, None, :]
    out = fastvl.ops.flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, backend="reference")
    exp = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
    ).transpose(1, 2)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)


# ---- Triton kernel vs float64, forward and backward --------------------------------------------

# pairwise selection over S in {1, 17, 197, 237}, H in {1, 3}, D in {32, 64, 96}, causal x padding,
# fp32/fp16, layouts; the largest shapes appear in a few cases only (interpreter cost)
GRID = [
    # N, Sq, Sk, H, D, causal, pad, dtype, layout
    (2, 1, 1, 1, 32, False, False, torch.float32, "contiguous"),
    (3, 1, 1, 3, 64, True, True, torch.float16, "channels"),
    (2, 17, 17, 3, 32, True, False, torch.float16, "packed"),
    (2, 17, 17, 1, 96, False, True, torch.float32, "channels"),
    (2, 17, 17, 2, 128, True, True, torch.float16, "contiguous"),
    (2, 197, 197, 1, 64, False, True, torch.float32, "rows"),
    (1, 197, 197, 3, 96, True, False, torch.float16, "packed"),
    (1, 237, 237, 1, 96, False, False, torch.float16, "contiguous"),
    (2, 237, 237, 3, 32, True, True, torch.float32, "rows"),
    (2, 17, 70, 1, 64, True, True, torch.float32, "contiguous"),  # cross-attention, Sq < Sk
    (2, 45, 20, 3, 32, True, False, torch.float16, "rows"),  # Sq > Sk: the first rows see no key -> 0
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,Sq,Sk,H,D,causal,pad,dtype,layout", GRID)
def test_kernel_matches_float64(backend, N, Sq, Sk, H, D, causal, pad, dtype, layout):
    buf, (q, k, v) = _inputs(N, Sq, Sk, H, D, dtype, layout)
    kpm = None
    if pad:
        kpm = torch.rand(N, Sk, device=DEV) < 0.3
        kpm[0] = True  # one sequence fully padded: zeros, not NaN
    leaves = [buf] if buf is not None else [q, k, v]
    _check_against_oracle(backend, dtype, q, k, v, D**-0.5 * 1.3, causal, kpm, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_rows_are_zero_with_zero_grads(backend):
    q, k, v = (randn(2, 9, 1, 32).requires_grad_(True) for _ in range(3))
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=DEV)
    kpm[1] = True
    out = fastvl.ops.flash_attention(q, k, v, key_padding_mask=kpm, backend=backend)
    out.backward(torch.ones_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    assert bool((q.grad[0] != 0).any())


# ---- varlen ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", dtypes_to_test()[:2])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_unequal_lengths(backend, dtype, causal):
    lq, lk = [1, 40, 0, 67, 13], [5, 40, 3, 50, 13]  # unequal, one empty query set, Sq > Sk in one sequence
    H, D = 2, 32
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = randn(sum(lq), H, D, dtype=torch.float64).to(dtype).requires_grad_(True)
    k = randn(sum(lk), H, D, dtype=torch.float64).to(dtype)
    k = noncontiguous(k).requires_grad_(True)
    v = randn(sum(lk), H, D, dtype=torch.float64).to(dtype).requires_grad_(True)
    out = fastvl.ops.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, backend=backend)
    g = randn(*out.shape, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    same_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    results = []
    for leaves, gd in ((ref_leaves, g.double()), (same_leaves, g)):
        outs = []
        for b in range(len(lq)):
            qs = leaves[0][cu_q[b] : cu_q[b + 1]][None]
            ks = leaves[1][cu_k[b] : cu_k[b + 1]][None]
            vs = leaves[2][cu_k[b] : cu_k[b + 1]][None]
            outs.append(naive_attention(qs, ks, vs, D**-0.5, causal)[0])
        o = torch.cat(outs)
        results.append((o, torch.autograd.grad(o, leaves, gd)))
    (ref, ref_g), (same, same_g) = results
    assert_close(out, ref, dtype, torch_same_dtype=same, name="out")
    for name, a, r, s in zip("qkv", grads, ref_g, same_g):
        assert_close(a, r, dtype, torch_same_dtype=s, name=f"grad {name}")


# ---- the GPU tilings, run through the interpreter; the backward's outputs -------------------------
# The interpreter runs 64 x 64 tiles by default; here every distinct (BLOCK_M, BLOCK_N) a GPU launch may
# autotune over is forced through the kernels (kernel-level launchers, ``config=``), at sizes that leave
# ragged blocks, against the float64 oracle, with key padding, causal, varlen and roll offsets in turn.


def _kernels():
    from fastvl.kernels import attention as A

    return A


def _block_shapes(kernel):
    """One tiling per distinct (BLOCK_M, BLOCK_N) of ``kernel`` (warps and stages do not change the math)."""
    if not KERNELS:
        return []
    shapes = {}
    for cfg in _kernels().tilings(kernel):
        shapes.setdefault((cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]), cfg)
    return [pytest.param(kernel, cfg, id=f"{kernel}-{m}x{n}") for (m, n), cfg in sorted(shapes.items())]


# (name, flags): each kernel's block shapes take these in turn
_FLAG_SETS = [
    ("kpm+roll", dict(pad=True, roll=True)),
    ("causal+kpm", dict(causal=True, pad=True)),
    ("varlen+causal", dict(varlen=True, causal=True)),
    ("kpm+roll+causal", dict(pad=True, roll=True, causal=True)),
    ("cross+causal", dict(cross=True, causal=True)),  # Sq < Sk, bottom-right
]


def _oracle(q, k, v, dout, scale, causal, kpm, shift, T, cu_q, cu_k):
    """(out, (dq, dk, dv)) of the textbook attention by autograd in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if cu_q is not None:
        outs = []
        for b in range(len(cu_q) - 1):
            qs, ks, vs = (
                t[c[b] : c[b + 1]][None] for t, c in zip(leaves, (cu_q.tolist(), cu_k.tolist(), cu_k.tolist()))
            )
            outs.append(naive_attention(qs, ks, vs, scale, causal)[0])
        out = torch.cat(outs)
    elif shift is not None:
        rolled = [naive_roll(t, shift, T) for t in leaves]
        out = naive_roll(naive_attention(*rolled, scale, causal, naive_roll(kpm, shift, T)), shift, T, inverse=True)
    else:
        out = naive_attention(*leaves, scale, causal, kpm)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def _case(flags, dtype, D, S):
    """Inputs for one kernel-level launch: q, k, v, launcher kwargs and the oracle's arguments."""
    T, H = 3, 1
    N, Sq, Sk = T, S, S
    if flags.get("cross"):
        N, Sq, Sk = 2, S // 2, S
    kw, cu_q, cu_k, kpm, shift = {}, None, None, None, None
    if flags.get("varlen"):
        lq, lk = [S, 1, 0, S // 2 + 3], [S, S // 4, 5, S // 3]
        cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q, k, v = (randn(n, H, D, dtype=torch.float64).to(dtype) for n in (sum(lq), sum(lk), sum(lk)))
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    else:
        q = randn(N, Sq, H, D, dtype=torch.float64).to(dtype)
        k, v = (randn(N, Sk, H, D, dtype=torch.float64).to(dtype) for _ in range(2))
        if flags.get("pad"):
            kpm = torch.rand(N, Sk, device=DEV) < 0.3
            kpm[1] = True  # a fully padded sequence
            kw["key_padding_mask"] = kpm
        if flags.get("roll"):
            shift = torch.randint(0, T, (Sq,), dtype=torch.int32, device=DEV)
            kw.update(shift=shift, num_frames=T)
    causal = bool(flags.get("causal"))
    return q, k, v, dict(kw, causal=causal), (causal, kpm, shift, T, cu_q, cu_k)


@pytest.mark.parametrize(
    "kernel,cfg", _block_shapes("fwd") + _block_shapes("kv_dq") + _block_shapes("kv") + _block_shapes("q")
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tilings_match_float64(kernel, cfg, dtype):
    A = _kernels()
    # rotate the flag sets over each kernel's block shapes and the two dtypes
    shapes = [p.values[1].kwargs for p in _block_shapes(kernel)]
    i = 2 * shapes.index(cfg.kwargs) + (dtype == torch.float16)
    name, flags = _FLAG_SETS[i % len(_FLAG_SETS)]
    D = (64, 96, 32)[i % 3]
    # two blocks along the tile's longer side, the second one ragged
    S = max(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) + 19
    q, k, v, kw, oracle_args = _case(flags, dtype, D, S)
    scale = D**-0.5 * 1.3
    out, lse = A.attention_forward(q, k, v, scale=scale, config=cfg if kernel == "fwd" else None, **kw)
    dout = randn(*out.shape, dtype=torch.float64).to(dtype)
    grads = A.attention_backward(
        dout, q, k, v, out, lse, scale=scale, deterministic=kernel in ("kv", "q"),
        config=None if kernel == "fwd" else {kernel: cfg}, **kw,
    )  # fmt: skip
    # the forward's LSE is checked through the backward, which rebuilds P from it
    ref, ref_grads = _oracle(*(t.double() for t in (q, k, v, dout)), scale, *oracle_args)
    same, same_grads = _oracle(q, k, v, dout, scale, *oracle_args)
    for n, got, r, s in zip(
        ["out", "grad q", "grad k", "grad v"], (out, *grads), (ref, *ref_grads), (same, *same_grads)
    ):
        # fp32: within 1e-5 of the tensor's scale (sums of ~S terms: PyTorch's own error is ~1e-6 of it)
        atol = 1e-5 * max(1.0, r.abs().max().item()) if dtype == torch.float32 else None
        assert_close(got, r, dtype, torch_same_dtype=s, atol=atol, name=f"{n} ({name}, D={D})")


# the score features and windows through every GPU block shape (kernel-level launchers, ``config=``), each
# block shape taking one feature set in turn, against the materialised-mask oracle in float64
_FEATURE_SETS = ["bias+gqa+window+kpm", "frames+bias+roll", "temporal+softcap+alibi+causal", "varlen+gqa+window+bias"]


def _feature_case(name, dtype, S_min):
    """(q, k, v, launcher kwargs, oracle(q, k, v, bias) -> out) of one feature set; S >= S_min."""
    A = _kernels()
    T, H = 3, 2
    F, text = 16, 5
    frames = -(-(S_min - text) // F)
    S = text + F * frames
    Hk = 1 if "gqa" in name else H
    kw, feats = {}, {}
    if name.startswith("varlen"):
        lq = [S, 1, 0, S // 2 + 3]
        cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q = randn(sum(lq), H, 32, dtype=torch.float64).to(dtype)
        k, v = (randn(sum(lq), Hk, 32, dtype=torch.float64).to(dtype) for _ in range(2))
        bias = randn(1, 1, sum(lq)).requires_grad_(True)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=S, max_seqlen_k=S, causal=True)
        feats = dict(key_bias=bias, window=(S // 3, -1))

        def oracle(q, k, v, bias):
            outs = []
            for b in range(len(lq)):
                r = slice(int(cu[b]), int(cu[b + 1]))
                o, _ = naive_full(q[r][None], k[r][None], v[r][None], 32**-0.5, causal=True, window=(S // 3, -1),
                                  bias=bias[0, :, r])  # fmt: skip
                outs.append(o[0])
            return torch.cat(outs)

        return q, k, v, dict(kw, features=A.Features(**feats)), oracle, bias
    q = randn(T, S, H, 32, dtype=torch.float64).to(dtype)
    k, v = (randn(T, S, Hk, 32, dtype=torch.float64).to(dtype) for _ in range(2))
    bias, nk, shift = None, {}, None
    if "bias" in name:
        bias = randn(T, H if "gqa" in name else 1, S).requires_grad_(True)
        feats["key_bias"] = bias
    if "window" in name:
        feats["window"] = nk["window"] = (S // 3, 7)
    if "kpm" in name:
        kpm = torch.rand(T, S, device=DEV) < 0.3
        kpm[1] = True
        kw["key_padding_mask"] = nk["kpm"] = kpm
    if name.startswith("frames"):
        feats.update(frame_tokens=F, text_tokens=text, frame_window=1)
        nk["frames"] = (F, 1, text, False)
    if name.startswith("temporal"):
        feats.update(frame_tokens=F, text_tokens=text, temporal=True, softcap=2.0)
        feats["alibi_slopes"] = torch.rand(1, H, device=DEV) * 0.2
        nk.update(frames=(F, -1, text, True), softcap=2.0, alibi=feats["alibi_slopes"].double(), causal=True)
        kw["causal"] = True
    if "roll" in name:
        shift = torch.randint(0, T, (S,), dtype=torch.int32, device=DEV)
        kw.update(shift=shift, num_frames=T)

    def oracle(q, k, v, bias):
        b = None if bias is None else (bias[:, 0] if bias.shape[1] == 1 else bias)
        if shift is None:
            return naive_full(q, k, v, 32**-0.5, bias=b, **nk)[0]
        rolled = [naive_roll(t, shift, T) for t in (q, k, v)]
        rb = None if b is None else naive_roll(b if b.dim() == 2 else b.transpose(1, 2), shift, T)
        out, _ = naive_full(*rolled, 32**-0.5, bias=rb, **nk)
        return naive_roll(out, shift, T, inverse=True)

    return q, k, v, dict(kw, features=A.Features(**feats)), oracle, bias


@pytest.mark.parametrize(
    "kernel,cfg", _block_shapes("fwd") + _block_shapes("kv_dq") + _block_shapes("kv") + _block_shapes("q")
)
def test_gpu_tilings_features_match_float64(kernel, cfg):
    A = _kernels()
    shapes = [p.values[1].kwargs for p in _block_shapes(kernel)]
    i = shapes.index(cfg.kwargs) + len(kernel)
    name = _FEATURE_SETS[i % len(_FEATURE_SETS)]
    dtype = (torch.float32, torch.float16)[i % 2]
    q, k, v, kw, oracle, bias = _feature_case(name, dtype, max(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) + 19)
    scale = 32**-0.5
    out, lse = A.attention_forward(q, k, v, scale=scale, config=cfg if kernel == "fwd" else None, **kw)
    dout = randn(*out.shape, dtype=torch.float64).to(dtype)
    grads = A.attention_backward(
        dout, q, k, v, out, lse, scale=scale, deterministic=kernel in ("kv", "q"),
        config=None if kernel == "fwd" else {kernel: cfg}, **kw,
    )  # fmt: skip
    results = []
    for cast in (torch.float64, dtype):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        bl = [bias.detach().double().requires_grad_(True)] if bias is not None else []
        o = oracle(*leaves, bl[0] if bl else None)
        results.append((o.detach(), torch.autograd.grad(o, leaves + bl, dout.to(cast))))
    (ref, ref_g), (same, same_g) = results
    names = ["out", "grad q", "grad k", "grad v", "grad bias"]
    for n, got, r, sm in zip(names, (out, *grads), (ref, *ref_g), (same, *same_g)):
        atol = 1e-5 * max(1.0, r.abs().max().item()) if dtype == torch.float32 or n == "grad bias" else None
        assert_close(got, r, dtype if n != "grad bias" else torch.float32, torch_same_dtype=sm.to(got.dtype),
                     atol=atol, name=f"{n} ({name})")  # fmt: skip


@pytest.mark.skipif(not KERNELS, reason="no Triton backend here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_backward_writes_into_one_qkv_gradient(dtype, deterministic, varlen):
    # dq, dk, dv as strided views of one (N, S, 3, H, D) (varlen: (total, 3, H, D)) buffer, as nn.Attention's
    # qkv projection wants its gradient: the launcher writes them there, every element, nothing else
    A = _kernels()
    T, H, D = 3, 2, 32
    kw, shape = {}, (2 * T, 41, 3, H, D)
    if varlen:
        cu = torch.tensor([0, 41, 41, 70], dtype=torch.int32, device=DEV)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=41, max_seqlen_k=41)
        shape = (70, 3, H, D)
    else:
        kw = dict(key_padding_mask=torch.rand(2 * T, 41, device=DEV) < 0.2, num_frames=T,
                  shift=torch.randint(0, T, (41,), dtype=torch.int32, device=DEV))  # fmt: skip
    qkv = randn(*shape, dtype=torch.float64).to(dtype)
    q, k, v = qkv.unbind(-3)
    out, lse = A.attention_forward(q, k, v, scale=0.2, causal=True, **kw)
    dout = randn(*out.shape, dtype=torch.float64).to(dtype)
    expect = A.attention_backward(dout, q, k, v, out, lse, scale=0.2, causal=True, deterministic=True, **kw)
    g = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    views = g.unbind(-3)
    got = A.attention_backward(
        dout, q, k, v, out, lse, scale=0.2, causal=True, deterministic=deterministic,
        dq=views[0], dk=views[1], dv=views[2], **kw,
    )  # fmt: skip
    for view, res, exp, name in zip(views, got, expect, "qkv"):
        assert res.data_ptr() == view.data_ptr() and res.stride() == view.stride(), name
        assert not torch.isnan(view).any(), f"d{name}: unwritten elements"
        if deterministic:
            assert torch.equal(view, exp), name
        else:  # fp32 atomics add up dq in another order than the dq pass
            assert_close(view, exp.double(), dtype, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-6,
                         name=f"d{name}")  # fmt: skip


@pytest.mark.skipif(not KERNELS, reason="no Triton backend here")
def test_backward_out_arguments_are_checked():
    A = _kernels()
    q = randn(2, 9, 1, 32)
    out, lse = A.attention_forward(q, q, q, scale=0.2)
    with pytest.raises(ValueError, match=r"'dk' must have shape \(2, 9, 1, 32\), dtype torch.float32"):
        A.attention_backward(out, q, q, q, out, lse, scale=0.2, dk=torch.empty(2, 9, 1, 16, device=DEV))
    with pytest.raises(ValueError, match="'dq' must have .* dtype torch.float32"):
        A.attention_backward(out, q, q, q, out, lse, scale=0.2, dq=torch.empty_like(q, dtype=torch.float16))


@pytest.mark.skipif(not KERNELS, reason="no Triton backend here")
def test_gpu_tiling_lists():
    # what the static sm_90 compile checks per tiling, stated on the lists themselves: on sm_90 the
    # shared-memory guard prunes none of them (each fits 227 KB by the estimate, which the compiles
    # match), and every fp16/bf16 dot has at least 64 rows (one warpgroup's wgmma) in every kernel
    A = _kernels()
    for kernel in ("fwd", "kv_dq", "kv", "q"):
        for dtype, precisions in ((torch.bfloat16, ["ieee"]), (torch.float32, ["ieee", "tf32"])):
            for precision in precisions:
                for D in (16, 32, 64, 96, 128):
                    for gather in (False, True):
                        cfgs = A.gpu_configs(kernel, dtype, D, gather=gather, precision=precision)
                        assert 1 <= len(cfgs) <= 3, (kernel, dtype, precision, D, gather)
                        bd = max(16, 1 << (D - 1).bit_length())
                        for c in cfgs:
                            assert A.smem_estimate(kernel, c, bd, dtype.itemsize) <= A.SMEM_LIMIT, (kernel, c, D)
                            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                            if dtype == torch.bfloat16:  # rows of each dot: fwd / q: BLOCK_M; kv: BLOCK_N
                                rows = {"fwd": [m], "q": [m], "kv": [n], "kv_dq": [n, m]}[kernel]
                                assert min(rows) >= 64, (kernel, c)
        listed = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in A.tilings(kernel)}
        seen = set()
        for dtype, precision in ((torch.float16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32")):
            for D in (32, 128):
                for gather in (False, True):
                    for c in A.gpu_configs(kernel, dtype, D, gather=gather, precision=precision):
                        seen.add((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
        assert seen == listed, kernel  # tilings() is what the interpreter test above runs


# ---- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_gradients_bitwise(backend):
    dtype = torch.float16 if backend != "reference" else torch.float32
    q, k, v = (randn(2, 61, 2, 64, dtype=dtype).requires_grad_(True) for _ in range(3))
    kpm = torch.rand(2, 61, device=DEV) < 0.2
    g = randn(2, 61, 2, 64, dtype=dtype)
    runs = []
    for _ in range(2):
        out = fastvl.ops.flash_attention(
            q, k, v, key_padding_mask=kpm, deterministic=True, causal=True, backend=backend
        )
        runs.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- roll-aware addressing ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_offsets_match_explicit_roll(backend):
    T, B, S, H, D = 3, 2, 23, 2, 32
    q, k, v = (randn(B * T, S, H, D).requires_grad_(True) for _ in range(3))
    off = torch.randint(-7, 8, (S,), device=DEV)  # any integers, used mod T
    kpm = torch.rand(B * T, S, device=DEV) < 0.25
    out = fastvl.ops.flash_attention(q, k, v, key_padding_mask=kpm, frame_offsets=off, num_frames=T, backend=backend)
    g = randn(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    rolled = [naive_roll(t, off, T) for t in leaves]
    exp = naive_roll(naive_attention(*rolled, D**-0.5, False, naive_roll(kpm, off, T)), off, T, inverse=True)
    exp_grads = torch.autograd.grad(exp, leaves, g)
    assert_close(out, exp.double(), torch.float32, torch_same_dtype=exp)
    for a, e in zip(grads, exp_grads):
        assert_close(a, e.double(), torch.float32, name="grad")


def test_roll_frame_offsets_is_allinone_roll():
    T, text, L = 3, 5, 17
    S = text + L
    off = fastvl.ops.roll_frame_offsets(S, text, steps=1)
    f = L // 8
    assert off.dtype == torch.int64 and off.shape == (S,)
    assert off[text + 1 : text + 1 + f].tolist() == [-1] * f and off[S - f :].tolist() == [1] * f
    assert int(off.abs().sum()) == 2 * f
    x = randn(2 * T, S, 4, device="cpu")
    # roll(x)[t, s] = x[(t + off[s]) % T, s] is exactly temporal_token_roll, k steps = k rolls
    assert torch.equal(naive_roll(x, off, T), roll_reference(x, T, text, f))
    two = roll_reference(roll_reference(x, T, text, f), T, text, f)
    assert torch.equal(naive_roll(x, fastvl.ops.roll_frame_offsets(S, text, steps=2), T), two)


class _Block(torch.nn.Module):
    """Pre-norm block: x + attn(LN(x)), then + MLP(LN(x))."""

    def __init__(self, dim, heads, backend):
        super().__init__()
        self.norm1 = fastvl.nn.LayerNorm(dim, backend=backend)
        self.attn = fastvl.nn.Attention(dim, heads, qkv_bias=True, backend=backend)
        self.norm2 = fastvl.nn.LayerNorm(dim, backend=backend)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)

    def forward(self, x, kpm, offsets=None, T=1):
        x = x + self.attn(self.norm1(x), key_padding_mask=kpm, frame_offsets=offsets, num_frames=T)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_stack_roll_aware_equals_explicit_roll(backend):
    # All-in-one: an explicit temporal_token_roll of the residual stream before every block gives the same
    # frame-averaged output (and gradients) as rolling nothing and letting block k attend with offsets k*off
    torch.manual_seed(1)
    B, T, text, L, C, heads = 2, 3, 5, 17, 64, 2
    depth = 3 if backend == "reference" else 2  # interpreter cost
    S = text + L
    blocks = torch.nn.ModuleList([_Block(C, heads, backend) for _ in range(depth)]).to(DEV)
    x = randn(B * T, S, C).requires_grad_(True)
    kpm = torch.zeros(B * T, S, dtype=torch.bool, device=DEV)
    kpm[:T, 3:text] = True  # text padding of the first video, the same in each of its frames
    roll = fastvl.nn.TemporalTokenRoll(T, text_len=text)

    h = x
    for blk in blocks:
        h = blk(roll(h), kpm)
    explicit = h.view(B, T, S, C).mean(1)
    h = x
    for i, blk in enumerate(blocks):
        h = blk(h, kpm, fastvl.ops.roll_frame_offsets(S, text, steps=i + 1, device=DEV), T)
    aware = h.view(B, T, S, C).mean(1)
    assert_close(aware, explicit.double(), torch.float32, rtol=1e-4, atol=1e-5, name="frame average")
    g = randn(B, S, C)
    params = [x] + list(blocks.parameters())
    g_explicit = torch.autograd.grad(explicit, params, g)
    g_aware = torch.autograd.grad(aware, params, g)
    for a, e in zip(g_aware, g_explicit):
        assert_close(a, e.double(), torch.float32, rtol=1e-4, atol=1e-5, name="grad")
    # and without the offsets the two differ: the test can fail
    h = x.detach()
    with torch.no_grad():
        for blk in blocks:
            h = blk(h, kpm)
    assert (h.view(B, T, S, C).mean(1) - explicit).abs().max() > 1e-3


# ---- FLOP accounting ---------------------------------------------------------------------------


def test_flop_counter_matches_torch_accounting():
    from timm.layers import Attention as TimmAttention
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    B, S, C, H = 2, 37, 64, 2
    timm_attn = TimmAttention(C, H, qkv_bias=True)
    timm_attn.fused_attn = False  # eager math: FlopCounterMode counts its matmuls on the CPU
    ours = fastvl.nn.Attention(C, H, qkv_bias=True)
    ours.load_state_dict(timm_attn.state_dict())
    x = torch.randn(B, S, C, requires_grad=True)

    def count(fn, backward):
        with FlopCounterMode(display=False) as m:
            out = fn(x)
            if backward:
                out.sum().backward()
        return m.get_total_flops()

    shape = (B, H, S, C // H)
    assert count(ours, False) == count(timm_attn, False)  # forward: the same 4 B H S^2 D as eager
    # fwd + bwd: what torch charges its own fused SDPA (backward 2.5x forward: recomputed QK^T + 4 matmuls)
    with FlopCounterMode(display=False) as m:
        qq = torch.randn(*shape, requires_grad=True)
        (qq @ qq.transpose(-1, -2)).softmax(-1).matmul(qq).sum().backward()
    eager_attention = m.get_total_flops()
    fused = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    assert count(ours, True) == count(timm_attn, True) - eager_attention + fused
    q = torch.randn(B, S, H, C // H)
    with FlopCounterMode(display=False) as m:
        fastvl.ops.flash_attention(q, q, q, causal=True)
    assert m.get_total_flops() == sdpa_flop_count(shape, shape, shape) // 2


# ---- dispatch, bad input, modules --------------------------------------------------------------


def test_dispatch_reasons():
    q = torch.randn(2, 17, 2, 32)
    kpm = torch.zeros(2, 17, dtype=torch.bool)
    report = fastvl.explain(fastvl.ops.flash_attention, q, q, q, key_padding_mask=kpm)
    assert "[chosen] sdpa" in report  # on the CPU: torch's fused CPU attention
    assert "flash_attn is not installed" in report and "xformers is not installed" in report
    # the CPU sdpa path declines what it cannot express, and the reference takes over
    qh = q.half()
    report = fastvl.explain(fastvl.ops.flash_attention, qh, qh, qh)
    assert "[chosen] reference" in report and "q dtype torch.float16 on the CPU" in report
    with pytest.raises(BackendError, match="backend 'sdpa' cannot serve.*causal with Sq=17 != Sk=5"):
        fastvl.ops.flash_attention(q, q[:, :5], q[:, :5], causal=True, backend="sdpa")
    if KERNELS:
        with pytest.raises(BackendError, match="head dim D=160 > 128"):
            fastvl.ops.flash_attention(*(torch.randn(1, 4, 1, 160) for _ in range(3)), backend="triton")
        with pytest.raises(BackendError, match="q dtype torch.float64"):
            fastvl.ops.flash_attention(*(torch.randn(1, 4, 1, 16, dtype=torch.float64),) * 3, backend="triton")
        # auto falls back to the reference for what the kernel cannot take
        out = fastvl.ops.flash_attention(*(torch.randn(1, 4, 1, 160) for _ in range(3)))
        assert out.shape == (1, 4, 1, 160)
    # the GPU path's reasons, seen on meta tensors (not CPU ones: on the CPU sdpa takes offsets and is deterministic)
    qm = q.to("meta")
    off = torch.zeros(17, dtype=torch.int64, device="meta")
    sdpa = fastvl.backends.get("flash_attention", "sdpa")
    (request,) = fastvl.ops.attention.prepare(qm, qm, qm, frame_offsets=off, num_frames=2, deterministic=True).requests
    call = request.call
    why = " ".join(sdpa.reasons(call))
    assert "frame_offsets" in why and "deterministic=True" in why and "runs on CUDA tensors" in why


def _qkv(*shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastvl.ops.flash_attention(*_qkv(2, 5, 16)), ValueError, r"'q' must be 4-D \(N, Sq, H, D\)"),
        (
            lambda: fastvl.ops.flash_attention(torch.randn(2, 5, 1, 16), *_qkv(2, 5, 1, 16, dtype=torch.float16)[:2]),
            TypeError,
            "'k' must have q's dtype torch.float32, got torch.float16",
        ),
        (
            lambda: fastvl.ops.flash_attention(torch.randn(2, 5, 1, 16), *_qkv(3, 5, 1, 16)[:2]),
            ValueError,
            "'k' must have q's batch N=2",
        ),
        (
            lambda: fastvl.ops.flash_attention(torch.randn(2, 5, 1, 16), *_qkv(2, 5, 1, 32)[:2]),
            ValueError,
            "'k' must have q's head dim D=16",
        ),
        (
            lambda: fastvl.ops.flash_attention(*_qkv(2, 5, 1, 16)[:2], torch.randn(2, 6, 1, 16)),
            ValueError,
            "'v' must have k's shape",
        ),
        (
            lambda: fastvl.ops.flash_attention(*_qkv(2, 5, 1, 0)),
            ValueError,
            "head dim D must be >= 1",
        ),
        (
            lambda: fastvl.ops.flash_attention(
                *_qkv(2, 5, 1, 16), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)
            ),
            ValueError,
            r"'key_padding_mask' must have shape \(N, Sk\)=\(2, 5\), got \(2, 4\)",
        ),
        (
            lambda: fastvl.ops.flash_attention(*_qkv(2, 5, 1, 16), key_padding_mask=torch.zeros(2, 5)),
            TypeError,
            "'key_padding_mask' must have dtype in \\(bool\\)",
        ),
        (
            lambda: fastvl.ops.flash_attention(
                *_qkv(6, 5, 1, 16), frame_offsets=torch.zeros(4, dtype=torch.int64), num_frames=3
            ),
            ValueError,
            r"'frame_offsets' must have shape \(S,\)=\(5,\)",
        ),
        (
            lambda: fastvl.ops.flash_attention(
                *_qkv(4, 5, 1, 16), frame_offsets=torch.zeros(5, dtype=torch.int64), num_frames=3
            ),
            ValueError,
            "q.shape\\[0\\]=4 must be a multiple of num_frames=3",
        ),
        (
            lambda: fastvl.ops.flash_attention(*_qkv(2, 5, 1, 16), softmax_scale=-1.0),
            ValueError,
            "'softmax_scale' must be in",
        ),
        (lambda: fastvl.ops.flash_attention(*_qkv(2, 5, 1, 16), causal=1), TypeError, "'causal' must be a bool"),
        (
            lambda: fastvl.ops.flash_attention_varlen(
                *_qkv(9, 1, 16), torch.tensor([0, 4, 9]), torch.tensor([0, 4, 9], dtype=torch.int32), 5, 5
            ),
            TypeError,
            "'cu_seqlens_q' must have dtype in \\(int32\\), got torch.int64",
        ),
        (
            lambda: fastvl.ops.flash_attention_varlen(
                *_qkv(9, 1, 16), *(torch.tensor([0, 6, 4, 9], dtype=torch.int32),) * 2, 6, 6
            ),
            ValueError,
            "'cu_seqlens_q' must start at 0 and be increasing",
        ),
        (
            lambda: fastvl.ops.flash_attention_varlen(
                *_qkv(9, 1, 16), *(torch.tensor([0, 4, 8], dtype=torch.int32),) * 2, 5, 5
            ),
            ValueError,
            "'cu_seqlens_q' must end at the number of rows 9",
        ),
        (
            lambda: fastvl.ops.flash_attention_varlen(
                *_qkv(9, 1, 16), *(torch.tensor([0, 2, 9], dtype=torch.int32),) * 2, 5, 7
            ),
            ValueError,
            "max_seqlen 5 is smaller than the longest sequence 7",
        ),
        (
            lambda: fastvl.ops.flash_attention_varlen(
                *_qkv(9, 1, 16),
                torch.tensor([0, 9], dtype=torch.int32),
                torch.tensor([0, 4, 9], dtype=torch.int32),
                9,
                9,
            ),
            ValueError,
            "'cu_seqlens_k' must have cu_seqlens_q's shape",
        ),
        (
            lambda: fastvl.ops.roll_frame_offsets(7, 2, fraction=0.125),
            ValueError,
            "too small for fraction",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_attention_module_dropout_and_masks():
    torch.manual_seed(0)
    m = fastvl.nn.Attention(32, num_heads=2, qkv_bias=True, attn_drop=0.5)
    x = torch.randn(2, 7, 32)
    m.eval()
    y_eval = m(x)
    m.train()
    torch.manual_seed(3)
    y1 = m(x)
    torch.manual_seed(3)
    y2 = m(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y_eval)  # dropout on the weights, seeded
    y1.sum().backward()
    assert m.qkv.weight.grad is not None
    m.eval()
    # timm Block's calling convention: an SDPA mask (True = attend) and is_causal
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.allclose(m(x, attn_mask=mask), m(x, is_causal=True), atol=1e-6)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[:, 5:] = True
    assert torch.allclose(m(x, key_padding_mask=kpm), m(x, attn_mask=~kpm[:, None, None, :]), atol=1e-6)


def test_opcheck_and_fake():
    q, k, v = (torch.randn(2, 9, 2, 16, requires_grad=True) for _ in range(3))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 4:] = True
    opts = fastvl.ops.attention.AttentionOptions(kpm, num_frames=1, scale=0.25, causal=True)
    args = (q, k, v, *opts.flat(), "reference")
    torch.library.opcheck(torch.ops.fastvl.flash_attention.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq = torch.empty(6, 11, 3, 32)
        out = fastvl.ops.flash_attention(fq, fq, fq, frame_offsets=torch.zeros(11, dtype=torch.int64), num_frames=3)
        assert out.shape == (6, 11, 3, 32)


@pytest.mark.slow
def test_compile_fullgraph():
    m = fastvl.nn.Attention(32, num_heads=2, qkv_bias=True)
    x = torch.randn(6, 11, 32)
    kpm = torch.zeros(6, 11, dtype=torch.bool)
    kpm[0, 7:] = True
    off = fastvl.ops.roll_frame_offsets(11, 2, fraction=0.25)
    eager = m(x, kpm, off, 3)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, kpm, off, 3), eager)


# ---- the compiled (GPU) path without a GPU: ahead-of-time compile for sm_90 -----------------------

_AOT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastvl.kernels.attention as A
import fastvl.kernels.layer_norm as LN

def build(fn, ptrs, constexprs, warps):
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr or name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = ptrs.get(name, "fp32" if name in ("qk_scale", "sm_scale", "eps", "cap2", "p_drop") else "i32")
    opts = {"num_warps": warps, "num_stages": 3}
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options=opts)

bf = "*bf16"
ptrs = dict(Q=bf, K=bf, V=bf, O=bf, DO=bf, DQ=bf, DK=bf, DV=bf, LSE="*fp32", DELTA="*fp32", KPM="*u8", SHIFT="*i32",
            CU_Q="*i32", CU_K="*i32", X=bf, R=bf, W=bf, B=bf, Y=bf, HS=bf, MEAN="*fp32", RSTD="*fp32", DY=bf, DH=bf,
            DX=bf, DW_PART="*fp32", DB_PART="*fp32", PART="*fp32", OUT=bf)
ptrs.update(DQ_ACC="*fp32", BIAS="*fp32", DBIAS="*fp32", ALIBI_S="*fp32")
plain = dict(HAS_BIAS=False, SOFTCAP=False, ALIBI=False, WINDOW=False, FRAMES=False, TEMPORAL=False, DROPOUT=False)
every = dict(plain, HEAD_DIM=96, VARLEN=False, ROLL=True, HAS_KPM=True, CAUSAL=True, BLOCK_D=128, PRECISION="tf32")
feats = dict(every, HEAD_DIM=64, BLOCK_D=64, HAS_BIAS=True, SOFTCAP=True, ALIBI=True, WINDOW=True, FRAMES=True,
             DROPOUT=True)
build(A._attn_fwd, ptrs, dict(every, BLOCK_M=128, BLOCK_N=64), 8)
build(A._attn_fwd, ptrs, dict(every, HEAD_DIM=64, BLOCK_D=64, VARLEN=True, ROLL=False, HAS_KPM=False, BLOCK_M=128,
                              BLOCK_N=64), 8)
build(A._attn_bwd_pre, ptrs, dict(HEAD_DIM=96, VARLEN=False, ROLL=True, ZERO_DQ=True, BLOCK_M=64, BLOCK_D=128), 4)
build(A._attn_bwd_kv, ptrs, dict(every, HEAD_DIM=128, ATOMIC_DQ=True, BLOCK_M=64, BLOCK_N=64), 8)
build(A._attn_bwd_kv, ptrs, dict(every, ATOMIC_DQ=False, BLOCK_M=32, BLOCK_N=128), 8)
build(A._attn_bwd_q, ptrs, dict(every, BLOCK_M=128, BLOCK_N=32), 8)
build(A._attn_fwd, ptrs, dict(feats, BLOCK_M=128, BLOCK_N=64), 8)
build(A._attn_bwd_kv, ptrs, dict(feats, TEMPORAL=True, ATOMIC_DQ=True, BLOCK_M=64, BLOCK_N=64), 8)
build(A._attn_bwd_q, ptrs, dict(feats, BLOCK_M=128, BLOCK_N=64), 8)
build(A._attn_bwd_dq_cast, dict(ptrs, DQ_ACC="*fp32"), dict(HEAD_DIM=96, VARLEN=False, BLOCK_M=64, BLOCK_D=128), 4)
build(LN._ln_fwd, ptrs, dict(HAS_RES=True, HAS_W=True, HAS_B=True, BLOCK_R=4, BLOCK_C=1024), 4)
build(LN._ln_bwd, ptrs, dict(HAS_DH=True, HAS_W=True, NEED_DW=True, NEED_DB=True, BLOCK_R=4, BLOCK_C=1024), 4)
build(LN._col_sum, ptrs, dict(BLOCK_G=64, BLOCK_C=256), 4)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    # the interpreter never lowers the kernels; this compiles the bf16 attention (roll + padding + causal,
    # varlen, and every score feature with windows and frame blocks) and layer-norm kernels to an H100 cubin
    # with Triton's bundled ptxas, no GPU needed
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ---- GPU (lent H100): larger shapes, bf16, every backend against the fp32 reference ------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S", [197, 237, 629, 785, 1569])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("causal,pad", [(False, False), (True, False), (False, True)])
def test_gpu_triton_vs_reference(dtype, S, D, causal, pad):
    N, H = 4, 12 if D <= 64 else 8
    q, k, v = (torch.randn(N, S, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    kpm = (torch.rand(N, S, device="cuda") < 0.2) if pad else None
    out = fastvl.ops.flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, backend="triton")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = naive_attention(*leaves, D**-0.5, causal, kpm)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    same_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    same = naive_attention(*same_leaves, D**-0.5, causal, kpm)
    same_grads = torch.autograd.grad(same, same_leaves, g)
    assert_close(out, ref, dtype, torch_same_dtype=same)
    for a, r, s in zip(grads, ref_grads, same_grads):
        assert_close(a, r, dtype, torch_same_dtype=s, name="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_gpu_deterministic_and_fp32(backend):
    q, k, v = (torch.randn(8, 785, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    if backend == "sdpa":
        with pytest.raises(BackendError, match="deterministic"):
            fastvl.ops.flash_attention(q, k, v, deterministic=True, backend="sdpa")
        return
    runs = [
        torch.autograd.grad(fastvl.ops.flash_attention(q, k, v, deterministic=True), (q, k, v), g) for _ in range(3)
    ]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    # fp32 inputs: tf32 dots when torch allows them (documented tolerance ~3e-4 relative), exact fp32 otherwise
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    ref = naive_attention(q32.double(), k32.double(), v32.double(), 64**-0.5)
    assert_close(fastvl.ops.flash_attention(q32, k32, v32, backend="triton"), ref, torch.float32, rtol=1e-4, atol=1e-5)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out = fastvl.ops.flash_attention(q32, k32, v32, backend="triton")
        assert_close(out, ref, torch.float32, rtol=3e-3, atol=3e-4)
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.gpu
def test_gpu_roll_varlen_and_flops_vs_sdpa():
    T, B, text, L, H, D = 3, 8, 40, 197, 12, 64
    S = text + L
    q, k, v = (torch.randn(B * T, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    off = fastvl.ops.roll_frame_offsets(S, text, steps=2, device="cuda")
    kpm = torch.zeros(B * T, S, dtype=torch.bool, device="cuda")
    kpm[:, 30:text] = True
    out = fastvl.ops.flash_attention(q, k, v, key_padding_mask=kpm, frame_offsets=off, num_frames=T, backend="triton")
    ref = fastvl.ops.flash_attention(
        q, k, v, key_padding_mask=kpm, frame_offsets=off, num_frames=T, backend="reference"
    )
    assert_close(out, ref.double(), torch.bfloat16)
    lens = torch.randint(1, 1570, (16,))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).cuda()
    qv = torch.randn(int(lens.sum()), H, D, device="cuda", dtype=torch.bfloat16)
    a = fastvl.ops.flash_attention_varlen(
        qv, qv, qv, cu, cu, int(lens.max()), int(lens.max()), causal=True, backend="triton"
    )
    b = fastvl.ops.flash_attention_varlen(
        qv, qv, qv, cu, cu, int(lens.max()), int(lens.max()), causal=True, backend="reference"
    )
    assert_close(a, b.double(), torch.bfloat16)
    # FLOPs: fastvl's fused path counts what torch counts for its fused SDPA on CUDA (fwd + bwd)
    x = torch.randn(4, 197, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    counts = []
    for fn in (
        lambda t: fastvl.ops.flash_attention(t, t, t, backend="triton"),
        lambda t: F.scaled_dot_product_attention(t.transpose(1, 2), t.transpose(1, 2), t.transpose(1, 2)),
    ):
        with FlopCounterMode(display=False) as m:
            fn(x).sum().backward()
        counts.append(m.get_total_flops())
    assert counts[0] == counts[1]


# ---- the sdpa backend's CPU path (torch's fused CPU attention) ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal,padded,offsets", [(False, False, False), (False, True, True), (True, False, True)])
def test_cpu_sdpa_matches_reference(dtype, causal, padded, offsets):
    """The CPU path auto picks (roll-aware offsets by gathering rows, key padding, fully padded rows give
    zeros) against the reference, forward and backward, plus FLOP parity with fastvl's own op."""
    from torch.utils.flop_counter import FlopCounterMode

    N, S, H, D, T = 6, 21, 3, 32, 3
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(N, S, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    kpm = None
    if padded:
        kpm = torch.rand(N, S, generator=g) < 0.3
        kpm[2] = True  # a fully padded sequence
    off = fastvl.ops.roll_frame_offsets(S, 4, fraction=0.25, steps=2) if offsets else None
    kw = dict(causal=causal, key_padding_mask=kpm, frame_offsets=off, num_frames=T)
    assert "[chosen] sdpa" in fastvl.explain(fastvl.ops.flash_attention, *base, **kw)
    res = {}
    for be in ("sdpa", "reference"):
        ins = [t.clone().requires_grad_(True) for t in base]
        with FlopCounterMode(display=False) as fc:
            out = fastvl.ops.flash_attention(*ins, backend=be, **kw)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape))
        res[be] = (out.detach(), [t.grad for t in ins], fc.get_total_flops())
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res["sdpa"][0], res["reference"][0], **tol)
    for a, b in zip(res["sdpa"][1], res["reference"][1]):
        torch.testing.assert_close(a, b, **tol)
    assert res["sdpa"][2] == res["reference"][2] > 0
    if padded and not offsets:
        assert res["sdpa"][0][2].abs().max() == 0


# ---- score features, windows, frame blocks, GQA, LSE: every backend against a materialised-mask oracle -----


def _frame_mask(S, F, w, text, temporal):
    """(S, S) bool by explicit loops: text tokens see / are seen by all; video i, j: |frame| <= w (w < 0: any)
    and, with temporal, the same spatial position."""
    if S > 128:  # long sequences (GPU tests): the vectorised mask, equal to the loops below (a test checks)
        from fastvl.benchmarks.bench_attention import frame_mask

        return frame_mask(S, text, F, w, temporal, "cpu")
    m = torch.zeros(S, S, dtype=torch.bool)
    for a in range(S):
        for b in range(S):
            if a < text or b < text:
                m[a, b] = True
                continue
            fa, pa = divmod(a - text, F)
            fb, pb = divmod(b - text, F)
            m[a, b] = (w < 0 or abs(fa - fb) <= w) and (not temporal or pa == pb)
    return m


def naive_full(q, k, v, scale, *, causal=False, kpm=None, window=(-1, -1), softcap=0.0, alibi=None, bias=None,
               frames=None, keep=None, p=0.0):  # fmt: skip
    """Textbook attention with every feature as a materialised bias / mask on (N, S, H, D); k, v with H_k heads
    (GQA by repeating); returns (out, lse (N, H, Sq)) with lse = +inf on rows that see no key."""
    N, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k, v = (t.repeat_interleave(H // Hk, dim=2) for t in (k, v))
    s = torch.einsum("nqhd,nkhd->nhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None] + Sk - Sq
    j = torch.arange(Sk, device=q.device)[None, :]
    if alibi is not None:
        s = s - alibi.reshape(-1, H, 1, 1).to(s.dtype) * (i - j).abs().to(s.dtype)
    if bias is not None:
        s = s + (bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :]).to(s.dtype)
    vis = torch.ones(N, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    if causal:
        vis = vis & (j <= i)
    if window[0] >= 0:
        vis = vis & (j >= i - window[0])
    if window[1] >= 0:
        vis = vis & (j <= i + window[1])
    if frames is not None:
        vis = vis & _frame_mask(Sk, *frames).to(q.device)
    any_vis = vis.any(-1, keepdim=True)
    sm = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(sm.masked_fill(~any_vis, 0), -1)
    lse = torch.where(any_vis[..., 0], lse, torch.full_like(lse, float("inf")))
    pr = sm.masked_fill(~any_vis, 0).softmax(-1) * any_vis
    if keep is not None:
        pr = pr * keep / (1 - p)
    return torch.einsum("nhqk,nkhd->nqhd", pr, v), lse


def _triton_refuses(backend, features):
    """For the triton backend: True (and the BackendError checked) when a feature the call uses is one its
    declaration does not serve yet; the reason must name the feature."""
    if backend != "triton":
        return False
    from fastvl.ops.attention.backends import TRITON_FEATURES

    missing = sorted(set(features) - TRITON_FEATURES)
    return missing


# (name, N, Sq, Sk, H, Hk, D, features used, call kwargs builder)
FEATURE_CASES = [
    ("bias2+kpm+causal", 2, 19, 19, 2, 2, 32, {"key_bias", "key_padding_mask", "causal"}),
    ("bias3+gqa", 2, 21, 21, 4, 2, 16, {"key_bias", "gqa"}),
    ("mqa+cross+causal", 2, 13, 29, 3, 1, 32, {"gqa", "causal", "causal_bottom_right"}),
    ("window+cross", 2, 17, 30, 2, 2, 16, {"window", "window_bottom_right"}),
    ("window+causal+softcap", 1, 37, 37, 2, 1, 32, {"window", "causal", "softcap", "gqa"}),
    ("alibi+bias+kpm", 2, 23, 23, 2, 2, 16, {"alibi", "key_bias", "key_padding_mask"}),
    ("frames-w0+text", 2, 3 + 4 * 5, 3 + 4 * 5, 2, 2, 16, {"frame_blocks"}),
    ("frames-w1+bias+kpm", 2, 2 + 6 * 4, 2 + 6 * 4, 2, 2, 16, {"frame_blocks", "key_bias", "key_padding_mask"}),
    ("temporal+text", 2, 1 + 5 * 4, 1 + 5 * 4, 2, 1, 16, {"temporal_only", "gqa"}),
    ("lse+bias+causal", 2, 15, 15, 2, 2, 16, {"return_lse", "key_bias", "causal"}),
]


def _feature_kwargs(name, N, Sq, Sk, H, Hk, dtype):
    """(public kwargs, naive kwargs) of one FEATURE_CASES entry, fresh random tensors."""
    kw, nk = {}, {}
    if "bias2" in name or "alibi+bias" in name or "frames-w1" in name or "lse+bias" in name:
        b = randn(N, Sk) * 2
        kw["key_bias"] = nk["bias"] = b.requires_grad_(True)
    if "bias3" in name:
        b = randn(N, H, Sk) * 2
        kw["key_bias"] = nk["bias"] = b.requires_grad_(True)
    if "kpm" in name:
        m = torch.rand(N, Sk, device=DEV) < 0.25
        m[0, :] = True  # a fully padded sequence
        kw["key_padding_mask"] = nk["kpm"] = m
    if "causal" in name:
        kw["causal"] = nk["causal"] = True
    if name.startswith("window+cross"):
        kw["window_size"] = nk["window"] = (3, 2)
    if name.startswith("window+causal"):
        kw["window_size"] = nk["window"] = (5, -1)
    if "softcap" in name:
        kw["softcap"] = nk["softcap"] = 2.5
    if "alibi" in name:
        kw["alibi_slopes"] = nk["alibi"] = torch.rand(N, H, device=DEV) * 0.3
    if name.startswith("frames-w0"):
        kw.update(frame_tokens=5, text_tokens=3, spatial_only=True)
        nk["frames"] = (5, 0, 3, False)
    if name.startswith("frames-w1"):
        kw.update(frame_tokens=4, text_tokens=2, frame_window=1)
        nk["frames"] = (4, 1, 2, False)
    if name.startswith("temporal"):
        kw.update(frame_tokens=4, text_tokens=1, temporal_only=True)
        nk["frames"] = (4, -1, 1, True)
    if name.startswith("lse"):
        kw["return_lse"] = True
    return kw, nk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_features_match_float64(backend, dtype, case):
    name, N, Sq, Sk, H, Hk, D, features = case
    if backend == "reference" and dtype == torch.float16:
        dtype = torch.float64  # the reference computes fp16 in fp32: its fp64 path is the one to pin down
    q = randn(N, Sq, H, D, dtype=torch.float64).to(dtype).requires_grad_(True)
    k, v = (randn(N, Sk, Hk, D, dtype=torch.float64).to(dtype).requires_grad_(True) for _ in range(2))
    kw, nk = _feature_kwargs(name, N, Sq, Sk, H, Hk, dtype)
    scale = D**-0.5 * 1.3
    missing = _triton_refuses(backend, features)
    if missing:
        with pytest.raises(BackendError, match=missing[0]):
            fastvl.ops.flash_attention(q, k, v, softmax_scale=scale, backend=backend, **kw)
        return
    res = fastvl.ops.flash_attention(q, k, v, softmax_scale=scale, backend=backend, **kw)
    out, lse = res if kw.get("return_lse") else (res, None)
    assert out.shape == q.shape and out.dtype == dtype
    leaves = [q, k, v] + ([kw["key_bias"]] if "key_bias" in kw else [])
    g = randn(*out.shape, dtype=torch.float64).to(dtype)
    gl = randn(N, H, Sq) if lse is not None else None
    loss = (out.double() * g.double()).sum()
    if lse is not None:
        assert lse.shape == (N, H, Sq) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * gl.double()).sum()
    grads = torch.autograd.grad(loss, leaves)

    def oracle(ls, dt):
        nkw = dict(nk, bias=ls[3]) if len(ls) > 3 else nk
        o, l_ = naive_full(*ls[:3], scale, **nkw)
        lo = (o * g.to(dt)).sum()
        if lse is not None:
            lo = lo + (torch.where(torch.isfinite(l_), l_, 0) * gl.to(l_.dtype)).sum()
        return o, l_, torch.autograd.grad(lo, ls)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    same_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref, ref_lse, ref_grads = oracle(ref_leaves, torch.float64)
    same, _, same_grads = oracle(same_leaves, dtype)
    assert_close(out, ref, dtype, torch_same_dtype=same, name=f"out ({name})")
    if lse is not None:
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        assert_close(lse[fin], ref_lse[fin], torch.float32, name="lse")
    for n, a, r, s in zip(["q", "k", "v", "key_bias"], grads, ref_grads, same_grads):
        assert_close(a, r, dtype, torch_same_dtype=s.to(a.dtype), name=f"grad {n} ({name})")


VARLEN_CASES = [
    ("gqa+causal", dict(causal=True), {"gqa", "causal", "varlen"}),
    ("window+alibi", dict(window_size=(4, 1)), {"window", "alibi", "varlen"}),
    ("bias+softcap+lse", dict(softcap=3.0, return_lse=True), {"key_bias", "softcap", "return_lse", "varlen"}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_features_match_float64(backend, case):
    name, kw, features = case
    dtype = torch.float32
    lq, lk = [7, 0, 19, 3], [11, 4, 19, 1]
    H, Hk, D = 4, (2 if "gqa" in name else 4), 16
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = randn(sum(lq), H, D).requires_grad_(True)
    k, v = (randn(sum(lk), Hk, D).requires_grad_(True) for _ in range(2))
    kw = dict(kw)
    leaves = [q, k, v]
    if "alibi" in name:
        kw["alibi_slopes"] = torch.rand(len(lq), H, device=DEV) * 0.5
    if "bias" in name:
        kw["key_bias"] = randn(H, sum(lk)).requires_grad_(True)
        leaves.append(kw["key_bias"])
    missing = _triton_refuses(backend, features)
    if missing:
        with pytest.raises(BackendError, match=missing[0]):
            fastvl.ops.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), backend=backend, **kw)
        return
    res = fastvl.ops.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), backend=backend, **kw)
    out, lse = res if kw.get("return_lse") else (res, None)
    g = randn(*out.shape)
    loss = (out * g).sum() + (torch.where(torch.isfinite(lse), lse, 0).sum() if lse is not None else 0)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    outs, lses = [], []
    for b in range(len(lq)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        nk = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                  softcap=kw.get("softcap", 0.0))  # fmt: skip
        if "alibi_slopes" in kw:
            nk["alibi"] = kw["alibi_slopes"][b].double()
        if len(ref_leaves) > 3:
            nk["bias"] = ref_leaves[3][:, sk][None]
        o, l_ = naive_full(ref_leaves[0][sq][None], ref_leaves[1][sk][None], ref_leaves[2][sk][None], D**-0.5, **nk)
        outs.append(o[0])
        lses.append(l_[0])
    ref, ref_lse = torch.cat(outs), torch.cat(lses, dim=1)
    rloss = (ref * g.double()).sum()
    if lse is not None:
        assert lse.shape == (H, sum(lq))
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        assert_close(lse[fin], ref_lse[fin], torch.float32, name="lse")
        rloss = rloss + torch.where(fin, ref_lse, 0).sum()
    ref_grads = torch.autograd.grad(rloss, ref_leaves)
    assert_close(out, ref, dtype, name=f"out ({name})")
    for n, a, r in zip(["q", "k", "v", "key_bias"], grads, ref_grads):
        assert_close(a, r, dtype, name=f"grad {n} ({name})")


def test_frame_blocks_with_roll_offsets_and_padding():
    # frame-local windows compose with All-in-one's roll-aware rows: the same as rolling explicitly
    T, B, text, F, frames, H, D = 3, 2, 2, 4, 3, 2, 16
    S = text + F * frames
    q, k, v = (randn(B * T, S, H, D, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    bias = randn(B * T, S, dtype=torch.float64).requires_grad_(True)
    off = torch.randint(-3, 4, (S,), device=DEV)
    kpm = torch.rand(B * T, S, device=DEV) < 0.2
    kw = dict(frame_tokens=F, text_tokens=text, frame_window=1, key_padding_mask=kpm)
    out = fastvl.ops.flash_attention(q, k, v, key_bias=bias, frame_offsets=off, num_frames=T, **kw)
    g = randn(*out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    rolled = [naive_roll(t, off, T) for t in leaves[:3]]
    exp, _ = naive_full(*rolled, D**-0.5, kpm=naive_roll(kpm, off, T), bias=naive_roll(leaves[3], off, T),
                        frames=(F, 1, text, False))  # fmt: skip
    exp = naive_roll(exp, off, T, inverse=True)
    exp_grads = torch.autograd.grad(exp, leaves, g)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    for a, e in zip(grads, exp_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_of_plain_attention_and_its_gradient(backend):
    # return_lse on the plain path (every backend): the natural-log LSE, +inf on fully padded rows, and its
    # gradient (d lse_i / d s_ij = P_ij) through the kernel's backward
    N, S, H, D = 2, 27, 2, 32
    q, k, v = (randn(N, S, H, D).requires_grad_(True) for _ in range(3))
    kpm = torch.rand(N, S, device=DEV) < 0.3
    kpm[1] = True
    out, lse = fastvl.ops.flash_attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=backend)
    assert lse.shape == (N, H, S) and lse.dtype == torch.float32 and torch.isinf(lse[1]).all()
    gl = randn(N, H, S)
    loss = (torch.where(torch.isfinite(lse), lse, 0) * gl).sum() + out.sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ro, rl = naive_full(*leaves, D**-0.5, kpm=kpm)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close(lse[fin], rl[fin], torch.float32, name="lse")
    rloss = (torch.where(fin, rl, 0) * gl.double()).sum() + ro.sum()
    for a, r in zip(grads, torch.autograd.grad(rloss, leaves)):
        assert_close(a, r, torch.float32, name="grad")


# ---- attention rows -------------------------------------------------------------------------------

ROWS_BACKENDS = [b.name for b in fastvl.backends.backends("attention_rows") if b.name in BACKENDS][::-1]


@pytest.mark.parametrize("backend", ROWS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "gqa,bias,pad,softcap", [(False, None, True, 0.0), (True, 3, False, 2.0), (False, 2, True, 0.0)]
)
def test_attention_rows_equal_softmax_rows(backend, dtype, gqa, bias, pad, softcap):
    # the rows of chosen queries (CLS + text) from the forward's LSE equal the rows of the full softmax
    B, S, H, D, R = 2, 45, 4, 32, 3
    Hk = 2 if gqa else H
    q = randn(B, S, H, D, dtype=torch.float64).to(dtype)
    k, v = (randn(B, S, Hk, D, dtype=torch.float64).to(dtype) for _ in range(2))
    kb = None if bias is None else (randn(B, S) if bias == 2 else randn(B, H, S))
    kpm = None
    if pad:
        kpm = torch.rand(B, S, device=DEV) < 0.3
        kpm[1] = True  # every key padded: lse = +inf, rows of zeros
    kw = dict(key_bias=kb, key_padding_mask=kpm, softcap=softcap)
    _, lse = fastvl.ops.flash_attention(q, k, v, return_lse=True, backend="reference", **kw)
    rows = fastvl.ops.attention_rows(q[:, :R], k, lse[:, :, :R].float(), backend=backend, **kw)
    assert rows.shape == (B, H, R, S) and rows.dtype == torch.float32
    qd, kd = q.double(), k.double()
    kk = kd.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("nqhd,nkhd->nhqk", qd[:, :R], kk) * D**-0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if kb is not None:
        s = s + (kb[:, None, None, :] if kb.dim() == 2 else kb[:, :, None, :]).double()
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
    exp = s.softmax(-1).nan_to_num(0.0)
    assert_close(rows, exp, torch.float32, rtol=1e-5, atol=1e-6, name="rows")
    if pad:
        assert torch.equal(rows[1], torch.zeros_like(rows[1]))
    assert_close(rows.sum(-1)[0], torch.ones(H, R, dtype=torch.float64, device=DEV), torch.float32)


def test_attention_rows_gradient():
    B, S, H, D, R = 2, 13, 2, 16, 2
    q = randn(B, R, H, D, dtype=torch.float64).requires_grad_(True)
    k = randn(B, S, H, D, dtype=torch.float64).requires_grad_(True)
    lse = (randn(B, H, R, dtype=torch.float64) + 3).requires_grad_(True)
    kb = randn(B, S, dtype=torch.float64).requires_grad_(True)
    rows = fastvl.ops.attention_rows(q, k, lse, key_bias=kb, softcap=4.0)
    g = randn(*rows.shape, dtype=torch.float64)
    got = torch.autograd.grad(rows, (q, k, lse, kb), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, lse, kb)]
    s = 4.0 * torch.tanh(torch.einsum("nqhd,nkhd->nhqk", leaves[0], leaves[1]) * D**-0.5 / 4.0)
    exp = torch.exp(s + leaves[3][:, None, None, :] - leaves[2][..., None])
    for a, e in zip(got, torch.autograd.grad(exp, leaves, g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ---- dropout ---------------------------------------------------------------------------------------


def test_reference_dropout_mask_from_generator():
    # the reference draws its keep mask from the generator (via one seed): the same generator state gives the
    # same output; the output and gradients equal the textbook attention with that mask, scaled by 1 / (1 - p)
    from fastvl.ops.attention.reference import dropout_keep

    N, S, H, D, p = 2, 17, 2, 16, 0.3
    q, k, v = (randn(N, S, H, D, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    a = fastvl.ops.flash_attention(q, k, v, p, generator=torch.Generator(device=DEV).manual_seed(5))
    b = fastvl.ops.flash_attention(q, k, v, p, generator=torch.Generator(device=DEV).manual_seed(5))
    c = fastvl.ops.flash_attention(q, k, v, p, generator=torch.Generator(device=DEV).manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator(device=DEV).manual_seed(5), device=DEV))
    keep = dropout_keep((N, H, S, S), p, seed, DEV)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.05
    g = randn(N, S, H, D, dtype=torch.float64)
    grads = torch.autograd.grad(a, (q, k, v), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    exp, _ = naive_full(*leaves, D**-0.5, keep=keep.double(), p=p)
    torch.testing.assert_close(a, exp, rtol=1e-10, atol=1e-12)
    for x, e in zip(grads, torch.autograd.grad(exp, leaves, g)):
        torch.testing.assert_close(x, e, rtol=1e-10, atol=1e-12)


# ---- dispatch of the features ---------------------------------------------------------------------


def test_feature_capabilities_and_auto_choice():
    from fastvl.ops.attention import backends as AB

    # the reference serves every feature; every other backend explains each feature it does not serve
    assert backends_of("reference").features == AB.FEATURES
    for name in ("triton", "sdpa", "flash_attn", "xformers"):
        for decl in fastvl.backends.get("flash_attention", name).capabilities:
            for f in AB.FEATURES - decl.features:
                assert f in decl.notes, (name, f)
    # on the CPU, auto keeps SDPA for what it serves exactly (key bias as an additive mask, GQA), and the
    # reference for frame blocks and windows (no materialised mask)
    q = randn(2, 9, 4, 16, device="cpu")
    k = randn(2, 9, 2, 16, device="cpu")
    kb = randn(2, 9, device="cpu")
    assert "[chosen] sdpa" in fastvl.explain(fastvl.ops.flash_attention, q, k, k, key_bias=kb)
    text = fastvl.explain(fastvl.ops.flash_attention, q, k, k, frame_tokens=3, spatial_only=True)
    assert "[chosen] reference" in text and "frame_blocks: frame-block windows are fastvl's own" in text
    ref = fastvl.ops.flash_attention(q, k, k, key_bias=kb, backend="reference")
    torch.testing.assert_close(fastvl.ops.flash_attention(q, k, k, key_bias=kb), ref, rtol=1e-5, atol=1e-6)


def backends_of(name):
    return fastvl.backends.get("flash_attention", name).capabilities[0]


def _q(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(dropout_p=1.0), ValueError, r"'dropout_p' must be in \[0, 1\)"),
        (dict(generator=3), TypeError, "'generator' must be a torch.Generator"),
        (dict(window_size=(3,)), TypeError, "'window_size' must be a pair"),
        (dict(window_size=(-2, 0)), ValueError, r"'window_size\[0\]' must be >= -1"),
        (dict(softcap=-1.0), ValueError, "'softcap' must be in"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, r"'alibi_slopes' must have shape \(H,\)=\(4,\)"),
        (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError, "'alibi_slopes' must have dtype"),
        (dict(key_bias=torch.ones(2, 8)), ValueError, r"'key_bias' must have shape \(N, Sk\) or \(N, H, Sk\)"),
        (dict(key_bias=torch.ones(2, 9, dtype=torch.float16)), TypeError, "'key_bias' must have dtype"),
        (dict(frame_window=1), ValueError, "'frame_window' needs frame_tokens"),
        (dict(temporal_only=True), ValueError, "'temporal_only' needs frame_tokens"),
        (dict(frame_tokens=4), ValueError, "whole frames of frame_tokens=4, got 9 video tokens"),
        (dict(frame_tokens=3, spatial_only=True, temporal_only=True), ValueError, "exclusive"),
        (dict(frame_tokens=3, frame_window=-1), ValueError, "'frame_window' must be >= 0"),
        (dict(return_lse=1), TypeError, "'return_lse' must be a bool"),
    ],
)
def test_bad_feature_arguments(kwargs, exc, match):
    q, k = _q(2, 9, 4, 16), _q(2, 9, 2, 16)
    with pytest.raises(exc, match=match):
        fastvl.ops.flash_attention(q, k, k, **kwargs)


def test_bad_gqa_and_rows_arguments():
    with pytest.raises(ValueError, match="'k' must have a number of heads H_k dividing q's H=4"):
        fastvl.ops.flash_attention(_q(2, 9, 4, 16), _q(2, 9, 3, 16), _q(2, 9, 3, 16))
    cu = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'key_bias' must have shape \(total_k,\) or \(H, total_k\)"):
        fastvl.ops.flash_attention_varlen(_q(9, 4, 16), _q(9, 2, 16), _q(9, 2, 16), cu, cu, 9, 9,
                                          key_bias=torch.ones(3, 9))  # fmt: skip
    q, k = _q(2, 3, 4, 16), _q(2, 9, 2, 16)
    with pytest.raises(ValueError, match=r"'lse' must have shape \(B, H, R\)=\(2, 4, 3\)"):
        fastvl.ops.attention_rows(q, k, torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="'lse' must have dtype"):
        fastvl.ops.attention_rows(q, k, torch.zeros(2, 4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="'k' must have H_k heads dividing"):
        fastvl.ops.attention_rows(q, _q(2, 9, 3, 16), torch.zeros(2, 4, 3))


def test_benchmark_masks_are_the_op_semantics():
    # the feature benchmark's eager / SDPA / FlexAttention providers compute what fastvl's frame blocks compute
    from fastvl.benchmarks.bench_attention import frame_mask, frame_mask_mod

    text, F, frames, H, D = 3, 5, 4, 2, 16
    S = text + F * frames
    q, k, v = (randn(2, S, H, D, dtype=torch.float64, device="cpu") for _ in range(3))
    for window, temporal, kw in ((0, False, dict(spatial_only=True)), (1, False, dict(frame_window=1)),
                                 (-1, True, dict(temporal_only=True))):  # fmt: skip
        mask = frame_mask(S, text, F, window, temporal, "cpu")
        assert torch.equal(mask, _frame_mask(S, F, window, text, temporal))
        i = torch.arange(S)
        assert torch.equal(frame_mask_mod(text, F, window, temporal)(0, 0, i[:, None], i[None, :]), mask)
        exp = sdpa_bhsd(q, k, v, mask)
        got = fastvl.ops.flash_attention(q, k, v, frame_tokens=F, text_tokens=text, backend="reference", **kw)
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def sdpa_bhsd(q, k, v, mask):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)  # fmt: skip


# ---- dropout in the kernel: Philox from a seed, regenerated in the backward ----------------------------


@pytest.mark.skipif(not KERNELS, reason="no Triton backend here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_kernel_dropout_matches_reference_with_its_mask(dtype, deterministic, varlen):
    # the kernel's keep mask (dropout_mask: the same Philox draw) fed to the textbook attention gives the kernel's
    # output and gradients; the fraction kept is 1 - p
    A = _kernels()
    p, seed, H, Hk, D = 0.3, 1234, 2, 1, 32
    if varlen:
        lens = [37, 0, 70]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q = randn(sum(lens), H, D, dtype=torch.float64).to(dtype)
        k, v = (randn(sum(lens), Hk, D, dtype=torch.float64).to(dtype) for _ in range(2))
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens), causal=True)
        keep = A.dropout_mask(seed, p, len(lens), H, max(lens), max(lens), DEV)
    else:
        N, S = 2, 83
        q = randn(N, S, H, D, dtype=torch.float64).to(dtype)
        k, v = (randn(N, S, Hk, D, dtype=torch.float64).to(dtype) for _ in range(2))
        kpm = torch.rand(N, S, device=DEV) < 0.2
        kw = dict(key_padding_mask=kpm)
        keep = A.dropout_mask(seed, p, N, H, S, S, DEV)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    feats = A.Features(dropout_p=p, seed=seed)
    out, lse = A.attention_forward(q, k, v, scale=D**-0.5, features=feats, **kw)
    dout = randn(*out.shape, dtype=torch.float64).to(dtype)
    grads = A.attention_backward(dout, q, k, v, out, lse, scale=D**-0.5, features=feats, deterministic=deterministic,
                                 **kw)  # fmt: skip

    def oracle(cast):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        if varlen:
            outs = []
            for b in range(len(lens)):
                r = slice(int(cu[b]), int(cu[b + 1]))
                n = r.stop - r.start
                o, _ = naive_full(leaves[0][r][None], leaves[1][r][None], leaves[2][r][None], D**-0.5, causal=True,
                                  keep=keep[b : b + 1, :, :n, :n].to(cast), p=p)  # fmt: skip
                outs.append(o[0])
            o = torch.cat(outs)
        else:
            o, _ = naive_full(*leaves, D**-0.5, kpm=kpm, keep=keep.to(cast), p=p)
        return o.detach(), torch.autograd.grad(o, leaves, dout.to(cast))

    (ref, ref_g), (same, same_g) = oracle(torch.float64), oracle(dtype)
    for n, got, r, sm in zip(["out", "dq", "dk", "dv"], (out, *grads), (ref, *ref_g), (same, *same_g)):
        atol = 1e-5 * max(1.0, r.abs().max().item()) if dtype == torch.float32 else None
        assert_close(got, r, dtype, torch_same_dtype=sm, atol=atol, name=n)


@pytest.mark.skipif(not KERNELS, reason="no Triton backend here")
def test_op_dropout_seeded_by_generator_and_deterministic():
    q, k, v = (randn(2, 41, 2, 32).requires_grad_(True) for _ in range(3))
    g = randn(2, 41, 2, 32)
    runs = []
    for seed in (7, 7, 8):
        gen = torch.Generator(device=DEV).manual_seed(seed)
        out = fastvl.ops.flash_attention(q, k, v, 0.25, generator=gen, deterministic=True, backend="triton")
        runs.append((out, torch.autograd.grad(out, (q, k, v), g)))
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.allclose(runs[0][0], runs[2][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)  # the backward regenerates the same mask; deterministic: bitwise
    plain = fastvl.ops.flash_attention(q, k, v, backend="triton")
    assert not torch.allclose(runs[0][0], plain)


# ---- windows skip whole tiles: NaN planted in tiles outside every window never reaches the outputs ------------


@pytest.mark.skipif(not KERNELS, reason="no Triton backend here")
@pytest.mark.parametrize(
    "S,features,poisoned,clean",
    [
        # frames of 64 tokens (one 64-row tile each), one frame's q/k/v poisoned; "clean": the rows whose outputs
        # and gradients cannot depend on it (a gradient reaches two windows away: through the queries' LSE / delta)
        (256, dict(frame_tokens=64, spatial_only=True), slice(128, 192), [slice(0, 128), slice(192, 256)]),
        (384, dict(frame_tokens=64, frame_window=1), slice(320, 384), [slice(0, 192)]),
        # a sliding window of 10 either side: the last tile is 128+ keys away from the first
        (256, dict(window_size=(10, 10)), slice(192, 256), [slice(0, 64)]),
    ],
)
def test_tiles_outside_the_window_are_not_visited(S, features, poisoned, clean):
    # were a tile outside the window loaded and masked, 0 * NaN in its P @ V (or dS @ K, dS^T @ Q) would poison
    # the outputs; it is skipped by the loop bounds, so every output outside the poisoned tile's window is finite
    from fastvl.kernels.attention import Features

    A = _kernels()
    H, D = 1, 16
    q, k, v = (randn(1, S, H, D) for _ in range(3))
    for t in (q, k, v):
        t[:, poisoned] = float("nan")
    f = dict(features)
    window = f.pop("window_size", (-1, -1))
    feats = Features(window=window, frame_tokens=f.get("frame_tokens", 0),
                     frame_window=0 if f.get("spatial_only") else f.get("frame_window", -1))  # fmt: skip
    out, lse = A.attention_forward(q, k, v, scale=0.25, features=feats)
    dout = torch.ones_like(out)
    for det in (False, True):
        dq, dk, dv = A.attention_backward(dout, q, k, v, out, lse, scale=0.25, features=feats, deterministic=det)
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            for rows in clean:
                assert torch.isfinite(t[:, rows]).all(), (name, rows, det)
        assert torch.isnan(out[:, poisoned]).all()  # the poisoned tile itself is read by its own window
    # outside the poisoned tile's window the outputs do not depend on it: the reference on zeros there agrees
    zeroed = [torch.nan_to_num(t, nan=0.0) for t in (q, k, v)]
    ref = fastvl.ops.flash_attention(*zeroed, softmax_scale=0.25, backend="reference", **features)
    for rows in clean:
        torch.testing.assert_close(out[:, rows], ref[:, rows], rtol=1e-5, atol=1e-6)


def test_flops_count_the_attended_pairs():
    # FlopCounterMode charges windowed / frame-block attention for the pairs it attends, not S x S
    N, text, F, frames, H, D = 2, 1, 8, 4, 2, 16
    S = text + F * frames
    q = randn(N, S, H, D, device="cpu")
    counts = {}
    for name, kw in (("full", {}), ("w0", dict(frame_tokens=F, text_tokens=text, spatial_only=True))):
        with FlopCounterMode(display=False) as m:
            fastvl.ops.flash_attention(q, q, q, backend="reference", **kw)
        counts[name] = m.get_total_flops()
    assert counts["full"] == 4 * N * S * S * H * D
    pairs = S * S - (frames * F) ** 2 + frames * F * F  # text rows / columns + the diagonal frame blocks
    assert counts["w0"] == 4 * N * pairs * H * D


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_gpu_features_vs_float64(dtype, case):
    # every feature case at VATT-M-like lengths (1 CLS + 8 frames of 196 where frames apply), bf16 / fp16
    name, N, Sq, Sk, H, Hk, D, _features = case
    scale_len = 1 + 8 * 196
    if "frames" in name or "temporal" in name:
        text = 3 if "w0" in name else (2 if "w1" in name else 1)
        F = 5 if "w0" in name else 4
        Sq = Sk = text + F * (scale_len // F)
    else:
        Sq, Sk = Sq * 40 + 1, Sk * 40 + 1
    torch.manual_seed(0)
    q = torch.randn(N, Sq, H, 64, device="cuda", dtype=torch.float64).to(dtype).requires_grad_(True)
    k, v = (torch.randn(N, Sk, Hk, 64, device="cuda", dtype=torch.float64).to(dtype).requires_grad_(True)
            for _ in range(2))  # fmt: skip
    kw, nk = _feature_kwargs(name, N, Sq, Sk, H, Hk, dtype)
    res = fastvl.ops.flash_attention(q, k, v, backend="triton", **kw)
    out = res[0] if kw.get("return_lse") else res
    g = torch.randn_like(out)
    leaves = [q, k, v] + ([kw["key_bias"]] if "key_bias" in kw else [])
    grads = torch.autograd.grad(out, leaves, g)
    results = []
    for cast in (torch.float64, dtype):
        ls = [t.detach().to(cast if t.dtype != torch.float32 else torch.float64).requires_grad_(True) for t in leaves]
        nkw = dict(nk, bias=ls[3]) if len(ls) > 3 else nk
        o, _ = naive_full(*ls[:3], 64**-0.5, **nkw)
        results.append((o, torch.autograd.grad(o, ls, g.to(cast))))
    (ref, ref_grads), (same, same_grads) = results
    assert_close(out, ref, dtype, torch_same_dtype=same, name=f"out ({name})")
    for n, a, r, sm in zip(["q", "k", "v", "key_bias"], grads, ref_grads, same_grads):
        assert_close(a, r, dtype if n != "key_bias" else torch.float32, torch_same_dtype=sm.to(a.dtype),
                     name=f"grad {n} ({name})")  # fmt: skip
