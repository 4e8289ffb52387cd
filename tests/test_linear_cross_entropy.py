import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fastvl
from fastvl import BackendError
from fastvl.testing import assert_close, device, dtypes_to_test, kernel_backends, noncontiguous

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference", "chunked"] + KERNELS
L = importlib.import_module("fastvl.ops.linear_cross_entropy")  # the package (fastvl.ops.linear_cross_entropy
# is the function)
needs_triton = pytest.mark.skipif(not KERNELS, reason="no Triton here (needs a GPU or TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of ~1500 logits, so the chunked backend walks several chunks even at N=37."""
    monkeypatch.setattr(L.chunked, "CHUNK_ELEMS", 1500)


def draw(N, V, D, *, bias=True, ignored=0.2, scale=1.0, ignore_index=-100):
    """float64 hidden (N, D), weight (V, D), bias (V,) or None and targets (N,) with a share ``ignored`` of rows
    marked ``ignore_index`` (row 0 always has a target)."""
    h = torch.randn(N, D, dtype=torch.float64) * scale
    w = torch.randn(V, D, dtype=torch.float64) / math.sqrt(D) * 2
    b = torch.randn(V, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) < ignored] = ignore_index
    t[0] = 1 % V
    return [x.to(DEV) if x is not None else None for x in (h, w, b)], t.to(DEV)


def _leaves(xs, dtype, layout="contiguous"):
    out = []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        y = x.detach().to(dtype).clone()
        if layout != "contiguous" and y.dim() == 2:
            y = noncontiguous(y, layout)
        out.append(y.requires_grad_(True))
    return out


def _run(fn, leaves, g):
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [x.grad if x is not None else None for x in leaves]


def check(backend, dtype, xs64, t, layout="contiguous", **kw):
    """linear_cross_entropy with ``backend`` in ``dtype`` against the float64 spec on the same rounded inputs
    (value and the gradients of hidden, weight and bias; a random upstream gradient), or within 2x of PyTorch's
    own error in ``dtype`` (flash-attn's rule)."""
    leaves = _leaves(xs64, dtype, layout)
    shape = t.shape if kw.get("reduction") == "none" else ()
    g = torch.rand(shape, dtype=torch.float64, device=DEV) + 0.5

    def ours(h, w, b):
        return fastvl.ops.linear_cross_entropy(h, w, b, t, backend=backend, **kw)

    def spec(h, w, b):
        return L.linear_cross_entropy_reference(h, w, b, t, **kw)

    out, grads = _run(ours, leaves, g)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == shape
    ref, ref_grads = _run(
        spec, [x.detach().double().requires_grad_(True) if x is not None else None for x in leaves], g
    )
    same = None
    if dtype != torch.float64:  # PyTorch in the same dtype: logits and loss in dtype (F.cross_entropy as shipped)
        low = [x.detach().clone().requires_grad_(True) if x is not None else None for x in leaves]

        def eager(h, w, b):
            return F.cross_entropy(F.linear(h, w, b), t, **kw)

        same = _run(eager, low, g)
    assert_close(out, ref, dtype, torch_same_dtype=None if same is None else same[0].double(), name="loss")
    for i, name in enumerate(("hidden", "weight", "bias")):
        if leaves[i] is None:
            continue
        assert grads[i] is not None and grads[i].dtype == dtype and grads[i].shape == leaves[i].shape, name
        assert_close(grads[i], ref_grads[i], dtype, torch_same_dtype=None if same is None else same[1][i], name=name)


# ---- the spec ----------------------------------------------------------------------------------


def test_spec_hand_case():
    """Logits x = h W^T + b written out: rows [0, ln 3] and [ln 2, 0] (+ a bias of 1 that cancels), targets 1 and
    ignored; CE = log(1 + 3) - ln 3; with smoothing 0.1: 0.9 * CE + 0.1 * mean_j(lse - x_j)."""
    h = torch.tensor([[0.0, math.log(3)], [math.log(2), 0.0]], dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64)
    b = torch.ones(2, dtype=torch.float64)
    t = torch.tensor([1, -100])
    lse = math.log(4)
    ce = lse - math.log(3)
    smooth = 0.9 * ce + 0.1 * ((lse - 0) + (lse - math.log(3))) / 2
    for backend in ["reference", "chunked"]:
        f = fastvl.ops.linear_cross_entropy
        assert math.isclose(f(h, w, b, t, backend=backend).item(), ce, rel_tol=1e-12)
        assert math.isclose(f(h, w, b, t, label_smoothing=0.1, backend=backend).item(), smooth, rel_tol=1e-12)
        assert f(h, w, b, t, reduction="none", backend=backend).tolist() == pytest.approx([ce, 0.0], rel=1e-12)
    assert math.isclose(L.linear_cross_entropy_reference(h, w, b, t).item(), ce, rel_tol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64] + dtypes_to_test())
@pytest.mark.parametrize(
    "N,V,D,bias,reduction,smoothing",
    [(37, 101, 24, True, "mean", 0.0), (64, 97, 40, False, "sum", 0.1), (13, 300, 7, True, "none", 0.25)],
)
def test_torch_backends(backend, dtype, N, V, D, bias, reduction, smoothing):
    xs, t = draw(N, V, D, bias=bias)
    check(backend, dtype, xs, t, reduction=reduction, label_smoothing=smoothing)


# ---- the Triton kernels in float64 comparison, at odd sizes --------------------------------------

# N, V, D not multiples of the blocks; (133, 97): 2 row blocks of 128 and 2 vocabulary tiles of 64 in the
# weight pass (row splits); (133, 301): 3 row blocks of 64 and 3 vocabulary tiles of 128 in the forward
# (vocabulary splits). With the GPU tiles (16-bit / fp32 without TF32).
KERNEL_CASES = [
    # N, V, D, bias, reduction, smoothing, ignore_index
    (133, 97, 40, True, "mean", 0.0, -100),
    (133, 301, 72, False, "sum", 0.1, -100),
    (1, 130, 17, True, "mean", 0.3, -100),
    (70, 129, 64, True, "none", 0.0, 5),
]


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The tiles a CUDA launch uses (16-bit / TF32, or fp32 without TF32), run through the interpreter."""
    from fastvl.kernels import linear_cross_entropy as K

    monkeypatch.setattr(K, "forward_blocks", lambda dtype: K.gpu_blocks(dtype)[0])
    monkeypatch.setattr(K, "backward_blocks", lambda dtype: K.gpu_blocks(dtype)[1])


@needs_triton
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("N,V,D,bias,reduction,smoothing,ignore_index", KERNEL_CASES)
def test_triton_matches_float64(dtype, N, V, D, bias, reduction, smoothing, ignore_index, gpu_tiles):
    xs, t = draw(N, V, D, bias=bias, ignore_index=ignore_index)
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=ignore_index)
    check("triton", dtype, xs, t, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", dtypes_to_test())
def test_triton_small_blocks_many_splits(dtype, monkeypatch):
    """16 x 16 x 16 tiles and 16 target programs: 3 row blocks x 4 vocabulary splits of 2 tiles in the forward,
    7 vocabulary tiles x 3 row splits in the weight pass (the split merges on the host)."""
    from fastvl.kernels import linear_cross_entropy as K

    small = K.Blocks(block_m=16, block_v=16, block_d=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(K, "forward_blocks", lambda dtype: small)
    monkeypatch.setattr(K, "backward_blocks", lambda dtype: small)
    monkeypatch.setattr(K, "TARGET_PROGRAMS_INTERPRETED", 16)
    assert K.splits(3, 7, 16) == (4, 2) and K.splits(7, 3, 16) == (3, 1)
    xs, t = draw(37, 101, 24)
    check("triton", dtype, xs, t, label_smoothing=0.05)


@pytest.mark.parametrize("backend", ["chunked"] + KERNELS)
@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_noncontiguous_inputs(backend, layout, gpu_tiles):
    xs, t = draw(70, 130, 40)
    check(backend, torch.float32, xs, t, layout=layout, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_rows(backend, gpu_tiles):
    """Logits in the hundreds and rows whose target takes nearly all the mass: the online LSE must not overflow,
    and the gradient p_t - 1 ~ -e^-50 must come from fp32, not from a rounded probability."""
    xs, t = draw(40, 150, 32, scale=30.0, ignored=0.0)
    h, w, b = xs
    w[t[:10]] = h[:10] / h[:10].norm(dim=1, keepdim=True) * 3  # rows 0..9: x_t ~ 90 above the rest
    check(backend, torch.float32, [h, w, b], t, label_smoothing=0.0)
    check(backend, torch.float32, [h, w, b], t, label_smoothing=0.2, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_targets(backend):
    """No target at all: mean is NaN (F.cross_entropy's 0/0), sum 0, gradients 0 (not NaN); no rows at all too."""
    xs, _ = draw(20, 50, 16)
    h, w, b = _leaves(xs, torch.float32)
    t = torch.full((20,), -100, device=DEV)
    assert torch.isnan(fastvl.ops.linear_cross_entropy(h, w, b, t, backend=backend))
    assert torch.isnan(F.cross_entropy(F.linear(h, w, b), t))
    loss = fastvl.ops.linear_cross_entropy(h, w, b, t, label_smoothing=0.1, reduction="sum", backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for g in (h.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))
    h0 = h.detach()[:0].clone().requires_grad_(True)
    w.grad = b.grad = None
    loss = fastvl.ops.linear_cross_entropy(h0, w, b, t[:0], reduction="sum", backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and h0.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad_and_no_grad(backend):
    """Only weight (frozen hidden), only hidden, and no grad at all: the right gradients, and without grad no
    forward-time gradient is computed (need_dh=False)."""
    xs, t = draw(30, 70, 16)
    h64, w64, b64 = xs
    h, w, b = h64.float(), w64.float().requires_grad_(True), b64.float()
    fastvl.ops.linear_cross_entropy(h, w, b, t, backend=backend).backward()
    wr = w64.clone().requires_grad_(True)
    L.linear_cross_entropy_reference(h64, wr, b64, t).backward()
    assert_close(w.grad, wr.grad, torch.float32, name="weight grad")
    hh = h64.float().requires_grad_(True)
    fastvl.ops.linear_cross_entropy(hh, w.detach(), None, t, backend=backend).backward()
    hr = h64.clone().requires_grad_(True)
    L.linear_cross_entropy_reference(hr, w64, None, t).backward()
    assert_close(hh.grad, hr.grad, torch.float32, name="hidden grad")
    with torch.no_grad():
        _, _, dh = torch.ops.fastvl.linear_cross_entropy(hh, w, None, t, -100, 0.0, False, backend)
        v = fastvl.ops.linear_cross_entropy(hh, w, None, t, backend=backend)
    assert dh.numel() == 0 and not v.requires_grad
    assert math.isclose(v.item(), L.linear_cross_entropy_reference(h64, w64, None, t).item(), rel_tol=1e-5)


def test_autocast_casts_like_f_linear():
    """Under autocast the inputs take the autocast dtype (F.linear's behaviour), the loss stays fp32."""
    xs, t = draw(20, 40, 16)
    h, w, b = (x.float() for x in xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastvl.ops.linear_cross_entropy(h, w, b, t)
        report = fastvl.explain(fastvl.ops.linear_cross_entropy, h, w, b, t, backend="triton")
    ref = L.linear_cross_entropy_reference(h.bfloat16(), w.bfloat16(), b.bfloat16(), t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if KERNELS and not torch.cuda.is_available():
        assert "bfloat16 on the CPU" in report


# ---- memory structure, FLOPs, dispatch, custom-op plumbing ---------------------------------------


class _Largest(TorchDispatchMode):
    """Largest floating-point tensor (elements) any ATen op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                self.largest = max(self.largest, x.numel())
        return out


def _largest(fn) -> int:
    with _Largest() as m:
        fn()
    return m.largest


@pytest.mark.parametrize("backend", ["chunked"] + KERNELS)
def test_never_materialises_the_logits(backend, monkeypatch, gpu_tiles):
    """The chunked backend's largest tensor is one chunk of logits, Triton's the (V, D) weight gradient; the
    reference does hold (N, V)."""
    monkeypatch.setattr(L.chunked, "CHUNK_ELEMS", 1 << 12)
    N, V, D = 600, 700, 8  # N * V = 420000 logits, far above (N + V) * D and one chunk
    xs, t = draw(N, V, D)
    h, w, b = (x.float() for x in xs)

    def both(name):  # the backend's forward and backward primitives (a dispatch mode sees no further than
        # the custom op that wraps them)
        fwd, bwd = (fastvl.backends.implementation("linear_cross_entropy", name, r) for r in ("forward", "backward"))
        _, lse, dh = fwd(h, w, b, t, -100, 0.1, True)
        bwd(h, w, b, t, lse, dh, torch.rand(N, device=DEV), -100, 0.1, True, True, True)

    largest = _largest(lambda: both(backend))
    assert largest <= max(1 << 12, V * D) and N * V > 50 * largest, largest
    assert _largest(lambda: both("reference")) >= N * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_flop_counts_match_the_reference(backend):
    xs, t = draw(24, 50, 16)
    h, w, b = _leaves(xs, torch.float32)

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn().backward()
        return fc.get_total_flops()

    def eager():
        return F.cross_entropy(F.linear(h, w, b), t)

    ours = flops(lambda: fastvl.ops.linear_cross_entropy(h, w, b, t, backend=backend))
    assert ours == flops(eager) == 6 * 24 * 50 * 16
    only_w = flops(lambda: fastvl.ops.linear_cross_entropy(h.detach(), w, b, t, backend=backend))
    assert only_w == 4 * 24 * 50 * 16


def test_auto_dispatch_and_reasons():
    xs, t = draw(64, 1000, 8)
    h, w, b = (x.float() for x in xs)
    report = fastvl.explain(fastvl.ops.linear_cross_entropy, h, w, b, t)
    assert "[chosen] reference" in report and "chunking threshold" in report
    big_t = torch.zeros(4200, dtype=torch.long, device=DEV)
    big = torch.zeros(4200, 8, device=DEV)  # 4200 x 1000 logits >= 2^22
    if DEV.type == "cpu":
        assert "[chosen] chunked" in fastvl.explain(fastvl.ops.linear_cross_entropy, big, w, b, big_t)
    with pytest.raises(BackendError, match="dtype torch.float64"):
        fastvl.ops.linear_cross_entropy(*xs, t, backend="triton")
    with pytest.raises(BackendError, match="unknown backend"):
        fastvl.ops.linear_cross_entropy(h, w, b, t, backend="cuda")
    chosen, why = fastvl.backends.example_choice("linear_cross_entropy", torch.device("cpu"))
    assert chosen == "chunked" and "triton" in why


def test_custom_ops_opcheck_and_fake():
    xs, t = draw(9, 13, 5)
    h, w, b = (x.float().requires_grad_(True) for x in xs)
    for backend in ("reference", "chunked"):
        args = (h, w, b, t, -100, 0.1, True, backend)
        torch.library.opcheck(torch.ops.fastvl.linear_cross_entropy.default, args)
        t3 = torch.where(t == -100, torch.full_like(t, 3), t)
        torch.library.opcheck(torch.ops.fastvl.linear_cross_entropy.default, (h, w, None, t3, 3, 0.0, True, backend))
        lse = torch.stack([torch.randn(9), torch.rand(9) + 1])
        dh = torch.randn(9, 5)
        grad = torch.randn(9)
        bwd = (h.detach(), w.detach(), b.detach(), t, lse, dh, grad, -100, 0.1, True, True, True, backend)
        torch.library.opcheck(torch.ops.fastvl.linear_cross_entropy_backward.default, bwd)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """Under torch.compile (fullgraph, dynamic shapes: N symbolic in the auto choice, as after a masked-position
    gather) the loss and gradients are eager's."""
    xs, t = draw(33, 90, 16)
    h, w, b = (x.float() for x in xs)
    w.requires_grad_(True)

    def f(h, w, b, t):
        return fastvl.ops.linear_cross_entropy(h, w, b, t, label_smoothing=0.1)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="inductor")
    for n in (33, 20):
        eager = f(h[:n], w, b, t[:n])
        (g_eager,) = torch.autograd.grad(eager, w)
        comp = compiled(h[:n], w, b, t[:n])
        (g_comp,) = torch.autograd.grad(comp, w)
        torch.testing.assert_close(comp, eager)
        torch.testing.assert_close(g_comp, g_eager)


# ---- bad input ---------------------------------------------------------------------------------


def _h(*s, dtype=torch.float32):
    return torch.randn(*s, dtype=dtype)


def _t(*values):
    return torch.tensor(values)


LCE = fastvl.ops.linear_cross_entropy


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: LCE(_h(3, 4, 8), _h(10, 8), None, _t(1, 2, 3)), ValueError, r"'hidden' must be 2-D \(N, D\)"),
        (lambda: LCE(_h(3, 8), _h(10, 7), None, _t(1, 2, 3)), ValueError, r"'weight' must have shape \(V, D\)"),
        (lambda: LCE(_h(3, 8), _h(0, 8), None, _t(1, 2, 3)), ValueError, "'weight' must have shape"),
        (lambda: LCE(_h(3, 0), _h(10, 0), None, _t(1, 2, 3)), ValueError, "'hidden' has no features"),
        (lambda: LCE(_h(3, 8), _h(10, 8), _h(9), _t(1, 2, 3)), ValueError, r"'bias' must have shape \(V,\)=\(10,\)"),
        (lambda: LCE(_h(3, 8), _h(10, 8), None, _t(1, 2)), ValueError, r"'targets' must have shape \(N,\)=\(3,\)"),
        (lambda: LCE(_h(3, 8), _h(10, 8), None, _h(3)), TypeError, "'targets' must have dtype in"),
        (
            lambda: LCE(_h(3, 8), _h(10, 8, dtype=torch.float64), None, _t(1, 2, 3)),
            TypeError,
            "'weight' must have hidden's dtype torch.float32",
        ),
        (
            lambda: LCE(_h(3, 8), _h(10, 8), _h(10, dtype=torch.float16), _t(1, 2, 3)),
            TypeError,
            "'bias' must have hidden's dtype",
        ),
        (lambda: LCE(torch.ones(3, 8, dtype=torch.long), _h(10, 8), None, _t(1, 2, 3)), TypeError, "'hidden' must"),
        (
            lambda: LCE(_h(3, 8), _h(10, 8), None, _t(1, 10, -100)),
            ValueError,
            r"'targets' must hold class indices in \[0, V=10\) or ignore_index=-100, got 1 other value\(s\) in "
            r"\[10, 10\]",
        ),
        (
            lambda: LCE(_h(3, 8), _h(10, 8), None, _t(1, -1, -100), ignore_index=-1),
            ValueError,
            r"ignore_index=-1, got 1 other value\(s\) in \[-100, -100\]",
        ),
        (lambda: LCE(_h(3, 8), _h(10, 8), None, _t(1, 2, 3), ignore_index=1.5), TypeError, "'ignore_index' must be"),
        (
            lambda: LCE(_h(3, 8), _h(10, 8), None, _t(1, 2, 3), label_smoothing=1.5),
            ValueError,
            r"'label_smoothing' must be in \[0, 1\]",
        ),
        (lambda: LCE(_h(3, 8), _h(10, 8), None, _t(1, 2, 3), reduction="avg"), ValueError, "'reduction' must be one"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- GPU (H100-sized; skipped on the CPU) --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_bert_sized(dtype):
    xs, t = draw(4096, 30522, 768, ignored=0.15)
    check("triton", dtype, xs, t, label_smoothing=0.1)


@pytest.mark.gpu
def test_gpu_triton_deterministic_and_lean():
    """Two runs give bitwise-equal gradients (no atomics); peak memory stays below one (N, V) bf16 logits tensor
    (238 MiB at 4096 x 30522; eager holds three such tensors): what it holds is the fp32 dW slab (V x D), dW
    itself and O(N x D) rows."""
    xs, t = draw(4096, 30522, 768, ignored=0.15)
    h, w, b = _leaves(xs, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastvl.ops.linear_cross_entropy(h, w, b, t, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    first = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    fastvl.ops.linear_cross_entropy(h, w, b, t, backend="triton").backward()
    assert all(torch.equal(a, x.grad) for a, x in zip(first, (h, w, b)))
    assert peak < 4096 * 30522 * 2, f"{peak / 2**20:.0f} MiB"
