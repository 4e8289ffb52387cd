"""SimVTP (Ma et al. 2022): one masked autoencoder over video and text, plus VTC and VTM.

The video path is VideoMAE's (:class:`~fastvl.models.videomae.MaskedVideoModel`: tubelet embedding, fixed sin-cos
positions, tube masking of 90% by default, a 4-block 384-wide decoder behind ``fastvl.ops.restore_tokens``, the
per-channel normalised pixel loss of ``fastvl.ops.masked_patch_loss``). Text: BERT-style embeddings (word +
learned position, LayerNorm); each real, non-special token is masked with probability ``text_mask_ratio`` (0.75)
and replaced by ``[MASK]``, as SimVTP's code does (no 80/10/10). **One encoder** (the shared pre-norm block) runs
over ``[visible video tokens; text]``, text padding masked out. From its output the video tokens go to the
decoder, and the masked words are predicted by a vocabulary Linear on the text tokens at the masked positions only,
through ``fastvl.ops.linear_cross_entropy`` (the logits never materialised); SimVTP's code predicts words from the
encoder this way rather than with a text decoder.

VTC and VTM (switchable with ``tasks``; SimVTP reports both help) are SimVTP's: VTC embeds the masked video alone
and the masked text alone with the same encoder, mean-pools the tokens (real text tokens only; SimVTP's code also
averages the padding), and applies the symmetric contrastive loss at temperature 0.05 summed over both directions
(SimVTP's ``NormSoftmaxLoss``: twice open_clip's mean); VTM classifies the mean-pooled joint tokens of each text
with its own masked video (match) and with another clip's (no match; SimVTP draws any other clip, here one whose
caption differs, when there is one) through a 2-way Linear. The positive pairs are the joint pass above.
Retrieval (``encode_video`` / ``encode_text``) embeds the full clip and the full text the same way.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from ._common import BatchChecker, l2norm, rng_device
from .videomae import MaskedVideoModel, VideoMAEConfig

TASKS = ("mvm", "mlm", "vtc", "vtm")


@dataclasses.dataclass
class SimVTPConfig(VideoMAEConfig):
    max_text_len: int = 32
    vocab_size: int = 30522
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    text_mask_ratio: float = 0.75
    tasks: tuple[str, ...] = TASKS  # mvm (pixels), mlm (words), vtc, vtm
    loss_weights: tuple[float, ...] | None = None  # per task, default 1 each
    vtc_temperature: float = 0.05


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of ``x (B, S, C)`` where ``keep (B, S)`` is True -> (B, C)."""
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


class SimVTP(MaskedVideoModel):
    """SimVTP pretraining model. ``forward(batch, generator=None)`` -> ``{"mvm", "mlm", "vtc", "vtm", "loss"}`` (the
    tasks configured). Batch: ``video`` float (B, T, 3, H, W), ``text_ids`` int (B, Lt), ``text_mask`` bool (B, Lt)
    True = real. ``encode_video`` / ``encode_text`` give L2-normalised (B, dim) embeddings for retrieval."""

    name = "SimVTP"
    config_cls = SimVTPConfig

    def __init__(self, config: SimVTPConfig | None = None, backend: str | None = None, **overrides):
        cfg = dataclasses.replace(config or SimVTPConfig(), **overrides)
        super().__init__(cfg, backend)
        unknown = set(cfg.tasks) - set(TASKS)
        if unknown or not cfg.tasks or len(set(cfg.tasks)) != len(cfg.tasks):
            raise ValueError(f"SimVTP: tasks must be distinct names from {TASKS}, at least one, got {cfg.tasks!r}")
        if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.tasks):
            raise ValueError(
                f"SimVTP: loss_weights must give one weight per task {cfg.tasks}, got {cfg.loss_weights!r}"
            )
        if not 0.0 < cfg.text_mask_ratio <= 1.0:
            raise ValueError(f"SimVTP: text_mask_ratio must be in (0, 1], got {cfg.text_mask_ratio}")
        if not cfg.vtc_temperature > 0:
            raise ValueError(f"SimVTP: vtc_temperature must be > 0, got {cfg.vtc_temperature}")
        for field in ("max_text_len", "vocab_size"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"SimVTP: {field} must be >= 1, got {getattr(cfg, field)}")
        for field in ("pad_id", "cls_id", "sep_id", "mask_id"):
            if not 0 <= getattr(cfg, field) < cfg.vocab_size:
                raise ValueError(
                    f"SimVTP: {field}={getattr(cfg, field)} must be a token id in [0, vocab_size={cfg.vocab_size})"
                )
        C = cfg.dim
        self.word_embeddings = nn.Embedding(cfg.vocab_size, C)
        self.text_pos_embed = nn.Parameter(torch.zeros(cfg.max_text_len, C))
        self.text_norm = layers.LayerNorm(C, eps=cfg.eps, backend=backend)
        self.mlm_head = nn.Linear(C, cfg.vocab_size)
        self.vtm_head = nn.Linear(C, 2)
        self._init_mae()
        nn.init.trunc_normal_(self.text_pos_embed, std=0.02)

    # ---- text --------------------------------------------------------------------------------

    def _check_text(self, chk: BatchChecker) -> tuple[torch.Tensor, torch.Tensor]:
        return chk.text("text_ids", "text_mask", self.config.max_text_len, self.config.vocab_size)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, Lt) -> (B, Lt, C): LN(word + position)."""
        return self.text_norm(self.word_embeddings(ids) + self.text_pos_embed[: ids.shape[1]])

    def mask_text(
        self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SimVTP's text masking: each real token other than [CLS] / [SEP] / [PAD] is chosen with probability
        ``text_mask_ratio`` and replaced by [MASK]. Returns (masked ids, labels: the ids chosen, -100 elsewhere)."""
        cfg = self.config
        special = (ids == cfg.pad_id) | (ids == cfg.cls_id) | (ids == cfg.sep_id) | ~mask
        d = rng_device(generator, ids.device)
        chosen = (torch.rand(ids.shape, generator=generator, device=d).to(ids.device) < cfg.text_mask_ratio) & ~special
        return torch.where(chosen, torch.full_like(ids, cfg.mask_id), ids), torch.where(chosen, ids, -100)

    def mlm_loss(self, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the vocabulary head at the masked positions of ``text (B, Lt, C)`` (``labels`` not
        -100), the logits never materialised; 0 when nothing is masked. On the meta device (``describe()``) the
        positions are the expected count ``round(text_mask_ratio * B * Lt)``."""
        tokens, flat = text.flatten(0, 1), labels.flatten()
        if labels.device.type == "meta":
            k = round(self.config.text_mask_ratio * flat.numel())
            hidden, targets = tokens[:k], flat[:k]
        else:
            idx = (flat != -100).nonzero().squeeze(1)
            hidden, targets = tokens.index_select(0, idx), flat.index_select(0, idx)
        h = self.mlm_head
        loss = layers.linear_cross_entropy(hidden, h.weight, h.bias, targets, reduction="sum", backend=self.backend)
        return loss / max(1, targets.shape[0])

    # ---- retrieval embeddings ----------------------------------------------------------------

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """L2-normalised (B, dim) mean of the encoder's tokens over the full clip."""
        video = self._check_video(BatchChecker(f"{self.name}.encode_video", {"video": video}))
        return l2norm(self.encoder(self.video_tokens(video, 0.0)[0]).mean(1))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised (B, dim) mean of the encoder's real text tokens."""
        ids, mask = self._check_text(BatchChecker(f"{self.name}.encode_text", {"text_ids": ids, "text_mask": mask}))
        return l2norm(masked_mean(self.encoder(self.embed_text(ids), ~mask), mask))

    # ---- pretraining -------------------------------------------------------------------------

    def vtm_negatives(self, ids: torch.Tensor, mask: torch.Tensor, generator=None) -> torch.Tensor:
        """(B,) index of another clip for each text, one whose caption differs when the batch has one (else any
        other clip), drawn uniformly."""
        B = ids.shape[0]
        same = (mask[:, None] == mask[None]).all(-1) & ((ids[:, None] == ids[None]) | ~mask[:, None]).all(-1)
        other = ~torch.eye(B, dtype=torch.bool, device=ids.device)
        allowed = ~same
        w = torch.where(allowed.any(1, keepdim=True), allowed, other).float()
        d = rng_device(generator, ids.device)
        return torch.multinomial(w.to(d), 1, generator=generator).squeeze(1).to(ids.device)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pretraining losses of one batch; every random draw (video and text masks, VTM negatives) comes from
        ``generator`` (default: torch's global generator)."""
        chk = BatchChecker(self.name, batch)
        video = self._check_video(chk)
        ids, tmask = self._check_text(chk)
        cfg, B = self.config, video.shape[0]
        if "vtm" in cfg.tasks and B < 2:
            chk.fail("video", f"has batch size {B}: VTM negatives need another clip in the batch (B >= 2)")
        vis, mask, ids_restore = self.video_tokens(video, generator=generator)
        Kv = vis.shape[1]
        mids, labels = self.mask_text(ids, tmask, generator)
        text = self.embed_text(mids).to(vis.dtype)
        real = torch.cat([tmask.new_ones(B, Kv), tmask], dim=1)
        losses: dict[str, torch.Tensor] = {}
        y = None
        if {"mvm", "mlm", "vtm"} & set(cfg.tasks):
            y = self.encoder(torch.cat([vis, text], dim=1), ~real)
        if "mvm" in cfg.tasks:
            pred, places = self.reconstruct(y[:, :Kv], mask, ids_restore, generator)
            losses["mvm"] = self.reconstruction_loss(pred, video, mask, places)
        if "mlm" in cfg.tasks:
            losses["mlm"] = self.mlm_loss(y[:, Kv:], labels)
        if "vtc" in cfg.tasks:
            v = l2norm(self.encoder(vis).mean(1))
            t = l2norm(masked_mean(self.encoder(text, ~tmask), tmask))
            scale = torch.tensor(1.0 / cfg.vtc_temperature, device=v.device)
            losses["vtc"] = 2 * layers.clip_loss(v, t, scale, backend=self.backend)
        if "vtm" in cfg.tasks:
            neg = self.vtm_negatives(ids, tmask, generator)
            y_neg = self.encoder(torch.cat([vis[neg], text], dim=1), ~real)
            pooled = torch.cat([masked_mean(y, real), masked_mean(y_neg, real)])
            target = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)]).to(video.device)
            losses["vtm"] = F.cross_entropy(self.vtm_head(pooled).float(), target)
        weights = cfg.loss_weights or (1.0,) * len(cfg.tasks)
        losses["loss"] = sum(w * losses[k] for k, w in zip(cfg.tasks, weights))
        return losses

    @torch.no_grad()
    def heldout_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``reconstruction`` (the model's masked-patch loss, with the text masked as in training) and the
        :meth:`baselines` on the same masks and places."""
        chk = BatchChecker(self.name, batch)
        video = self._check_video(chk)
        ids, tmask = self._check_text(chk)
        vis, mask, ids_restore = self.video_tokens(video, generator=generator)
        Kv = vis.shape[1]
        mids, _ = self.mask_text(ids, tmask, generator)
        real = torch.cat([tmask.new_ones(vis.shape[0], Kv), tmask], dim=1)
        y = self.encoder(torch.cat([vis, self.embed_text(mids).to(vis.dtype)], dim=1), ~real)
        pred, places = self.reconstruct(y[:, :Kv], mask, ids_restore, generator)
        return {
            "reconstruction": self.reconstruction_loss(pred, video, mask, places),
            **self.baselines(video, mask, places),
        }

    def stats(self) -> dict:
        """``describe()``'s figures (on the meta device), the training forward at batch 2 (VTM negatives)."""
        cfg = self.config
        B, Lt = 2, cfg.max_text_len
        batch = {
            "video": self.meta_video(B),
            "text_ids": torch.empty(B, Lt, dtype=torch.long, device="meta"),
            "text_mask": torch.ones(B, Lt, dtype=torch.bool, device="meta"),
        }
        s = self.masked_stats(batch)
        s["params_text"] = sum(
            p.numel() for n, p in self.named_parameters() if n.startswith(("word_", "text_", "mlm_head"))
        )
        return s
