"""Token selection: gather/scatter, VATT DropToken and MAE/MAC random masking.

Three registry ops serve the public functions:
  ``gather_tokens``  out[b, k] = x[b, idx[b, k]] (+ pos[idx[b, k]]); backward below
  ``scatter_tokens`` the backward: zeros with rows scattered back, duplicates summed (fp32 accumulation),
                     or, when the inverse map is known (indices unique), a gather of the gradient; with
                     ``need_pos`` also the positional gradient (the sum over the batch), in the same pass
  ``draw_tokens``    a uniform random order per row: the first K of it (kept) and its inverse map
The Triton path is two launches for drop/mask: draw (pairwise ranking of Philox keys, no sort) and
gather (+pos on the fly, written through the inverse map when that reads pos once); the backward is one
launch through the inverse map, producing dx and the pos gradient together.
"""

from __future__ import annotations

import torch

from fastvl import _validate as V
from fastvl import backends
from fastvl.backends import Call

from ._dispatch import public, run

MODE_MASK = 0  # also return the (rows, L) mask (1 = removed)
MODE_DROP = 1  # kept indices and inverse map only


# ---- references (the spec; also the CPU path) ----------------------------------------------


def gather_reference(
    x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None, n_valid: int | None = None
) -> torch.Tensor:
    """out[b, j] = x[b, idx[b, j]] (+ pos[idx[b, j]]) for 0 <= idx < n_valid (default L), else 0."""
    B, L, C = x.shape
    idx = idx.long().expand(B, -1)
    n_valid = L if n_valid is None else n_valid
    valid = (idx >= 0) & (idx < n_valid)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    out = torch.gather(x, 1, safe[..., None].expand(B, idx.shape[1], C))
    if pos is not None:
        out = out + pos[safe]
    if n_valid < L or not bool(valid.all()):
        out = out * valid[..., None].to(out.dtype)
    return out.contiguous()


def scatter_reference(grad: torch.Tensor, idx: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L, C) zeros with out[b, idx[b, j]] += grad[b, j]; fp32 accumulation, duplicates summed.

    Indices outside [0, L) take nothing (the forward gathered zeros for them): their gradient is dropped."""
    B, J, C = grad.shape
    idx = idx.long().expand(B, J)
    idx = torch.where((idx >= 0) & (idx < L), idx, L)
    ct = torch.float64 if grad.dtype == torch.float64 else torch.float32
    acc = torch.zeros(B, L + 1, C, dtype=ct, device=grad.device)
    acc.scatter_add_(1, idx[..., None].expand(B, J, C), grad.to(ct))
    return acc[:, :L].to(grad.dtype).contiguous()


def draw_reference(
    seed: torch.Tensor,
    noise: torch.Tensor | None,
    rows: int,
    L: int,
    K: int,
    mode: int,
    mask_dtype: torch.dtype,
    device: torch.device,
):
    """(keep (rows, K), ids_restore (rows, L), mask (rows, L) or (0,)) from argsort(noise, stable=True).

    ``keep = ids_shuffle[:, :K]``; ``ids_restore[l] >= K`` marks a removed token. Without ``noise`` the
    noise is ``torch.rand(rows, L)`` from a generator seeded with ``seed``.
    """
    if noise is None:
        g = torch.Generator(device=device).manual_seed(int(seed.reshape(-1)[0]) & ((1 << 63) - 1))
        noise = torch.rand(rows, L, generator=g, device=device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    keep = ids_shuffle[:, :K].contiguous()
    if mode == MODE_MASK:
        return keep, ids_restore, (ids_restore >= K).to(mask_dtype)
    return keep, ids_restore, torch.empty(0, dtype=mask_dtype, device=device)


# ---- kernel backends -----------------------------------------------------------------------


def _gather_ref(x, idx, pos, n_valid, inv=None):
    return gather_reference(x, idx, pos, n_valid)


def _gather_triton(x, idx, pos, n_valid, inv=None):
    from fastvl.kernels.tokens import gather

    return gather(x, idx, pos, n_valid, inv)


def _gather_cuda(x, idx, pos, n_valid, inv=None):
    from fastvl import _ext
    from fastvl.kernels.utils import empty

    out = empty((x.shape[0], idx.shape[1], x.shape[2]), x.dtype, x.device)
    _ext.module().gather(x, idx, pos, out, n_valid)
    return out


def _pos_grad(full, need_pos):
    ct = torch.float64 if full.dtype == torch.float64 else torch.float32
    return full.sum(0, dtype=ct).to(full.dtype) if need_pos else full.new_empty(0)


def _scatter_ref(grad, idx, inv, L, need_dx, need_pos):
    full = scatter_reference(grad, idx, L)
    return full if need_dx else full.new_empty(0), _pos_grad(full, need_pos)


def _scatter_triton(grad, idx, inv, L, need_dx, need_pos):
    from fastvl.kernels.tokens import gather_backward

    dx, dpos = gather_backward(grad, idx, L, inv, need_dx, need_pos)
    return dx if dx is not None else grad.new_empty(0), dpos if dpos is not None else grad.new_empty(0)


def _scatter_cuda(grad, idx, inv, L, need_dx, need_pos):
    from fastvl import _ext

    if inv is not None:  # unique indices: a gather through the inverse map (slots >= K give zeros)
        full = _gather_cuda(grad, inv, None, idx.shape[1])
    else:
        acc = torch.zeros(grad.shape[0], L, grad.shape[2], dtype=torch.float32, device=grad.device)
        _ext.module().scatter_add(grad, idx, acc)
        full = acc.to(grad.dtype)
    return full if need_dx else full.new_empty(0), _pos_grad(full, need_pos)


def _draw_triton(seed, noise, rows, L, K, mode, mask_dtype, device):
    from fastvl.kernels.tokens import draw

    keep, inv, mask = draw(
        rows, L, K, seed=seed, noise=noise, mask_dtype=mask_dtype if mode == MODE_MASK else None, device=device
    )
    return keep, inv, mask if mask is not None else torch.empty(0, dtype=mask_dtype, device=device)


_GATHER = {"reference": _gather_ref, "triton": _gather_triton, "cuda": _gather_cuda}
_SCATTER = {"reference": _scatter_ref, "triton": _scatter_triton, "cuda": _scatter_cuda}
_DRAW = {"reference": draw_reference, "triton": _draw_triton}

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows_contiguous(*names: str):
    def check(call: Call) -> list[str]:
        out = []
        for n in names:
            t = call.tensors.get(n)
            if t is not None and t.dim() > 0 and t.stride(-1) != 1 and t.size(-1) > 1:
                out.append(f"{n} has channel stride {t.stride(-1)}, needs 1")
        return out

    return check


def _draw_check(call: Call) -> list[str]:
    noise = call.tensors.get("noise")
    if noise is not None and noise.dtype != torch.float32:
        return [f"noise dtype {noise.dtype}: the kernel ranks float32 keys"]
    if call.params.get("L", 0) >= 1 << 20:
        return [f"L={call.params['L']}: the draw packs token indices in 20 bits"]
    return []


_CUDA = {
    "gather_tokens": (30, "16-byte vectorised rows (fastvl._C)"),
    "scatter_tokens": (10, "fp32 atomics into a zeroed buffer + a cast, pos gradient a 2nd pass (fastvl._C)"),
}
for _op, _desc in (
    ("gather_tokens", "row gather, + pos on the fly"),
    ("scatter_tokens", "one pass over the gradient: each dx row written once, + the pos gradient"),
):
    backends.register(_op, "reference", priority=0, description="torch.gather / scatter_add_")
    backends.register(
        _op,
        "triton",
        priority=20,
        check=backends.triton_device_check,
        available=backends.triton_available,
        description=_desc,
    )
    backends.register(
        _op,
        "cuda",
        priority=_CUDA[_op][0],
        check=backends.all_of(
            backends.cuda_device_check,
            backends.dtype_check(_KERNEL_DTYPES, "x", "grad"),
            _rows_contiguous("x", "grad", "pos"),
        ),
        available=backends.cuda_ext_available,
        description=_CUDA[_op][1],
    )
backends.register("draw_tokens", "reference", priority=0, description="torch.rand + argsort (MAE's code)")
backends.register(
    "draw_tokens",
    "triton",
    priority=20,
    check=backends.all_of(backends.triton_device_check, _draw_check),
    available=backends.triton_available,
    description="Philox keys ranked pairwise in tiles, one launch",
)


def _example_gather(d):
    return Call(
        "gather_tokens",
        {
            "x": torch.empty(64, 1568, 1024, dtype=torch.float16, device=d),
            "idx": torch.empty(64, 392, dtype=torch.int64, device=d),
            "pos": None,
        },
        {},
    )


backends.register_example("gather_tokens", _example_gather)
backends.register_example(
    "scatter_tokens",
    lambda d: Call(
        "scatter_tokens",
        {
            "grad": torch.empty(64, 392, 1024, dtype=torch.float16, device=d),
            "idx": torch.empty(64, 392, dtype=torch.int64, device=d),
        },
        {"L": 1568},
    ),
)
backends.register_example(
    "draw_tokens",
    lambda d: Call(
        "draw_tokens",
        {"seed": torch.empty(1, dtype=torch.int64, device=d), "noise": None},
        {"L": 1568, "K": 392, "mode": MODE_MASK},
    ),
)


# ---- custom ops ----------------------------------------------------------------------------


@torch.library.custom_op("fastvl::scatter_tokens", mutates_args=())
def _scatter_op(
    grad: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None, L: int, need_dx: bool, need_pos: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, C) or empty, dpos (L, C) = dx.sum(0) or empty); inv (the slot of each token) = unique indices."""
    call = Call("scatter_tokens", {"grad": grad, "idx": idx, "inv": inv}, {"L": L})
    return run(_SCATTER, backend, call, grad, idx, inv, L, need_dx, need_pos)


@_scatter_op.register_fake
def _(grad, idx, inv, L, need_dx, need_pos, backend):
    dx = grad.new_empty(grad.shape[0], L, grad.shape[2]) if need_dx else grad.new_empty(0)
    return dx, grad.new_empty(L, grad.shape[2]) if need_pos else grad.new_empty(0)


@torch.library.custom_op("fastvl::gather_tokens", mutates_args=())
def _gather_op(
    x: torch.Tensor,
    idx: torch.Tensor,
    pos: torch.Tensor | None,
    inv: torch.Tensor | None,
    backend: str,
    exact_inverse: bool = False,
) -> torch.Tensor:
    """``exact_inverse``: inv is the inverse of an idx with every entry valid (a draw's), so the forward may
    write through it (pos read once, not once per sample)."""
    call = Call("gather_tokens", {"x": x, "idx": idx, "pos": pos}, {})
    return run(_GATHER, backend, call, x, idx, pos, x.shape[1], inv if exact_inverse else None)


@_gather_op.register_fake
def _(x, idx, pos, inv, backend, exact_inverse=False):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx, pos, inv, backend = inputs[:5]
    ctx.save_for_backward(idx, inv)
    ctx.L = x.shape[1]
    ctx.has_pos = pos is not None
    ctx.backend = backend


def _gather_backward(ctx, grad):
    idx, inv = ctx.saved_tensors
    gx = gpos = None
    need_x = ctx.needs_input_grad[0]
    need_pos = ctx.has_pos and ctx.needs_input_grad[2]
    if need_x or need_pos:
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()  # the cuda kernels read whole rows
        dx, dpos = _scatter_op(grad, idx, inv, ctx.L, need_x, need_pos, ctx.backend)
        gx = dx if need_x else None
        gpos = dpos if need_pos else None
    return gx, None, gpos, None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("fastvl::draw_tokens", mutates_args=())
def _draw_op(
    seed: torch.Tensor,
    noise: torch.Tensor | None,
    rows: int,
    L: int,
    K: int,
    mode: int,
    mask_dtype: torch.dtype,
    device: torch.device,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = Call("draw_tokens", {"seed": seed, "noise": noise}, {"L": L, "K": K, "mode": mode})
    return run(_DRAW, backend, call, seed, noise, rows, L, K, mode, mask_dtype, device)


@_draw_op.register_fake
def _(seed, noise, rows, L, K, mode, mask_dtype, device, backend):
    keep = torch.empty(rows, K, dtype=torch.int64, device=device)
    inv = torch.empty(rows, L, dtype=torch.int64, device=device)
    mask = torch.empty((rows, L) if mode == MODE_MASK else (0,), dtype=mask_dtype, device=device)
    return keep, inv, mask


# ---- functional API ------------------------------------------------------------------------


def _request(op: str, backend: str | None) -> str:
    """Resolve the request for a sub-op; a name the sub-op lacks falls back to the global choice."""
    if backend is not None and backend != "auto" and backend not in {b.name for b in backends.backends(op)}:
        backend = None
    return backends.resolve_request(op, backend)[0]


def _check_pos(op: str, pos, x: torch.Tensor) -> torch.Tensor | None:
    if pos is None:
        return None
    V.tensor(op, "pos", pos, ndim=(2, 3), layout="(L, C)")
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
    V.same_device(op, x=x, pos=pos)
    return pos


def _check_gather(x, idx, pos, check_bounds):
    op = "gather_tokens"
    V.tensor(op, "x", x, ndim=3, layout="(B, L, C)")
    V.tensor(op, "idx", idx, ndim=(1, 2), layout="(B, K), (1, K) or (K,)", dtypes=V.INDEX)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{op}: argument 'idx' has batch {idx.shape[0]}, expected 1 or x's batch {x.shape[0]} "
            f"(x shape {tuple(x.shape)}, idx shape {tuple(idx.shape)})"
        )
    V.same_device(op, x=x, idx=idx)
    pos = _check_pos(op, pos, x)
    if check_bounds and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= x.shape[1]:
            raise ValueError(f"{op}: argument 'idx' must lie in [0, L={x.shape[1]}), got values in [{lo}, {hi}]")
    return idx, pos


def _gather_make_call(x, idx, pos=None, **kw):
    idx, pos = _check_gather(x, idx, pos, kw.get("check_bounds", True))
    return Call("gather_tokens", {"x": x, "idx": idx, "pos": pos}, {})


@public("gather_tokens", _gather_make_call)
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
    idx, pos = _check_gather(x, idx, pos, check_bounds)
    inv = None
    if unique_indices and torch.is_grad_enabled() and (x.requires_grad or (pos is not None and pos.requires_grad)):
        K, L = idx.shape[1], x.shape[1]
        at = idx.long()
        at = torch.where((at >= 0) & (at < L), at, L)  # out-of-range indices: a spare column, dropped
        inv = torch.full((idx.shape[0], L + 1), K, dtype=torch.int64, device=x.device)
        inv.scatter_(1, at, torch.arange(K, device=x.device).expand(idx.shape[0], K))
        inv = inv[:, :L]
    return _gather_op(x, idx, pos, inv, _request("gather_tokens", backend))


def _seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    s = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return s.to(device, non_blocking=True)


def _check_x(op, x):
    V.tensor(op, "x", x, ndim=3, layout="(B, L, C)")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: argument 'x' has no tokens (shape {tuple(x.shape)})")


def _drop_k(x, keep_rate):
    op = "drop_tokens"
    _check_x(op, x)
    keep_rate = V.number(op, "keep_rate", keep_rate, lo=0.0, hi=1.0, lo_open=True, hi_open=False)
    L = x.shape[1]
    K = int(keep_rate * L + 1e-6)
    if K < 1:
        raise ValueError(f"{op}: keep_rate={keep_rate} keeps int(keep_rate*L)=0 of L={L} tokens")
    return L, K


def _drop_make_call(x, keep_rate, *, per_sample=False, pos=None, **kw):
    L, K = _drop_k(x, keep_rate)
    rows = x.shape[0] if per_sample else 1
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return [
        Call("draw_tokens", {"seed": seed, "noise": None}, {"L": L, "K": K, "rows": rows}),
        Call("gather_tokens", {"x": x, "idx": seed.new_zeros(rows, K), "pos": _check_pos("drop_tokens", pos, x)}, {}),
    ]


@public("drop_tokens", _drop_make_call)
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
    L, K = _drop_k(x, keep_rate)
    pos = _check_pos("drop_tokens", pos, x)
    if K == L and pos is None:
        ids = torch.arange(L, device=x.device).expand(x.shape[0], L)
        return x, ids
    rows = x.shape[0] if per_sample else 1
    keep, inv, _ = _draw_op(
        _seed(generator, x.device), None, rows, L, K, MODE_DROP, x.dtype, x.device, _request("draw_tokens", backend)
    )
    kept = _gather_op(x, keep, pos, inv, _request("gather_tokens", backend), True)
    return kept, keep.expand(x.shape[0], K)


def _mask_k(x, mask_ratio, noise):
    op = "random_masking"
    _check_x(op, x)
    mask_ratio = V.number(op, "mask_ratio", mask_ratio, lo=0.0, hi=1.0, lo_open=False, hi_open=True)
    B, L, _ = x.shape
    K = int(L * (1 - mask_ratio) + 1e-6)
    if K < 1:
        raise ValueError(f"{op}: mask_ratio={mask_ratio} keeps int(L*(1-mask_ratio))=0 of L={L} tokens")
    if noise is not None:
        V.tensor(op, "noise", noise, ndim=2, layout="(B, L)")
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"{op}: argument 'noise' must have shape (B, L)=({B}, {L}), got {tuple(noise.shape)}")
        V.same_device(op, x=x, noise=noise)
    return L, K


def _mask_make_call(x, mask_ratio, *, noise=None, pos=None, **kw):
    L, K = _mask_k(x, mask_ratio, noise)
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return [
        Call("draw_tokens", {"seed": seed, "noise": noise}, {"L": L, "K": K, "rows": x.shape[0]}),
        Call(
            "gather_tokens",
            {"x": x, "idx": seed.new_zeros(x.shape[0], K), "pos": _check_pos("random_masking", pos, x)},
            {},
        ),
    ]


@public("random_masking", _mask_make_call)
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
    L, K = _mask_k(x, mask_ratio, noise)
    pos = _check_pos("random_masking", pos, x)
    B = x.shape[0]
    keep, ids_restore, mask = _draw_op(
        _seed(generator, x.device) if noise is None else torch.zeros(1, dtype=torch.int64, device=x.device),
        noise.float() if noise is not None else None,
        B,
        L,
        K,
        MODE_MASK,
        x.dtype,
        x.device,
        _request("draw_tokens", backend),
    )
    visible = _gather_op(x, keep, pos, ids_restore, _request("gather_tokens", backend), True)
    return visible, mask, ids_restore
