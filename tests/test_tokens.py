import pytest
import torch
from scipy.stats import chisquare

import fastvl
from fastvl import BackendError
from fastvl.ops.tokens import MODE_DROP, MODE_MASK, draw_op, gather_reference
from fastvl.testing import assert_close, device, dtypes_to_test, interpret, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends()
DRAW_BACKENDS = ["reference"] + kernel_backends("triton")
needs_kernel = pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")


def mae_random_masking(x, mask_ratio, noise):
    """MAE's published random_masking (models_mae.py), given the noise."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


# ---- gather / scatter ----------------------------------------------------------------------


def test_gather_reference_hand_case():
    x = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 1]])
    out = fastvl.ops.gather_tokens(x, idx)
    assert out.tolist() == [[x[0, 3].tolist(), x[0, 0].tolist()], [x[1, 1].tolist(), x[1, 1].tolist()]]
    x.requires_grad_(True)
    fastvl.ops.gather_tokens(x, idx).sum().backward()
    exp = torch.zeros(2, 4, 3, dtype=torch.float64)
    exp[0, 3] = 1
    exp[0, 0] = 1
    exp[1, 1] = 2  # duplicates summed
    assert torch.equal(x.grad, exp)


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("shared,unique", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("layout", ["contiguous", "rows"])
def test_gather_kernel(backend, dtype, with_pos, shared, unique, layout):
    B, L, C, K = 3, 197, 72, 61
    x64 = randn(B, L, C, dtype=torch.float64)
    pos64 = randn(L, C, dtype=torch.float64) if with_pos else None
    if unique:
        idx = torch.stack([torch.randperm(L)[:K] for _ in range(1 if shared else B)]).to(DEV)
    else:
        idx = torch.randint(0, L, (B, K), device=DEV)  # duplicates likely
    idx = idx.to(torch.int32) if layout == "rows" else idx
    x = x64.to(dtype)
    if layout == "rows":
        x = noncontiguous(x)
    x.requires_grad_(True)
    pos = pos64.to(dtype).requires_grad_(True) if with_pos else None
    out = fastvl.ops.gather_tokens(x, idx[0] if shared else idx, pos, unique_indices=unique, backend=backend)
    # reference in float64 on the same (dtype-rounded) inputs, rounded once to dtype
    ref = gather_reference(x.detach().double(), idx, pos.detach().double() if with_pos else None)
    assert out.shape == (B, K, C) and out.dtype == dtype
    assert torch.equal(out.double(), ref.to(dtype).double())
    g64 = randn(B, K, C, dtype=torch.float64)
    out.backward(g64.to(dtype))
    xr = x.detach().double().requires_grad_(True)
    pr = pos.detach().double().requires_grad_(True) if with_pos else None
    gather_reference(xr, idx, pr).backward(g64.to(dtype).double())
    assert_close(x.grad, xr.grad, dtype, name="grad x")
    if with_pos:
        assert_close(pos.grad, pr.grad, dtype, rtol=1e-2 if dtype == torch.float16 else None, name="grad pos")


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
def test_scatter_many_duplicates(backend):
    # every index the same: all K rows summed into one
    x = randn(2, 9, 40).requires_grad_(True)
    idx = torch.full((2, 33), 4, device=DEV)
    fastvl.ops.gather_tokens(x, idx, backend=backend).backward(torch.ones(2, 33, 40, device=DEV))
    exp = torch.zeros(2, 9, 40, device=DEV)
    exp[:, 4] = 33
    assert torch.equal(x.grad, exp)


# ---- draws ---------------------------------------------------------------------------------


def _draw(backend, rows, L, K, mode, seed, noise=None):
    s = torch.tensor([seed], dtype=torch.int64, device=DEV)
    return draw_op(s, noise, rows, L, K, mode, torch.float32, DEV, backend)


@pytest.mark.parametrize("backend", DRAW_BACKENDS)
def test_draw_drop_exact_k_unique(backend):
    rows, L, K = 16, 197, 98
    keep, inv, mask = _draw(backend, rows, L, K, MODE_DROP, seed=7)
    assert keep.shape == (rows, K) and keep.dtype == torch.int64 and mask.numel() == 0
    assert bool((torch.sort(keep, dim=1).values.diff(dim=1) > 0).all())  # no duplicates
    assert int(keep.min()) >= 0 and int(keep.max()) < L
    # inv is the inverse map: inv[keep[j]] = j, every other token >= K
    assert torch.equal(torch.gather(inv, 1, keep), torch.arange(K, device=DEV).expand(rows, K))
    assert int((inv < K).sum()) == rows * K


@pytest.mark.parametrize("backend", DRAW_BACKENDS)
def test_draw_mask_is_a_permutation(backend):
    rows, L, K = 33, 196, 49
    keep, ids_restore, mask = _draw(backend, rows, L, K, MODE_MASK, seed=3)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(L, device=DEV).expand(rows, L))
    assert torch.equal(keep, ids_shuffle[:, :K])
    assert torch.equal(mask, (ids_restore >= K).float())
    assert torch.equal(mask.sum(1), torch.full((rows,), float(L - K), device=DEV))


@pytest.mark.parametrize("backend", DRAW_BACKENDS)
@pytest.mark.parametrize("mode", [MODE_DROP, MODE_MASK])
def test_draw_uniform_chi_square(backend, mode):
    # independent rows: per-position keep counts ~ uniform, and (mask mode) the first slot of the
    # shuffle is uniform; fixed seeds make the test deterministic, p > 1e-3 for a fair draw
    rows, L, K = (20000 if DEV.type == "cuda" else 800), 37, 11
    keep, inv, _ = _draw(backend, rows, L, K, mode, seed=2024)
    counts = torch.bincount(keep.reshape(-1).cpu(), minlength=L).double()
    assert counts.sum() == rows * K
    assert chisquare(counts.numpy()).pvalue > 1e-3
    if mode == MODE_MASK:
        first = torch.bincount(keep[:, 0].cpu(), minlength=L).double()
        assert chisquare(first.numpy()).pvalue > 1e-3
    # pairs: positions 0 and 1 kept together with probability K(K-1)/(L(L-1))
    kept = torch.zeros(rows, L, dtype=torch.bool)
    kept.scatter_(1, keep.cpu(), True)
    both = (kept[:, 0] & kept[:, 1]).double().mean().item()
    p = K * (K - 1) / (L * (L - 1))
    assert abs(both - p) < 5 * (p * (1 - p) / rows) ** 0.5


@pytest.mark.parametrize("backend", DRAW_BACKENDS)
def test_draw_seeded_reproducibility(backend):
    a = _draw(backend, 8, 50, 20, MODE_MASK, seed=11)
    b = _draw(backend, 8, 50, 20, MODE_MASK, seed=11)
    c = _draw(backend, 8, 50, 20, MODE_MASK, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    # rows are independent draws, not copies
    assert not torch.equal(a[1][0], a[1][1])


@pytest.mark.parametrize("backend", DRAW_BACKENDS)
def test_generator_reproducibility(backend):
    x = randn(4, 64, 8)
    g1 = torch.Generator(device=DEV.type).manual_seed(5)
    g2 = torch.Generator(device=DEV.type).manual_seed(5)
    k1, i1 = fastvl.ops.drop_tokens(x, 0.5, per_sample=True, generator=g1, backend=backend)
    k2, i2 = fastvl.ops.drop_tokens(x, 0.5, per_sample=True, generator=g2, backend=backend)
    assert torch.equal(i1, i2) and torch.equal(k1, k2)
    torch.manual_seed(9)
    v1 = fastvl.ops.random_masking(x, 0.75, backend=backend)
    torch.manual_seed(9)
    v2 = fastvl.ops.random_masking(x, 0.75, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))


# ---- drop_tokens / random_masking end to end -----------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("per_sample", [False, True])
def test_drop_tokens(backend, dtype, per_sample):
    B, L, C = 3, 157, 40
    x64 = randn(B, L, C, dtype=torch.float64)
    pos64 = randn(L, C, dtype=torch.float64)
    x = noncontiguous(x64.to(dtype)).requires_grad_(True)
    pos = pos64.to(dtype).requires_grad_(True)
    kept, ids = fastvl.ops.drop_tokens(x, 0.5, per_sample=per_sample, pos=pos, backend=backend)
    K = int(0.5 * L)
    assert kept.shape == (B, K, C) and ids.shape == (B, K)
    if not per_sample:
        assert bool((ids == ids[:1]).all())  # one subset shared by the batch (VATT)
    ref = gather_reference(x.detach().double(), ids, pos.detach().double())
    assert torch.equal(kept.double(), ref.to(dtype).double())
    g64 = randn(B, K, C, dtype=torch.float64)
    kept.backward(g64.to(dtype))
    xr = x.detach().double().requires_grad_(True)
    pr = pos.detach().double().requires_grad_(True)
    gather_reference(xr, ids, pr).backward(g64.to(dtype).double())
    assert_close(x.grad, xr.grad, dtype, name="grad x")
    assert_close(pos.grad, pr.grad, dtype, rtol=1e-2 if dtype == torch.float16 else None, name="grad pos")


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
def test_random_masking_matches_mae_given_noise(backend, dtype):
    B, T, N, C = 2, 4, 49, 24  # video: each frame masked independently via (B*T, N, C)
    x64 = randn(B * T, N, C, dtype=torch.float64)
    noise = torch.rand(B * T, N, device=DEV)
    x = x64.to(dtype).requires_grad_(True)
    vis, mask, ids_restore = fastvl.ops.random_masking(x, 0.75, noise=noise, backend=backend)
    ev, em, er = mae_random_masking(x64.to(dtype).double(), 0.75, noise)
    assert torch.equal(vis.double(), ev.to(dtype).double())
    assert torch.equal(mask.double(), em.double()) and mask.dtype == dtype
    assert torch.equal(ids_restore, er)
    assert vis.shape == (B * T, N // 4, C)  # same visible count in every frame
    g = randn(*vis.shape, dtype=torch.float64)
    vis.backward(g.to(dtype))
    xr = x64.to(dtype).double().requires_grad_(True)
    mae_random_masking(xr, 0.75, noise)[0].backward(g.to(dtype).double())
    assert torch.equal(x.grad.double(), xr.grad.to(dtype).double())  # unique rows: exact


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
def test_random_masking_with_pos_and_negative_noise(backend):
    x = randn(5, 30, 16)
    pos = randn(30, 16)
    noise = torch.randn(5, 30, device=DEV)  # negative keys too
    vis, mask, ids_restore = fastvl.ops.random_masking(x, 0.6, noise=noise, pos=pos, backend=backend)
    ev, em, er = mae_random_masking(x + pos, 0.6, noise)
    assert torch.equal(ids_restore, er) and torch.equal(mask, em)
    assert_close(vis, ev.double(), torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_random_masking_signed_zero_noise_ties(backend):
    # -0.0 and +0.0 are equal keys: ties broken by token index, as argsort(stable=True) breaks them
    B, L = 4, 23
    noise = torch.zeros(B, L, device=DEV)
    noise[torch.rand(B, L, device=DEV) < 0.5] = -0.0
    noise[:, ::5] = torch.rand(B, len(range(0, L, 5)), device=DEV) - 0.5
    assert bool(torch.signbit(noise).any()) and bool((noise == 0).any())
    x = randn(B, L, 8)
    vis, mask, ids_restore = fastvl.ops.random_masking(x, 0.6, noise=noise, backend=backend)
    ev, em, er = mae_random_masking(x, 0.6, noise)
    assert torch.equal(ids_restore, er) and torch.equal(mask, em) and torch.equal(vis, ev)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_random_masking_strided_noise(backend, layout):
    # the noise tensor's column stride is honoured: a transposed or sliced view orders tokens like its values
    B, L, C = 6, 37, 8
    x = randn(B, L, C)
    if layout == "transposed":
        noise = torch.rand(L, B, device=DEV).t()  # strides (1, B)
    else:
        noise = torch.rand(B, 3 * L, device=DEV)[:, ::3]  # strides (3L, 3)
    assert not noise.is_contiguous()
    vis, mask, ids_restore = fastvl.ops.random_masking(x, 0.75, noise=noise, backend=backend)
    ev, em, er = mae_random_masking(x, 0.75, noise.contiguous())
    assert torch.equal(ids_restore, er) and torch.equal(mask, em) and torch.equal(vis, ev)
    keep, inv, m = _draw(backend, B, L, 9, MODE_MASK, seed=0, noise=noise)
    assert torch.equal(inv, er) and torch.equal(keep, torch.argsort(er, dim=1)[:, :9])


@needs_kernel
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("unique", [False, True])
def test_gather_out_of_range_indices_without_bounds_check(backend, unique):
    # check_bounds=False and indices outside [0, L): the forward gathers zero rows, the backward drops their
    # gradient (never written out of bounds: the next sample's rows would catch a stray write), like the reference
    B, L, C = 3, 11, 24
    x = randn(B, L, C, dtype=torch.float64 if backend == "reference" else torch.float32).requires_grad_(True)
    pos = randn(L, C, dtype=x.dtype).requires_grad_(True)
    idx = torch.tensor([[L, 0, 5, -1], [2, L + 7, 3, 10], [4, 6, -5, L]], device=DEV)
    out = fastvl.ops.gather_tokens(x, idx, pos, unique_indices=unique, check_bounds=False, backend=backend)
    bad = (idx < 0) | (idx >= L)
    assert torch.equal(out[bad], torch.zeros_like(out[bad]))
    g = randn(*out.shape, dtype=x.dtype)
    out.backward(g)
    xr = x.detach().double().requires_grad_(True)
    pr = pos.detach().double().requires_grad_(True)
    ref = gather_reference(xr, idx, pr)
    assert torch.equal(out.double(), ref.to(x.dtype).double())
    ref.backward(g.double())
    assert_close(x.grad, xr.grad, x.dtype, name="grad x")
    assert_close(pos.grad, pr.grad, x.dtype, name="grad pos")
    # the scatter op itself, on every index row layout
    if backend != "reference":
        from fastvl.ops.tokens import scatter_op

        dx, dpos = scatter_op(g, idx, None, L, True, True, backend)
        assert_close(dx, xr.grad, x.dtype, name="scatter dx")
        assert_close(dpos, pr.grad, x.dtype, name="scatter dpos")


# ---- the GPU configurations, run by the interpreter ------------------------------------------

interp_only = pytest.mark.skipif(not interpret(), reason="forces GPU block shapes under the Triton interpreter")


@interp_only
@pytest.mark.parametrize("sms", [2, 132])
@pytest.mark.parametrize("dtype,C", [(torch.float32, 250), (torch.float16, 1000)])
def test_gpu_configs_gather_and_backward(dtype, C, sms):
    # the block shapes, batch groups and loops the launchers pick on an H100 (sm count 132, or 2 so each
    # program loops longer), at odd sizes, forward and backward against float64: per-sample and shared
    # indices, with and without pos, unique (inverse map) and repeating (counting sort) indices
    from fastvl.kernels.utils import gpu_configs

    B, L, K = 5, 37, 13
    with gpu_configs(sms):
        for shared, unique, with_pos in [(False, True, True), (False, False, True), (True, True, True),
                                         (True, False, False), (False, True, False)]:  # fmt: skip
            x = randn(B, L, C, dtype=torch.float64).to(dtype).requires_grad_(True)
            pos = randn(L, C, dtype=torch.float64).to(dtype).requires_grad_(True) if with_pos else None
            rows = 1 if shared else B
            if unique:
                idx = torch.stack([torch.randperm(L)[:K] for _ in range(rows)])
            else:
                idx = torch.randint(0, L, (rows, K))
            out = fastvl.ops.gather_tokens(x, idx, pos, unique_indices=unique, backend="triton")
            xr = x.detach().double().requires_grad_(True)
            pr = pos.detach().double().requires_grad_(True) if with_pos else None
            ref = gather_reference(xr, idx, pr)
            assert torch.equal(out.double(), ref.to(dtype).double()), (shared, unique, with_pos)
            g = randn(B, K, C, dtype=torch.float64).to(dtype)
            out.backward(g)
            ref.backward(g.double())
            assert_close(x.grad, xr.grad, dtype, name=f"grad x {shared, unique, with_pos}")
            if with_pos:
                assert_close(pos.grad, pr.grad, dtype, rtol=1e-2 if dtype == torch.float16 else None, name="grad pos")


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sms", [2, 132])
def test_gpu_configs_drop_and_mask(dtype, sms):
    # DropToken (shared draw) and masking (per sample, pos written through the inverse map) with GPU configs
    from fastvl.kernels.utils import gpu_configs

    B, L, C = 7, 45, 1000
    with gpu_configs(sms):
        for op in ("drop", "mask"):
            x = randn(B, L, C, dtype=torch.float64).to(dtype).requires_grad_(True)
            pos = randn(L, C, dtype=torch.float64).to(dtype).requires_grad_(True)
            if op == "drop":
                out, ids = fastvl.ops.drop_tokens(x, 0.5, pos=pos, backend="triton")
            else:
                noise = torch.rand(B, L)
                out, mask, restore = fastvl.ops.random_masking(x, 0.75, noise=noise, pos=pos, backend="triton")
                ids = torch.argsort(noise, dim=1, stable=True)[:, : out.shape[1]]
                assert torch.equal(restore, torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1))
            xr = x.detach().double().requires_grad_(True)
            pr = pos.detach().double().requires_grad_(True)
            ref = gather_reference(xr, ids, pr)
            assert torch.equal(out.double(), ref.to(dtype).double()), op
            g = randn(*out.shape, dtype=torch.float64).to(dtype)
            out.backward(g)
            ref.backward(g.double())
            assert_close(x.grad, xr.grad, dtype, name=f"{op} grad x")
            assert_close(pos.grad, pr.grad, dtype, rtol=1e-2 if dtype == torch.float16 else None, name=f"{op} grad pos")


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastvl.ops.drop_tokens(torch.randn(2, 10, 4), 0.0), ValueError, r"'keep_rate' must be in \(0, 1\]"),
        (lambda: fastvl.ops.drop_tokens(torch.randn(2, 10, 4), 1.5), ValueError, "'keep_rate' must be in"),
        (lambda: fastvl.ops.drop_tokens(torch.randn(2, 10, 4), 0.05), ValueError, "keeps int"),
        (lambda: fastvl.ops.drop_tokens(torch.randn(10, 4), 0.5), ValueError, "'x' must be 3-D"),
        (
            lambda: fastvl.ops.drop_tokens(torch.ones(2, 10, 4, dtype=torch.int64), 0.5),
            TypeError,
            "'x' must have dtype",
        ),
        (
            lambda: fastvl.ops.random_masking(torch.randn(2, 10, 4), 1.0),
            ValueError,
            r"'mask_ratio' must be in \[0, 1\)",
        ),
        (lambda: fastvl.ops.random_masking(torch.randn(2, 10, 4), -0.1), ValueError, "'mask_ratio' must be in"),
        (
            lambda: fastvl.ops.random_masking(torch.randn(2, 10, 4), 0.5, noise=torch.rand(3, 10)),
            ValueError,
            "'noise' must have shape",
        ),
        (
            lambda: fastvl.ops.gather_tokens(torch.randn(2, 10, 4), torch.zeros(3, 2, dtype=torch.int64)),
            ValueError,
            "'idx' has batch 3",
        ),
        (
            lambda: fastvl.ops.gather_tokens(torch.randn(2, 10, 4), torch.zeros(2, 2)),
            TypeError,
            "'idx' must have dtype",
        ),
        (
            lambda: fastvl.ops.gather_tokens(torch.randn(2, 10, 4), torch.tensor([[0, 10]])),
            ValueError,
            r"'idx' must lie in \[0, L=10\)",
        ),
        (
            lambda: fastvl.ops.gather_tokens(
                torch.randn(2, 10, 4), torch.zeros(2, 2, dtype=torch.int64), pos=torch.randn(9, 4)
            ),
            ValueError,
            "'pos' must have shape",
        ),
        (
            lambda: fastvl.ops.gather_tokens(
                torch.randn(2, 10, 4), torch.zeros(2, 2, dtype=torch.int64), pos=torch.randn(10, 4).double()
            ),
            TypeError,
            "'pos' must have x's dtype",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_draw_backend_limits_reported():
    x = torch.randn(2, 20, 4)
    with pytest.raises(BackendError, match="cannot serve"):
        fastvl.ops.random_masking(x, 0.5, noise=torch.rand(2, 20), backend="cuda")  # gather: x on cpu
    report = fastvl.explain(fastvl.ops.random_masking, x, 0.5)
    assert "draw_tokens" in report and "gather_tokens" in report


# ---- modules -------------------------------------------------------------------------------


def test_modules_train_and_eval():
    x = randn(4, 20, 8, device="cpu")
    pos = randn(20, 8, device="cpu")
    drop = fastvl.nn.DropToken(keep_rate=0.5, return_indices=True)
    kept, ids = drop(x, pos)
    assert kept.shape == (4, 10, 8)
    assert torch.equal(kept, gather_reference(x, ids, pos))
    drop.eval()
    kept, ids = drop(x, pos)
    assert torch.equal(kept, x + pos) and ids.shape == (4, 20)
    assert drop.drop_rate == 0.5
    ms = fastvl.nn.MaskSampler(mask_ratio=0.75)
    vis, mask, restore = ms(x)
    assert vis.shape == (4, 5, 8) and mask.sum().item() == 4 * 15
    ms.eval()
    vis, mask, restore = ms(x)
    assert torch.equal(vis, x) and mask.sum().item() == 0
    with pytest.raises(ValueError, match="keep_rate"):
        fastvl.nn.DropToken(keep_rate=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        fastvl.nn.MaskSampler(mask_ratio=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_masking_large(dtype):
    B, L, C = 64, 1568, 1024
    x = torch.randn(B, L, C, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randn(L, C, device="cuda", dtype=dtype)
    noise = torch.rand(B, L, device="cuda")
    for backend in kernel_backends("triton", "cuda"):
        vis, mask, restore = fastvl.ops.random_masking(x, 0.75, noise=noise, pos=pos, backend=backend)
        ev, em, er = mae_random_masking(x.detach() + pos, 0.75, noise)
        assert torch.equal(restore, er) and torch.equal(mask.float(), em)
        assert torch.equal(vis, ev)
        kept, ids = fastvl.ops.drop_tokens(x, 0.5, pos=pos, backend=backend)
        assert torch.equal(kept, gather_reference(x.detach(), ids, pos))


@pytest.mark.gpu
@pytest.mark.parametrize("unique", [True, False])
def test_gpu_backward_bf16(unique):
    # bf16 at a VATT-M-like shape: the fused dx + dpos backward (inverse map, or counting sort for repeats)
    B, L, C, K = 16, 1568, 1024, 784
    x = torch.randn(B, L, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(L, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if unique:
        idx = torch.argsort(torch.rand(B, L, device="cuda"), dim=1)[:, :K]
    else:
        idx = torch.randint(0, L, (B, K), device="cuda")
    for backend in kernel_backends("triton", "cuda"):
        x.grad = pos.grad = None
        out = fastvl.ops.gather_tokens(x, idx, pos, unique_indices=unique, backend=backend)
        g = torch.randn_like(out)
        out.backward(g)
        xr = x.detach().double().requires_grad_(True)
        pr = pos.detach().double().requires_grad_(True)
        gather_reference(xr, idx, pr).backward(g.double())
        assert_close(x.grad, xr.grad, torch.bfloat16, name=f"{backend} grad x")
        assert_close(pos.grad, pr.grad, torch.bfloat16, rtol=5e-2, name=f"{backend} grad pos")
