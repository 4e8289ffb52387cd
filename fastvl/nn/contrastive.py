"""Contrastive-loss modules (open_clip's constructor and forward contracts), local and distributed.

With ``world_size > 1`` (an initialised ``torch.distributed`` group: NCCL on GPUs, gloo on CPUs; every
rank holds the same local batch size, as in open_clip) the features are all-gathered and each rank
computes only its own rows of the logits (its images against every text and its texts against every
image, so 1/world_size of the work, never the global logits). Values and per-rank gradients are
open_clip's, for every combination of options:

``ClipLoss``
  * ``local_loss=False`` (default): every rank returns the global-batch loss (an all-reduce of the
    rank's rows). ``gather_with_grad=True``: gradients flow through the gather, so each rank's feature
    gradient is ``world_size x`` the global-batch gradient and ``logit_scale`` gets the global-batch
    gradient: after DDP's gradient averaging every parameter gradient equals single-process training on
    the global batch. ``gather_with_grad=False``: each rank's feature gradient equals the global-batch
    gradient of its features (open_clip's behaviour: parameter gradients end up 1/world_size of the
    global-batch ones after DDP averaging, except logit_scale's).
  * ``local_loss=True``: each rank returns the loss of its own rows against the global batch (the mean
    over ranks is the global loss). ``gather_with_grad=True``: gradients as above (world_size x, after
    DDP averaging exact); ``logit_scale`` gets the gradient of the rank's loss. ``gather_with_grad=False``:
    only the rank's own features as queries get gradients (open_clip's behaviour).
``SigLipLoss``: each rank returns its images against every text (open_clip's value for every
  ``dist_impl``: 'bidir', 'shift', 'reduce' and 'gather' are the same sum; fastvl all-gathers the texts
  with gradient); gradients as open_clip's (after DDP averaging: the global-batch gradients).
``MILNCELoss``: every rank returns the global-batch loss; gradients like ClipLoss with
  ``gather_with_grad=True``.
The backward runs collectives too (the gather's reduce-scatter, the loss all-reduce, the scale's
gradient average): every rank calls backward, as under DDP. A ring variant (passing feature blocks
between ranks instead of all-gathering them) is not implemented.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastvl import ops, validate
from fastvl.ops import contrastive
from fastvl.rules import compute_dtype

# ---- collectives with the gradients open_clip's semantics need ------------------------------


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0; backward sums the gradient over ranks (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, world_size, rank):
        ctx.world_size, ctx.rank, ctx.n = world_size, rank, x.shape[0]
        out = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.n, *g.shape[1:]), dtype=g.dtype, device=g.device)
            dist.reduce_scatter_tensor(out, g)
            return out, None, None
        dist.all_reduce(g)  # gloo has no reduce-scatter: sum everything, keep this rank's slice
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients too (each rank's input feeds every rank's output)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class _MeanGrad(torch.autograd.Function):
    """Identity whose backward averages the gradient over ranks (a replicated scalar such as logit_scale)."""

    @staticmethod
    def forward(ctx, x, world_size):
        ctx.world_size = world_size
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g / ctx.world_size, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _gather(x: torch.Tensor, world_size: int, rank: int, with_grad: bool) -> torch.Tensor:
    if with_grad:
        return _AllGather.apply(x, world_size, rank)
    out = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.detach().contiguous())
    return out


def _check_dist(name: str, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _ready(name: str, world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}: world_size={world_size} needs an initialised torch.distributed process group")
    if dist.get_world_size() != world_size:
        raise ValueError(f"{name}: world_size={world_size} but the process group has {dist.get_world_size()} ranks")


def _scale(op: str, logit_scale, like: torch.Tensor) -> torch.Tensor:
    return validate.scalar(op, "logit_scale", logit_scale, like, compute_dtype(like.dtype))


# ---- modules -------------------------------------------------------------------------------


class ClipLoss(nn.Module):
    """open_clip's ClipLoss: symmetric InfoNCE over image/text features, memory O(B) (see module docs).

    ``forward(image_features (B, D), text_features (B, D), logit_scale, logit_bias=None, output_dict=False)``
    returns the loss (0-d float32; float64 for float64 features) or ``{"contrastive_loss": loss}``.
    ``logit_bias`` shifts every logit equally, which softmax ignores: it does not change the loss (as in
    open_clip) and receives a zero gradient. ``cache_labels`` is accepted for compatibility: no labels
    are materialised.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        _check_dist("ClipLoss", rank, world_size)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
    ):
        if self.world_size == 1:
            loss = ops.clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        else:
            loss = self._distributed(image_features, text_features, logit_scale)
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # open_clip's zero gradient (and no unused parameter for DDP)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, img: torch.Tensor, txt: torch.Tensor, logit_scale) -> torch.Tensor:
        op = "clip_loss"
        contrastive.check_pair(op, img, txt, ("image_features", "text_features"))
        _ready("ClipLoss", self.world_size)
        W, r, B = self.world_size, self.rank, img.shape[0]
        s = _scale(op, logit_scale, img)
        if not self.local_loss:
            if not self.gather_with_grad:  # open_clip: only the own slot carries gradient -> 1/W of the summed one
                img, txt = _ScaleGrad.apply(img, 1.0 / W), _ScaleGrad.apply(txt, 1.0 / W)
            if s.requires_grad:
                s = _MeanGrad.apply(s, W)
        with_grad = self.gather_with_grad or not self.local_loss
        all_img = _gather(img, W, r, with_grad)
        all_txt = _gather(txt, W, r, with_grad)
        backend = contrastive.choose_backend(op, img, all_txt, self.backend)  # txt vs all_img: the same shapes
        rows = contrastive.info_nce_rows(img, all_txt, s, r * B, op, backend).sum()
        rows = rows + contrastive.info_nce_rows(txt, all_img, s, r * B, op, backend).sum()
        loss = rows / (2 * B)
        return _AllReduceSum.apply(loss) / W if not self.local_loss else loss

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
            f"world_size={self.world_size}"
        )


class SigLipLoss(nn.Module):
    """open_clip's SigLipLoss: sigmoid loss over all image/text pairs, memory O(B) (see module docs).

    ``forward(image_features (B, D), text_features (B, D), logit_scale, logit_bias, output_dict=False)``;
    ``dist_impl`` in {None, 'bidir', 'shift', 'reduce', 'gather'} (same value and gradients: fastvl
    all-gathers the texts whatever it says).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        _check_dist("SigLipLoss", rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(
                f"SigLipLoss: dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather' or None, got {dist_impl!r}"
            )
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.backend = dist_impl, backend

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias,
        output_dict: bool = False,
    ):
        if self.world_size == 1:
            loss = ops.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            op = "siglip_loss"
            contrastive.check_pair(op, image_features, text_features, ("image_features", "text_features"))
            _ready("SigLipLoss", self.world_size)
            B = image_features.shape[0]
            s = _scale(op, logit_scale, image_features)
            bias = 0.0 if logit_bias is None else logit_bias
            bias = validate.scalar(op, "logit_bias", bias, image_features, compute_dtype(image_features.dtype))
            all_txt = _gather(text_features, self.world_size, self.rank, True)
            backend = contrastive.choose_backend(op, image_features, all_txt, self.backend)
            loss = contrastive.siglip_sum(image_features, all_txt, s, bias, self.rank * B, backend) / B
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"


class MILNCELoss(nn.Module):
    """VATT's MIL-NCE: ``forward(video (B, D), text (B, P, D) or (B, D), logit_scale, valid=None)``.

    ``valid (B,)`` bool marks samples with text (see ``fastvl.ops.mil_nce_loss``). With ``world_size > 1``
    every rank returns the global-batch loss (see module docs for the gradients).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, backend: str | None = None):
        super().__init__()
        _check_dist("MILNCELoss", rank, world_size)
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, video: torch.Tensor, text: torch.Tensor, logit_scale, valid: torch.Tensor | None = None):
        if self.world_size == 1:
            return ops.mil_nce_loss(video, text, logit_scale, valid, backend=self.backend)
        text3 = contrastive.check_mil(video, text, valid)
        _ready("MILNCELoss", self.world_size)
        W, r = self.world_size, self.rank
        s = _scale("mil_nce_loss", logit_scale, video)
        if s.requires_grad:
            s = _MeanGrad.apply(s, W)
        video_all = _gather(video, W, r, True)
        text_all = _gather(text3, W, r, True)
        valid_all = None
        if valid is not None:
            valid_all = _gather(valid.to(torch.uint8), W, r, False).bool()
        backend = contrastive.choose_backend("mil_nce_loss", video, text_all.flatten(0, 1), self.backend)
        li = contrastive.mil_nce_terms(
            video,
            text3,
            s,
            valid,
            backend,
            video_all=video_all,
            text_all=text_all,
            valid_all=valid_all,
        )
        total = _AllReduceSum.apply(li.sum())
        n = float(W * video.shape[0]) if valid_all is None else valid_all.sum().clamp(min=1)
        return total / n

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}"
