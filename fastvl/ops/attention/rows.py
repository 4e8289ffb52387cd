"""``attention_rows``: the softmax rows of chosen queries from a forward's saved LSE (validation, plan, custom
op, public function)."""

from __future__ import annotations

import dataclasses

import torch

from fastvl import rules, validate
from fastvl.backends import Call, Plan, Request, custom_op, implementation, public_op

from . import checks
from .backends import ROWS_OP
from .reference import attention_rows_reference


@dataclasses.dataclass
class RowsPlan(Plan):
    scale: float
    key_bias: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    softcap: float


def prepare_rows(
    q_rows, k, lse, *, softmax_scale=None, key_bias=None, key_padding_mask=None, softcap=0.0, backend=None
) -> RowsPlan:
    """Validate an :func:`attention_rows` call and plan its dispatch."""
    op = ROWS_OP
    validate.tensor(op, "q_rows", q_rows, ndim=4, layout="(B, R, H, D)")
    validate.tensor(op, "k", k, ndim=4, layout="(B, Sk, H_k, D)")
    if k.dtype != q_rows.dtype:
        raise TypeError(f"{op}: argument 'k' must have q_rows's dtype {q_rows.dtype}, got {k.dtype}")
    B, R, H, D = q_rows.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"{op}: argument 'k' must be (B, Sk, H_k, D) with q_rows's B={B} and D={D}, got {tuple(k.shape)}"
        )
    Hk, Sk = k.shape[2], k.shape[1]
    if Hk < 1 or H % Hk:
        raise ValueError(f"{op}: argument 'k' must have H_k heads dividing q_rows's H={H}, got H_k={Hk}")
    lse_dtypes = (torch.float32, torch.float64) if q_rows.dtype == torch.float64 else (torch.float32,)
    validate.tensor(op, "lse", lse, ndim=3, layout="(B, H, R)", dtypes=lse_dtypes)
    if tuple(lse.shape) != (B, H, R):
        raise ValueError(f"{op}: argument 'lse' must have shape (B, H, R)=({B}, {H}, {R}), got {tuple(lse.shape)}")
    scale = checks.scale(op, softmax_scale, D)
    cap = checks.softcap(op, softcap)
    bias = checks.key_bias(op, key_bias, B, H, Sk, q_rows, varlen=False)
    if key_padding_mask is not None:
        validate.tensor(op, "key_padding_mask", key_padding_mask, ndim=2, layout="(B, Sk)", dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(
                f"{op}: argument 'key_padding_mask' must have shape (B, Sk)=({B}, {Sk}), "
                f"got {tuple(key_padding_mask.shape)}"
            )
    validate.same_device(op, q_rows=q_rows, k=k, lse=lse, key_bias=key_bias, key_padding_mask=key_padding_mask)
    uses = {"gqa": Hk != H, "key_bias": bias is not None, "key_padding_mask": key_padding_mask is not None,
            "softcap": cap > 0}  # fmt: skip
    tensors = {"q_rows": q_rows, "k": k, "lse": lse, "key_bias": key_bias, "key_padding_mask": key_padding_mask}
    params = {"D": D, "BH": B * H, "R": R, "Sk": Sk}
    call = Call(op, tensors, params, frozenset(f for f, used in uses.items() if used))
    return RowsPlan([Request(call, backend)], scale, bias, key_padding_mask, cap)


@custom_op(
    "attention_rows",
    "(Tensor q_rows, Tensor k, Tensor lse, Tensor? key_bias, Tensor? key_padding_mask, float scale, float softcap, "
    "str backend) -> Tensor",
)
def _rows_op(q_rows, k, lse, key_bias, key_padding_mask, scale, softcap, backend):
    return implementation(ROWS_OP, backend, "forward")(q_rows, k, lse, key_bias, key_padding_mask, scale, softcap)


@_rows_op.register_fake
def _(q_rows, k, lse, *_):
    B, R, H, _D = q_rows.shape
    return q_rows.new_empty((B, H, R, k.shape[1]), dtype=rules.compute_dtype(q_rows.dtype))


def _rows_setup(ctx, inputs, output):
    q_rows, k, lse, bias, kpm, scale, softcap, _backend = inputs
    ctx.save_for_backward(q_rows, k, lse, bias, kpm)
    ctx.scale, ctx.softcap = scale, softcap


def _rows_backward(ctx, grad):
    # the rows are already materialised (B, H, R, Sk): the backward is the reference math by autograd
    q_rows, k, lse, bias, kpm = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (q_rows, k, lse, bias)]
    with torch.enable_grad():
        p = attention_rows_reference(leaves[0], leaves[1], leaves[2], ctx.scale, leaves[3], kpm, ctx.softcap)
        want = [t for t, need in zip(leaves, ctx.needs_input_grad[:4]) if t is not None and need]
        got = iter(torch.autograd.grad(p, want, grad, allow_unused=True)) if want else iter(())
    grads = [next(got) if t is not None and need else None for t, need in zip(leaves, ctx.needs_input_grad[:4])]
    return (*grads, None, None, None, None)


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


@public_op(prepare_rows)
def attention_rows(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """The softmax rows of chosen queries against every key, from the LSE a forward saved, without the S x S
    matrix: ``exp(score(q_rows, k) - lse)``.

    q_rows ``(B, R, H, D)`` (e.g. the CLS or text tokens: ``q[:, :R]``), k ``(B, Sk, H_k, D)``, lse ``(B, H, R)``
    natural-log fp32 (``flash_attention(..., return_lse=True)[1][:, :, rows]``) -> ``(B, H, R, Sk)`` fp32
    (fp64 for fp64). ``softmax_scale``, ``key_bias`` (``(B, Sk)`` or ``(B, H, Sk)``), ``key_padding_mask``
    (zeros at padded keys) and ``softcap`` must be those of the forward; a row with ``lse = +inf`` is zeros.
    The rows sum to 1 over the keys the forward let the query see (with a causal / window / frame-block forward,
    the keys outside it are not zeroed here: pass a key_padding_mask for them). Differentiable in q_rows, k,
    lse and key_bias.
    """
    plan = prepare_rows(
        q_rows, k, lse, softmax_scale=softmax_scale, key_bias=key_bias, key_padding_mask=key_padding_mask,
        softcap=softcap, backend=backend,
    )  # fmt: skip
    (name,) = plan.choose()
    return _rows_op(q_rows, k, lse, plan.key_bias, plan.key_padding_mask, plan.scale, plan.softcap, name)
