"""Drop-in modules over fastvl.ops."""

from .contrastive import ClipLoss, MILNCELoss, SigLipLoss
from .tokens import DropToken, MaskSampler, TemporalTokenRoll

__all__ = ["DropToken", "MaskSampler", "TemporalTokenRoll"]
__all__ += ["ClipLoss", "MILNCELoss", "SigLipLoss"]
