"""Checkpoints: model weights as safetensors (or sharded with ``torch.distributed.checkpoint`` under FSDP) +
optimizer/scheduler/RNG/data-position state, written atomically.

Layout: ``run_dir/ckpt-{step:07d}/`` holds ``state.pt`` (step, RNG of every rank, data position, counters;
and the optimizer and scheduler of an unsharded run), ``model.safetensors`` (full weights: every checkpoint
of an unsharded run, the final one of an FSDP run) and, under FSDP, ``sharded/`` (model and optimizer as
``torch.distributed.checkpoint`` shards, one file per rank: resuming needs no rank to hold the whole model).
``run_dir/latest`` names the newest. A checkpoint is first written as ``.tmp-...`` and renamed when
complete; ``latest`` is replaced with ``os.replace``, so a crash never leaves a half-written checkpoint behind
the pointer. A checkpoint with non-finite weights is refused. ``state.pt`` holds only tensors and plain
Python values and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model

STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
SHARDED_DIR = "sharded"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np_state = st["numpy"]
    has_gauss, cached = st["numpy_gauss"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["name"], keys, np_state["pos"], has_gauss, cached))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether this rank's weights (its shards under FSDP) are all finite."""
    flags = [torch.isfinite(local_tensor(p)).all() for p in unwrap(model).parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def file_mode() -> int:
    """Mode of a new regular file under the process umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def staging_dir(run_dir: str, step: int) -> str:
    """The temporary directory checkpoint ``step`` is written to (the same name on every rank)."""
    return os.path.join(run_dir, f".tmp-{checkpoint_name(step)}")


def write_weights(directory: str, model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None = None) -> None:
    """``model.safetensors`` from the model (or from an already gathered full state dict)."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if full_state is None:
        save_model(unwrap(model), path)
    else:
        save_file({k: v.contiguous() for k, v in full_state.items()}, path)
    os.chmod(path, file_mode())  # safetensors creates it 0600


def publish(run_dir: str, step: int, keep: int) -> str:
    """Rename the staged checkpoint ``step`` into place, point ``latest`` at it, prune to ``keep``."""
    name = checkpoint_name(step)
    final = os.path.join(run_dir, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging_dir(run_dir, step), final)
    ptr_tmp = os.path.join(run_dir, f".latest-{os.getpid()}")
    with open(ptr_tmp, "w") as f:
        f.write(name + "\n")
    os.replace(ptr_tmp, os.path.join(run_dir, "latest"))
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


def save(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    *,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` of an unsharded model atomically; keep the newest ``keep``. Returns its
    directory. (Sharded runs stage with :func:`save_sharded` on every rank, then :func:`write_state` and
    :func:`publish` on rank 0.)"""
    if not weights_finite(model):
        raise RuntimeError(f"refusing to write checkpoint at step {step}: the model has non-finite weights")
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_weights(tmp, model)
    write_state(tmp, step, optimizer, scheduler, extra)
    return publish(run_dir, step, keep)


def write_state(directory: str, step: int, optimizer=None, scheduler=None, extra: dict[str, Any] | None = None):
    """``state.pt``: step, this process's RNG, ``extra``, and the optimizer / scheduler state when given."""
    state = {"step": step, "rng": rng_state(), **(extra or {})}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, os.path.join(directory, STATE_FILE))


def save_sharded(directory: str, model: torch.nn.Module, optimizer) -> None:
    """Every rank writes its shards of the model and optimizer into ``directory/sharded`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(directory, SHARDED_DIR))


def load_sharded(path: str, model: torch.nn.Module, optimizer) -> None:
    """Load ``path/sharded`` into a sharded model and its optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (collective; empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def latest(run_dir: str) -> str | None:
    """Directory of the newest complete checkpoint in ``run_dir``, or None."""
    ptr = os.path.join(run_dir, "latest")
    if not os.path.exists(ptr):
        return None
    with open(ptr) as f:
        path = os.path.join(run_dir, f.read().strip())
    return path if os.path.exists(os.path.join(path, STATE_FILE)) else None


def load_state(path: str, map_location="cpu") -> dict[str, Any]:
    """``state.pt`` of a checkpoint directory (``weights_only=True``: tensors and plain values only)."""
    return torch.load(os.path.join(path, STATE_FILE), map_location=map_location, weights_only=True)


def load_weights(path: str, model: torch.nn.Module) -> None:
    """``model.safetensors`` into the (unsharded) model; raises naming what does not match."""
    if not os.path.exists(os.path.join(path, WEIGHTS_FILE)):
        raise FileNotFoundError(f"checkpoint {path} holds no {WEIGHTS_FILE} (an intermediate sharded checkpoint)")
    missing, unexpected = load_model(unwrap(model), os.path.join(path, WEIGHTS_FILE), strict=False)
    if unexpected or [m for m in missing if not m.endswith("_buffer")]:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load(
    path: str, model: torch.nn.Module, optimizer=None, scheduler=None, *, restore_rng: bool = True, map_location="cpu"
) -> dict[str, Any]:
    """Load weights (and optimizer/scheduler/RNG state when given) from an unsharded checkpoint directory."""
    load_weights(path, model)
    state = load_state(path, map_location)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state
