"""The spec of the token ops (gather / its scatter-add backward / the random draw), also their CPU path."""

from __future__ import annotations

import torch

MODE_MASK = 0  # the draw also returns the (rows, L) mask (1 = removed)
MODE_DROP = 1  # kept indices and inverse map only


def gather_reference(
    x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None, n_valid: int | None = None
) -> torch.Tensor:
    """out[b, j] = x[b, idx[b, j]] (+ pos[idx[b, j]]) for 0 <= idx < n_valid (default L), else 0."""
    B, L, C = x.shape
    idx = idx.long().expand(B, -1)
    n_valid = L if n_valid is None else n_valid
    valid = (idx >= 0) & (idx < n_valid)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    out = torch.gather(x, 1, safe[..., None].expand(B, idx.shape[1], C))
    if pos is not None:
        out = out + pos[safe]
    if n_valid < L or not bool(valid.all()):
        out = out * valid[..., None].to(out.dtype)
    return out.contiguous()


def scatter_reference(grad: torch.Tensor, idx: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L, C) zeros with out[b, idx[b, j]] += grad[b, j]; fp32 accumulation, duplicates summed.

    Indices outside [0, L) take nothing (the forward gathered zeros for them): their gradient is dropped."""
    B, J, C = grad.shape
    idx = idx.long().expand(B, J)
    idx = torch.where((idx >= 0) & (idx < L), idx, L)
    ct = torch.float64 if grad.dtype == torch.float64 else torch.float32
    acc = torch.zeros(B, L + 1, C, dtype=ct, device=grad.device)
    acc.scatter_add_(1, idx[..., None].expand(B, J, C), grad.to(ct))
    return acc[:, :L].to(grad.dtype).contiguous()


def draw_reference(
    seed: torch.Tensor, noise: torch.Tensor | None, rows: int, L: int, K: int, mode: int, mask_dtype: torch.dtype,
    device: torch.device,
):  # fmt: skip
    """(keep (rows, K), ids_restore (rows, L), mask (rows, L) or (0,)) from argsort(noise, stable=True).

    ``keep = ids_shuffle[:, :K]``; ``ids_restore[l] >= K`` marks a removed token. Without ``noise`` the
    noise is ``torch.rand(rows, L)`` from a generator seeded with ``seed``.
    """
    if noise is None:
        g = torch.Generator(device=device).manual_seed(int(seed.reshape(-1)[0]) & ((1 << 63) - 1))
        noise = torch.rand(rows, L, generator=g, device=device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    keep = ids_shuffle[:, :K].contiguous()
    if mode == MODE_MASK:
        return keep, ids_restore, (ids_restore >= K).to(mask_dtype)
    return keep, ids_restore, torch.empty(0, dtype=mask_dtype, device=device)
