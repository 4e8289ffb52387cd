"""What a backend can serve, declared as data, and the not-supported reasons derived from the declaration.

A backend declares one :class:`Capabilities` (or one per device kind, CPU-specific ones first: a call on a
device that no declaration covers is judged by the last one, after the device reason) in the style of
xformers' ``AttentionFwOpBase`` (``SUPPORTED_DEVICES``, ``SUPPORTED_DTYPES``, ``SUPPORTED_MAX_K``,
``SUPPORTS_*``). :func:`reasons` turns a declaration and a :class:`~fastvl.backends.Call` into the reasons the
backend cannot serve it; only genuine special cases are written as code (a ``check`` passed to
``fastvl.backends.register``).

A Call names the optional *features* it uses (``key_padding_mask``, ``varlen``, ...: each op lists its
vocabulary in its ``backends.py``); a backend serves the features it declares, and ``notes`` explain the ones
it does not (format strings over ``Call.params``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from fastvl import env
from fastvl.rules import KERNEL_DTYPES
from fastvl.validate import dtype_names

if TYPE_CHECKING:
    from fastvl.backends import Call

_DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}


@dataclasses.dataclass(frozen=True)
class KernelConstant:
    """A constant of a kernel module, read when first needed (kernel modules load on first use)."""

    module: str
    name: str

    def value(self) -> int:
        return _kernel_constant(self.module, self.name)

    def __str__(self) -> str:
        return f"{self.module.rpartition('.')[2]}.{self.name}"


@dataclasses.dataclass(frozen=True)
class Limit:
    """A bound on a size the Call carries in ``params[param]``: at most ``maximum``, a multiple of ``multiple_of``."""

    param: str
    label: str  # how reasons name the size, e.g. "head dim D"
    maximum: int | KernelConstant | None = None
    multiple_of: int | None = None
    why: str = ""

    def describe(self) -> str:
        maximum = self.maximum
        if isinstance(maximum, KernelConstant):
            try:
                maximum = f"{maximum.value()} ({maximum})"
            except ImportError:  # the kernels cannot load here (no triton): name the constant
                pass
        parts = [f"<= {maximum}"] if maximum is not None else []
        parts += [f"% {self.multiple_of} == 0"] if self.multiple_of else []
        return f"{self.param} {' and '.join(parts)}"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one backend serves (on the devices it names). ``None`` means "any"."""

    devices: tuple[str, ...] | None = None  # device types served
    interpreter: bool = False  # CPU tensors too, through the Triton interpreter, when the backend is named
    dtypes: tuple[torch.dtype, ...] | None = None  # of the tensors ``dtype_args`` names
    dtype_args: tuple[str, ...] = ()  # default: every floating tensor of the call
    auto_dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes auto picks it for (the rest: only by name)
    interpreted_dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes the interpreter computes correctly
    limits: tuple[Limit, ...] = ()
    features: frozenset[str] = frozenset()  # optional features served
    named_only: frozenset[str] = frozenset()  # features served only when the backend is named
    unit_stride: tuple[str, ...] = ()  # tensors whose last dim must be contiguous
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # feature -> why not (or why named only)

    def row(self) -> dict[str, str]:
        """The declaration as text, one entry per column of ``fastvl info --capabilities``."""
        devices = "any" if self.devices is None else ", ".join(self.devices)
        if self.interpreter:
            devices += " (cpu: interpreter, named)"
        dtypes = "any" if self.dtypes is None else dtype_names(self.dtypes)
        if self.auto_dtypes is not None:
            dtypes += f" (auto: {dtype_names(self.auto_dtypes)})"
        if self.interpreted_dtypes is not None:
            dtypes += f" (interpreter: {dtype_names(self.interpreted_dtypes)})"
        features = sorted(f + (" (named)" if f in self.named_only else "") for f in self.features)
        limits = [lim.describe() for lim in self.limits] + [f"{n}: unit stride" for n in self.unit_stride]
        return {
            "devices": devices,
            "dtypes": dtypes,
            "limits": "; ".join(limits) or "-",
            "features": ", ".join(features) or "-",
        }


INTERPRETED_DTYPES = (torch.float16, torch.float32)
"""The floating dtypes the Triton interpreter computes correctly (its bf16 arithmetic is wrong)."""


def triton_kernel(**declared) -> Capabilities:
    """A fastvl Triton kernel that computes on floating data: CUDA tensors (CPU ones through the Triton
    interpreter when the backend is named), float16 / bfloat16 / float32, bfloat16 not interpreted."""
    return Capabilities(
        devices=("cuda",), interpreter=True, dtypes=KERNEL_DTYPES, interpreted_dtypes=INTERPRETED_DTYPES, **declared
    )


TRITON_COPY = Capabilities(devices=("cuda",), interpreter=True)
"""A fastvl Triton kernel that only moves data: any dtype, CUDA tensors (CPU ones through the interpreter when
the backend is named)."""


def declarations(caps: Capabilities | tuple[Capabilities, ...]) -> tuple[Capabilities, ...]:
    return caps if isinstance(caps, tuple) else (caps,)


# ---- availability ------------------------------------------------------------------------------


# Both are constants of the process: torch.compile calls them while tracing and bakes in the result (the
# choice of a backend is made before fastvl's custom op, so compile traces it).


@torch.compiler.assume_constant_result
def module_reasons(module: str) -> tuple[str, ...]:
    """() if ``module`` can be imported here (checked once per process), else the reason."""
    if module not in _MODULE_REASONS:
        if module == "fastvl._C":
            from fastvl import _ext

            _MODULE_REASONS[module] = tuple(_ext.reasons())
        else:
            found = importlib.util.find_spec(module) is not None
            _MODULE_REASONS[module] = () if found else (f"{module} is not installed",)
    return _MODULE_REASONS[module]


@torch.compiler.assume_constant_result
def _kernel_constant(module: str, name: str) -> int:
    return getattr(importlib.import_module(module), name)


_MODULE_REASONS: dict[str, tuple[str, ...]] = {}


# ---- reasons -----------------------------------------------------------------------------------


def reasons(name: str, caps: Capabilities | tuple[Capabilities, ...], call: Call) -> list[str]:
    """Why backend ``name`` with declaration ``caps`` cannot serve ``call`` ([] if it can)."""
    decls = declarations(caps)
    present = call.present()
    device_types = sorted({t.device.type for _, t in present})
    out = []
    if len(device_types) > 1:
        out.append(f"tensors are on different devices ({', '.join(device_types)})")
    device = device_types[0] if device_types else "cpu"
    decl, interpreted, device_reasons = _declaration_for(name, decls, device, call, present)
    out += device_reasons
    served = not device_reasons
    out += _dtype_reasons(name, decl, call, present, device if len(decls) > 1 else None, interpreted)
    out += _limit_reasons(decl, call, resolve_kernel_constants=served)
    out += _feature_reasons(name, decl, call)
    for arg in decl.unit_stride:
        t = call.tensors.get(arg)
        if t is not None and t.dim() > 0 and t.stride(-1) != 1 and t.size(-1) > 1:
            out.append(f"{arg} has channel stride {t.stride(-1)}, needs 1")
    return list(dict.fromkeys(out))  # a rule broken by two tensors is said once


def _declaration_for(name, decls, device, call, present) -> tuple[Capabilities, bool, list[str]]:
    """(the declaration that judges the call, served by the interpreter?, device reasons)."""
    for decl in decls:
        if decl.devices is None or device in decl.devices:
            return decl, False, []
    decl = decls[-1]
    first = present[0][0] if present else "input"
    if device == "cpu" and any(d.interpreter for d in decls) and env.triton_interpret():
        if call.explicit:
            return decl, True, []
        return (
            decl,
            True,
            [
                f"{first} is a CPU tensor: the Triton interpreter (TRITON_INTERPRET=1) serves only explicit requests "
                f"(backend='{name}'), auto keeps the faster reference on the CPU"
            ],
        )
    where = " or ".join(_DEVICE_NAMES.get(d, d) for d in decl.devices)
    others = [_DEVICE_NAMES.get(d, d) for x in decls[:-1] for d in (x.devices or ())]
    hint = f" (and on {', '.join(others)})" if others else ""
    if decl.interpreter:
        hint += " (or CPU tensors with TRITON_INTERPRET=1 set before fastvl.kernels is imported)"
    return decl, False, [f"{first} is on {device}: {name} runs on {where} tensors{hint}"]


def _dtype_reasons(name, decl, call, present, device, interpreted) -> list[str]:
    args = decl.dtype_args or tuple(n for n, t in present if t.is_floating_point())
    where = f" on {_DEVICE_NAMES.get(device, device)}" if device else ""
    out = []
    for arg in args:
        t = call.tensors.get(arg)
        if t is None:
            continue
        dt = str(t.dtype).replace("torch.", "")
        if decl.dtypes is not None and t.dtype not in decl.dtypes:
            out.append(
                f"{arg} dtype {t.dtype}{where}: {name} takes {dtype_names(decl.dtypes)}{' there' if where else ''}"
            )
        elif decl.auto_dtypes is not None and t.dtype not in decl.auto_dtypes and not call.explicit:
            note = decl.notes.get("auto_dtypes", "")
            out.append(
                f"{arg} dtype {t.dtype}: auto takes {name} for {dtype_names(decl.auto_dtypes)} only"
                + (f" ({note})" if note else "")
            )
        elif interpreted and decl.interpreted_dtypes is not None and t.dtype not in decl.interpreted_dtypes:
            out.append(f"{dt} on the CPU: the Triton interpreter's {dt} arithmetic is wrong (checked on a GPU only)")
    return out


def _limit_reasons(decl, call, resolve_kernel_constants: bool) -> list[str]:
    out = []
    for lim in decl.limits:
        v = call.params.get(lim.param)
        if v is None:
            continue
        maximum = lim.maximum
        if isinstance(maximum, KernelConstant):
            if not resolve_kernel_constants:  # the backend cannot serve anyway: do not load its kernels
                continue
            maximum = maximum.value()
        why = f": {lim.why}" if lim.why else ""
        if maximum is not None and v > maximum:
            out.append(f"{lim.label}={v} > {maximum}{why}")
        elif lim.multiple_of and v % lim.multiple_of:
            out.append(f"{lim.label}={v} is not a multiple of {lim.multiple_of}{why}")
    return out


def _feature_reasons(name, decl, call) -> list[str]:
    out = []
    for feature in sorted(call.features):
        if feature in decl.features and (call.explicit or feature not in decl.named_only):
            continue
        note = decl.notes.get(feature)
        if note is None:
            note = f"{feature}: {name} does not serve it" if feature not in decl.features else ""
            note = note or f"{feature}: auto leaves it to another backend (name backend='{name}' to use it)"
        out.append(note.format(**call.params))
    return out
