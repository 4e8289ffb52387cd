"""``linear_cross_entropy`` backends: the Triton adapters, declared capabilities, registration, the example
calls and the FLOP formulas.

Roles (the primitives of :mod:`.reference`): ``forward(hidden, weight, bias, targets, ignore_index,
label_smoothing, need_dh) -> (loss, lse, dh_unit)`` and ``backward(hidden, weight, bias, targets, lse,
dh_unit, grad, ignore_index, label_smoothing, need_dh, need_dw, need_db) -> (dh, dW, db)``. Backends:
``reference`` (materialises the (N, V) logits: the spec's memory), ``chunked`` (plain PyTorch over row
chunks, :mod:`.chunked`), ``triton`` (tiles in registers, fp32 accumulation,
:mod:`fastvl.kernels.linear_cross_entropy`).
No optional features: bias, ignore_index and label smoothing are served by all; ``Call.params`` carries
``N`` (rows), ``V`` (vocabulary) and ``D`` (hidden width).
"""

from __future__ import annotations

import torch

from fastvl import backends
from fastvl.backends import Call
from fastvl.capabilities import triton_kernel

from . import chunked
from .reference import absent, lce_backward_reference, lce_forward_reference

OP = "linear_cross_entropy"

AUTO_CHUNKED_MIN_ELEMS = 1 << 22
"""Under auto, chunked replaces the reference from N * V >= 2^22 logits (137 rows of BERT's 30522 words).
Below it the logits fit in one chunk anyway and the reference's few (N, V) fp32 temporaries (< ~50 MiB) do not
dominate memory; above it they grow with N (4096 rows: 0.5 GB per copy) while chunked holds one chunk."""


def kernel_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets as the kernels take them: int32, -1 on rows without a target."""
    return torch.where(targets != ignore_index, targets, torch.full_like(targets, -1)).to(torch.int32)


def lce_triton(hidden, weight, bias, targets, ignore_index, label_smoothing, need_dh):
    """Fused tiles in registers: online LSE and the gradient to hidden in one pass, dW in a second pass."""
    from fastvl.kernels.linear_cross_entropy import lce_forward

    t = kernel_targets(targets, ignore_index)
    loss, lse, dh = lce_forward(hidden, weight, bias, t, label_smoothing, need_dh)
    return loss, lse, dh if dh is not None else absent(loss)


def lce_backward_triton(
    hidden, weight, bias, targets, lse, dh_unit, grad, ignore_index, label_smoothing, need_dh, need_dw, need_db
):
    from fastvl.kernels.linear_cross_entropy import lce_backward_weight

    t = kernel_targets(targets, ignore_index)
    c = torch.where(t >= 0, grad.float(), torch.zeros((), device=grad.device))
    dh = (c[:, None] * dh_unit).to(hidden.dtype) if need_dh else absent(hidden)
    dw, db = lce_backward_weight(hidden, weight, bias, t, lse, c, label_smoothing, need_dw, need_db)
    return (
        dh,
        dw if dw is not None else absent(weight),
        db if db is not None else absent(weight if bias is None else bias),
    )


def chunked_below_threshold(call: Call) -> list[str]:
    """auto takes chunked from N*V >= AUTO_CHUNKED_MIN_ELEMS logits."""
    if call.explicit:
        return []
    N, V = call.params["N"], call.params["V"]
    if N * V < AUTO_CHUNKED_MIN_ELEMS:  # N may be symbolic under torch.compile: no format spec on it
        return [
            f"{N}x{V} logits are below auto's chunking threshold of {AUTO_CHUNKED_MIN_ELEMS} logits (16 MiB in "
            "fp32): one chunk would hold them all, so the reference is as lean"
        ]
    return []


backends.register(
    OP, "reference", 0, forward=lce_forward_reference, backward=lce_backward_reference,
    description="materialised (N, V) logits (plain PyTorch)",
)  # fmt: skip
backends.register(
    OP, "chunked", 10, check=chunked_below_threshold, forward=chunked.lce_forward_chunked,
    backward=chunked.lce_backward_chunked,
    description="plain PyTorch over row chunks, logits recomputed in backward: one chunk of logits at a time",
)  # fmt: skip
backends.register(
    OP, "triton", 20, triton_kernel(dtype_args=("hidden",)), requires="triton", forward=lce_triton,
    backward=lce_backward_triton,
)  # fmt: skip


def example(device: torch.device, small: bool):
    """All-in-one-B's MLM head: 4096 masked positions, BERT's 30522 words, width 768, bf16; 15% ignored."""
    N, V, D, dtype = (37, 101, 24, torch.float32) if small else (4096, 30522, 768, torch.bfloat16)
    new = torch.randn if small else torch.empty
    hidden = new(N, D, dtype=dtype, device=device)
    weight, bias = new(V, D, dtype=dtype, device=device), new(V, dtype=dtype, device=device)
    targets = torch.randint(0, V, (N,), device=device)
    targets[::7] = -100
    return OP, (hidden, weight, bias, targets), {"label_smoothing": 0.1}


backends.register_example(OP, example)


# FLOPs are counted like the reference's autograd: 2*N*V*D for the logits product, 2*N*V*D per input gradient
# (hidden, weight) in backward (the fused backends' recomputation and their forward-time dh are not counted), so
# reports agree across backends.


def forward_flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * h_shape[0] * w_shape[0] * h_shape[1]


def backward_flops(h_shape, w_shape, b_shape, t_shape, *args, out_shape=None, **kwargs) -> int:
    lse, dh_unit, grad, ignore_index, smoothing, need_dh, need_dw, need_db = args[:8]
    return 2 * h_shape[0] * w_shape[0] * h_shape[1] * (int(need_dh) + int(need_dw))


def register_flops(forward_op, backward_op) -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(forward_op)(forward_flops)
    register_flop_formula(backward_op)(backward_flops)
