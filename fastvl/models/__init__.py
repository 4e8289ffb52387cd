"""Models: All-in-one, VATT, MAC, SimVTP and VideoMAE on fastvl's ops, one shared pre-norm block, a registry by name.

``create_model(name, **overrides)`` builds one (``list_models()`` names them); ``describe(name)`` prints its
parameters and forward FLOPs beside the papers' figures (also ``fastvl info --model NAME``).
"""

from .allinone import AllInOne, AllInOneConfig
from .blocks import Block, Encoder, Roll
from .mac import MAC, MACConfig
from .registry import (
    REDUCTION_PRESETS,
    config_fields,
    create_model,
    describe,
    example_batch,
    list_models,
    model_stats,
    reduction_presets,
    train_forward_flops,
)
from .simvtp import SimVTP, SimVTPConfig
from .vatt import VATT, VATTConfig
from .videomae import VideoMAE, VideoMAEConfig

__all__ = [
    "MAC",
    "REDUCTION_PRESETS",
    "VATT",
    "AllInOne",
    "AllInOneConfig",
    "Block",
    "Encoder",
    "MACConfig",
    "Roll",
    "SimVTP",
    "SimVTPConfig",
    "VATTConfig",
    "VideoMAE",
    "VideoMAEConfig",
    "config_fields",
    "create_model",
    "describe",
    "example_batch",
    "list_models",
    "model_stats",
    "reduction_presets",
    "train_forward_flops",
]
