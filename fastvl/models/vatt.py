"""VATT (Akbari et al. 2021): video, audio and text Transformers trained with NCE and MIL-NCE.

Tokenizers: video 4x16x16x3 voxels -> C (a Linear on flattened patches, the Conv3D-equivalent, flattened
(c, t, h, w) like a Conv3d weight) plus factorised learnable temporal/vertical/horizontal positions
(summed, then LayerNorm'd, as VATT's SpatioTemporalEmbeddings); audio 128-sample waveform patches -> C
with 1-D positions; text: a 300-d word table -> C with absolute positions (a word2vec-style table, here
trainable since none ships). Positions are added before DropToken (``fastvl.ops.drop_tokens``, training
only, one subset shared by the batch, ``keep_rate`` default 0.5); the AGG token is prepended after.
Heads: video -> va 512 (Linear-BN-ReLU-Linear-BN), audio -> va (Linear), video va -> vt 256
(ReLU-Linear-BN), text -> vt (Linear). Loss = (NCE(video, audio) + MIL-NCE(video, text)) / 2 at
temperature 0.07. Token reduction (``merge_r`` / ``merge_mode`` / ``select_*``, :mod:`fastvl.models.blocks`) runs in
the video backbone after DropToken, on the kept tokens (the AGG token protected; audio and text never reduced);
its frame forms (``merge_mode="frame"``, ``select_frames``) need ``keep_rate=1``. The modality-agnostic variant
(``agnostic=True``) shares one backbone; tokenizers, positions, AGG and pre/post projections (Linear + GELU, as
VATT's UniversalVATT) stay per modality.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastvl import rules

from . import layers
from ._common import FLOAT_DTYPES, BatchChecker, VLModel, l2norm
from .blocks import Encoder
from .reduction import Reduce, TokenReduction, reduction_settings

MODALITIES = ("video", "audio", "text")


@dataclasses.dataclass
class VATTConfig:
    # (depth, width, heads) per modality; MLP ratio 4 everywhere (VATT's Small/Base/Medium/Large)
    video: tuple[int, int, int] = (12, 1024, 16)
    audio: tuple[int, int, int] = (12, 768, 12)
    text: tuple[int, int, int] = (6, 512, 8)
    agnostic: bool = False  # one shared backbone (``video`` gives its size)
    post_proj_dim: int | None = None  # agnostic: per-modality post projection width (default: width)
    mlp_ratio: float = 4.0
    num_frames: int = 32
    img_size: int = 224
    patch_t: int = 4
    patch_s: int = 16
    audio_patch: int = 128
    max_audio_tokens: int = 1200  # 3.2 s at 48 kHz
    max_text_len: int = 16
    vocab_size: int = 30522  # BERT ids like the other models (VATT used a 2^16 word2vec vocabulary: override)
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    text_embed_dim: int = 300
    keep_rate: float = 0.5  # DropToken: fraction of video / audio tokens kept in training
    va_dim: int = 512
    vt_dim: int = 256
    temperature: float = 0.07
    eps: float = 1e-6
    drop: float = 0.0
    # token reduction on the video tokens (fastvl/models/blocks.py): ToMe merging of merge_r tokens per clip (per
    # tubelet frame with merge_mode="frame")
    # in every block (sizes -> proportional attention with merge_prop_attn), or SMAUG selection before block
    # select_layer of select_keep of each frame's tokens (float: fraction, int: count) and the select_frames best
    # frames, scored by the AGG attention (select_scorer="attention") or a learned linear scorer ("linear")
    merge_r: int = 0
    merge_mode: str = "joint"  # "joint" | "frame" (needs keep_rate=1: DropToken leaves no equal frames)
    merge_prop_attn: bool = True
    select_keep: float | int | None = None
    select_frames: int | None = None
    select_layer: int = 1
    select_scorer: str = "attention"


class VideoTokenizer(nn.Module):
    """(B, T, 3, H, W) -> tokens (B, T/pt * H/ps * W/ps, C) and LN'd factorised positions (L, C)."""

    def __init__(self, cfg: VATTConfig, dim: int, backend: str | None):
        super().__init__()
        self.pt, self.ps = cfg.patch_t, cfg.patch_s
        self.proj = nn.Linear(3 * self.pt * self.ps * self.ps, dim)
        self.pos_t = nn.Parameter(torch.zeros(cfg.num_frames // self.pt, dim))
        self.pos_h = nn.Parameter(torch.zeros(cfg.img_size // self.ps, dim))
        self.pos_w = nn.Parameter(torch.zeros(cfg.img_size // self.ps, dim))
        self.pos_norm = layers.LayerNorm(dim, eps=cfg.eps, backend=backend)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, Cin, H, W = video.shape
        t, h, w = T // self.pt, H // self.ps, W // self.ps
        x = video.reshape(B, t, self.pt, Cin, h, self.ps, w, self.ps).permute(0, 1, 4, 6, 3, 2, 5, 7)
        x = self.proj(x.reshape(B, t * h * w, Cin * self.pt * self.ps * self.ps))
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        return x, self.pos_norm(pos.reshape(t * h * w, -1))


class AudioTokenizer(nn.Module):
    """Waveform (B, n) -> tokens (B, n / 128, C) and LN'd positions (L, C)."""

    def __init__(self, cfg: VATTConfig, dim: int, backend: str | None):
        super().__init__()
        self.patch = cfg.audio_patch
        self.proj = nn.Linear(self.patch, dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_audio_tokens, dim))
        self.pos_norm = layers.LayerNorm(dim, eps=cfg.eps, backend=backend)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = audio.shape[1] // self.patch
        return self.proj(audio.reshape(audio.shape[0], L, self.patch)), self.pos_norm(self.pos[:L])


class TextTokenizer(nn.Module):
    """ids (B, Lt) -> tokens (B, Lt, C) via a 300-d word table and a projection, and LN'd positions."""

    def __init__(self, cfg: VATTConfig, dim: int, backend: str | None, act: bool):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_embed_dim)
        self.proj = nn.Linear(cfg.text_embed_dim, dim)
        self.act = nn.GELU() if act else nn.Identity()
        self.pos = nn.Parameter(torch.zeros(cfg.max_text_len, dim))
        self.pos_norm = layers.LayerNorm(dim, eps=cfg.eps, backend=backend)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act(self.proj(self.embed(ids))), self.pos_norm(self.pos[: ids.shape[1]])


class VATT(VLModel):
    """VATT pretraining model. ``forward(batch, noise=None)`` -> ``{"nce_va", "mil_nce_vt", "loss"}``.

    Batch: ``video`` float (B, T, 3, H, W), ``audio`` float (B, n) raw waveform, ``text_ids`` int (B, Lt) and
    ``text_mask`` bool (B, Lt), or ``text_ids_all`` / ``text_mask_all`` (B, P, Lt) for P MIL-NCE positives.
    A sample whose text mask is all False has no text (``valid`` of the MIL-NCE loss).
    ``noise`` (optional) fixes DropToken's subsets: ``{"video": (Lv,), "audio": (La,)}`` float, the kept
    tokens are the first ``int(keep_rate * L)`` of ``argsort(noise)``, identical on every backend.
    """

    name = "VATT"
    config_cls = VATTConfig

    def __init__(self, config: VATTConfig | None = None, backend: str | None = None, **overrides):
        super().__init__(backend)
        cfg = dataclasses.replace(config or VATTConfig(), **overrides)
        if cfg.num_frames % cfg.patch_t or cfg.img_size % cfg.patch_s:
            raise ValueError(
                f"VATT: num_frames={cfg.num_frames} / img_size={cfg.img_size} must be divisible by the patch "
                f"{cfg.patch_t}x{cfg.patch_s}x{cfg.patch_s}"
            )
        rules.keep_rate("VATT", cfg.keep_rate)
        settings = reduction_settings(
            "VATT", cfg, cfg.video[0], cfg.num_frames // cfg.patch_t if cfg.keep_rate == 1.0 else None,
            f"DropToken (keep_rate={cfg.keep_rate}) keeps a random subset of the clip's tokens, not equal frames: "
            "set keep_rate=1",
        )  # fmt: skip
        self.config = cfg
        sizes = {m: (cfg.video if cfg.agnostic else getattr(cfg, m)) for m in MODALITIES}
        width = {m: sizes[m][1] for m in MODALITIES}

        def encoder(depth, dim, heads):
            return Encoder(depth, dim, heads, cfg.mlp_ratio, True, cfg.eps, cfg.drop, backend)

        self.video_tokenizer = VideoTokenizer(cfg, width["video"], backend)
        self.audio_tokenizer = AudioTokenizer(cfg, width["audio"], backend)
        self.text_tokenizer = TextTokenizer(cfg, width["text"], backend, act=cfg.agnostic)
        self.agg_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(width[m])) for m in MODALITIES})
        if cfg.agnostic:
            self.backbone = encoder(*cfg.video)
            d, dp = cfg.video[1], cfg.post_proj_dim or cfg.video[1]
            self.pre_proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.GELU()) for m in ("video", "audio")})
            self.post_proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dp), nn.GELU()) for m in MODALITIES})
            out = dict.fromkeys(MODALITIES, dp)
        else:
            self.backbones = nn.ModuleDict({m: encoder(*sizes[m]) for m in MODALITIES})
            out = width
        va, vt = cfg.va_dim, cfg.vt_dim
        self.video_to_va = nn.Sequential(
            nn.Linear(out["video"], va), nn.BatchNorm1d(va), nn.ReLU(), nn.Linear(va, va), nn.BatchNorm1d(va)
        )
        self.token_reduction = TokenReduction(settings, width["video"], backend)
        self.audio_to_va = nn.Linear(out["audio"], va)
        self.va_to_vt = nn.Sequential(nn.ReLU(), nn.Linear(va, vt), nn.BatchNorm1d(vt))
        self.text_to_vt = nn.Linear(out["text"], vt)
        self.apply(self._init_weights)
        for tok in (self.video_tokenizer, self.audio_tokenizer, self.text_tokenizer):
            for n, p in tok.named_parameters():
                if n.startswith("pos") and not n.startswith("pos_norm"):
                    nn.init.trunc_normal_(p, std=0.02)
        for p in self.agg_tokens.values():
            nn.init.trunc_normal_(p, std=0.02)

    # ---- inputs ------------------------------------------------------------------------------

    def _check_video(self, chk: BatchChecker) -> torch.Tensor:
        cfg = self.config
        v = chk.video("video")
        T = v.shape[1]
        if T % cfg.patch_t or T > cfg.num_frames:
            chk.fail(
                "video",
                f"has {T} frames: needs a multiple of the temporal patch {cfg.patch_t}, at most num_frames="
                f"{cfg.num_frames} (the temporal position table)",
            )
        chk.check_spatial("video", v, cfg.patch_s, cfg.img_size)
        return v

    def _check_audio(self, chk: BatchChecker) -> torch.Tensor:
        cfg = self.config
        a = chk.get("audio", ndim=2, layout="(B, n) raw waveform", dtypes=FLOAT_DTYPES)
        n = a.shape[1]
        if n % cfg.audio_patch or n == 0:
            chk.fail("audio", f"has {n} samples, not a positive multiple of the audio patch {cfg.audio_patch}")
        if n // cfg.audio_patch > cfg.max_audio_tokens:
            chk.fail(
                "audio",
                f"has {n} samples = {n // cfg.audio_patch} patches, more than the position table "
                f"({cfg.max_audio_tokens} patches = {cfg.max_audio_tokens * cfg.audio_patch} samples)",
            )
        return a

    def _check_text(self, chk: BatchChecker) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if chk.batch.get("text_ids_all") is not None:
            return chk.text("text_ids_all", "text_mask_all", cfg.max_text_len, cfg.vocab_size, ndim=3)
        ids, mask = chk.text("text_ids", "text_mask", cfg.max_text_len, cfg.vocab_size)
        return ids[:, None], mask[:, None]

    # ---- encoders ----------------------------------------------------------------------------

    def _backbone(self, m: str) -> Encoder:
        return self.backbone if self.config.agnostic else self.backbones[m]

    def _drop(self, x, pos, keep_rate: float, noise: torch.Tensor | None):
        L = x.shape[1]
        pos = pos.to(x.dtype)
        if keep_rate >= 1.0:
            return x + pos
        if noise is None:
            return layers.drop_tokens(x, keep_rate, pos=pos, backend=self.backend)[0]
        if tuple(noise.shape) != (L,):
            raise ValueError(f"VATT: DropToken noise must have shape (L,)=({L},), got {tuple(noise.shape)}")
        K = rules.keep_count(L, keep_rate)
        ids = torch.argsort(noise.to(x.device).float(), stable=True)[:K]
        return layers.gather_tokens(x, ids, pos, unique_indices=True, check_bounds=False, backend=self.backend)

    def _encode(self, m: str, tokens, pos, pad=None, keep_rate: float = 1.0, noise=None, frames: int = 1):
        """tokens (B, L, C) + positions -> (DropToken) -> [AGG; tokens] -> backbone -> AGG output (B, C').
        Video: ``frames`` tubelet frames of equal length in ``tokens`` (token reduction's frame forms)."""
        if self.config.agnostic and m in self.pre_proj:
            tokens = self.pre_proj[m](tokens)
        x = self._drop(tokens, pos, keep_rate, noise)
        B = x.shape[0]
        x = torch.cat([self.agg_tokens[m].to(x.dtype).expand(B, 1, -1), x], dim=1)
        if pad is not None:
            pad = torch.cat([pad.new_zeros(B, 1), pad], dim=1)
        reduce = None
        if m == "video":
            s = self.token_reduction.settings
            if keep_rate < 1.0 and (s.select_frames is not None or (s.merges and s.merge_mode == "frame")):
                raise ValueError(
                    f"VATT: merge_mode='frame' / select_frames need whole frames of tokens, but DropToken runs at "
                    f"keep_rate={keep_rate}"
                )
            reduce = Reduce(self.token_reduction, 1, frames=frames if keep_rate >= 1.0 else 1)
        agg = self._backbone(m)(x, pad, None, reduce)[:, 0]
        return self.post_proj[m](agg) if self.config.agnostic else agg

    def video_features(self, video: torch.Tensor, keep_rate: float = 1.0, noise=None) -> torch.Tensor:
        """Video backbone output at the AGG token (B, C'); DropToken keeps ``keep_rate`` of the tokens."""
        frames = video.shape[1] // self.config.patch_t
        return self._encode("video", *self.video_tokenizer(video), keep_rate=keep_rate, noise=noise, frames=frames)

    def audio_features(self, audio: torch.Tensor, keep_rate: float = 1.0, noise=None) -> torch.Tensor:
        return self._encode("audio", *self.audio_tokenizer(audio), keep_rate=keep_rate, noise=noise)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (N, Lt) -> AGG output (N, C'); padded tokens are masked keys."""
        return self._encode("text", *self.text_tokenizer(ids), pad=~mask)

    def backbones_forward(self, batch: dict, keep_rate: float | None = None) -> dict[str, torch.Tensor]:
        """The three backbones only (tokenizers + transformers; what VATT's GFLOPs table counts).
        ``keep_rate`` (default: the config's in training, 1 at eval) applies DropToken to video and audio."""
        chk = BatchChecker(self.name, batch)
        video, audio = self._check_video(chk), self._check_audio(chk)
        ids, mask = self._check_text(chk)
        k = keep_rate if keep_rate is not None else (self.config.keep_rate if self.training else 1.0)
        return {
            "video": self.video_features(video, k),
            "audio": self.audio_features(audio, k),
            "text": self.text_features(ids.flatten(0, 1), mask.flatten(0, 1)),
        }

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """L2-normalised video embeddings in the video-text space (B, vt_dim); no DropToken."""
        video = self._check_video(BatchChecker(f"{self.name}.encode_video", {"video": video}))
        return l2norm(self.va_to_vt(self.video_to_va(self.video_features(video))))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings in the video-text space (B, vt_dim)."""
        chk = BatchChecker(f"{self.name}.encode_text", {"text_ids": ids, "text_mask": mask})
        ids, mask = chk.text("text_ids", "text_mask", self.config.max_text_len, self.config.vocab_size)
        return l2norm(self.text_to_vt(self.text_features(ids, mask)))

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """L2-normalised audio embeddings in the video-audio space (B, va_dim); no DropToken."""
        audio = self._check_audio(BatchChecker(f"{self.name}.encode_audio", {"audio": audio}))
        return l2norm(self.audio_to_va(self.audio_features(audio)))

    def forward(self, batch: dict, noise: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Pretraining loss (NCE(video, audio) + MIL-NCE(video, text)) / 2 at temperature 0.07."""
        chk = BatchChecker(self.name, batch)
        video, audio = self._check_video(chk), self._check_audio(chk)
        ids, mask = self._check_text(chk)
        noise = noise or {}
        k = self.config.keep_rate if self.training else 1.0
        B, P, Lt = ids.shape
        z_va = self.video_to_va(self.video_features(video, k, noise.get("video")))
        a_va = self.audio_to_va(self.audio_features(audio, k, noise.get("audio")))
        z_vt = self.va_to_vt(z_va)
        t_vt = self.text_to_vt(self.text_features(ids.reshape(B * P, Lt), mask.reshape(B * P, Lt)))
        scale = torch.tensor(1.0 / self.config.temperature, device=video.device)
        valid = mask.flatten(1).any(1)
        nce = layers.mil_nce_loss(l2norm(z_va), l2norm(a_va)[:, None], scale, backend=self.backend)
        mil = layers.mil_nce_loss(l2norm(z_vt), l2norm(t_vt).reshape(B, P, -1), scale, valid, backend=self.backend)
        return {"nce_va": nce, "mil_nce_vt": mil, "loss": (nce + mil) / 2}
