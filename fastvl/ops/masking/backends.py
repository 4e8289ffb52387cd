"""Masked video modeling backends: adapters, declared capabilities, registration, the example calls.

Three registry ops, roles ``forward`` and ``backward``:
  ``tube_masking``       forward(x, num_frames, tube, K, seed, noise, pos, mask_dtype) -> (visible, mask, ids_restore)
                         backward(grad, ids_restore, num_frames, pos_rows, need_x, need_pos) -> (grad x, grad pos)
  ``restore_tokens``     forward(visible, ids_restore, mask_token, pos, keep) -> out
                         backward(grad, ids_restore, K, keep, need_visible, need_token, need_pos) -> 3 gradients
  ``masked_patch_loss``  forward(pred, video, mask, idx, count, patch, tubelet, norm, affine) -> 0-d loss
                         backward(grad, pred, video, mask, idx, count, patch, tubelet, norm, affine) -> grad pred
Features named in calls: ``noise``, ``pos``, ``decoder_keep``, ``patch_index``, ``unnormalize``; every backend
serves all of them. No FLOPs to count: FlopCounterMode counts none for the reference's gathers, concatenations
and elementwise statistics, so the custom ops register none and a model counts alike on either path.
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import Capabilities, KernelConstant, Limit, triton_kernel

from .reference import (
    keep_inverse,
    masked_patch_loss_reference,
    masked_patch_loss_reference_backward,
    restore_reference,
    restore_reference_backward,
    tube_masking_reference,
    tube_masking_reference_backward,
)

TUBE, RESTORE, LOSS = "tube_masking", "restore_tokens", "masked_patch_loss"
KERNELS = "fastvl.kernels.masking"


def patch_pixels(patch: int, tubelet: int) -> int:
    """The pixels of the loss kernel's on-chip patch tile: tubelet * patch * patch, each rounded up to a power of 2."""
    return (1 << (tubelet - 1).bit_length()) * (1 << (patch - 1).bit_length()) ** 2


def tube_masking_triton(x, num_frames, tube, K, seed, noise, pos, mask_dtype):
    """Pairwise ranks of Philox (or noise) keys per tube, kept rows copied (+pos), one launch."""
    from fastvl.kernels.masking import tube_mask

    return tube_mask(x, num_frames, tube, K, seed=seed, noise=noise, pos=pos, mask_dtype=mask_dtype)


def tube_masking_triton_backward(grad, ids_restore, num_frames, pos_rows, need_x, need_pos):
    from fastvl.kernels.masking import restore

    B, L, C = grad.shape[0], ids_restore.shape[1], grad.shape[2]
    gx, gpos = restore(grad, ids_restore, colsum=need_pos)
    if gpos is not None and pos_rows != L:
        gpos = gpos.reshape(num_frames, L // num_frames, C).sum(0)
    return gx.reshape(B * num_frames, L // num_frames, C), gpos


def restore_triton(visible, ids_restore, mask_token, pos, keep):
    """Unshuffle + mask token + positions in one launch, batch walked per tile."""
    from fastvl.kernels.masking import restore, restore_keep

    if keep is None:
        return restore(visible, ids_restore, mask_token, pos)[0]
    return restore_keep(visible, ids_restore, keep, mask_token, pos)


def restore_triton_backward(grad, ids_restore, K, keep, need_visible, need_token, need_pos):
    from fastvl.kernels.masking import restore_backward

    inv = keep_inverse(keep, ids_restore.shape[1]) if keep is not None else None
    return restore_backward(
        grad, ids_restore, K, inv, need_visible=need_visible, need_token=need_token, need_pos=need_pos
    )


def masked_patch_loss_triton(pred, video, mask, idx, count, patch, tubelet, norm, affine):
    """Patch gathered, normalised and compared on chip; the backward recomputes the target."""
    from fastvl.kernels.masking import patch_loss

    rows = patch_loss(pred, video, mask, idx, count, patch=patch, tubelet=tubelet, norm=norm, affine=tuple(affine))
    return rows.sum() / count


def masked_patch_loss_triton_backward(grad, pred, video, mask, idx, count, patch, tubelet, norm, affine):
    from fastvl.kernels.masking import patch_loss

    return patch_loss(
        pred, video, mask, idx, count, patch=patch, tubelet=tubelet, norm=norm, affine=tuple(affine), grad=grad
    )


TUBE_TRITON = triton_kernel(
    dtype_args=("x",),
    limits=(Limit("N", "tokens per frame N", KernelConstant(KERNELS, "MAX_TOKENS"), why="indices packed in 20 bits"),),
    features=frozenset({"noise", "pos"}),
)
RESTORE_TRITON = triton_kernel(dtype_args=("visible",), features=frozenset({"pos", "decoder_keep"}))
LOSS_TRITON = triton_kernel(
    dtype_args=("pred", "video"),
    limits=(
        Limit(
            "patch_pixels",
            "patch tile tubelet*patch*patch (powers of 2)",
            KernelConstant(KERNELS, "MAX_PATCH_PIXELS"),
            why="one patch is held on chip",
        ),
    ),
    features=frozenset({"patch_index", "unnormalize"}),
)

# (op, the Triton declaration, reference forward / backward and what it transcribes, Triton forward / backward)
_FAMILY = (
    (TUBE, TUBE_TRITON, tube_masking_reference, tube_masking_reference_backward,
     "torch.rand + argsort per tube + gather (VideoMAE's TubeMaskingGenerator, MAE's gather)",
     tube_masking_triton, tube_masking_triton_backward),
    (RESTORE, RESTORE_TRITON, restore_reference, restore_reference_backward,
     "torch.cat + gather + add (MAE's unshuffle; VideoMAE V2's cat)", restore_triton, restore_triton_backward),
    (LOSS, LOSS_TRITON, masked_patch_loss_reference, masked_patch_loss_reference_backward,
     "patchify + normalise + MSE in torch (MAE / VideoMAE)",
     masked_patch_loss_triton, masked_patch_loss_triton_backward),
)  # fmt: skip
for op, triton_caps, ref_forward, ref_backward, ref_description, triton_forward, triton_backward in _FAMILY:
    backends.register(
        op, "reference", 0, Capabilities(features=triton_caps.features),
        forward=ref_forward, backward=ref_backward, description=ref_description,
    )  # fmt: skip
    backends.register(
        op, "triton", 20, triton_caps, requires="triton", forward=triton_forward, backward=triton_backward
    )


# ---- example calls: VideoMAE-B (16 frames, tubelet 2 -> 8 x 196 tokens, encoder 768, decoder 384, ratio 0.9)


def _videomae(small: bool):
    """(B, T token frames, N tokens per frame, encoder C, decoder C, patch, tubelet)."""
    return (2, 4, 13, 8, 12, 4, 2) if small else (64, 8, 196, 768, 384, 16, 2)


def example_tube(device: torch.device, small: bool):
    """VideoMAE-B's patch tokens (B*8 token frames of 196, width 768, bf16), tube masking at 0.9 over the clip."""
    B, T, N, C, _, _, _ = _videomae(small)
    dtype = torch.float32 if small else torch.bfloat16
    x = (torch.randn if small else torch.empty)(B * T, N, C, dtype=dtype, device=device)
    return TUBE, (x, T, 0.75 if small else 0.9), {"tube": T}


def example_restore(device: torch.device, small: bool, keep: bool = False):
    """VideoMAE-B's decoder input: 10% of 1568 tokens visible, width 384, positions added (bf16)."""
    B, T, N, _, C, _, _ = _videomae(small)
    L = T * N
    K = L // 10 if not small else L // 4
    dtype = torch.float32 if small else torch.bfloat16
    new = torch.randn if small else torch.empty
    ids = torch.argsort(torch.rand(B, L, device=device), dim=1)
    vis, token, pos = new(B, K, C, dtype=dtype, device=device), new(C, device=device), new(L, C, device=device)
    kwargs = {"check_indices": False}
    if keep:  # VideoMAE V2: the decoder sees half of the masked places
        kwargs["decoder_keep"] = torch.argsort(ids, dim=1)[:, K : K + (L - K) // 2]
    return RESTORE, (vis, ids, token, pos), kwargs


def example_loss(device: torch.device, small: bool):
    """VideoMAE-B's loss: 16 frames at 224 px, tubelet 2, patch 16, pred at every patch, 90% masked."""
    B, T, N, _, _, patch, tubelet = _videomae(small)
    side = 8 if small else 224
    frames = T * tubelet if not small else 4
    P = (frames // tubelet) * (side // patch) ** 2
    dtype = torch.float32 if small else torch.bfloat16
    new = torch.randn if small else torch.empty
    video = new(B, frames, 3, side, side, device=device)
    pred = new(B, P, 3 * tubelet * patch * patch, dtype=dtype, device=device)
    mask = torch.rand(B, P, device=device) < 0.9
    mask[:, 0] = True
    return LOSS, (pred, video, mask), {"patch": patch, "tubelet": tubelet}


backends.register_example(TUBE, example_tube)
backends.register_example(RESTORE, example_restore)
backends.register_example(RESTORE, lambda device, small: example_restore(device, small, keep=True))
backends.register_example(LOSS, example_loss)
