"""Drop-in modules over fastvl.ops."""

from .attention import Attention
from .layer_norm import LayerNorm
from .timm import patch_timm_vit
from .tokens import DropToken, MaskSampler, TemporalTokenRoll

__all__ = ["DropToken", "MaskSampler", "TemporalTokenRoll"]
__all__ += ["Attention", "LayerNorm", "patch_timm_vit"]
