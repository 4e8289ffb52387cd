"""Token reduction on the video tokens of the models' encoders: settings, checks and the two reductions.

The leading ``protected`` tokens of each row (CLS, text) are never touched:

- **merging** (ToMe): in every block, between attention and MLP, ``merge_r`` tokens of each row (of each frame
  with ``merge_mode="frame"``) merge into their most similar partners (metric: the block's keys averaged over
  heads), by a size-weighted mean; the sizes enter every later attention as ``key_bias = log(size)``
  (proportional attention) unless ``merge_prop_attn=False``.
- **selection** (SMAUG): once, before block ``select_layer``, keep ``select_keep`` of each frame's tokens
  (a float: fraction, an int: count) and the ``select_frames`` frames of highest mean score, scored by the
  attention the protected queries (CLS / text) give each token in block ``select_layer - 1``
  (``select_scorer="attention"``) or by a learned linear scorer (``"linear"``, straight-through gradient).

Rolling after a reduction (All-in-one, whose rows are the frames of a clip): every frame row keeps the same
number of tokens (merging runs per row, selection keeps an equal count per row, frame selection drops whole
rows), so the rows stay a ``(B, T', L')`` frame grid and the roll before each block stays defined: it moves the
first and last ``floor((L' - text_len) * fraction)`` video slots of the reduced rows to the neighbouring kept
frame, exactly as on an unreduced stream of that length (no roll once that count is 0 or one frame is left). A
reduction acts on the stream in logical (rolled) order: with ``Roll.mode="fused"`` the accumulated roll is
materialised (:func:`fastvl.models.layers.roll_stream`) right before each reduction and the offsets restart on the
reduced rows, so fused and explicit rolling give the same tokens; with per-block merging that means one
materialised roll per block.
The encoder (:class:`fastvl.models.blocks.Encoder`) runs the loop; this module holds what one reduction does.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastvl import rules

from .layers import merge_tokens, received_attention, select_space_time

SCORERS = ("attention", "linear")
MERGE_MODES = ("joint", "frame")


@dataclasses.dataclass(frozen=True)
class ReductionSettings:
    """Validated token-reduction settings (the models' config fields of the same names)."""

    merge_r: int = 0
    merge_mode: str = "joint"
    merge_prop_attn: bool = True
    select_keep: float | int | None = None
    select_frames: int | None = None
    select_layer: int = 1
    select_scorer: str = "attention"

    @property
    def merges(self) -> bool:
        return self.merge_r > 0

    @property
    def selects(self) -> bool:
        return self.select_keep is not None or self.select_frames is not None

    @property
    def active(self) -> bool:
        return self.merges or self.selects


def reduction_settings(model: str, cfg, depth: int, frames: int | None, why_no_frames: str = "") -> ReductionSettings:
    """Check ``cfg``'s ``merge_*`` / ``select_*`` fields for a model of ``depth`` blocks whose reducible tokens form
    ``frames`` equal frames (None: no frame structure, ``why_no_frames`` says why). Errors name the field."""

    def bad(field: str, want: str):
        raise ValueError(f"{model}: {field} must be {want}, got {getattr(cfg, field)!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    r = cfg.merge_r
    if not is_int(r) or r < 0:
        bad("merge_r", "an int >= 0 (tokens merged in every block)")
    mode = getattr(cfg, "merge_mode", "joint")
    if mode not in MERGE_MODES:
        bad("merge_mode", f"one of {', '.join(MERGE_MODES)}")
    if mode == "frame" and r and frames is None:
        raise ValueError(f"{model}: merge_mode='frame' needs equal frames of tokens; {why_no_frames}")
    if not isinstance(cfg.merge_prop_attn, bool):
        bad("merge_prop_attn", "a bool")
    keep = cfg.select_keep
    if keep is not None:
        if isinstance(keep, float):
            if not 0.0 < keep <= 1.0:
                bad("select_keep", "a fraction in (0, 1] (float) or a count >= 1 (int) of each frame's tokens")
        elif not is_int(keep) or keep < 1:
            bad("select_keep", "a fraction in (0, 1] (float) or a count >= 1 (int) of each frame's tokens")
    nf = cfg.select_frames
    if nf is not None:
        if not is_int(nf) or nf < 1:
            bad("select_frames", "an int >= 1 (frames kept per clip)")
        if frames is None:
            raise ValueError(f"{model}: select_frames needs equal frames of tokens; {why_no_frames}")
        if nf > frames:
            bad("select_frames", f"at most the {frames} frames of a clip")
    layer = cfg.select_layer
    selects = keep is not None or nf is not None
    if not is_int(layer) or (selects and not 0 <= layer < depth):
        bad("select_layer", f"an int in [0, {depth}) (the block before which tokens are selected)")
    if cfg.select_scorer not in SCORERS:
        bad("select_scorer", f"one of {', '.join(SCORERS)}")
    if selects and cfg.select_scorer == "attention" and layer == 0:
        bad("select_layer", ">= 1 with select_scorer='attention' (scores are block select_layer - 1's attention)")
    if selects and r:
        raise ValueError(f"{model}: merge_r={r} and select_keep / select_frames: choose merging or selection")
    return ReductionSettings(r, mode, cfg.merge_prop_attn, keep, nf, layer, cfg.select_scorer)


class TokenReduction(nn.Module):
    """A model's token merging / selection (module docstring): the settings and the learned scorer, if any.

    The encoder applies it to one pass with a :class:`Reduce` (which tokens are protected, the frame layout).
    """

    def __init__(self, settings: ReductionSettings, dim: int, backend: str | None = None):
        super().__init__()
        self.settings = settings
        self.backend = backend
        self.scorer = nn.Linear(dim, 1) if settings.selects and settings.select_scorer == "linear" else None

    def extra_repr(self) -> str:
        s = self.settings
        if s.merges:
            return f"merge_r={s.merge_r}, merge_mode={s.merge_mode!r}, merge_prop_attn={s.merge_prop_attn}"
        return (
            f"select_keep={s.select_keep}, select_frames={s.select_frames}, select_layer={s.select_layer}, "
            f"select_scorer={s.select_scorer!r}"
        )


@dataclasses.dataclass(frozen=True)
class Reduce:
    """One encoder pass's reduction: ``protected`` leading tokens per row (CLS, text) never reduced; after them
    ``frames`` equal frames of tokens in each row (MAC, VATT), or ``row_frames`` consecutive rows are the frames
    of one clip (All-in-one's ``(B*T, ...)``). The reduced tokens carry no padding (key padding, if any, covers
    the protected tokens only)."""

    reduction: TokenReduction
    protected: int
    frames: int = 1
    row_frames: int = 1

    @property
    def settings(self) -> ReductionSettings:
        return self.reduction.settings

    def merge(self, x, size, metric, key_padding_mask):
        """ToMe merge of each row (of each frame with ``merge_mode="frame"``): ``(x', size', key_padding_mask')``."""
        s, P = self.settings, self.protected
        frame = s.merge_mode == "frame" and self.frames > 1
        x, size, _ = merge_tokens(
            x, size, s.merge_r, protected=P, metric=metric, mode="frame" if frame else "joint",
            frames=self.frames if frame else None, backend=self.reduction.backend,
        )  # fmt: skip
        return x, size, _protected_mask(key_padding_mask, P, x.shape[1])

    def select(self, x, rows, key_padding_mask, roll):
        """SMAUG selection on the stream ``x (N, L, C)`` in logical order; ``rows (N, H, P, L)`` are the attention
        rows of the protected queries (attention scorer: a token's score is the attention it receives, averaged over
        heads and the unpadded protected queries). Returns ``(x', key_padding_mask', roll')``."""
        s, P, red = self.settings, self.protected, self.reduction
        N, L, _ = x.shape
        if red.scorer is not None:
            scores = red.scorer(x[:, P:]).squeeze(-1)
        elif key_padding_mask is None:
            scores = received_attention(rows, skip=P)
        else:  # the mean over the real (unpadded) protected queries only
            real = (~key_padding_mask[:, :P]).to(rows.dtype)
            scores = received_attention(rows * real[:, None, :, None], skip=P)
            scores = scores * (P / real.sum(1, keepdim=True).clamp_min(1)).to(scores.dtype)
        Tr = self.row_frames
        if Tr > 1 and s.select_frames is not None and s.select_frames < Tr:
            # the clip's frames are rows: keep the select_frames rows of highest mean score, in time order
            fs = scores.detach().float().mean(1).view(N // Tr, Tr)
            top = torch.sort(fs, dim=1, descending=True, stable=True).indices[:, : s.select_frames]
            keep = (torch.sort(top, dim=1).values + torch.arange(0, N, Tr, device=x.device)[:, None]).flatten()
            x, scores = x[keep], scores[keep]
            key_padding_mask = key_padding_mask[keep] if key_padding_mask is not None else None
            if roll is not None:
                roll = dataclasses.replace(roll, num_frames=s.select_frames) if s.select_frames > 1 else None
        n = (L - P) // self.frames
        k = n if s.select_keep is None else _count(s.select_keep, n)
        kf = s.select_frames if self.frames > 1 else None
        kept, ids = select_space_time(
            x, scores, k, frames=self.frames, keep_frames=kf, protected=P, backend=red.backend
        )  # fmt: skip
        if red.scorer is not None and torch.is_grad_enabled() and scores.requires_grad:
            # straight-through: value 1, the scorer learns from <grad, token> of the tokens it kept
            sk = torch.gather(scores, 1, ids[:, P:] - P)
            gate = torch.cat([sk.new_ones(sk.shape[0], P), 1 + sk - sk.detach()], dim=1)
            kept = kept * gate[..., None].to(kept.dtype)
        return kept, _protected_mask(key_padding_mask, P, kept.shape[1]), roll


def _count(keep: float | int, n: int) -> int:
    """A keep setting as a count of ``n`` tokens: a float is a fraction (at least 1), an int a count (at most n)."""
    if isinstance(keep, float):
        return max(1, rules.keep_count(n, keep))
    return min(keep, n)


def _protected_mask(key_padding_mask: torch.Tensor | None, protected: int, length: int) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    mask = key_padding_mask.new_zeros(key_padding_mask.shape[0], length)
    mask[:, :protected] = key_padding_mask[:, :protected]
    return mask
