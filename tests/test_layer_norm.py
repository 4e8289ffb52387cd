import pytest
import torch
import torch.nn.functional as F

import fastvl
from fastvl import BackendError
from fastvl.testing import assert_close, device, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference"] + KERNELS


def test_reference_matches_torch():
    x, r = randn(4, 9, 48, dtype=torch.float64, device="cpu"), randn(4, 9, 48, dtype=torch.float64, device="cpu")
    w, b = randn(48, dtype=torch.float64, device="cpu"), randn(48, dtype=torch.float64, device="cpu")
    y = fastvl.ops.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (48,), w, b, 1e-5), rtol=1e-12, atol=1e-12)
    y, h = fastvl.ops.layer_norm(x, w, b, 1e-5, r)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (48,), w, b, 1e-5), rtol=1e-12, atol=1e-12)
    # hand case: a row [1, 3] has mean 2, variance 1 -> [-1, 1] (eps 0)
    assert fastvl.ops.layer_norm(torch.tensor([[1.0, 3.0]]), None, None, 0.0).tolist() == [[-1.0, 1.0]]


# pairwise over width (odd, ViT, wide), residual, affine, dtype, layout
GRID = [
    # M rows, C, residual, affine, dtype, layout
    (37, 1, False, True, torch.float32, "contiguous"),
    (37, 37, True, True, torch.float16, "rows"),
    (23, 768, True, False, torch.float32, "channels"),
    (50, 768, False, True, torch.float16, "channels"),
    (9, 4096, True, True, torch.float32, "contiguous"),
    (9, 4096, False, False, torch.float16, "rows"),
    (600, 64, True, True, torch.float32, "rows"),  # many rows per program: the dW/dB loop and the 2nd stage
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,C,with_res,affine,dtype,layout", GRID)
def test_kernel_matches_float64(backend, M, C, with_res, affine, dtype, layout):
    def draw(*shape):
        t = randn(*shape, dtype=torch.float64).to(dtype)
        return noncontiguous(t, layout) if layout != "contiguous" and t.dim() > 1 else t

    x = draw(3, M, C).requires_grad_(True)
    r = draw(3, M, C).requires_grad_(True) if with_res else None
    w = (1 + 0.5 * randn(C, dtype=torch.float64)).to(dtype).requires_grad_(True) if affine else None
    b = randn(C, dtype=torch.float64).to(dtype).requires_grad_(True) if affine else None
    leaves = [t for t in (x, r, w, b) if t is not None]
    out = fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend=backend)
    outs = out if with_res else (out,)
    gs = [randn(*o.shape, dtype=torch.float64).to(dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, gs)

    def torch_path(ls, gs_):
        it = iter(ls)
        xx = next(it)
        rr = next(it) if with_res else None
        ww, bb = (next(it), next(it)) if affine else (None, None)
        hh = xx + rr if with_res else xx
        yy = F.layer_norm(hh, (C,), ww, bb, 1e-6)
        res = (yy, hh) if with_res else (yy,)
        return res, torch.autograd.grad(res, ls, gs_)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    (ref, ref_grads) = torch_path(ref_leaves, [g.double() for g in gs])
    same_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    (same, same_grads) = torch_path(same_leaves, gs)
    for o, rf, sm in zip(outs, ref, same):
        assert o.dtype == dtype and o.shape == x.shape
        assert_close(o, rf, dtype, torch_same_dtype=sm, name="y/h")
    for name, a, rf, sm in zip(["x", "residual", "weight", "bias"][: len(leaves)], grads, ref_grads, same_grads):
        assert_close(a, rf, dtype, torch_same_dtype=sm, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_sum_only_and_weight_grads_bitwise(backend):
    # only h used: its gradient passes straight through to x and residual
    x, r = randn(5, 40).requires_grad_(True), randn(5, 40).requires_grad_(True)
    w, b = randn(40).requires_grad_(True), randn(40).requires_grad_(True)
    y, h = fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend=backend)
    g = randn(5, 40)
    gx, gr = torch.autograd.grad(h, (x, r), g)
    assert torch.equal(gx, g) and torch.equal(gr, g)
    # the two-stage dW/dB reduction has a fixed order: repeated backward passes agree bitwise
    xs = randn(700, 96).requires_grad_(True)
    gy = randn(700, 96)
    ww = randn(96).requires_grad_(True)
    runs = [torch.autograd.grad(fastvl.ops.layer_norm(xs, ww, None, backend=backend), (xs, ww), gy) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_backend_reasons_and_bad_input():
    x = torch.randn(3, 20000)
    if KERNELS:
        with pytest.raises(BackendError, match="row width C=20000 > 16384"):
            fastvl.ops.layer_norm(x, None, None, backend="triton")
    assert fastvl.ops.layer_norm(x, None, None).shape == x.shape  # auto: the reference takes it
    report = fastvl.explain(fastvl.ops.layer_norm, torch.randn(4, 8), None, None)
    assert "[chosen] reference" in report and "triton" in report
    with pytest.raises(ValueError, match=r"'weight' must have shape \(C,\)=\(8,\), got \(7,\)"):
        fastvl.ops.layer_norm(torch.randn(4, 8), torch.ones(7), None)
    with pytest.raises(ValueError, match="'residual' must have x's shape"):
        fastvl.ops.layer_norm(torch.randn(4, 8), None, None, 1e-6, torch.randn(4, 9))
    # mixed dtypes promote like eager x + residual (a bf16 branch on an fp32 residual stream under autocast)
    xb, rf = torch.randn(4, 8).bfloat16().requires_grad_(True), torch.randn(4, 8, requires_grad=True)
    y, h = fastvl.ops.layer_norm(xb, None, None, 1e-6, rf)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, xb.float() + rf)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(xb.float() + rf, (8,), eps=1e-6))
    (y.sum() + h.sum()).backward()
    assert xb.grad.dtype == torch.bfloat16 and rf.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="'eps' must be in"):
        fastvl.ops.layer_norm(torch.randn(4, 8), None, None, -1.0)
    with pytest.raises(TypeError, match="'x' must have dtype"):
        fastvl.ops.layer_norm(torch.ones(4, 8, dtype=torch.int64), None, None)
    with pytest.raises(ValueError, match="empty last dim"):
        fastvl.ops.layer_norm(torch.randn(4, 0), None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_is_a_torch_layer_norm(backend):
    ref = torch.nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    m = fastvl.nn.LayerNorm(32, backend=backend)
    assert isinstance(m, torch.nn.LayerNorm)
    assert m.state_dict().keys() == ref.state_dict().keys()
    m.load_state_dict(ref.state_dict())
    x, r = randn(2, 7, 32, device="cpu").to(DEV), randn(2, 7, 32, device="cpu").to(DEV)
    m, ref = m.to(DEV), ref.to(DEV)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    y, h = m(x, r)
    torch.testing.assert_close(y, ref(x + r), rtol=1e-5, atol=1e-5)
    # several trailing dims, no affine, no bias: like torch
    m2 = fastvl.nn.LayerNorm((7, 32), elementwise_affine=True, bias=False, backend=backend).to(DEV)
    ref2 = torch.nn.LayerNorm((7, 32), eps=1e-6, bias=False).to(DEV)
    assert m2.state_dict().keys() == ref2.state_dict().keys()
    torch.testing.assert_close(m2(x), ref2(x), rtol=1e-5, atol=1e-5)
    m3 = fastvl.nn.LayerNorm(32, elementwise_affine=False, backend=backend).to(DEV)
    torch.testing.assert_close(m3(x), F.layer_norm(x, (32,), eps=1e-6), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not end with normalized_shape"):
        m(randn(2, 7, 31))


@pytest.mark.skipif(not KERNELS or DEV.type == "cuda", reason="forces GPU block shapes under the Triton interpreter")
@pytest.mark.parametrize(
    "M,C,sms,dtype",
    [
        (45, 1000, 2, torch.float32),  # 4 rows x 1024 per step, 2 programs per SM looping over many steps
        (45, 1000, 132, torch.float16),  # one step per program
        (9, 5000, 2, torch.float16),  # one 8192-wide row per step, 16 warps
        (7, 9000, 2, torch.float32),  # wider than one pass: row sums, then 2048-column chunks (ragged last)
    ],
)
def test_gpu_configs_in_interpreter(M, C, sms, dtype):
    # the block shapes, persistent grid and two-stage dW/dB the launchers pick on an H100, at odd sizes,
    # forward and backward (residual, affine) against float64
    from fastvl.kernels.utils import gpu_configs

    x, r = (randn(M, C, dtype=torch.float64).to(dtype).requires_grad_(True) for _ in range(2))
    w = (1 + 0.5 * randn(C, dtype=torch.float64)).float().requires_grad_(True)
    b = randn(C, dtype=torch.float64).float().requires_grad_(True)
    with gpu_configs(sms):
        y, h = fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend="triton")
        gy, gh = randn(M, C, dtype=torch.float64).to(dtype), randn(M, C, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad((y, h), (x, r, w, b), (gy, gh))
    leaves = [t.detach().double().requires_grad_(True) for t in (x, r, w, b)]
    hh = leaves[0] + leaves[1]
    yy = F.layer_norm(hh, (C,), leaves[2], leaves[3], 1e-6)
    ref_grads = torch.autograd.grad((yy, hh), leaves, (gy.double(), gh.double()))
    same = [t.detach().to(dtype).requires_grad_(True) for t in (x, r, w, b)]  # PyTorch, all in x's dtype
    hs = same[0] + same[1]
    ys = F.layer_norm(hs, (C,), same[2], same[3], 1e-6)
    same_grads = torch.autograd.grad((ys, hs), same, (gy, gh))
    assert_close(y, yy, dtype, torch_same_dtype=ys, name="y")
    assert_close(h, hh, dtype, torch_same_dtype=hs, name="h")
    for name, a, rf, sm in zip(("x", "residual", "weight", "bias"), grads, ref_grads, same_grads):
        assert_close(a, rf, dtype, torch_same_dtype=sm, name=f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("C", [384, 768, 1024, 4096, 16384])
def test_gpu_layer_norm(dtype, C):
    M = 96 * 237 if C <= 1024 else 2048
    x = torch.randn(M, C, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(M, C, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
    y, h = fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend="triton")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), (x, r, w, b), (gy, gh))
    leaves = [t.detach().double().requires_grad_(True) for t in (x, r, w, b)]
    hh = leaves[0] + leaves[1]
    yy = F.layer_norm(hh, (C,), leaves[2], leaves[3], 1e-6)
    ref_grads = torch.autograd.grad((yy, hh), leaves, (gy.double(), gh.double()))
    same = [t.detach().clone().requires_grad_(True) for t in (x, r, w, b)]
    hs = same[0] + same[1]
    ys = F.layer_norm(hs, (C,), same[2], same[3], 1e-6)
    same_grads = torch.autograd.grad((ys, hs), same, (gy, gh))
    assert_close(y, yy, dtype, torch_same_dtype=ys)
    for a, rf, s in zip(grads, ref_grads, same_grads):
        assert_close(a, rf, a.dtype, torch_same_dtype=s, rtol=5e-2 if a.dim() == 1 else None, name="grad")
