"""Model registry by name, and ``describe``: parameters and forward FLOPs next to the papers' figures."""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from typing import Any, TextIO

import torch

from . import flops
from .allinone import AllInOne
from .mac import MAC
from .simvtp import SimVTP
from .vatt import VATT
from .videomae import VideoMAE

# VATT's backbone sizes (layers, hidden, heads; MLP = 4 x hidden) and their paper parameter counts
VATT_SIZES = {"small": (6, 512, 8), "base": (12, 768, 12), "medium": (12, 1024, 16), "large": (24, 1024, 16)}
VATT_PAPER_PARAMS = {"small": 20.9e6, "base": 87.9e6, "medium": 155.0e6, "large": 306.1e6}
_LETTER = {"s": "small", "b": "base", "m": "medium", "l": "large"}

_TINY_VATT = dict(
    num_frames=8, img_size=32, max_audio_tokens=16, text_embed_dim=24, va_dim=32, vt_dim=16, max_text_len=16
)

# the masked autoencoders' tiny variants: 4 frames of 32 px, 4 px patches (64 per frame, so 90% masking keeps 6)
_TINY_MAE = dict(
    depth=2,
    dim=64,
    num_heads=2,
    decoder_depth=1,
    decoder_dim=64,
    decoder_heads=2,
    img_size=32,
    patch_size=4,
    num_frames=4,
)

# VideoMAE's ViT-B (Kinetics-400 table, 16 frames of 224 px: 87M parameters, 180 GFLOPs counted by fvcore, which
# counts a multiply-add as one); MAE-ST's speed-up of 90% masking is a wall-clock time, not a FLOP count
_VIDEOMAE_B = {
    "params_encoder": 87e6,
    "gmacs_encoder": 180,
    "encoder_note": "MAE-ST (Feichtenhofer et al.) reports about 4x less wall-clock at 90% masking (a time)",
}

_MODELS: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {
    # name: (class, config, paper figures)
    "allinone-ti": (AllInOne, dict(depth=12, dim=192, num_heads=3), {"params": 12e6}),
    "allinone-s": (AllInOne, dict(depth=12, dim=384, num_heads=6), {"params": 33e6}),
    "allinone-b": (AllInOne, dict(depth=12, dim=768, num_heads=12), {"params": 110e6, "gmacs_fused": 58.7}),
    "allinone-tiny": (AllInOne, dict(depth=2, dim=64, num_heads=2, img_size=32, patch_size=8, max_text_len=12), {}),
    "vatt-bbs": (VATT, dict(video=VATT_SIZES["base"], audio=VATT_SIZES["base"], text=VATT_SIZES["small"]), {}),
    "vatt-mbs": (
        VATT,
        dict(video=VATT_SIZES["medium"], audio=VATT_SIZES["base"], text=VATT_SIZES["small"]),
        {"gflops_drop": {0: 784.8, 25: 574.2, 50: 375.4, 75: 188.1}},
    ),
    "vatt-lbs": (VATT, dict(video=VATT_SIZES["large"], audio=VATT_SIZES["base"], text=VATT_SIZES["small"]), {}),
    "vatt-ma-medium": (VATT, dict(video=VATT_SIZES["medium"], agnostic=True), {}),
    "vatt-tiny": (VATT, dict(video=(2, 64, 2), audio=(1, 48, 2), text=(1, 32, 2), **_TINY_VATT), {}),
    "vatt-ma-tiny": (VATT, dict(video=(2, 64, 2), agnostic=True, **_TINY_VATT), {}),
    "mac-b": (MAC, {}, {"flops_reduction": 0.60}),
    "mac-tiny": (
        MAC,
        dict(video=(2, 64, 2), text=(2, 64, 2), img_size=32, patch_size=8, max_text_len=12, proj_dim=32),
        {},
    ),
    # SimVTP's encoder is VideoMAE's ViT-B (its code starts from VideoMAE's Kinetics-400 weights): the figures
    # beside it are VideoMAE-B's
    "simvtp-b": (SimVTP, {}, {**_VIDEOMAE_B, "encoder_from": "VideoMAE-B"}),
    "simvtp-tiny": (SimVTP, dict(_TINY_MAE, max_text_len=16), {}),
    "videomae-b": (VideoMAE, {}, _VIDEOMAE_B),
    "videomae-tiny": (VideoMAE, _TINY_MAE, {}),
}


# token-reduction settings describe() and benchmarks/bench_tokred.py compare with the unreduced model: ToMe's r per
# block (ViT-B's 8-16 on ~200 tokens; VATT-MBS keeps 784 video tokens after DropToken) and SMAUG's keep ratio
_REDUCE_SELECT = {"select_keep": 0.5, "select_layer": 4}
REDUCTION_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "allinone": {
        "merge_r=8": {"merge_r": 8},
        "merge_r=16": {"merge_r": 16},
        "select_keep=0.5": _REDUCE_SELECT,
        "select_keep=0.5,select_frames=2": {**_REDUCE_SELECT, "select_frames": 2},
    },
    "mac": {
        "merge_r=8": {"merge_r": 8},
        "merge_r=16": {"merge_r": 16},
        "select_keep=0.5": _REDUCE_SELECT,
        "select_keep=0.5,select_frames=2": {**_REDUCE_SELECT, "select_frames": 2},
    },
    "vatt": {"merge_r=32": {"merge_r": 32}, "merge_r=64": {"merge_r": 64}, "select_keep=0.5": _REDUCE_SELECT},
    "tiny": {
        "merge_r=2": {"merge_r": 2},
        "merge_r=4": {"merge_r": 4},
        "select_keep=0.5": {"select_keep": 0.5, "select_layer": 1},
    },
}


def reduction_presets(name: str) -> dict[str, dict[str, Any]]:
    """The token-reduction settings compared for model ``name``: label -> config overrides (:data:`REDUCTION_PRESETS`;
    the tiny models' smaller ``r``, and ``select_frames=2`` where the frames allow it)."""
    if name not in _MODELS:
        raise ValueError(f"reduction_presets: unknown model {name!r}; available: {', '.join(_MODELS)}")
    family = _MODELS[name][0].__name__.lower()
    if name.endswith("-tiny"):
        out = dict(REDUCTION_PRESETS["tiny"])
        if family != "vatt":
            out["select_keep=0.5,select_frames=2"] = {"select_keep": 0.5, "select_layer": 1, "select_frames": 2}
        return out
    return dict(REDUCTION_PRESETS[family])


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(_MODELS)


def config_fields(name: str) -> set[str]:
    """The config fields of model ``name`` (what :func:`create_model` accepts besides ``backend``)."""
    if name not in _MODELS:
        raise ValueError(f"config_fields: unknown model {name!r}; available: {', '.join(_MODELS)}")
    return {f.name for f in dataclasses.fields(_MODELS[name][0].config_cls)}


def create_model(name: str, **overrides: Any):
    """Build a model by name; ``overrides`` replace config fields (e.g. ``vocab_size=65536``, ``rolling=
    "explicit"``, ``keep_rate=0.25``) or pass ``backend=``. Unknown names or fields raise with the choices."""
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(_MODELS)}")
    cls, cfg, _ = _MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    bad = sorted(set(overrides) - fields - {"backend"})
    if bad:
        raise TypeError(f"create_model({name!r}): unknown config field(s) {bad}; fields: {', '.join(sorted(fields))}")
    model = cls(**{**cfg, **overrides})
    model.model_name = name
    return model


def train_forward_flops(name: str, **overrides: Any) -> flops.Flops:
    """FLOPs of one training forward (all losses) per sample, counted at batch 2 on the meta device, of model
    ``name`` with config ``overrides`` (e.g. token reduction: ``merge_r=8``)."""
    m = _meta_model(name, **overrides)
    m.train()
    b = example_batch(m, 2)
    f = flops.count(lambda: m(b))
    return flops.Flops(f.total // 2, f.linear // 2, f.other // 2)


# ---- sizes and FLOPs -----------------------------------------------------------------------


def _meta_model(name: str, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def example_batch(model, batch_size: int = 1, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """A batch at the model's configured input size: video ``num_frames x img_size^2``, ``max_text_len``
    text tokens, for VATT ``max_audio_tokens * 128`` audio samples. On ``meta`` it only carries shapes."""
    cfg, B, device = model.config, batch_size, torch.device(device)
    real = device.type != "meta"
    Lt = getattr(cfg, "max_text_len", 16)  # a video-only model (VideoMAE) ignores the text

    def rand(*shape):
        return torch.randn(*shape, device=device) if real else torch.empty(*shape, device=device)

    ids = torch.randint(1000, 2000, (B, Lt), device=device) if real else None
    batch = {
        "video": rand(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size),
        "text_ids": ids if real else torch.empty(B, Lt, dtype=torch.long, device=device),
        "text_mask": torch.ones(B, Lt, dtype=torch.bool, device=device),
    }
    if isinstance(model, VATT):
        batch["audio"] = rand(B, cfg.max_audio_tokens * cfg.audio_patch)
    return batch


def model_stats(name: str) -> dict[str, Any]:
    """Parameters and forward FLOPs of ``name`` at its configured input size, counted on the meta device.

    FLOPs are per sample (batch 1), or at batch 2 where training needs two samples (VTM negatives,
    BatchNorm), under the convention of :data:`fastvl.models.flops.CONVENTION`. Computed once per name.
    """
    return copy.deepcopy(_model_stats(name))


@functools.cache
def _model_stats(name: str) -> dict[str, Any]:
    if name not in _MODELS:
        raise ValueError(f"model_stats: unknown model {name!r}; available: {', '.join(_MODELS)}")
    paper = _MODELS[name][2]
    m = _meta_model(name)
    cfg = m.config
    out: dict[str, Any] = {"name": name, "family": type(m).__name__, "params": m.num_params(), "paper": paper}
    if hasattr(m, "stats"):  # models that count their own figures (the masked autoencoders)
        cfg = m.config
        out["inputs"] = f"{cfg.num_frames} frames {cfg.img_size}px" + (
            f", {cfg.max_text_len} text tokens" if hasattr(cfg, "max_text_len") else ""
        )
        out.update(m.stats())
        out["lines"] = m.describe_lines(out, paper)
        return out
    if isinstance(m, AllInOne):
        out["params_excl_mlm_decoder"] = m.num_params(exclude=("mlm_decoder",))
        b = example_batch(m, 1)
        m.eval()
        out["inputs"] = f"{cfg.num_frames} frames {cfg.img_size}px, {cfg.max_text_len} text tokens"
        out["flops_fused"] = flops.count(
            lambda: m.fused(m.embed_text(b["text_ids"]), b["text_mask"], m.embed_video(b["video"]))
        )
        m.train()
        b2 = example_batch(m, 2)
        out["flops_train_batch2"] = flops.count(lambda: m(b2))
        # the MLM head (transform Linear + vocabulary decoder, forward) runs at the masked positions only; on the
        # meta batch of 2 they are round(mlm_prob * 2 * Lt) positions, the expected count (mlm_positions)
        per_position = 2 * (cfg.dim * cfg.dim + cfg.dim * cfg.vocab_size)
        masked = round(cfg.mlm_prob * 2 * cfg.max_text_len) / 2
        out["mlm_head"] = {
            "masked_per_sample": masked,
            "text_tokens": cfg.max_text_len,
            "flops_masked": masked * per_position,
            "flops_every_position": cfg.max_text_len * per_position,
        }
    elif isinstance(m, VATT):
        bb = {}
        for mod in ("video", "audio", "text"):
            enc = m._backbone(mod)
            tok = getattr(m, f"{mod}_tokenizer")
            bb[mod] = sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in tok.proj.parameters())
        out["backbone_params"] = bb  # encoder + patch embedding (text: the 300 -> C projection)
        out["backbone_paper_size"] = _vatt_paper_sizes(name)
        out["agnostic"] = cfg.agnostic
        b = example_batch(m, 1)
        out["inputs"] = (
            f"video {cfg.num_frames}x{cfg.img_size}x{cfg.img_size}, audio {cfg.max_audio_tokens * cfg.audio_patch}"
            f" samples, {cfg.max_text_len} words"
        )
        m.eval()
        out["flops_drop"] = {
            d: flops.count(lambda d=d: m.backbones_forward(b, keep_rate=1 - d / 100)) for d in (0, 25, 50, 75)
        }
        m.train()
        b2 = example_batch(m, 2)
        out["flops_train_batch2"] = flops.count(lambda: m(b2))
        out["keep_rate"] = cfg.keep_rate
    else:
        b = example_batch(m, 1)
        m.train()
        out["inputs"] = f"{cfg.num_frames} frames {cfg.img_size}px, {cfg.max_text_len} text tokens"
        out["flops_masked"] = flops.count(lambda: m(b))
        m.config.video_mask_ratio = m.config.text_mask_ratio = 0.0
        out["flops_unmasked"] = flops.count(lambda: m(b))
        out["params_video"] = sum(
            p.numel() for n, p in m.named_parameters() if n.startswith(("patch_embed", "cls", "pos_", "video_"))
        )
        out["params_text"] = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("word_", "text_")))
    out["flops_reduction"] = {"none": train_forward_flops(name)}
    for label, overrides in reduction_presets(name).items():
        out["flops_reduction"][label] = train_forward_flops(name, **overrides)
    return out


def _vatt_paper_sizes(name: str) -> dict[str, str]:
    if "-ma-" in name:
        return {"video": "medium"} if name == "vatt-ma-medium" else {}
    if name.endswith("tiny"):
        return {}
    code = name.split("-")[1]
    return {mod: _LETTER[c] for mod, c in zip(("video", "audio", "text"), code)}


def _g(x: float) -> str:
    """GFLOPs with one decimal, or more digits for the tiny models."""
    return f"{x / 1e9:.1f}" if x >= 1e9 else f"{x / 1e9:.4f}"


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.2f}%"


def describe(name: str, file: TextIO | None = None) -> dict[str, Any]:
    """Print parameters and forward FLOPs of model ``name`` beside the papers' figures; returns the numbers."""
    f = file or sys.stdout
    s = model_stats(name)
    p = s["paper"]

    def w(line=""):
        print(line, file=f)

    w(f"== model {name} ({s['family']}) ==")
    w(f"  parameters        {s['params']:,}")
    w(f"  FLOPs convention  {flops.CONVENTION}; per sample at {s['inputs']}")
    if "lines" in s:
        for line in s["lines"]:
            w(line)
        return s
    if s["family"] == "AllInOne":
        pe = s["params_excl_mlm_decoder"]
        extra = f"  (paper {p['params'] / 1e6:.0f}M: {_pct(pe, p['params'])})" if "params" in p else ""
        w(f"  params excl. MLM decoder {pe:,}{extra}")
        fl = s["flops_fused"]
        w(
            f"  fused pass (one video-text pair, encoder incl. embeddings, no heads): {_g(fl.total)} GFLOPs = "
            f"{_g(fl.macs)} GMACs; linear layers only (thop's scope) {_g(fl.linear_macs)} GMACs"
            + (f"; paper {p['gmacs_fused']} G (thop MACs)" if "gmacs_fused" in p else "")
        )
        t = s["flops_train_batch2"]
        w(f"  training forward (MLM + VTM fused passes, 2 unimodal VTC passes) per sample: {_g(t.total / 2)} GFLOPs")
        h = s["mlm_head"]
        w(
            f"  of which the MLM head (transform + vocabulary decoder) at the masked positions only, "
            f"{h['masked_per_sample']:g} of {h['text_tokens']} text tokens (mlm_prob): {_g(h['flops_masked'])} GFLOPs "
            f"(at every text position it would be {_g(h['flops_every_position'])})"
        )
    elif s["family"] == "VATT":
        for mod, n in s["backbone_params"].items():
            size = s["backbone_paper_size"].get(mod)
            what = (
                "shared backbone (encoder + video patch embedding)"
                if s["agnostic"]
                else f"{mod} backbone (encoder + patch embedding)"
            )
            ref = f"  (VATT-{size})" if size else ""
            if mod == "video" and size:  # the paper's Table 1 sizes are the video backbones (3072-wide patches)
                ref = f"  (paper {size} {VATT_PAPER_PARAMS[size] / 1e6:.1f}M: {_pct(n, VATT_PAPER_PARAMS[size])})"
            w(f"  {what} {n:,}{ref}")
            if s["agnostic"]:
                break
        paper = p.get("gflops_drop", {})
        for d, fl in s["flops_drop"].items():
            ref = f"  (paper {paper[d]})" if d in paper else ""
            w(
                f"  backbones forward, DropToken drop rate {d:>2}%: {_g(fl.total)} GFLOPs "
                f"(linear layers only {_g(fl.linear)}){ref}"
            )
        t = s["flops_train_batch2"]
        k = s["keep_rate"]
        w(f"  training forward (keep_rate {k}, heads and losses included) per sample: {_g(t.total / 2)} GFLOPs")
    else:
        mk, um = s["flops_masked"], s["flops_unmasked"]
        ref = f" (paper: {100 * p['flops_reduction']:.0f}% fewer)" if "flops_reduction" in p else ""
        w(f"  video encoder params {s['params_video']:,}, text encoder params {s['params_text']:,}")
        w(
            f"  training forward with default masks: {_g(mk.total)} GFLOPs; unmasked: {_g(um.total)} GFLOPs; "
            f"{100 * (1 - mk.total / um.total):.1f}% fewer{ref}"
        )
    red = s["flops_reduction"]
    base = red["none"].total
    w("  token reduction on the video tokens (training forward per sample at batch 2, --set FIELD=VALUE):")
    for label, fl in red.items():
        rel = "" if label == "none" else f"  ({100 * (fl.total / base - 1):+.1f}%)"
        w(f"    {label:<34} {_g(fl.total)} GFLOPs{rel}")
    return s
