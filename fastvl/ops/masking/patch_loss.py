"""The masked patch loss (MAE / VideoMAE reconstruction loss): validation, the dispatch plan, the custom op, the
functional API. The target is patchified and normalised inside the kernel; no patchified or normalised copy of
the clip is made."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fastvl import validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op

from . import backends
from .reference import NORM_CHANNEL, NORM_NONE, NORM_PATCH

OP = backends.LOSS
_NORMS = {True: NORM_PATCH, "patch": NORM_PATCH, "channel": NORM_CHANNEL, False: NORM_NONE}


@custom_op(
    OP,
    "(Tensor pred, Tensor video, Tensor mask, Tensor? idx, Tensor count, SymInt patch, SymInt tubelet, SymInt norm, "
    "float[] affine, str backend) -> Tensor",
)
def _loss_op(pred, video, mask, idx, count, patch, tubelet, norm, affine, backend):
    return implementation(OP, backend)(pred, video, mask, idx, count, patch, tubelet, norm, affine)


@_loss_op.register_fake
def _(pred, video, mask, idx, count, *rest):
    return pred.new_empty((), dtype=torch.float64 if torch.float64 in (pred.dtype, video.dtype) else torch.float32)


@custom_op(
    "masked_patch_loss_backward",
    "(Tensor grad, Tensor pred, Tensor video, Tensor mask, Tensor? idx, Tensor count, SymInt patch, SymInt tubelet, "
    "SymInt norm, float[] affine, str backend) -> Tensor",
)
def _loss_bwd_op(*args):
    *args, backend = args
    return implementation(OP, backend, "backward")(*args)


@_loss_bwd_op.register_fake
def _(grad, pred, *rest):
    return pred.new_empty(pred.shape)


def _setup(ctx, inputs, output):
    pred, video, mask, idx, count, *ctx.options, ctx.backend = inputs
    ctx.save_for_backward(pred, video, mask, idx, count)


def _backward(ctx, grad):
    pred, video, mask, idx, count = ctx.saved_tensors
    gpred = None
    if ctx.needs_input_grad[0]:
        gpred = _loss_bwd_op(grad.reshape(()), pred, video, mask, idx, count, *ctx.options, ctx.backend)
    return gpred, None, None, None, None, None, None, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup)


@dataclasses.dataclass
class LossPlan(Plan):
    mask: torch.Tensor  # (B, P) bool
    idx: torch.Tensor | None  # (B, R) patch of every pred row, None: row r is patch r
    norm: int
    affine: list[float]  # [] or scale[3] + shift[3]


def _affine(op: str, unnormalize) -> list[float]:
    if unnormalize is None:
        return []
    try:
        mean, std = unnormalize
        mean, std = [float(v) for v in mean], [float(v) for v in std]
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{op}: argument 'unnormalize' must be (mean, std), three floats each, got {unnormalize!r}"
        ) from e
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{op}: argument 'unnormalize' must be (mean, std) of 3 floats each, got {unnormalize!r}")
    return std + mean


def prepare_loss(
    pred, video, mask, *, patch, tubelet=1, norm_pix=True, unnormalize=None, patch_index=None, backend=None
) -> LossPlan:
    """Validate a :func:`masked_patch_loss` call and plan its dispatch."""
    validate.tensor(OP, "video", video, ndim=5, layout="(B, T, 3, H, W)")
    patch = validate.integer(OP, "patch", patch, minimum=1)
    tubelet = validate.integer(OP, "tubelet", tubelet, minimum=1)
    if isinstance(norm_pix, str) and norm_pix not in _NORMS or not isinstance(norm_pix, (bool, str)):
        raise ValueError(
            f"{OP}: argument 'norm_pix' must be True / 'patch' (MAE), 'channel' (VideoMAE) or False, got {norm_pix!r}"
        )
    norm = _NORMS[norm_pix]
    B, T, Ch, H, W = video.shape
    if Ch != 3:
        raise ValueError(
            f"{OP}: argument 'video' must be (B, T, 3, H, W) (RGB channels third), got {tuple(video.shape)}"
        )
    if T % tubelet or H % patch or W % patch or T == 0 or H == 0 or W == 0:
        raise ValueError(
            f"{OP}: argument 'video' {tuple(video.shape)} must tile into tubelet={tubelet} frames x patch={patch}^2 "
            "pixels (T % tubelet == H % patch == W % patch == 0, none empty)"
        )
    group = tubelet * patch * patch * (3 if norm == NORM_PATCH else 1)
    if norm != NORM_NONE and group < 2:
        raise ValueError(f"{OP}: norm_pix={norm_pix!r} needs >= 2 pixels per statistic, patch={patch} gives {group}")
    P = (T // tubelet) * (H // patch) * (W // patch)
    D = 3 * tubelet * patch * patch
    validate.tensor(OP, "pred", pred, ndim=3, layout=f"(B, R, D=3*tubelet*patch*patch={D})")
    if pred.shape[0] != B or pred.shape[2] != D or pred.shape[1] > P:
        raise ValueError(
            f"{OP}: argument 'pred' must have shape (B={B}, R <= P={P}, D={D}) (D = 3*tubelet*patch*patch), "
            f"got {tuple(pred.shape)}"
        )
    validate.tensor(OP, "mask", mask, ndim=2, layout=f"(B, P)=({B}, {P})", dtypes=None)
    if tuple(mask.shape) != (B, P):
        raise ValueError(f"{OP}: argument 'mask' must have shape (B, P)=({B}, {P}), got {tuple(mask.shape)}")
    validate.same_device(OP, pred=pred, video=video, mask=mask)
    mask = mask if mask.dtype == torch.bool else mask != 0
    R = pred.shape[1]
    idx = None
    if patch_index is not None:
        validate.tensor(OP, "patch_index", patch_index, ndim=2, layout=f"(B, R)=({B}, {R})", dtypes=validate.INDEX)
        if tuple(patch_index.shape) != (B, R):
            raise ValueError(
                f"{OP}: argument 'patch_index' must have shape (B, R)=({B}, {R}), got {tuple(patch_index.shape)}"
            )
        validate.same_device(OP, pred=pred, patch_index=patch_index)
        if patch_index.numel() and not torch.compiler.is_compiling():
            lo, hi = int(patch_index.min()), int(patch_index.max())
            if lo < 0 or hi >= P:
                raise ValueError(f"{OP}: argument 'patch_index' must lie in [0, P={P}), got values in [{lo}, {hi}]")
        idx = patch_index
    elif R < P:  # VideoMAE: pred holds the masked patches only, in ascending order
        if not torch.compiler.is_compiling():
            counts = mask.sum(1)
            if bool((counts != R).any()):
                raise ValueError(
                    f"{OP}: argument 'pred' has R={R} rows < P={P} patches, so its rows are the masked patches in "
                    f"order: every row of 'mask' must mask exactly {R}, got {sorted(set(counts.tolist()))}"
                )
        idx = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :R]
    affine = _affine(OP, unnormalize)
    tile = backends.patch_pixels(patch, tubelet)
    features = frozenset(n for n, v in (("patch_index", idx), ("unnormalize", affine or None)) if v is not None)
    call = Call(OP, {"pred": pred, "video": video}, {"P": P, "D": D, "patch_pixels": tile}, features)
    return LossPlan([Request(call, backend)], mask, idx, norm, affine)


@public_op(prepare_loss)
def masked_patch_loss(
    pred: torch.Tensor,
    video: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch: int,
    tubelet: int = 1,
    norm_pix: bool | str = True,
    unnormalize: tuple[Sequence[float], Sequence[float]] | None = None,
    patch_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE's reconstruction loss: per-patch normalised pixel MSE over the masked patches, mean over them.

    ``video (B, T, 3, H, W)`` (fastvl's clip layout, any strides), cut into ``P = (T/tubelet)(H/patch)(W/patch)``
    patches in ``(t, h, w)`` order (the token order of :func:`tube_masking` / a Conv3d patch embedding); each
    patch's ``D = tubelet*patch*patch*3`` pixels in VideoMAE's order ``(dt, dy, dx, c)``, channel last (MAE's
    ``patchify`` for ``tubelet=1``). ``pred (B, R, D)``: one prediction row per patch (``R = P``, MAE), or, with
    ``R < P``, the masked patches only in ascending order (VideoMAE, whose decoder returns the mask tokens' rows),
    or the patches ``patch_index (B, R)`` names (VideoMAE V2's decoder masking: the kept places). ``mask (B, P)``
    bool (or 0/1 in any dtype): 1 = masked.

    ``norm_pix``: ``True`` / ``"patch"`` (MAE's ``norm_pix_loss``: ``(x - mean) / sqrt(var + 1e-6)`` over the
    whole patch), ``"channel"`` (VideoMAE / SimVTP: ``(x - mean) / (std + 1e-6)`` per channel of the patch), both
    with unbiased variances, or ``False`` (raw pixels). ``unnormalize=(mean, std)`` (3 floats each) first maps the
    clip to ``video * std + mean`` per channel (VideoMAE's ``unnorm_videos``, on the fly).

    Returns the 0-d loss ``sum(mask * mean_d (pred - target)^2) / sum(mask)`` over the rows (fp32; fp64 for fp64
    inputs), MAE's ``(loss * mask).sum() / mask.sum()`` (NaN when nothing is masked, as there). Gradients flow to
    ``pred`` only: the target is a constant, as under MAE's ``torch.no_grad``.
    """
    plan = prepare_loss(
        pred, video, mask, patch=patch, tubelet=tubelet, norm_pix=norm_pix, unnormalize=unnormalize,
        patch_index=patch_index, backend=backend,
    )  # fmt: skip
    (name,) = plan.choose()
    mask, idx = plan.mask, plan.idx
    weights = mask if idx is None else torch.gather(mask, 1, idx.long())
    count = weights.sum(dtype=torch.float64 if torch.float64 in (pred.dtype, video.dtype) else torch.float32)
    return _loss_op(pred, video.detach(), mask, idx, count, patch, tubelet, plan.norm, plan.affine, name)
