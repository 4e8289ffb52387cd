import pytest
import torch

import fastvl
from fastvl.ops.select import select_reference
from fastvl.testing import device, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference"] + KERNELS
needs_kernel = pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")


def topk_gather(x, scores, k, groups=1):
    """The eager baseline: torch.topk per group, indices sorted, torch.gather."""
    B, L, C = x.shape
    S = L // groups
    idx = torch.topk(scores.reshape(B, groups, S), k, dim=-1).indices.sort(dim=-1).values
    ids = (idx + torch.arange(groups, device=x.device)[:, None] * S).reshape(B, groups * k)
    return torch.gather(x, 1, ids[..., None].expand(B, groups * k, C)), ids


# ---- the spec ------------------------------------------------------------------------------------------


def test_reference_hand_case_ties_in_original_order():
    x = torch.arange(2 * 6, dtype=torch.float64).reshape(1, 6, 2)
    scores = torch.tensor([[0.5, 2.0, 0.5, 0.5, -1.0, 2.0]])
    kept, ids = fastvl.ops.select_tokens(x, scores, 3)
    assert ids.tolist() == [[0, 1, 5]]  # 2.0, 2.0, then the first of three 0.5s; returned in original order
    assert torch.equal(kept, x[:, [0, 1, 5]])
    kept, ids = fastvl.ops.select_tokens(x, scores, 2, groups=2)  # groups [0..2], [3..5]
    assert ids.tolist() == [[0, 1, 3, 5]]
    # -0.0 equals +0.0 (the lower index wins), NaN is the highest score
    z = torch.tensor([[-0.0, 0.0, float("nan"), -5.0]])
    assert fastvl.ops.select_tokens(x[:, :4], z, 2)[1].tolist() == [[0, 2]]


def test_reference_matches_topk_without_ties():
    x = randn(3, 40, 5, dtype=torch.float64)
    scores = randn(3, 40)
    for groups in (1, 4):
        kept, ids = fastvl.ops.select_tokens(x, scores, 6, groups=groups)
        ek, ei = topk_gather(x, scores, 6, groups)
        assert torch.equal(ids, ei) and torch.equal(kept, ek)


def test_gradient_scattered_back_scores_get_none():
    x = randn(2, 12, 3, dtype=torch.float64).requires_grad_(True)
    scores = randn(2, 12).requires_grad_(True)
    kept, ids = fastvl.ops.select_tokens(x, scores, 4, groups=2)
    g = randn(*kept.shape, dtype=torch.float64)
    kept.backward(g)
    exp = torch.zeros_like(x).scatter_(1, ids[..., None].expand(2, 8, 3), g)
    assert torch.equal(x.grad, exp) and scores.grad is None


# ---- kernel against the spec ----------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("groups,k", [(1, 61), (3, 23)])
@pytest.mark.parametrize("layout", ["contiguous", "rows"])
def test_kernel_matches_reference(dtype, groups, k, layout):
    # S = 150 per group at groups=1: three 64-token rank tiles and ten 16-row place blocks (the GPU blocks);
    # C = 300: a 256-channel block and a ragged one
    B, L, C = 2, 150, 300
    x64 = randn(B, L, C, dtype=torch.float64)
    scores = randn(B, L, dtype=dtype)
    scores[0, 10:20] = scores[0, 30]  # a run of ties
    x = x64.to(dtype)
    x = (noncontiguous(x) if layout == "rows" else x).requires_grad_(True)
    kept, ids = fastvl.ops.select_tokens(x, scores, k, groups=groups, backend="triton")
    ek, ei, _ = select_reference(x.detach().double(), scores.double(), k, groups)
    assert torch.equal(ids, ei) and kept.dtype == dtype
    assert torch.equal(kept.double(), ek)  # a copy: exact
    g = randn(*kept.shape, dtype=dtype)
    kept.backward(g)
    exp = torch.zeros(B, L, C, dtype=torch.float64, device=DEV).scatter_(1, ei[..., None].expand(-1, -1, C), g.double())
    assert torch.equal(x.grad.double(), exp)


@needs_kernel
def test_kernel_special_scores_and_duplicates():
    x = randn(3, 70, 8)
    scores = torch.randint(-3, 3, (3, 70), device=DEV).float()  # many ties
    scores[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    scores[1, 40:50] = float("nan")
    for groups, k in ((1, 35), (5, 3), (7, 10)):
        a = fastvl.ops.select_tokens(x, scores, k, groups=groups, backend="triton")
        b = fastvl.ops.select_tokens(x, scores, k, groups=groups, backend="reference")
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep_frames", [None, 3, 1])
def test_space_time_keeps_protected_best_frames_best_regions(backend, keep_frames):
    B, P, T, N, C = 2, 3, 5, 13, 20
    x = randn(B, P + T * N, C).requires_grad_(True)
    scores = randn(B, T * N)
    kept, ids = fastvl.ops.select_space_time(
        x, scores, 4, frames=T, keep_frames=keep_frames, protected=P, backend=backend
    )  # fmt: skip
    F = T if keep_frames is None else keep_frames
    # by hand: frames by mean score (torch.topk, then time order), then topk regions per kept frame
    frames = torch.topk(scores.reshape(B, T, N).mean(-1), F, dim=1).indices.sort(dim=1).values
    exp = []
    for b in range(B):
        row = list(range(P))
        for f in frames[b].tolist():
            top = torch.topk(scores[b, f * N : (f + 1) * N], 4).indices.sort().values
            row += (P + f * N + top).tolist()
        exp.append(row)
    assert ids.tolist() == exp
    assert torch.equal(kept, torch.gather(x.detach(), 1, ids[..., None].expand(-1, -1, C)))
    kept.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x).scatter_(1, ids[..., None].expand(-1, -1, C), 1.0))


def test_all_kept_returns_input():
    x = randn(2, 12, 4)
    kept, ids = fastvl.ops.select_tokens(x, randn(2, 12), 6, groups=2)
    assert kept is x and ids.tolist() == [list(range(12))] * 2
    assert "nothing to dispatch" in fastvl.explain(fastvl.ops.select_tokens, x, randn(2, 12), 6, groups=2)


def test_scores_from_attention_and_frames():
    rows = torch.softmax(torch.randn(2, 3, 4, 1 + 6, dtype=torch.float64), dim=-1)  # 4 query rows, 1 CLS + 6 keys
    s = fastvl.ops.received_attention(rows, skip=1)
    assert s.shape == (2, 6) and torch.allclose(s, rows[..., 1:].mean(dim=(1, 2)))
    fs = fastvl.ops.frame_scores(torch.arange(12.0).reshape(2, 6), 3)
    assert fs.tolist() == [[0.5, 2.5, 4.5], [6.5, 8.5, 10.5]]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastvl.ops.select_tokens(torch.randn(2, 10, 4), torch.randn(2, 10), 0), ValueError, "'k' must be >="),
        (lambda: fastvl.ops.select_tokens(torch.randn(2, 10, 4), torch.randn(2, 10), 11), ValueError, "'k'=11 exceeds"),
        (lambda: fastvl.ops.select_tokens(torch.randn(2, 10, 4), torch.randn(2, 9), 3), ValueError, "'scores' must"),
        (lambda: fastvl.ops.select_tokens(torch.randn(10, 4), torch.randn(2, 10), 3), ValueError, "'x' must be 3-D"),
        (
            lambda: fastvl.ops.select_tokens(torch.randn(2, 10, 4), torch.randn(2, 10), 2, groups=3),
            ValueError,
            "'groups'=3 must divide",
        ),
        (
            lambda: fastvl.ops.select_tokens(torch.randn(2, 10, 4), torch.ones(2, 10, dtype=torch.int64), 2),
            TypeError,
            "'scores' must have dtype",
        ),
        (
            lambda: fastvl.ops.select_space_time(torch.randn(2, 13, 4), torch.randn(2, 13), 2, frames=3, protected=1),
            ValueError,
            r"'scores' must have shape \(B, L\)=\(2, 12\) \(the tokens after the 1 protected\)",
        ),
        (
            lambda: fastvl.ops.select_space_time(torch.randn(2, 12, 4), torch.randn(2, 12), 2, frames=3, keep_frames=4),
            ValueError,
            "'keep_frames'=4 exceeds the 3 frames",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_triton_backend_reasons():
    x, s = torch.randn(2, 10, 4), torch.randn(2, 10)
    report = fastvl.explain(fastvl.ops.select_tokens, x, s.double(), 3, backend="triton")
    assert "scores dtype torch.float64" in report


# ---- module --------------------------------------------------------------------------------------------


def test_token_selector_attention_scorer():
    B, P, T, N, C = 2, 1, 4, 9, 8
    x = randn(B, P + T * N, C, device="cpu")
    attn = torch.softmax(torch.randn(B, 2, P, P + T * N), dim=-1)
    sel = fastvl.nn.TokenSelector(T, keep=0.5, keep_frames=2, protected=P)
    kept, ids = sel(x, attn)
    assert kept.shape == (B, P + 2 * 4, C)
    exp = fastvl.ops.select_space_time(x, fastvl.ops.received_attention(attn, skip=P), 4, frames=T, keep_frames=2,
                                       protected=P)  # fmt: skip
    assert torch.equal(ids, exp[1]) and torch.equal(kept, exp[0])
    with pytest.raises(ValueError, match="needs argument 'attn'"):
        sel(x)


def test_token_selector_linear_scorer_learns_through_straight_through():
    B, P, T, N, C = 2, 1, 3, 8, 6
    x = randn(B, P + T * N, C, device="cpu").requires_grad_(True)
    sel = fastvl.nn.TokenSelector(T, keep=3, protected=P, scorer="linear", dim=C)
    kept, ids = sel(x)
    assert torch.allclose(kept, torch.gather(x.detach(), 1, ids[..., None].expand(-1, -1, C)))  # values unchanged
    kept.square().sum().backward()
    assert sel.score.weight.grad is not None and sel.score.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs argument 'dim'"):
        fastvl.nn.TokenSelector(T, scorer="linear")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_select_large(dtype):
    B, T, N, C = 64, 8, 196, 1024
    x = torch.randn(B, T * N, C, device="cuda", dtype=dtype, requires_grad=True)
    scores = torch.randn(B, T * N, device="cuda", dtype=dtype)
    kept, ids = fastvl.ops.select_tokens(x, scores, 98, groups=T, backend="triton")
    ek, ei, _ = select_reference(x.detach(), scores, 98, T)
    assert torch.equal(ids, ei) and torch.equal(kept, ek)
    kept.backward(torch.ones_like(kept))
    assert int(x.grad.float().sum()) == B * T * 98 * C


def test_opcheck_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 1 + 3 * 7, 5, requires_grad=True)
    s = torch.randn(2, 3 * 7)
    frames = torch.tensor([[0, 2], [1, 2]])
    torch.library.opcheck(torch.ops.fastvl.select_tokens.default, (x, s, frames, 3, 3, 1, "reference"))
    torch.library.opcheck(torch.ops.fastvl.select_tokens.default, (x[:, 1:], s, None, 4, 3, 0, "reference"))
    with FakeTensorMode():
        kept, ids = fastvl.ops.select_space_time(torch.empty(2, 22, 5), torch.empty(2, 21), 3, frames=3,
                                                 keep_frames=2, protected=1)  # fmt: skip
        assert kept.shape == (2, 1 + 2 * 3, 5) and ids.shape == (2, 7)
