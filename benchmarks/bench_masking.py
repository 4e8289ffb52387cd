"""Masked video modeling ops: tube masking, the MAE / VideoMAE V2 decoder input, the masked patch loss.

fastvl against the eager code the methods ship: VideoMAE's ``TubeMaskingGenerator`` (numpy, in the data loader)
+ ``x + pos_embed`` + ``x[~mask]``; MAE's ``cat`` + ``gather`` unshuffle + ``decoder_pos_embed`` (and VideoMAE
V2's ``cat`` of ``x_vis + pos_vis`` and ``mask_token + pos_mask``); MAE's / VideoMAE's patchify + normalise + MSE
(VideoMAE's under autocast: the target and the loss in fp32). Also torch.compile of that eager code (the
numpy generator written in torch), and each fastvl backend that runs here. Shapes: VideoMAE-B (16 frames at
224 px, tubelet 2, patch 16: 8 x 196 tokens, encoder 768, decoder 384, ratio 0.9, the tube the whole clip), MAE-B
for the image loss (196 patches, ratio 0.75). 64 clips on a GPU, 8 on the CPU; ``--quick`` shrinks everything.

    python -m benchmarks.bench_masking [--quick] [--out DIR]   (= python -m benchmarks --ops masking ...)
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

import fastvl

try:
    from .common import Case
except ImportError:  # run as a script
    from common import Case

FAMILY = "masking"
OPS = ("tube_masking", "restore_tokens", "masked_patch_loss")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---- the eager code the methods ship -------------------------------------------------------


def videomae_tube_masking_eager(x, pos, T, K):
    """VideoMAE: one TubeMaskingGenerator draw per clip (numpy; its count ``N - int(ratio*N)`` set to fastvl's K),
    the mask sent to the device, then ``x + pos_embed`` and ``x[~mask].reshape(B, -1, C)``."""
    BT, N, C = x.shape
    B = BT // T
    masks = []
    for _ in range(B):
        mask_per_frame = np.hstack([np.zeros(K), np.ones(N - K)])
        np.random.shuffle(mask_per_frame)
        masks.append(np.tile(mask_per_frame, (T, 1)).flatten())
    mask = torch.from_numpy(np.stack(masks)).to(x.device, non_blocking=True).to(torch.bool)
    x = x.reshape(B, T * N, C) + pos
    return x[~mask].reshape(B, -1, C), mask


def tube_masking_torch(x, pos, T, K):
    """The same draw in torch (rand + argsort per clip), for torch.compile."""
    BT, N, C = x.shape
    B = BT // T
    keep = torch.argsort(torch.rand(B, 1, N, device=x.device), dim=-1)[..., :K]
    ids = (keep + (torch.arange(T, device=x.device) * N)[:, None]).reshape(B, T * K)
    x = x.reshape(B, T * N, C) + pos
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, C))


def mae_restore_eager(x, ids_restore, mask_token, pos):
    """MAE's forward_decoder from the mask tokens to the positions (no cls token)."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return x_ + pos


def videomae_v2_restore_eager(x_vis, mask, decode_vis, mask_token, pos):
    """VideoMAE V2's decoder input with decoder masking (``decode_vis``: the places the decoder predicts)."""
    B, _, C = x_vis.shape
    expand_pos_embed = pos.expand(B, -1, -1)
    pos_emd_vis = expand_pos_embed[~mask].reshape(B, -1, C)
    pos_emd_mask = expand_pos_embed[decode_vis].reshape(B, -1, C)
    return torch.cat([x_vis + pos_emd_vis, mask_token + pos_emd_mask], dim=1)


def videomae_loss_eager(pred, video, mask, patch, tubelet):
    """VideoMAE's target (un-normalise, patchify, per-channel normalise, select the masked rows) and MSELoss, with
    ``video (B, T, 3, H, W)`` viewed as VideoMAE's ``(B, C, T, H, W)``; pred the masked rows, cast like autocast."""
    videos = video.transpose(1, 2)
    with torch.no_grad():
        mean = torch.as_tensor(IMAGENET[0], device=video.device)[None, :, None, None, None]
        std = torch.as_tensor(IMAGENET[1], device=video.device)[None, :, None, None, None]
        unnorm = videos * std + mean
        B, C, T, H, W = unnorm.shape
        u, p = tubelet, patch
        sq = unnorm.reshape(B, C, T // u, u, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        sq = sq.reshape(B, -1, u * p * p, C)  # 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c'
        norm = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        patches = norm.flatten(2)
        labels = patches[mask].reshape(B, -1, patches.shape[-1])
    return F.mse_loss(pred.float(), labels)


def mae_loss_eager(pred, imgs, mask, p):
    """MAE's patchify + forward_loss with norm_pix_loss (imgs (N, 3, H, W), pred at every patch)."""
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    x = torch.einsum("nchpwq->nhwpqc", imgs.reshape(imgs.shape[0], 3, h, p, w, p))
    target = x.reshape(imgs.shape[0], h * w, p**2 * 3)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ---- cases ---------------------------------------------------------------------------------


def _compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # torch.compile unavailable here
        return None


def _backends(op: str) -> list[str]:
    """fastvl backends that can run on this device (named ones, so each is measured)."""
    if not torch.cuda.is_available():
        return []
    return [b.name for b in fastvl.backends.backends(op) if b.name != "reference" and not b.available()]


def _modes(provs: dict, inputs: tuple, grad_of=0):
    """({name: fwd closure}, {name: fwd+bwd closure}); the backward seeds the output (or its ``grad_of`` item)."""

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(*inputs)

        return run

    def full(fn):
        def run():
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.grad = None
            out = fn(*inputs)
            out = out[grad_of] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))

        return run

    return {k: fwd(f) for k, f in provs.items()}, {k: full(f) for k, f in provs.items()}


def _providers(op: str, eager, torch_version, fastvl_call) -> dict:
    provs = {"eager": eager}
    comp = _compiled(torch_version)
    if comp is not None:
        provs["compile"] = comp
    provs["fastvl"] = fastvl_call(None)
    for b in _backends(op):
        provs[f"fastvl-{b}"] = fastvl_call(b)
    return provs


def cases(quick: bool = False):
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    es = torch.finfo(dtype).bits // 8
    B, T, N, C, Cd, side = (2, 4, 49, 64, 32, 112) if quick else ((64 if gpu else 8), 8, 196, 768, 384, 224)
    ratio = 0.9
    K = int(N * (1 - ratio) + 1e-6)
    L = T * N
    cfg = {"B": B, "T": T, "N": N, "ratio": ratio, "K per frame": K, "dtype": str(dtype)}

    # tube masking (the tube is the whole clip, as VideoMAE's), positions added to the kept tokens
    x = torch.randn(B * T, N, C, device=dev, dtype=dtype, requires_grad=True)
    pos = torch.randn(L, C, device=dev, dtype=dtype)
    provs = _providers(
        "tube_masking",
        lambda a: videomae_tube_masking_eager(a, pos, T, K)[0],
        lambda a: tube_masking_torch(a, pos, T, K),
        lambda b: lambda a: fastvl.ops.tube_masking(a, T, ratio, tube=T, pos=pos, backend=b),
    )
    fw, fu = _modes(provs, (x,))
    nbytes = (2 * B * T * K * C + min(B * T * K, L) * C) * es + B * L * (8 + es)
    tcfg = {**cfg, "C": C, "tube": T, "pos": True}
    yield Case("tube_masking", "fwd", "tokens", B * L, fw, tcfg, nbytes)
    yield Case("tube_masking", "full", "tokens", B * L, fu, dict(tcfg), nbytes + (B * T * K * C + B * L * C) * es)

    # restore_tokens: the decoder input of VideoMAE-B (MAE's unshuffle), then VideoMAE V2's decoder masking
    TK = T * K
    ids_restore = torch.argsort(torch.argsort(torch.rand(B, L, device=dev), dim=1), dim=1)
    vis = torch.randn(B, TK, Cd, device=dev, dtype=dtype, requires_grad=True)
    token = torch.randn(1, 1, Cd, device=dev, dtype=dtype, requires_grad=True)
    dpos = torch.randn(1, L, Cd, device=dev, dtype=dtype, requires_grad=True)
    provs = _providers(
        "restore_tokens",
        mae_restore_eager,
        mae_restore_eager,
        lambda b: lambda v, i, t, p: fastvl.ops.restore_tokens(v, i, t, p, check_indices=False, backend=b),
    )
    fw, fu = _modes(provs, (vis, ids_restore, token, dpos))
    nbytes = (B * TK * Cd + B * L * Cd + L * Cd) * es + B * L * 8
    rcfg = {**cfg, "C": Cd, "decoder_keep": None}
    yield Case("restore_tokens", "fwd", "tokens", B * L, fw, rcfg, nbytes)
    yield Case("restore_tokens", "full", "tokens", B * L, fu, dict(rcfg), 2 * nbytes)
    # V2: visible in ascending place order (x[~mask]), the decoder keeps half of the masked places
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask.scatter_(1, torch.argsort(torch.rand(B, L, device=dev), dim=1)[:, :TK], False)
    ids_v2 = torch.argsort(torch.argsort(mask.to(torch.uint8), dim=1, stable=True), dim=1)
    M = (L - TK) // 2
    keep = torch.argsort(ids_v2, dim=1)[:, TK : TK + M].sort(dim=1).values
    decode_vis = torch.zeros(B, L, dtype=torch.bool, device=dev).scatter_(1, keep, True)
    v2 = lambda v, t, p: videomae_v2_restore_eager(v, mask, decode_vis, t, p)  # noqa: E731
    provs = _providers(
        "restore_tokens",
        v2,
        v2,
        lambda b: (
            lambda v, t, p: fastvl.ops.restore_tokens(
                v, ids_v2, t, p, decoder_keep=keep, check_indices=False, backend=b
            )
        ),
    )
    _, fu = _modes(provs, (vis, token, dpos))
    nbytes = (2 * B * TK * Cd + 2 * B * M * Cd + L * Cd) * es + B * (L + M) * 8
    yield Case("restore_tokens", "full", "tokens", B * L, fu, {**cfg, "C": Cd, "decoder_keep": M}, 2 * nbytes)

    # masked_patch_loss: VideoMAE-B (pred at the masked patches, per-channel targets from un-normalised pixels)
    frames = 2 * T
    video = torch.randn(B, frames, 3, side, side, device=dev)
    P = T * (side // 16) ** 2
    pmask = torch.ones(B, P, dtype=torch.bool, device=dev)
    pmask.scatter_(1, torch.argsort(torch.rand(B, P, device=dev), dim=1)[:, : T * K], False)
    R = P - T * K
    pred = torch.randn(B, R, 1536, device=dev, dtype=dtype, requires_grad=True)
    kw = {"patch": 16, "tubelet": 2, "norm_pix": "channel", "unnormalize": IMAGENET}
    vm = lambda p: videomae_loss_eager(p, video, pmask, 16, 2)  # noqa: E731
    provs = _providers(
        "masked_patch_loss", vm, vm, lambda b: lambda p: fastvl.ops.masked_patch_loss(p, video, pmask, backend=b, **kw)
    )
    fw, fu = _modes(provs, (pred,))
    nbytes = B * R * 1536 * (4 + es)  # the masked patches of the clip (fp32) and pred, once
    lcfg = {
        "B": B,
        "frames": frames,
        "side": side,
        "patch": 16,
        "tubelet": 2,
        "norm_pix": "channel",
        "dtype": str(dtype),
    }
    yield Case("masked_patch_loss", "fwd", "patches", B * P, fw, {**lcfg, "rows": "masked"}, nbytes)
    yield Case(
        "masked_patch_loss", "full", "patches", B * P, fu, {**lcfg, "rows": "masked"}, 2 * nbytes + B * R * 1536 * es
    )
    # MAE-B images: pred at every patch, 75% masked, norm_pix_loss
    Bi = 4 * B
    imgs = torch.randn(Bi, 3, side, side, device=dev)
    Pi = (side // 16) ** 2
    imask = (torch.rand(Bi, Pi, device=dev) < 0.75).to(dtype)
    ipred = torch.randn(Bi, Pi, 768, device=dev, dtype=dtype, requires_grad=True)
    mae = lambda p: mae_loss_eager(p, imgs, imask, 16)  # noqa: E731
    clip = imgs[:, None]
    provs = _providers(
        "masked_patch_loss",
        mae,
        mae,
        lambda b: lambda p: fastvl.ops.masked_patch_loss(p, clip, imask, patch=16, backend=b),
    )
    _, fu = _modes(provs, (ipred,))
    nbytes = 2 * (Bi * Pi * 3 // 4) * 768 * (4 + es) + Bi * Pi * 768 * es  # masked rows read twice, grad written
    icfg = {"B": Bi, "side": side, "patch": 16, "norm_pix": True, "rows": "all", "ratio": 0.75, "dtype": str(dtype)}
    yield Case("masked_patch_loss", "full", "patches", Bi * Pi, fu, icfg, nbytes)


def main(argv: list[str] | None = None) -> int:
    """This family through the suite: ``python -m benchmarks.bench_masking [suite options]``."""
    from .suite import main as suite_main

    return suite_main(["--ops", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
