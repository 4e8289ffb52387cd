"""Supervised motion probe: can All-in-one's fused stream see motion, with and without token rolling?

Trains an All-in-one model's fused pass (a constant two-token text, then the clip's frames) plus a linear
head on the text CLS to classify the synthetic clips' motion (6 classes: left/right/up/down/grow/shrink),
and reports the held-out accuracy for each ``--rolling`` mode on the same seed, data and budget. There are
no captions and no pretraining objective: it isolates what the architecture can learn to see, as an upper
bound for what VTM/MLM pretraining could get from it. ``--target quadrant`` classifies the shape's
horizontal quarter in the middle frame instead (localisation, one frame).

    python -m fastvl.train.motion_probe --rolling fused none --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastvl.data.synthetic import SyntheticVideoText
from fastvl.models import create_model
from fastvl.train.commands import parse_assignments


def _tensors(ds: SyntheticVideoText, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    video = torch.stack([ds[i]["video"] for i in range(len(ds))])
    if target == "motion":
        y = [ds.config.motions.index(ds.decode_label(ds.label(i))[2]) for i in range(len(ds))]
    else:
        y = [int(ds.params(i)["x"][ds.config.frames // 2] * 4 // ds.config.size) for i in range(len(ds))]
    return video, torch.tensor(y)


def run(args: argparse.Namespace, rolling: str, seed: int, data) -> dict:
    """Train one probe; returns its record (held-out accuracy per epoch, chance, time)."""
    (xt, yt), (xv, yv), classes = data
    torch.manual_seed(seed)
    model = create_model(args.model, rolling=rolling, vocab_size=128, **parse_assignments(args.set, "--set"))
    C = model.config.dim
    head = nn.Linear(C, classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    bs = args.batch_size
    per_epoch = len(xt) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * per_epoch, pct_start=0.1)
    ids = torch.tensor([[model.config.cls_id, model.config.sep_id]])
    mask = torch.ones(1, 2, dtype=torch.bool)

    def logits(x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        y = model.fused(model.embed_text(ids.expand(B, 2)), mask.expand(B, 2), model.embed_video(x))
        return head(y[:, 0])

    g = torch.Generator().manual_seed(seed)
    acc, t0 = [], time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            loss = F.cross_entropy(logits(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([logits(xv[i : i + 256]).argmax(1) for i in range(0, len(xv), 256)])
        acc.append(round(100.0 * (pred == yv).float().mean().item(), 1))
    chance = 100.0 * torch.bincount(yv, minlength=classes).max().item() / len(yv)
    return {
        "model": args.model,
        "set": args.set,
        "rolling": rolling,
        "seed": seed,
        "target": args.target,
        "train_clips": len(xt),
        "epochs": args.epochs,
        "accuracy_per_epoch": acc,
        "accuracy": acc[-1],
        "majority_chance": round(chance, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m fastvl.train.motion_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="allinone-tiny")
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="FIELD=VALUE",
        help="model config (default: depth=4 roll_fraction=0.25 pos_init=sincos)",
    )
    p.add_argument("--rolling", nargs="+", default=["fused", "none"], choices=["fused", "explicit", "none"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--target", choices=["motion", "quadrant"], default="motion")
    p.add_argument("--train-clips", type=int, default=16384)
    p.add_argument("--val-clips", type=int, default=500)
    p.add_argument("--colors", nargs="+", default=["red", "green", "blue", "yellow"])
    p.add_argument("--shapes", nargs="+", default=["circle", "square"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="append the records to this JSONL file")
    args = p.parse_args(argv)
    if args.set is None:
        args.set = ["depth=4", "roll_fraction=0.25", "pos_init=sincos"]
    with torch.device("meta"):  # only the config: frames and size for the data
        probe = create_model(args.model, vocab_size=128, **parse_assignments(args.set, "--set"))
    cfg = probe.config
    kw = dict(frames=cfg.num_frames, size=cfg.img_size, colors=tuple(args.colors), shapes=tuple(args.shapes))
    classes = 6 if args.target == "motion" else 4
    records = []
    for seed in args.seeds:
        train = SyntheticVideoText("train", seed=seed, num_clips=args.train_clips, **kw)
        val = SyntheticVideoText("val", seed=seed, num_clips=args.val_clips, **kw)
        data = (_tensors(train, args.target), _tensors(val, args.target), classes)
        for rolling in args.rolling:
            rec = run(args, rolling, seed, data)
            records.append(rec)
            print(
                f"{args.target} probe  rolling={rolling:8s} seed={seed}  held-out accuracy {rec['accuracy']:5.1f}% "
                f"[chance {rec['majority_chance']:.1f}]  per epoch {rec['accuracy_per_epoch']}  {rec['seconds']:.0f} s",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return records


if __name__ == "__main__":
    main()
