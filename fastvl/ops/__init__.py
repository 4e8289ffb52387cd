"""Functional ops. Each dispatches to a backend (reference / triton / cuda / peers) per call."""

from .attention import attention_rows, flash_attention, flash_attention_varlen, roll_frame_offsets
from .attention.packed import flash_attention_qkvpacked, flash_attention_varlen_qkvpacked
from .contrastive import clip_loss, mil_nce_loss, siglip_loss
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .masking import masked_patch_loss, restore_tokens, tube_masking
from .merge import MergeInfo, merge_tokens, unmerge_tokens
from .roll import temporal_token_roll
from .select import frame_scores, received_attention, select_space_time, select_tokens
from .tokens import drop_tokens, gather_tokens, random_masking

__all__ = [
    "MergeInfo",
    "attention_rows",
    "clip_loss",
    "drop_tokens",
    "flash_attention",
    "flash_attention_qkvpacked",
    "flash_attention_varlen_qkvpacked",
    "frame_scores",
    "flash_attention_varlen",
    "gather_tokens",
    "layer_norm",
    "linear_cross_entropy",
    "masked_patch_loss",
    "merge_tokens",
    "mil_nce_loss",
    "random_masking",
    "received_attention",
    "restore_tokens",
    "roll_frame_offsets",
    "select_space_time",
    "select_tokens",
    "siglip_loss",
    "temporal_token_roll",
    "tube_masking",
    "unmerge_tokens",
]
