"""Masked video modeling ops: tube masking, restore_tokens (the MAE / VideoMAE V2 decoder input), masked_patch_loss.

Every kernel against the float64 reference at odd sizes (fp32, fp16; bf16 on a GPU), forward and backward, at the
block shapes the GPU launch uses and at forced splits; the references against the eager code MAE, VideoMAE and
VideoMAE V2 ship; statistics of the random draw; bad input; dispatch reasons.
"""

import pytest
import torch
from einops import rearrange
from scipy.stats import chisquare

import fastvl
from fastvl import BackendError
from fastvl.ops.masking import (
    NORM_NONE,
    NORM_PATCH,
    masked_patch_loss_reference,
    restore_reference,
    tube_masking_reference,
)
from fastvl.testing import assert_close, device, dtypes_to_test, interpret, kernel_backends, noncontiguous, randn

DEV = device()
KERNELS = kernel_backends("triton")
BACKENDS = ["reference"] + KERNELS
needs_kernel = pytest.mark.skipif(not KERNELS, reason="no kernel backend can run here")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g, allow_unused=True)


# ---- the eager code the papers ship ----------------------------------------------------------


def videomae_tube_mask(order: torch.Tensor, T: int, tube: int, num_masks: int) -> torch.Tensor:
    """VideoMAE's TubeMaskingGenerator per tube, its shuffle given: (B, n_tubes, N) order -> (B, T*N) bool mask."""
    B, n_tubes, N = order.shape
    per_frame = torch.zeros(B, n_tubes, N, dtype=torch.bool, device=order.device)
    per_frame.scatter_(2, order[..., N - num_masks :], True)  # the shuffle's last num_masks places are masked
    return per_frame[:, torch.arange(T, device=order.device) // tube].reshape(B, T * N)


def mae_decoder_input(x, ids_restore, mask_token, pos):
    """MAE's forward_decoder (models_mae.py) after decoder_embed, without the cls token."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return x_ + pos


def videomae_v2_decoder_input(x_vis, mask, decode_vis, mask_token, pos):
    """VideoMAE V2's PretrainVisionTransformer.forward between encoder_to_decoder and the decoder."""
    B, _, C = x_vis.shape
    expand_pos_embed = pos.expand(B, -1, -1)
    pos_emd_vis = expand_pos_embed[~mask].reshape(B, -1, C)
    pos_emd_mask = expand_pos_embed[decode_vis].reshape(B, -1, C)
    return torch.cat([x_vis + pos_emd_vis, mask_token + pos_emd_mask], dim=1)


def mae_forward_loss(imgs, pred, mask, p, norm_pix_loss=True):
    """MAE's patchify + forward_loss (models_mae.py), imgs (N, 3, H, W)."""
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    target = x.reshape(imgs.shape[0], h * w, p**2 * 3)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def videomae_labels(videos, patch, tubelet, normalize=True):
    """VideoMAE / SimVTP / VideoMAE V2's target (engine_for_pretraining.py), videos (B, C, T, H, W) normalised."""
    mean = torch.as_tensor(IMAGENET[0], dtype=videos.dtype)[None, :, None, None, None]
    std = torch.as_tensor(IMAGENET[1], dtype=videos.dtype)[None, :, None, None, None]
    unnorm_videos = videos * std + mean
    if normalize:
        squeeze = rearrange(
            unnorm_videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch, p2=patch
        )
        norm = (squeeze - squeeze.mean(dim=-2, keepdim=True)) / (
            squeeze.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
        )
        return rearrange(norm, "b n p c -> b n (p c)")
    return rearrange(
        unnorm_videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=tubelet, p1=patch, p2=patch
    )


# ---- tube masking ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,tube", [(4, 2), (6, 4), (3, 3), (5, 1)])
def test_tube_masking_is_videomae_tube_mask_given_noise(backend, T, tube):
    B, N, C, ratio = 3, 29, 6, 0.7
    n_tubes = -(-T // tube)
    x = randn(B * T, N, C, dtype=torch.float64 if backend == "reference" else torch.float32)
    noise = torch.rand(B, n_tubes, N, device=DEV)
    vis, mask, ids_restore = fastvl.ops.tube_masking(x, T, ratio, tube=tube, noise=noise, backend=backend)
    K = int(N * (1 - ratio))
    assert vis.shape == (B, T * K, C) and mask.shape == (B, T * N) and ids_restore.shape == (B, T * N)
    assert mask.dtype == x.dtype and ids_restore.dtype == torch.int64
    expected = videomae_tube_mask(torch.argsort(noise, dim=-1, stable=True), T, tube, N - K)
    assert torch.equal(mask.bool(), expected)
    assert torch.equal(mask.reshape(B, T, N).sum(-1), torch.full((B, T), float(N - K), dtype=x.dtype, device=DEV))
    # ids_restore is MAE's inverse map over [visible; masked]: the visible rows sit at their places
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(T * N, device=DEV).expand(B, -1))
    x_flat = x.reshape(B, T * N, C)
    kept = ids_restore < T * K
    assert torch.equal(kept, ~expected)
    placed = torch.gather(vis, 1, ids_restore.clamp(max=T * K - 1)[..., None].expand(-1, -1, C))
    assert torch.equal(placed[kept], x_flat[kept])
    # frame-major, each frame's kept tokens in its tube's noise order (MAE's ids_shuffle[:K] per frame)
    order = torch.argsort(noise, dim=-1, stable=True)[:, torch.arange(T, device=DEV) // tube, :K]
    assert torch.equal(
        vis.reshape(B, T, K, C), torch.gather(x.reshape(B, T, N, C), 2, order[..., None].expand(-1, -1, -1, C))
    )


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("pos_kind", [None, "frame", "clip"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 72), (1, 6, 4, 70, 300)])  # (B, T, tube, N, C)
def test_tube_masking_kernel_vs_float64(backend, dtype, pos_kind, shape):
    B, T, tube, N, C = shape
    n_tubes = -(-T // tube)
    x = noncontiguous(randn(B * T, N, C, dtype=dtype)).requires_grad_(True)
    pos = None
    if pos_kind is not None:
        pos = randn(N if pos_kind == "frame" else T * N, C, dtype=torch.float32).requires_grad_(True)
    noise = torch.randn(B, n_tubes, N, device=DEV)  # negative keys too
    vis, mask, ids = fastvl.ops.tube_masking(x, T, 0.8, tube=tube, noise=noise, pos=pos, backend=backend)
    x64 = x.detach().double().requires_grad_(True)
    p64 = pos.detach().double().requires_grad_(True) if pos is not None else None
    rv, rm, ri = fastvl.ops.tube_masking(x64, T, 0.8, tube=tube, noise=noise, pos=p64, backend="reference")
    assert torch.equal(ids, ri) and torch.equal(mask.double(), rm)
    assert_close(vis, rv, dtype, name="visible")  # one rounding of the fp32 sum
    if pos is None:
        assert torch.equal(vis.double(), rv)
    g = randn(*vis.shape, dtype=dtype)
    got = _grads(vis, [x, pos], g)
    ref = _grads(rv, [x64, p64], g.double())
    assert torch.equal(got[0].double(), ref[0])  # every row a copy
    if pos is not None:
        assert_close(got[1], ref[1], torch.float32, name="grad pos")


@needs_kernel
@pytest.mark.parametrize("c_split", [1, 2, 3])
def test_tube_masking_channel_splits(c_split):
    """Programs sharing a tube's channel blocks (the GPU's split at large batch is 1): every split writes all."""
    from fastvl.kernels.masking import tube_mask

    B, T, N, C = 2, 4, 45, 300  # BLOCK_N 32: 2 token blocks; BLOCK_C 64: 5 channel blocks
    x = randn(B * T, N, C)
    pos = randn(T * N, C)
    noise = torch.rand(B * 2, N, device=DEV)
    seed = torch.zeros(1, dtype=torch.int64, device=DEV)
    got = tube_mask(x, T, 2, 11, noise=noise, pos=pos, c_split=c_split)
    ref = tube_masking_reference(x, T, 2, 11, seed, noise, pos, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tube_draw_statistics(backend):
    """Random draws: exactly K kept per frame, the same mask within a tube, uniform keep frequencies (chi-square),
    the right pair frequency and independent tubes. Fixed seeds keep it deterministic; p > 1e-3 for a fair draw."""
    B, T, tube, N = (4000 if DEV.type == "cuda" else 150), 4, 2, 31  # N <= 32: one rank tile per tube
    K = int(N * 0.3)
    x = torch.zeros(B * T, N, 1, device=DEV)
    g = torch.Generator(device=DEV.type).manual_seed(2024)
    _, mask, ids = fastvl.ops.tube_masking(x, T, 0.7, tube=tube, generator=g, backend=backend)
    kept = ~mask.bool().reshape(B, T, N)
    assert bool((kept.sum(-1) == K).all())
    assert torch.equal(kept[:, 0], kept[:, 1]) and torch.equal(kept[:, 2], kept[:, 3])
    tubes = kept[:, ::tube].reshape(-1, N).cpu()  # one row per tube
    counts = tubes.sum(0).double()
    assert chisquare(counts.numpy()).pvalue > 1e-3
    both = (tubes[:, 0] & tubes[:, 1]).double().mean().item()
    p = K * (K - 1) / (N * (N - 1))
    assert abs(both - p) < 5 * (p * (1 - p) / tubes.shape[0]) ** 0.5
    # the first visible slot (the draw's order) is uniform too, and tubes are independent draws
    first = ids.reshape(B, T, N)[:, 0].argmin(-1).cpu()
    assert chisquare(torch.bincount(first, minlength=N).double().numpy()).pvalue > 1e-3
    same = (kept[:, 0] == kept[:, 2]).all(-1).double().mean().item()
    assert same < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_tube_masking_reproducible(backend):
    x = randn(8, 20, 4)
    g1, g2 = (torch.Generator(device=DEV.type).manual_seed(5) for _ in range(2))
    a = fastvl.ops.tube_masking(x, 4, 0.5, generator=g1, backend=backend)
    b = fastvl.ops.tube_masking(x, 4, 0.5, generator=g2, backend=backend)
    c = fastvl.ops.tube_masking(x, 4, 0.5, generator=g1, backend=backend)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[2], c[2])


# ---- restore_tokens --------------------------------------------------------------------------


def _masking(B, L, K):
    """A random MAE-style ids_restore (B, L) and the places of the visible rows."""
    ids_shuffle = torch.argsort(torch.rand(B, L, device=DEV), dim=1)
    return torch.argsort(ids_shuffle, dim=1), ids_shuffle


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("keep", [None, "index", "bool"])
@pytest.mark.parametrize("shape", [(3, 61, 17, 40), (2, 37, 9, 300)])  # (B, L, K, C): BLOCK_C 64, 256
def test_restore_kernel_vs_float64(backend, dtype, with_pos, keep, shape):
    B, L, K, C = shape
    ids, ids_shuffle = _masking(B, L, K)
    ids = ids.to(torch.int32) if C == 300 else ids  # int32 indices are taken too
    vis = noncontiguous(randn(B, K, C, dtype=dtype)).requires_grad_(True)
    token = randn(C).requires_grad_(True)  # fp32 parameters with fp16 activations, as under autocast
    pos = randn(L, C).requires_grad_(True) if with_pos else None
    decoder_keep = None
    if keep == "index":  # a third of the masked places, in random order, and one visible place (V2 allows it)
        decoder_keep = torch.cat([ids_shuffle[:, K + 2 : K + 2 + (L - K) // 3], ids_shuffle[:, :1]], dim=1)
    elif keep == "bool":
        decoder_keep = torch.zeros(B, L, dtype=torch.bool, device=DEV)
        decoder_keep.scatter_(1, ids_shuffle[:, K : K + 5], True)
    out = fastvl.ops.restore_tokens(vis, ids, token, pos, decoder_keep=decoder_keep, backend=backend)
    v64 = vis.detach().double().requires_grad_(True)
    t64 = token.detach().double().requires_grad_(True)
    p64 = pos.detach().double().requires_grad_(True) if with_pos else None
    ref = fastvl.ops.restore_tokens(v64, ids, t64, p64, decoder_keep=decoder_keep, backend="reference")
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out.double(), ref.to(dtype).double())  # one rounding of the fp32 sum
    g = randn(*out.shape, dtype=dtype)
    got = _grads(out, [vis, token, pos], g)
    want = _grads(ref, [v64, t64, p64], g.double())
    assert torch.equal(got[0].double(), want[0])
    for a, b, name in zip(got[1:], want[1:], ["grad mask_token", "grad pos"]):
        assert_close(a, b, torch.float32, name=name)


@needs_kernel
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
@pytest.mark.parametrize("keep", [False, True])
def test_restore_batch_splits(splits, keep):
    """Programs walk groups of batch rows (ragged last group): the outputs and the summed gradients agree."""
    from fastvl.kernels.masking import restore, restore_backward, restore_keep

    from fastvl.ops.masking import keep_inverse, restore_reference_backward

    B, L, K, C = 7, 23, 6, 24
    ids, ids_shuffle = _masking(B, L, K)
    vis, token, pos = randn(B, K, C), randn(C), randn(L, C)
    kp = ids_shuffle[:, K : K + 5] if keep else None
    out = (
        restore_keep(vis, ids, kp, token, pos, splits=splits)
        if keep
        else restore(vis, ids, token, pos, splits=splits)[0]
    )
    assert torch.equal(out, restore_reference(vis, ids, token, pos, kp))
    g = randn(*out.shape)
    inv = keep_inverse(kp, L) if keep else None
    got = restore_backward(g, ids, K, inv, splits=splits)
    want = restore_reference_backward(g.double(), ids, K, kp, True, True, True)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32)
    _, colsum = restore(vis, ids, None, None, colsum=True, splits=splits)
    assert_close(colsum, restore_reference(vis.double(), ids, None, None, None).sum(0), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_is_mae_and_videomae_v2(backend):
    """The reference (and every kernel) is MAE's cat + gather + add, and VideoMAE V2's cat with decoder masking."""
    B, L, K, C = 3, 40, 10, 16
    dtype = torch.float64 if backend == "reference" else torch.float32
    ids, _ = _masking(B, L, K)
    x, token, pos = randn(B, K, C, dtype=dtype), randn(1, 1, C, dtype=dtype), randn(1, L, C, dtype=dtype)
    out = fastvl.ops.restore_tokens(x, ids, token, pos, backend=backend)
    assert_close(out, mae_decoder_input(x.double(), ids, token.double(), pos.double()), dtype)
    # V2: visible tokens in ascending place order (x[~mask]); a decoder mask drawn apart from the encoder's
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    mask.scatter_(1, torch.argsort(torch.rand(B, L, device=DEV), dim=1)[:, :K], False)
    ids_v2 = torch.argsort(torch.argsort(mask.to(torch.uint8), dim=1, stable=True), dim=1)
    decode_vis = torch.zeros(B, L, dtype=torch.bool, device=DEV)
    decode_vis.scatter_(1, torch.argsort(torch.rand(B, L, device=DEV), dim=1)[:, : L // 2], True)
    out = fastvl.ops.restore_tokens(x, ids_v2, token, pos, decoder_keep=decode_vis, backend=backend)
    expected = videomae_v2_decoder_input(x.double(), mask, decode_vis, token.double(), pos.double())
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tube_masking_then_restore_gives_back_the_clip(backend):
    """The ops compose: restoring the visible tokens puts every kept token back at its clip place."""
    B, T, N, C = 2, 4, 15, 8
    x = randn(B * T, N, C)
    vis, mask, ids = fastvl.ops.tube_masking(x, T, 0.6, tube=2, backend=backend)
    token = randn(C)
    out = fastvl.ops.restore_tokens(vis, ids, token, backend=backend)
    expected = torch.where(mask.bool()[..., None], token, x.reshape(B, T * N, C))
    assert torch.equal(out, expected)


# ---- masked_patch_loss -----------------------------------------------------------------------


def _video(B, T, H, W, dtype=torch.float32, layout="btchw"):
    v = randn(B, T, 3, H, W, dtype=dtype)
    if layout == "bcthw":  # VideoMAE's clip layout, viewed as fastvl's (B, T, 3, H, W)
        v = v.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    return v


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", dtypes_to_test())
@pytest.mark.parametrize(
    "norm,rows", [(True, "all"), ("channel", "all"), (False, "all"), (True, "masked"), ("channel", "index")]
)
@pytest.mark.parametrize(
    "geometry", [(2, 4, 12, 8, 4, 2, "btchw"), (1, 3, 15, 9, 3, 3, "bcthw"), (1, 2, 16, 16, 16, 1, "btchw")]
)  # (B, T, H, W, patch, tubelet, layout): 16 = MAE / VideoMAE's patch (the GPU tile), 3 a padded tile
def test_patch_loss_kernel_vs_float64(backend, dtype, norm, rows, geometry):
    B, T, H, W, patch, tubelet, layout = geometry
    P = (T // tubelet) * (H // patch) * (W // patch)
    D = 3 * tubelet * patch * patch
    video = _video(B, T, H, W, dtype, layout)
    mask = torch.zeros(B, P, dtype=torch.bool, device=DEV)
    M = max(1, (2 * P) // 3)
    mask.scatter_(1, torch.argsort(torch.rand(B, P, device=DEV), dim=1)[:, :M], True)
    R = {"all": P, "masked": M, "index": max(1, P // 2)}[rows]
    index = None
    if rows == "index":  # the patches some decoder rows predict, the first of them masked
        index = torch.argsort(torch.rand(B, P, device=DEV), dim=1)[:, :R]
        mask.scatter_(1, index[:, :1], True)
    pred = noncontiguous(randn(B, R, D, dtype=dtype), "channels").requires_grad_(True)  # element stride 2
    affine = IMAGENET if norm == "channel" else None
    kw = {"patch": patch, "tubelet": tubelet, "norm_pix": norm, "unnormalize": affine, "patch_index": index}
    loss = fastvl.ops.masked_patch_loss(pred, video, mask, backend=backend, **kw)
    p64 = pred.detach().double().requires_grad_(True)
    ref = fastvl.ops.masked_patch_loss(p64, video.double(), mask, backend="reference", **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref, torch.float32, name="loss")
    (g,) = torch.autograd.grad(loss * 3.0, pred)
    (g64,) = torch.autograd.grad(ref * 3.0, p64)
    assert_close(g, g64, dtype, name="grad pred")


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_loss_is_mae_forward_loss(backend):
    B, H, W, p = 2, 12, 16, 4
    P = (H // p) * (W // p)
    dtype = torch.float64 if backend == "reference" else torch.float32
    imgs = randn(B, 3, H, W, dtype=dtype)
    pred = randn(B, P, 3 * p * p, dtype=dtype)
    mask = (torch.rand(B, P, device=DEV) < 0.75).to(dtype)  # MAE's float mask
    for norm in (True, False):
        loss = fastvl.ops.masked_patch_loss(pred, imgs[:, None], mask, patch=p, norm_pix=norm, backend=backend)
        assert_close(loss, mae_forward_loss(imgs.double(), pred.double(), mask.double(), p, norm), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_loss_is_videomae_and_videomae_v2(backend):
    B, C, T, H, W, p, u = 2, 3, 4, 8, 12, 4, 2
    P = (T // u) * (H // p) * (W // p)
    dtype = torch.float64 if backend == "reference" else torch.float32
    videos = randn(B, C, T, H, W, dtype=dtype)  # VideoMAE's (B, C, T, H, W), ImageNet-normalised
    mask = torch.zeros(B, P, dtype=torch.bool, device=DEV)
    mask.scatter_(1, torch.argsort(torch.rand(B, P, device=DEV), dim=1)[:, : P // 2], True)
    kw = {"patch": p, "tubelet": u, "unnormalize": IMAGENET, "backend": backend}
    for norm, normalize in (("channel", True), (False, False)):
        labels = videomae_labels(videos.double(), p, u, normalize)
        outputs = randn(B, P // 2, 3 * u * p * p, dtype=dtype)  # VideoMAE's decoder: the masked rows only
        expected = torch.nn.functional.mse_loss(outputs.double(), labels[mask].reshape(B, -1, labels.shape[-1]))
        loss = fastvl.ops.masked_patch_loss(outputs, videos.transpose(1, 2), mask, norm_pix=norm, **kw)
        assert_close(loss, expected, torch.float32)
    # V2: predictions at the decoder's kept places, loss over those the encoder masked (cal_loss_mask)
    decode_vis = torch.zeros(B, P, dtype=torch.bool, device=DEV)
    decode_vis.scatter_(1, torch.argsort(torch.rand(B, P, device=DEV), dim=1)[:, : P // 3], True)
    labels = videomae_labels(videos.double(), p, u)[decode_vis].reshape(B, P // 3, -1)
    outputs = randn(B, P // 3, 3 * u * p * p, dtype=dtype)
    cal_loss_mask = mask[decode_vis].reshape(B, -1)
    expected = (((outputs.double() - labels) ** 2).mean(-1) * cal_loss_mask).sum() / cal_loss_mask.sum()
    index = torch.argsort((~decode_vis).to(torch.uint8), dim=1, stable=True)[:, : P // 3]
    loss = fastvl.ops.masked_patch_loss(
        outputs, videos.transpose(1, 2), mask, norm_pix="channel", patch_index=index, **kw
    )  # fmt: skip
    assert_close(loss, expected, torch.float32)


def test_patch_loss_reference_hand_case():
    """One 2x2 patch of a 1-frame clip, MAE's normalisation worked by hand: mean 1.5, unbiased var 1.5."""
    video = torch.zeros(1, 1, 3, 2, 2, dtype=torch.float64)
    video[0, 0, :, 1, 1] = 6.0  # pixel (1, 1) is 6 in every channel: mean 18/12 = 1.5, var (9*2.25+3*20.25)/11
    pred = torch.zeros(1, 1, 12, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    var = (9 * 2.25 + 3 * 20.25) / 11
    target = torch.full((12,), -1.5 / (var + 1e-6) ** 0.5, dtype=torch.float64)
    target[9:] = 4.5 / (var + 1e-6) ** 0.5  # (dt, dy, dx, c) order: pixel (1, 1) is elements 9, 10, 11
    loss = fastvl.ops.masked_patch_loss(pred, video, mask, patch=2)
    assert torch.allclose(loss, (target**2).mean())
    assert masked_patch_loss_reference(pred, video, mask, None, mask.sum(), 2, 1, NORM_NONE, []) == 36.0 * 3 / 12


# ---- dispatch, custom ops, bad input ---------------------------------------------------------


def test_explain_reasons():
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    report = fastvl.explain(fastvl.ops.tube_masking, x, 2, 0.5)
    assert "tube_masking" in report and "[chosen] reference" in report
    with pytest.raises(BackendError, match="triton"):
        fastvl.ops.tube_masking(x, 2, 0.5, backend="triton")  # float64 (or CPU without the interpreter)
    if interpret():
        assert "x dtype torch.float64" in fastvl.explain(fastvl.ops.tube_masking, x, 2, 0.5, backend="triton")
        # a patch the kernel cannot hold on chip: 64x64 pixels
        v, pred = torch.zeros(1, 1, 3, 64, 64), torch.zeros(1, 1, 3 * 64 * 64)
        mask = torch.ones(1, 1, dtype=torch.bool)
        why = fastvl.explain(fastvl.ops.masked_patch_loss, pred, v, mask, patch=64, backend="triton")
        assert "patch tile tubelet*patch*patch (powers of 2)=4096 > 2048" in why and "one patch is held on chip" in why
    else:
        assert "triton runs on CUDA tensors" in fastvl.explain(fastvl.ops.tube_masking, x, 2, 0.5, backend="triton")


def test_fake_tensor_shapes_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vis, mask, ids = fastvl.ops.tube_masking(torch.empty(8, 9, 4), 4, 0.5, noise=torch.empty(2, 2, 9))
        assert vis.shape == (2, 16, 4) and mask.shape == (2, 36) and ids.shape == (2, 36)
        out = fastvl.ops.restore_tokens(vis, ids, torch.empty(4), check_indices=False)
        assert out.shape == (2, 36, 4)
        loss = fastvl.ops.masked_patch_loss(
            torch.empty(1, 4, 12), torch.empty(1, 1, 3, 4, 4), torch.ones(1, 4), patch=2
        )
        assert loss.shape == ()
    x = torch.randn(8, 9, 4, requires_grad=True)
    seed = torch.tensor([3])
    torch.library.opcheck(
        torch.ops.fastvl.tube_masking.default, (x, seed, None, None, 4, 2, 4, torch.float32, "reference")
    )
    vis = torch.randn(2, 5, 4, requires_grad=True)
    ids, _ = _masking(2, 12, 5)
    ids = ids.cpu()
    token = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvl.restore_tokens.default, (vis, ids, token, None, None, "reference"))
    pred = torch.randn(1, 4, 12, requires_grad=True)
    mask = torch.tensor([[True, False, True, True]])
    args = (pred, torch.randn(1, 1, 3, 4, 4), mask, None, mask.sum().float(), 2, 1, NORM_PATCH, [], "reference")
    torch.library.opcheck(torch.ops.fastvl.masked_patch_loss.default, args)


def test_flop_count_is_the_references():
    """FlopCounterMode counts no FLOPs for the reference's gathers and statistics; the custom ops count alike."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, 9, 4, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        vis, mask, ids = fastvl.ops.tube_masking(x, 4, 0.5)
        out = fastvl.ops.restore_tokens(vis, ids, torch.zeros(4, requires_grad=True))
        out.sum().backward()
    assert fc.get_total_flops() == 0


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """tube masking -> a linear encoder -> restore -> linear head -> masked patch loss under torch.compile."""
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(12, 8), torch.nn.Linear(8, 12)
    token, pos = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(32, 8))
    video = torch.randn(2, 2, 3, 8, 8)

    def step(video, noise):
        x = enc(rearrange(video, "b t c (h p) (w q) -> (b t) (h w) (p q c)", p=2, q=2))
        vis, mask, ids = fastvl.ops.tube_masking(x, 2, 0.75, tube=2, noise=noise)
        out = fastvl.ops.restore_tokens(vis, ids, token, pos, check_indices=False)
        pred = head(out)
        mae = fastvl.ops.masked_patch_loss(pred, video, mask, patch=2)
        return mae + fastvl.ops.masked_patch_loss(pred, video, mask, patch=2, norm_pix="channel")

    noise = torch.rand(2, 1, 16)
    eager = step(video, noise)
    eager.backward()
    g = enc.weight.grad.clone()
    enc.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(video, noise)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(enc.weight.grad, g)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastvl.ops.tube_masking(torch.randn(7, 9, 4), 2, 0.5), ValueError, "multiple of num_frames=2"),
        (lambda: fastvl.ops.tube_masking(torch.randn(8, 9), 2, 0.5), ValueError, "'x' must be 3-D"),
        (lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 0, 0.5), ValueError, "'num_frames' must be >= 1"),
        (
            lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 2, 1.0),
            ValueError,
            r"'mask_ratio' must be in \[0, 1\)",
        ),
        (lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 2, 0.95), ValueError, "keeps int"),
        (lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 2, 0.5, tube=0), ValueError, "'tube' must be >= 1"),
        (
            lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 4, 0.5, noise=torch.rand(2, 4, 9)),
            ValueError,
            r"'noise' must have shape \(B, n_tubes, N\)=\(2, 2, 9\)",
        ),
        (
            lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 4, 0.5, pos=torch.randn(10, 4)),
            ValueError,
            "'pos' must have shape",
        ),
        (
            lambda: fastvl.ops.tube_masking(torch.randn(8, 9, 4), 4, 0.5, generator=3),
            TypeError,
            "'generator' must be a torch.Generator",
        ),
        (
            lambda: fastvl.ops.restore_tokens(torch.randn(2, 3, 4), torch.zeros(2, 5), torch.randn(4)),
            TypeError,
            "'ids_restore' must have dtype",
        ),
        (
            lambda: fastvl.ops.restore_tokens(
                torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.int64), torch.randn(4)
            ),
            ValueError,
            "'ids_restore' must have shape",
        ),
        (
            lambda: fastvl.ops.restore_tokens(
                torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.int64), torch.randn(4)
            ),
            ValueError,
            "'ids_restore' must hold a permutation",
        ),
        (
            lambda: fastvl.ops.restore_tokens(torch.randn(2, 3, 4), torch.arange(5).expand(2, 5), torch.randn(5)),
            ValueError,
            "'mask_token' must have shape",
        ),
        (
            lambda: fastvl.ops.restore_tokens(
                torch.randn(2, 3, 4), torch.arange(5).expand(2, 5), torch.randn(4), torch.randn(6, 4)
            ),
            ValueError,
            "'pos' must have shape",
        ),
        (
            lambda: fastvl.ops.restore_tokens(
                torch.randn(2, 3, 4),
                torch.arange(5).expand(2, 5),
                torch.randn(4),
                decoder_keep=torch.tensor([[3, 3], [3, 4]]),
            ),
            ValueError,
            "'decoder_keep' repeats",
        ),
        (
            lambda: fastvl.ops.restore_tokens(
                torch.randn(2, 3, 4),
                torch.arange(5).expand(2, 5),
                torch.randn(4),
                decoder_keep=torch.tensor([[True, False, True, False, False], [True] * 5]),
            ),
            ValueError,
            "'decoder_keep' must keep as many places in every row",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 4, 12), torch.randn(1, 1, 3, 4, 5), torch.ones(1, 4), patch=2
            ),
            ValueError,
            "'video' .* must tile",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 4, 12), torch.randn(1, 1, 4, 4, 4), torch.ones(1, 4), patch=2
            ),
            ValueError,
            "'video' must be \\(B, T, 3, H, W\\)",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 4, 11), torch.randn(1, 1, 3, 4, 4), torch.ones(1, 4), patch=2
            ),
            ValueError,
            "'pred' must have shape",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 4, 12), torch.randn(1, 1, 3, 4, 4), torch.ones(1, 5), patch=2
            ),
            ValueError,
            "'mask' must have shape",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 2, 12), torch.randn(1, 1, 3, 4, 4), torch.ones(1, 4), patch=2
            ),
            ValueError,
            "every row of 'mask' must mask exactly 2",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 4, 12), torch.randn(1, 1, 3, 4, 4), torch.ones(1, 4), patch=2, norm_pix="pixel"
            ),
            ValueError,
            "'norm_pix' must be",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 4, 12), torch.randn(1, 1, 3, 4, 4), torch.ones(1, 4), patch=2, unnormalize=(1, 2)
            ),
            TypeError,
            "'unnormalize' must be",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 2, 12),
                torch.randn(1, 1, 3, 4, 4),
                torch.ones(1, 4),
                patch=2,
                patch_index=torch.tensor([[0, 4]]),
            ),
            ValueError,
            r"'patch_index' must lie in \[0, P=4\)",
        ),
        (
            lambda: fastvl.ops.masked_patch_loss(
                torch.randn(1, 1, 3), torch.randn(1, 1, 3, 1, 1), torch.ones(1, 1), patch=1, norm_pix="channel"
            ),
            ValueError,
            "needs >= 2 pixels",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_videomae_b_shapes():
    """VideoMAE-B: 64 clips x 8 x 196 tokens, bf16, encoder 768 / decoder 384, ratio 0.9, tube over the clip."""
    B, T, N, C, Cd = 64, 8, 196, 768, 384
    x = torch.randn(B * T, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(T * N, C, device="cuda")
    noise = torch.rand(B, 1, N, device="cuda")
    vis, mask, ids = fastvl.ops.tube_masking(x, T, 0.9, tube=T, noise=noise, pos=pos, backend="triton")
    rv, rm, ri = fastvl.ops.tube_masking(x, T, 0.9, tube=T, noise=noise, pos=pos, backend="reference")
    assert torch.equal(ids, ri) and torch.equal(mask, rm) and torch.equal(vis, rv)
    enc = torch.randn(B, vis.shape[1], Cd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    token = torch.randn(Cd, device="cuda", requires_grad=True)
    dpos = torch.randn(T * N, Cd, device="cuda", requires_grad=True)
    out = fastvl.ops.restore_tokens(enc, ids, token, dpos, backend="triton")
    ref = fastvl.ops.restore_tokens(enc, ids, token, dpos, backend="reference")
    assert torch.equal(out, ref)
    video = torch.randn(B, 16, 3, 224, 224, device="cuda")
    pred = torch.randn(B, T * N, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kw = {"patch": 16, "tubelet": 2, "norm_pix": "channel", "unnormalize": IMAGENET}
    loss = fastvl.ops.masked_patch_loss(pred, video, mask, backend="triton", **kw)
    ref = fastvl.ops.masked_patch_loss(pred.float(), video, mask, backend="reference", **kw)
    assert_close(loss, ref, torch.float32, rtol=1e-4)


# ---- sm_90 compile ---------------------------------------------------------------------------

_SM90 = r"""
import contextlib, io, json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
from fastvl.kernels import masking as km
from fastvl.ops.masking import keep_inverse

# VideoMAE-B: 8 x 196 tokens, encoder 768, decoder 384, ratio 0.9 (19 kept per frame); 16 clips (like 64: % 16)
bf, B, T, N, C, Cd, K = torch.bfloat16, 16, 8, 196, 768, 384, 19
L, TK = T * N, T * K
x = torch.empty(B * T, N, C, dtype=bf)
km.tube_mask(x, T, T, K, seed=torch.zeros(1, dtype=torch.int64), pos=torch.empty(L, C), mask_dtype=bf)
km.tube_mask(x, T, 2, K, noise=torch.empty(B * 4, N), mask_dtype=bf)
ids = torch.argsort(torch.rand(B, L), 1)
enc, tok, pos = torch.empty(B, TK, Cd, dtype=bf), torch.empty(Cd), torch.empty(L, Cd)
keep = torch.argsort(ids, 1)[:, TK : TK + 700]
km.restore(enc, ids, tok, pos)
km.restore(torch.empty(B, TK, C, dtype=bf), ids, None, None, colsum=True)
km.restore_keep(enc, ids, keep, tok, pos)
km.restore_backward(torch.empty(B, L, Cd, dtype=bf), ids, TK, None)
km.restore_backward(torch.empty(B, TK + 700, Cd, dtype=bf), ids, TK, keep_inverse(keep, L), need_visible=False)
video, mask, count = torch.empty(B, 16, 3, 224, 224), torch.zeros(B, L, dtype=torch.bool), torch.ones(())
pred = torch.empty(B, L, 1536, dtype=bf)
for norm in (km.NORM_PATCH, km.NORM_CHANNEL):
    for grad in (None, torch.ones(())):
        km.patch_loss(pred, video, mask, None, count, patch=16, tubelet=2, norm=norm, affine=(1,) * 6, grad=grad)
km.patch_loss(pred[:, :700], video, mask, torch.zeros(B, 700, dtype=torch.int64), count, patch=16, tubelet=2, norm=2)

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
out = []
for fn, args, kwargs in launches:
    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=dict(options.__dict__))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    ptx = k.asm["ptx"]
    wide = len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4\.b32|ld\.global(?:\.[a-z0-9]+)*\.v2\.b64", ptx))
    spills = [int(s) for s in spills.groups()] if spills else None  # ptxas -v: spills are decided there
    out.append({"kernel": fn.__name__, "spills": spills, "shared": k.metadata.shared, "wide_loads": wide})
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """Every masking launch at VideoMAE-B shapes, bound as a CUDA launch binds it (16-byte aligned pointers,
    sizes divisible by 16), compiled for sm_90a: no spills, within shared memory, 16-byte global loads."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_POISON")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: ptxas runs and reports spills
    res = subprocess.run([sys.executable, "-c", _SM90], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    kernels = json.loads(res.stdout)
    names = {k["kernel"] for k in kernels}
    assert names == {"_tube_mask_kernel", "_restore_kernel", "_restore_keep_kernel", "_restore_backward_kernel",
                     "_patch_loss_kernel"}  # fmt: skip
    for k in kernels:
        assert k["spills"] == [0, 0], k
        assert k["shared"] <= 227 * 1024 and k["wide_loads"] > 0, k
