"""All-in-one (Wang et al. 2022): one ViT stream over [text; video] per frame with temporal token rolling.

Tokens per frame sequence: the text (word + position, LayerNorm, modality type 0), copied per frame, then
the frame's CLS + patches (patch embedding + positions, temporal embedding on patches, modality type 1):
``(B*T, Lt + 1 + N, C)``. Tokens roll in time before every block (``rolling="fused"``: roll-aware
attention, nothing copied; ``"explicit"``: ``fastvl.ops.temporal_token_roll``); the frame average of all
tokens feeds the heads. Pretraining losses: VTM (half the pairs get another video of the batch, one whose
caption differs: uniformly, or by VTC similarity with ``vtm_negatives="hard"``; pooler on the text CLS -> 2
classes), MLM (15% of real tokens, 80/10/10; the head and its vocabulary loss run at the masked positions only,
the logits never materialised) and VTC (unimodal passes without rolling, as in the paper's
code, or with rolling in the video pass with ``video_roll=True``; Linear to 512, temperature 0.05, symmetric).

Token reduction (``merge_r`` / ``select_*``, :mod:`fastvl.models.blocks`) acts on the video tokens of the fused
and the unimodal video passes; the text and the CLS are never merged or dropped. Each frame row is reduced on its
own to an equal count (merging per row, selection of an equal count per row), selection can drop whole frame rows
(``select_frames``), and rolling continues on the reduced ``(B, T', L')`` frame grid as defined in
:mod:`fastvl.models.blocks`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import rules

from . import layers
from ._common import BatchChecker, VLModel, l2norm, rng_device, sincos_1d, sincos_2d
from .blocks import Encoder, Roll
from .reduction import Reduce, TokenReduction, reduction_settings


@dataclasses.dataclass
class AllInOneConfig:
    depth: int = 12
    dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 3
    max_text_len: int = 40
    vocab_size: int = 30522
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    roll_fraction: float = 0.125
    rolling: str = "fused"  # "fused" | "explicit" | "none"
    vtc_dim: int = 512
    vtc_temperature: float = 0.05
    mlm_prob: float = 0.15
    tasks: tuple[str, ...] = ("vtm", "mlm", "vtc")
    loss_weights: tuple[float, ...] | None = None  # per task, default 1 each
    eps: float = 1e-6
    drop: float = 0.0
    vtm_negatives: str = "random"  # "random" (paper) | "hard" (drawn by VTC similarity, needs the vtc task)
    # "random" (truncated normal, std 0.02) | "sincos" (unit-scale sin-cos tables as the start: helps supervised
    # localisation from scratch, but swamps the patch content and collapses VTC-only training on All-in-one-Ti)
    pos_init: str = "random"
    video_roll: bool = False  # roll in the unimodal video pass (VTC) too; the paper rolls in the fused pass only
    # VTC embedding from "cls" (paper: the CLS token) or "mean" (mean of the real text tokens / of the patch
    # tokens). From scratch the text CLS of different captions starts nearly identical (cosine ~0.998 on
    # All-in-one-Ti), which can stall VTC-only training at a constant embedding; the mean starts apart.
    vtc_pool: str = "cls"
    # token reduction on the video tokens (fastvl/models/blocks.py): ToMe merging of merge_r tokens per frame row
    # in every block (sizes -> proportional attention with merge_prop_attn), or SMAUG selection before block
    # select_layer of select_keep of each frame's tokens (float: fraction, int: count) and the select_frames best
    # frames, scored by the text and CLS attention (select_scorer="attention") or a learned linear scorer ("linear")
    merge_r: int = 0
    merge_prop_attn: bool = True
    select_keep: float | int | None = None
    select_frames: int | None = None
    select_layer: int = 1
    select_scorer: str = "attention"


class AllInOne(VLModel):
    """All-in-one pretraining model. ``forward(batch)`` -> dict of losses (``vtm``, ``mlm``, ``vtc``, ``loss``).

    Batch: ``video`` float (B, T, 3, H, W), ``text_ids`` int (B, Lt), ``text_mask`` bool (B, Lt) True = real.
    ``encode_video(video)`` / ``encode_text(ids, mask)`` give L2-normalised (B, vtc_dim) VTC embeddings.
    """

    name = "AllInOne"
    config_cls = AllInOneConfig

    def __init__(self, config: AllInOneConfig | None = None, backend: str | None = None, **overrides):
        super().__init__(backend)
        cfg = dataclasses.replace(config or AllInOneConfig(), **overrides)
        if cfg.rolling not in ("fused", "explicit", "none"):
            raise ValueError(f"AllInOne: rolling must be 'fused', 'explicit' or 'none', got {cfg.rolling!r}")
        unknown = set(cfg.tasks) - {"vtm", "mlm", "vtc"}
        if unknown or not cfg.tasks:
            raise ValueError(f"AllInOne: tasks must be a non-empty subset of (vtm, mlm, vtc), got {cfg.tasks}")
        if cfg.vtm_negatives not in ("random", "hard"):
            raise ValueError(f"AllInOne: vtm_negatives must be 'random' or 'hard', got {cfg.vtm_negatives!r}")
        if cfg.vtm_negatives == "hard" and not {"vtm", "vtc"} <= set(cfg.tasks):
            raise ValueError(
                f"AllInOne: vtm_negatives='hard' draws by VTC similarity: tasks must hold vtm and vtc, got {cfg.tasks}"
            )
        if cfg.vtc_pool not in ("cls", "mean"):
            raise ValueError(f"AllInOne: vtc_pool must be 'cls' or 'mean', got {cfg.vtc_pool!r}")
        if cfg.pos_init not in ("random", "sincos"):
            raise ValueError(f"AllInOne: pos_init must be 'random' or 'sincos', got {cfg.pos_init!r}")
        if cfg.pos_init == "sincos" and cfg.dim % 4:
            raise ValueError(f"AllInOne: pos_init='sincos' needs dim divisible by 4, got dim={cfg.dim}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"AllInOne: img_size={cfg.img_size} must be divisible by patch_size={cfg.patch_size}")
        settings = reduction_settings("AllInOne", cfg, cfg.depth, cfg.num_frames)
        self.config = cfg
        C = cfg.dim
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        # text embeddings (BERT-style: word + position, LayerNorm)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, C)
        self.text_pos_embed = nn.Parameter(torch.zeros(cfg.max_text_len, C))
        self.text_norm = layers.LayerNorm(C, eps=cfg.eps, backend=backend)
        # video embeddings (ViT patch embedding + CLS + positions) and temporal embedding on patches
        self.patch_embed = nn.Conv2d(3, C, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1 + self.num_patches, C))
        self.temporal_embed = nn.Parameter(torch.zeros(cfg.num_frames, C))
        self.type_embed = nn.Embedding(2, C)  # 0 text, 1 video
        self.encoder = Encoder(cfg.depth, C, cfg.num_heads, cfg.mlp_ratio, True, cfg.eps, cfg.drop, backend)
        self.token_reduction = TokenReduction(settings, C, backend)
        # heads
        self.pooler = nn.Linear(C, C)
        self.vtm_head = nn.Linear(C, 2)
        self.mlm_transform = nn.Sequential(
            nn.Linear(C, C), nn.GELU(), layers.LayerNorm(C, eps=cfg.eps, backend=backend)
        )
        self.mlm_decoder = nn.Linear(C, cfg.vocab_size)
        self.vtc_text_proj = nn.Linear(C, cfg.vtc_dim)
        self.vtc_video_proj = nn.Linear(C, cfg.vtc_dim)
        self.apply(self._init_weights)
        for p in (self.text_pos_embed, self.cls_token, self.pos_embed, self.temporal_embed):
            nn.init.trunc_normal_(p, std=0.02)
        if cfg.pos_init == "sincos":
            # from scratch, a 0.02-std position table leaves the patch grid unordered for a long time
            # (a tiny model does not learn where the shape is); sin-cos starts it ordered, still trainable
            with torch.no_grad():
                self.pos_embed[1:].copy_(sincos_2d(cfg.img_size // cfg.patch_size, C))
                self.text_pos_embed.copy_(sincos_1d(cfg.max_text_len, C))

    # ---- inputs ------------------------------------------------------------------------------

    def _check_video(self, chk: BatchChecker, key: str = "video") -> torch.Tensor:
        v = chk.video(key)
        if v.shape[1] != self.config.num_frames:
            chk.fail(key, f"has {v.shape[1]} frames, the model takes num_frames={self.config.num_frames}")
        chk.check_spatial(key, v, self.config.patch_size, self.config.img_size)
        if tuple(v.shape[-2:]) != (self.config.img_size,) * 2:
            chk.fail(key, f"has frames of {tuple(v.shape[-2:])}, the position table is for {self.config.img_size}px")
        return v

    def _check_text(self, chk: BatchChecker) -> tuple[torch.Tensor, torch.Tensor]:
        return chk.text("text_ids", "text_mask", self.config.max_text_len, self.config.vocab_size)

    # ---- embeddings and passes ---------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, Lt) -> (B, Lt, C): LN(word + position) + type 0."""
        Lt = ids.shape[1]
        x = self.text_norm(self.word_embeddings(ids) + self.text_pos_embed[:Lt])
        return x + self.type_embed.weight[0]

    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> (B, T, 1 + N, C): [CLS; patches] + positions, temporal on patches, type 1."""
        B, T = video.shape[:2]
        x = self.patch_embed(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, N, C)
        x = x.reshape(B, T, self.num_patches, -1) + self.temporal_embed[:T, None]
        cls = self.cls_token.expand(B, T, 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=2) + self.pos_embed
        return x + self.type_embed.weight[1]

    def fused(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """One stream over [text; video] per frame, rolled before every block; frame average.

        text (B, Lt, C) embedded, text_mask (B, Lt) True = real, video (B, T, 1 + N, C) embedded
        -> (B, Lt + 1 + N, C) normalised tokens averaged over the T frame sequences.
        """
        B, T, L, C = video.shape
        Lt = text.shape[1]
        x = torch.cat([text[:, None].expand(B, T, Lt, C).to(video.dtype), video], dim=2).reshape(B * T, Lt + L, C)
        pad = torch.cat([~text_mask, text_mask.new_zeros(B, L)], dim=1)
        pad = pad[:, None].expand(B, T, Lt + L).reshape(B * T, Lt + L)
        y = self.encoder(x, pad, self._roll(T, Lt, L), Reduce(self.token_reduction, Lt + 1, row_frames=T))
        return y.reshape(B, -1, *y.shape[1:]).mean(1)

    def _roll(self, T: int, text_len: int, L: int) -> Roll | None:
        cfg = self.config
        f = rules.roll_count(L, cfg.roll_fraction)
        if cfg.rolling == "none" or T == 1 or f == 0:
            return None
        return Roll(T, text_len, cfg.roll_fraction, cfg.rolling)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text pass (no rolling): (B, Lt) -> normalised tokens (B, Lt, C)."""
        return self.encoder(self.embed_text(ids), ~mask)

    def video_features(self, video: torch.Tensor) -> torch.Tensor:
        """Unimodal video pass: (B, T, 3, H, W) -> frame-averaged tokens (B, 1 + N', C) (N' = N without token
        reduction)."""
        return self._video_pass(self.embed_video(video))[0].mean(1)

    def _video_pass(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedded video (B, T, 1 + N, C) through the encoder, rolled only with ``video_roll``, reduced with the
        token-reduction settings: tokens per frame row (B, T', 1 + N', C) and their sizes (B, T', 1 + N') (None
        without merging)."""
        B, T, L, C = v.shape
        roll = self._roll(T, 0, L) if self.config.video_roll else None
        reduce = Reduce(self.token_reduction, 1, row_frames=T)
        y, size = self.encoder(v.reshape(B * T, L, C), None, roll, reduce, return_size=True)
        y = y.reshape(B, -1, *y.shape[1:])
        return y, None if size is None else size.reshape(*y.shape[:3])

    def _vtc_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.text_features(ids, mask)
        if self.config.vtc_pool == "cls":
            pooled = y[:, 0]
        else:
            w = mask.to(y.dtype)[..., None]
            pooled = (y * w).sum(1) / w.sum(1).clamp_min(1)
        return l2norm(self.vtc_text_proj(pooled))

    def _vtc_video(self, v: torch.Tensor) -> torch.Tensor:
        y, size = self._video_pass(v)
        if self.config.vtc_pool == "cls":
            pooled = y[:, :, 0].mean(1)
        elif size is None:
            pooled = y[:, :, 1:].mean(2).mean(1)
        else:  # a merged token stands for size[...] patches: the mean over the original patches of each frame
            w = size[:, :, 1:, None].to(y.dtype)
            pooled = ((y[:, :, 1:] * w).sum(2) / w.sum(2)).mean(1)
        return l2norm(self.vtc_video_proj(pooled))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised VTC text embeddings (B, vtc_dim) from the unimodal pass: the text CLS, or with
        ``vtc_pool="mean"`` the mean of the real tokens."""
        chk = BatchChecker(f"{self.name}.encode_text", {"text_ids": ids, "text_mask": mask})
        ids, mask = self._check_text(chk)
        return self._vtc_text(ids, mask)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """L2-normalised VTC video embeddings (B, vtc_dim) from the frame-averaged unimodal pass: the CLS, or
        with ``vtc_pool="mean"`` the mean of the patch tokens."""
        video = self._check_video(BatchChecker(f"{self.name}.encode_video", {"video": video}))
        return self._vtc_video(self.embed_video(video))

    def vtm_logits(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Video-text matching logits (B, 2) (index 1 = match) from the fused pass (retrieval re-ranking)."""
        chk = BatchChecker(f"{self.name}.vtm_logits", {"video": video, "text_ids": ids, "text_mask": mask})
        video = self._check_video(chk)
        ids, mask = self._check_text(chk)
        y = self.fused(self.embed_text(ids), mask, self.embed_video(video))
        return self.vtm_head(torch.tanh(self.pooler(y[:, 0])))

    # ---- pretraining -------------------------------------------------------------------------

    def mlm_mask(
        self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of real, non-special tokens: each chosen with mlm_prob; of those 80% -> [MASK],
        10% -> random id, 10% kept. Returns (masked ids, labels with -100 where not chosen)."""
        cfg = self.config
        special = (ids == cfg.pad_id) | (ids == cfg.cls_id) | (ids == cfg.sep_id) | ~mask
        d = rng_device(generator, ids.device)
        u = torch.rand(ids.shape, generator=generator, device=d).to(ids.device)
        chosen = (u < cfg.mlm_prob) & ~special
        r = torch.rand(ids.shape, generator=generator, device=d).to(ids.device)
        rand_ids = torch.randint(cfg.vocab_size, ids.shape, generator=generator, device=d).to(ids.device)
        new = torch.where(chosen & (r < 0.8), torch.full_like(ids, cfg.mask_id), ids)
        new = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, new)
        return new, torch.where(chosen, ids, torch.full_like(ids, -100))

    def mlm_positions(self, text: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused text tokens ``text (B, Lt, C)`` at the masked positions and their labels: ``(n, C)``, ``(n,)``
        for the ``n`` labels that are not -100, in row-major order. On the meta device (``describe()``: shapes
        only) the positions are a stand-in of the expected count, ``round(mlm_prob * B * Lt)``."""
        tokens, flat = text.flatten(0, 1), labels.flatten()
        if labels.device.type == "meta":
            k = round(self.config.mlm_prob * labels.numel())
            return tokens[:k], flat[:k]
        idx = (flat != -100).nonzero().squeeze(1)
        return tokens.index_select(0, idx), flat.index_select(0, idx)

    def mlm_loss(self, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MLM loss of the fused text tokens ``text (B, Lt, C)`` against ``labels (B, Lt)`` (-100: not masked): the
        head (transform, LayerNorm, decoder) runs at the masked positions only, and the decoder's logits over the
        vocabulary are never materialised (``linear_cross_entropy``). Mean over the masked tokens (0 if none)."""
        hidden, targets = self.mlm_positions(text, labels)
        h = self.mlm_transform(hidden)
        dec = self.mlm_decoder
        loss = layers.linear_cross_entropy(h, dec.weight, dec.bias, targets, reduction="sum", backend=self.backend)
        return loss / max(1, targets.shape[0])

    def vtm_pairs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        sim: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VTM pairs for a batch of captions ``ids`` / ``mask`` (B, Lt): half the pairs (B // 2, at random) get
        another video of the batch whose caption differs from theirs (an identical caption is not a negative).
        That video is drawn uniformly, or with ``sim`` (B texts x B videos, VTC similarities) with probability
        softmax(sim) over the allowed videos (hard negatives, ALBEF). A pair whose caption every other clip
        shares stays positive. Returns (video index (B,), labels (B,), 1 = match)."""
        B, device = ids.shape[0], ids.device
        d = rng_device(generator, device)
        neg = torch.zeros(B, dtype=torch.bool, device=device)
        neg[torch.randperm(B, generator=generator, device=d)[: B // 2].to(device)] = True
        same_mask = (mask[:, None] == mask[None]).all(-1)
        same = same_mask & ((ids[:, None] == ids[None]) | ~mask[:, None]).all(-1)  # (B, B), diagonal True
        allowed = ~same
        has = allowed.any(1)
        if sim is None:
            w = allowed.float()
        else:
            w = torch.softmax(sim.detach().float().masked_fill(~allowed, float("-inf")), dim=1)
        w = torch.where(has[:, None], w, torch.ones_like(w))  # rows with no allowed video: any draw, unused
        pick = torch.multinomial(w.to(d), 1, generator=generator).squeeze(1).to(device)
        neg &= has
        return torch.where(neg, pick, torch.arange(B, device=device)), (~neg).long()

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pretraining losses for one batch. Randomness (MLM masks, VTM negatives) comes from ``generator``
        (default: torch's global generator), never from a backend, so backends can be compared."""
        chk = BatchChecker(self.name, batch)
        video = self._check_video(chk)
        ids, mask = self._check_text(chk)
        cfg = self.config
        B = video.shape[0]
        if "vtm" in cfg.tasks and B < 2:
            chk.fail("video", f"has batch size {B}: VTM negatives need another video in the batch (B >= 2)")
        v = self.embed_video(video)
        losses: dict[str, torch.Tensor] = {}
        if "vtc" in cfg.tasks:
            t, vv = self._vtc_text(ids, mask), self._vtc_video(v)
            scale = torch.tensor(1.0 / cfg.vtc_temperature, device=t.device)
            losses["vtc"] = layers.clip_loss(vv, t, scale, backend=self.backend)
        if "mlm" in cfg.tasks:
            mids, labels = self.mlm_mask(ids, mask, generator)
            y = self.fused(self.embed_text(mids), mask, v)
            losses["mlm"] = self.mlm_loss(y[:, : ids.shape[1]], labels)
        if "vtm" in cfg.tasks:
            sim = (t @ vv.t()) / cfg.vtc_temperature if cfg.vtm_negatives == "hard" else None
            vidx, labels = self.vtm_pairs(ids, mask, generator, sim)
            y = self.fused(self.embed_text(ids), mask, v[vidx])
            losses["vtm"] = F.cross_entropy(self.vtm_head(torch.tanh(self.pooler(y[:, 0]))).float(), labels)
        weights = cfg.loss_weights or (1.0,) * len(cfg.tasks)
        losses["loss"] = sum(w * losses[k] for k, w in zip(cfg.tasks, weights))
        return losses
