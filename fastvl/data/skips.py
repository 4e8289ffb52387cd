"""Counting unusable videos across DataLoader worker processes: one shared-memory slot per worker."""

from __future__ import annotations

import torch

MAX_WORKERS = 256  # slots of the shared counter; workers beyond share slots modulo this (counts stay exact)
KINDS = ("skipped", "missing_audio")


def worker_slot() -> int:
    """0 in the main process, 1 + worker id (modulo the slots) in a DataLoader worker."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (MAX_WORKERS - 1)


class SkipCounter:
    """Per-kind counts (``skipped``: videos replaced because they could not be decoded; ``missing_audio``:
    items without an audio track, given zeros) summed over the worker processes that share this object."""

    def __init__(self):
        self.counts = torch.zeros(len(KINDS), MAX_WORKERS, dtype=torch.int64).share_memory_()

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[KINDS.index(kind), worker_slot()] += n

    def total(self, kind: str) -> int:
        return int(self.counts[KINDS.index(kind)].sum())
