"""MAC (masked contrastive video-language pretraining): a masked dual encoder aligned contrastively.

Video: ViT-B/16 over T frames. Patches get spatial positions on the fly while each frame is masked
independently (``fastvl.ops.random_masking`` on ``(B*T, N, C)``, mask ratio 0.75 by default, the same
visible count per frame), then the temporal embedding; the visible tokens of all frames and a CLS token
are encoded together (joint space-time attention). Text: a 6-layer, 768-wide transformer (DistilBERT
sized) over LN(word + position) where a fraction (0.3) of each sample's real tokens after the CLS is
dropped (never the CLS, never padding; static shapes: see :meth:`MAC.mask_text`). CLS embeddings are
projected to 256, L2-normalised and aligned with the symmetric contrastive loss (masked video with masked
text, plus the full views when ``full_views``). The temperature is learnable (open_clip convention,
logit scale initialised to 1/0.07, clamped at 100).

Token reduction (``merge_r`` / ``merge_mode`` / ``select_*``, :mod:`fastvl.models.blocks`) runs in the video
encoder after the masking, on the visible tokens (T frames of equal count), in training and evaluation; the CLS
and the text encoder are never reduced.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from fastvl import rules

from . import layers
from ._common import BatchChecker, VLModel, l2norm, rng_device
from .blocks import Encoder
from .reduction import Reduce, TokenReduction, reduction_settings


@dataclasses.dataclass
class MACConfig:
    video: tuple[int, int, int] = (12, 768, 12)  # (depth, width, heads): ViT-B
    text: tuple[int, int, int] = (6, 768, 12)  # DistilBERT-sized
    mlp_ratio: float = 4.0
    num_frames: int = 4
    img_size: int = 224
    patch_size: int = 16
    max_text_len: int = 32
    vocab_size: int = 30522
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    video_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.3
    proj_dim: int = 256
    init_temperature: float = 0.07
    full_views: bool = False
    eps: float = 1e-6
    drop: float = 0.0
    # token reduction on the video tokens (fastvl/models/blocks.py): ToMe merging of merge_r tokens per clip (per frame
    # with merge_mode="frame")
    # in every block (sizes -> proportional attention with merge_prop_attn), or SMAUG selection before block
    # select_layer of select_keep of each frame's tokens (float: fraction, int: count) and the select_frames best
    # frames, scored by the CLS attention (select_scorer="attention") or a learned linear scorer ("linear")
    merge_r: int = 0
    merge_mode: str = "joint"  # "joint" (ToMe over the clip) | "frame" (r per frame)
    merge_prop_attn: bool = True
    select_keep: float | int | None = None
    select_frames: int | None = None
    select_layer: int = 1
    select_scorer: str = "attention"


class MAC(VLModel):
    """MAC pretraining model. ``forward(batch, noise=None)`` -> ``{"vtc_masked", ["vtc_full"], "loss"}``.

    Batch: ``video`` float (B, T, 3, H, W), ``text_ids`` int (B, Lt) (slot 0 the CLS), ``text_mask`` bool.
    Masks are drawn in training only. ``noise`` (optional) fixes them on every backend: ``{"video":
    (B*T, N), "text": (B, Lt - 1)}`` float in [0, 1), the kept tokens being those of lowest noise (MAE).
    """

    name = "MAC"
    config_cls = MACConfig

    def __init__(self, config: MACConfig | None = None, backend: str | None = None, **overrides):
        super().__init__(backend)
        cfg = dataclasses.replace(config or MACConfig(), **overrides)
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"MAC: img_size={cfg.img_size} must be divisible by patch_size={cfg.patch_size}")
        for name in ("video_mask_ratio", "text_mask_ratio"):
            if not 0.0 <= getattr(cfg, name) < 1.0:
                raise ValueError(f"MAC: {name} must be in [0, 1), got {getattr(cfg, name)}")
        settings = reduction_settings("MAC", cfg, cfg.video[0], cfg.num_frames)
        self.config = cfg
        (vd, vc, vh), (td, tc, th) = cfg.video, cfg.text
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        # video encoder
        self.patch_embed = nn.Conv2d(3, vc, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(vc))
        self.pos_cls = nn.Parameter(torch.zeros(vc))
        self.pos_spatial = nn.Parameter(torch.zeros(self.num_patches, vc))
        self.pos_temporal = nn.Parameter(torch.zeros(cfg.num_frames, vc))
        self.video_encoder = Encoder(vd, vc, vh, cfg.mlp_ratio, True, cfg.eps, cfg.drop, backend)
        self.video_proj = nn.Linear(vc, cfg.proj_dim)
        self.token_reduction = TokenReduction(settings, vc, backend)
        # text encoder
        self.word_embeddings = nn.Embedding(cfg.vocab_size, tc)
        self.text_pos_embed = nn.Parameter(torch.zeros(cfg.max_text_len, tc))
        self.text_norm = layers.LayerNorm(tc, eps=cfg.eps, backend=backend)
        self.text_encoder = Encoder(td, tc, th, cfg.mlp_ratio, True, cfg.eps, cfg.drop, backend)
        self.text_proj = nn.Linear(tc, cfg.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.apply(self._init_weights)
        for p in (self.cls_token, self.pos_cls, self.pos_spatial, self.pos_temporal, self.text_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def _check(self, chk: BatchChecker, video: bool = True, text: bool = True):
        out = []
        cfg = self.config
        if video:
            v = chk.video("video")
            if v.shape[1] != cfg.num_frames:
                chk.fail("video", f"has {v.shape[1]} frames, the model takes num_frames={cfg.num_frames}")
            chk.check_spatial("video", v, cfg.patch_size, cfg.img_size)
            if tuple(v.shape[-2:]) != (cfg.img_size,) * 2:
                chk.fail("video", f"has frames of {tuple(v.shape[-2:])}, the position table is for {cfg.img_size}px")
            out.append(v)
        if text:
            out.extend(chk.text("text_ids", "text_mask", cfg.max_text_len, cfg.vocab_size))
        return out

    # ---- encoders ----------------------------------------------------------------------------

    def video_features(self, video: torch.Tensor, mask_ratio: float = 0.0, noise=None) -> torch.Tensor:
        """(B, T, 3, H, W) -> CLS output (B, C); ``mask_ratio`` > 0 keeps int(N (1 - ratio)) patches per frame."""
        B, T = video.shape[:2]
        x = self.patch_embed(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, N, C)
        pos = self.pos_spatial.to(x.dtype)
        if mask_ratio > 0:
            x = layers.random_masking(x, mask_ratio, noise=noise, pos=pos, backend=self.backend)[0]
        else:
            x = x + pos
        K, C = x.shape[1:]
        x = (x.reshape(B, T, K, C) + self.pos_temporal[:T, None].to(x.dtype)).reshape(B, T * K, C)
        cls = (self.cls_token + self.pos_cls).to(x.dtype).expand(B, 1, C)
        reduce = Reduce(self.token_reduction, 1, frames=T)
        return self.video_encoder(torch.cat([cls, x], dim=1), None, None, reduce)[:, 0]

    def mask_text(
        self, x: torch.Tensor, mask: torch.Tensor, ratio: float, noise: torch.Tensor | None = None, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop ``int(ratio * n_i)`` of the n_i real tokens after the CLS of each sample, with static shapes.

        x (B, Lt, C) embedded, mask (B, Lt) True = real. Keeps ``K = int((Lt - 1) * (1 - ratio))`` slots
        after the CLS (``random_masking`` with padding ranked last); slot j of sample i is a real token
        iff ``j < int(n_i * (1 - ratio))``, the rest are masked keys. Returns (tokens (B, 1 + K, C),
        mask (B, 1 + K) True = real).
        """
        B, Lt, C = x.shape
        if Lt < 2:
            return x, mask
        rest, real = x[:, 1:], mask[:, 1:]
        if noise is None:
            d = rng_device(generator, x.device)
            noise = torch.rand(B, Lt - 1, generator=generator, device=d).to(x.device)
        elif tuple(noise.shape) != (B, Lt - 1):
            raise ValueError(f"MAC: text noise must have shape (B, Lt - 1)=({B}, {Lt - 1}), got {tuple(noise.shape)}")
        noise = torch.where(real, noise.float(), noise.float() + 2.0)  # padding sorts after every real token
        K = rules.keep_count(Lt - 1, 1 - ratio)
        if K < 1:
            return x[:, :1], mask[:, :1]
        vis = layers.random_masking(rest, 1 - K / (Lt - 1), noise=noise, backend=self.backend)[0]
        n_keep = rules.keep_count(real.sum(1), 1 - ratio)
        keep = torch.arange(K, device=x.device)[None] < n_keep[:, None]
        return torch.cat([x[:, :1], vis], dim=1), torch.cat([mask[:, :1], keep], dim=1)

    def text_features(
        self, ids: torch.Tensor, mask: torch.Tensor, mask_ratio: float = 0.0, noise=None, generator=None
    ) -> torch.Tensor:
        """(B, Lt) ids and mask -> CLS output (B, C); ``mask_ratio`` > 0 drops text tokens (see mask_text)."""
        x = self.text_norm(self.word_embeddings(ids) + self.text_pos_embed[: ids.shape[1]])
        if mask_ratio > 0:
            x, mask = self.mask_text(x, mask, mask_ratio, noise, generator)
        return self.text_encoder(x, ~mask)[:, 0]

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """L2-normalised video embeddings (B, proj_dim) of the full (unmasked) view."""
        (video,) = self._check(BatchChecker(f"{self.name}.encode_video", {"video": video}), text=False)
        return l2norm(self.video_proj(self.video_features(video)))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, proj_dim) of the full (unmasked) text."""
        chk = BatchChecker(f"{self.name}.encode_text", {"text_ids": ids, "text_mask": mask})
        ids, mask = self._check(chk, video=False)
        return l2norm(self.text_proj(self.text_features(ids, mask)))

    def forward(
        self, batch: dict, noise: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Symmetric contrastive loss of masked video with masked text (and the full views if configured)."""
        video, ids, mask = self._check(BatchChecker(self.name, batch))
        cfg, noise = self.config, noise or {}
        vr = cfg.video_mask_ratio if self.training else 0.0
        tr = cfg.text_mask_ratio if self.training else 0.0
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        v = l2norm(self.video_proj(self.video_features(video, vr, noise.get("video"))))
        t = l2norm(self.text_proj(self.text_features(ids, mask, tr, noise.get("text"), generator)))
        out = {"vtc_masked": layers.clip_loss(v, t, scale, backend=self.backend)}
        if cfg.full_views and (vr > 0 or tr > 0):
            vf = l2norm(self.video_proj(self.video_features(video)))
            tf = l2norm(self.text_proj(self.text_features(ids, mask)))
            out["vtc_full"] = layers.clip_loss(vf, tf, scale, backend=self.backend)
        out["loss"] = sum(out.values())
        return out
