"""Shared pieces of the models: base class, initialisation, batch checks (clear errors naming the key)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Sin-cos table (n, dim) of positions 0..n-1 (Transformer / MAE convention: sines then cosines,
    frequencies 1 / 10000^(2i/dim)); dim must be even."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    a = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Sin-cos table (grid * grid, dim) of a row-major patch grid: half the channels for the row,
    half for the column (MAE); dim must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    row = sincos_1d(grid, dim // 2)[:, None].expand(grid, grid, dim // 2)
    col = sincos_1d(grid, dim // 2)[None].expand(grid, grid, dim // 2)
    return torch.cat([row, col], dim=2).reshape(grid * grid, dim)


class VLModel(nn.Module):
    """Base of AllInOne / VATT / MAC: ``backend`` handling, parameter counts, weight init."""

    name = "model"

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def set_backend(self, backend: str | None) -> None:
        """Route every op of the model (attention, LayerNorm, token ops, losses) to ``backend``."""
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend

    def num_params(self, exclude: tuple[str, ...] = ()) -> int:
        """Number of parameters, leaving out those whose name starts with one of ``exclude``."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(exclude))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def rng_device(generator: torch.Generator | None, device) -> torch.device:
    """Where random draws happen: the generator's device if one is given, else the data's device."""
    return generator.device if generator is not None else torch.device(device)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class BatchChecker:
    """Checks of one model's batch dict; every error names the key, what it got and what was expected."""

    def __init__(self, model: str, batch: Any):
        self.model = model
        if not isinstance(batch, Mapping):
            raise TypeError(f"{model}: the batch must be a dict of tensors, got {type(batch).__name__}")
        self.batch = batch
        self.B: int | None = None

    def fail(self, key: str, what: str, exc=ValueError):
        raise exc(f"{self.model}: batch[{key!r}] {what}")

    def get(self, key: str, *, ndim: int, layout: str, dtypes, required: bool = True) -> torch.Tensor | None:
        if key not in self.batch or self.batch[key] is None:
            if required:
                raise ValueError(
                    f"{self.model}: the batch has no {key!r} (expected a tensor {layout}); keys present: "
                    f"{', '.join(sorted(map(str, self.batch))) or 'none'}"
                )
            return None
        x = self.batch[key]
        if not isinstance(x, torch.Tensor):
            self.fail(key, f"must be a torch.Tensor {layout}, got {type(x).__name__}", TypeError)
        if x.dim() != ndim:
            self.fail(key, f"must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            self.fail(key, f"must have dtype in ({names}), got {x.dtype}", TypeError)
        if self.B is None:
            self.B = x.shape[0]
        elif x.shape[0] != self.B:
            self.fail(key, f"has batch size {x.shape[0]}, other keys have {self.B} (shape {tuple(x.shape)})")
        return x

    def video(self, key: str, *, channels: int = 3) -> torch.Tensor:
        v = self.get(key, ndim=5, layout="(B, T, 3, H, W)", dtypes=FLOAT_DTYPES)
        if v.shape[2] != channels:
            self.fail(key, f"must be (B, T, {channels}, H, W) (channels third), got shape {tuple(v.shape)}")
        return v

    def check_spatial(self, key: str, v: torch.Tensor, patch: int, max_hw: int) -> tuple[int, int]:
        H, W = v.shape[-2:]
        if H % patch or W % patch:
            self.fail(key, f"has frames of {H}x{W}, not divisible by the patch size {patch}")
        if H > max_hw or W > max_hw:
            self.fail(key, f"has frames of {H}x{W}, larger than the position table ({max_hw}x{max_hw} pixels)")
        return H // patch, W // patch

    def text(
        self, ids_key: str, mask_key: str, max_len: int, vocab_size: int, ndim: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = "(B, Lt)" if ndim == 2 else "(B, P, Lt)"
        ids = self.get(ids_key, ndim=ndim, layout=layout, dtypes=(torch.int64, torch.int32))
        mask = self.get(mask_key, ndim=ndim, layout=layout + " True = real token", dtypes=(torch.bool,))
        if mask.shape != ids.shape:
            self.fail(
                mask_key, f"must have the shape of batch[{ids_key!r}] {tuple(ids.shape)}, got {tuple(mask.shape)}"
            )
        if ids.shape[-1] > max_len:
            self.fail(ids_key, f"has {ids.shape[-1]} tokens, longer than the text position table ({max_len})")
        if ids.shape[-1] < 1:
            self.fail(ids_key, "has no tokens")
        if ids.device.type != "meta" and ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size:
                self.fail(ids_key, f"has token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")
        return ids.long(), mask
