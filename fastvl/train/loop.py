"""The pretraining loop: AdamW + warmup/cosine, grad accumulation, clipping, bf16 autocast, torch.compile,
DDP, atomic checkpoints with exact resume, NaN policy, FLOPs accounting, metrics JSONL, final retrieval eval.

``train(cfg, build)`` is generic: ``build`` supplies the model, the loaders and the eval data (see
:class:`Components`); ``fastvl.train.pretrain`` wires it to fastvl's models and datasets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as D
from .evaluate import attribute_accuracy, format_metrics, pair_attribute_accuracy, retrieval_metrics
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
    ``batches_per_epoch`` is its length. ``eval_batches()`` yields held-out batches with a ``label`` key."""

    model: torch.nn.Module
    make_loader: Callable[[int, int], Any]
    batches_per_epoch: int
    eval_batches: Callable[[], Iterator[dict]] | None = None
    samples_per_batch: int = 1
    describe: dict[str, Any] = dataclasses.field(default_factory=dict)
    # () -> (text_ids (NL, Lt), text_mask (NL, Lt), {attribute: (NL,) value index}) for label ids 0..NL-1:
    # the canonical caption of every label, for the attribute probe (synthetic data only)
    label_captions: Callable[[], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] | None = None


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _amp_ctx(cfg: TrainConfig, device: torch.device):
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


class _Batches:
    """Endless micro-batch stream over epochs with its position (epoch, batch index) for resume."""

    def __init__(self, comp: Components, epoch: int, index: int):
        self.comp, self.epoch, self.index = comp, epoch, index
        self._it = iter(comp.make_loader(epoch, index))

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


def train(cfg: TrainConfig, build: Callable[[TrainConfig, D.DistInfo], Components]) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns a summary (final metrics, paths, counts)."""
    info = D.init(cfg.device)
    torch.manual_seed(cfg.seed + info.rank)
    run_dir = cfg.out
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
    comp = build(cfg, info)
    model = comp.model.to(info.device)
    raw_model = model
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    fwd_model = torch.compile(model) if cfg.compile else model

    per_epoch_steps = max(1, comp.batches_per_epoch // cfg.grad_accum)
    total = cfg.steps if cfg.steps is not None else max(1, int(math.ceil(cfg.epochs * per_epoch_steps)))
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else int(cfg.warmup * total)
    fused = info.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(raw_model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        **({"fused": True} if fused else {}),
    )
    scheduler = warmup_cosine(optimizer, total, warmup, cfg.min_lr_ratio)
    autocast, scaler = _amp_ctx(cfg, info.device)

    start_step, skipped, flops_step, consumed = 0, 0, None, 0
    if cfg.resume:
        path = ckpt.latest(run_dir)
        if path is None:
            if info.is_main:
                print(f"--resume: no checkpoint in {run_dir}, starting fresh")
        else:
            state = ckpt.load(path, raw_model, optimizer, scheduler, restore_rng=False)
            rng = state["rng"]
            if info.enabled and "rank_rng" in state:
                rng = state["rank_rng"][info.rank]
            ckpt.set_rng_state(rng)
            start_step, skipped = state["step"], state.get("skipped", 0)
            consumed, flops_step = state["consumed"], state.get("fwd_flops_per_step")
            if info.is_main:
                print(f"resumed from {path} at step {start_step}")
    stream = _Batches(comp, consumed // comp.batches_per_epoch, consumed % comp.batches_per_epoch)

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if info.is_main and start_step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    log = open(metrics_path, "a") if info.is_main else None  # noqa: SIM115
    if info.is_main and start_step == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(
                {**dataclasses.asdict(cfg), "world_size": info.world_size, **comp.describe}, f, indent=1, default=str
            )

    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"pretrain {cfg.model}", unit="step", dynamic_ncols=True)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    samples = comp.samples_per_batch * cfg.grad_accum * info.world_size
    t_last, n_since, last_ckpt_step = time.perf_counter(), 0, start_step
    model.train()
    for step in range(start_step, total):
        optimizer.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        ok = True
        for micro in range(cfg.grad_accum):
            batch = _to_device(stream.next(), info.device)
            if flops_step is None:
                flops_step = count_forward_flops(raw_model, batch) * cfg.grad_accum * info.world_size
            sync = model.no_sync() if info.enabled and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast():
                    out = fwd_model(batch)
                loss = out["loss"] / cfg.grad_accum
                ok = D.all_true(bool(torch.isfinite(loss)), info)
                if not ok:
                    bad, what = loss.item(), "loss"
                    break
                (scaler.scale(loss) if scaler else loss).backward()
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:
                    parts[k] = parts.get(k, 0.0) + v.item() / cfg.grad_accum
        grad_norm = float("nan")
        if ok:
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else math.inf))
            ok = D.all_true(math.isfinite(grad_norm), info) or scaler is not None
            bad, what = grad_norm, "gradient norm"
        if not ok:
            msg = f"step {step + 1}: non-finite {what} ({bad}); last checkpoint at step {last_ckpt_step}"
            if cfg.on_nan == "stop":
                if bar:
                    bar.close()
                raise NonFiniteLoss(msg + "; stopping (use --on-nan skip to skip such steps)")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            if info.is_main:
                print(f"skipping {msg}")
            scheduler.step()
            continue
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        n_since += 1
        done = step + 1
        if info.is_main and (done % cfg.log_every == 0 or done == total or done == start_step + 1):
            dt = time.perf_counter() - t_last
            rec = {
                "step": done,
                "epoch": stream.epoch,
                **{k: round(v, 6) for k, v in parts.items()},
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": round(grad_norm, 5),
                "clips_per_s": round(n_since * samples / max(dt, 1e-9), 2),
                "skipped": skipped,
                "fwd_gflops_per_step": float(f"{flops_step / 1e9:.6g}"),
                "total_fwd_pflops": float(f"{flops_step * done / 1e15:.6g}"),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t_last, n_since = time.perf_counter(), 0
            if bar:
                bar.set_postfix(loss=f"{parts.get('loss', float('nan')):.4f}", clips_s=rec["clips_per_s"])
        if bar:
            bar.update(1)
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == total:
            _save(
                cfg,
                info,
                run_dir,
                done,
                raw_model,
                optimizer,
                scheduler,
                skipped,
                stream.epoch * comp.batches_per_epoch + stream.index,
                flops_step,
            )
            last_ckpt_step = done
    if bar:
        bar.close()
    summary: dict[str, Any] = {
        "run_dir": run_dir,
        "steps": total,
        "skipped": skipped,
        "fwd_gflops_per_step": flops_step / 1e9 if flops_step else None,
        "total_fwd_pflops": flops_step * total / 1e15 if flops_step else None,
    }
    if cfg.eval and comp.eval_batches is not None:
        m = evaluate(raw_model, comp.eval_batches, info, autocast, comp.label_captions)
        if info.is_main:
            summary["eval"] = m
            log.write(json.dumps({"step": total, "eval": m}) + "\n")
            print(format_metrics(m))
    if info.is_main:
        log.close()
        try:
            from .plots import plot_run

            summary["plot"] = plot_run(run_dir)
        except ImportError as e:
            print(f"no plot: {e}")
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return summary


def _save(cfg, info, run_dir, step, model, optimizer, scheduler, skipped, consumed, flops_step):
    extra = {"skipped": skipped, "consumed": consumed, "fwd_flops_per_step": flops_step}
    if info.enabled:  # every rank's RNG, so a resumed DDP run continues each rank's random stream
        import torch.distributed as dist

        states = [None] * info.world_size
        dist.all_gather_object(states, ckpt.rng_state())
        extra["rank_rng"] = states
    if info.is_main:
        ckpt.save(run_dir, step, model, optimizer, scheduler, extra=extra, keep=cfg.keep_ckpts)
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, eval_batches, info: D.DistInfo, autocast=contextlib.nullcontext, label_captions=None
) -> dict:
    """Zero-shot retrieval on the held-out batches (rank 0 evaluates; other ranks wait), plus the attribute
    probe (:func:`~fastvl.train.evaluate.attribute_accuracy`) when ``label_captions`` is given."""
    result = {}
    if info.is_main:
        was = model.training
        model.eval()
        vids, txts, labels, raw = [], [], [], []
        for batch in eval_batches():
            if label_captions is not None:
                raw.append(batch["video"])
            batch = _to_device(batch, info.device)
            with autocast():
                vids.append(model.encode_video(batch["video"]).float().cpu())
                txts.append(model.encode_text(batch["text_ids"], batch["text_mask"]).float().cpu())
            labels.append(batch["label"].cpu())
        result = retrieval_metrics(torch.cat(vids), torch.cat(txts), torch.cat(labels))
        if label_captions is not None:
            ids, mask, attrs = label_captions()
            with autocast():
                lt = [
                    model.encode_text(ids[s : s + 256].to(info.device), mask[s : s + 256].to(info.device)).float().cpu()
                    for s in range(0, ids.shape[0], 256)
                ]
            result["attributes"] = attribute_accuracy(torch.cat(vids), torch.cat(labels), torch.cat(lt), attrs)
            trained_vtm = "vtm" in getattr(getattr(model, "config", None), "tasks", ())
            if hasattr(model, "vtm_logits") and trained_vtm and "motion" in attrs:  # All-in-one's fused head

                def score(v, i, m):
                    with autocast():
                        lg = model.vtm_logits(v.to(info.device), i.to(info.device), m.to(info.device)).float()
                    return lg[:, 1] - lg[:, 0]

                result["attributes_fused"] = pair_attribute_accuracy(
                    score, torch.cat(raw), torch.cat(labels), ids, mask, attrs, ("motion",)
                )
        model.train(was)
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
    return result
