"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``.

Convention: 2 FLOPs per multiply-add; every matmul is counted (linear layers, patch-embedding
convolutions, both attention matmuls, the loss logits); elementwise ops, softmax, norms, embedding lookups
and gathers are not. fastvl's custom ops register FLOP formulas so a fused path counts like the reference.
``linear`` below is the part from linear layers and convolutions only (mm/addmm/conv) — what ``thop``
counts (in multiply-adds: divide by 2) — and ``attention`` the batched matmuls (q k^T, p v, losses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

CONVENTION = (
    "torch.utils.flop_counter, 2 FLOPs per multiply-add, every matmul counted (linear, patch embedding, "
    "both attention matmuls, loss logits); elementwise ops, softmax, norms and gathers not counted"
)

_LINEAR_OPS = ("mm", "addmm", "convolution", "_convolution", "conv2d", "conv3d", "linear")


@dataclasses.dataclass
class Flops:
    total: int
    linear: int  # mm / addmm / convolution: linear layers and patch embeddings (thop's scope)
    other: int  # bmm / baddbmm / sdpa / custom ops: attention and loss matmuls

    @property
    def macs(self) -> int:
        return self.total // 2

    @property
    def linear_macs(self) -> int:
        return self.linear // 2


def count(fn: Callable[[], Any]) -> Flops:
    """FLOPs of everything ``fn`` runs (forward, and backward if it calls it)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    counts = fc.get_flop_counts().get("Global", {})
    total = sum(counts.values())
    linear = sum(v for op, v in counts.items() if str(op).split(".")[-1] in _LINEAR_OPS)
    return Flops(total, linear, total - linear)
