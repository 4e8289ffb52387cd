"""How a model is spread over ranks: one process, DDP (a full replica per rank, gradients all-reduced) or
FSDP2 (``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state sharded, each
transformer block gathered just in time), with optional activation checkpointing per block."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from .distributed import DistInfo

# methods that evaluation calls instead of forward; under FSDP they must gather the parameters like forward
EVAL_METHODS = ("encode_video", "encode_text", "vtm_logits")


@dataclasses.dataclass
class ParallelModel:
    """``module``: the model the optimizer and checkpoints see (sharded in place under FSDP); ``step_module``:
    what a training step calls (the DDP wrapper, compiled when asked); ``mode``: single | ddp | fsdp."""

    module: torch.nn.Module
    step_module: torch.nn.Module
    mode: str
    ddp: torch.nn.parallel.DistributedDataParallel | None = None

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def gradient_sync(self, enabled: bool):
        """Context for one micro-batch: gradients are reduced across ranks only when ``enabled`` (the last
        micro-batch of an accumulated step)."""
        if self.ddp is not None and not enabled:
            return self.ddp.no_sync()
        if self.mode == "fsdp":
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks (:class:`fastvl.models.blocks.Block`): the units FSDP gathers one at a
    time and activation checkpointing recomputes."""
    from fastvl.models.blocks import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def checkpointed_forward(forward, *args, **kwargs):
    """``forward`` under non-reentrant activation checkpointing (the RNG state is replayed, so dropout in the
    recomputation draws what the first pass drew)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Keep only each block's inputs in the forward pass and recompute its activations in the backward pass.
    Returns the number of blocks; the state dict is unchanged (the forward method is wrapped in place)."""
    blocks = transformer_blocks(model)
    for blk in blocks:
        blk.forward = functools.partial(checkpointed_forward, blk.forward)
    return len(blocks)


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Every rank's parameters and buffers := rank 0's (ranks seed their RNG apart, so their inits differ)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def parallelize(
    model: torch.nn.Module,
    info: DistInfo,
    *,
    fsdp: bool = False,
    grad_ckpt: bool = False,
    compile: bool = False,
    find_unused_parameters: bool = False,
) -> ParallelModel:
    """Move ``model`` to the rank's device and wrap it (single process, DDP, or FSDP2 per block then root)."""
    model = model.to(info.device)
    if grad_ckpt and enable_activation_checkpointing(model) == 0:
        raise ValueError("--grad-ckpt: the model has no transformer blocks to checkpoint")
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if not info.enabled:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        broadcast_from_rank0(model)  # DDP does this itself; each rank's shard must come from the same weights
        for blk in transformer_blocks(model):
            fully_shard(blk)
        fully_shard(model)
        for name in EVAL_METHODS:
            if hasattr(model, name):
                register_fsdp_forward_method(model, name)
        step_module, mode, ddp = model, "fsdp", None
    elif info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
        step_module, mode = ddp, "ddp"
    else:
        step_module, mode, ddp = model, "single", None
    if compile:
        step_module = torch.compile(step_module)
    return ParallelModel(model, step_module, mode, ddp)
