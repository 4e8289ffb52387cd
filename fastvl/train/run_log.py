"""What a run writes as it goes (rank 0): ``config.json``, ``metrics.jsonl``, the progress bar, and at the end
``curves.png`` and ``summary.json``."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from .distributed import DistInfo


class RunLog:
    """Rank 0 writes; on other ranks every method does nothing."""

    def __init__(self, cfg, info: DistInfo, comp, total_steps: int, start_step: int):
        self.cfg, self.info, self.total, self.start_step = cfg, info, total_steps, start_step
        self.samples_per_step = comp.samples_per_batch * cfg.grad_accum * info.world_size
        self.t_last, self.steps_since = time.perf_counter(), 0
        self.file = self.bar = None
        if not info.is_main:
            return
        path = os.path.join(cfg.out, "metrics.jsonl")
        if start_step == 0:
            if os.path.exists(path):
                os.remove(path)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                config = {**dataclasses.asdict(cfg), "world_size": info.world_size, **comp.describe}
                json.dump(config, f, indent=1, default=str)
        self.file = open(path, "a")  # noqa: SIM115  (open for the whole run)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=f"pretrain {cfg.model}", unit="step", dynamic_ncols=True
            )

    def first_step(self, done: int) -> bool:
        return done == self.start_step + 1

    def record(self, done: int, epoch: int, parts: dict[str, float], lr: float, grad_norm: float, prog, videos: int):
        """One metrics line: loss parts, learning rate, gradient norm, clips/s since the last line, skipped NaN
        steps and unreadable videos, forward FLOPs."""
        if self.file is None:
            return
        dt = time.perf_counter() - self.t_last
        flops = prog.flops_per_step
        rec = {
            "step": done,
            "epoch": epoch,
            **{k: round(v, 6) for k, v in parts.items()},
            "lr": lr,
            "grad_norm": round(grad_norm, 5),
            "clips_per_s": round(self.steps_since * self.samples_per_step / max(dt, 1e-9), 2),
            "skipped_steps": prog.skipped_steps,
            "skipped_videos": videos,
            "fwd_gflops_per_step": float(f"{flops / 1e9:.6g}"),
            "total_fwd_pflops": float(f"{flops * done / 1e15:.6g}"),
        }
        self.write(rec)
        self.t_last, self.steps_since = time.perf_counter(), 0
        if self.bar:
            post = {"loss": f"{parts.get('loss', float('nan')):.4f}", "clips_s": rec["clips_per_s"]}
            if videos:
                post["skipped_videos"] = videos
            self.bar.set_postfix(**post)

    def advance(self) -> None:
        """A step is done (counted for clips/s between records; moves the bar)."""
        self.steps_since += 1
        if self.bar:
            self.bar.update(1)

    def write(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close_bar(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.file is not None:
            self.file.close()
            self.file = None

    def plot(self) -> str | None:
        """``curves.png`` (None, with the reason printed, when matplotlib is missing)."""
        if not self.info.is_main:
            return None
        try:
            from .plots import plot_run

            return plot_run(self.cfg.out)
        except ImportError as e:
            print(f"no plot: {e}")
            return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(os.path.join(self.cfg.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=str)
