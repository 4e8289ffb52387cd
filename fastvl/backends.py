"""Backend registry: which implementations exist for an op, what each supports, and the choice.

Each op registers backends (``reference``, ``triton``, ``cuda``, external peers such as ``sdpa``).
A backend declares an availability check (is the library importable / built?) and a per-call
check; both return human-readable *not-supported reasons* (an empty list means "can serve").

The request for a call is resolved, first match wins, from:
  1. the op's ``backend=`` argument,
  2. the innermost :func:`use_backend` context (a name, or a mapping ``{op: name}``),
  3. the ``FASTVL_BACKEND`` environment variable (``triton`` or ``roll=cuda,attention=triton``),
  4. ``"auto"``.
``auto`` takes the highest-priority backend that qualifies. A named backend that cannot serve
raises :class:`BackendError` listing its reasons. A *global* request (2 or 3) naming a backend the
op does not have at all falls back to ``auto`` (so ``FASTVL_BACKEND=cuda`` works for ops without
a CUDA kernel); an explicit ``backend=`` argument never falls back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "Backend",
    "BackendError",
    "Call",
    "available_backends",
    "backends",
    "explain",
    "ops",
    "example_choice",
    "register",
    "register_example",
    "resolve_request",
    "select",
    "use_backend",
]


class BackendError(RuntimeError):
    """A requested backend cannot serve a call (or no backend can)."""


@dataclasses.dataclass
class Call:
    """What a backend check sees of one call: the tensors by argument name and the other arguments."""

    op: str
    tensors: dict[str, torch.Tensor | None]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    explicit: bool = False  # True when the backend was named, False under auto

    def present(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, t) for k, t in self.tensors.items() if t is not None]


Check = Callable[[Call], list[str]]


@dataclasses.dataclass
class Backend:
    op: str
    name: str
    priority: int
    check: Check
    available: Callable[[], list[str]]
    description: str = ""

    def reasons(self, call: Call) -> list[str]:
        r = list(self.available())
        if r:
            return r
        return list(self.check(call))


_REGISTRY: dict[str, dict[str, Backend]] = {}
_EXAMPLES: dict[str, Callable[[torch.device], Call]] = {}
_CONTEXT: list[str | Mapping[str, str]] = []  # module-level so torch.compile can trace reads of it


def register(
    op: str,
    name: str,
    *,
    priority: int,
    check: Check | None = None,
    available: Callable[[], list[str]] | None = None,
    description: str = "",
) -> Backend:
    """Register (or replace) backend ``name`` for ``op``; higher ``priority`` wins under auto."""
    b = Backend(op, name, priority, check or (lambda call: []), available or (lambda: []), description)
    _REGISTRY.setdefault(op, {})[name] = b
    return b


def register_example(op: str, make: Callable[[torch.device], Call]) -> None:
    """A representative call of ``op`` on a device, used by ``fastvl info`` to report the choice there."""
    _EXAMPLES[op] = make


def example_choice(op: str, device: torch.device) -> tuple[str | None, dict[str, list[str]]]:
    """(backend auto picks for the op's example call on ``device``, reasons of every other backend)."""
    _load_all()
    make = _EXAMPLES.get(op)
    if make is None:
        return None, {}
    call = make(torch.device(device))
    chosen, why = None, {}
    for b in backends(op):
        call.explicit = False
        r = b.reasons(call)
        if not r and chosen is None:
            chosen = b.name
        elif r:
            why[b.name] = r
    return chosen, why


def ops() -> list[str]:
    """Names of all registered ops."""
    _load_all()
    return sorted(_REGISTRY)


def backends(op: str) -> list[Backend]:
    """Backends registered for ``op``, best first."""
    _load_all()
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {', '.join(sorted(_REGISTRY))}")
    return sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)


def available_backends(op: str) -> dict[str, list[str]]:
    """For each backend of ``op``: [] if importable/built here, else the reasons it is not."""
    return {b.name: b.available() for b in backends(op)}


def _parse_env(value: str) -> str | dict[str, str]:
    value = value.strip()
    if "=" not in value:
        return value
    out = {}
    for part in value.split(","):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
    return out


def resolve_request(op: str, backend: str | None) -> tuple[str, bool]:
    """Return (requested name, explicit?) for ``op`` from the argument, the context, the env."""
    if backend is not None and backend != "auto":
        return backend, True
    if backend == "auto":
        return "auto", False
    for entry in reversed(_CONTEXT):
        name = entry if isinstance(entry, str) else entry.get(op)
        if name:
            return _global_name(op, name)
    env = os.environ.get("FASTVL_BACKEND")
    if env:
        parsed = _parse_env(env)
        name = parsed if isinstance(parsed, str) else parsed.get(op)
        if name:
            return _global_name(op, name)
    return "auto", False


def _global_name(op: str, name: str) -> tuple[str, bool]:
    if name == "auto" or name not in _REGISTRY.get(op, {}):
        return "auto", False
    return name, True


@contextlib.contextmanager
def use_backend(spec: str | Mapping[str, str]) -> Iterator[None]:
    """Select backends inside a ``with`` block: ``use_backend("triton")`` or ``use_backend({"roll": "cuda"})``."""
    if not isinstance(spec, (str, Mapping)):
        raise TypeError(f"use_backend: spec must be a backend name or a mapping op -> name, got {type(spec).__name__}")
    _CONTEXT.append(spec)
    try:
        yield
    finally:
        _CONTEXT.pop()


def select(op: str, request: str, call: Call) -> str:
    """Name of the backend that serves ``call``; raises :class:`BackendError` with every reason if none."""
    table = _REGISTRY.get(op)
    if table is None:
        _load_all()
        table = _REGISTRY[op]
    if request != "auto":
        b = table.get(request)
        if b is None:
            raise BackendError(
                f"{op}: unknown backend {request!r}; this op has: {', '.join(x.name for x in backends(op))}"
            )
        call.explicit = True
        reasons = b.reasons(call)
        if reasons:
            raise BackendError(f"{op}: backend {request!r} cannot serve this call: " + "; ".join(reasons))
        return request
    call.explicit = False
    why = []
    for b in sorted(table.values(), key=lambda x: -x.priority):
        reasons = b.reasons(call)
        if not reasons:
            return b.name
        why.append(f"  {b.name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can serve this call:\n" + "\n".join(why))


def explain(op: str | Callable, *args: Any, backend: str | None = None, **kwargs: Any) -> str:
    """Human-readable dispatch report for one call: every backend, whether it qualifies and why not.

    ``op`` is a public function (``fastvl.ops.temporal_token_roll``) or its name; the remaining
    arguments are the call's arguments. Nothing is launched.
    """
    fn = op
    if isinstance(op, str):
        import fastvl.ops as _ops

        fn = getattr(_ops, op, None)
        if fn is None:
            raise KeyError(f"explain: no public op named {op!r}")
    make_call = getattr(fn, "make_call", None)
    if make_call is None:
        raise TypeError(f"explain: {fn!r} is not a fastvl op (it has no make_call)")
    made = make_call(*args, **kwargs)
    calls: list[Call] = made if isinstance(made, list) else [made]
    return "\n".join(_explain_one(call, backend) for call in calls)


def _explain_one(call: Call, backend: str | None) -> str:
    request, explicit = resolve_request(
        call.op, backend if backend in {b.name for b in backends(call.op)} | {None, "auto"} else None
    )
    lines = [f"{call.op}: request {request!r}" + (" (explicit)" if explicit else "")]
    chosen = None
    try:
        chosen = select(call.op, request, call)
    except BackendError as e:
        lines.append(f"  -> error: {e}")
    for b in backends(call.op):
        call.explicit = request == b.name
        reasons = b.reasons(call)
        mark = "chosen" if b.name == chosen else ("ok" if not reasons else "no")
        lines.append(
            f"  [{mark:>6}] {b.name} (priority {b.priority})" + ("" if not reasons else ": " + "; ".join(reasons))
        )
    return "\n".join(lines)


# ---- shared checks -------------------------------------------------------------------------


_AVAILABLE: dict[str, tuple[str, ...]] = {}  # module -> reasons, checked once per process


def _module_reasons(module: str, what: str) -> list[str]:
    """[] if ``module`` can be imported (checked once per process), else the reason."""
    r = _AVAILABLE.get(module)
    if r is None:
        r = _AVAILABLE[module] = () if importlib.util.find_spec(module) is not None else (f"{what} is not installed",)
    return list(r)


def triton_available() -> list[str]:
    return _module_reasons("triton", "triton")


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (decided when fastvl.kernels is first imported)."""
    import sys

    mod = sys.modules.get("fastvl.kernels")
    if mod is not None:
        return bool(mod.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cuda_ext_available() -> list[str]:
    from fastvl import _ext

    return _ext.reasons()


def triton_device_check(call: Call) -> list[str]:
    """Triton serves CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 when asked for by name."""
    out = []
    devices = {t.device.type for _, t in call.present()}
    if len(devices) > 1:
        out.append(f"tensors are on different devices ({', '.join(sorted(devices))})")
    for name, t in call.present():
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpret():
            if not call.explicit:
                out.append(
                    f"{name} is a CPU tensor: the Triton interpreter (TRITON_INTERPRET=1) serves only explicit "
                    "requests (backend='triton'), auto keeps the faster reference on the CPU"
                )
            continue
        out.append(
            f"{name} is on {t.device.type}: triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
            "set before fastvl.kernels is imported)"
        )
        break
    return out


def cuda_device_check(call: Call) -> list[str]:
    for name, t in call.present():
        if t.device.type != "cuda":
            return [f"{name} is on {t.device.type}: the cuda backend needs CUDA tensors"]
    return []


def dtype_check(allowed: tuple[torch.dtype, ...], *names: str) -> Check:
    def check(call: Call) -> list[str]:
        out = []
        for name in names or [n for n, _ in call.present()]:
            t = call.tensors.get(name)
            if t is not None and t.dtype not in allowed:
                out.append(
                    f"{name} dtype {t.dtype} not in ({', '.join(str(d).replace('torch.', '') for d in allowed)})"
                )
        return out

    return check


def all_of(*checks: Check) -> Check:
    def check(call: Call) -> list[str]:
        out: list[str] = []
        for c in checks:
            out.extend(c(call))
        return out

    return check


_LOADED = False


def _load_all() -> None:
    """Import every op module so its backends are registered."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import fastvl.ops  # noqa: F401
