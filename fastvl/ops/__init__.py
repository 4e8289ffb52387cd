"""Functional ops. Each dispatches to a backend (reference / triton / cuda / peers) per call."""

from .contrastive import clip_loss, mil_nce_loss, siglip_loss
from .roll import temporal_token_roll
from .tokens import drop_tokens, gather_tokens, random_masking

__all__ = ["drop_tokens", "gather_tokens", "random_masking", "temporal_token_roll"]
__all__ += ["clip_loss", "mil_nce_loss", "siglip_loss"]
