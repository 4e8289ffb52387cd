"""``fastvl pretrain`` / ``fastvl eval``: fastvl's models on fastvl's data through the generic loop.

The data follows the model: clips are loaded with the model's frame count and resolution (and audio for
VATT). On the embedded synthetic data the model's input is shrunk to what 2 CPU cores train in minutes
(32 px frames, 8 px patches); the architecture (depth, width, heads) stays the named one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import distributed
from .distributed import DistInfo
from .loop import Components, TrainConfig

# model family -> (model overrides, data kwargs) for the embedded synthetic data
SYNTHETIC_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "allinone": (dict(img_size=32, patch_size=8, num_frames=3, max_text_len=16), dict()),
    "vatt": (
        dict(img_size=32, patch_s=8, patch_t=4, num_frames=8, max_audio_tokens=64, max_text_len=16),
        dict(audio=True, audio_rate=8192, audio_seconds=1.0, paraphrases=2),  # 64 audio patches of 128
    ),
    "mac": (dict(img_size=32, patch_size=8, num_frames=4, max_text_len=16), dict()),
    # masked autoencoders: 4 px patches, so that 90% masking keeps 6 of a frame's 64 (8 px patches would keep 1), and
    # MAE's per-patch target normalisation (norm_pix=True) instead of the papers' per-channel one: the texture inside
    # a masked patch is not predictable from the visible ones (adjacent patches' normalised pixels correlate at
    # -0.04 on these clips), and normalising each channel removes the colour, the one thing they tell
    "simvtp": (dict(img_size=32, patch_size=4, num_frames=4, max_text_len=16, norm_pix=True), dict()),
    "videomae": (dict(img_size=32, patch_size=4, num_frames=4, norm_pix=True), dict()),
}

# training defaults per family on the synthetic data (the user's flags and --set / --data-set win). The tiny
# variants run in about a minute and need more epochs (contrastive training from scratch sits at chance for a
# while before it learns). Paper-size VATT / MAC models run on a CPU, slowly.
#
# allinone (-ti/-s/-b): the recipe under which pretraining learns motion on 2 CPU cores in 6-8 minutes
# (allinone-ti, 4096 clips x 4 epochs at ~35-40 clips/s; docs/findings.md): VTC only, with rolling in
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


# models whose synthetic default does not learn in the CPU budget, and why (printed with the run's output)
SYNTHETIC_NOTES: dict[str, str] = {
    "vatt-tiny": (
        "vatt-tiny does not learn on the synthetic data in this budget (its loss stays at ln(2 x batch) = ln 64): "
        "at initialisation the audio and text towers give every clip nearly the same embedding (mean pairwise "
        "cosine 0.9999 and 0.995) while the video head's BatchNorm spreads the video embeddings apart (cosine "
        "~0), so NCE and MIL-NCE pair content with noise; measured with the default (380 of 640 steps), at "
        "lr 5e-4 on 2 colours x 2 shapes, and with allinone's larger shapes on 4096 clips (110+ steps each). "
        "allinone-ti is the synthetic recipe that learns"
    ),
}


def synthetic_note(model: str, data: str) -> str | None:
    """Why ``model``'s synthetic default does not learn, when measured so (None otherwise)."""
    return SYNTHETIC_NOTES.get(model) if data == "synthetic" else None


def family(model: str) -> str:
    for f in SYNTHETIC_PRESETS:
        if model.startswith(f):
            return f
    raise ValueError(f"unknown model family for {model!r} (expected {', '.join(f + '-*' for f in SYNTHETIC_PRESETS)})")


def model_config(model) -> Any:
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


def text_length(model) -> int:
    return int(getattr(model_config(model), "max_text_len", 16))


def fam_has_audio(model: str) -> bool:
    return family(model) == "vatt"


def default_run_dir(model: str, data: str) -> str:
    """``runs/<model>-synthetic``, or ``runs/<model>-<folder>-<name>-<hash>`` for files and shards: the hash of
    the absolute spec keeps runs on different manifests or shard sets apart."""
    if data == "synthetic":
        return os.path.join("runs", f"{model}-synthetic")
    import hashlib

    from fastvl.data.shard_names import is_remote

    spec = data if is_remote(data) else os.path.abspath(data)
    stem = os.path.splitext(os.path.basename(data.rstrip("/")))[0]
    folder = os.path.basename(os.path.dirname(spec.rstrip("/")))
    name = "-".join(p for p in (folder, stem) if p)
    name = "".join(ch if ch.isalnum() or ch in "-_." else "" for ch in name).strip(".") or "data"
    return os.path.join("runs", f"{model}-{name}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}")


def probe_architecture(cfg: TrainConfig, overrides: dict[str, Any]) -> tuple[int, int, int]:
    """(frames, image size, text length) the model expects, from a model built on the meta device."""
    from fastvl.models import create_model

    with torch.device("meta"):
        probe = create_model(cfg.model, **overrides)
    mc = model_config(probe)
    return mc.num_frames, mc.img_size, text_length(probe)


def open_training_data(cfg: TrainConfig, info: DistInfo, data_kw: dict[str, Any]):
    from fastvl.data import open_dataset

    n_train = cfg.extra.get("train_clips")
    return open_dataset(
        cfg.data,
        "train",
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        **({"num_clips": n_train} if n_train else {}),
        **data_kw,
    )


def load_or_train_tokenizer(cfg: TrainConfig, info: DistInfo, train_ds):
    """The run's tokenizer: the one given (``--tokenizer``) or already in the run directory, else trained by
    rank 0 on the training captions (shards: read from the header scan, no video) and loaded by the others."""
    from fastvl.data import Tokenizer

    tok_dir = cfg.extra.get("tokenizer") or os.path.join(cfg.out, "tokenizer")
    if distributed.all_true(os.path.isdir(tok_dir), info):
        return Tokenizer.load(tok_dir), tok_dir
    tok = None
    if info.is_main:
        tok = Tokenizer.train(train_ds.captions(), vocab_size=cfg.extra.get("vocab_size", 1000))
        tok.save(tok_dir)
    distributed.barrier(info)
    return tok if tok is not None else Tokenizer.load(tok_dir), tok_dir


def has_heldout_split(spec: str, train_ds) -> bool:
    """Whether ``spec`` holds held-out clips: always for synthetic data; rows / samples marked ``val`` (or
    ``valid``, ``validation``, ``test``, ``heldout``) for manifests and shards."""
    from fastvl.data.manifest import HELDOUT_NAMES, read_manifest

    if spec == "synthetic":
        return True
    if hasattr(train_ds, "shard_index"):
        return any(s in HELDOUT_NAMES for ix in train_ds.shard_index for s in ix.splits)
    return any(e.split in HELDOUT_NAMES for e in read_manifest(spec))


def eval_data_plan(cfg: TrainConfig, train_ds) -> tuple[str, str, int | None, str | None]:
    """(spec, split, clip limit, note) of the final evaluation: ``--eval-data``'s held-out split, else the
    data's own, else (no held-out split) the first ``--val-clips`` (256) training clips, said in the note."""
    eval_spec = cfg.extra.get("eval_data") or cfg.data
    if eval_spec != cfg.data or has_heldout_split(cfg.data, train_ds):
        return eval_spec, "val", None, None
    limit = cfg.extra.get("val_clips") or 256
    note = f"on training clips (at most {limit}): {cfg.data!r} has no held-out split, these are not held-out figures"
    return cfg.data, "train", limit, note


def truncated(batches, limit: int | None):
    """Yield ``batches`` until ``limit`` items (the last batch cut to fit); all of them when None."""
    seen = 0
    for b in batches:
        if limit is not None and seen + len(b["label"]) > limit:
            keep = limit - seen
            if keep > 0:
                yield {k: v[:keep] for k, v in b.items()}
            return
        seen += len(b["label"])
        yield b


def make_eval_batches(cfg: TrainConfig, train_ds, data_kw: dict[str, Any], tok, text_len: int):
    """(() -> iterator of evaluation batches, note or None) per :func:`eval_data_plan`."""
    from fastvl.data import build_loader, open_dataset

    spec, split, limit, note = eval_data_plan(cfg, train_ds)
    n_val = cfg.extra.get("val_clips")

    def eval_batches():
        val_ds = open_dataset(
            spec,
            split,
            train=False,
            seed=cfg.seed,
            **({"num_clips": n_val} if n_val and spec == "synthetic" else {}),
            **{k: v for k, v in data_kw.items() if k != "cache"},
        )
        loader = build_loader(
            val_ds, cfg.eval_batch_size, train=False, tokenizer=tok, max_len=text_len, num_workers=cfg.num_workers
        )
        return truncated(iter(loader), limit)

    return eval_batches, note


def synthetic_label_captions(train_ds, tok, text_len: int):
    """For the attribute probe: () -> (ids, mask, {attribute: value index}) of every label's canonical caption."""

    def label_captions():
        c = train_ds.config
        names = [train_ds.decode_label(lab) for lab in range(c.num_labels)]
        ids, mask = tok.encode([train_ds.captions_for(lab)[0] for lab in range(c.num_labels)], max_len=text_len)
        attrs = {
            attr: torch.tensor([vals.index(n[i]) for n in names])
            for i, (attr, vals) in enumerate((("colour", c.colors), ("shape", c.shapes), ("motion", c.motions)))
        }
        return ids, mask, attrs

    return label_captions


def build(cfg: TrainConfig, info: DistInfo) -> Components:
    """Tokenizer, model and loaders for ``cfg`` on this rank."""
    from fastvl.data import build_loader
    from fastvl.data.synthetic import SyntheticVideoText
    from fastvl.models import config_fields, create_model

    overrides, data_kw = plan(cfg)
    frames, size, text_len = probe_architecture(cfg, overrides)
    data_kw = {"num_frames": frames, "size": size, **data_kw}
    if fam_has_audio(cfg.model):
        data_kw.setdefault("audio", True)
    train_ds = open_training_data(cfg, info, data_kw)
    tok, tok_dir = load_or_train_tokenizer(cfg, info, train_ds)
    text = dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id)
    text = {k: v for k, v in text.items() if k in config_fields(cfg.model)}  # a video-only model takes none
    model = create_model(cfg.model, backend=cfg.backend, **overrides, **text)
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

    eval_batches, eval_note = make_eval_batches(cfg, train_ds, data_kw, tok, text_len)
    is_synthetic = isinstance(train_ds, SyntheticVideoText)
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
        "note": synthetic_note(cfg.model, cfg.data),
    }
    if info.is_main:
        print(
            f"{cfg.model}: {describe['params'] / 1e6:.2f}M params, {frames} frames at {size}px, text {text_len} "
            f"tokens, vocab {tok.vocab_size}; data {cfg.data!r}: {len(train_ds)} training clips, "
            f"{len(loader)} batches of {cfg.batch_size} per epoch per rank, world size {info.world_size}"
        )
        if eval_note:
            print(f"evaluation {eval_note}")
        if synthetic_note(cfg.model, cfg.data):
            print(f"note: {synthetic_note(cfg.model, cfg.data)}")
    return Components(
        model,
        make_loader,
        len(loader),
        eval_batches,
        cfg.batch_size,
        describe,
        synthetic_label_captions(train_ds, tok, text_len) if is_synthetic else None,
        skipped_videos=(lambda: train_ds.skipped) if hasattr(train_ds, "skipped") else None,
        eval_note=eval_note,
    )
