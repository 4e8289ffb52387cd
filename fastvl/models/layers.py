"""The models' one point of contact with fastvl's ops and modules: attention, LayerNorm, the token ops, the roll
offsets, the contrastive losses and the vocabulary loss (linear cross-entropy) all reach the models through this
module.

The contrastive losses are made distributed-aware here: when ``torch.distributed`` is initialised with more
than one rank they go through ``fastvl.nn.ClipLoss(gather_with_grad=True)`` / ``fastvl.nn.MILNCELoss``, so
every rank computes the global-batch loss and, after DDP's gradient averaging, N ranks train exactly like one
process on the global batch.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from fastvl import nn, ops
from fastvl.nn import Attention, LayerNorm
from fastvl.ops import (
    drop_tokens,
    flash_attention,
    gather_tokens,
    layer_norm,
    linear_cross_entropy,
    masked_patch_loss,
    random_masking,
    restore_tokens,
    roll_frame_offsets,
    temporal_token_roll,
    tube_masking,
)

__all__ = [
    "Attention",
    "LayerNorm",
    "clip_loss",
    "drop_tokens",
    "flash_attention",
    "gather_tokens",
    "layer_norm",
    "linear_cross_entropy",
    "masked_patch_loss",
    "mil_nce_loss",
    "random_masking",
    "restore_tokens",
    "roll_frame_offsets",
    "temporal_token_roll",
    "tube_masking",
]


def _world() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


@functools.cache
def _global_clip_loss(rank: int, world_size: int, backend: str | None) -> nn.ClipLoss:
    return nn.ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size, backend=backend)


@functools.cache
def _global_mil_nce_loss(rank: int, world_size: int, backend: str | None) -> nn.MILNCELoss:
    return nn.MILNCELoss(rank=rank, world_size=world_size, backend=backend)


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (all ranks) on L2-normalised ``a, b (B, D)``."""
    w = _world()
    if w is None:
        return ops.clip_loss(a, b, logit_scale, backend=backend)
    return _global_clip_loss(*w, backend)(a, b, logit_scale)


def mil_nce_loss(
    video: torch.Tensor, text: torch.Tensor, logit_scale, valid: torch.Tensor | None = None, *,
    backend: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """VATT's MIL-NCE over the global batch: ``video (B, D)``, ``text (B, P, D)``, ``valid (B,)``."""
    w = _world()
    if w is None:
        return ops.mil_nce_loss(video, text, logit_scale, valid, backend=backend)
    return _global_mil_nce_loss(*w, backend)(video, text, logit_scale, valid)
