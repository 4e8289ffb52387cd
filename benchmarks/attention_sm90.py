"""Attention kernels compiled for sm_90 with no GPU: registers, spills, shared memory, MMA kind, tile loads.

Calls fastvl's attention launchers (``fastvl.kernels.attention``) at the suite's shapes on CPU tensors with
the interpreter off, intercepts each Triton launch (the autotuner's after its pruning), binds the arguments
the way Triton binds them on a CUDA device (16-byte aligned pointers and integers divisible by 16 get
``tt.divisibility=16``, integers equal to 1 become constants; via Triton's own binder) and compiles every
config for sm_90a with Triton's bundled ptxas. Compiler figures, not timings.

    python -m benchmarks.attention_sm90 [--cases allinone,vatt,d128,long,fp32] [--module fastvl.kernels.attention]
                                       [--json out.json]

Columns: kernel, config (BLOCK_M x BLOCK_N / warps / stages), regs, spill (bytes of spill stores + loads per
thread, by ptxas -v), smem (KB of shared memory), mma (wgmma / mma.sync / fma; "(serialized)": ptxas
serialises the wgmma for want of registers), global loads (load instructions of 16-bit data and of 32-bit
vectors, by width in bytes, ``16B:n``), cp.async (asynchronous copies by size), TMA, blocks/SM (by
registers, shared memory and warps), compile seconds (0 when Triton's cache had it; ``--fresh`` for true
times). sm_90: 227 KB of shared memory per block, 64K registers per SM.

``--configs`` compiles every tiling the launchers may autotune over (``gpu_configs``) at D in {32, 64, 96,
128}, with and without key padding + roll offsets + causal, instead of the cases' launches.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("FASTVL_POISON", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024
SMS = 132


# ---- capture -----------------------------------------------------------------------------------


class Capture:
    """Records Triton launches instead of running them: (jit function, configs, args, kwargs, grid)."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        self._auto, self._jit = Autotuner.run, JITFunction.run
        cap = self

        def auto_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            fn = tuner.fn
            while not isinstance(fn, JITFunction):
                fn = fn.fn
            grid = kwargs.pop("grid")
            kwargs.pop("warmup", None)
            cap.launches.append((fn, list(configs), args, kwargs, grid, len(tuner.configs)))
            tuner.nargs = None

        def jit_run(fn, *args, grid, warmup, **kwargs):
            cap.launches.append((fn, [None], args, kwargs, grid, 1))

        Autotuner.run, JITFunction.run = auto_run, jit_run
        return self

    def __exit__(self, *exc):
        Autotuner.run, JITFunction.run = self._auto, self._jit


# ---- compile one launch --------------------------------------------------------------------------


_BACKEND = None


def _backend():
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(TARGET)
    return _BACKEND


def bind(fn: JITFunction, args, kwargs):
    """Triton's CUDA binding of a launch: (signature, constexprs, attrs, options)."""
    backend = _backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def _ptxas(ptx: str) -> dict:
    """Registers, spill bytes and wgmma serialisation from ``ptxas -v`` with Triton's flags for sm_90a."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [tool, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return {
        "regs": regs,
        "spill": stores + loads,
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in log,
    }


def _loads(ptx: str) -> dict[str, int]:
    """Global loads by width (bytes), counting only the loads of 16-bit data and 32-bit vectors."""
    widths: dict[str, int] = {}
    for m in re.finditer(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.(b16|b32|b64|u16|f16|bf16)\b", ptx):
        vec = int(m.group(1) or 1)
        bits = {"b16": 16, "u16": 16, "f16": 16, "bf16": 16, "b32": 32, "b64": 64}[m.group(2)]
        width = vec * bits // 8
        if bits == 32 and vec == 1:
            continue  # scalar 32-bit loads: offsets, LSE / delta, masks
        widths[f"{width}B"] = widths.get(f"{width}B", 0) + 1
    return dict(sorted(widths.items(), key=lambda kv: -int(kv[0][:-1])))


def _cp_async(ptx: str) -> dict[str, int]:
    """cp.async copies (global -> shared) by size in bytes."""
    out: dict[str, int] = {}
    for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)", ptx):
        size = f"{int(m.group(1), 0)}B"
        out[size] = out.get(size, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -int(kv[0][:-1])))


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def compile_launch(fn, config, args, kwargs) -> dict:
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    signature, constexprs, attrs, options = bind(fn, args, kw)
    t0 = time.time()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    secs = time.time() - t0
    ptx = k.asm["ptx"]
    ptxas = _ptxas(ptx)
    regs = ptxas["regs"]
    shared = k.metadata.shared
    warps = options.num_warps
    by_regs = 65536 // max(1, ((regs + 7) // 8 * 8) * 32 * warps)
    by_smem = (228 * 1024) // max(1, shared + 1024) if shared else 32
    by_warps = 64 // warps
    blocks = min(by_regs, by_smem, by_warps, 32) if shared <= SMEM_LIMIT else 0
    names = {c for c in ("BLOCK_M", "BLOCK_N") if c in kw}
    cfg = "x".join(str(kw[c]) for c in sorted(names)) if names else ""
    return {
        "kernel": fn.__name__,
        "config": f"{cfg}/w{warps}/s{options.num_stages}",
        "regs": regs,
        "spill": ptxas["spill"],
        "wgmma_serialized": ptxas["wgmma_serialized"],
        "smem_kb": round(shared / 1024, 1),
        "fits": shared <= SMEM_LIMIT,
        "mma": _mma(ptx),
        "loads": _loads(ptx),
        "cp_async": _cp_async(ptx),
        "tma": "cp.async.bulk.tensor" in ptx,
        "compile_s": round(secs, 1),
        "blocks_per_sm": blocks,
        "constexprs": {str(k[0]) if isinstance(k, tuple) else str(k): v for k, v in constexprs.items()},
    }


# ---- the suite's shapes ------------------------------------------------------------------------------


def _packed(N, S, H, D, dtype):
    """q, k, v as strided views of one (N, S, 3, H, D) buffer, as a qkv Linear leaves them."""
    buf = torch.randn(N, S, 3, H, D).to(dtype)
    return buf, buf.unbind(2)


CASES = ("allinone", "vatt", "d128", "long", "long_causal", "d32", "fp32", "tf32", "frames", "features128")


def cases(names):
    """name -> (description, (q, k, v), launcher kwargs, the packed buffer or None)."""
    out = {}
    if "allinone" in names:  # All-in-one-B fused block: B*T = 32*3, 40 text + 197 video tokens, text padding, roll
        N, S, H, D, T = 96, 237, 12, 64, 3
        buf, (q, k, v) = _packed(N, S, H, D, torch.bfloat16)
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[:, 30:40] = True
        off = torch.zeros(S, dtype=torch.int32)
        f = 197 // 8
        off[41 : 41 + f] = T - 1
        off[S - f :] = 1
        out["allinone"] = (
            "All-in-one-B 96x237 H12 D64 bf16 kpm+roll",
            (q, k, v),
            dict(key_padding_mask=kpm, shift=off, num_frames=T),
            buf,
        )
    if "vatt" in names:  # VATT-M: 8 x 1568 video tokens, 16 heads of 64
        buf, (q, k, v) = _packed(8, 1568, 16, 64, torch.bfloat16)
        out["vatt"] = ("VATT-M 8x1568 H16 D64 bf16", (q, k, v), {}, buf)
    if "d128" in names:
        buf, (q, k, v) = _packed(8, 1568, 8, 128, torch.bfloat16)
        out["d128"] = ("8x1568 H8 D128 bf16", (q, k, v), {}, buf)
    if "frames" in names:  # VATT-M as 8 frames of 196 tokens: frame-local windows (w=1) with a ToMe key bias
        from fastvl.kernels.attention import Features

        buf, (q, k, v) = _packed(8, 1568, 16, 64, torch.bfloat16)
        feats = Features(key_bias=torch.zeros(8, 1, 1568), frame_tokens=196, frame_window=1)
        out["frames"] = ("VATT-M 8x1568 H16 D64 bf16 frame_window=1 + key_bias", (q, k, v), dict(features=feats), buf)
    if "features128" in names:  # D128 GQA (8 q heads on 2 k/v heads), sliding window, softcap, ALiBi, causal
        from fastvl.kernels.attention import Features

        q = torch.randn(8, 1568, 8, 128).to(torch.bfloat16)
        k, v = (torch.randn(8, 1568, 2, 128).to(torch.bfloat16) for _ in range(2))
        feats = Features(window=(256, 0), softcap=30.0, alibi_slopes=torch.rand(1, 8))
        out["features128"] = ("8x1568 H8/2 D128 bf16 GQA window softcap alibi causal", (q, k, v),
                              dict(features=feats, causal=True), None)  # fmt: skip
    if "long" in names:
        q, k, v = (torch.randn(2, 4096, 16, 64).to(torch.bfloat16) for _ in range(3))
        out["long"] = ("2x4096 H16 D64 bf16", (q, k, v), {}, None)
    if "long_causal" in names:
        q, k, v = (torch.randn(2, 4096, 16, 64).to(torch.bfloat16) for _ in range(3))
        out["long_causal"] = ("2x4096 H16 D64 bf16 causal", (q, k, v), dict(causal=True), None)
    if "d32" in names:
        buf, (q, k, v) = _packed(64, 197, 12, 32, torch.bfloat16)
        out["d32"] = ("64x197 H12 D32 bf16", (q, k, v), {}, buf)
    if "fp32" in names:
        q, k, v = (torch.randn(8, 197, 12, 64) for _ in range(3))
        out["fp32"] = ("8x197 H12 D64 fp32 (ieee)", (q, k, v), {}, None)
    if "tf32" in names:
        q, k, v = (torch.randn(8, 197, 12, 64) for _ in range(3))
        out["tf32"] = ("8x197 H12 D64 fp32 (tf32)", (q, k, v), {"_tf32": True}, None)
    return out


def capture_case(A, q, k, v, kw, buf, deterministic):
    kw = dict(kw)
    tf32 = kw.pop("_tf32", False)
    prev = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        scale = q.shape[-1] ** -0.5
        with Capture() as cap:
            out, lse = A.attention_forward(q, k, v, scale=scale, **kw)
        fwd = cap.launches
        bkw = dict(kw)
        import inspect

        params = inspect.signature(A.attention_backward).parameters
        if "deterministic" in params:
            bkw["deterministic"] = deterministic
        elif deterministic:
            return fwd, []
        if buf is not None and "dq" in params:
            g = torch.empty_like(buf)
            bkw.update(dq=g[:, :, 0], dk=g[:, :, 1], dv=g[:, :, 2])
        with Capture() as cap:
            A.attention_backward(torch.randn_like(out), q, k, v, out, lse, scale=scale, **bkw)
        return fwd, cap.launches
    finally:
        torch.set_float32_matmul_precision(prev)


def _fmt(r):
    loads = " ".join(f"{w}:{n}" for w, n in r["loads"].items()) or "-"
    cpa = " ".join(f"{w}:{n}" for w, n in r["cp_async"].items()) or "-"
    mma = r["mma"] + (" (serialized)" if r["wgmma_serialized"] else "")
    smem = f"{r['smem_kb']}" + ("" if r["fits"] else " (>227)")
    tma = "yes" if r["tma"] else "-"
    return (
        f"| {r['kernel']} | {r['config']} | {r['regs']} | {r['spill']} | {smem} | {mma} | {loads} | {cpa} | {tma}"
        f" | {r['blocks_per_sm']} | {r['compile_s']} |"
    )


HEADER = (
    "| kernel | config | regs | spill B | smem KB | mma | global loads | cp.async | TMA | blocks/SM | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _compile_rows(launches, only, seen, tag):
    rows = []
    for fn, configs, args, kwargs, _grid, n_all in launches:
        if only and fn.__name__ not in only:
            continue
        for cfg in configs:
            try:
                key = (fn.__name__, repr(bind(fn, args, {**kwargs, **(cfg.all_kwargs() if cfg else {})})))
                if key not in seen:
                    seen[key] = compile_launch(fn, cfg, args, kwargs)
                r = dict(seen[key], tag=tag, pruned_from=n_all)
            except Exception as e:  # noqa: BLE001 - a report row, not a crash
                r = {"kernel": fn.__name__, "config": str(cfg), "error": f"{type(e).__name__}: {e}"[:300], "tag": tag}
                print(f"| {fn.__name__} | {cfg} | ERROR {r['error']} |", flush=True)
                rows.append(r)
                continue
            rows.append(r)
            print(_fmt(r) + (f" {tag}" if tag else ""), flush=True)
    return rows


def every_config(A, kernels):
    """Each kernel's listed tilings at D in {32, 64, 96, 128} (fp32: 64, 128), without and with key padding +
    roll offsets + causal: the launches the config lists promise to compile without spills."""
    N, S, H, T = 6, 237, 4, 3
    for cls, dtype, dims in (("bf16", torch.bfloat16, (32, 64, 96, 128)), ("tf32", torch.float32, (64, 128)),
                             ("ieee", torch.float32, (64, 128))):  # fmt: skip
        for D in dims:
            q, k, v = (torch.randn(N, S, H, D).to(dtype) for _ in range(3))
            for gather in (False, True):
                kw = {}
                if gather:
                    kw = dict(key_padding_mask=torch.zeros(N, S, dtype=torch.bool), causal=True,
                              shift=torch.zeros(S, dtype=torch.int32), num_frames=T)  # fmt: skip
                for kernel in kernels:
                    prec = "tf32" if cls == "tf32" else "ieee"
                    for cfg in A.gpu_configs(kernel, dtype, D, gather=gather, precision=prec):
                        yield f"{kernel} {cls} D={D}{' kpm+roll+causal' if gather else ''}", (q, k, v), kw, kernel, cfg


def capture_config(A, q, k, v, kw, kernel, cfg, tf32):
    prev = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        with Capture() as cap:
            if kernel == "fwd":
                A.attention_forward(q, k, v, scale=0.125, config=cfg, **kw)
            else:
                o = torch.randn_like(q)
                lse = torch.zeros(q.shape[2], q.shape[0] * q.shape[1])
                det = kernel in ("kv", "q")
                A.attention_backward(o, q, k, v, o, lse, scale=0.125, deterministic=det, config={kernel: cfg}, **kw)
    finally:
        torch.set_float32_matmul_precision(prev)
    name = {"fwd": "_attn_fwd", "kv_dq": "_attn_bwd_kv", "kv": "_attn_bwd_kv", "q": "_attn_bwd_q"}[kernel]
    return [launch for launch in cap.launches if launch[0].__name__ == name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="allinone,vatt,d128,long", help="comma list of: " + ",".join(CASES))
    p.add_argument("--module", default="fastvl.kernels.attention", help="the attention kernel module to compile")
    p.add_argument("--deterministic", action="store_true", help="also the deterministic backward")
    p.add_argument("--configs", action="store_true", help="every listed tiling instead of the cases' launches")
    p.add_argument("--kernels", default="", help="comma list: only these (Triton kernel names, or with --configs "
                   "fwd,kv_dq,kv,q)")  # fmt: skip
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--fresh", action="store_true", help="an empty Triton cache (true compile times)")
    a = p.parse_args(argv)
    if a.fresh:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-sm90-")
    A = importlib.import_module(a.module)
    only = [x for x in a.kernels.split(",") if x]
    rows, seen = [], {}
    if a.configs:
        print(HEADER)
        for tag, (q, k, v), kw, kernel, cfg in every_config(A, only or ["fwd", "kv_dq", "kv", "q"]):
            launches = capture_config(A, q, k, v, kw, kernel, cfg, tf32="tf32" in tag)
            rows += _compile_rows(launches, [], seen, tag)
    else:
        for name, (desc, (q, k, v), kw, buf) in cases(a.cases.split(",")).items():
            print(f"\n### {desc}\n\n{HEADER}")
            for det in [False, True] if a.deterministic else [False]:
                fwd, bwd = capture_case(A, q, k, v, kw, buf, det)
                rows += _compile_rows(bwd if det else fwd + bwd, only, seen, name + (" det" if det else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    bad = [r for r in rows if "error" in r or r["spill"] or not r["fits"]]
    print(f"\n{len(rows)} launches compiled, {len(bad)} with an error, a spill or too much shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
