"""The pretraining loop: AdamW + warmup/cosine, grad accumulation, clipping, bf16 autocast, torch.compile,
DDP or FSDP2 (+ activation checkpointing), atomic checkpoints with exact resume, NaN policy, FLOPs
accounting, metrics JSONL, final retrieval eval.

``train(cfg, build)`` is generic: ``build`` supplies the model, the loaders and the eval data (see
:class:`Components`); ``fastvl.train.pretrain`` wires it to fastvl's models and datasets. The steps of a run:
:func:`setup_optimization`, :func:`resume`, :func:`run_step` (accumulate, clip, NaN policy, update, log,
checkpoint) and :func:`finish` (evaluation, plot, summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed
from .distributed import DistInfo
from .evaluate import evaluate, move_batch
from .parallel import ParallelModel, parallelize
from .retrieval import format_metrics
from .run_log import RunLog
from .schedule import param_groups, warmup_cosine


class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf and the policy is to stop."""


@dataclasses.dataclass
class TrainConfig:
    model: str = "allinone-ti"
    data: str = "synthetic"
    out: str = "runs"
    epochs: float = 1.0
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 16  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of the steps (or an absolute count when >= 1)
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    compile: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard per block) instead of DDP
    grad_ckpt: bool = False  # activation checkpointing per block
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # steps; 0 = only at the end
    keep_ckpts: int = 2
    resume: bool = False
    on_nan: str = "stop"  # stop | skip
    backend: str | None = None
    device: str | None = None
    eval: bool = True
    eval_batch_size: int = 64
    progress: bool = True
    find_unused_parameters: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Components:
    """What a run trains on. ``make_loader(epoch, skip_batches)`` returns an iterable of batches for that
    epoch (deterministic in (seed, epoch, rank)), skipping its first ``skip_batches`` without loading them;
    ``batches_per_epoch`` is its length. ``eval_batches()`` yields evaluation batches with a ``label`` key;
    ``eval_note`` replaces "on N held-out clips" in the printed header when they are not held out.
    ``skipped_videos()`` counts this rank's unreadable videos so far."""

    model: torch.nn.Module
    make_loader: Callable[[int, int], Any]
    batches_per_epoch: int
    eval_batches: Callable[[], Iterator[dict]] | None = None
    samples_per_batch: int = 1
    describe: dict[str, Any] = dataclasses.field(default_factory=dict)
    # () -> (text_ids (NL, Lt), text_mask (NL, Lt), {attribute: (NL,) value index}) for label ids 0..NL-1:
    # the canonical caption of every label, for the attribute probe (synthetic data only)
    label_captions: Callable[[], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] | None = None
    skipped_videos: Callable[[], int] | None = None
    eval_note: str | None = None


@dataclasses.dataclass
class Optimization:
    """The optimizer side of a run: AdamW, its schedule, mixed precision, the step count."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable[[], Any]
    scaler: torch.amp.GradScaler | None
    total_steps: int
    params: list[torch.nn.Parameter]


@dataclasses.dataclass
class Progress:
    """Where a run stands: optimizer steps done, NaN steps skipped, micro-batches consumed, FLOPs per step."""

    step: int = 0
    skipped_steps: int = 0
    consumed: int = 0
    flops_per_step: int | None = None
    last_ckpt_step: int = 0


def amp_context(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, GradScaler or None) for ``cfg.amp`` on ``device``."""
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return contextlib.nullcontext, None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def count_forward_flops(model: torch.nn.Module, batch: dict) -> int:
    """Forward FLOPs of one training-mode step on ``batch`` (FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        # grad stays enabled: under no_grad a view of a parameter (an expanded CLS/AGG token) requires grad
        # without a grad_fn, which FlopCounterMode's module tracker rejects; the graph is dropped right away
        with FlopCounterMode(display=False) as fc:
            model(batch)
        return int(fc.get_total_flops())
    finally:  # counting must not perturb the run's random stream
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class BatchStream:
    """Endless micro-batch stream over epochs with its position (epoch, batch index) for resume."""

    def __init__(self, comp: Components, consumed: int):
        self.comp = comp
        self.epoch, self.index = divmod(consumed, comp.batches_per_epoch)
        self._it = iter(comp.make_loader(self.epoch, self.index))

    @property
    def consumed(self) -> int:
        return self.epoch * self.comp.batches_per_epoch + self.index

    def next(self) -> dict:
        while True:
            try:
                b = next(self._it)
                self.index += 1
                return b
            except StopIteration:
                self.epoch += 1
                self.index = 0
                self._it = iter(self.comp.make_loader(self.epoch, 0))


def setup_optimization(cfg: TrainConfig, info: DistInfo, par: ParallelModel, comp: Components) -> Optimization:
    per_epoch_steps = max(1, comp.batches_per_epoch // cfg.grad_accum)
    total = cfg.steps if cfg.steps is not None else max(1, int(math.ceil(cfg.epochs * per_epoch_steps)))
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else int(cfg.warmup * total)
    fused = info.device.type == "cuda" and not par.sharded
    optimizer = torch.optim.AdamW(
        param_groups(par.module, cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        **({"fused": True} if fused else {}),
    )
    scheduler = warmup_cosine(optimizer, total, warmup, cfg.min_lr_ratio)
    autocast, scaler = amp_context(cfg, info.device)
    params = [p for p in par.module.parameters() if p.requires_grad]
    return Optimization(optimizer, scheduler, autocast, scaler, total, params)


def resume(cfg: TrainConfig, info: DistInfo, par: ParallelModel, opt: Optimization) -> Progress:
    """Progress of the run in ``cfg.out`` from its latest checkpoint (weights, optimizer, schedule, this rank's
    RNG, data position), or a fresh start."""
    path = ckpt.latest(cfg.out)
    if path is None:
        if info.is_main:
            print(f"--resume: no checkpoint in {cfg.out}, starting fresh")
        return Progress()
    if par.sharded:
        ckpt.load_sharded(path, par.module, opt.optimizer)
        state = ckpt.load_state(path)
        opt.scheduler.load_state_dict(state["scheduler"])
    else:
        state = ckpt.load(path, par.module, opt.optimizer, opt.scheduler, restore_rng=False)
    rng = state["rng"]
    if info.enabled and "rank_rng" in state:
        rng = state["rank_rng"][info.rank]
    ckpt.set_rng_state(rng)
    if info.is_main:
        print(f"resumed from {path} at step {state['step']}")
    return Progress(
        step=state["step"],
        skipped_steps=state.get("skipped_steps", 0),
        consumed=state["consumed"],
        flops_per_step=state.get("fwd_flops_per_step"),
        last_ckpt_step=state["step"],
    )


def accumulate_gradients(
    cfg: TrainConfig, info: DistInfo, par: ParallelModel, opt: Optimization, stream: BatchStream, prog: Progress
) -> tuple[dict[str, float], tuple[str, float] | None]:
    """Forward and backward over ``grad_accum`` micro-batches. Returns the mean scalar outputs (loss parts)
    and, when a rank's loss is not finite, ("loss", value) (every rank stops at that micro-batch)."""
    parts: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        batch = move_batch(stream.next(), info.device)
        if prog.flops_per_step is None:
            prog.flops_per_step = count_forward_flops(par.module, batch) * cfg.grad_accum * info.world_size
        with par.gradient_sync(micro == cfg.grad_accum - 1):
            with opt.autocast():
                out = par.step_module(batch)
            loss = out["loss"] / cfg.grad_accum
            if not distributed.all_true(bool(torch.isfinite(loss)), info):
                return parts, ("loss", loss.item())
            (opt.scaler.scale(loss) if opt.scaler else loss).backward()
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                parts[k] = parts.get(k, 0.0) + v.item() / cfg.grad_accum
    return parts, None


def clip_gradients(cfg: TrainConfig, info: DistInfo, opt: Optimization) -> tuple[float, tuple[str, float] | None]:
    """Clip the global gradient norm; returns it, and ("gradient norm", value) when it is not finite on some
    rank (an fp16 scaler handles that itself by skipping the update)."""
    if opt.scaler:
        opt.scaler.unscale_(opt.optimizer)
    limit = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(opt.params, limit))
    ok = distributed.all_true(math.isfinite(grad_norm), info) or opt.scaler is not None
    return grad_norm, None if ok else ("gradient norm", grad_norm)


def handle_nonfinite(cfg, info, opt: Optimization, prog: Progress, log: RunLog, step: int, bad: tuple[str, float]):
    """The NaN policy: stop (raise :class:`NonFiniteLoss` naming the step and the last checkpoint) or skip the
    step (no update; the schedule still advances)."""
    what, value = bad
    msg = f"step {step + 1}: non-finite {what} ({value}); last checkpoint at step {prog.last_ckpt_step}"
    if cfg.on_nan == "stop":
        log.close_bar()
        raise NonFiniteLoss(msg + "; stopping (use --on-nan skip to skip such steps)")
    prog.skipped_steps += 1
    opt.optimizer.zero_grad(set_to_none=True)
    if info.is_main:
        print(f"skipping {msg}")
    opt.scheduler.step()


def apply_update(opt: Optimization) -> None:
    if opt.scaler:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.scheduler.step()


def run_step(cfg, info, par: ParallelModel, opt: Optimization, stream: BatchStream, prog: Progress, log, comp):
    """One optimizer step (micro-batches, clipping, NaN policy, update), then logging and checkpointing."""
    step = prog.step
    opt.optimizer.zero_grad(set_to_none=True)
    parts, bad = accumulate_gradients(cfg, info, par, opt, stream, prog)
    grad_norm = float("nan")
    if bad is None:
        grad_norm, bad = clip_gradients(cfg, info, opt)
    prog.step = step + 1
    if bad is not None:
        handle_nonfinite(cfg, info, opt, prog, log, step, bad)
        return
    apply_update(opt)
    done = prog.step
    log.advance()
    if done % cfg.log_every == 0 or done == opt.total_steps or log.first_step(done):
        videos = distributed.sum_int(comp.skipped_videos(), info) if comp.skipped_videos else 0
        log.record(done, stream.epoch, parts, opt.scheduler.get_last_lr()[0], grad_norm, prog, videos)
    if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == opt.total_steps:
        prog.consumed = stream.consumed
        save_checkpoint(cfg, info, par, opt, prog, final=done == opt.total_steps)
        prog.last_ckpt_step = done


def save_checkpoint(cfg, info, par: ParallelModel, opt: Optimization, prog: Progress, final: bool) -> None:
    """Checkpoint step ``prog.step`` (collective: every rank's RNG; under FSDP every rank writes its shards,
    and the final checkpoint also gathers the full weights for ``fastvl eval``)."""
    extra = {"skipped_steps": prog.skipped_steps, "consumed": prog.consumed, "fwd_flops_per_step": prog.flops_per_step}
    if info.enabled:  # every rank's RNG, so a resumed run continues each rank's random stream
        extra["rank_rng"] = distributed.gather_objects(ckpt.rng_state(), info)
    if not par.sharded:
        if info.is_main:
            ckpt.save(cfg.out, prog.step, par.module, opt.optimizer, opt.scheduler, extra=extra, keep=cfg.keep_ckpts)
        distributed.barrier(info)
        return
    if not distributed.all_true(ckpt.weights_finite(par.module), info):
        raise RuntimeError(f"refusing to write checkpoint at step {prog.step}: the model has non-finite weights")
    tmp = ckpt.staging_dir(cfg.out, prog.step)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    distributed.barrier(info)
    ckpt.save_sharded(tmp, par.module, opt.optimizer)
    full = ckpt.full_state_dict(par.module) if final else None
    if info.is_main:
        if final:
            ckpt.write_weights(tmp, par.module, full)
        ckpt.write_state(tmp, prog.step, None, opt.scheduler, extra)
        ckpt.publish(cfg.out, prog.step, cfg.keep_ckpts)
    distributed.barrier(info)


def finish(cfg, info, par: ParallelModel, opt: Optimization, comp: Components, prog: Progress, log: RunLog) -> dict:
    """Evaluate, then write the plot and ``summary.json`` whether or not evaluation succeeded (an evaluation
    error is recorded in the summary and raised afterwards)."""
    flops = prog.flops_per_step
    summary: dict[str, Any] = {
        "run_dir": cfg.out,
        **({"note": comp.describe["note"]} if comp.describe.get("note") else {}),
        "steps": opt.total_steps,
        "skipped_steps": prog.skipped_steps,
        "skipped_videos": distributed.sum_int(comp.skipped_videos(), info) if comp.skipped_videos else 0,
        "fwd_gflops_per_step": flops / 1e9 if flops else None,
        "total_fwd_pflops": flops * opt.total_steps / 1e15 if flops else None,
    }
    error = None
    if cfg.eval and comp.eval_batches is not None:
        try:
            m = evaluate(par.module, comp.eval_batches, info, opt.autocast, comp.label_captions, all_ranks=par.sharded)
            if info.is_main:
                if comp.eval_note:
                    m["split_note"] = comp.eval_note
                summary["eval"] = m
                log.write({"step": opt.total_steps, "eval": m})
                print(format_metrics(m))
        except Exception as e:  # the run is trained and checkpointed: keep its summary and plot
            error = e
            summary["eval_error"] = f"{type(e).__name__}: {e}"
    if info.is_main:
        if summary["skipped_videos"]:
            print(f"skipped {summary['skipped_videos']} unreadable videos (replaced by others; see the warnings)")
        log.close()
        summary["plot"] = log.plot()
        log.write_summary(summary)
    if error is not None:
        raise error
    return summary


def train(cfg: TrainConfig, build: Callable[[TrainConfig, DistInfo], Components]) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns a summary (final metrics, paths, counts)."""
    info = distributed.init(cfg.device)
    torch.manual_seed(cfg.seed + info.rank)
    if info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    comp = build(cfg, info)
    par = parallelize(
        comp.model,
        info,
        fsdp=cfg.fsdp,
        grad_ckpt=cfg.grad_ckpt,
        compile=cfg.compile,
        find_unused_parameters=cfg.find_unused_parameters,
    )
    opt = setup_optimization(cfg, info, par, comp)
    prog = resume(cfg, info, par, opt) if cfg.resume else Progress()
    stream = BatchStream(comp, prog.consumed)
    log = RunLog(cfg, info, comp, opt.total_steps, prog.step)
    par.step_module.train()
    try:
        while prog.step < opt.total_steps:
            run_step(cfg, info, par, opt, stream, prog, log, comp)
    finally:
        log.close_bar()
    return finish(cfg, info, par, opt, comp, prog, log)
