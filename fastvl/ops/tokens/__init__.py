"""Token selection: gather/scatter, VATT DropToken and MAE/MAC random masking.

Three registry ops serve the public functions:
  ``gather_tokens``  out[b, k] = x[b, idx[b, k]] (+ pos[idx[b, k]]); backward below
  ``scatter_tokens`` the backward: zeros with rows scattered back, duplicates summed (fp32 accumulation),
                     or, when the inverse map is known (indices unique), a copy of the gradient through it;
                     with ``need_pos`` also the positional gradient (the sum over the batch), in the same pass
  ``draw_tokens``    a uniform random order per row: the first K of it (kept) and its inverse map
The Triton path is two launches for drop/mask: draw (pairwise ranking of Philox keys, no sort) and
gather (+pos on the fly, written through the inverse map when that reads pos once); the backward is one
launch through the inverse map, producing dx and the pos gradient together.
"""

from __future__ import annotations

import dataclasses

import torch

from fastvl import rules, validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, placeholder, public_op

from . import backends  # noqa: F401  (importing it registers the token ops' backends)
from .reference import MODE_DROP, MODE_MASK, draw_reference, gather_reference, scatter_reference

__all__ = [
    "MODE_DROP",
    "MODE_MASK",
    "draw_op",
    "draw_reference",
    "drop_tokens",
    "gather_reference",
    "gather_tokens",
    "prepare_drop",
    "prepare_gather",
    "prepare_masking",
    "random_masking",
    "scatter_op",
    "scatter_reference",
]

# ---- custom ops ----------------------------------------------------------------------------


@custom_op(
    "scatter_tokens",
    "(Tensor grad, Tensor idx, Tensor? inv, SymInt L, bool need_dx, bool need_pos, str backend) -> (Tensor, Tensor)",
)
def scatter_op(grad, idx, inv, L, need_dx, need_pos, backend):
    """Gather's backward on scatter_tokens backend ``backend``: ``(dx (B, L, C) or empty, dpos (L, C) = dx.sum(0)
    or empty)``. ``inv (B or 1, L)``, the slot of each token (>= K when none), promises unique indices."""
    return implementation("scatter_tokens", backend)(grad, idx, inv, L, need_dx, need_pos)


@scatter_op.register_fake
def _(grad, idx, inv, L, need_dx, need_pos, backend):
    dx = grad.new_empty(grad.shape[0], L, grad.shape[2]) if need_dx else grad.new_empty(0)
    return dx, grad.new_empty(L, grad.shape[2]) if need_pos else grad.new_empty(0)


@custom_op(
    "gather_tokens",
    '(Tensor x, Tensor idx, Tensor? pos, Tensor? inv, str backend, str scatter_backend="", '
    "bool exact_inverse=False) -> Tensor",
)
def _gather_op(x, idx, pos, inv, backend, scatter_backend="", exact_inverse=False):
    """``backend``: the gather's; ``scatter_backend``: the backward's (default: ``backend``); ``inv``: the inverse
    map the backward copies through (unique indices), or None. ``exact_inverse``: ``inv`` is the inverse of an
    idx whose every entry is valid (a draw's), so the forward may write through it (pos read once, not once
    per sample)."""
    return implementation("gather_tokens", backend)(x, idx, pos, x.shape[1], inv if exact_inverse else None)


@_gather_op.register_fake
def _(x, idx, *rest):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx, pos, inv, backend, scatter_backend = inputs[:6]
    ctx.save_for_backward(idx, inv)
    ctx.L = x.shape[1]
    ctx.has_pos = pos is not None
    ctx.backend = scatter_backend or backend


def _gather_backward(ctx, grad):
    idx, inv = ctx.saved_tensors
    gx = gpos = None
    need_x = ctx.needs_input_grad[0]
    need_pos = ctx.has_pos and ctx.needs_input_grad[2]
    if need_x or need_pos:
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()  # the cuda kernels read whole rows
        dx, dpos = scatter_op(grad, idx, inv, ctx.L, need_x, need_pos, ctx.backend)
        gx = dx if need_x else None
        gpos = dpos if need_pos else None
    return gx, None, gpos, None, None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@custom_op(
    "draw_tokens",
    "(Tensor seed, Tensor? noise, SymInt rows, SymInt L, SymInt K, SymInt mode, ScalarType mask_dtype, "
    "Device device, str backend) -> (Tensor, Tensor, Tensor)",
)
def draw_op(*args):
    """``draw_op(seed, noise, rows, L, K, mode, mask_dtype, device, backend)``: the draw on backend ``backend``,
    ``(keep (rows, K), ids_restore (rows, L), mask (rows, L) or (0,))`` as in :func:`.reference.draw_reference`
    (``mode``: ``MODE_MASK`` or ``MODE_DROP``)."""
    *args, backend = args
    return implementation("draw_tokens", backend)(*args)


@draw_op.register_fake
def _(seed, noise, rows, L, K, mode, mask_dtype, device, backend):
    keep = torch.empty(rows, K, dtype=torch.int64, device=device)
    inv = torch.empty(rows, L, dtype=torch.int64, device=device)
    mask = torch.empty((rows, L) if mode == MODE_MASK else (0,), dtype=mask_dtype, device=device)
    return keep, inv, mask


# ---- validation and plans ------------------------------------------------------------------


def _check_pos(op: str, pos, x: torch.Tensor) -> torch.Tensor | None:
    if pos is None:
        return None
    validate.tensor(op, "pos", pos, ndim=(2, 3), layout="(L, C)")
    if pos.dim() == 3:
        if pos.shape[0] != 1:
            raise ValueError(f"{op}: argument 'pos' must be (L, C) or (1, L, C), got shape {tuple(pos.shape)}")
        pos = pos[0]
    if tuple(pos.shape) != (x.shape[1], x.shape[2]):
        raise ValueError(
            f"{op}: argument 'pos' must have shape (L, C)=({x.shape[1]}, {x.shape[2]}), got {tuple(pos.shape)}"
        )
    if pos.dtype != x.dtype:
        raise TypeError(f"{op}: argument 'pos' must have x's dtype {x.dtype}, got {pos.dtype}")
    validate.same_device(op, x=x, pos=pos)
    return pos


def _check_tokens(op: str, x) -> None:
    validate.tensor(op, "x", x, ndim=3, layout="(B, L, C)")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: argument 'x' has no tokens (shape {tuple(x.shape)})")


def _needs_grad(x: torch.Tensor, pos: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (pos is not None and pos.requires_grad))


def _gather_request(x, idx, pos, backend) -> Request:
    return Request(Call("gather_tokens", {"x": x, "idx": idx, "pos": pos}), backend, helper=True)


def _scatter_request(x, K, idx, backend) -> Request:
    """The backward of a gather of ``K`` rows of ``x`` at ``idx``, planned with the forward."""
    grad = placeholder((x.shape[0], K, x.shape[2]), x.dtype, x.device)
    scatter = Call("scatter_tokens", {"grad": grad, "idx": idx}, {"L": x.shape[1]})
    return Request(scatter, backend, helper=True, role="backward")


@dataclasses.dataclass
class GatherPlan(Plan):
    idx: torch.Tensor  # (B or 1, K)
    pos: torch.Tensor | None  # (L, C)
    inv: torch.Tensor | None  # (B or 1, L) inverse map for a gather backward, or None


def prepare_gather(x, idx, pos=None, *, unique_indices=False, check_bounds=True, backend=None) -> GatherPlan:
    """Validate a :func:`gather_tokens` call and plan its dispatch (the backward's scatter too, when it will run)."""
    op = "gather_tokens"
    validate.tensor(op, "x", x, ndim=3, layout="(B, L, C)")
    validate.tensor(op, "idx", idx, ndim=(1, 2), layout="(B, K), (1, K) or (K,)", dtypes=validate.INDEX)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{op}: argument 'idx' has batch {idx.shape[0]}, expected 1 or x's batch {x.shape[0]} "
            f"(x shape {tuple(x.shape)}, idx shape {tuple(idx.shape)})"
        )
    validate.same_device(op, x=x, idx=idx)
    pos = _check_pos(op, pos, x)
    if check_bounds and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= x.shape[1]:
            raise ValueError(f"{op}: argument 'idx' must lie in [0, L={x.shape[1]}), got values in [{lo}, {hi}]")
    requests = [_gather_request(x, idx, pos, backend)]
    inv = None
    if _needs_grad(x, pos):
        K = idx.shape[1]
        requests.append(_scatter_request(x, K, idx, backend))
        if unique_indices:
            L = x.shape[1]
            at = idx.long()
            at = torch.where((at >= 0) & (at < L), at, L)  # out-of-range indices: a spare column, dropped
            inv = torch.full((idx.shape[0], L + 1), K, dtype=torch.int64, device=x.device)
            inv.scatter_(1, at, torch.arange(K, device=x.device).expand(idx.shape[0], K))
            inv = inv[:, :L]
    return GatherPlan(requests, idx, pos, inv)


@public_op(prepare_gather)
def gather_tokens(
    x: torch.Tensor,
    idx: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    unique_indices: bool = False,
    check_bounds: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Gather tokens: ``x (B, L, C)``, ``idx (B, K)`` (or ``(K,)`` / ``(1, K)`` shared by the batch,
    int32/int64 in ``[0, L)``) -> ``(B, K, C)``; with ``pos (L, C)``, ``pos[idx]`` is added on the fly.

    Backward scatters into zeros, duplicate indices summed in fp32, in a fixed order (deterministic).
    ``unique_indices=True`` promises no duplicates and turns the backward into a copy through the inverse
    map. ``check_bounds`` costs one device sync; turn it off for indices you generated. Without it, an
    index outside ``[0, L)`` gathers a zero row and its gradient is dropped (never written out of bounds).
    """
    plan = prepare_gather(
        x, idx, pos, unique_indices=unique_indices, check_bounds=check_bounds, backend=backend
    )  # fmt: skip
    names = plan.choose()
    return _gather_op(x, plan.idx, plan.pos, plan.inv, names[0], names[1] if len(names) > 1 else "")


@dataclasses.dataclass
class DrawPlan(Plan):
    rows: int
    L: int
    K: int
    noise: torch.Tensor | None  # (B, L) float32
    pos: torch.Tensor | None  # (L, C)


def _draw_plan(x, K, rows, noise, pos, backend) -> DrawPlan:
    L = x.shape[1]
    seed = placeholder((1,), torch.int64, x.device)
    draw = Call("draw_tokens", {"seed": seed, "noise": noise}, {"L": L, "K": K, "rows": rows})
    keep = placeholder((rows, K), torch.int64, x.device)
    requests = [Request(draw, backend, helper=True), _gather_request(x, keep, pos, backend)]
    if _needs_grad(x, pos):
        requests.append(_scatter_request(x, K, keep, backend))
    return DrawPlan(requests, rows, L, K, noise, pos)


def prepare_drop(x, keep_rate, *, per_sample=False, generator=None, pos=None, backend=None) -> DrawPlan:
    """Validate a :func:`drop_tokens` call and plan its dispatch (no request when every token is kept)."""
    op = "drop_tokens"
    _check_tokens(op, x)
    keep_rate = rules.keep_rate(op, keep_rate)
    L = x.shape[1]
    K = rules.keep_count(L, keep_rate)
    if K < 1:
        raise ValueError(f"{op}: keep_rate={keep_rate} keeps int(keep_rate*L)=0 of L={L} tokens")
    pos = _check_pos(op, pos, x)
    if K == L and pos is None:
        return DrawPlan([], x.shape[0], L, K, None, None)
    return _draw_plan(x, K, x.shape[0] if per_sample else 1, None, pos, backend)


@public_op(prepare_drop)
def drop_tokens(
    x: torch.Tensor,
    keep_rate: float,
    *,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
    pos: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VATT DropToken: keep ``K = int(keep_rate * L)`` of ``L`` tokens, uniformly without replacement.

    x ``(B, L, C)``; returns ``(kept (B, K, C), ids_keep (B, K) int64)``, kept in the random order of the
    draw (VATT shuffles then takes the first K). One subset is shared by the batch (VATT) unless
    ``per_sample``; when shared, ``ids_keep`` is an expanded view. ``drop_rate = 1 - keep_rate``.
    ``pos (L, C)`` is added to the kept tokens on the fly. Reproducible from ``generator`` (or the
    global seed) per backend.
    """
    plan = prepare_drop(x, keep_rate, per_sample=per_sample, generator=generator, pos=pos, backend=backend)
    if not plan.requests:
        return x, torch.arange(plan.L, device=x.device).expand(x.shape[0], plan.L)
    draw_backend, gather_backend, *scatter_backend = plan.choose()
    seed = rules.draw_seed(generator, x.device)
    keep, inv, _ = draw_op(seed, None, plan.rows, plan.L, plan.K, MODE_DROP, x.dtype, x.device, draw_backend)
    kept = _gather_op(x, keep, plan.pos, inv, gather_backend, "".join(scatter_backend), True)
    return kept, keep.expand(x.shape[0], plan.K)


def prepare_masking(x, mask_ratio, *, generator=None, noise=None, pos=None, backend=None) -> DrawPlan:
    """Validate a :func:`random_masking` call and plan its dispatch."""
    op = "random_masking"
    _check_tokens(op, x)
    mask_ratio = rules.mask_ratio(op, mask_ratio)
    B, L, _ = x.shape
    K = rules.keep_count(L, 1 - mask_ratio)
    if K < 1:
        raise ValueError(f"{op}: mask_ratio={mask_ratio} keeps int(L*(1-mask_ratio))=0 of L={L} tokens")
    if noise is not None:
        validate.tensor(op, "noise", noise, ndim=2, layout="(B, L)")
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"{op}: argument 'noise' must have shape (B, L)=({B}, {L}), got {tuple(noise.shape)}")
        validate.same_device(op, x=x, noise=noise)
        noise = noise.float()
    return _draw_plan(x, K, B, noise, _check_pos(op, pos, x), backend)


@public_op(prepare_masking)
def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE random masking, independent per sample (pass video as ``(B*T, N, C)`` to mask frames apart).

    Keeps ``K = int(L * (1 - mask_ratio))`` tokens. Returns ``visible (B, K, C)`` (``x[ids_shuffle[:, :K]]``,
    + ``pos`` if given), ``mask (B, L)`` in x's dtype (1 removed, 0 kept, original order) and
    ``ids_restore (B, L)`` int64. With ``noise (B, L)`` the order is ``argsort(noise.float(), stable=True)``
    on every backend (MAE-exact); otherwise each backend draws from ``generator`` (or the global seed).
    """
    plan = prepare_masking(x, mask_ratio, generator=generator, noise=noise, pos=pos, backend=backend)
    draw_backend, gather_backend, *scatter_backend = plan.choose()
    seed = (
        rules.draw_seed(generator, x.device)
        if plan.noise is None
        else torch.zeros(1, dtype=torch.int64, device=x.device)
    )
    keep, ids_restore, mask = draw_op(
        seed, plan.noise, plan.rows, plan.L, plan.K, MODE_MASK, x.dtype, x.device, draw_backend
    )
    visible = _gather_op(x, keep, plan.pos, ids_restore, gather_backend, "".join(scatter_backend), True)
    return visible, mask, ids_restore
