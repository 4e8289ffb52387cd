"""Capture the Triton launches fastvl's ops make, bound as a CUDA device binds them, on a machine with no GPU.

Three pieces, used together by ``benchmarks/static_sm90.py``:

* :func:`gpu_view` (``benchmarks/static_view.py``) makes the Python side of an op call see an H100 while
  every kernel runs on the CPU, and meters the aten ops.
* :class:`Capture` replaces ``JITFunction.run`` and ``Autotuner.run``. Each launch is bound by Triton's own
  binder for an sm_90 target (``create_function_from_signature`` + ``_pack_args``: 16-byte aligned pointers
  and integers divisible by 16 get ``tt.divisibility=16``, integers equal to 1 become constants), so the
  signature, constants and attributes are exactly what a CUDA launch would compile. CPU tensors have real
  ``data_ptr`` values with 64-byte aligned bases, like the CUDA allocator's. An autotuned launch records every
  config its own pruning keeps (``prune_configs``); the first one runs.
* Optionally the launch runs in the Triton interpreter with ``tl.load`` / ``tl.store`` / atomics counted:
  bytes *issued* (every unmasked element of every access) and bytes *unique* (distinct addresses read and
  written per launch: the compulsory DRAM traffic of one launch with an ideal cache), plus the aten ops'
  bytes metered by the GPU view. Launches = Triton launches + aten ops that move bytes (each is at least
  one kernel on a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .static_view import H100_SMS, Meter, current_view, gpu_view, paused

__all__ = ["H100_SMS", "MODULES", "CallRecord", "Capture", "Launch", "gpu_view", "jit_function", "kernel_modules",
           "record_call", "target"]  # fmt: skip

# The kernel modules whose launches are captured (fastvl.kernels.<name>): every module of kernels/ with a kernel.
MODULES = ("roll", "tokens", "attention", "layer_norm", "contrastive", "masking", "select", "merge",
           "linear_cross_entropy")  # fmt: skip
SM90 = {"arch": 90, "warp_size": 32, "shared_per_block": 227 * 1024}


def kernel_modules() -> list[types.ModuleType]:
    """Import every kernel module compiled (not interpreted): TRITON_INTERPRET must be unset in this process."""
    import fastvl.kernels

    if fastvl.kernels.INTERPRET:
        raise RuntimeError("static capture needs TRITON_INTERPRET unset before fastvl.kernels is imported")
    return [importlib.import_module(f"fastvl.kernels.{m}") for m in MODULES]


@contextlib.contextmanager
def device_queries(sms: int = H100_SMS) -> Iterator[None]:
    """Launchers that ask Triton's driver (not ``torch.cuda``, which :func:`gpu_view` answers) for the device's
    limits get the view's answer: ``sms`` multiprocessors and sm_90's 227 KB of shared memory per block."""
    import fastvl.kernels.contrastive as contrastive

    saved = contrastive.device_limits
    contrastive.device_limits = lambda device: (sms, SM90["shared_per_block"]) if device.type == "cuda" else None
    try:
        yield
    finally:
        contrastive.device_limits = saved


def target():
    from triton.backends.compiler import GPUTarget

    # arch 90: the NVIDIA backend compiles for sm_90a (wgmma, setmaxnreg) from 90 up
    return GPUTarget("cuda", SM90["arch"], SM90["warp_size"])


# ---- launches ------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch (one autotune config of it) as a CUDA device would compile and run it."""

    kernel: str  # "module:qualname" of the JITFunction (Triton's registry key)
    signature: dict[str, Any]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]
    grid: tuple[int, int, int]
    call: int  # launches of one call share this index (the configs of an autotuned launch)
    config: str | None  # the autotune config's text, None when the kernel is not autotuned
    n_configs: int
    executed: bool = False
    bytes_issued: int = 0
    bytes_unique: int = 0

    @property
    def name(self) -> str:
        return self.kernel.split(":")[-1]

    @property
    def module(self) -> str:
        return self.kernel.split(":")[0]

    def config_text(self) -> str:
        """Tile sizes (upper-case integer constants, e.g. BLOCK_M=128) and warps / stages: 'BLOCK_M=128 w4 s3'."""
        names = list(self.signature)
        tiles = [
            f"{names[p[0]]}={v}"
            for p, v in sorted(self.constexprs.items())
            if len(p) == 1 and p[0] < len(names) and names[p[0]].isupper()
            and isinstance(v, int) and not isinstance(v, bool)
        ]  # fmt: skip
        return " ".join(tiles + [f"w{self.options.get('num_warps')}", f"s{self.options.get('num_stages')}"])

    def compile_key(self) -> str:
        """Identity of the compiled binary (kernel, types, constants, attributes, options)."""
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items(), key=repr),
                     sorted(self.attrs.items()), sorted((k, repr(v)) for k, v in self.options.items())))  # fmt: skip

    def job(self) -> dict[str, Any]:
        """What a compile worker needs (plain picklable values)."""
        return {
            "kernel": self.kernel,
            "signature": self.signature,
            "constexprs": self.constexprs,
            "attrs": self.attrs,
            "options": self.options,
        }


def jit_function(kernel: str):
    """The JITFunction registered under ``module:qualname`` (imports the module)."""
    from triton.runtime.jit import JITFunction

    module, qualname = kernel.split(":")
    mod = importlib.import_module(module)
    from triton.runtime import jit as jit_mod

    reg = getattr(jit_mod, "_triton_jit_function_registry", {})
    fn = reg.get(kernel)
    if fn is None:
        fn = mod
        for part in qualname.split("."):
            fn = getattr(fn, part)
        while not isinstance(fn, JITFunction):
            fn = fn.fn
    return fn


class _Binder:
    """Triton's own argument binder for an sm_90 target, cached per kernel."""

    def __init__(self) -> None:
        from triton.compiler import make_backend

        self.backend = make_backend(target())
        self.binders: dict[int, Callable] = {}

    def bind(self, fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict, dict]:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self.binders.get(id(fn))
        if binder is None:
            binder = self.binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization, options)
        return bound_args, signature, constexprs, attrs, dict(options.__dict__)


class _ByteCounter:
    """Distinct bytes read and written by one interpreted launch (per-storage byte maps) and bytes issued."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        spans = {}
        for t in tensors:
            s = t.untyped_storage()
            spans[s.data_ptr()] = s.nbytes()
        self.bases = np.array(sorted(spans), dtype=np.uint64)
        self.sizes = np.array([spans[b] for b in sorted(spans)], dtype=np.uint64)
        self.maps: dict[tuple[str, int], np.ndarray] = {}
        self.issued = 0

    def add(self, kind: str, addrs: np.ndarray, mask: np.ndarray | None, size: int) -> None:
        a = addrs.reshape(-1).astype(np.uint64)
        if mask is not None:
            a = a[np.broadcast_to(mask, addrs.shape).reshape(-1)]
        if a.size == 0:
            return
        self.issued += int(a.size) * size
        which = np.searchsorted(self.bases, a, side="right") - 1
        for i in np.unique(which):
            sel = a[which == i]
            if i < 0 or np.any(sel - self.bases[i] >= self.sizes[i]):
                raise RuntimeError("an interpreted access fell outside every tensor argument's storage")
            key = (kind, int(i))
            m = self.maps.get(key)
            if m is None:
                m = self.maps[key] = np.zeros(int(self.sizes[i]), dtype=bool)
            off = (sel - self.bases[i]).astype(np.int64)
            for b in range(size):
                m[off + b] = True

    def unique(self) -> int:
        return int(sum(int(m.sum()) for m in self.maps.values()))


def _elem_bytes(handle) -> int:
    ty = handle.get_element_ty()
    return max(1, ty.primitive_bitwidth // 8)


@contextlib.contextmanager
def _counting(counter: _ByteCounter) -> Iterator[None]:
    from triton.runtime import interpreter as it

    cls = it.InterpreterBuilder
    orig = {k: getattr(cls, k) for k in ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                         "create_atomic_cas")}  # fmt: skip

    def masked_load(self, ptrs, mask, other, *a, **k):
        counter.add("r", ptrs.data, mask.data, _elem_bytes(ptrs))
        return orig["create_masked_load"](self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        counter.add("w", ptrs.data, mask.data, _elem_bytes(ptrs))
        return orig["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self, op, ptr, val, mask, *a, **k):
        counter.add("r", ptr.data, mask.data, _elem_bytes(ptr))
        counter.add("w", ptr.data, mask.data, _elem_bytes(ptr))
        return orig["create_atomic_rmw"](self, op, ptr, val, mask, *a, **k)

    def atomic_cas(self, ptr, cmp, val, *a, **k):
        counter.add("r", ptr.data, None, _elem_bytes(ptr))
        counter.add("w", ptr.data, None, _elem_bytes(ptr))
        return orig["create_atomic_cas"](self, ptr, cmp, val, *a, **k)

    cls.create_masked_load, cls.create_masked_store = masked_load, masked_store
    cls.create_atomic_rmw, cls.create_atomic_cas = atomic_rmw, atomic_cas
    try:
        yield
    finally:
        for k, v in orig.items():
            setattr(cls, k, v)


@contextlib.contextmanager
def _fast_interpreter() -> Iterator[None]:
    """The interpreter without its integer-overflow checks (device asserts a GPU build compiles out): faster."""
    import dataclasses as dc

    from triton.runtime import interpreter as it

    old = it.interpreter_builder.options
    it.interpreter_builder.options = dc.replace(old, sanitize_overflow=False)
    patch_tensor = it._patch_lang_tensor

    def patched(tensor, scope):
        # Triton 3.6's interpreter turns a 1-element array into an index with int(), which numpy >= 2.3 rejects
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    it._patch_lang_tensor = patched
    try:
        yield
    finally:
        it.interpreter_builder.options = old
        it._patch_lang_tensor = patch_tensor


_INTERPRETED: dict[int, Any] = {}


@contextlib.contextmanager
def _callees_interpreted(fn) -> Iterator[None]:
    """Swap every @triton.jit function a kernel can reach (its module's globals, transitively, and Triton's own
    language library: ``tl.sum``, ``tl.max``, Philox ...) for an interpreted one while it runs, then restore."""
    import sys

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITCallable

    def interpreted(value):
        f = _INTERPRETED.get(id(value))
        if f is None:
            f = _INTERPRETED[id(value)] = InterpretedFunction(value.fn)
        return f

    swapped: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()
    todo: list[Any] = [fn.__globals__, tl.tensor]
    todo += [m.__dict__ for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    while todo:
        space = todo.pop()
        if id(space) in seen:
            continue
        seen.add(id(space))
        items = space.items() if isinstance(space, dict) else vars(space).items()
        for name, value in list(items):
            if isinstance(value, JITCallable):
                swapped.append((space, name, value))
                if isinstance(space, dict):
                    space[name] = interpreted(value)
                else:
                    setattr(space, name, interpreted(value))
                todo.append(value.fn.__globals__)
    try:
        yield
    finally:
        for space, name, value in reversed(swapped):
            if isinstance(space, dict):
                space[name] = value
            else:
                setattr(space, name, value)


def _tensors_in(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out += _tensors_in(v)
        elif hasattr(v, "base") and isinstance(v.base, torch.Tensor):  # a TensorDescriptor
            out.append(v.base)
    return out


class Capture:
    """Records every launch inside ``with capture:``; ``execute=True`` also runs them interpreted, counted."""

    def __init__(self, execute: bool = False) -> None:
        self.execute = execute
        self.launches: list[Launch] = []
        self._binder = _Binder()
        self._calls = 0
        self._tls = threading.local()
        self._saved: dict[str, Any] = {}

    # one autotune config at a time
    def _config(self) -> tuple[int | None, str | None, int, bool]:
        return getattr(self._tls, "config", (None, None, 1, True))

    def _on_launch(self, fn, args: tuple, kwargs: dict, grid) -> None:
        with paused():
            call, config, n, run = self._config()
            if call is None:
                call = self._calls
                self._calls += 1
            bound_args, signature, constexprs, attrs, options = self._binder.bind(fn, args, kwargs)
            if callable(grid):
                grid = grid(bound_args)
            g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
            key = f"{fn.fn.__module__}:{fn.fn.__qualname__}"
            launch = Launch(key, signature, constexprs, attrs, options, g, call, config, n)
            self.launches.append(launch)
            if run and self.execute:
                self._interpret(fn, launch, args, kwargs, g)

    def _interpret(self, fn, launch: Launch, args: tuple, kwargs: dict, grid: tuple[int, int, int]) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        counter = _ByteCounter(_tensors_in(list(args) + list(kwargs.values())))
        kernel = InterpretedFunction(fn.fn)
        with _callees_interpreted(fn.fn), _counting(counter), _fast_interpreter():
            kernel[grid](*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
        launch.executed = True
        launch.bytes_issued = counter.issued
        launch.bytes_unique = counter.unique()

    def _autotune(self, tuner, args: tuple, kwargs: dict) -> None:
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else list(tuner.configs)
        call = self._calls
        self._calls += 1
        try:
            for i, cfg in enumerate(configs):
                run = i == 0
                self._tls.config = (call, str(cfg), len(configs), run)
                if run and self.execute:
                    full = {**tuner.nargs, **kwargs, **cfg.all_kwargs()}
                    with paused():
                        if len(configs) > 1:
                            tuner.pre_hook(full, reset_only=True)
                        if cfg.pre_hook is not None:
                            cfg.pre_hook(full)
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            self._tls.config = (None, None, 1, True)
            tuner.nargs = None

    def __enter__(self) -> Capture:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        cap = self
        self._saved = {"jit": JITFunction.run, "tune": Autotuner.run}

        def jit_run(fn, *args, grid, warmup, **kwargs):
            cap._on_launch(fn, args, kwargs, grid)

        def tune_run(tuner, *args, **kwargs):
            cap._autotune(tuner, args, kwargs)

        JITFunction.run = jit_run
        Autotuner.run = tune_run
        return self

    def __exit__(self, *exc: Any) -> None:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._saved["jit"]
        Autotuner.run = self._saved["tune"]


@dataclasses.dataclass
class CallRecord:
    """Everything one op call launched: Triton launches (all configs) and the aten ops' bytes."""

    launches: list[Launch]
    aten_read: int
    aten_written: int
    aten_launches: int
    aten_ops: dict[str, int]

    def executed(self) -> list[Launch]:
        return [ln for ln in self.launches if ln.executed]

    def bytes_unique(self) -> int:
        return sum(ln.bytes_unique for ln in self.executed()) + self.aten_read + self.aten_written

    def bytes_issued(self) -> int:
        return sum(ln.bytes_issued for ln in self.executed()) + self.aten_read + self.aten_written

    def n_launches(self) -> int:
        return len({ln.call for ln in self.launches}) + self.aten_launches


def record_call(cap: Capture, fn: Callable[[], Any], meter: bool = True) -> CallRecord:
    """Run ``fn`` (one op call, under :func:`gpu_view` and ``cap``) and return what it launched."""
    view = current_view()
    if view is None:
        raise RuntimeError("record_call runs inside gpu_view()")
    start = len(cap.launches)
    m = Meter()
    view.meter = m if meter else None
    try:
        fn()
    finally:
        view.meter = None
    return CallRecord(cap.launches[start:], m.read, m.written, m.launches, dict(m.ops))
