"""Pretraining: loop, checkpoints, distributed setup, retrieval evaluation, the supervised motion probe."""

from .evaluate import retrieval_metrics
from .loop import Components, NonFiniteLoss, TrainConfig, train

__all__ = ["Components", "NonFiniteLoss", "TrainConfig", "retrieval_metrics", "train"]
