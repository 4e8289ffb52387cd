"""Test helpers shared by fastvl's tests: devices, kernel backends to exercise, inputs, tolerances.

Tolerance rules (docs/architecture.md, "Correctness"): a kernel result in dtype ``d`` is compared with the
float64 reference; it passes if its error is within the per-dtype tolerance, or within 2x the error of
PyTorch's own computation in ``d`` against the same float64 reference (flash-attn's rule) when that is given.
"""

from __future__ import annotations

import torch

from fastvl import env

# per-dtype (rtol, atol) against a float64 reference
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (:func:`fastvl.env.triton_interpret`)."""
    return env.triton_interpret()


def kernel_backends(*names: str) -> list[str]:
    """The kernel backends that can run here: 'triton' on a GPU or under the interpreter, 'cuda' on a GPU
    with fastvl._C built. ``names`` restricts the candidates (default: triton and cuda)."""
    names = names or ("triton", "cuda")
    out = []
    for n in names:
        if n == "triton" and (torch.cuda.is_available() or interpret()):
            out.append(n)
        if n == "cuda" and torch.cuda.is_available():
            from fastvl import _ext

            if _ext.built():
                out.append(n)
    return out


def dtypes_to_test() -> list[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter's bf16 arithmetic is wrong)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def randn(*shape, dtype=torch.float32, device=None, generator=None, scale: float = 1.0) -> torch.Tensor:
    """Fresh normal draws in float64, then cast (so the fp64 reference sees the exact same values)."""
    x = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
    return x.to(dtype=dtype, device=device or device_default())


def device_default():
    return device()


def noncontiguous(x: torch.Tensor, kind: str = "rows") -> torch.Tensor:
    """Same values, non-contiguous strides. ``rows``: leading dims permuted in memory (channel stride 1);
    ``channels``: channel stride 2 (every other element of a wider buffer)."""
    if kind == "rows":
        if x.dim() < 2:
            return noncontiguous(x, "channels")
        y = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif kind == "channels":
        buf = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        buf.fill_(float("nan") if x.dtype.is_floating_point else -1)
        y = buf[..., ::2]
        y.copy_(x)
    else:
        raise ValueError(f"noncontiguous: kind must be 'rows' or 'channels', got {kind!r}")
    assert not y.is_contiguous() or x.numel() <= 1
    return y


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    torch_same_dtype: torch.Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """``actual`` (computed in ``dtype``) against the float64 reference ``ref64``.

    Passes within (rtol, atol) for the dtype, or within 2x + atol of PyTorch's own error when
    ``torch_same_dtype`` (PyTorch's result in the same dtype) is given. NaN anywhere fails.
    """
    dtype = dtype or actual.dtype
    if actual.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(actual).any() and not torch.isnan(ref64).any():
        raise AssertionError(f"{name}: NaN in the result (unwritten/poisoned elements?)")
    r, a = TOL[dtype]
    r = r if rtol is None else rtol
    a = a if atol is None else atol
    err = (actual.double() - ref64.double()).abs()
    bound = a + r * ref64.double().abs()
    if bool((err <= bound).all()):
        return
    if torch_same_dtype is not None:
        torch_err = max_err(torch_same_dtype, ref64)
        if err.max().item() <= 2 * torch_err + a:
            return
        raise AssertionError(
            f"{name} ({dtype}): max error {err.max().item():.3g} > 2 x PyTorch's {torch_err:.3g} + {a:g}"
        )
    worst = int((err - bound).argmax())
    raise AssertionError(
        f"{name} ({dtype}): max error {err.max().item():.3g} exceeds atol={a:g}, rtol={r:g} "
        f"(worst at flat index {worst}: got {actual.reshape(-1)[worst].item():.6g}, "
        f"expected {ref64.reshape(-1)[worst].item():.6g})"
    )
