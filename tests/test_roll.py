import pytest
import torch

import fastvl
from fastvl import BackendError
from fastvl.ops.roll import roll_reference
from fastvl.testing import device, dtypes_to_test, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends()


def allinone_roll(x, n_segment, fold_div=8):
    """All-in-one's published slice-and-roll layer (video tokens only, fold = l // fold_div)."""
    nt, l, c = x.shape
    x = x.view(nt // n_segment, n_segment, l, c)
    fold = l // fold_div
    out = torch.zeros_like(x)
    out[:, :, 0] = x[:, :, 0]
    out[:, :, 1 : fold + 1] = torch.roll(x[:, :, 1 : fold + 1], 1, 1)
    out[:, :, -fold:] = torch.roll(x[:, :, -fold:], -1, 1)
    out[:, :, 1 + fold : -fold] = x[:, :, 1 + fold : -fold]
    return out.view(nt, l, c)


def test_reference_hand_case():
    # x[b, t, s] = 100 t + s: B=1, T=3, text 2, L=9 (f=1 at fraction 1/8)
    T, text, L = 3, 2, 9
    x = torch.tensor([[[100.0 * t + s] for s in range(text + L)] for t in range(T)], dtype=torch.float64)
    out = fastvl.ops.temporal_token_roll(x, T, text_len=text)
    for t in range(T):
        got = out[t, :, 0].tolist()
        exp = [100.0 * t + s for s in range(text + L)]
        exp[text + 1] = 100.0 * ((t - 1) % T) + text + 1  # slot 1 from frame t-1
        exp[text + L - 1] = 100.0 * ((t + 1) % T) + text + L - 1  # last slot from frame t+1
        assert got == exp


@pytest.mark.parametrize("T", [2, 3, 8])
def test_reference_matches_allinone(T):
    x = randn(2 * T, 197, 24, dtype=torch.float64, device="cpu")
    assert torch.equal(roll_reference(x, T, 0, 197 // 8), allinone_roll(x, T))
    # with text in front, the video part rolls the same and the text is untouched
    xt = randn(2 * T, 40 + 197, 24, dtype=torch.float64, device="cpu")
    out = fastvl.ops.temporal_token_roll(xt, T, text_len=40)
    assert torch.equal(out[:, :40], xt[:, :40])
    assert torch.equal(out[:, 40:], allinone_roll(xt[:, 40:].contiguous(), T))


def test_identity_cases():
    x = randn(4, 20, 8, device="cpu")
    assert fastvl.ops.temporal_token_roll(x, 1) is x
    assert fastvl.ops.temporal_token_roll(x, 2, fraction=0.0) is x


@pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("T,text_len", [(1, 0), (2, 40), (3, 0), (3, 40), (8, 40)])
@pytest.mark.parametrize("layout", ["contiguous", "rows", "channels"])
def test_kernel_matches_reference(backend, dtype, T, text_len, layout):
    B, L, C = 2, 197, 72
    x64 = randn(B * T, text_len + L, C, dtype=torch.float64)
    x = x64.to(dtype)
    if layout != "contiguous":
        x = noncontiguous(x, layout)
    if backend == "cuda" and layout == "channels":
        with pytest.raises(BackendError, match="channel stride"):
            fastvl.ops.temporal_token_roll(x, T, text_len=text_len, backend=backend)
        return
    x.requires_grad_(True)
    out = fastvl.ops.temporal_token_roll(x, T, text_len=text_len, backend=backend)
    f = L // 8
    ref = roll_reference(x64, T, text_len, f)
    assert out.dtype == dtype
    assert out is x if T == 1 else out.is_contiguous()
    assert torch.equal(out.double(), ref.to(dtype).double())  # pure data movement: exact
    g64 = randn(*out.shape, dtype=torch.float64)
    out.backward(g64.to(dtype))
    x64r = x64.clone().requires_grad_(True)
    roll_reference(x64r, T, text_len, f).backward(g64)
    if T == 1:
        assert torch.equal(x.grad.double(), g64.to(dtype).double())
    else:
        assert torch.equal(x.grad.double(), x64r.grad.to(dtype).double())


@pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("fraction", [0.25, 1 / 3, 0.49])
def test_kernel_other_fractions(backend, fraction):
    T, L, C = 4, 31, 16
    x = randn(2 * T, 5 + L, C)
    out = fastvl.ops.temporal_token_roll(x, T, text_len=5, fraction=fraction, backend=backend)
    f = int(L * fraction + 1e-9)
    assert torch.equal(out, roll_reference(x, T, 5, f))


@pytest.mark.skipif(DEV.type == "cuda" or not KERNELS, reason="forces GPU block shapes under the Triton interpreter")
@pytest.mark.parametrize("dtype,C", [(torch.float32, 200), (torch.float16, 1000)])
def test_gpu_configs_in_interpreter(dtype, C):
    # the GPU's channel blocks (200 fp32: 8 x 32, not one 256 block; 1000 fp16: one 1024 block, ragged) and
    # token blocks, forward and backward, exact
    from fastvl.kernels.utils import gpu_configs

    T, text, L = 3, 7, 37
    x64 = randn(2 * T, text + L, C, dtype=torch.float64)
    x = noncontiguous(x64.to(dtype)).requires_grad_(True)
    with gpu_configs():
        out = fastvl.ops.temporal_token_roll(x, T, text_len=text, backend="triton")
        g64 = randn(*out.shape, dtype=torch.float64)
        out.backward(g64.to(dtype))
    f = L // 8
    assert torch.equal(out.double(), roll_reference(x64, T, text, f).to(dtype).double())
    x64r = x64.clone().requires_grad_(True)
    roll_reference(x64r, T, text, f).backward(g64)
    assert torch.equal(x.grad.double(), x64r.grad.to(dtype).double())


def test_inverse_roll_round_trip():
    x = randn(6, 40, 8, device="cpu")
    y = roll_reference(x, 3, 0, 5, 1)
    assert torch.equal(roll_reference(y, 3, 0, 5, -1), x)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(4, 8),), {"num_frames": 2}, ValueError, "'x' must be 3-D"),
        ((torch.randn(6, 9, 4),), {"num_frames": 4}, ValueError, "multiple of num_frames=4"),
        ((torch.randn(6, 9, 4),), {"num_frames": 3, "fraction": 0.5}, ValueError, "'fraction' must be in"),
        ((torch.randn(6, 9, 4),), {"num_frames": 3, "fraction": -0.1}, ValueError, "'fraction' must be in"),
        ((torch.randn(6, 5, 4),), {"num_frames": 3}, ValueError, "too small for fraction"),
        ((torch.randn(6, 9, 4),), {"num_frames": 3, "text_len": 9}, ValueError, "text_len=9 leaves no video"),
        ((torch.randint(0, 5, (6, 9, 4)),), {"num_frames": 3}, TypeError, "'x' must have dtype"),
        (([1.0],), {"num_frames": 3}, TypeError, "'x' must be a torch.Tensor"),
        ((torch.randn(6, 9, 4),), {"num_frames": 0}, ValueError, "'num_frames' must be >= 1"),
        ((torch.randn(6, 9, 4),), {"num_frames": 3.0}, TypeError, "'num_frames' must be an int"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    kwargs = dict(kwargs)
    T = kwargs.pop("num_frames")
    with pytest.raises(exc, match=match):
        fastvl.ops.temporal_token_roll(*args, T, **kwargs)


def test_explicit_backend_that_cannot_serve_raises():
    x = torch.randn(6, 17, 8)
    with pytest.raises(BackendError, match="backend .cuda. cannot serve.*(x is on cpu|fastvl._C is not built)"):
        fastvl.ops.temporal_token_roll(x, 3, backend="cuda")
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        fastvl.ops.temporal_token_roll(x, 3, backend="nope")


def test_module():
    m = fastvl.nn.TemporalTokenRoll(num_frames=3, text_len=2)
    x = randn(6, 2 + 17, 8, device="cpu")
    assert torch.equal(m(x), roll_reference(x, 3, 2, 2))
    m.eval()  # rolling is part of the architecture: same at eval
    assert torch.equal(m(x), roll_reference(x, 3, 2, 2))
    assert "num_frames=3" in repr(m)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_large(backend, dtype):
    if backend not in kernel_backends():
        pytest.skip(f"{backend} not available on this GPU machine")
    T, L, C = 3, 197, 768
    x = torch.randn(32 * T, 40 + L, C, device="cuda", dtype=dtype, requires_grad=True)
    out = fastvl.ops.temporal_token_roll(x, T, text_len=40, backend=backend)
    assert torch.equal(out, roll_reference(x.detach(), T, 40, L // 8))
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, roll_reference(g, T, 40, L // 8, -1))
