"""The spec of LayerNorm with the pre-norm residual add, also its CPU path: torch's native LayerNorm in fp32."""

from __future__ import annotations

import torch

from fastvl.rules import compute_dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual ``(M, C)`` -> ``(y, h, mean, rstd)``: ``h = x + residual`` in x's dtype (empty without a
    residual), y = LayerNorm(h) computed in fp32 (fp64 for fp64), mean/rstd ``(M,)``."""
    h = x + residual if residual is not None else x
    ct = compute_dtype(x.dtype)
    y, mean, rstd = torch.native_layer_norm(h.to(ct), (x.shape[-1],), _cast(weight, ct), _cast(bias, ct), eps)
    hs = h if residual is not None else x.new_empty(0)
    return y.to(x.dtype), hs, mean.reshape(-1).float(), rstd.reshape(-1).float()


def layer_norm_reference_backward(
    dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``dx = rstd * (w dy - mean(w dy) - xhat * mean(xhat * w dy)) + dh``, ``dw = sum(dy * xhat)``,
    ``db = sum(dy)`` over rows (torch's native LayerNorm backward in fp32, fp64 for fp64). Absent gradients
    are empty tensors."""
    ct = compute_dtype(x.dtype)
    wdtype = weight.dtype if weight is not None else x.dtype
    dyf = dy.to(ct)
    dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
        dyf, x.to(ct), [x.shape[-1]], mean.to(ct)[:, None], rstd.to(ct)[:, None], _cast(weight, ct), None,
        [True, need_dw, False],
    )  # fmt: skip
    if dh is not None:
        dx = dx + dh.to(ct)
    dw = dw.to(wdtype) if need_dw else x.new_empty(0)
    db = dyf.sum(0).to(wdtype) if need_db else x.new_empty(0)
    return dx.to(x.dtype), dw, db
