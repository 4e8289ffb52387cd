"""Checkpoints: model weights as safetensors + optimizer/scheduler/RNG/data-position state, written atomically.

Layout: ``run_dir/ckpt-{step:07d}/{model.safetensors, state.pt}`` and ``run_dir/latest`` naming the newest.
A checkpoint directory is first written as ``.tmp-...`` and renamed when complete; ``latest`` is replaced
with ``os.replace``, so a crash never leaves a half-written checkpoint behind the pointer. A checkpoint
with non-finite weights is refused.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def weights_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in unwrap(model).parameters()]
    return bool(torch.stack(flags).all()) if flags else True


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
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. Returns its directory."""
    if not weights_finite(model):
        raise RuntimeError(f"refusing to write checkpoint at step {step}: the model has non-finite weights")
    name = f"ckpt-{step:07d}"
    final = os.path.join(run_dir, name)
    tmp = os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(unwrap(model), os.path.join(tmp, "model.safetensors"))
    state = {"step": step, "rng": rng_state(), **(extra or {})}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ptr_tmp = os.path.join(run_dir, f".latest-{os.getpid()}")
    with open(ptr_tmp, "w") as f:
        f.write(name + "\n")
    os.replace(ptr_tmp, os.path.join(run_dir, "latest"))
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


def latest(run_dir: str) -> str | None:
    """Directory of the newest complete checkpoint in ``run_dir``, or None."""
    ptr = os.path.join(run_dir, "latest")
    if not os.path.exists(ptr):
        return None
    with open(ptr) as f:
        path = os.path.join(run_dir, f.read().strip())
    return path if os.path.exists(os.path.join(path, "state.pt")) else None


def load(
    path: str, model: torch.nn.Module, optimizer=None, scheduler=None, *, restore_rng: bool = True, map_location="cpu"
) -> dict[str, Any]:
    """Load weights (and optimizer/scheduler/RNG state when given) from a checkpoint directory."""
    missing, unexpected = load_model(unwrap(model), os.path.join(path, "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not m.endswith("_buffer")]:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state = torch.load(os.path.join(path, "state.pt"), map_location=map_location, weights_only=False)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state
