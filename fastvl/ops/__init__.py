"""Functional ops. Each dispatches to a backend (reference / triton / cuda / peers) per call."""

from .roll import temporal_token_roll
from .tokens import drop_tokens, gather_tokens, random_masking

__all__ = ["drop_tokens", "gather_tokens", "random_masking", "temporal_token_roll"]
