"""A GPU view of CPU tensors: the Python side of an op call sees one H100 while every kernel runs on the CPU.

Inside :func:`gpu_view`, tensors report ``cuda:0`` (``Tensor.device`` / ``is_cuda``), ``torch.cuda`` answers
for one sm_90 device (132 SMs by default), and a dispatch mode sends every factory asked for on ``cuda`` to
the CPU. The tensors stay CPU tensors underneath (C++ sees their real device), so autograd and every aten
kernel run on the CPU while fastvl's ops and launchers take their GPU branches (autotuned configs, grids
sized by the SM count, bf16 paths). The same mode meters aten ops for ``benchmarks/static_capture.py``: each
op reads the footprint of its tensor inputs (distinct addresses) and writes its outputs; views, ``empty``
and a ``.to("cuda")`` of a tensor already shown on cuda cost nothing. Custom ops (``fastvl::*``) run their
bodies under the mode, so the aten ops inside them are metered too. ``zero_empty``: new tensors start as
zeros, so that where kernels are recorded but not run, host code that indexes with their outputs (merge
destinations from a matching kernel, ranks) sees valid indices instead of whatever memory held.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

H100_SMS = 132


def _real_device(t: torch.Tensor) -> torch.device:
    return torch._C.TensorBase.device.__get__(t)


def _device_prop(t: torch.Tensor) -> torch.device:
    d = _real_device(t)
    return torch.device("cuda", 0) if d.type == "cpu" else d


def _h100_props(sms: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        name="NVIDIA H100 (static sm_90 view)",
        major=9,
        minor=0,
        multi_processor_count=sms,
        total_memory=80 * 2**30,
        max_threads_per_multi_processor=2048,
        regs_per_multiprocessor=65536,
        shared_memory_per_block_optin=227 * 1024,
        shared_memory_per_multiprocessor=228 * 1024,
        L2_cache_size=50 * 2**20,
        warp_size=32,
    )


class _NoDevice:
    """Stands in for ``torch.cuda.device(...)``: the view has one device, nothing to switch."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def __enter__(self) -> _NoDevice:
        return self

    def __exit__(self, *_: Any) -> None:
        return None


def _cpu_device(v: Any) -> Any:
    if isinstance(v, torch.device) and v.type == "cuda":
        return torch.device("cpu")
    if isinstance(v, str) and v.startswith("cuda"):
        return "cpu"
    return v


class Meter:
    """Bytes and launches of aten ops: footprint of tensor inputs read, outputs written."""

    def __init__(self) -> None:
        self.read = 0
        self.written = 0
        self.launches = 0
        self.ops: dict[str, int] = {}


def footprint(t: torch.Tensor) -> int:
    """Bytes at distinct addresses of ``t`` (stride-0 dimensions counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


_EMPTY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "detach"}
_WRITE_ONLY = {"fill_", "zero_", "copy_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_"}
_SCATTER = {"scatter_", "scatter_add_", "scatter_reduce_", "index_put_", "index_add_", "index_copy_", "index_fill_"}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def aten_bytes(func, args, kwargs, out) -> tuple[int, int]:
    """(read, written) bytes of one aten op under the footprint model; a view (every output aliases an
    input, nothing written in place) costs nothing."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    if name in _FREE:
        return 0, 0
    inputs: list[tuple[Any, torch.Tensor]] = []
    for i, a in enumerate(schema.arguments):
        v = args[i] if i < len(args) else kwargs.get(a.name)
        for t in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(t, torch.Tensor):
                inputs.append((a, t))
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    writes = [t for a, t in inputs if a.alias_info is not None and a.alias_info.is_write]
    in_storages = {_storage(t) for _, t in inputs}
    if not writes and outs and all(_storage(o) in in_storages for o in outs):
        return 0, 0
    read = written = 0
    write_ids = {id(t) for t in writes}
    for a, t in inputs:
        if id(t) not in write_ids:
            read += footprint(t)
        elif name in _SCATTER:
            continue  # partial write: counted from the index below
        else:
            written += footprint(t)
            if name not in _WRITE_ONLY and not a.kwarg_only:
                read += footprint(t)  # in-place arithmetic reads self
    if name in _SCATTER and writes:
        idx = [t for _, t in inputs if not t.is_floating_point() and id(t) not in write_ids]
        n = max((i.numel() for i in idx), default=0) * writes[0].element_size()
        written += n
        if name in ("scatter_add_", "scatter_reduce_", "index_add_", "index_put_"):
            read += n
    for o in outs:
        if id(o) not in write_ids and _storage(o) not in {_storage(t) for t in writes}:
            written += footprint(o)
    return read, written


def _same_but_device(t: torch.Tensor, kwargs: dict) -> bool:
    dtype = kwargs.get("dtype")
    return (dtype is None or dtype == t.dtype) and kwargs.get("memory_format") in (None, torch.preserve_format)


class GpuView(TorchDispatchMode):
    """Sends factories asked for on ``cuda`` to the CPU; meters aten ops; runs custom ops' bodies under itself."""

    def __init__(self, zero_empty: bool = False) -> None:
        super().__init__()
        self.meter: Meter | None = None
        self.paused = 0
        self.zero_empty = zero_empty

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        moved = False
        if "device" in kwargs:
            moved = _cpu_device(kwargs["device"]) is not kwargs["device"]
            kwargs["device"] = _cpu_device(kwargs["device"])
        args = tree_map(_cpu_device, args)
        if func.namespace not in ("aten", "prim", "prims"):  # a custom op: run its body with this mode on
            with self:
                keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
                return func.redispatch(keys, *args, **kwargs)
        out = func(*args, **kwargs)
        if self.zero_empty and func._schema.name.split("::")[-1] in _EMPTY:
            out.zero_()
        if moved and func is torch.ops.aten._to_copy.default and _same_but_device(args[0], kwargs):
            return out  # ``.to("cuda")`` of what the GPU view shows on cuda already: a GPU makes no copy
        if self.meter is not None and not self.paused:
            r, w = aten_bytes(func, args, kwargs, out)
            if r or w:
                self.meter.read += r
                self.meter.written += w
                self.meter.launches += 1
                op = func._schema.name.split("::")[-1]
                self.meter.ops[op] = self.meter.ops.get(op, 0) + 1
        return out


_VIEW: GpuView | None = None


def _on_cpu(make: Callable) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return make(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def gpu_view(sms: int = H100_SMS, zero_empty: bool = False) -> Iterator[GpuView]:
    """Inside: CPU tensors look like ``cuda:0`` tensors of one H100 with ``sms`` multiprocessors to Python code
    (see the module docstring); ``zero_empty``: every new tensor starts as zeros."""
    global _VIEW
    if _VIEW is not None:
        yield _VIEW
        return
    cuda = torch.cuda
    saved_cuda = {
        k: getattr(cuda, k)
        for k in (
            "_lazy_init",
            "is_available",
            "current_device",
            "device_count",
            "get_device_properties",
            "get_device_capability",
            "device",
            "synchronize",
        )
    }
    props = _h100_props(sms)
    patches = {
        "_lazy_init": lambda: None,
        "is_available": lambda: True,
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "get_device_properties": lambda *a, **k: props,
        "get_device_capability": lambda *a, **k: (9, 0),
        "device": _NoDevice,
        "synchronize": lambda *a, **k: None,
    }
    tensor_attrs = {
        "device": property(_device_prop),
        "is_cuda": property(lambda t: _real_device(t).type in ("cpu", "cuda")),
        "is_cpu": property(lambda t: False),
        "get_device": lambda t: 0,
    }
    # tensors made from data copy to their device below the dispatch modes: send them to the CPU here
    makers = {k: getattr(torch, k) for k in ("tensor", "as_tensor", "asarray")}
    for k, f in makers.items():
        setattr(torch, k, _on_cpu(f))
    had = {k: k in torch.Tensor.__dict__ for k in tensor_attrs}
    old = {k: torch.Tensor.__dict__[k] for k in tensor_attrs if had[k]}
    mode = GpuView(zero_empty)
    for k, v in patches.items():
        setattr(cuda, k, v)
    for k, v in tensor_attrs.items():
        setattr(torch.Tensor, k, v)
    _VIEW = mode
    try:
        with mode:
            yield mode
    finally:
        _VIEW = None
        for k, v in saved_cuda.items():
            setattr(cuda, k, v)
        for k, f in makers.items():
            setattr(torch, k, f)
        for k in tensor_attrs:
            if had[k]:
                setattr(torch.Tensor, k, old[k])
            else:
                delattr(torch.Tensor, k)


def current_view() -> GpuView | None:
    """The active :func:`gpu_view` (None outside one)."""
    return _VIEW


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """aten ops run here (the interpreter's copies, pre-hooks of the harness) are not metered."""
    if _VIEW is None:
        yield
        return
    _VIEW.paused += 1
    try:
        yield
    finally:
        _VIEW.paused -= 1
