"""fastvl: fused kernels, drop-in modules and models for fast video-language pretraining."""

from fastvl import nn, ops
from fastvl.backends import BackendError, explain, use_backend
from fastvl.nn.timm import patch_timm_vit

__version__ = "0.1.0"

__all__ = ["BackendError", "__version__", "explain", "nn", "ops", "use_backend"]
__all__ += ["patch_timm_vit"]


def __getattr__(name: str):
    """``fastvl.models``, ``fastvl.data`` and ``fastvl.train`` load on first use (they pull in more than ops)."""
    if name in ("data", "models", "train"):
        import importlib

        return importlib.import_module(f"fastvl.{name}")
    raise AttributeError(f"module 'fastvl' has no attribute {name!r}")
