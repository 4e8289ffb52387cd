"""VideoMAE (Tong et al. 2022): a video-only masked autoencoder with tube masking, and the masked-video parts it
shares with SimVTP.

Tokens: a Conv3d tubelet embedding (``tubelet x patch x patch``) cuts ``(B, T, 3, H, W)`` into ``T' = T / tubelet``
token frames of ``N = (H/patch)(W/patch)`` patches, in ``(t, h, w)`` order, plus a fixed sin-cos table over the
``T' N`` tokens (VideoMAE's 1-D table, fastvl's channel order: sines then cosines). Tube masking
(``fastvl.ops.tube_masking``; by default one mask for the whole clip, ratio 0.9) keeps ``K = int(N (1 - ratio))``
tokens per token frame, and the encoder (the shared pre-norm block, no CLS token) runs on those ``T' K`` tokens only.
A bias-free Linear maps them to the decoder width; ``fastvl.ops.restore_tokens`` writes the decoder input
``[visible + pos; mask token + pos at the reconstructed places]`` in one launch (VideoMAE's order); a light decoder
(4 blocks, 384 wide) and a Linear head predict the pixels of the reconstructed places, which
``fastvl.ops.masked_patch_loss`` scores against the patches normalised per channel (VideoMAE's target, built on the
fly from the clip after undoing the data's normalisation). ``decoder_keep < 1`` reconstructs only that fraction of
the masked places (VideoMAE V2's decoder masking; the places drawn uniformly, not V2's running-cell pattern).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastvl import rules

from . import flops, layers
from ._common import BatchChecker, VLModel, rng_device, sincos_1d
from .blocks import Encoder

# fastvl.data's clip normalisation (CLIP's mean and std), undone before the pixel targets are built
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
NORMS = (True, "patch", "channel", False)


@dataclasses.dataclass
class VideoMAEConfig:
    depth: int = 12  # encoder: ViT-B
    dim: int = 768
    num_heads: int = 12
    decoder_depth: int = 4
    decoder_dim: int = 384
    decoder_heads: int = 6
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet: int = 2
    mask_ratio: float = 0.9
    tube: int | None = None  # token frames per mask (None: the whole clip, VideoMAE's tube masking)
    decoder_keep: float = 1.0  # fraction of the masked places the decoder reconstructs (VideoMAE V2: 0.5 of all)
    norm_pix: bool | str = "channel"  # target: "channel" (VideoMAE), True / "patch" (MAE), False (pixels)
    pixel_mean: tuple[float, ...] = PIXEL_MEAN
    pixel_std: tuple[float, ...] = PIXEL_STD
    eps: float = 1e-6
    drop: float = 0.0


class MaskedVideoModel(VLModel):
    """The masked video autoencoder: tubelet embedding, tube masking, encoder, decoder and pixel loss."""

    name = "MaskedVideoModel"

    def __init__(self, cfg: VideoMAEConfig, backend: str | None):
        super().__init__(backend)
        n = self.name
        for field in ("depth", "dim", "num_heads", "decoder_depth", "decoder_dim", "decoder_heads", "img_size"):
            v = getattr(cfg, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{n}: {field} must be a positive int, got {v!r}")
        if cfg.dim % cfg.num_heads or cfg.decoder_dim % cfg.decoder_heads:
            raise ValueError(
                f"{n}: dim={cfg.dim} / decoder_dim={cfg.decoder_dim} must be divisible by num_heads={cfg.num_heads}"
                f" / decoder_heads={cfg.decoder_heads}"
            )
        if cfg.dim % 2 or cfg.decoder_dim % 2:
            raise ValueError(
                f"{n}: dim and decoder_dim must be even (sin-cos positions), got {cfg.dim}, {cfg.decoder_dim}"
            )
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"{n}: img_size={cfg.img_size} must be divisible by patch_size={cfg.patch_size}")
        if cfg.tubelet < 1 or cfg.num_frames % cfg.tubelet:
            raise ValueError(f"{n}: num_frames={cfg.num_frames} must be a multiple of tubelet={cfg.tubelet} (>= 1)")
        if cfg.tube is not None and (isinstance(cfg.tube, bool) or not isinstance(cfg.tube, int) or cfg.tube < 1):
            raise ValueError(
                f"{n}: tube must be None (the whole clip) or a positive int of token frames, got {cfg.tube!r}"
            )
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.token_frames = cfg.num_frames // cfg.tubelet
        if not 0.0 <= cfg.mask_ratio < 1.0:
            raise ValueError(f"{n}: mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
        self.keep = rules.keep_count(self.num_patches, 1 - cfg.mask_ratio)
        if self.keep < 1:
            raise ValueError(
                f"{n}: mask_ratio={cfg.mask_ratio} keeps int(N*(1-mask_ratio))=0 of the N={self.num_patches} "
                "patches of a frame: lower it or use smaller patches"
            )
        if self.keep == self.num_patches:
            raise ValueError(f"{n}: mask_ratio={cfg.mask_ratio} masks none of the N={self.num_patches} patches")
        if not 0.0 < cfg.decoder_keep <= 1.0:
            raise ValueError(f"{n}: decoder_keep must be in (0, 1], got {cfg.decoder_keep}")
        if cfg.norm_pix not in NORMS or isinstance(cfg.norm_pix, int) and not isinstance(cfg.norm_pix, bool):
            raise ValueError(f"{n}: norm_pix must be 'channel', True / 'patch' or False, got {cfg.norm_pix!r}")
        if len(cfg.pixel_mean) != 3 or len(cfg.pixel_std) != 3:
            raise ValueError(f"{n}: pixel_mean and pixel_std must hold 3 floats each")
        self.config = cfg
        C, Cd, p, u = cfg.dim, cfg.decoder_dim, cfg.patch_size, cfg.tubelet
        L = self.token_frames * self.num_patches
        self.patch_embed = nn.Conv3d(3, C, (u, p, p), (u, p, p))
        self.register_buffer("pos_embed", sincos_1d(L, C).float(), persistent=False)
        self.encoder = Encoder(cfg.depth, C, cfg.num_heads, cfg.mlp_ratio, True, cfg.eps, cfg.drop, backend)
        self.encoder_to_decoder = nn.Linear(C, Cd, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(Cd))
        self.register_buffer("decoder_pos", sincos_1d(L, Cd).float(), persistent=False)
        self.decoder = Encoder(
            cfg.decoder_depth, Cd, cfg.decoder_heads, cfg.mlp_ratio, True, cfg.eps, cfg.drop, backend
        )
        self.head = nn.Linear(Cd, 3 * u * p * p)

    def _init_mae(self) -> None:
        """VideoMAE's initialisation: xavier-uniform Linear weights, zero biases, mask token std 0.02."""
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ---- inputs ------------------------------------------------------------------------------

    def _check_video(self, chk: BatchChecker, key: str = "video") -> torch.Tensor:
        cfg = self.config
        v = chk.video(key)
        if v.shape[1] != cfg.num_frames:
            chk.fail(key, f"has {v.shape[1]} frames, the model takes num_frames={cfg.num_frames}")
        if tuple(v.shape[-2:]) != (cfg.img_size,) * 2:
            chk.fail(key, f"has frames of {tuple(v.shape[-2:])}, the position table is for {cfg.img_size}px")
        return v

    # ---- video path --------------------------------------------------------------------------

    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> tubelet tokens (B*T', N, C) in (t, h, w) order, without positions."""
        x = self.patch_embed(video.transpose(1, 2))  # (B, C, T', h, w)
        B, C, Tp = x.shape[:3]
        return x.flatten(3).permute(0, 2, 3, 1).reshape(B * Tp, -1, C)

    def video_tokens(self, video: torch.Tensor, mask_ratio: float | None = None, generator=None):
        """Embedded, positioned and tube-masked tokens: ``(visible (B, T'K, C), mask (B, T'N), ids_restore
        (B, T'N))``; ``mask_ratio=0`` keeps every token (mask and ids_restore None)."""
        cfg = self.config
        ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        x = self.embed_video(video)
        pos = self.pos_embed
        Tp = self.token_frames
        if ratio == 0:
            return (x.reshape(-1, Tp * x.shape[1], x.shape[2]) + pos.to(x.dtype)), None, None
        tube = Tp if cfg.tube is None else cfg.tube
        return layers.tube_masking(x, Tp, ratio, tube=tube, generator=generator, pos=pos, backend=self.backend)

    def decoder_places(self, mask: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, M) int64 places the decoder reconstructs, ascending: every masked place, or with ``decoder_keep < 1``
        ``max(1, int(decoder_keep * masked))`` of them drawn uniformly per sample."""
        B, L = mask.shape
        masked = L - self.token_frames * self.keep
        masked_first = torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)
        if self.config.decoder_keep >= 1.0:
            return masked_first[:, :masked]
        M = max(1, int(self.config.decoder_keep * masked))
        d = rng_device(generator, mask.device)
        noise = torch.rand(B, masked, generator=generator, device=d).to(mask.device)
        pick = torch.argsort(noise, dim=1)[:, :M]
        return torch.gather(masked_first[:, :masked], 1, pick).sort(dim=1).values

    def reconstruct(self, encoded: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor, generator=None):
        """Encoded visible tokens (B, T'K, C) -> (pixel predictions (B, M, D) of ``places``, places (B, M))."""
        places = self.decoder_places(mask, generator)
        x = self.encoder_to_decoder(encoded)
        x = layers.restore_tokens(
            x, ids_restore, self.mask_token, self.decoder_pos, decoder_keep=places, check_indices=False,
            backend=self.backend,
        )  # fmt: skip
        return self.head(self.decoder(x)[:, -places.shape[1] :]), places

    def _loss_args(self) -> dict:
        cfg = self.config
        return dict(
            patch=cfg.patch_size,
            tubelet=cfg.tubelet,
            norm_pix=cfg.norm_pix,
            unnormalize=(cfg.pixel_mean, cfg.pixel_std),
            backend=self.backend,
        )

    def reconstruction_loss(self, pred, video, mask, places) -> torch.Tensor:
        """Mean normalised-pixel MSE of the predictions ``pred (B, M, D)`` at ``places (B, M)``."""
        if pred.device.type == "meta":  # describe(): shapes only; the loss has no matmul, so FLOP counts agree
            return pred.float().mean()
        return layers.masked_patch_loss(pred, video, mask, patch_index=places, **self._loss_args())

    def patch_mean_prediction(self, video: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
        """(B, P, D): every pixel of a patch predicted by the patch's mean, in the target's space: the mean over all
        its pixels and channels (``per_channel``: each channel's own mean, the patch's mean colour). Under the
        per-channel normalisation both are 0; under MAE's per-patch normalisation the first is 0."""
        cfg = self.config
        B, T, Ch, H, W = video.shape
        u, p = cfg.tubelet, cfg.patch_size
        P, n = (T // u) * (H // p) * (W // p), u * p * p
        if cfg.norm_pix == "channel" or (cfg.norm_pix is not False and not per_channel):
            return video.new_zeros(B, P, n * Ch)
        mean = torch.tensor(cfg.pixel_mean, device=video.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(cfg.pixel_std, device=video.device).view(1, 1, 3, 1, 1)
        x = video.float() * std + mean
        x = x.reshape(B, T // u, u, Ch, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(B, P, n, Ch)
        m = x.mean(2, keepdim=True) if per_channel else x.mean((2, 3), keepdim=True)
        if cfg.norm_pix is not False:  # MAE: (x - mean) / sqrt(var + 1e-6) over the whole patch
            flat = x.reshape(B, P, n * Ch)
            mu = flat.mean(-1)[..., None, None]
            m = (m - mu) / (flat.var(-1, unbiased=True)[..., None, None] + 1e-6).sqrt()
        return m.expand(B, P, n, Ch).reshape(B, P, n * Ch)

    def patch_mean_loss(self, video, mask, places, per_channel: bool = False) -> torch.Tensor:
        """The reconstruction loss of :meth:`patch_mean_prediction` at ``places``."""
        pred = self.patch_mean_prediction(video, per_channel)
        pred = torch.gather(pred, 1, places[..., None].expand(-1, -1, pred.shape[-1]))
        return layers.masked_patch_loss(pred, video, mask, patch_index=places, **self._loss_args())

    def baselines(self, video, mask, places) -> dict[str, torch.Tensor]:
        """The held-out baselines: ``reconstruction_patch_mean`` (each masked patch predicted by its mean) and
        ``reconstruction_patch_colour`` (by its mean colour, each channel's mean: an oracle of the colour)."""
        return {
            "reconstruction_patch_mean": self.patch_mean_loss(video, mask, places),
            "reconstruction_patch_colour": self.patch_mean_loss(video, mask, places, per_channel=True),
        }

    # ---- describe() ----------------------------------------------------------------------------

    def meta_video(self, B: int = 1) -> torch.Tensor:
        cfg = self.config
        return torch.empty(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, device="meta")

    def encoder_flops(self, mask_ratio: float | None = None) -> flops.Flops:
        """FLOPs of the video encoder (tubelet embedding + blocks) on one clip, at ``mask_ratio`` (default the
        model's; 0: every token)."""
        video = self.meta_video()
        return flops.count(lambda: self.encoder(self.video_tokens(video, mask_ratio)[0]))

    def masked_stats(self, batch: dict) -> dict:
        """Sizes and FLOPs for ``describe()`` on the meta device: encoder and decoder parameters, the encoder at the
        model's masking and unmasked, and the training forward on ``batch`` (per sample)."""
        enc = sum(p.numel() for p in (*self.patch_embed.parameters(), *self.encoder.parameters()))
        dec_names = ("encoder_to_decoder", "mask_token", "decoder", "head")
        B = batch["video"].shape[0]
        self.train()
        train = flops.count(lambda: self(batch))
        return {
            "params_encoder": enc,
            "params_decoder": sum(p.numel() for n, p in self.named_parameters() if n.startswith(dec_names)),
            "tokens": (self.token_frames * self.num_patches, self.token_frames * self.keep),
            "flops_encoder_masked": self.encoder_flops(),
            "flops_encoder_unmasked": self.encoder_flops(0.0),
            "flops_train_per_sample": train.total / B,
            "batch": B,
        }

    def describe_lines(self, s: dict, paper: dict) -> list[str]:
        """``describe()``'s lines for the figures of :meth:`masked_stats` beside the papers' (``paper``)."""
        cfg = self.config
        L, kept = s["tokens"]
        mk, um = s["flops_encoder_masked"], s["flops_encoder_unmasked"]
        ref = ""
        if "params_encoder" in paper:
            pe = paper["params_encoder"]
            src = f", {paper['encoder_from']}'s" if "encoder_from" in paper else ""
            ref = f"  (paper{src} {pe / 1e6:.0f}M: {100 * (s['params_encoder'] / pe - 1):+.2f}%)"
        lines = [
            f"  encoder (tubelet embedding + {cfg.depth} blocks) params {s['params_encoder']:,}{ref}",
            f"  decoder ({cfg.decoder_depth} block{'s' * (cfg.decoder_depth != 1)}, {cfg.decoder_dim} wide, with "
            f"projection, mask token, head) params {s['params_decoder']:,}",
        ]
        if "params_text" in s:
            lines.append(f"  text embeddings and vocabulary head params {s['params_text']:,}")
        ref = ""
        if "gmacs_encoder" in paper:
            src = f" ({paper['encoder_from']}'s encoder)" if "encoder_from" in paper else ""
            ref = f"; paper{src} {paper['gmacs_encoder']:g} G (fvcore multiply-adds)"
        lines.append(
            f"  video encoder, unmasked ({L} tokens): {um.total / 1e9:.4g} GFLOPs = {um.macs / 1e9:.4g} GMACs{ref}"
        )
        lines.append(
            f"  video encoder at {100 * cfg.mask_ratio:g}% tube masking ({kept} of {L} tokens): {mk.total / 1e9:.4g} "
            f"GFLOPs, {100 * (1 - mk.total / um.total):.1f}% fewer ({um.total / mk.total:.1f}x less)"
            + (f"; {paper['encoder_note']}" if "encoder_note" in paper else "")
        )
        lines.append(
            f"  training forward per sample (batch {s['batch']}, every loss): "
            f"{s['flops_train_per_sample'] / 1e9:.4g} GFLOPs"
        )
        return lines


class VideoMAE(MaskedVideoModel):
    """VideoMAE pretraining model: ``forward(batch, generator=None)`` -> ``{"mvm", "loss"}`` (the masked-patch
    reconstruction loss). Batch: ``video`` float (B, T, 3, H, W); captions, if any, are ignored.
    ``heldout_losses(batch, generator)`` adds the loss of predicting each patch's mean."""

    name = "VideoMAE"
    config_cls = VideoMAEConfig

    def __init__(self, config: VideoMAEConfig | None = None, backend: str | None = None, **overrides):
        super().__init__(dataclasses.replace(config or VideoMAEConfig(), **overrides), backend)
        self._init_mae()

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction loss of one batch; the masks come from ``generator`` (default: torch's global one)."""
        video = self._check_video(BatchChecker(self.name, batch))
        visible, mask, ids_restore = self.video_tokens(video, generator=generator)
        pred, places = self.reconstruct(self.encoder(visible), mask, ids_restore, generator)
        loss = self.reconstruction_loss(pred, video, mask, places)
        return {"mvm": loss, "loss": loss}

    @torch.no_grad()
    def heldout_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``reconstruction`` (the model's) and the :meth:`baselines` on the same masks and places."""
        video = self._check_video(BatchChecker(self.name, batch))
        visible, mask, ids_restore = self.video_tokens(video, generator=generator)
        pred, places = self.reconstruct(self.encoder(visible), mask, ids_restore, generator)
        return {
            "reconstruction": self.reconstruction_loss(pred, video, mask, places),
            **self.baselines(video, mask, places),
        }

    def stats(self) -> dict:
        """``describe()``'s figures (on the meta device)."""
        return self.masked_stats({"video": self.meta_video(1)})
