"""Contrastive losses (CLIP, SigLIP, MIL-NCE): loss + backward time and peak memory against the batch size.

The ``contrastive`` family of the suite (compute-bound: % of limit is of the matmul peak; 6 B N D FLOPs per
loss + backward). Providers: ``eager`` (the plain-PyTorch losses as the methods write them, materialising the
B x N logits: ``fastvl.ops.contrastive.*_reference``, VATT's MIL-NCE the literal way), the peers ``compile``
(torch.compile of eager) and ``open_clip`` (open_clip's ClipLoss / SigLipLoss forward at world_size=1, written
out here: two logits matmuls for CLIP; open_clip has no MIL-NCE), and fastvl: ``fastvl`` (auto dispatch),
``fastvl-chunked`` and, on a GPU, ``fastvl-triton``. B from 1k to 64k, D = 256 and 512, bf16 on a GPU (CUDA
events, allocator peak). A provider that runs out of memory is reported in the row's ``errors``, not fatal.

    python -m benchmarks.bench_contrastive [--out results.json]      # GPU sweep
    python -m benchmarks.bench_contrastive --quick                   # CPU smoke run (small B)
    python -m benchmarks.bench_contrastive --memory-curve            # CPU: peak memory vs B, D=256
    python -m benchmarks --ops contrastive [suite options]           # the same cases through the suite

``--memory-curve`` runs every (provider, B) point in a fresh Python process (the peak is the process's
VmHWM above its baseline, so nothing freed by an earlier case can hide memory); ``open_clip`` (``eager`` for
MIL-NCE) and ``fastvl-reference`` stop at ``--eager-max`` (default 16384: B=32768 would need ~20 GiB on a
24 GiB machine). CPU figures are CPU figures, never GPU claims.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastvl
from fastvl.ops import contrastive as C

try:
    from .common import Case, environment, markdown_table, measure_peak_memory, row, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, environment, markdown_table, measure_peak_memory, row, run_case, write_rows

FAMILY = "contrastive"
LOSSES = ("clip", "siglip", "mil")
P_TEXTS = 3  # MIL-NCE positives per clip (logits B x 3B)


# ---- the eager code the methods ship -------------------------------------------------------


def open_clip_loss(a, b, s):
    """open_clip's ClipLoss at world_size=1: two logits matmuls, two cross-entropies."""
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(s * a @ b.T, labels) + F.cross_entropy(s * b @ a.T, labels)) / 2


def open_clip_siglip(a, b, s, bias):
    """open_clip's SigLipLoss at world_size=1."""
    logits = s * a @ b.T + bias
    labels = 2 * torch.eye(a.shape[0], device=a.device, dtype=a.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


EAGER = {
    "clip": lambda x, y, s: C.clip_loss_reference(x, y, s),
    "siglip": lambda x, y, s: C.siglip_loss_reference(x, y, s, -10.0),
    "mil": lambda x, y, s: C.mil_nce_loss_reference(x, y, s),
}
OPEN_CLIP = {
    "clip": lambda x, y, s: open_clip_loss(x, y, s),
    "siglip": lambda x, y, s: open_clip_siglip(x, y, s, -10.0),
}
FASTVL = {
    "clip": lambda x, y, s, be: fastvl.ops.clip_loss(x, y, s, backend=be),
    "siglip": lambda x, y, s, be: fastvl.ops.siglip_loss(x, y, s, -10.0, backend=be),
    "mil": lambda x, y, s, be: fastvl.ops.mil_nce_loss(x, y, s, backend=be),
}
OP = {"clip": "clip_loss", "siglip": "siglip_loss", "mil": "mil_nce_loss"}
OPS = tuple(OP.values())  # every case op (the suite skips this family for selections naming none)


def inputs(loss: str, B: int, D: int, dtype: torch.dtype, dev: str):
    a = F.normalize(torch.randn(B, D, device=dev), dim=-1).to(dtype).requires_grad_(True)
    shape = (B, P_TEXTS, D) if loss == "mil" else (B, D)
    b = F.normalize(torch.randn(*shape, device=dev), dim=-1).to(dtype).requires_grad_(True)
    s = torch.tensor(14.3, device=dev, requires_grad=True)
    return a, b, s


def full_step(fn, a, b, s):
    """One loss + backward (gradients to both feature sets and the scale)."""

    def step():
        a.grad = b.grad = s.grad = None
        fn(a, b, s).backward()

    return step


def provider(loss: str, name: str):
    """The loss function of provider ``name``: eager, compile, open_clip, fastvl (auto) or fastvl-<backend>."""
    if name == "eager":
        return EAGER[loss]
    if name == "compile":
        return torch.compile(EAGER[loss], dynamic=False)
    if name == "open_clip":
        return OPEN_CLIP[loss]
    backend = name.split("-", 1)[1] if "-" in name else None
    return lambda x, y, s: FASTVL[loss](x, y, s, backend)


def provider_names(loss: str) -> list[str]:
    names = ["eager", "compile"] + (["open_clip"] if loss in OPEN_CLIP else []) + ["fastvl", "fastvl-chunked"]
    if torch.cuda.is_available():
        names.append("fastvl-triton")
    return names


def cases(quick: bool = False, losses=None, dims=None, sizes=None):
    """(loss + backward) cases, B outermost then loss: the suite's ``--max-cases`` takes every loss at the
    smallest B first."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    losses = list(losses or LOSSES)
    if quick:
        sizes, dims = sizes or [256, 1024], dims or [256]
    else:
        sizes, dims = sizes or [1024, 2048, 4096, 8192, 16384, 32768, 65536], dims or [256, 512]
    for D in dims:
        for B in sizes:
            for loss in losses:
                a, b, s = inputs(loss, B, D, dtype, dev)
                N = B * (P_TEXTS if loss == "mil" else 1)
                provs = {n: full_step(provider(loss, n), a, b, s) for n in provider_names(loss)}
                cfg = {"loss": loss, "D": D, "dtype": str(dtype), "N": N}
                yield Case(OP[loss], "full", "B", B, provs, cfg, flops=6 * B * N * D, bound="compute")


# ---- CPU memory curve: one fresh process per point -----------------------------------------


def one_point(spec: str) -> dict:
    """``loss,provider,B,D``: peak memory (MB above the process baseline) and one timed call, in this process."""
    loss, name, B, D = spec.split(",")
    B, D = int(B), int(D)
    fn = provider(loss, name)
    warm = inputs(loss, 64, D, torch.float32, "cpu")  # lazy imports and first-call setup, outside the peak
    full_step(fn, *warm)()
    a, b, s = inputs(loss, B, D, torch.float32, "cpu")
    step = full_step(fn, a, b, s)
    t0 = time.perf_counter()
    mb = measure_peak_memory(step)  # the one timed call is the measured one
    ms = (time.perf_counter() - t0) * 1e3
    return {"loss": loss, "provider": name, "B": B, "D": D, "peak_mb": mb, "time_ms": ms}


def memory_curve(losses, D: int, sizes, eager_max: int, env) -> list[dict]:
    rows = []
    print(f"CPU memory curve on {env['device']} (fp32, D={D}, loss + backward; each point a fresh process)")
    print("| loss | provider | B | peak MiB | time (s, one call) |\n|---|---|---|---|---|")
    for loss in losses:
        for name in ("fastvl-chunked", "fastvl-reference", "open_clip" if loss in OPEN_CLIP else "eager"):
            for B in sizes:
                if name != "fastvl-chunked" and B > eager_max:
                    print(f"| {loss} | {name} | {B} | skipped (> --eager-max {eager_max}) | |")
                    continue
                cmd = [sys.executable, "-m", "benchmarks.bench_contrastive", "--one", f"{loss},{name},{B},{D}"]
                here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                res = subprocess.run(cmd, cwd=here, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"| {loss} | {name} | {B} | failed: {res.stderr.strip().splitlines()[-1:]} | |")
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"| {loss} | {name} | {B} | {r['peak_mb']:.0f} | {r['time_ms'] / 1e3:.2f} |")
                cfg = {"loss": loss, "D": D, "dtype": "torch.float32", "process": "fresh"}
                rows.append(row(OP[loss], name, "full", "memory_mb", "B", B, r["peak_mb"], cfg, env, FAMILY))
                rows.append(row(OP[loss], name, "full", "time_ms", "B", B, r["time_ms"], cfg, env, FAMILY))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small B (CPU smoke run)")
    p.add_argument("--memory-curve", action="store_true", help="CPU peak memory vs B, a fresh process per point")
    p.add_argument("--losses", default=None, help="comma list of clip,siglip,mil (default: all; clip for the curve)")
    p.add_argument("--dims", default=None, help="comma list of D")
    p.add_argument("--sizes", default=None, help="comma list of B")
    p.add_argument("--eager-max", type=int, default=16384, help="largest B for the materialising providers (curve)")
    p.add_argument("--out", default=None, help="JSON rows path (default: print the table only)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_point(args.one)))
        return 0
    ints = lambda s: [int(v) for v in s.split(",")] if s else None  # noqa: E731
    env = environment()
    if args.memory_curve:
        losses = args.losses.split(",") if args.losses else ["clip"]
        sizes = ints(args.sizes) or [4096, 8192, 16384, 32768]
        rows = memory_curve(losses, (ints(args.dims) or [256])[0], sizes, args.eager_max, env)
    else:
        if env["device_kind"] == "cpu":
            print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
        losses = args.losses.split(",") if args.losses else list(LOSSES)
        rows = []
        for case in cases(args.quick, losses, ints(args.dims), ints(args.sizes)):
            new = run_case(case, env, rounds=3 if env["device_kind"] == "cpu" else None, family=FAMILY)
            rows += new
            summary = ", ".join(
                f"{r['provider']} {r['median']:.3g} {'ms' if r['metric'] == 'time_ms' else 'MB'}"
                for r in new
                if r["metric"] in ("time_ms", "memory_mb")
            )
            errors = case.config.get("errors")
            print(
                f"  {case.op} B={case.x_value} D={case.config['D']}: {summary}"
                + (f"  errors: {errors}" if errors else "")
            )
        print(markdown_table(rows))
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
