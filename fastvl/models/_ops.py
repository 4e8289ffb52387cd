"""The models' single point of contact with attention, LayerNorm, roll offsets and contrastive losses.

Attention, LayerNorm and the roll offsets are fastvl's own ops and modules. The contrastive losses are
fastvl's too, made distributed-aware here: when ``torch.distributed`` is initialised with more than one
rank they go through ``fastvl.nn.ClipLoss(gather_with_grad=True)`` / ``fastvl.nn.MILNCELoss``, so every
rank computes the global-batch loss and, after DDP's gradient averaging, N ranks train exactly like one
process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastvl import nn as _nn
from fastvl import ops as _ops
from fastvl.nn import Attention, LayerNorm
from fastvl.ops import flash_attention, layer_norm, roll_frame_offsets

__all__ = [
    "Attention",
    "LayerNorm",
    "clip_loss",
    "flash_attention",
    "layer_norm",
    "mil_nce_loss",
    "roll_frame_offsets",
]


def _world() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale, *, backend: str | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (all ranks) on L2-normalised ``a, b (B, D)``."""
    w = _world()
    if w is None:
        return _ops.clip_loss(a, b, logit_scale, backend=backend)
    return _nn.ClipLoss(gather_with_grad=True, rank=w[0], world_size=w[1], backend=backend)(a, b, logit_scale)


def mil_nce_loss(
    video: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    valid: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """VATT's MIL-NCE over the global batch: ``video (B, D)``, ``text (B, P, D)``, ``valid (B,)``."""
    w = _world()
    if w is None:
        return _ops.mil_nce_loss(video, text, logit_scale, valid, backend=backend)
    return _nn.MILNCELoss(rank=w[0], world_size=w[1], backend=backend)(video, text, logit_scale, valid)
