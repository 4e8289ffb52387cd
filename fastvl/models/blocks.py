"""The one pre-norm transformer block shared by All-in-one, VATT and MAC, and the encoder stack.

State dicts follow timm's ViT (``blocks.i.norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``, final ``norm``). The residual add is fused into the next LayerNorm: a block takes and returns
``(hidden, residual)`` whose sum is the residual stream, and calls ``layer_norm(hidden, w, b, eps,
residual)`` which returns ``(LN(hidden + residual), hidden + residual)``.

Token reduction (:class:`TokenReduction`, on the video tokens; the leading ``protected`` tokens of each row (CLS,
text) are never touched):

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
first and last ``floor((L' - text_len - 1 + 1) * fraction)`` video slots of the reduced rows to the neighbouring
kept frame, exactly as on an unreduced stream of that length (no roll once that count is 0). A reduction acts on
the stream in logical (rolled) order: with ``Roll.mode="fused"`` the accumulated roll is materialised
(:func:`layers.roll_stream`) right before each reduction and the offsets restart on the reduced rows, so fused and
explicit rolling give the same tokens; with per-block merging that means one materialised roll per block.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastvl import rules

from .layers import (
    Attention,
    LayerNorm,
    merge_tokens,
    received_attention,
    roll_frame_offsets,
    roll_stream,
    select_space_time,
    temporal_token_roll,
)


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> GELU -> fc2 (dropout after each)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: stream += Attention(LN(stream)); stream += MLP(LN(stream)), with deferred residual.

    ``forward(hidden, residual=None, *, key_padding_mask, frame_offsets, num_frames)`` with ``hidden``
    ``(N, S, C)``: the stream is ``hidden + residual`` (just ``hidden`` when residual is None). Returns
    ``(hidden', residual')`` with the updated stream ``hidden' + residual'``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        drop: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps, backend=backend)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop, backend=backend)
        self.norm2 = LayerNorm(dim, eps=eps, backend=backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual, _, _ = self.attend(
            hidden, residual, key_padding_mask=key_padding_mask, frame_offsets=frame_offsets, num_frames=num_frames
        )
        return self.feed(hidden, residual)

    def attend(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        frame_offsets: torch.Tensor | None = None,
        num_frames: int = 1,
        key_bias: torch.Tensor | None = None,
        metric: bool = False,
        rows: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The attention half: ``(hidden', residual', metric, rows)`` with the stream after attention in
        ``hidden' + residual'``; ``key_bias``, ``metric`` and ``rows`` as :class:`layers.Attention`."""
        if residual is None:
            y, residual = self.norm1(hidden), hidden
        else:
            y, residual = self.norm1(hidden, residual)
        out = self.attn(y, key_padding_mask, frame_offsets, num_frames, key_bias=key_bias, metric=metric, rows=rows)
        if isinstance(out, tuple):
            return (out[0], residual, *out[1:])
        return out, residual, None, None

    def feed(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP half: stream ``hidden + residual`` (``hidden`` alone when residual is None) -> ``(hidden',
        residual')``."""
        if residual is None:
            y, residual = self.norm2(hidden), hidden
        else:
            y, residual = self.norm2(hidden, residual)
        return self.mlp(y), residual


@dataclasses.dataclass(frozen=True)
class Roll:
    """All-in-one temporal token rolling before every block on ``(B*T, text_len + L, C)`` sequences.

    ``mode="explicit"``: ``fastvl.ops.temporal_token_roll`` moves the residual stream before each block.
    ``mode="fused"``: nothing moves; block k attends with roll-aware addressing of k+1 cumulative rolls
    (LayerNorm and MLP are per token, so only attention sees the order). The two streams then differ by
    a permutation of frames per slot, which the frame average before the heads removes.
    """

    num_frames: int
    text_len: int
    fraction: float = 0.125
    mode: str = "fused"


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
    if not is_int(layer) or not 0 <= layer < depth:
        bad("select_layer", f"an int in [0, {depth}) (the block before which tokens are selected)")
    if cfg.select_scorer not in SCORERS:
        bad("select_scorer", f"one of {', '.join(SCORERS)}")
    selects = keep is not None or nf is not None
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


class Encoder(nn.Module):
    """``depth`` shared :class:`Block` s and a final LayerNorm; ``forward(x, key_padding_mask, roll, reduce)``.

    x ``(N, S, C)`` -> normalised ``(N', S', C)``. ``key_padding_mask (N, S)`` bool, True = padded.
    With ``roll`` (All-in-one), tokens are rolled before every block (see :class:`Roll`). With ``reduce``,
    tokens are merged or selected (module docstring): ``S' <= S``, and ``N' < N`` when selection drops frame
    rows (``N' = N / row_frames * select_frames``). ``return_size=True`` also returns the tokens' sizes
    ``(N', S')`` (how many input tokens each output token stands for; None without merging).
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        drop: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias, eps, drop, backend=backend) for _ in range(depth)
        )
        self.norm = LayerNorm(dim, eps=eps, backend=backend)
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        roll: Roll | None = None,
        reduce: Reduce | None = None,
        return_size: bool = False,
    ):
        if reduce is not None and not reduce.settings.active:
            reduce = None
        if reduce is None:
            y = self._plain(x, key_padding_mask, roll)
            return (y, None) if return_size else y
        s = reduce.settings
        hidden, residual, size, kpm = x, None, None, key_padding_mask
        roll = _active(roll, x.shape[1])
        base, steps = self._base(roll, x), 0  # fused: the stream is roll^steps(physical) in logical order
        rows = None
        for i, blk in enumerate(self.blocks):
            if s.selects and i == s.select_layer:
                stream = hidden if residual is None else hidden + residual
                if base is not None and steps:
                    stream = roll_stream(stream, base * steps, roll.num_frames)
                hidden, kpm, roll = reduce.select(stream, rows, kpm, roll)
                residual, rows, steps = None, None, 0
                roll = _active(roll, hidden.shape[1])
                base = self._base(roll, hidden)
            offsets, T = None, 1
            if roll is not None and roll.mode == "explicit":
                hidden = self._roll(hidden, roll)
                residual = None if residual is None else self._roll(residual, roll)
                if size is not None:
                    off = roll_frame_offsets(size.shape[1], roll.text_len, roll.fraction, 1, device=size.device)
                    size = roll_stream(size, off, roll.num_frames)
            elif base is not None:
                steps += 1
                offsets, T = base * steps, roll.num_frames
            want_rows = reduce.protected if s.selects and s.select_scorer == "attention" else 0
            bias = size.log() if size is not None and s.merge_prop_attn else None
            hidden, residual, metric, r = blk.attend(
                hidden, residual, key_padding_mask=kpm, frame_offsets=offsets, num_frames=T, key_bias=bias,
                metric=s.merges, rows=want_rows if i == s.select_layer - 1 else 0,
            )  # fmt: skip
            if r is not None:
                rows = r
            if s.merges:
                stream = hidden + residual
                if base is not None and steps:
                    shift = base * steps
                    stream, metric = (roll_stream(t, shift, T) for t in (stream, metric))
                    size = None if size is None else roll_stream(size, shift, T)
                    kpm = None if kpm is None else roll_stream(kpm, shift, T)
                    steps = 0
                stream, size, kpm = reduce.merge(stream, size, metric, kpm)
                roll = _active(roll, stream.shape[1])
                base = self._base(roll, stream)
                hidden, residual = blk.feed(stream, None)
            else:
                hidden, residual = blk.feed(hidden, residual)
        y = self.norm(hidden, residual)[0]
        if base is not None and steps:  # the output in logical order, like the explicit roll's
            y = roll_stream(y, base * steps, roll.num_frames)
            size = None if size is None else roll_stream(size, base * steps, roll.num_frames)
        return (y, size) if return_size else y

    def _plain(self, x, key_padding_mask, roll):
        hidden, residual = x, None
        base = None
        if roll is not None and roll.mode == "fused":
            base = roll_frame_offsets(x.shape[1], roll.text_len, roll.fraction, 1, device=x.device)
        for i, blk in enumerate(self.blocks):
            offsets, T = None, 1
            if roll is not None and roll.mode == "explicit":
                hidden = self._roll(hidden, roll)
                residual = None if residual is None else self._roll(residual, roll)
            elif base is not None:
                offsets, T = base * (i + 1), roll.num_frames
            hidden, residual = blk(
                hidden, residual, key_padding_mask=key_padding_mask, frame_offsets=offsets, num_frames=T
            )
        if residual is None:
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]

    @staticmethod
    def _base(roll: Roll | None, x: torch.Tensor) -> torch.Tensor | None:
        if roll is None or roll.mode != "fused":
            return None
        return roll_frame_offsets(x.shape[1], roll.text_len, roll.fraction, 1, device=x.device)

    def _roll(self, x: torch.Tensor, roll: Roll) -> torch.Tensor:
        return temporal_token_roll(
            x, roll.num_frames, text_len=roll.text_len, fraction=roll.fraction, backend=self.backend
        )


def _active(roll: Roll | None, seq_len: int) -> Roll | None:
    """``roll`` if it moves any token of rows of ``seq_len`` tokens, else None (too few video tokens left)."""
    if roll is None or roll.num_frames < 2 or rules.roll_count(seq_len - roll.text_len, roll.fraction) == 0:
        return None
    return roll
