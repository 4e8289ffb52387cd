"""Functional ops. Each dispatches to a backend (reference / triton / cuda / peers) per call."""

from .attention import flash_attention, flash_attention_varlen, roll_frame_offsets
from .layer_norm import layer_norm
from .roll import temporal_token_roll
from .tokens import drop_tokens, gather_tokens, random_masking

__all__ = ["drop_tokens", "gather_tokens", "random_masking", "temporal_token_roll"]
__all__ += ["flash_attention", "flash_attention_varlen", "layer_norm", "roll_frame_offsets"]
