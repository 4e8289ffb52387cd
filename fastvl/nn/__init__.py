"""Drop-in modules over fastvl.ops."""

from .attention import Attention
from .contrastive import ClipLoss, MILNCELoss, SigLipLoss
from .layer_norm import LayerNorm
from .merge import TokenMerger
from .select import TokenSelector
from .timm import patch_timm_vit
from .tokens import DropToken, MaskSampler, TemporalTokenRoll

__all__ = [
    "Attention",
    "ClipLoss",
    "DropToken",
    "LayerNorm",
    "MILNCELoss",
    "MaskSampler",
    "SigLipLoss",
    "TemporalTokenRoll",
    "TokenMerger",
    "TokenSelector",
    "patch_timm_vit",
]
