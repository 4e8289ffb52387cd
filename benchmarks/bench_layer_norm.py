"""LayerNorm with the pre-norm residual add: forward, backward and forward+backward, GB/s and % of bandwidth.

The ``layer_norm`` family of the suite (memory-bound: % of limit is of the copy bandwidth). fastvl's fused
``layer_norm(x, w, b, eps, residual) -> (LN(x + residual), x + residual)`` (``fastvl``: auto dispatch, the
fp32 reference on the CPU; ``fastvl-triton``: the kernel named, GPU) against ``eager`` (``x + residual`` then
``torch.nn.functional.layer_norm``) and the peers ``compile`` (torch.compile of eager), ``flash_attn``
(flash-attn's fused Triton ``layer_norm_fn(..., residual, prenorm=True)``) and ``apex`` (the add, then apex's
``fused_layer_norm_affine``) when those are installed. Rows: the VidL token
counts (All-in-one-B 96 x 237 tokens at C=768, VATT-M 64 x 785 at C=1024, MAC's visible video 64 x 197 at
C=768) and a width sweep up to 8192. Minimal traffic: forward reads x, residual and writes h, y; backward
reads dy, dh, h and writes dx (the residual's gradient is the same tensor). bf16 on a GPU; ``--quick`` runs
small fp32 shapes on the CPU (a CPU run: never a GPU claim).

    python -m benchmarks.bench_layer_norm [--quick] [--out results.json]
    python -m benchmarks --ops layer_norm [suite options]     (the same cases through the suite)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import fastvl

try:
    from .common import Case, default_results_dir, environment, markdown_table, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, default_results_dir, environment, markdown_table, run_case, write_rows

FAMILY = "layer_norm"
OPS = ("layer_norm",)  # every case op (the suite skips this family for selections naming none)


def eager_add_norm(x, r, w, b, eps=1e-6):
    h = x + r
    return F.layer_norm(h, (x.shape[-1],), w, b, eps), h


def providers():
    p = {"eager": eager_add_norm}
    try:
        p["compile"] = torch.compile(eager_add_norm, dynamic=False)
    except Exception:  # torch.compile unavailable
        pass
    if torch.cuda.is_available():
        try:
            from flash_attn.ops.triton.layer_norm import layer_norm_fn

            p["flash_attn"] = lambda x, r, w, b: layer_norm_fn(x, w, b, residual=r, eps=1e-6, prenorm=True)
        except ImportError:
            pass
        try:
            from apex.normalization.fused_layer_norm import fused_layer_norm_affine

            def apex_add_norm(x, r, w, b):
                h = x + r
                return fused_layer_norm_affine(h, w, b, (x.shape[-1],), 1e-6), h

            p["apex"] = apex_add_norm
        except ImportError:
            pass
        p["fastvl-triton"] = lambda x, r, w, b: fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend="triton")
    p["fastvl"] = lambda x, r, w, b: fastvl.ops.layer_norm(x, w, b, 1e-6, r)  # auto (the reference on the CPU)
    return p


def _modes(fn, inputs):
    leaves = [t for t in inputs if t.requires_grad]
    state = {}

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def clear():
        for t in leaves:
            t.grad = None

    def bwd():
        if "out" not in state:
            state["out"] = fn(*inputs)
            state["g"] = [torch.randn_like(o) for o in state["out"]]
        clear()
        torch.autograd.backward(state["out"], state["g"], retain_graph=True)

    def full():
        clear()
        y, h = fn(*inputs)
        torch.autograd.backward((y, h), (torch.ones_like(y), torch.ones_like(h)))

    return fwd, bwd, full


def shapes(quick: bool):
    if quick:
        return [("quick", 1024, 768), ("quick", 1024, 1024)]
    out = [("All-in-one-B", 96 * 237, 768), ("VATT-M", 64 * 785, 1024), ("MAC video", 64 * 197, 768)]
    out += [("width sweep", 16384, C) for C in (384, 2048, 4096, 8192)]
    return out


def cases(quick: bool = False):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    for name, M, C in shapes(quick):
        x = torch.randn(M, C, device=dev, dtype=dtype)
        r = torch.randn(M, C, device=dev, dtype=dtype)
        w = torch.randn(C, device=dev, dtype=dtype)
        b = torch.randn(C, device=dev, dtype=dtype)
        per = {"fwd": {}, "bwd": {}, "full": {}}
        for prov, fn in providers().items():
            ins = [t.detach().clone().requires_grad_(True) for t in (x, r, w, b)]
            per["fwd"][prov], per["bwd"][prov], per["full"][prov] = _modes(fn, ins)
        cfg = {"shape": name, "M": M, "C": C, "dtype": str(dtype)}
        nb = M * C * esize
        for mode, nbytes in (("fwd", 4 * nb), ("bwd", 4 * nb), ("full", 8 * nb)):
            yield Case("layer_norm", mode, "C", C, per[mode], dict(cfg), nbytes, bound="memory")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fp32 shapes (CPU smoke run)")
    p.add_argument("--out", default=None, help="JSON rows path (default on a GPU: results/<device>/layer_norm.json)")
    args = p.parse_args(argv)
    env = environment()
    if env["device_kind"] == "cpu":
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows = []
    for case in cases(args.quick):
        new = run_case(case, env, memory=not args.quick, family=FAMILY)
        rows += new
        times = ", ".join(
            f"{r['provider']} {r['median']:.3g} ms ({r['config'].get('gbps', 0):.3g} GB/s)"
            for r in new
            if r["metric"] == "time_ms"
        )
        print(f"  {case.config['shape']} {case.mode} M={case.config['M']} C={case.x_value}: {times}")
        for prov, err in case.config.get("errors", {}).items():
            print(f"    {prov} failed: {err}")
    print(markdown_table(rows))
    out = args.out or (os.path.join(default_results_dir(), "layer_norm.json") if env["device_kind"] == "cuda" else None)
    if out:
        write_rows(rows, out)
        print(f"wrote {len(rows)} rows to {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
