import importlib.util
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fastvl
from fastvl import BackendError
from fastvl.ops import contrastive as C
from fastvl.testing import assert_close, device, dtypes_to_test, interpret, kernel_backends, noncontiguous

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference", "chunked"] + KERNELS
B_VALUES, D_VALUES = (1, 7, 64, 333), (32, 200, 256)
# every B, D and P at least once for the interpreted kernels (each operation costs ~ms there)
KERNEL_SHAPES = [(1, 32), (7, 200), (64, 256), (333, 32)]
MIL_KERNEL_SHAPES = [(1, 32, 3), (7, 200, 3), (64, 256, 3), (333, 32, 1)]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Blocks of ~1500 logits, so the chunked backend walks several blocks even at B=64."""
    monkeypatch.setattr(C.chunked, "CHUNK_ELEMS", 1500)


def unit(*shape, scale: float = 1.0) -> torch.Tensor:
    """L2-normalised float64 features (times ``scale``) on the test device."""
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).mul(scale).to(DEV)


def _prep(xs, dtype, layout):
    out = []
    for x in xs:
        y = x.detach().to(dtype).clone()  # a fresh leaf, even when dtype is x's
        if layout != "contiguous" and y.dim() == 2 and y.shape[0] > 1:
            y = noncontiguous(y, layout)
        out.append(y.requires_grad_(True))
    return out


def _run(fn, xs, scalars, g):
    out = fn(*xs, *scalars)
    out.backward(torch.tensor(g, dtype=out.dtype, device=out.device))
    return out.detach(), [x.grad for x in xs] + [s.grad for s in scalars]


def check_loss(name, backend, dtype, xs64, scalars64, extra=(), layout="contiguous"):
    """fastvl loss with ``backend`` in ``dtype`` against the float64 spec on the same (rounded) inputs:
    value and gradients of every feature tensor and scalar (logit_scale, logit_bias)."""
    public = {"clip": fastvl.ops.clip_loss, "mil": fastvl.ops.mil_nce_loss, "siglip": fastvl.ops.siglip_loss}[name]
    spec = {"clip": C.clip_loss_reference, "mil": C.mil_nce_loss_reference, "siglip": C.siglip_loss_reference}[name]
    xs = _prep(xs64, dtype, layout)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32  # logit_scale is an fp32 parameter
    sc = [torch.tensor(v, dtype=sdt, device=DEV, requires_grad=True) for v in scalars64]
    g = 0.75  # upstream gradient != 1
    out, grads = _run(lambda *a: public(*a[: len(xs)], *a[len(xs) :], *extra, backend=backend), xs, sc, g)
    assert out.shape == () and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_in = [x.detach().double().requires_grad_(True) for x in xs]
    ref_sc = [x.detach().double().requires_grad_(True) for x in sc]
    ref, ref_grads = _run(lambda *a: spec(*a[: len(xs)], *a[len(xs) :], *extra), ref_in, ref_sc, g)
    same = None
    if dtype != torch.float64:  # PyTorch's own error in this dtype (flash-attn's rule)
        low = [x.detach().to(dtype).requires_grad_(True) for x in xs]
        same_sc = [x.detach().clone().requires_grad_(True) for x in sc]
        same = _run(lambda *a: spec(*a[: len(xs)], *a[len(xs) :], *extra), low, same_sc, g)
    tol = dtype
    assert_close(out, ref, tol, torch_same_dtype=None if same is None else same[0], name=f"{name} loss")
    names = [f"grad x{i}" for i in range(len(xs))] + [f"grad scalar{i}" for i in range(len(sc))]
    for i, (got, exp) in enumerate(zip(grads, ref_grads)):
        assert got is not None, names[i]
        assert got.dtype == (xs[i].dtype if i < len(xs) else sdt)
        assert_close(got, exp, tol, torch_same_dtype=None if same is None else same[1][i], name=f"{name} {names[i]}")


# ---- the spec against hand-computed values -------------------------------------------------


def test_clip_spec_hand_case():
    a = torch.eye(2, dtype=torch.float64)
    # logits = I: each row and column CE = log(e + 1) - 1
    assert math.isclose(C.clip_loss_reference(a, a, 1.0).item(), math.log(math.e + 1) - 1, rel_tol=1e-12)
    assert math.isclose(fastvl.ops.clip_loss(a, a, 1.0).item(), math.log(math.e + 1) - 1, rel_tol=1e-12)


def test_mil_nce_spec_against_loops():
    """The reference's definition, term by term: denominators over [s(i,j,p)] ++ [s(j,i,p)], invalid texts out."""
    B, P, D, s = 4, 2, 5, 3.0
    v, t = unit(B, D), unit(B, P, D)
    valid = torch.tensor([True, False, True, True], device=DEV)

    def sim(i, j, p):
        return s * float(v[i] @ t[j, p])

    losses = []
    for i in range(B):
        if not valid[i]:
            losses.append(0.0)
            continue
        terms = [sim(i, j, p) for j in range(B) if valid[j] for p in range(P)]
        terms += [sim(j, i, p) for j in range(B) for p in range(P)]
        pos = [sim(i, i, p) for p in range(P)]
        losses.append(math.log(sum(map(math.exp, terms))) - math.log(sum(map(math.exp, pos))))
    expected = sum(losses) / int(valid.sum())
    assert math.isclose(C.mil_nce_loss_reference(v, t, s, valid).item(), expected, rel_tol=1e-12)
    for backend in BACKENDS:
        got = fastvl.ops.mil_nce_loss(v.float(), t.float(), s, valid, backend=backend).item()
        assert math.isclose(got, expected, rel_tol=1e-5), backend
    # P=1 and (B, D) text: plain NCE with the positive in both halves
    t1 = t[:, 0]
    x = s * v @ t1.T
    li = torch.logsumexp(torch.cat([x, x.T], 1), 1) - x.diagonal()
    assert torch.allclose(fastvl.ops.mil_nce_loss(v, t1, s), li.mean(), rtol=1e-12)


def test_siglip_spec_hand_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    s, bias = 2.0, -1.0
    x = s * a @ b.T + bias
    expected = 0.0
    for i in range(2):
        for j in range(2):
            z = x[i, j].item() if i == j else -x[i, j].item()
            expected += math.log1p(math.exp(-z))
    expected /= 2
    assert math.isclose(C.siglip_loss_reference(a, b, s, bias).item(), expected, rel_tol=1e-12)
    assert math.isclose(fastvl.ops.siglip_loss(a, b, s, bias).item(), expected, rel_tol=1e-12)


# ---- every backend against the float64 spec ------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64] + dtypes_to_test())
@pytest.mark.parametrize("B", B_VALUES)
@pytest.mark.parametrize("D", D_VALUES)
def test_torch_backends(backend, dtype, B, D, monkeypatch):
    monkeypatch.setattr(C.chunked, "CHUNK_ELEMS", (B // 3 + 1) * B)  # CLIP: 3 row blocks (ragged), MIL: ~3P
    a, b = unit(B, D), unit(B, D)
    check_loss("clip", backend, dtype, [a, b], [14.3])
    check_loss("siglip", backend, dtype, [a, b], [10.0, -10.0])
    P = 3 if D != 200 else 1
    valid = torch.rand(B, device=DEV) > 0.3
    valid[0] = True
    check_loss("mil", backend, dtype, [a, unit(B, P, D)], [14.3], extra=(valid if B > 1 else None,))


@pytest.mark.skipif(not KERNELS, reason="no Triton here (needs a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("B,D", KERNEL_SHAPES)
def test_triton_clip_siglip(dtype, B, D):
    a, b = unit(B, D), unit(B, D)
    check_loss("clip", "triton", dtype, [a, b], [14.3])
    check_loss("siglip", "triton", dtype, [a, b], [10.0, -10.0])


@pytest.mark.skipif(not KERNELS, reason="no Triton here (needs a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("B,D,P", MIL_KERNEL_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_triton_mil_nce(dtype, B, D, P, masked):
    valid = None
    if masked and B > 1:
        valid = torch.rand(B, device=DEV) > 0.4
        valid[:2] = torch.tensor([True, False])
    check_loss("mil", "triton", dtype, [unit(B, D), unit(B, P, D)], [14.3], extra=(valid,))


@pytest.mark.parametrize("backend", ["chunked"] + KERNELS)
@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_noncontiguous_features(backend, layout):
    B, D = 70, 48
    a, b = unit(B, D), unit(B, D)
    check_loss("clip", backend, torch.float32, [a, b], [14.3], layout=layout)
    check_loss("siglip", backend, torch.float32, [a, b], [5.0, -2.0], layout=layout)
    check_loss("mil", backend, torch.float32, [a, b], [14.3], extra=(None,), layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """Logits of several hundred (unnormalised features, s=100): the online LSE must not overflow."""
    B, D = 40, 24
    a, b = unit(B, D, scale=3.0), unit(B, D, scale=3.0)
    b[:5] = a[:5]  # a few extremely peaked rows
    check_loss("clip", backend, torch.float32, [a, b], [100.0])
    check_loss("siglip", backend, torch.float32, [a, b], [100.0, -10.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mil_nce_all_invalid_is_zero_not_nan(backend):
    v = unit(5, 16).float().requires_grad_(True)
    t = unit(5, 2, 16).float().requires_grad_(True)
    s = torch.tensor(14.3, requires_grad=True, device=DEV)
    valid = torch.zeros(5, dtype=torch.bool, device=DEV)
    loss = fastvl.ops.mil_nce_loss(v, t, s, valid, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for g in (v.grad, t.grad, s.grad):
        assert torch.equal(g, torch.zeros_like(g))
    # one valid sample: only it counts, the invalid texts get no gradient
    valid[2] = True
    v.grad = t.grad = None
    fastvl.ops.mil_nce_loss(v, t, s, valid, backend=backend).backward()
    assert torch.isfinite(v.grad).all() and torch.equal(t.grad[valid.logical_not()], torch.zeros_like(t.grad[:4]))


def test_python_float_scale_and_no_grad_inputs():
    a, b = unit(9, 8), unit(9, 8)
    for backend in BACKENDS:
        if backend == "triton":
            a32, b32 = a.float(), b.float()
        else:
            a32, b32 = a, b
        v = fastvl.ops.clip_loss(a32, b32, 14.3, backend=backend)
        assert math.isclose(v.item(), C.clip_loss_reference(a, b, 14.3).item(), rel_tol=1e-5)
        # only b requires grad: a's gradient is skipped, b's is right
        bb = b32.clone().requires_grad_(True)
        fastvl.ops.clip_loss(a32, bb, 14.3, backend=backend).backward()
        br = b.clone().requires_grad_(True)
        C.clip_loss_reference(a, br, 14.3).backward()
        assert_close(bb.grad, br.grad, torch.float32, name=f"{backend} grad b")


# ---- memory structure, FLOPs, dispatch, custom-op plumbing ---------------------------------


class _Largest(TorchDispatchMode):
    """Largest floating-point tensor (elements) any ATen op returns while active (the interpreter's own
    byte-storage copies are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def _largest(fn) -> int:
    with _Largest() as m:
        fn()
    return m.largest


def test_chunked_never_materialises_the_logits(monkeypatch):
    monkeypatch.setattr(C.chunked, "CHUNK_ELEMS", 1 << 16)
    B, D = 2048, 8
    q, k = torch.randn(B, D), torch.randn(B, D)
    s = torch.tensor(3.0)
    row, col = C.lse_chunked(q, k, s, None, True)
    alpha, beta = torch.rand(B), torch.rand(B)
    chunked = _largest(lambda: C.lse_chunked(q, k, s, None, True))
    chunked_bwd = _largest(lambda: C.lse_backward_chunked(q, k, s, None, alpha, row, beta, col, True, True))
    sig = _largest(lambda: C.siglip_backward_chunked(q, k, s, s, s, 0, True, True))
    assert max(chunked, chunked_bwd, sig) <= 1 << 16  # one block, never B x B = 4M
    assert _largest(lambda: C.lse_reference(q, k, s, None, True)) >= B * B  # the reference does hold it


@pytest.mark.skipif(not KERNELS, reason="no Triton here (needs a GPU or TRITON_INTERPRET=1)")
def test_triton_allocates_o_of_b():
    from fastvl.kernels import contrastive as K

    B, D = 200, 16
    q, k = torch.randn(B, D, device=DEV), torch.randn(B, D, device=DEV)
    s = torch.tensor(3.0, device=DEV)
    row, col = K.lse_forward(q, k, s, None, True)
    fwd = _largest(lambda: K.lse_forward(q, k, s, None, True))
    bwd = _largest(lambda: K.lse_backward(q, k, s, None, torch.rand_like(row), row, torch.rand_like(col), col))
    # the forward's column-LSE slots: one (N,) row per program of a wave (at most 2 per SM); the gradient's
    # fp32 partials when it splits the streamed range: (spans, B, D) with spans <= a wave / resident blocks;
    # B x D: the (B, D) operands and gradients
    sms = (K.device_limits(q.device) or K.INTERPRET_LIMITS)[0]
    assert fwd <= max(2 * sms * B, B * D)
    assert bwd <= max(2 * sms * B, 2 * sms * 128 * D, B * D)
    assert max(fwd, bwd) < B * B // 4


# ---- the GPU launch shapes, through the interpreter ----------------------------------------


def _gpu_tiles():
    """Every distinct launch shape of the GPU tables, with a feature width in the range it serves that is
    not a multiple of its D chunk (or, resident, of 16) and splits a 256-feature gradient into slices."""
    from fastvl.kernels import contrastive as K

    out = {}
    for (kind, _), entries in K.CANDIDATES.items():
        for max_d, t in entries:
            out[(kind, t)] = max_d // 2 + 8 if t.block_d else max_d // 2 + 44
    return [pytest.param(kind, t, D, id=f"{kind}-{'-'.join(map(str, t))}-D{D}") for (kind, t), D in out.items()]


@pytest.mark.skipif(not interpret(), reason="forces the GPU tile tables through TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind,tiles,D", _gpu_tiles() if interpret() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tiles_in_the_interpreter(kind, tiles, D, dtype, monkeypatch):
    """Each GPU tile shape of ``kind`` forced through the interpreter at B not a multiple of any block:
    values and gradients (both feature sets, logit_scale, logit_bias, MIL-NCE with a valid mask) against
    float64. fp32 plans for one program per wave (the persistent forward walks several row blocks), fp16
    for 16 SMs (the streamed range is split across programs and the partials merged)."""
    from fastvl.kernels import contrastive as K

    monkeypatch.setitem(K.INTERPRET_TILES, kind, tiles)
    monkeypatch.setattr(K, "INTERPRET_LIMITS", (1, 1) if dtype == torch.float32 else (16, 232448))
    B = 70 if kind == "fwd" else 40  # the interpreter's cost grows with the gradient's (tile x chunk) steps
    a, b = unit(B, D), unit(B, D)
    check_loss("clip", "triton", dtype, [a, b], [14.3])
    check_loss("siglip", "triton", dtype, [a, b], [10.0, -10.0])
    valid = torch.rand(B, device=DEV) > 0.3
    valid[:2] = torch.tensor([True, False])
    check_loss("mil", "triton", dtype, [a, unit(B, 2, D)], [14.3], extra=(valid,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flop_counts_match_the_reference(backend):
    B, P, D = 24, 2, 16
    a, b = unit(B, D).float().requires_grad_(True), unit(B, D).float().requires_grad_(True)
    t = unit(B, P, D).float().requires_grad_(True)
    s = torch.tensor(10.0, requires_grad=True, device=DEV)

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn().backward()
        return fc.get_total_flops()

    assert (
        flops(lambda: fastvl.ops.clip_loss(a, b, s, backend=backend))
        == flops(lambda: C.clip_loss_reference(a, b, s))
        == 6 * B * B * D
    )
    assert flops(lambda: fastvl.ops.siglip_loss(a, b, s, -5.0, backend=backend)) == flops(
        lambda: C.siglip_loss_reference(a, b, s, -5.0)
    )
    assert (
        flops(lambda: fastvl.ops.mil_nce_loss(a, t, s, backend=backend))
        == flops(lambda: C.mil_nce_loss_reference(a, t, s))
        == 6 * B * B * P * D
    )


def test_auto_dispatch_and_reasons():
    small = torch.randn(64, 32)
    report = fastvl.explain(fastvl.ops.clip_loss, small, small, 10.0)
    assert "[chosen] reference" in report and "chunking threshold" in report and "triton" in report
    big = torch.randn(2048, 4)  # 2048^2 logits = the threshold
    assert "[chosen] chunked" in fastvl.explain(fastvl.ops.clip_loss, big, big, 10.0)
    text = torch.randn(1536, 2, 4)  # MIL-NCE: B x B*P logits, 1536 * 3072 >= 2^22
    assert "[chosen] chunked" in fastvl.explain(fastvl.ops.mil_nce_loss, big[:1536], text, 10.0)
    assert "[chosen] reference" in fastvl.explain(fastvl.ops.mil_nce_loss, big[:1024], text[:1024], 10.0)
    assert "[chosen] reference" in fastvl.explain(fastvl.ops.siglip_loss, small, small, 10.0, -10.0)
    with pytest.raises(BackendError, match="D=600"):
        fastvl.ops.clip_loss(torch.randn(4, 600), torch.randn(4, 600), 1.0, backend="triton")
    with pytest.raises(BackendError, match="dtype torch.float64"):
        fastvl.ops.siglip_loss(small.double(), small.double(), 1.0, 0.0, backend="triton")
    with pytest.raises(BackendError, match="unknown backend"):
        fastvl.ops.clip_loss(small, small, 1.0, backend="cuda")
    chosen, why = fastvl.backends.example_choice("clip_loss", torch.device("cpu"))
    assert chosen == "chunked" and "triton" in why
    with fastvl.use_backend({"clip_loss": "reference"}):
        assert "[chosen] reference" in fastvl.explain(fastvl.ops.clip_loss, big, big, 10.0)


def test_custom_ops_opcheck_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k = torch.randn(6, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    mask = torch.tensor([True, False, True, True, True, False, True])
    torch.library.opcheck(torch.ops.fastvl.contrastive_lse.default, (q, k, s, mask, True, "clip_loss", "chunked"))
    torch.library.opcheck(torch.ops.fastvl.contrastive_lse.default, (q, k, s, None, False, "clip_loss", "reference"))
    bias = torch.tensor(-1.0, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvl.siglip_loss_sum.default, (q, k, s, bias, 1, "siglip_loss", "chunked"))
    with FakeTensorMode():
        a = torch.empty(9, 4)
        assert fastvl.ops.clip_loss(a, a, 2.0).shape == ()
        assert fastvl.ops.mil_nce_loss(a, torch.empty(9, 3, 4), 2.0).shape == ()
        assert fastvl.ops.siglip_loss(a, a, 2.0, 1.0).shape == ()


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    a, b = unit(33, 16).float(), unit(33, 16).float()
    t = unit(33, 2, 16).float()

    def f(a, b, t, s):
        return (
            fastvl.ops.clip_loss(a, b, s, backend="chunked")
            + fastvl.ops.siglip_loss(a, b, s, -2.0)
            + fastvl.ops.mil_nce_loss(a, t, s)
        )

    s = torch.tensor(10.0, requires_grad=True)
    eager = f(a, b, t, s)
    (g_eager,) = torch.autograd.grad(eager, s)
    comp = torch.compile(f, fullgraph=True, backend="inductor")(a, b, t, s)
    (g_comp,) = torch.autograd.grad(comp, s)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(g_comp, g_eager)


# ---- bad input -----------------------------------------------------------------------------


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastvl.ops.clip_loss(_r(4, 8), _r(5, 8), 1.0), ValueError, r"'b' must have a's shape \(B, D\)"),
        (lambda: fastvl.ops.clip_loss(_r(4, 8), _r(4, 9), 1.0), ValueError, "'b' must have a's shape"),
        (lambda: fastvl.ops.clip_loss(_r(2, 4, 8), _r(2, 4, 8), 1.0), ValueError, "'a' must be 2-D"),
        (lambda: fastvl.ops.clip_loss(_r(4, 8), _r(4, 8), _r(3)), ValueError, "'logit_scale' must be a scalar"),
        (lambda: fastvl.ops.clip_loss(_r(4, 8), _r(4, 8), "10"), TypeError, "'logit_scale' must be a float"),
        (lambda: fastvl.ops.clip_loss(_r(0, 8), _r(0, 8), 1.0), ValueError, "'a' is an empty batch"),
        (lambda: fastvl.ops.clip_loss(_r(4, 0), _r(4, 0), 1.0), ValueError, "'a' has no features"),
        (
            lambda: fastvl.ops.clip_loss(_r(4, 8), _r(4, 8, dtype=torch.float64), 1.0),
            TypeError,
            "'b' must have a's dtype",
        ),
        (
            lambda: fastvl.ops.clip_loss(torch.ones(4, 8, dtype=torch.int64), _r(4, 8), 1.0),
            TypeError,
            "'a' must have dtype",
        ),
        (
            lambda: fastvl.ops.clip_loss(_r(4, 8), _r(4, 8), torch.tensor(2)),
            TypeError,
            "'logit_scale' must be a floating-point",
        ),
        (lambda: fastvl.ops.mil_nce_loss(_r(4, 8), _r(5, 2, 8), 1.0), ValueError, "'text' has batch 5, expected"),
        (lambda: fastvl.ops.mil_nce_loss(_r(4, 8), _r(4, 2, 7), 1.0), ValueError, "'text' has feature width 7"),
        (lambda: fastvl.ops.mil_nce_loss(_r(4, 8), _r(4, 2, 2, 8), 1.0), ValueError, "'text' must be 2-D or 3-D"),
        (lambda: fastvl.ops.mil_nce_loss(_r(4, 2, 8), _r(4, 2, 8), 1.0), ValueError, "'video' must be 2-D"),
        (lambda: fastvl.ops.mil_nce_loss(_r(0, 8), _r(0, 2, 8), 1.0), ValueError, "'video' is an empty batch"),
        (
            lambda: fastvl.ops.mil_nce_loss(_r(4, 8), _r(4, 2, 8), 1.0, torch.ones(4)),
            TypeError,
            "'valid' must have dtype in \\(bool\\)",
        ),
        (
            lambda: fastvl.ops.mil_nce_loss(_r(4, 8), _r(4, 2, 8), 1.0, torch.ones(3, dtype=torch.bool)),
            ValueError,
            r"'valid' must have shape \(B,\)=\(4,\)",
        ),
        (lambda: fastvl.ops.siglip_loss(_r(4, 8), _r(4, 8), 1.0, _r(2)), ValueError, "'logit_bias' must be a scalar"),
        (lambda: fastvl.ops.siglip_loss(_r(4, 8), _r(3, 8), 1.0, 0.0), ValueError, "'b' must have a's shape"),
        (lambda: fastvl.nn.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl must be one of"),
        (lambda: fastvl.nn.ClipLoss(rank=2, world_size=2), ValueError, "0 <= rank < world_size"),
        (
            lambda: fastvl.nn.ClipLoss(rank=0, world_size=2)(_r(4, 8), _r(4, 8), 1.0),
            RuntimeError,
            "initialised torch.distributed",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- modules and open_clip -----------------------------------------------------------------


def test_modules_single_process():
    a, b = unit(12, 16).float(), unit(12, 16).float()
    t = unit(12, 2, 16).float()
    s = torch.tensor(14.3, device=DEV)
    clip = fastvl.nn.ClipLoss()
    assert torch.equal(clip(a, b, s), fastvl.ops.clip_loss(a, b, s))
    bias = torch.tensor(-3.0, device=DEV, requires_grad=True)
    out = clip(a, b, s, logit_bias=bias, output_dict=True)
    assert set(out) == {"contrastive_loss"} and torch.allclose(out["contrastive_loss"], clip(a, b, s))
    out["contrastive_loss"].backward()
    assert bias.grad.item() == 0.0  # softmax ignores a shared shift, as in open_clip
    sig = fastvl.nn.SigLipLoss()
    assert torch.equal(sig(a, b, s, -10.0), fastvl.ops.siglip_loss(a, b, s, -10.0))
    assert set(sig(a, b, s, -10.0, output_dict=True)) == {"contrastive_loss"}
    mil = fastvl.nn.MILNCELoss()
    assert torch.equal(mil(a, t, s), fastvl.ops.mil_nce_loss(a, t, s))
    assert torch.equal(mil(a, b, s), fastvl.ops.mil_nce_loss(a, b[:, None], s))


def load_open_clip_loss():
    """open_clip's loss.py (it imports only torch) by file path, without importing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


OPEN_CLIP = load_open_clip_loss()
needs_open_clip = pytest.mark.skipif(
    OPEN_CLIP is None, reason="open_clip_torch is not installed (pip install open_clip_torch)"
)


@needs_open_clip
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_open_clip(backend):
    B, D = 50, 32
    a64, b64 = unit(B, D), unit(B, D)
    for ours, theirs, scalars in (
        (fastvl.nn.ClipLoss(backend=backend), OPEN_CLIP.ClipLoss(), (14.3,)),
        (fastvl.nn.SigLipLoss(backend=backend), OPEN_CLIP.SigLipLoss(), (10.0, -10.0)),
    ):
        results = []
        for fn in (ours, theirs):
            a, b = a64.float().requires_grad_(True), b64.float().requires_grad_(True)
            sc = [torch.tensor(v, device=DEV, requires_grad=True) for v in scalars]
            loss = fn(a, b, *sc, output_dict=True)["contrastive_loss"]
            loss.backward()
            results.append([loss.detach(), a.grad, b.grad] + [x.grad for x in sc])
        for got, exp in zip(*results):
            torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-6)


# ---- distributed: 2 gloo processes on the loopback -----------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _expected_clip(img, txt, s, r, W, local, gwg):
    """open_clip's per-rank value and gradients, computed in one process from the global batch."""
    B = img.shape[0] // W
    sl = slice(r * B, (r + 1) * B)
    I, T, S = (x.clone().requires_grad_(True) for x in (img, txt, s))

    def rank_loss(rr, keys_i, keys_t):
        lab = torch.arange(B) + rr * B
        q = slice(rr * B, (rr + 1) * B)
        return (F.cross_entropy(S * I[q] @ keys_t.T, lab) + F.cross_entropy(S * T[q] @ keys_i.T, lab)) / 2

    if not local:
        loss = C.clip_loss_reference(I, T, S)
        loss.backward()
        f = W if gwg else 1
        return loss.detach(), I.grad[sl] * f, T.grad[sl] * f, S.grad
    if gwg:
        sum(rank_loss(rr, I, T) for rr in range(W)).backward()
        gi, gt = I.grad[sl].clone(), T.grad[sl].clone()
        S.grad = None
        loss = rank_loss(r, I.detach(), T.detach())
        loss.backward()
        return loss.detach(), gi, gt, S.grad
    loss = rank_loss(r, I.detach(), T.detach())
    loss.backward()
    return loss.detach(), I.grad[sl], T.grad[sl], S.grad


def _grads(module, inputs, extra=()):
    """Run ``module`` on fresh leaves cloned from ``inputs``; (loss, gradient of each input)."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = module(*leaves, *extra)
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


def _siglip_rank_loss(rr, I, T, S, Bi, Bl):
    q = slice(rr * Bl, (rr + 1) * Bl)
    y = -torch.ones(Bl, T.shape[0], dtype=torch.float64)
    y[torch.arange(Bl), torch.arange(Bl) + rr * Bl] = 1
    return -F.logsigmoid(y * (S * I[q] @ T.T + Bi)).sum() / Bl


def _expected_siglip(img, txt, s, bias, r, W):
    """open_clip's per-rank SigLIP value and gradients from the global batch: the rank's images against every
    text; features get the gradient of the summed rank losses, scale and bias the rank loss's."""
    Bl = img.shape[0] // W
    sl = slice(r * Bl, (r + 1) * Bl)
    I, T, S, Bi = (x.clone().requires_grad_(True) for x in (img, txt, s, bias))
    sum(_siglip_rank_loss(rr, I, T, S, Bi, Bl) for rr in range(W)).backward()
    gi, gt = I.grad[sl].clone(), T.grad[sl].clone()
    S.grad = Bi.grad = None
    loss = _siglip_rank_loss(r, I, T, S, Bi, Bl)
    loss.backward()
    return [loss.detach(), gi, gt, S.grad, Bi.grad]


def _assert_all(got, exp, what):
    for i, (g, e) in enumerate(zip(got, exp)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=lambda m, i=i: f"{what}, output {i}: {m}")


def _ddp_equivalence(module, spec, x, y, s0, rank, world):
    """A shared linear encoder; DDP-style gradient averaging over ranks == one process on the global batch."""
    import torch.distributed as dist

    Bl = x.shape[0] // world
    sl = slice(rank * Bl, (rank + 1) * Bl)
    w0 = torch.randn(x.shape[1], 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w, s = w0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    module(F.normalize(x[sl] @ w, dim=-1), F.normalize(y[sl] @ w, dim=-1), s).backward()
    for p in (w, s):
        dist.all_reduce(p.grad)
        p.grad /= world
    w1, s1 = w0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    spec(F.normalize(x @ w1, dim=-1), F.normalize(y @ w1, dim=-1), s1).backward()
    _assert_all([w.grad, s.grad], [w1.grad, s1.grad], f"DDP equivalence of {module}")


def _dist_worker(rank, world, port, backends_to_test, with_open_clip):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        C.chunked.CHUNK_ELEMS = 1500
        torch.manual_seed(1234)  # the same global batch on every rank
        Bl, D, P = 6, 16, 2
        Bg = world * Bl
        img = F.normalize(torch.randn(Bg, D, dtype=torch.float64), dim=-1)
        txt = F.normalize(torch.randn(Bg, D, dtype=torch.float64), dim=-1)
        text = F.normalize(torch.randn(Bg, P, D, dtype=torch.float64), dim=-1)
        valid = torch.rand(Bg) > 0.3
        valid[0] = True
        s0, bias0 = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
        sl = slice(rank * Bl, (rank + 1) * Bl)
        for backend in backends_to_test:
            for local in (False, True):
                for gwg in (False, True):
                    module = fastvl.nn.ClipLoss(local, gwg, rank=rank, world_size=world, backend=backend)
                    got = _grads(module, (img[sl], txt[sl], s0))
                    what = f"ClipLoss({local=}, {gwg=}, {backend=})"
                    _assert_all(got, _expected_clip(img, txt, s0, rank, world, local, gwg), what)
                    if with_open_clip:
                        theirs = OPEN_CLIP.ClipLoss(local, gwg, rank=rank, world_size=world)
                        _assert_all(got, _grads(theirs, (img[sl], txt[sl], s0)), what + " vs open_clip")
            module = fastvl.nn.SigLipLoss(rank=rank, world_size=world, backend=backend)
            got = _grads(module, (img[sl], txt[sl], s0, bias0))
            _assert_all(got, _expected_siglip(img, txt, s0, bias0, rank, world), f"SigLipLoss({backend=})")
            if with_open_clip:
                for impl in ("bidir", "gather"):
                    theirs = OPEN_CLIP.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
                    _assert_all(got, _grads(theirs, (img[sl], txt[sl], s0, bias0)), f"SigLipLoss vs open_clip {impl}")
            # MIL-NCE: the global loss on every rank, world x the global feature gradients
            module = fastvl.nn.MILNCELoss(rank=rank, world_size=world, backend=backend)
            got = _grads(module, (img[sl], text[sl], s0), (valid[sl],))
            Vg, Tg, S = (x.clone().requires_grad_(True) for x in (img, text, s0))
            exp_loss = C.mil_nce_loss_reference(Vg, Tg, S, valid)
            exp_loss.backward()
            exp = [exp_loss.detach(), Vg.grad[sl] * world, Tg.grad[sl] * world, S.grad]
            _assert_all(got, exp, f"MILNCELoss({backend=})")
        x, y = torch.randn(Bg, 8, dtype=torch.float64), torch.randn(Bg, 8, dtype=torch.float64)
        for local in (False, True):
            clip = fastvl.nn.ClipLoss(local, True, rank=rank, world_size=world)
            _ddp_equivalence(clip, C.clip_loss_reference, x, y, s0, rank, world)
        sig = fastvl.nn.SigLipLoss(rank=rank, world_size=world)
        _ddp_equivalence(
            lambda a, b, s: sig(a, b, s, -2.0),
            lambda a, b, s: C.siglip_loss_reference(a, b, s, -2.0),
            x,
            y,
            s0,
            rank,
            world,
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_two_gloo_ranks():
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, _free_port(), ["chunked", "reference"], OPEN_CLIP is not None), nprocs=2, join=True)


# ---- GPU (H100-sized; skipped on the CPU) --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [256, 512])
def test_gpu_triton_large(dtype, D):
    B = 4096
    a, b = unit(B, D), unit(B, D)
    check_loss("clip", "triton", dtype, [a, b], [100.0])
    check_loss("siglip", "triton", dtype, [a, b], [10.0, -10.0])
    valid = torch.rand(B, device=DEV) > 0.2
    check_loss("mil", "triton", dtype, [a, unit(B, 3, D)], [14.3], extra=(valid,))


@pytest.mark.gpu
def test_gpu_triton_memory_is_linear():
    B, D = 32768, 256
    a = unit(B, D).to(torch.bfloat16).requires_grad_(True)
    b = unit(B, D).to(torch.bfloat16).requires_grad_(True)
    s = torch.tensor(14.3, device=DEV, requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastvl.ops.clip_loss(a, b, s, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 256 * 2**20, f"{peak / 2**20:.0f} MiB"  # one B x B bf16 matrix alone is 2 GiB
