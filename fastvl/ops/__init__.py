"""Functional ops. Each dispatches to a backend (reference / triton / cuda / peers) per call."""

from .attention import flash_attention, flash_attention_varlen, roll_frame_offsets
from .contrastive import clip_loss, mil_nce_loss, siglip_loss
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .roll import temporal_token_roll
from .tokens import drop_tokens, gather_tokens, random_masking

__all__ = [
    "clip_loss",
    "drop_tokens",
    "flash_attention",
    "flash_attention_varlen",
    "gather_tokens",
    "layer_norm",
    "linear_cross_entropy",
    "mil_nce_loss",
    "random_masking",
    "roll_frame_offsets",
    "siglip_loss",
    "temporal_token_roll",
]
