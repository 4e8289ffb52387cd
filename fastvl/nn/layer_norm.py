"""LayerNorm module over fastvl.ops.layer_norm, state-dict compatible with torch.nn.LayerNorm."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvl import ops


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same parameters and state dict) with fastvl's kernel and a fused residual.

    ``forward(x)`` returns ``LN(x)``; ``forward(x, residual)`` returns ``(LN(x + residual), x + residual)``
    (pre-norm blocks). Statistics in fp32, output in x's dtype. Several trailing ``normalized_shape``
    dims are normalised together, as in torch.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | torch.Size,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        nd = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - nd :]) != tuple(self.normalized_shape):
            raise ValueError(
                f"LayerNorm: input shape {tuple(x.shape)} does not end with normalized_shape "
                f"{tuple(self.normalized_shape)}"
            )
        w = self.weight.reshape(-1) if self.weight is not None else None
        b = self.bias.reshape(-1) if self.bias is not None else None
        if nd > 1:  # LN over several trailing dims = LN over them flattened
            flat = x.shape[: x.dim() - nd] + (math.prod(self.normalized_shape),)
            out = ops.layer_norm(
                x.reshape(flat), w, b, self.eps, residual.reshape(flat) if residual is not None else None,
                backend=self.backend,
            )  # fmt: skip
            if residual is None:
                return out.reshape(x.shape)
            return out[0].reshape(x.shape), out[1].reshape(x.shape)
        return ops.layer_norm(x, w, b, self.eps, residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend else "")
