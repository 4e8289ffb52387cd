"""Backend registry and the one dispatch front door: which implementations an op has, what each supports,
and the choice for a call.

Each op registers backends (``reference``, ``triton``, ``cuda``, external peers such as ``sdpa``), each with
its :class:`~fastvl.capabilities.Capabilities` (data), an optional ``check`` for genuine special cases, the
module it ``requires`` and its implementations. A public op's ``prepare(...)`` validates the arguments and
returns a :class:`Plan`: one :class:`Request` (a :class:`Call` plus the backend asked for) per registry op the
call dispatches. The public function and :func:`explain` both run ``prepare``; the function then calls
:meth:`Plan.choose` once and hands the chosen names to its custom op, which runs them without choosing again.

The request for a call is resolved, first match wins, from:
  1. the op's ``backend=`` argument,
  2. the innermost :func:`use_backend` context (a name, or a mapping ``{op: name}``),
  3. the ``FASTVL_BACKEND`` environment variable (``triton`` or ``roll=cuda,attention=triton``),
  4. ``"auto"``.
``auto`` takes the highest-priority backend that qualifies. A named backend that cannot serve raises
:class:`BackendError` listing its reasons. A *global* request (2 or 3) naming a backend the op does not have
at all falls back to ``auto`` (so ``FASTVL_BACKEND=cuda`` works for ops without a CUDA kernel); an explicit
``backend=`` argument never falls back, except for the helper ops of a public function that lack the name
(``drop_tokens(backend="cuda")`` draws with auto's choice: ``draw_tokens`` has no CUDA kernel).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fastvl import capabilities as caps_
from fastvl.capabilities import Capabilities

__all__ = [
    "Backend",
    "BackendError",
    "Call",
    "custom_op",
    "Plan",
    "Request",
    "backends",
    "capability_table",
    "example_choice",
    "examples",
    "explain",
    "get",
    "implementation",
    "ops",
    "placeholder",
    "public_function",
    "public_op",
    "register",
    "register_example",
    "resolve_request",
    "select",
    "unregister",
    "use_backend",
]


class BackendError(RuntimeError):
    """A requested backend cannot serve a call (or no backend can)."""


@dataclasses.dataclass
class Call:
    """What a backend check sees of one call: the tensors by argument name, the sizes and options (``params``)
    and the optional features it uses (each op's ``backends.py`` lists its vocabulary)."""

    op: str
    tensors: dict[str, torch.Tensor | None]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    features: frozenset[str] = frozenset()
    explicit: bool = False  # True when the backend was named, False under auto

    def present(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, t) for k, t in self.tensors.items() if t is not None]


Check = Callable[[Call], list[str]]


def no_special_case(call: Call) -> list[str]:
    """The check of a backend whose declaration says it all."""
    return []


@dataclasses.dataclass
class Backend:
    """One implementation of an op: its declaration, its special-case check and its implementations by role
    (``forward``, ``backward``, or the op's own role names)."""

    op: str
    name: str
    priority: int
    capabilities: tuple[Capabilities, ...]
    check: Check
    available: Callable[[], list[str]]
    impls: dict[str, Callable[..., Any]]
    requires: str | None = None
    peer: bool = False  # runs outside fastvl's custom op, with its own autograd
    description: str = ""

    def reasons(self, call: Call) -> list[str]:
        r = list(self.available())
        if r:
            return r
        return caps_.reasons(self.name, self.capabilities, call) + list(self.check(call))


_REGISTRY: dict[str, dict[str, Backend]] = {}
_EXAMPLES: dict[str, list[Callable[..., tuple]]] = {}
_PUBLIC_OPS: dict[str, Callable[..., Any]] = {}
_CONTEXT: list[str | Mapping[str, str]] = []  # module-level so torch.compile can trace reads of it


def register(
    op: str,
    name: str,
    priority: int,
    capabilities: Capabilities | tuple[Capabilities, ...] = Capabilities(),
    *,
    check: Check | None = None,
    requires: str | None = None,
    available: Callable[[], list[str]] | None = None,
    peer: bool = False,
    description: str = "",
    **impls: Callable[..., Any],
) -> Backend:
    """Register (or replace) backend ``name`` of ``op``; higher ``priority`` wins under auto.

    ``impls`` are the backend's implementations by role (``forward=``, ``backward=``, ...); ``description``
    defaults to the first line of the first one's docstring. ``requires`` names a module that must be
    importable (``"triton"``, ``"flash_attn"``, ``"fastvl._C"``); ``available`` replaces that test with a
    function returning the reasons the backend is missing."""
    if available is None:
        available = (lambda: list(caps_.module_reasons(requires))) if requires else (lambda: [])
    if not description and impls:
        description = (next(iter(impls.values())).__doc__ or "").strip().split("\n")[0].rstrip(".")
    b = Backend(
        op, name, priority, caps_.declarations(capabilities), check or no_special_case, available, impls, requires,
        peer, description,
    )  # fmt: skip
    _REGISTRY.setdefault(op, {})[name] = b
    return b


def unregister(op: str) -> None:
    """Remove ``op`` and all its backends (tests register toy ops)."""
    _REGISTRY.pop(op, None)
    _EXAMPLES.pop(op, None)


def get(op: str, name: str) -> Backend:
    """Backend ``name`` of ``op``."""
    table = _table(op)
    if name not in table:
        raise BackendError(f"{op}: unknown backend {name!r}; this op has: {', '.join(b.name for b in backends(op))}")
    return table[name]


def implementation(op: str, name: str, role: str = "forward") -> Callable[..., Any]:
    """The function backend ``name`` of ``op`` runs for ``role``."""
    return get(op, name).impls[role]


def ops() -> list[str]:
    """Names of all registered ops (every op registers when ``fastvl`` is imported)."""
    return sorted(_REGISTRY)


def backends(op: str) -> list[Backend]:
    """Backends registered for ``op``, best first."""
    return sorted(_table(op).values(), key=lambda b: -b.priority)


def _table(op: str) -> dict[str, Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[op]


# ---- the request and the choice ----------------------------------------------------------------


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
    if request != "auto":
        b = get(op, request)
        call.explicit = True
        reasons = b.reasons(call)
        if reasons:
            raise BackendError(f"{op}: backend {request!r} cannot serve this call: " + "; ".join(reasons))
        return request
    call.explicit = False
    why = []
    for b in backends(op):
        reasons = b.reasons(call)
        if not reasons:
            return b.name
        why.append(f"  {b.name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can serve this call:\n" + "\n".join(why))


@dataclasses.dataclass
class Request:
    """One dispatch decision of a public call: the registry op's :class:`Call` and the backend asked for.

    ``helper``: the op serves part of a public function named after another op (``drop_tokens`` draws with
    ``draw_tokens``), so a ``backend=`` name it lacks defers to the context, the env, then auto. ``role`` labels
    it in :func:`explain` (e.g. ``"backward"``)."""

    call: Call
    backend: str | None = None
    helper: bool = False
    role: str = ""

    def resolve(self) -> tuple[str, bool]:
        backend = self.backend
        if self.helper and backend not in (None, "auto") and backend not in _REGISTRY.get(self.call.op, {}):
            backend = None
        return resolve_request(self.call.op, backend)

    def choose(self) -> str:
        return select(self.call.op, self.resolve()[0], self.call)


@dataclasses.dataclass
class Plan:
    """What ``prepare(...)`` returns: the requests of one public call (none when the call returns its input)
    and, in an op's subclass, the validated arguments it runs with."""

    requests: list[Request]

    def choose(self) -> list[str]:
        """The backend of every request, in order: the one decision a call makes."""
        return [r.choose() for r in self.requests]


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stand-in for a tensor a call makes later (a draw's indices, a backward's gradient) in a :class:`Call`:
    its shape, dtype and device, unit stride on the last dim, one row of storage."""
    return torch.empty_strided(shape, (0,) * (len(shape) - 1) + (1,), dtype=dtype, device=device)


def custom_op(name: str, schema: str):
    """Decorator: ``fastvl::name`` as a ``torch.library`` custom op with the given schema (``"(Tensor x, ...,
    str backend) -> Tensor"``: flat tensors and scalars, the chosen backend last). fastvl's ops mutate nothing."""
    return torch.library.custom_op(f"fastvl::{name}", mutates_args=(), schema=schema)


def public_op(prepare: Callable[..., Plan]):
    """Decorator for a public functional op: ``prepare`` (its arguments, returning a :class:`Plan`) is what both
    the function and :func:`explain` run. Registers the function under its name for ``explain("name", ...)``."""

    def deco(fn):
        fn.prepare = prepare
        _PUBLIC_OPS[fn.__name__] = fn
        return fn

    return deco


def public_function(name: str) -> Callable[..., Any]:
    """The public op registered under ``name`` by :func:`public_op` (``"temporal_token_roll"``)."""
    if name not in _PUBLIC_OPS:
        raise KeyError(f"no public op named {name!r}; public ops: {', '.join(sorted(_PUBLIC_OPS))}")
    return _PUBLIC_OPS[name]


# ---- reports -----------------------------------------------------------------------------------


def explain(op: str | Callable, *args: Any, backend: str | None = None, **kwargs: Any) -> str:
    """Human-readable dispatch report for one call: every backend, whether it qualifies and why not.

    ``op`` is a public function (``fastvl.ops.temporal_token_roll``) or its name; the remaining arguments are
    the call's arguments. Nothing is launched.
    """
    fn = public_function(op) if isinstance(op, str) else op
    prepare = getattr(fn, "prepare", None)
    if prepare is None:
        raise TypeError(f"explain: {fn!r} is not a fastvl op (it has no prepare)")
    plan = prepare(*args, backend=backend, **kwargs)
    if not plan.requests:
        return f"{fn.__name__}: nothing to dispatch (this call returns its input unchanged)"
    return "\n".join(_explain_one(r) for r in plan.requests)


def _explain_one(req: Request) -> str:
    call = req.call
    request, explicit = req.resolve()
    role = f" ({req.role})" if req.role else ""
    lines = [f"{call.op}{role}: request {request!r}" + (" (explicit)" if explicit else "")]
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


def register_example(op: str, make: Callable[[torch.device, bool], tuple]) -> None:
    """A representative call of ``op``: ``make(device, small)`` returns ``(public op name, args, kwargs)`` whose
    plan dispatches ``op`` (``small``: sizes a CPU test can run). ``fastvl info`` reports the choice for the
    first one; tests run every one."""
    _EXAMPLES.setdefault(op, []).append(make)


def examples(op: str) -> list[Callable[[torch.device, bool], tuple]]:
    """The example makers registered for ``op``."""
    return list(_EXAMPLES.get(op, []))


def example_choice(op: str, device: torch.device) -> tuple[str | None, dict[str, list[str]]]:
    """(backend auto picks for the op's first example call on ``device``, reasons of every other backend)."""
    if not _EXAMPLES.get(op):
        return None, {}
    name, args, kwargs = _EXAMPLES[op][0](torch.device(device), False)
    call = next(r.call for r in public_function(name).prepare(*args, **kwargs).requests if r.call.op == op)
    chosen, why = None, {}
    for b in backends(op):
        call.explicit = False
        r = b.reasons(call)
        if not r and chosen is None:
            chosen = b.name
        elif r:
            why[b.name] = r
    return chosen, why


def capability_table() -> list[dict[str, str]]:
    """Every backend of every op as declared: one row per declaration (``fastvl info --capabilities``); ``check``
    names the special-case rule a backend adds in code, if any (its docstring's first line)."""
    rows = []
    for op in ops():
        for b in backends(op):
            check = "-"
            if b.check is not no_special_case:
                check = (b.check.__doc__ or b.check.__name__).strip().splitlines()[0]
            for decl in b.capabilities:
                head = {"op": op, "backend": b.name, "priority": str(b.priority), "requires": b.requires or "-"}
                rows.append(head | decl.row() | {"check": check})
    return rows
