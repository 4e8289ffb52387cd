"""Swap a timm VisionTransformer's attention and LayerNorm modules for fastvl's, in place."""

from __future__ import annotations

import importlib

from torch import nn

from .attention import Attention
from .layer_norm import LayerNorm


def _timm_attention_classes() -> tuple[type, ...]:
    classes = []
    for mod in ("timm.layers", "timm.models.vision_transformer"):  # where timm 1.x / 0.9 keep ViT's Attention
        try:
            classes.append(importlib.import_module(mod).Attention)
        except (ImportError, AttributeError):  # timm absent (nothing of its kind can be in the model) or moved
            pass
    return tuple(classes)


def _is_timm_attention(m: nn.Module) -> bool:
    return type(m) in _timm_attention_classes()


def _layer_norm_from(m: nn.LayerNorm, backend: str | None) -> LayerNorm:
    new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=False, bias=False, backend=backend)
    new.elementwise_affine = m.elementwise_affine
    new.weight, new.bias = m.weight, m.bias  # the same Parameter objects: optimizers keep working
    return new


def patch_timm_vit(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace, in place, every timm ``Attention`` with :class:`fastvl.nn.Attention` and every
    ``nn.LayerNorm`` (timm's ``LayerNorm`` included) with :class:`fastvl.nn.LayerNorm`, sharing the
    original parameters (weights kept, same state-dict keys). Returns ``model``.

    Works on ``timm.models.vision_transformer.VisionTransformer`` and anything built from timm's ``Block``;
    other attention classes (rope, parallel blocks) are left as they are.
    """
    # norms first (q_norm / k_norm live inside the attention modules), then the attention modules
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm) and not isinstance(child, LayerNorm):
                setattr(parent, name, _layer_norm_from(child, backend))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_timm_attention(child):
                setattr(parent, name, Attention.from_timm(child, backend=backend))
    return model
