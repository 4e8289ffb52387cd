"""``fastvl pretrain`` / ``fastvl eval``: fastvl's models on fastvl's data through the generic loop.

The data follows the model: clips are loaded with the model's frame count and resolution (and audio for
VATT). On the embedded synthetic data the model's input is shrunk to what 2 CPU cores train in minutes
(32 px frames, 8 px patches); the architecture (depth, width, heads) stays the named one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import torch

from . import distributed as D
from .loop import Components, TrainConfig, evaluate, train

# model family -> (model overrides, data kwargs) for the embedded synthetic data
SYNTHETIC_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "allinone": (dict(img_size=32, patch_size=8, num_frames=3, max_text_len=16), dict()),
    "vatt": (
        dict(img_size=32, patch_s=8, patch_t=4, num_frames=8, max_audio_tokens=64, max_text_len=16),
        dict(audio=True, audio_rate=8192, audio_seconds=1.0, paraphrases=2),  # 64 audio patches of 128
    ),
    "mac": (dict(img_size=32, patch_size=8, num_frames=4, max_text_len=16), dict()),
}

# training defaults per family on the synthetic data (the user's flags and --set / --data-set win). The tiny
# variants run in about a minute and need more epochs (contrastive training from scratch sits at chance for a
# while before it learns). Paper-size VATT / MAC models run on a CPU, slowly.
#
# allinone (-ti/-s/-b): the recipe under which pretraining learns motion on 2 CPU cores in 6-8 minutes
# (allinone-ti, 4096 clips x 4 epochs at ~35-40 clips/s; README "What the main job does"): VTC only, with rolling in
# the unimodal video pass (video_roll; the paper rolls in the fused pass only, which VTC never sees), roll
# fraction 1/4, 2 colours x 2 shapes x 6 motions with larger shapes and travel. The paper's VTM + MLM heads
# are one --set tasks=... away; from scratch they learn nothing visual in this budget (VTM stays at ln 2).
ALLINONE_RECIPE_MODEL: dict[str, Any] = dict(tasks=("vtc",), video_roll=True, roll_fraction=0.25)
ALLINONE_RECIPE_DATA: dict[str, Any] = dict(
    colors=("red", "blue"), shapes=("circle", "square"), radius=(0.105, 0.315), travel=(0.3, 0.48)
)
SYNTHETIC_TRAIN: dict[str, dict[str, Any]] = {
    "allinone": dict(
        epochs=4.0,
        batch_size=32,
        lr=1e-3,
        warmup=10,
        train_clips=4096,
        model=ALLINONE_RECIPE_MODEL,
        data=ALLINONE_RECIPE_DATA,
    ),
    "vatt": dict(epochs=5.0, batch_size=32, lr=5e-4),
    "mac": dict(epochs=5.0, batch_size=32, lr=5e-4),
    "tiny": dict(epochs=20.0, batch_size=32, lr=1e-3),
}


def family(model: str) -> str:
    for f in SYNTHETIC_PRESETS:
        if model.startswith(f):
            return f
    raise ValueError(f"unknown model family for {model!r} (expected allinone-*, vatt-*, mac-*)")


def _model_cfg(model) -> Any:
    return model.config if hasattr(model, "config") else model.cfg


def plan(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model overrides, data kwargs) for a run: presets for synthetic data, then the user's overrides."""
    fam = family(cfg.model)
    overrides: dict[str, Any] = {}
    data_kw: dict[str, Any] = {}
    if cfg.data == "synthetic":
        overrides.update(SYNTHETIC_PRESETS[fam][0])
        data_kw.update(SYNTHETIC_PRESETS[fam][1])
        data_kw["cache"] = True
    overrides.update(cfg.extra.get("model_overrides", {}))
    data_kw.update(cfg.extra.get("data", {}))
    return overrides, data_kw


def _text_len(model) -> int:
    c = _model_cfg(model)
    return int(getattr(c, "max_text_len", 16))


def build(cfg: TrainConfig, info: D.DistInfo) -> Components:
    """Tokenizer, model and loaders for ``cfg`` on this rank."""
    from fastvl.data import Tokenizer, build_loader, open_dataset
    from fastvl.data.synthetic import SyntheticVideoText
    from fastvl.models import create_model

    overrides, data_kw = plan(cfg)
    run_dir = cfg.out
    tok_dir = cfg.extra.get("tokenizer") or os.path.join(run_dir, "tokenizer")
    # the probe model only tells the data what the architecture expects (frames, size, text length)
    with torch.device("meta"):
        probe = create_model(cfg.model, **overrides)
    mc = _model_cfg(probe)
    frames, size, text_len = mc.num_frames, mc.img_size, _text_len(probe)
    data_kw = {"num_frames": frames, "size": size, **data_kw}
    if fam_has_audio(cfg.model):
        data_kw.setdefault("audio", True)
    n_train = cfg.extra.get("train_clips")
    n_val = cfg.extra.get("val_clips")
    train_ds = open_dataset(
        cfg.data,
        "train",
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        **({"num_clips": n_train} if n_train else {}),
        **data_kw,
    )
    if os.path.isdir(tok_dir):  # the run's own (resume, eval) or one the user supplied
        tok = Tokenizer.load(tok_dir)
    else:
        tok = Tokenizer.train(train_ds.captions(), vocab_size=cfg.extra.get("vocab_size", 1000))
        if info.is_main:
            tok.save(tok_dir)
    model = create_model(
        cfg.model,
        backend=cfg.backend,
        **overrides,
        vocab_size=tok.vocab_size,
        pad_id=tok.pad_id,
        cls_id=tok.cls_id,
        sep_id=tok.sep_id,
        mask_id=tok.mask_id,
    )
    loader = build_loader(
        train_ds,
        cfg.batch_size,
        train=True,
        num_workers=cfg.num_workers,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        tokenizer=tok,
        max_len=text_len,
    )

    def make_loader(epoch: int, skip: int):
        loader.load_state_dict({"epoch": epoch, "batch": skip})
        return loader

    def eval_batches():
        val_ds = open_dataset(
            cfg.data,
            "val",
            seed=cfg.seed,
            **({"num_clips": n_val} if n_val else {}),
            **{k: v for k, v in data_kw.items() if k != "cache"},
        )
        return iter(
            build_loader(
                val_ds, cfg.eval_batch_size, train=False, tokenizer=tok, max_len=text_len, num_workers=cfg.num_workers
            )
        )

    label_captions = None
    if isinstance(train_ds, SyntheticVideoText):

        def label_captions():
            c = train_ds.config
            names = [train_ds.decode_label(lab) for lab in range(c.num_labels)]
            ids, mask = tok.encode([train_ds.captions_for(lab)[0] for lab in range(c.num_labels)], max_len=text_len)
            attrs = {
                attr: torch.tensor([vals.index(n[i]) for n in names])
                for i, (attr, vals) in enumerate((("colour", c.colors), ("shape", c.shapes), ("motion", c.motions)))
            }
            return ids, mask, attrs

    describe = {
        "model_overrides": overrides,
        "data_kwargs": data_kw,
        "tokenizer": tok_dir,
        "vocab_size": tok.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
        "train_clips": len(train_ds),
        "frames": frames,
        "img_size": size,
        "text_len": text_len,
    }
    if info.is_main:
        print(
            f"{cfg.model}: {describe['params'] / 1e6:.2f}M params, {frames} frames at {size}px, text {text_len} "
            f"tokens, vocab {tok.vocab_size}; data {cfg.data!r}: {len(train_ds)} training clips, "
            f"{len(loader)} batches of {cfg.batch_size} per epoch per rank, world size {info.world_size}"
        )
    return Components(model, make_loader, len(loader), eval_batches, cfg.batch_size, describe, label_captions)


def fam_has_audio(model: str) -> bool:
    return family(model) == "vatt"


# ---- command line ----------------------------------------------------------------------------------


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="allinone-ti", help="model name (fastvl.models.list_models())")
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (embedded, generated locally), a manifest .csv/.jsonl, or shards 'dir/{000..009}.tar'",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-<data>)")
    p.add_argument("--epochs", type=float, default=None, help="epochs over the training split")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="clips per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warmup: fraction of the steps, or a count if >= 1 (default 0.1; 10 steps for allinone on synthetic)",
    )
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="autocast: auto = bf16 on CUDA, off on the CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--on-nan", default="stop", choices=["stop", "skip"], help="non-finite loss: stop or skip the step")
    p.add_argument("--backend", default=None, help="op backend for the whole model (default: auto per op)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-eval", action="store_true", help="skip the final retrieval evaluation")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (BERT vocab.txt or tokenizer.json)")
    p.add_argument(
        "--train-clips", type=int, default=None, help="synthetic: training clips (default 1024; 4096 for allinone)"
    )
    p.add_argument("--val-clips", type=int, default=None, help="synthetic: held-out clips (default 256)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="model config override, e.g. --set keep_rate=0.25 --set rolling=explicit (repeatable)",
    )
    p.add_argument(
        "--data-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="synthetic data override (SyntheticConfig field), e.g. --data-set 'colors=[\"red\"]' (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    """``["FIELD=VALUE", ...]`` -> {field: value} (JSON values; lists become tuples)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} expects FIELD=VALUE, got {item!r}")
        k, _, v = item.partition("=")
        val = _parse_value(v)
        out[k.strip()] = tuple(val) if isinstance(val, list) else val
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fam = "tiny" if args.model.endswith("-tiny") else family(args.model)
    defaults = SYNTHETIC_TRAIN[fam] if args.data == "synthetic" else dict(epochs=1.0, batch_size=32, lr=1e-4)
    overrides = parse_assignments(args.set, "--set")
    data_overrides = parse_assignments(args.data_set, "--data-set")
    if data_overrides and args.data != "synthetic":
        raise SystemExit(f"--data-set applies to --data synthetic only, got --data {args.data!r}")
    overrides = {**defaults.get("model", {}), **overrides}
    data_overrides = {**defaults.get("data", {}), **data_overrides}
    name = os.path.splitext(os.path.basename(args.data.rstrip("/")))[0].replace("{", "").replace("}", "")
    extra = {
        "model_overrides": overrides,
        "tokenizer": args.tokenizer,
        "train_clips": args.train_clips or defaults.get("train_clips"),
        "val_clips": args.val_clips,
        "data": data_overrides,
    }
    return TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out or os.path.join("runs", f"{args.model}-{name}"),
        epochs=args.epochs if args.epochs is not None else defaults["epochs"],
        steps=args.steps,
        batch_size=args.batch_size or defaults["batch_size"],
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else defaults["lr"],
        weight_decay=args.weight_decay,
        warmup=args.warmup if args.warmup is not None else defaults.get("warmup", 0.1),
        clip_grad=args.clip_grad,
        amp=args.amp,
        compile=args.compile,
        seed=args.seed,
        num_workers=args.workers,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
        on_nan=args.on_nan,
        backend=args.backend,
        device=args.device,
        eval=not args.no_eval,
        progress=not args.no_progress,
        extra=extra,
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = train(cfg, build)
    info_main = int(os.environ.get("RANK", "0")) == 0
    if info_main:
        print(f"run directory: {summary['run_dir']}  (metrics.jsonl, curves.png, summary.json, checkpoints)")
        if summary.get("fwd_gflops_per_step") is not None:
            print(
                f"forward FLOPs: {summary['fwd_gflops_per_step']:.2f} GFLOPs/step, "
                f"{summary['total_fwd_pflops'] * 1e3:.2f} TFLOPs in total"
            )
    D.cleanup()
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory written by fastvl pretrain")
    p.add_argument("--data", default=None, help="evaluate on this data's held-out split (default: the run's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)


def cmd_eval(args: argparse.Namespace) -> int:
    """Zero-shot retrieval of a run's latest checkpoint on the held-out split."""
    from . import checkpoint as ckpt
    from .evaluate import format_metrics

    with open(os.path.join(args.run, "config.json")) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    cfg.out, cfg.eval_batch_size, cfg.device = args.run, args.batch_size, args.device
    cfg.extra = {**cfg.extra, "tokenizer": saved.get("tokenizer")}
    if args.data:
        cfg.data = args.data
    path = ckpt.latest(args.run)
    if path is None:
        raise SystemExit(f"fastvl eval: no checkpoint in {args.run}")
    info = D.DistInfo(device=torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    comp = build(cfg, info)
    ckpt.load(path, comp.model, restore_rng=False)
    m = evaluate(comp.model.to(info.device), comp.eval_batches, info, label_captions=comp.label_captions)
    print(f"checkpoint {path}")
    print(format_metrics(m))
    return 0
