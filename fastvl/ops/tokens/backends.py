"""Token op backends: adapters, declared capabilities, registration, the example calls.

Three registry ops:
  ``gather_tokens``  forward ``(x, idx, pos, n_valid, inv=None) -> (B, K, C)`` (``inv``: the exact inverse
                     of a draw's idx, through which the output may be written so pos is read once)
  ``scatter_tokens`` forward ``(grad, idx, inv, L, need_dx, need_pos) -> (dx (B, L, C), dpos (L, C))``, the
                     gather's backward: a copy through the inverse map ``inv`` when given (unique
                     indices), else a sum of repeats
  ``draw_tokens``    forward ``(seed, noise, rows, L, K, mode, mask_dtype, device) -> (keep, ids_restore, mask)``
Outputs not asked for (``need_dx`` / ``need_pos`` false) are empty tensors. No optional features; gathers
and draws have no FLOPs to count.
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.capabilities import TRITON_COPY, Capabilities, Limit
from fastvl.rules import KERNEL_DTYPES

from .reference import MODE_MASK, draw_reference, gather_reference, scatter_reference


def gather_ref(x, idx, pos, n_valid, inv=None):
    """torch.gather."""
    return gather_reference(x, idx, pos, n_valid)


def gather_triton(x, idx, pos, n_valid, inv=None):
    """Row gather, + pos on the fly (written through the inverse map when that reads pos once)."""
    from fastvl.kernels.tokens import gather

    return gather(x, idx, pos, n_valid, inv)


def gather_cuda(x, idx, pos, n_valid, inv=None):
    """16-byte vectorised rows (fastvl._C)."""
    from fastvl import _ext
    from fastvl.kernels.utils import empty

    out = empty((x.shape[0], idx.shape[1], x.shape[2]), x.dtype, x.device)
    _ext.module().gather(x, idx, pos, out, n_valid)
    return out


def _pos_grad(full: torch.Tensor, need_pos: bool) -> torch.Tensor:
    """dpos = dx.sum(0) in fp32 (fp64 for fp64), or an empty tensor."""
    ct = torch.float64 if full.dtype == torch.float64 else torch.float32
    return full.sum(0, dtype=ct).to(full.dtype) if need_pos else full.new_empty(0)


def scatter_ref(grad, idx, inv, L, need_dx, need_pos):
    """torch.scatter_add_ (+ a batch sum for pos)."""
    full = scatter_reference(grad, idx, L)
    return full if need_dx else full.new_empty(0), _pos_grad(full, need_pos)


def scatter_triton(grad, idx, inv, L, need_dx, need_pos):
    """One pass over the gradient: each dx row written once, + the pos gradient; repeats summed in a fixed order."""
    from fastvl.kernels.tokens import gather_backward

    dx, dpos = gather_backward(grad, idx, L, inv, need_dx, need_pos)
    return dx if dx is not None else grad.new_empty(0), dpos if dpos is not None else grad.new_empty(0)


def scatter_cuda(grad, idx, inv, L, need_dx, need_pos):
    """fp32 atomics into a zeroed buffer + a cast (a gather through the inverse map when known), pos a 2nd pass."""
    from fastvl import _ext

    if inv is not None:  # unique indices: a gather through the inverse map (slots >= K give zeros)
        full = gather_cuda(grad, inv, None, idx.shape[1])
    else:
        acc = torch.zeros(grad.shape[0], L, grad.shape[2], dtype=torch.float32, device=grad.device)
        _ext.module().scatter_add(grad, idx, acc)
        full = acc.to(grad.dtype)
    return full if need_dx else full.new_empty(0), _pos_grad(full, need_pos)


def draw_triton(seed, noise, rows, L, K, mode, mask_dtype, device):
    """Philox keys ranked pairwise in tiles, one launch."""
    from fastvl.kernels.tokens import draw

    keep, inv, mask = draw(
        rows, L, K, seed=seed, noise=noise, mask_dtype=mask_dtype if mode == MODE_MASK else None, device=device
    )
    return keep, inv, mask if mask is not None else torch.empty(0, dtype=mask_dtype, device=device)


CUDA_ROWS = Capabilities(
    devices=("cuda",), dtypes=KERNEL_DTYPES, dtype_args=("x", "grad"), unit_stride=("x", "grad", "pos")
)
DRAW_TRITON = Capabilities(
    devices=("cuda",),
    interpreter=True,
    dtypes=(torch.float32,),
    dtype_args=("noise",),
    limits=(Limit("L", "L", (1 << 20) - 1, why="the draw packs token indices in 20 bits"),),
)

backends.register("gather_tokens", "reference", 0, forward=gather_ref, description="torch.gather")
backends.register("gather_tokens", "triton", 20, TRITON_COPY, requires="triton", forward=gather_triton)
backends.register("gather_tokens", "cuda", 30, CUDA_ROWS, requires="fastvl._C", forward=gather_cuda)
backends.register("scatter_tokens", "reference", 0, forward=scatter_ref, description="torch.scatter_add_")
backends.register("scatter_tokens", "triton", 20, TRITON_COPY, requires="triton", forward=scatter_triton)
# below Triton under auto: the Triton backward writes each dx row once and fuses dpos, this one does neither
backends.register("scatter_tokens", "cuda", 10, CUDA_ROWS, requires="fastvl._C", forward=scatter_cuda)
backends.register("draw_tokens", "reference", 0, forward=draw_reference, description="torch.rand + argsort (MAE's)")
backends.register("draw_tokens", "triton", 20, DRAW_TRITON, requires="triton", forward=draw_triton)


def _tokens(device: torch.device, small: bool, requires_grad: bool = False) -> torch.Tensor:
    """VideoMAE-L's patch tokens: 64 clips of 1568 tokens, width 1024 (fp16)."""
    B, L, C = (3, 19, 8) if small else (64, 1568, 1024)
    x = (torch.randn if small else torch.empty)(B, L, C, dtype=torch.float16, device=device)
    return x.requires_grad_(requires_grad)


def example_gather(device: torch.device, small: bool):
    """A quarter of the tokens kept, repeated indices allowed (the backward scatters)."""
    x = _tokens(device, small, requires_grad=True)
    idx = torch.randint(0, x.shape[1], (x.shape[0], x.shape[1] // 4), device=device)
    return "gather_tokens", (x, idx), {}


def example_masking(device: torch.device, small: bool):
    """MAE / VideoMAE masking at ratio 0.75."""
    return "random_masking", (_tokens(device, small), 0.75), {}


backends.register_example("gather_tokens", example_gather)
backends.register_example("scatter_tokens", example_gather)
backends.register_example("draw_tokens", example_masking)
backends.register_example("gather_tokens", lambda device, small: ("drop_tokens", (_tokens(device, small), 0.5), {}))
