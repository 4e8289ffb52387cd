"""``fastvl pretrain`` / ``fastvl eval``: arguments, their validation (every mistake is a
:class:`~fastvl.usage.UsageError` raised before anything is created) and the two commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from fastvl.usage import UsageError, float_above, int_at_least

from .loop import TrainConfig
from .pretrain import SYNTHETIC_TRAIN, default_run_dir, family, synthetic_note

AMP_MODES = ("auto", "bf16", "fp16", "none")


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="allinone-ti", help="model name (fastvl.models.list_models())")
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (embedded, generated locally), a manifest .csv/.jsonl, or shards 'dir/{000..009}.tar' "
        "(also 'pipe:COMMAND' and http(s) URLs)",
    )
    p.add_argument(
        "--eval-data",
        default=None,
        help="held-out data for the final evaluation (a manifest or shards; default: the held-out split of --data, "
        "or its training clips when it has none)",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-<data>)")
    p.add_argument("--epochs", type=float_above(0), default=None, help="epochs over the training split (> 0)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="clips per process per micro-batch")
    p.add_argument("--grad-accum", type=int_at_least(1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float_above(0), default=None, help="peak learning rate (AdamW, > 0)")
    p.add_argument("--weight-decay", type=float_above(0, inclusive=True), default=0.05)
    p.add_argument(
        "--warmup",
        type=float_above(0, inclusive=True),
        default=None,
        help="warmup: fraction of the steps, or a count if >= 1 (default 0.1; 10 steps for allinone on synthetic)",
    )
    p.add_argument("--clip-grad", type=float_above(0, inclusive=True), default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--amp", default="auto", choices=AMP_MODES, help="autocast: auto = bf16 on CUDA, off on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the ranks (FSDP2, one unit per block) instead "
        "of DDP; checkpoints are sharded (torch.distributed.checkpoint)",
    )
    p.add_argument(
        "--grad-ckpt",
        action="store_true",
        help="activation checkpointing: recompute each block's activations in backward",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--workers", type=int_at_least(0), default=0, help="DataLoader workers per process")
    p.add_argument("--log-every", type=int_at_least(1), default=10)
    p.add_argument("--ckpt-every", type=int_at_least(0), default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--on-nan", default="stop", choices=["stop", "skip"], help="non-finite loss: stop or skip the step")
    p.add_argument("--backend", default=None, help="op backend for the whole model (default: auto per op)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-eval", action="store_true", help="skip the final retrieval evaluation")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (BERT vocab.txt or tokenizer.json)")
    p.add_argument(
        "--train-clips",
        type=int_at_least(1),
        default=None,
        help="synthetic: training clips (default 1024; 4096 for allinone)",
    )
    p.add_argument(
        "--val-clips",
        type=int_at_least(1),
        default=None,
        help="synthetic: held-out clips (default 256); other data without a held-out split: training clips evaluated",
    )
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


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory written by fastvl pretrain")
    p.add_argument("--data", default=None, help="evaluate on this data's held-out split (default: the run's)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--device", default=None)


def parse_value(v: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    """``["FIELD=VALUE", ...]`` -> {field: value} (JSON values; lists become tuples)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(flag, f"expected FIELD=VALUE, got {item!r}")
        k, _, v = item.partition("=")
        val = parse_value(v)
        out[k.strip()] = tuple(val) if isinstance(val, list) else val
    return out


def training_defaults(model: str, data: str) -> dict[str, Any]:
    """The recipe a model trains with when the user does not say: per model, else per tiny / family, on the
    synthetic data; one generic setting for files and shards."""
    if data != "synthetic":
        return dict(epochs=1.0, batch_size=32, lr=1e-4)
    if model in SYNTHETIC_TRAIN:
        return SYNTHETIC_TRAIN[model]
    return SYNTHETIC_TRAIN["tiny" if model.endswith("-tiny") else family(model)]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration: the family's synthetic recipe (or generic defaults for files and shards), then
    the user's flags, field by field."""
    check_model_name(args.model)
    defaults = training_defaults(args.model, args.data)
    overrides = parse_assignments(args.set, "--set")
    data_overrides = parse_assignments(args.data_set, "--data-set")
    if data_overrides and args.data != "synthetic":
        raise UsageError("--data-set", f"applies to --data synthetic only, got --data {args.data!r}")
    extra = {
        "model_overrides": {**defaults.get("model", {}), **overrides},
        "tokenizer": args.tokenizer,
        "train_clips": args.train_clips or defaults.get("train_clips"),
        "val_clips": args.val_clips,
        "data": {**defaults.get("data", {}), **data_overrides},
        "eval_data": args.eval_data,
    }
    return TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out or default_run_dir(args.model, args.data),
        epochs=args.epochs if args.epochs is not None else defaults["epochs"],
        steps=args.steps,
        batch_size=args.batch_size if args.batch_size is not None else defaults["batch_size"],
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else defaults["lr"],
        weight_decay=args.weight_decay,
        warmup=args.warmup if args.warmup is not None else defaults.get("warmup", 0.1),
        clip_grad=args.clip_grad,
        amp=args.amp,
        compile=args.compile,
        fsdp=args.fsdp,
        grad_ckpt=args.grad_ckpt,
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


# ---- validation: everything a user can get wrong, checked before a file is written -----------------


def check_model_name(name: str) -> None:
    from fastvl.models import list_models

    if name not in list_models():
        raise UsageError("--model", f"unknown model {name!r}; expected one of {', '.join(list_models())}")


def check_model(name: str, overrides: dict[str, Any]) -> None:
    import torch

    from fastvl.models import create_model

    check_model_name(name)

    try:
        with torch.device("meta"):
            create_model(name, **overrides)
    except (TypeError, ValueError) as e:
        raise UsageError("--set", str(e)) from None


def check_data(spec: str, flag: str) -> None:
    """A spec that :func:`fastvl.data.open_dataset` can open: known kind, files present, manifest rows valid,
    a video decoder installed for files and shards."""
    from fastvl.data import read_manifest, spec_kind
    from fastvl.data.decode import resolve_decoder
    from fastvl.data.shard_names import expand_pattern, is_remote

    try:
        kind = spec_kind(spec)
    except (TypeError, ValueError) as e:
        raise UsageError(flag, str(e).removeprefix("open_dataset: ")) from None
    if kind == "synthetic":
        return
    try:
        if kind == "manifest":
            read_manifest(spec)
        else:
            names = expand_pattern(spec)
            missing = [u for u in names if not is_remote(u) and not os.path.isfile(u)]
            if not names or missing:
                raise UsageError(
                    flag, f"{len(missing) or 'no'} of {len(names)} shards of {spec!r} not found, e.g. {missing[:2]}"
                )
        resolve_decoder(None)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(flag, str(e)) from None
    except ImportError as e:
        raise UsageError(flag, f"{spec!r} holds videos: {e}") from None


def check_synthetic_overrides(cfg: TrainConfig) -> None:
    if cfg.data != "synthetic" or not cfg.extra.get("data"):
        return
    from fastvl.data import SyntheticConfig

    fields = sorted(f.name for f in dataclasses.fields(SyntheticConfig))
    unknown = sorted(set(cfg.extra["data"]) - set(fields))
    if unknown:
        raise UsageError("--data-set", f"unknown SyntheticConfig field(s) {unknown}; fields: {', '.join(fields)}")
    try:
        SyntheticConfig(**cfg.extra["data"])
    except (TypeError, ValueError) as e:
        raise UsageError("--data-set", str(e)) from None


def check_backend(name: str | None) -> None:
    if name in (None, "auto"):
        return
    import fastvl.ops  # noqa: F401  (registers every op's backends)
    from fastvl import backends

    known = sorted({b.name for op in backends.ops() for b in backends.backends(op)})
    if name not in known:
        raise UsageError("--backend", f"unknown backend {name!r}; expected auto or one of {', '.join(known)}")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError("--device", f"expected cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device", f"{device!r} asked for, but torch sees no CUDA device")


def validate_pretrain(cfg: TrainConfig) -> None:
    """Every check that needs no training: raises :class:`UsageError` naming the flag."""
    check_model(cfg.model, cfg.extra["model_overrides"])
    check_data(cfg.data, "--data")
    if cfg.extra.get("eval_data"):
        check_data(cfg.extra["eval_data"], "--eval-data")
    check_synthetic_overrides(cfg)
    check_backend(cfg.backend)
    check_device(cfg.device)
    tok = cfg.extra.get("tokenizer")
    if tok and not os.path.exists(tok):
        raise UsageError("--tokenizer", f"no such file or directory: {tok}")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--fsdp", "needs several processes: launch with torchrun --nproc_per_node N -m fastvl.cli ...")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError("--out", f"{cfg.out} exists and is not a directory")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from . import distributed
    from .loop import train
    from .pretrain import build

    cfg = config_from_args(args)
    validate_pretrain(cfg)
    summary = train(cfg, build)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {summary['run_dir']}  (metrics.jsonl, curves.png, summary.json, checkpoints)")
        if summary.get("fwd_gflops_per_step") is not None:
            print(
                f"forward FLOPs: {summary['fwd_gflops_per_step']:.2f} GFLOPs/step, "
                f"{summary['total_fwd_pflops'] * 1e3:.2f} TFLOPs in total"
            )
        if synthetic_note(cfg.model, cfg.data) and cfg.eval:
            print(f"note: {synthetic_note(cfg.model, cfg.data)}")
    distributed.cleanup()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Zero-shot retrieval of a run's latest checkpoint on the held-out split."""
    import torch

    from . import checkpoint as ckpt
    from . import distributed
    from .evaluate import evaluate
    from .pretrain import build
    from .retrieval import format_metrics

    config_path = os.path.join(args.run, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError("run", f"{args.run} is not a run directory of fastvl pretrain (no config.json)")
    path = ckpt.latest(args.run)
    if path is None:
        raise UsageError("run", f"no checkpoint in {args.run} (the run has not finished a checkpoint)")
    if args.data:
        check_data(args.data, "--data")
    check_device(args.device)
    with open(config_path) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    cfg.out, cfg.eval_batch_size, cfg.device = args.run, args.batch_size, args.device
    cfg.extra = {**cfg.extra, "tokenizer": saved.get("tokenizer")}
    if args.data:
        cfg.data = args.data
        cfg.extra["eval_data"] = None
    info = distributed.DistInfo(device=torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    comp = build(cfg, info)
    ckpt.load(path, comp.model, restore_rng=False)
    m = evaluate(comp.model.to(info.device), comp.eval_batches, info, label_captions=comp.label_captions)
    if comp.eval_note:
        m["split_note"] = comp.eval_note
    print(f"checkpoint {path}")
    print(format_metrics(m))
    return 0
