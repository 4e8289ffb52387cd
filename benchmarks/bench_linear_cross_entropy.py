"""Linear cross-entropy (a vocabulary loss: MLM heads, language-model heads): loss + backward time and peak memory
against the number of positions N.

The ``linear_cross_entropy`` family of the suite (compute-bound: % of limit is of the matmul peak; 6 N V D FLOPs
per loss + backward, counted like eager's autograd). Providers: ``eager`` (``F.cross_entropy(F.linear(h, W, b),
t)``, what BERT-style MLM heads ship: the (N, V) logits, their log-softmax and their gradient in memory), the
peer ``compile`` (torch.compile of eager), and fastvl: ``fastvl`` (auto dispatch), ``fastvl-chunked`` and, on a
GPU, ``fastvl-triton``. BERT's vocabulary (V = 30522), D = 768, 15% of the positions without a target, label
smoothing 0.1; bf16 on a GPU (CUDA events, allocator peak), fp32 on the CPU.

    python -m benchmarks.bench_linear_cross_entropy [--out results.json]    # sweep (GPU, or CPU timings)
    python -m benchmarks.bench_linear_cross_entropy --quick                 # CPU smoke run (small N, D)
    python -m benchmarks.bench_linear_cross_entropy --memory                # CPU: peak memory, fresh processes
    python -m benchmarks --ops linear_cross_entropy [suite options]         # the same cases through the suite

``--memory`` measures every (provider, N) point in a fresh Python process, loss + backward in fp32 at
D=768, V=30522 (default N=4096), in two ways: the process's resident high-water mark (VmHWM, reset after the
inputs exist and a small warm-up call ran, so the figure is what the call adds: the logits and their
temporaries, and the gradients of hidden, weight and bias, which every provider allocates alike) and the peak
of the bytes of live CPU tensors from ``torch.profiler``'s allocation events (``profile_memory=True``:
allocator-independent). CPU figures are CPU figures, never GPU claims.
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

try:
    from .common import Case, environment, markdown_table, measure_peak_memory, row, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, environment, markdown_table, measure_peak_memory, row, run_case, write_rows

FAMILY = "linear_cross_entropy"
OP = "linear_cross_entropy"
OPS = (OP,)
VOCAB = 30522  # BERT's word pieces (All-in-one's MLM head)
WIDTH = 768
SMOOTHING = 0.1
IGNORED = 0.15  # share of positions without a target


def eager(h, w, b, t):
    """What an MLM head ships: the logits, then the loss."""
    return F.cross_entropy(F.linear(h, w, b), t, label_smoothing=SMOOTHING)


def provider(name: str):
    """The loss of provider ``name``: eager, compile, fastvl (auto) or fastvl-<backend>."""
    if name == "eager":
        return eager
    if name == "compile":
        return torch.compile(eager, dynamic=False)
    backend = name.split("-", 1)[1] if "-" in name else None
    return lambda h, w, b, t: fastvl.ops.linear_cross_entropy(h, w, b, t, label_smoothing=SMOOTHING, backend=backend)


def provider_names() -> list[str]:
    return ["eager", "compile", "fastvl", "fastvl-chunked"] + (["fastvl-triton"] if torch.cuda.is_available() else [])


def inputs(N: int, V: int, D: int, dtype: torch.dtype, dev: str, seed: int = 0):
    """hidden (N, D), weight (V, D), bias (V,) requiring grad (scaled like a trained head's logits) and targets
    (N,) with IGNORED of them -100."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dev, dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dev, dtype).requires_grad_(True)
    b = torch.zeros(V, device=dev, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < IGNORED] = -100
    return h, w, b, t.to(dev)


def full_step(fn, h, w, b, t):
    """One loss + backward (gradients to hidden, weight and bias)."""

    def step():
        h.grad = w.grad = b.grad = None
        fn(h, w, b, t).backward()

    return step


def cases(quick: bool = False, sizes=None, dims=None, vocab: int = VOCAB):
    """(loss + backward) cases over N, BERT's vocabulary; D = 768 (quick: 256, N = 256 and 1024)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if quick:
        sizes, dims = sizes or [256, 1024], dims or [256]
    else:
        sizes, dims = sizes or [1024, 2048, 4096, 8192, 16384], dims or [WIDTH]
    for D in dims:
        for N in sizes:
            h, w, b, t = inputs(N, vocab, D, dtype, dev)
            provs = {n: full_step(provider(n), h, w, b, t) for n in provider_names()}
            cfg = {"V": vocab, "D": D, "dtype": str(dtype), "label_smoothing": SMOOTHING, "ignored": IGNORED}
            yield Case(OP, "full", "N", N, provs, cfg, flops=6 * N * vocab * D, bound="compute")


# ---- CPU peak memory: one fresh process per point ------------------------------------------


def live_tensor_peak_mb(fn) -> float | None:
    """Peak of the bytes held by live CPU tensors while ``fn`` runs, above those live when it starts: the
    profiler's raw allocation records (``[memory]`` events, +bytes allocated / -bytes freed, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def one_point(spec: str) -> dict:
    """``provider,N,D,V``: peak memory (MiB; VmHWM above the baseline, and live tensors) and one timed call."""
    name, N, D, V = spec.split(",")
    N, D, V = int(N), int(D), int(V)
    fn = provider(name)
    full_step(fn, *inputs(64, V, D, torch.float32, "cpu"))()  # imports, first-call setup, compilation
    h, w, b, t = inputs(N, V, D, torch.float32, "cpu")
    step = full_step(fn, h, w, b, t)
    t0 = time.perf_counter()
    rss = measure_peak_memory(step)
    ms = (time.perf_counter() - t0) * 1e3
    live = live_tensor_peak_mb(step)
    return {"provider": name, "N": N, "D": D, "V": V, "peak_mb": rss, "live_tensor_peak_mb": live, "time_ms": ms}


def memory_table(names, sizes, D: int, V: int, env) -> list[dict]:
    rows = []
    print(f"CPU peak memory on {env['device']} (fp32, D={D}, V={V}, loss + backward; each point a fresh process)")
    print("| provider | N | peak MiB (VmHWM) | peak MiB (live tensors) | time (s, one call) |\n|---|---|---|---|---|")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    eager_peak = {}
    for N in sizes:
        for name in names:
            cmd = [sys.executable, "-m", "benchmarks.bench_linear_cross_entropy", "--one", f"{name},{N},{D},{V}"]
            res = subprocess.run(cmd, cwd=here, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"| {name} | {N} | failed: {res.stderr.strip().splitlines()[-1:]} | | |")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if name == "eager":
                eager_peak[N] = r
            rss = f"{r['peak_mb']:.0f}"
            live = "n/a" if r["live_tensor_peak_mb"] is None else f"{r['live_tensor_peak_mb']:.0f}"
            if name != "eager" and N in eager_peak:
                e = eager_peak[N]
                rss += f" ({r['peak_mb'] / e['peak_mb']:.3f} of eager)"
                if r["live_tensor_peak_mb"] is not None and e["live_tensor_peak_mb"]:
                    live += f" ({r['live_tensor_peak_mb'] / e['live_tensor_peak_mb']:.3f} of eager)"
            print(f"| {name} | {N} | {rss} | {live} | {r['time_ms'] / 1e3:.2f} |")
            cfg = {"V": V, "D": D, "dtype": "torch.float32", "process": "fresh", "method": "VmHWM"}
            rows.append(row(OP, name, "full", "memory_mb", "N", N, r["peak_mb"], cfg, env, FAMILY))
            rows.append(row(OP, name, "full", "time_ms", "N", N, r["time_ms"], cfg, env, FAMILY))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N and D (CPU smoke run)")
    p.add_argument("--memory", action="store_true", help="CPU peak memory, a fresh process per point")
    p.add_argument("--providers", default="eager,fastvl,fastvl-chunked", help="comma list (--memory)")
    p.add_argument("--dims", default=None, help="comma list of D")
    p.add_argument("--sizes", default=None, help="comma list of N")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size V")
    p.add_argument("--out", default=None, help="JSON rows path (default: print the table only)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_point(args.one)))
        return 0
    ints = lambda s: [int(v) for v in s.split(",")] if s else None  # noqa: E731
    env = environment()
    if args.memory:
        D = (ints(args.dims) or [WIDTH])[0]
        rows = memory_table(args.providers.split(","), ints(args.sizes) or [4096], D, args.vocab, env)
    else:
        if env["device_kind"] == "cpu":
            print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
        rows = []
        for case in cases(args.quick, ints(args.sizes), ints(args.dims), args.vocab):
            new = run_case(case, env, rounds=3 if env["device_kind"] == "cpu" else None, family=FAMILY)
            rows += new
            summary = ", ".join(
                f"{r['provider']} {r['median']:.3g} {'ms' if r['metric'] == 'time_ms' else 'MB'}"
                for r in new
                if r["metric"] in ("time_ms", "memory_mb")
            )
            errors = case.config.get("errors")
            print(f"  N={case.x_value} D={case.config['D']}: {summary}" + (f"  errors: {errors}" if errors else ""))
        print(markdown_table(rows))
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
