"""Pretraining: loop, checkpoints, distributed setup (DDP, FSDP2), retrieval evaluation, the supervised motion
probe."""

from .loop import Components, NonFiniteLoss, TrainConfig, train
from .retrieval import chance_levels, retrieval_metrics

__all__ = ["Components", "NonFiniteLoss", "TrainConfig", "chance_levels", "retrieval_metrics", "train"]
