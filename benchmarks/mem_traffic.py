"""Bytes a memory-bound op call moves, counted in the Triton interpreter, and its launches compiled for sm_90.

Counting (no GPU): the call runs under ``TRITON_INTERPRET=1`` with the launchers forced to their CUDA
configurations (``kernels.utils.gpu_configs``: block shapes, warps and a grid planned for 132 SMs). Every
``tl.load`` / ``tl.store`` / atomic of every launch is counted lane by lane (masked-off lanes move nothing;
an atomic reads and writes), and so is every PyTorch op the call runs outside the kernels (inputs read,
outputs written; views and allocations are free). A repeated read of the same address counts each time: this
is the traffic the GPU's caches see, an upper bound on DRAM traffic. The minimum of a call: each input
element its outputs depend on read once, each output written once.

Compiling (no GPU): every distinct launch (kernel, argument types, constexprs, warps) is compiled for sm_90a
with the specialisation a CUDA launch gets (16-byte-aligned pointers and integers divisible by 16 marked
``tt.divisibility=16``, integers equal to 1 made constants, as ``triton.runtime.jit`` binds them), and
ptxas reports registers and spills; the PTX gives the widths of the global loads and stores.

    python -m benchmarks.mem_traffic [--scale full|ci] [--case NAME ...] [--no-compile] [--json PATH]

Bytes use fp16 where the GPU runs bf16 (same width; the interpreter's bf16 arithmetic is wrong) and the
compile turns those fp16 pointers back into bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclasses.dataclass
class Launch:
    """One kernel launch: what it is (for compiling) and what it moved (lane-counted bytes)."""

    module: str
    name: str
    grid: tuple[int, ...]
    sig: dict[str, str]  # argument -> Triton type ("*bf16", "i32", "constexpr")
    const: dict[str, Any]  # constexpr arguments, None arguments, integers a CUDA launch makes the constant 1
    divisible: list[str]  # arguments a CUDA launch marks tt.divisibility=16
    ones: list[str]  # the integers equal to 1 (constants unless the kernel says do_not_specialize)
    num_warps: int
    num_stages: int
    read: int = 0
    written: int = 0

    def key(self) -> str:
        return json.dumps([self.module, self.name, self.sig, self.const, sorted(self.divisible), self.num_warps,
                           self.num_stages], sort_keys=True, default=str)  # fmt: skip


@dataclasses.dataclass
class Traffic:
    launches: list[Launch] = dataclasses.field(default_factory=list)
    torch_ops: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (op, read, written)

    @property
    def kernel_bytes(self) -> int:
        return sum(x.read + x.written for x in self.launches)

    @property
    def torch_bytes(self) -> int:
        return sum(r + w for _, r, w in self.torch_ops)

    @property
    def total(self) -> int:
        return self.kernel_bytes + self.torch_bytes


_STATE: dict[str, Any] = {"traffic": None, "launch": None}


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor view addresses (an expanded view reads its storage once)."""
    span = t.numel() * t.element_size()
    try:
        return min(span, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return span


class _TorchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every ATen op outside kernel launches; fastvl's custom ops are entered."""

    FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
            "_local_scalar_dense", "lift_fresh", "set_")  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastvl":
            from torch._library.custom_ops import OPDEFS

            with self:  # count the ops inside the custom op's implementation too
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if _STATE["launch"] is not None or name in self.FREE:
            return out
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [a for a in torch.utils._pytree.tree_leaves(out) if isinstance(a, torch.Tensor)]
        if func.is_view or any(a._is_view() for a in outs):  # may alias (aten.to, reshape): free when it did
            storages = {t.untyped_storage().data_ptr() for t in ins}
            if all(t.untyped_storage().data_ptr() in storages for t in outs):
                return out
        written = sum(_nbytes(t) for t in outs)
        if name.endswith("_") or name in ("fill", "zero"):  # in place: self is the output
            ins = ins[1:]
        if name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "fill_", "zero_", "arange"):
            ins = []
        read = sum(_nbytes(t) for t in ins)
        _STATE["traffic"].torch_ops.append((name, read, written))
        return out


def _spec(value) -> tuple[str, Any]:
    """(Triton type, specialisation) of an argument as a CUDA launch binds it (triton.runtime.jit)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    ty, sp = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
    return ty, sp


@contextlib.contextmanager
def counting(execute: bool = True):
    """Inside: every interpreted launch and every ATen op is recorded into the yielded Traffic.

    ``execute=False`` records the launches without running them (outputs stay unwritten): enough to compile
    them, at any shape, in seconds."""
    import triton.runtime.interpreter as I

    traffic = Traffic()
    b = I.InterpreterBuilder
    saved = (I.InterpretedFunction.run, b.create_masked_load, b.create_masked_store, b.create_atomic_rmw,
             b.create_atomic_cas)  # fmt: skip

    def run(self, *args, grid, warmup, **kwargs):
        import inspect

        names = self.arg_names
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        for n in names:
            if n not in bound and params[n].default is not inspect.Parameter.empty:
                bound[n] = params[n].default
        sig, const, div, ones = {}, {}, [], []
        for n in names:
            v = bound.get(n)
            if "constexpr" in str(params[n].annotation):
                sig[n], const[n] = "constexpr", v
                continue
            ty, sp = _spec(v)
            sig[n] = ty
            if ty == "constexpr":
                const[n] = v
                if v is not None:
                    ones.append(n)
            elif sp == "D":
                div.append(n)
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
        launch = Launch(self.fn.__module__, self.fn.__name__, g, sig, const, div, ones,
                        int(kwargs.get("num_warps", 4)), int(kwargs.get("num_stages", 3)))  # fmt: skip
        traffic.launches.append(launch)
        if not execute:
            return None
        _STATE["launch"] = launch
        try:
            return saved[0](self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _STATE["launch"] = None

    def width(handle) -> int:
        return I._get_np_dtype(handle.get_element_ty()).itemsize

    def load(self, ptrs, mask, other, *a):
        _STATE["launch"].read += int(mask.data.sum()) * width(ptrs)
        return saved[1](self, ptrs, mask, other, *a)

    def store(self, ptrs, value, mask, *a):
        _STATE["launch"].written += int(mask.data.sum()) * width(ptrs)
        return saved[2](self, ptrs, value, mask, *a)

    def rmw(self, op, ptr, val, mask, *a):
        n = int(mask.data.sum()) * width(ptr)
        _STATE["launch"].read += n
        _STATE["launch"].written += n
        return saved[3](self, op, ptr, val, mask, *a)

    def cas(self, ptr, cmp, val, *a):
        n = int(cmp.data.size) * width(ptr)
        _STATE["launch"].read += n
        _STATE["launch"].written += n
        return saved[4](self, ptr, cmp, val, *a)

    I.InterpretedFunction.run = run
    b.create_masked_load, b.create_masked_store, b.create_atomic_rmw, b.create_atomic_cas = load, store, rmw, cas
    _STATE["traffic"] = traffic
    try:
        with _TorchCounter():
            yield traffic
    finally:
        I.InterpretedFunction.run = saved[0]
        b.create_masked_load, b.create_masked_store, b.create_atomic_rmw, b.create_atomic_cas = saved[1:]
        _STATE["traffic"] = None


# ---- the cases: op calls at the suite's shapes and the minimum bytes of each ------------------------------


@dataclasses.dataclass
class Case:
    name: str  # "op/fwd" or "op/bwd"
    shape: str
    minimum: int
    run: Callable[[], Traffic]
    sms: int = 132  # SMs the launchers plan their grids for
    bounded: bool = True  # the 1.15x target applies


def _e(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


_EXECUTE = {"on": True}


def _fwd_bwd(name, shape, make, call, outs_for_grad, min_fwd, min_bwd, sms=132, bounded=True):
    """Two cases sharing one setup: ``call(*make())`` counted, then the backward of its outputs counted."""
    state = {}

    def run_fwd():
        inputs = make()
        with counting(_EXECUTE["on"]) as t:
            state["out"] = call(*inputs)
        return t

    def run_bwd():
        if "out" not in state:
            run_fwd()
        outs = outs_for_grad(state.pop("out"))
        grads = [torch.randn_like(o) for o in outs]
        with counting(_EXECUTE["on"]) as t:
            torch.autograd.backward(outs, grads)
        return t

    return [
        Case(f"{name}/{m}", shape, mn, run, sms, bounded)
        for m, mn, run in (("fwd", min_fwd, run_fwd), ("bwd", min_bwd, run_bwd))
    ]


def cases(scale: str = "full") -> list[Case]:
    """The memory-bound op calls of the suite; ``scale='ci'`` shrinks batch, tokens and rows (not widths), plans
    LayerNorm's persistent grid for 1 SM so that each program owns about as many rows as at full scale, and the
    token grids for 8 SMs (fewer, longer programs: the interpreter pays per program)."""
    import fastvl

    full = scale == "full"
    sms = 132 if full else 8
    h = torch.float16  # bf16 on a GPU: same bytes
    e = _e(h)
    out: list[Case] = []
    T = "triton"

    def leaf(*shape, dtype=h):
        return torch.randn(*shape, dtype=dtype).requires_grad_(True)

    # roll: All-in-one-B, (96, 40 + 197, 768), T=3
    N, S, C = (96 if full else 6), 40 + 197, 768
    out += _fwd_bwd("temporal_token_roll", f"({N}, 40+197, {C}) T=3", lambda N=N, S=S, C=C: (leaf(N, S, C),),
                    lambda x: fastvl.ops.temporal_token_roll(x, 3, text_len=40, backend=T), lambda y: [y],
                    2 * N * S * C * e, 2 * N * S * C * e)  # fmt: skip

    # DropToken, VATT-M video: (B, 1568, 1024), keep 0.5, one draw shared by the batch, pos added
    for B in (8, 16) if full else (2,):
        L, C, K = (1568, 1024, 784) if full else (392, 1024, 196)
        mf = (2 * B * K * C + K * C) * e + K * 8
        mb = (B * K * C + B * L * C + L * C) * e
        out += _fwd_bwd("drop_tokens", f"({B}, {L}, {C}) keep 0.5, pos", lambda B=B, L=L, C=C: (leaf(B, L, C),
                        leaf(L, C)), lambda x, pos: fastvl.ops.drop_tokens(x, 0.5, pos=pos, backend=T),
                        lambda o: [o[0]], mf, mb, sms)  # fmt: skip

    # random masking: MAC-B video (B*4 frames, 196, 768) ratio 0.75 and VATT-M (16, 1568, 1024) ratio 0.5, pos
    for B, L, C, ratio in ((128, 196, 768, 0.75), (16, 1568, 1024, 0.5)) if full else ((8, 196, 768, 0.75),):
        K = int(L * (1 - ratio) + 1e-6)
        mf = (2 * B * K * C + min(B * K, L) * C) * e + B * L * (e + 8)
        mb = (B * K * C + B * L * C + L * C) * e
        out += _fwd_bwd("random_masking", f"({B}, {L}, {C}) ratio {ratio}, pos", lambda B=B, L=L, C=C: (leaf(B, L, C),
                        leaf(L, C)), lambda x, pos, r=ratio: fastvl.ops.random_masking(x, r, pos=pos, backend=T),
                        lambda o: [o[0]], mf, mb, sms)  # fmt: skip

    # gather_tokens with user indices (VATT-M shape, K = L/2): unique (the inverse-map backward) and repeating
    B, L, C, K = (16, 1568, 1024, 784) if full else (2, 392, 1024, 196)
    for unique in (True, False):

        def make(B=B, L=L, C=C, K=K, unique=unique):
            g = torch.Generator().manual_seed(0)
            if unique:
                idx = torch.argsort(torch.rand(B, L, generator=g), dim=1)[:, :K]
            else:
                idx = torch.randint(0, L, (B, K), generator=g)
            return leaf(B, L, C), idx

        name = "gather_tokens" + ("" if unique else "[repeats]")
        out += _fwd_bwd(name, f"({B}, {L}, {C}) K={K}", make, lambda x, idx, u=unique: fastvl.ops.gather_tokens(
                        x, idx, unique_indices=u, check_bounds=False, backend=T), lambda o: [o],
                        2 * B * K * C * e + B * K * 8, (B * K * C + B * L * C) * e + B * K * 8, sms)  # fmt: skip

    # tube masking (VideoMAE-B: 16 frames in tubelets of 2, T=8 token frames of N=196, one tube, ratio 0.9, clip
    # positions) and restore_tokens (its decoder input: B*8*19 visible rows of 384 into L = 8*196 places, mask
    # token and positions). Reported, not bounded, except the restore forward: the tube forward reads a pos row
    # per kept row (B*T*K of them, more than pos's L rows once B*T*K > L); both backwards write the pos (and
    # mask token) gradient as fp32 partial rows, summed and cast to the parameter's dtype by PyTorch
    B, T_, N, C = (64 if full else 2), 8, 196, 768
    K, L = int(N * 0.1 + 1e-6), T_ * N
    mf = (2 * B * T_ * K * C + min(B * T_ * K, L) * C) * e + B * L * (e + 8)
    mb = (B * T_ * K * C + B * L * C + L * C) * e
    out += _fwd_bwd("tube_masking", f"({B}*{T_}, {N}, {C}) ratio 0.9, tube {T_}, pos",
                    lambda B=B, T_=T_, N=N, C=C, L=L: (leaf(B * T_, N, C), leaf(L, C)),
                    lambda x, pos, T_=T_: fastvl.ops.tube_masking(x, T_, 0.9, tube=T_, pos=pos, backend=T),
                    lambda o: [o[0]], mf, mb, sms, bounded=False)  # fmt: skip
    Cd, TK = 384, T_ * K

    def make_restore(B=B, L=L, TK=TK, Cd=Cd):
        g = torch.Generator().manual_seed(0)
        ids = torch.argsort(torch.argsort(torch.rand(B, L, generator=g), dim=1), dim=1)
        return leaf(B, TK, Cd), ids, leaf(Cd), leaf(L, Cd)

    m = (B * TK * Cd + B * L * Cd + L * Cd + Cd) * e + B * L * 8
    restore = _fwd_bwd("restore_tokens", f"({B}, {TK}, {Cd}) -> ({B}, {L}, {Cd}), token, pos", make_restore,
                       lambda v, i, t, p: fastvl.ops.restore_tokens(v, i, t, p, check_indices=False, backend=T),
                       lambda o: [o], m, m, sms)  # fmt: skip
    restore[1].bounded = False
    out += restore

    # LayerNorm with the residual add: rows = 96 * 237 (All-in-one-B), C = 768 and 8192; fp32 weight and bias;
    # C = 16384 (the widest the kernels take, two passes over the row in the backward: not bounded) on 2048 rows
    for C in (768, 8192, 16384):
        M = (96 * 237 if C < 16384 else 2048) if full else {768: 172, 8192: 88, 16384: 16}[C]
        mf = 4 * M * C * e + 2 * C * 4 + 2 * M * 4
        mb = 4 * M * C * e + C * 4 + 2 * M * 4 + 2 * C * 4
        out += _fwd_bwd("layer_norm", f"({M}, {C}) + residual", lambda M=M, C=C: (leaf(M, C), leaf(M, C),
                        leaf(C, dtype=torch.float32), leaf(C, dtype=torch.float32)),
                        lambda x, r, w, b: fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend=T), lambda o: list(o),
                        mf, mb, 132 if full else 1, C < 16384)  # fmt: skip
    return out


# ---- compiling the recorded launches for sm_90 ------------------------------------------------------------

_COMPILE = r"""
import importlib, json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

def ptxas_usage(ptx):
    from triton.backends.nvidia.compiler import get_ptxas
    exe = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        open(src, "w").write(ptx)
        res = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    txt = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", txt).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    return regs, int(m.group(1)) + int(m.group(2))

def widths(ptx, op):
    out = {}
    for m in re.finditer(r"\b" + op + r"\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.([busf])(\d+)\b", ptx):
        w = int(m.group(1) or 1) * int(m.group(3)) // 8
        out[w] = out.get(w, 0) + 1
    return out

recs = json.load(sys.stdin)
res = []
for r in recs:
    fn = getattr(importlib.import_module(r["module"]), r["name"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        n = p.name
        ty = r["sig"][n]
        if n in r["ones"] and p.do_not_specialize:
            ty = "i32"  # a CUDA launch makes an integer 1 a constant unless the kernel says do_not_specialize
        if ty == "constexpr":
            const[n] = r["const"][n]
        sig[n] = "*bf16" if ty == "*fp16" else ty
        if n in r["divisible"] and not (p.do_not_specialize or p.do_not_specialize_on_alignment):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": r["num_warps"], "num_stages": r["num_stages"]})
    ptx = k.asm["ptx"]
    regs, spill = ptxas_usage(ptx)
    res.append({"regs": regs, "spill_bytes": spill, "shared": k.metadata.shared, "ld": widths(ptx, "ld"),
                "st": widths(ptx, "st"), "atom": len(re.findall(r"\b(?:atom|red)\.global", ptx))})
json.dump(res, sys.stdout)
"""


def compile_sm90(launches: list[Launch]) -> list[dict]:
    """Compile each launch for sm_90a in a process without the interpreter; one dict per launch."""
    recs = [{"module": x.module, "name": x.name, "sig": x.sig, "const": x.const, "ones": x.ones,
             "divisible": x.divisible, "num_warps": x.num_warps, "num_stages": x.num_stages}
            for x in launches]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_POISON")}
    res = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(recs, default=str), capture_output=True,
                         text=True, env=env, timeout=1800)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-4000:])
    return json.loads(res.stdout)


def _fmt_widths(d: dict) -> str:
    return " ".join(f"{w}B×{n}" for w, n in sorted(((int(k), v) for k, v in d.items()), reverse=True)) or "-"


def report(selected: list[Case], compile_: bool = True) -> list[dict]:
    from fastvl.kernels.utils import gpu_configs

    rows = []
    for case in selected:
        with gpu_configs(case.sms):
            t = case.run()
        comp = compile_sm90(list({x.key(): x for x in t.launches}.values())) if compile_ else []
        by_key = dict(zip(list({x.key(): x for x in t.launches}), comp))
        rows.append({
            "case": case.name, "shape": case.shape, "minimum": case.minimum, "kernel_bytes": t.kernel_bytes,
            "torch_bytes": t.torch_bytes, "total": t.total, "ratio": t.total / case.minimum,
            "torch_ops": sorted({n for n, _, _ in t.torch_ops}),
            "launches": [{"kernel": f"{x.module.split('.')[-1]}.{x.name}", "grid": x.grid, "warps": x.num_warps,
                          "read": x.read, "written": x.written,
                          "const": {k: v for k, v in x.const.items() if x.sig[k] == "constexpr"},
                          **by_key.get(x.key(), {})} for x in t.launches],
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | shape | bytes / minimum | launches (kernel grid warps: regs, spills, ld/st.global widths) |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ls = []
        for x in r["launches"]:
            s = f"{x['kernel']} {'x'.join(map(str, x['grid']))} w{x['warps']}"
            if "regs" in x:
                s += f": {x['regs']} regs, {x['spill_bytes']} B spill"
                s += f", ld {_fmt_widths(x['ld'])}, st {_fmt_widths(x['st'])}"
                s += f", {x['atom']} atomics" if x["atom"] else ""
            ls.append(s)
        if r["torch_ops"]:
            ls.append("torch: " + ", ".join(r["torch_ops"]) + f" ({r['torch_bytes'] / 1e6:.2f} MB)")
        lines.append(f"| {r['case']} | {r['shape']} | {r['total'] / 1e6:.1f} MB / {r['minimum'] / 1e6:.1f} MB = "
                     f"**{r['ratio']:.3f}x** | {'<br>'.join(ls)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("full", "ci"), default="full")
    ap.add_argument("--case", action="append", help="substring of the case names to run (repeatable)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="record the launches without running them")
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        module = __spec__.name if __spec__ is not None else "benchmarks.mem_traffic"
        os.execv(sys.executable, [sys.executable, "-m", module, *(argv or sys.argv[1:])])
    os.environ.pop("FASTVL_POISON", None)
    torch.manual_seed(0)
    _EXECUTE["on"] = not a.compile_only
    sel = [c for c in cases(a.scale) if not a.case or any(s in c.name for s in a.case)]
    rows = report(sel, compile_=not a.no_compile)
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
