"""Masked video modeling (MAE / VideoMAE / VideoMAE V2 / SimVTP): tube masking, the decoder input, the masked
patch loss: validation, the dispatch plans, the custom ops, the functional API.

The three compose over one clip-level convention: ``tube_masking`` returns ``visible (B, T*K, C)`` (the encoder's
input), ``mask (B, T*N)`` and ``ids_restore (B, T*N)``; ``restore_tokens(encoded, ids_restore, mask_token, pos)``
builds the decoder input ``(B, T*N, C)`` in the clip's token order ``t*N + n``, which is also the patch order
``(t, h, w)`` of ``masked_patch_loss(pred, video, mask, ...)``.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import rules, validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op

from . import backends
from .patch_loss import masked_patch_loss, prepare_loss
from .reference import (
    NORM_CHANNEL,
    NORM_NONE,
    NORM_PATCH,
    clip_ids_restore,
    keep_inverse,
    masked_patch_loss_reference,
    patch_targets,
    patchify,
    restore_reference,
    restore_reference_backward,
    tube_masking_reference,
    tube_masking_reference_backward,
    tube_ranks,
)

__all__ = [
    "NORM_CHANNEL",
    "NORM_NONE",
    "NORM_PATCH",
    "clip_ids_restore",
    "keep_inverse",
    "masked_patch_loss",
    "masked_patch_loss_reference",
    "patch_targets",
    "patchify",
    "prepare_loss",
    "prepare_restore",
    "prepare_tube",
    "restore_reference",
    "restore_reference_backward",
    "restore_tokens",
    "tube_masking",
    "tube_masking_reference",
    "tube_masking_reference_backward",
    "tube_ranks",
]

# ---- custom ops: tube masking ----------------------------------------------------------------


@custom_op(
    backends.TUBE,
    "(Tensor x, Tensor seed, Tensor? noise, Tensor? pos, SymInt num_frames, SymInt tube, SymInt K, "
    "ScalarType mask_dtype, str backend) -> (Tensor, Tensor, Tensor)",
)
def _tube_op(x, seed, noise, pos, num_frames, tube, K, mask_dtype, backend):
    return implementation(backends.TUBE, backend)(x, num_frames, tube, K, seed, noise, pos, mask_dtype)


@_tube_op.register_fake
def _(x, seed, noise, pos, num_frames, tube, K, mask_dtype, backend):
    B, N = x.shape[0] // num_frames, x.shape[1]
    ids = x.new_empty(B, num_frames * N, dtype=torch.int64)
    return x.new_empty(B, num_frames * K, x.shape[2]), x.new_empty(B, num_frames * N, dtype=mask_dtype), ids


@custom_op(
    "tube_masking_backward",
    "(Tensor grad, Tensor ids_restore, SymInt num_frames, SymInt pos_rows, bool need_x, bool need_pos, str backend) "
    "-> (Tensor, Tensor)",
)
def _tube_bwd_op(grad, ids_restore, num_frames, pos_rows, need_x, need_pos, backend):
    gx, gpos = implementation(backends.TUBE, backend, "backward")(
        grad, ids_restore, num_frames, pos_rows, need_x, need_pos
    )
    return gx if gx is not None else grad.new_empty(0), gpos if gpos is not None else grad.new_empty(0)


@_tube_bwd_op.register_fake
def _(grad, ids_restore, num_frames, pos_rows, need_x, need_pos, backend):
    B, L, C = grad.shape[0], ids_restore.shape[1], grad.shape[2]
    gx = grad.new_empty((B * num_frames, L // num_frames, C) if need_x else (0,))
    return gx, grad.new_empty((pos_rows, C) if need_pos else (0,), dtype=torch.float32)


def _tube_setup(ctx, inputs, output):
    x, _, _, pos, num_frames, _, _, _, backend = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[2])
    ctx.num_frames, ctx.backend = num_frames, backend
    ctx.pos = (pos.shape[0], pos.dtype) if pos is not None else None


def _tube_backward(ctx, grad, _mask_grad, _ids_grad):
    (ids_restore,) = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_pos = ctx.pos is not None and ctx.needs_input_grad[3]
    if not (need_x or need_pos):
        return (None,) * 9
    pos_rows = ctx.pos[0] if ctx.pos is not None else 0
    gx, gpos = _tube_bwd_op(grad.contiguous(), ids_restore, ctx.num_frames, pos_rows, need_x, need_pos, ctx.backend)
    return (
        gx if need_x else None, None, None, gpos.to(ctx.pos[1]) if need_pos else None, None, None, None, None, None,
    )  # fmt: skip


_tube_op.register_autograd(_tube_backward, setup_context=_tube_setup)


# ---- custom ops: restore ---------------------------------------------------------------------


@custom_op(
    backends.RESTORE,
    "(Tensor visible, Tensor ids_restore, Tensor mask_token, Tensor? pos, Tensor? keep, str backend) -> Tensor",
)
def _restore_op(visible, ids_restore, mask_token, pos, keep, backend):
    return implementation(backends.RESTORE, backend)(visible, ids_restore, mask_token, pos, keep)


@_restore_op.register_fake
def _(visible, ids_restore, mask_token, pos, keep, backend):
    S = ids_restore.shape[1] if keep is None else visible.shape[1] + keep.shape[1]
    return visible.new_empty(visible.shape[0], S, visible.shape[2])


@custom_op(
    "restore_tokens_backward",
    "(Tensor grad, Tensor ids_restore, SymInt K, Tensor? keep, bool need_visible, bool need_token, bool need_pos, "
    "str backend) -> (Tensor, Tensor, Tensor)",
)
def _restore_bwd_op(grad, ids_restore, K, keep, need_visible, need_token, need_pos, backend):
    out = implementation(backends.RESTORE, backend, "backward")(
        grad, ids_restore, K, keep, need_visible, need_token, need_pos
    )
    return tuple(t if t is not None else grad.new_empty(0) for t in out)


@_restore_bwd_op.register_fake
def _(grad, ids_restore, K, keep, need_visible, need_token, need_pos, backend):
    B, _, C = grad.shape
    gvis = grad.new_empty((B, K, C) if need_visible else (0,))
    f32 = torch.float32
    return (
        gvis,
        grad.new_empty(C if need_token else 0, dtype=f32),
        grad.new_empty((ids_restore.shape[1], C) if need_pos else (0,), dtype=f32),
    )


def _restore_setup(ctx, inputs, output):
    visible, ids_restore, mask_token, pos, keep, backend = inputs
    ctx.save_for_backward(ids_restore, keep)
    ctx.K, ctx.backend = visible.shape[1], backend
    ctx.token_dtype = mask_token.dtype
    ctx.pos_dtype = pos.dtype if pos is not None else None


def _restore_backward(ctx, grad):
    ids_restore, keep = ctx.saved_tensors
    need_vis, _, need_token, need_pos = ctx.needs_input_grad[:4]
    need_pos = need_pos and ctx.pos_dtype is not None
    gvis = None
    if keep is not None and need_vis:  # the visible rows come first, unchanged: their gradient is a view
        gvis, need_vis = grad[:, : ctx.K], False
    if need_vis or need_token or need_pos:
        gv, gt, gp = _restore_bwd_op(grad, ids_restore, ctx.K, keep, need_vis, need_token, need_pos, ctx.backend)
        gvis = gv if need_vis else gvis
        gt = gt.to(ctx.token_dtype) if need_token else None
        gp = gp.to(ctx.pos_dtype) if need_pos else None
    else:
        gt = gp = None
    return gvis, None, gt, gp, None, None


_restore_op.register_autograd(_restore_backward, setup_context=_restore_setup)


# ---- tube_masking ------------------------------------------------------------------------------


def _positions(op: str, pos, shapes: list[tuple[int, ...]], like: tuple[str, torch.Tensor]) -> torch.Tensor | None:
    """``pos`` (one of ``shapes``, each 2-D or 3-D) flattened to 2-D ``(rows, C)``."""
    if pos is None:
        return None
    expected = " or ".join(str(s) for s in shapes)
    validate.tensor(op, "pos", pos, ndim=(2, 3), layout=expected)
    if tuple(pos.shape) not in shapes:
        raise ValueError(f"{op}: argument 'pos' must have shape {expected}, got {tuple(pos.shape)}")
    validate.same_device(op, **{like[0]: like[1]}, pos=pos)
    return pos.reshape(-1, pos.shape[-1]) if pos.dim() == 3 else pos


@dataclasses.dataclass
class TubePlan(Plan):
    num_frames: int
    tube: int
    K: int
    noise: torch.Tensor | None  # (B * n_tubes, N) float32
    pos: torch.Tensor | None  # (N, C) or (T*N, C)


def prepare_tube(x, num_frames, mask_ratio, *, tube=2, generator=None, noise=None, pos=None, backend=None) -> TubePlan:
    """Validate a :func:`tube_masking` call and plan its dispatch."""
    op = backends.TUBE
    validate.tensor(op, "x", x, ndim=3, layout="(B*T, N, C)")
    T = validate.integer(op, "num_frames", num_frames, minimum=1)
    tube = min(validate.integer(op, "tube", tube, minimum=1), T)
    BT, N, C = x.shape
    if BT % T:
        raise ValueError(f"{op}: x.shape[0]={BT} must be a multiple of num_frames={T} (layout (B*T, N, C))")
    if N < 1:
        raise ValueError(f"{op}: argument 'x' has no tokens (shape {tuple(x.shape)})")
    mask_ratio = rules.mask_ratio(op, mask_ratio)
    K = rules.keep_count(N, 1 - mask_ratio)
    if K < 1:
        raise ValueError(f"{op}: mask_ratio={mask_ratio} keeps int(N*(1-mask_ratio))=0 of N={N} tokens per frame")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
    B, n_tubes = BT // T, -(-T // tube)
    if noise is not None:
        validate.tensor(op, "noise", noise, ndim=(2, 3), layout=f"(B, n_tubes, N)=({B}, {n_tubes}, {N})")
        if noise.numel() != B * n_tubes * N or noise.shape[-1] != N or noise.shape[0] not in (B, B * n_tubes):
            raise ValueError(
                f"{op}: argument 'noise' must have shape (B, n_tubes, N)=({B}, {n_tubes}, {N}) or "
                f"(B*n_tubes, N)=({B * n_tubes}, {N}) with n_tubes=ceil(T/tube), got {tuple(noise.shape)}"
            )
        validate.same_device(op, x=x, noise=noise)
        noise = noise.detach().reshape(B * n_tubes, N).float().contiguous()
    pos = _positions(op, pos, [(N, C), (T * N, C), (1, N, C), (1, T * N, C), (T, N, C)], ("x", x))
    features = frozenset(n for n, t in (("noise", noise), ("pos", pos)) if t is not None)
    call = Call(op, {"x": x, "noise": noise, "pos": pos}, {"N": N, "K": K, "T": T, "tube": tube}, features)
    return TubePlan([Request(call, backend)], T, tube, K, noise, pos)


@public_op(prepare_tube)
def tube_masking(
    x: torch.Tensor,
    num_frames: int,
    mask_ratio: float,
    *,
    tube: int = 2,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tube masking (VideoMAE / SimVTP): one random spatial mask per tube of ``tube`` consecutive frames.

    ``x (B*T, N, C)`` (frames of a clip consecutive, any strides, ``T = num_frames``). Every frame keeps exactly
    ``K = int(N * (1 - mask_ratio))`` tokens; frames ``t`` with equal ``t // tube`` keep the same ones
    (``tube >= T``: the whole clip alike, VideoMAE's ``TubeMaskingGenerator``, whose own count is
    ``N - int(N * mask_ratio)``). Returns, at clip level:

    - ``visible (B, T*K, C)``: frame-major, each frame's kept tokens in its tube's random order (+ ``pos``);
      ``visible.view(B*T, K, C)`` is per frame.
    - ``mask (B, T*N)`` in x's dtype: 1 masked, 0 kept, in the clip's token order ``t*N + n``.
    - ``ids_restore (B, T*N)`` int64: the place of token ``t*N + n`` in the sequence ``[visible; masked]`` (MAE's
      convention: ``< T*K`` means kept), what :func:`restore_tokens` takes.

    ``noise (B, n_tubes, N)`` (``n_tubes = ceil(T / tube)``, or flattened to ``(B*n_tubes, N)``): each tube's order
    is ``argsort(noise.float(), stable=True)`` on every backend; otherwise each backend draws from ``generator``
    (or the global seed). ``pos`` ``(N, C)`` (every frame) or ``(T*N, C)`` (clip positions) is added to the kept
    tokens on the fly; any float dtype, summed in fp32. Gradients flow to ``x`` and ``pos``.
    """
    plan = prepare_tube(
        x, num_frames, mask_ratio, tube=tube, generator=generator, noise=noise, pos=pos, backend=backend
    )  # fmt: skip
    (name,) = plan.choose()
    seed = (
        rules.draw_seed(generator, x.device)
        if plan.noise is None
        else torch.zeros(1, dtype=torch.int64, device=x.device)
    )
    return _tube_op(x, seed, plan.noise, plan.pos, plan.num_frames, plan.tube, plan.K, x.dtype, name)


# ---- restore_tokens ----------------------------------------------------------------------------


def _check_rows_are_permutations(op: str, ids: torch.Tensor) -> None:
    L = ids.shape[1]
    ok = torch.equal(torch.sort(ids, dim=1).values, torch.arange(L, device=ids.device, dtype=ids.dtype).expand_as(ids))
    if not ok:
        raise ValueError(f"{op}: argument 'ids_restore' must hold a permutation of [0, L={L}) in every row")


def _keep_index(op: str, keep, B: int, L: int, check: bool) -> torch.Tensor:
    if keep.dtype == torch.bool:
        if tuple(keep.shape) != (B, L):
            raise ValueError(
                f"{op}: argument 'decoder_keep' (bool) must have shape (B, L)=({B}, {L}), got {tuple(keep.shape)}"
            )
        counts = keep.sum(1)
        M = int(counts[0]) if B else 0
        if bool((counts != M).any()):
            raise ValueError(
                f"{op}: argument 'decoder_keep' must keep as many places in every row, got {counts.tolist()}"
            )
        return torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :M]
    if keep.dim() != 2 or keep.shape[0] != B:
        raise ValueError(
            f"{op}: argument 'decoder_keep' (indices) must have shape (B, M) with B={B}, got {tuple(keep.shape)}"
        )
    if check and keep.numel() and not torch.compiler.is_compiling():
        lo, hi = int(keep.min()), int(keep.max())
        if lo < 0 or hi >= L:
            raise ValueError(f"{op}: argument 'decoder_keep' must lie in [0, L={L}), got values in [{lo}, {hi}]")
        if bool((torch.sort(keep, dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError(f"{op}: argument 'decoder_keep' repeats a place within a row")
    return keep


@dataclasses.dataclass
class RestorePlan(Plan):
    mask_token: torch.Tensor  # (C,)
    pos: torch.Tensor | None  # (L, C)
    keep: torch.Tensor | None  # (B, M) places of the mask tokens


def prepare_restore(visible, ids_restore, mask_token, pos=None, *, decoder_keep=None, check_indices=True, backend=None):
    """Validate a :func:`restore_tokens` call and plan its dispatch."""
    op = backends.RESTORE
    validate.tensor(op, "visible", visible, ndim=3, layout="(B, K, C)")
    validate.tensor(op, "ids_restore", ids_restore, ndim=2, layout="(B, L)", dtypes=validate.INDEX)
    B, K, C = visible.shape
    L = ids_restore.shape[1]
    if ids_restore.shape[0] != B or L < K:
        raise ValueError(
            f"{op}: argument 'ids_restore' must have shape (B, L) with B={B} and L >= K={K}, "
            f"got {tuple(ids_restore.shape)}"
        )
    validate.tensor(op, "mask_token", mask_token, layout="(C,)")
    if mask_token.numel() != C or mask_token.shape[-1] != C:
        raise ValueError(
            f"{op}: argument 'mask_token' must have shape (C,)=({C},) or (1, 1, C), got {tuple(mask_token.shape)}"
        )
    pos = _positions(op, pos, [(L, C), (1, L, C)], ("visible", visible))
    validate.same_device(op, visible=visible, ids_restore=ids_restore, mask_token=mask_token)
    if check_indices and ids_restore.numel() and not torch.compiler.is_compiling():
        _check_rows_are_permutations(op, ids_restore)
    keep = None
    if decoder_keep is not None:
        validate.tensor(
            op, "decoder_keep", decoder_keep, layout="(B, L) bool or (B, M) int", dtypes=(torch.bool, *validate.INDEX)
        )
        validate.same_device(op, visible=visible, decoder_keep=decoder_keep)
        keep = _keep_index(op, decoder_keep, B, L, check_indices)
    features = frozenset(n for n, t in (("pos", pos), ("decoder_keep", keep)) if t is not None)
    tensors = {"visible": visible, "ids_restore": ids_restore, "mask_token": mask_token, "pos": pos, "keep": keep}
    call = Call(op, tensors, {"L": L, "K": K, "C": C}, features)
    return RestorePlan([Request(call, backend)], mask_token.reshape(C), pos, keep)


@public_op(prepare_restore)
def restore_tokens(
    visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    decoder_keep: torch.Tensor | None = None,
    check_indices: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """The MAE decoder input in one launch: visible tokens back in their places, the mask token everywhere else,
    decoder positions added.

    ``visible (B, K, C)`` (the encoded visible tokens, in the order masking returned them), ``ids_restore (B, L)``
    int (MAE's: ``ids_restore[b, l] < K`` is the visible row at place ``l``; from :func:`random_masking` or
    :func:`tube_masking`), ``mask_token`` ``(C,)`` or ``(1, 1, C)``, ``pos`` ``(L, C)`` or ``(1, L, C)`` or None.

    - Without ``decoder_keep`` (MAE): ``(B, L, C)``, ``out[b, l] = (visible[b, ids_restore[b, l]] if < K else
      mask_token) + pos[l]``, MAE's ``gather(cat([x, mask_tokens]), ids_restore) + decoder_pos_embed``.
    - With ``decoder_keep`` (VideoMAE V2's decoder masking): ``(B, K + M, C)`` = ``[visible[b, j] + pos[place of
      j] for j < K; mask_token + pos[keep[b, i]] for i < M]``, V2's ``cat([x_vis + pos_vis, mask_token +
      pos_mask])``; the decoder's predictions are its last ``M`` rows, one per kept place. ``decoder_keep`` is
      bool ``(B, L)`` (V2's ``~decode_masked_pos``, the same count per row; places in ascending order) or int
      ``(B, M)`` places in the order given, unique per row. A place is normally a masked one; a visible place gets
      a mask token too, as V2 does when its decoder mask is drawn apart from the encoder's.

    The output has ``visible``'s dtype (sums in fp32; ``mask_token`` / ``pos`` may be fp32 parameters). Backward:
    ``visible``'s gradient, ``mask_token``'s summed over the places it fills, ``pos``'s summed over the batch, all
    from one read of the output gradient. ``check_indices`` (one device sync) checks that every row of
    ``ids_restore`` is a permutation and ``decoder_keep``'s indices; turn it off for indices fastvl made.
    """
    plan = prepare_restore(
        visible, ids_restore, mask_token, pos, decoder_keep=decoder_keep, check_indices=check_indices, backend=backend
    )  # fmt: skip
    (name,) = plan.choose()
    return _restore_op(visible, ids_restore, plan.mask_token, plan.pos, plan.keep, name)
