import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastvl
from fastvl.ops.merge import layout, match_reference, merge_destinations, merge_reference, merge_reference_backward
from fastvl.testing import assert_close, device, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference"] + KERNELS
needs_kernel = pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")


def tome_oracle(x, metric, size, r, protected):
    """The oracle: facebookresearch/ToMe's ``bipartite_soft_matching(metric, r, class_token=protected >= 1,
    distill_token=protected == 2)`` followed by ``merge_wavg(merge, x, size)`` and ``merge_source(merge, x)``
    (tome/merge.py), in ToMe's steps and order: normalise the metric, A = even tokens, B = odd tokens, scores
    ``a @ b^T``, the class token's row and the distillation token's column at -inf, each A token's max and
    argmax, ``argsort(descending=True)`` of the maxima, the first r merge (``scatter_reduce``), the unmerged
    A tokens sorted by index when there is a class token, output ``[unmerged A, B]`` (``[unm[0], dst[0],
    unm[1:], dst[1:]]`` with a distillation token). Written for this test from ToMe's algorithm rather than
    copied (ToMe is licensed CC BY-NC 4.0); it was checked against ToMe's own functions on random inputs.
    Returns ``(merged, size, source)``; ``source[b, o, l] = 1`` when input token l went to output row o.
    """
    B, t, C = x.shape
    r = min(r, (t - protected) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    sim = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    if protected >= 1:
        sim[:, 0, :] = -math.inf
    if protected == 2:
        sim[:, :, 0] = -math.inf
    best_val, best_b = sim.max(dim=-1)
    ranked = best_val.argsort(dim=-1, descending=True)
    src, unm = ranked[:, :r], ranked[:, r:]
    if protected >= 1:
        unm = unm.sort(dim=1).values
    dst = best_b.gather(1, src)

    def merge(v, reduce):
        a, b = v[:, 0::2], v[:, 1::2]
        n = v.shape[-1]
        kept = a.gather(1, unm[..., None].expand(-1, -1, n))
        b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, n), a.gather(1, src[..., None].expand(-1, -1, n)), reduce)
        if protected == 2:
            return torch.cat([kept[:, :1], b[:, :1], kept[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([kept, b], dim=1)

    w = merge(size, "sum")
    source = merge(torch.eye(t, dtype=x.dtype, device=x.device).expand(B, t, t), "amax")
    return merge(x * size, "sum") / w, w, source


def source_of(dest, out_len):
    """``(B, out_len, L)`` 0/1: which input tokens went to each output row."""
    B, L = dest.shape
    return torch.zeros(B, out_len, L, dtype=torch.float64, device=dest.device).scatter_(1, dest[:, None, :], 1.0)


def in_our_order(source, *tensors, ours):
    """Reorder ToMe's output rows to ours (they differ only without a class token, where ToMe leaves the
    unmerged tokens in score order): row o of ToMe goes where our row has the same sources."""
    perm = (ours[:, :, None, :] == source[:, None, :, :]).all(-1).float().argmax(1)  # (B, rows of ToMe) -> ours
    return [torch.zeros_like(t).scatter_(1, perm[..., None].expand_as(t), t) for t in (source, *tensors)]


# ---- the spec equals ToMe ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("L,r", [(24, 5), (37, 11), (30, 40)])  # r past ToMe's cap (t - protected) // 2
def test_merge_equals_tome(backend, protected, L, r):
    B, C, Cm = 3, 6, 5
    dtype = torch.float64 if backend == "reference" else torch.float32
    x64, m64 = randn(B, L, C, dtype=torch.float64), randn(B, L, Cm, dtype=torch.float64)
    size64 = torch.rand(B, L, 1, dtype=torch.float64, device=DEV) + 0.5
    x, m, size = x64.to(dtype), m64.to(dtype), size64.to(dtype)
    merged, new_size, info = fastvl.ops.merge_tokens(x, size, r, protected=protected, metric=m, backend=backend)
    ex, es, esrc = tome_oracle(x.double(), m.double(), size.double(), r, protected)
    src = source_of(info.dest, merged.shape[1])
    esrc, ex, es = in_our_order(esrc, ex, es, ours=src)
    assert torch.equal(src, esrc)  # same pairs
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(merged.double(), ex, rtol=tol, atol=tol)  # same merged values
    assert new_size.shape == (B, merged.shape[1], 1) and torch.allclose(new_size.double(), es, rtol=tol, atol=tol)
    # ToMe's unmerge: every token takes its row's value
    un = fastvl.ops.unmerge_tokens(merged, info, backend=backend)
    assert torch.allclose(un.double(), torch.einsum("bol,boc->blc", src, merged.double()), rtol=0, atol=0)


def test_reference_backward_is_the_derivative():
    B, L, C = 2, 19, 4
    x = randn(B, L, C, dtype=torch.float64).requires_grad_(True)
    size = torch.rand(B, L, dtype=torch.float64, device=DEV) + 0.5
    lay = layout(L, 1, "joint", 1, 6)
    dest = merge_destinations(*match_reference(x.detach(), lay), lay, L)
    out, new_size = merge_reference(x, size, dest, lay.out_len)
    g = randn(*out.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.allclose(merge_reference_backward(g, dest, size, new_size), gx, rtol=1e-13, atol=1e-14)


# ---- kernels against the spec -----------------------------------------------------------------------------


CASES = [
    # (protected, mode, frames, L without protected, r, metric width): joint ToMe with a CLS; text + video jointly
    # (A starting on an odd token); per frame (odd frame length); frame pairs; metric widths 40 (one chunk)
    # and 150 (three 64-channel chunks); 150 tokens: three 64-token A / B tiles (the GPU blocks)
    (1, "joint", None, 300, 70, 40),
    (5, "joint", None, 151, 30, 150),
    (2, "frame", 3, 3 * 45, 9, 40),
    (0, "time", 4, 4 * 33, 20, 150),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-P{c[0]}-C{c[5]}" for c in CASES])
def test_kernel_matches_reference(dtype, case):
    P, mode, frames, n, r, Cm = case
    B, C = 2, 300  # a 256-channel tile and a ragged one
    x64 = randn(B, P + n, C, dtype=torch.float64)
    m = randn(B, P + n, Cm, dtype=dtype)
    size = torch.randint(1, 4, (B, P + n), device=DEV).float()
    x = noncontiguous(x64.to(dtype)).requires_grad_(True)
    kw = dict(protected=P, metric=m, mode=mode, frames=frames)
    merged, new_size, info = fastvl.ops.merge_tokens(x, size, r, backend="triton", **kw)
    xr = x.detach().double().requires_grad_(True)
    em, es, ei = fastvl.ops.merge_tokens(xr, size.double(), r, backend="reference", **{**kw, "metric": m.double()})
    assert torch.equal(info.dest, ei.dest)  # same pairs
    assert merged.dtype == dtype and new_size.dtype == torch.float32
    assert torch.equal(new_size.double(), es)
    assert_close(merged, em.detach(), dtype, name="merged")
    g = randn(*merged.shape, dtype=dtype)
    merged.backward(g)
    em.backward(g.double())
    assert_close(x.grad, xr.grad, dtype, name="grad x")


@needs_kernel
def test_kernel_ties_agree_with_reference():
    # metric rows with four entries of +-1 (norm 2): every cosine is a multiple of 1/4, exact in both the kernel
    # and the reference, so equal similarities (the lower B index wins) and equal maxima (the lower A index
    # merges first) are real ties in both; repeated rows add more
    B, L, Cm = 2, 90, 16
    g = torch.Generator().manual_seed(3)
    m = torch.zeros(B, L, Cm)
    cols = torch.rand(B, L, Cm, generator=g).argsort(-1)[..., :4]
    m.scatter_(2, cols, torch.randint(0, 2, (B, L, 4), generator=g).float() * 2 - 1)
    m[:, 40:60] = m[:, 20:40]
    m = m.to(DEV)
    x = randn(B, L, 8)
    for P, mode, frames in ((0, "joint", None), (1, "joint", None), (0, "frame", 4), (2, "time", 2)):
        kw = dict(protected=P, metric=m, mode=mode, frames=frames)
        a = fastvl.ops.merge_tokens(x[:, : P + 88], None, 17, backend="triton", **{**kw, "metric": m[:, : P + 88]})
        b = fastvl.ops.merge_tokens(x[:, : P + 88], None, 17, backend="reference", **{**kw, "metric": m[:, : P + 88]})
        assert torch.equal(a[2].dest, b[2].dest), (P, mode)
        assert_close(a[0], b[0].double(), torch.float32)


# ---- video modes, composition, FLOPs ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_mode_is_tome_per_frame(backend):
    B, P, T, N, C, r = 2, 2, 3, 11, 6, 4
    x = randn(B, P + T * N, C)
    merged, size, info = fastvl.ops.merge_tokens(x, None, r, protected=P, mode="frame", frames=T, backend=backend)
    assert merged.shape == (B, P + T * (N - r), C)
    assert torch.equal(merged[:, :P], x[:, :P])
    for t in range(T):
        f = x[:, P + t * N : P + (t + 1) * N].double()
        ex, es, _ = tome_oracle(f, f, torch.ones(B, N, 1, dtype=torch.float64, device=DEV), r, 0)
        got = merged[:, P + t * (N - r) : P + (t + 1) * (N - r)].double()
        # ToMe without a class token orders its unmerged rows by score: compare as sets of rows
        assert torch.allclose(got.sort(dim=1).values, ex.sort(dim=1).values, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_mode_merges_each_token_into_its_best_match_in_the_next_frame(backend):
    B, T, N, C = 2, 4, 6, 8
    x = randn(B, T * N, C)
    merged, size, info = fastvl.ops.merge_tokens(x, None, N, protected=0, mode="time", frames=T, backend=backend)
    assert merged.shape == (B, T // 2 * N, C)  # r = N: every earlier frame merged into its partner
    v = x.reshape(B, T // 2, 2, N, C)
    a, b = torch.nn.functional.normalize(v[:, :, 0], dim=-1), torch.nn.functional.normalize(v[:, :, 1], dim=-1)
    best = (a @ b.transpose(-1, -2)).argmax(-1)  # (B, pairs, N)
    exp = (torch.arange(T // 2, device=DEV)[:, None] * N + best).reshape(B, -1)
    assert torch.equal(info.dest.reshape(B, T // 2, 2, N)[:, :, 0].reshape(B, -1), exp)
    assert float(size.sum()) == B * T * N


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_merges_compose(backend):
    x = randn(2, 1 + 40, 8)
    m1, s1, i1 = fastvl.ops.merge_tokens(x, None, 10, backend=backend)
    m2, s2, i2 = fastvl.ops.merge_tokens(m1, s1, 7, backend=backend)
    dest = i2.dest.gather(1, i1.dest)
    assert torch.equal(s2, torch.zeros_like(s2).scatter_add_(1, dest, torch.ones(2, 41, device=DEV)))
    # the second merge's rows are the size-weighted means of the original tokens they hold
    exp = merge_reference(x, None, dest, m2.shape[1])[0]
    assert_close(m2, exp.double(), torch.float32)
    assert torch.equal(
        fastvl.ops.unmerge_tokens(m2, fastvl.ops.MergeInfo(dest)), m2.gather(1, dest[..., None].expand(-1, -1, 8))
    )


def test_nothing_to_merge_returns_input_and_unit_sizes():
    x = randn(2, 9, 4)
    merged, size, info = fastvl.ops.merge_tokens(x, None, 0)
    assert (
        merged is x and torch.equal(size, torch.ones(2, 9, device=DEV)) and info.dest.tolist() == [list(range(9))] * 2
    )


def test_flops_are_the_similarity_matmul():
    B, L, Cm = 2, 1 + 30, 7
    x, m = randn(B, L, 5), randn(B, L, Cm)
    with FlopCounterMode(display=False) as fc:
        fastvl.ops.merge_tokens(x, None, 6, metric=m)
    assert fc.get_total_flops() == 2 * B * 15 * 15 * Cm  # A = even tokens (15 after the CLS), B = odd (15)
    pos_a, pos_b = layout(L, 1, "joint", 1, 6).positions(DEV)
    with FlopCounterMode(display=False) as fc:
        m[:, pos_a[0]] @ m[:, pos_b[0]].transpose(1, 2)  # the eager similarity matmul on the same sets
    assert fc.get_total_flops() == 2 * B * 15 * 15 * Cm


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), None, -1), ValueError, "'r' must be >= 0"),
        (lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), None, 2, protected=10), ValueError, "'protected'=10"),
        (lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), torch.ones(2, 8), 2), ValueError, "'size' must have"),
        (
            lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), None, 2, metric=torch.randn(2, 8, 3)),
            ValueError,
            "'metric' must have x's",
        ),
        (lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), None, 2, mode="space"), ValueError, "'mode' must be"),
        (lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), None, 2, mode="frame"), ValueError, "needs argument"),
        (
            lambda: fastvl.ops.merge_tokens(torch.randn(2, 9, 4), None, 2, mode="frame", frames=3),
            ValueError,
            "'frames'=3 must divide the 8",
        ),
        (
            lambda: fastvl.ops.merge_tokens(torch.randn(2, 10, 4), None, 2, protected=1, mode="time", frames=3),
            ValueError,
            "must be even",
        ),
        (lambda: fastvl.ops.unmerge_tokens(torch.randn(2, 5, 4), torch.zeros(3, 9)), TypeError, "'info' must have"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- module ------------------------------------------------------------------------------------------------


def test_token_merger_module():
    x = randn(2, 1 + 4 * 10, 8, device="cpu")
    tm = fastvl.nn.TokenMerger(r=3, protected=1, mode="frame", frames=4)
    merged, size, info = tm(x)
    assert merged.shape == (2, 1 + 4 * 7, 8) and size.shape == (2, 29)
    assert torch.equal(merged, fastvl.ops.merge_tokens(x, None, 3, mode="frame", frames=4)[0])
    assert tm(merged, size, r=2)[0].shape == (2, 1 + 4 * 5, 8)  # r per call
    assert "mode='frame'" in repr(tm)
    with pytest.raises(ValueError, match="'r' must be >= 0"):
        fastvl.nn.TokenMerger(r=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_merge_large(dtype):
    B, L, C, Cm, r = 64, 1 + 1568, 1024, 64, 392
    x = torch.randn(B, L, C, device="cuda", dtype=dtype, requires_grad=True)
    m = torch.randn(B, L, Cm, device="cuda", dtype=dtype)
    merged, size, info = fastvl.ops.merge_tokens(x, None, r, metric=m, backend="triton")
    em, es, ei = fastvl.ops.merge_tokens(x.detach().float(), None, r, metric=m.float(), backend="reference")
    agree = (info.dest == ei.dest).float().mean().item()
    assert agree > 0.99  # bf16/fp16 products summed in another order can swap near-equal similarities
    same = (info.dest == ei.dest).all(1)
    assert_close(merged[same].float(), em[same].double(), dtype, name="merged")
    merged.backward(torch.ones_like(merged))
    assert torch.isfinite(x.grad.float()).all()


def test_opcheck_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 1 + 20, 6, requires_grad=True)
    m = torch.randn(2, 21, 4)
    size = torch.rand(2, 21) + 0.5
    torch.library.opcheck(torch.ops.fastvl.merge_tokens.default, (x, size, m, 5, 1, "joint", 1, "reference"))
    torch.library.opcheck(torch.ops.fastvl.merge_tokens.default, (x, None, x.detach(), 3, 1, "frame", 4, "reference"))
    with FakeTensorMode():
        merged, new_size, info = fastvl.ops.merge_tokens(torch.empty(2, 21, 6), None, 5, metric=torch.empty(2, 21, 4))
        assert merged.shape == (2, 16, 6) and new_size.shape == (2, 16) and info.dest.shape == (2, 21)


class Reduce(torch.nn.Module):
    """Selection then merging, as a model would use them."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.select = fastvl.nn.TokenSelector(4, keep=0.5, keep_frames=2, protected=1, scorer="linear", dim=8)
        self.merge = fastvl.nn.TokenMerger(r=2, protected=1, mode="frame", frames=2)

    def forward(self, x):
        kept, ids = self.select(self.proj(x))
        merged, size, info = self.merge(kept)
        return fastvl.ops.unmerge_tokens(merged, info).square().sum() + size.log().sum()


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = Reduce()
    x = torch.randn(3, 1 + 4 * 10, 8)
    eager = m(x)
    eager.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out = torch.compile(m, fullgraph=True, backend="inductor")(x)
    out.backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(m.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
