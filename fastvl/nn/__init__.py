"""Drop-in modules over fastvl.ops."""

from .tokens import DropToken, MaskSampler, TemporalTokenRoll

__all__ = ["DropToken", "MaskSampler", "TemporalTokenRoll"]
