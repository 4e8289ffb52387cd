"""Attention: forward, backward and forward+backward, TFLOP/s (and % of peak) and GB/s.

fastvl's Triton kernel against eager PyTorch attention (``softmax(q k^T * scale) v``, what the VidL codebases
run), torch SDPA with each of its fused backends named (flash, cuDNN, memory-efficient), ``torch.compile`` of
the eager code, and flash_attn when installed. Shapes: the VidL models (All-in-one-B: B*T=96 x 12 heads x 237
tokens x 64; VATT-M with DropToken: 64 x 16 x 785 x 64; MAC: 64 x 12 x 197 x 64), the VidL lengths 197-1569
at H=12 and D in {64, 128}, and a long-sequence sweep 512..16k (16k tokens per batch). FLOPs count
4*B*H*S^2*D forward (half when causal) and 2.5x that backward, like torch's FlopCounter for fused SDPA.
bf16 on a GPU; ``--quick`` runs small fp32 shapes on the CPU (a CPU run: never a GPU claim).

    python -m benchmarks.bench_attention [--quick] [--sweep] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F

import fastvl

try:
    from .common import Case, default_results_dir, environment, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, default_results_dir, environment, run_case, write_rows


def eager_attention(q, k, v, causal=False):
    """Eager PyTorch attention on (B, H, S, D): the code VidL repos ship (timm's non-fused path)."""
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _sdpa_backends() -> dict[str, object]:
    """SDPA providers named by the backend they are pinned to (a pinned backend that cannot run errors)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    out = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return out


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal=False):
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def providers(causal: bool) -> dict[str, tuple[str, object]]:
    """name -> (layout, fn(q, k, v)): layout 'bshd' (fastvl, flash_attn) or 'bhsd' (torch)."""
    p: dict[str, tuple[str, object]] = {"eager": ("bhsd", lambda q, k, v: eager_attention(q, k, v, causal))}
    try:
        comp = torch.compile(lambda q, k, v: eager_attention(q, k, v, causal), dynamic=False)
        p["compile"] = ("bhsd", comp)
    except Exception:  # torch.compile unavailable
        pass
    if torch.cuda.is_available():
        for name, b in _sdpa_backends().items():
            p[name] = ("bhsd", lambda q, k, v, f=_sdpa(b): f(q, k, v, causal))
        p["fastvl-triton"] = (
            "bshd",
            lambda q, k, v: fastvl.ops.flash_attention(q, k, v, causal=causal, backend="triton"),
        )
        try:
            from flash_attn import flash_attn_func

            p["flash_attn"] = ("bshd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal))
        except ImportError:
            pass
    else:
        p["sdpa"] = ("bhsd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        p["fastvl"] = ("bshd", lambda q, k, v: fastvl.ops.flash_attention(q, k, v, causal=causal))  # the reference
    return p


def _modes(fn, inputs):
    """(fwd, bwd, full) closures; bwd replays the backward of one retained graph."""

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    state = {}

    def clear():
        for t in inputs:
            t.grad = None  # fresh gradients each call, as in training (no accumulation kernel)

    def bwd():
        if "out" not in state:
            state["out"] = fn(*inputs)
            state["g"] = torch.randn_like(state["out"])
        clear()
        state["out"].backward(state["g"], retain_graph=True)

    def full():
        clear()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return fwd, bwd, full


def shapes(quick: bool, sweep: bool):
    """(name, B, H, S, D, causal) points."""
    if quick:
        return [("quick", 2, 2, S, 64, False) for S in (197, 237)] + [("quick-causal", 2, 2, 237, 64, True)]
    out = [
        ("All-in-one-B", 96, 12, 237, 64, False),
        ("VATT-M DropToken", 64, 16, 785, 64, False),
        ("MAC", 64, 12, 197, 64, False),
    ]
    for D in (64, 128):
        H = 12 if D == 64 else 6
        for S in (197, 237, 629, 785, 1569):
            out.append((f"VidL D={D}", max(1, 32768 // S), H, S, D, False))
    if sweep:
        for causal in (False, True):
            for D in (64, 128):
                for S in (512, 1024, 2048, 4096, 8192, 16384):
                    out.append(
                        (f"long D={D}" + (" causal" if causal else ""), max(1, 16384 // S), 2048 // D, S, D, causal)
                    )
    return out


def cases(quick: bool = False, sweep: bool = False):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    for name, B, H, S, D, causal in shapes(quick, sweep):
        base = [torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3)]
        fl = 4 * B * H * S * S * D // (2 if causal else 1)
        tensor_bytes = B * S * H * D * esize
        cfg = {"shape": name, "B": B, "H": H, "S": S, "D": D, "causal": causal, "dtype": str(dtype)}
        per_mode: dict[str, dict] = {"fwd": {}, "bwd": {}, "full": {}}
        for prov, (layout, fn) in providers(causal).items():
            ins = [t.detach().requires_grad_(True) for t in base]
            if layout == "bhsd":
                ins = [t.detach().transpose(1, 2).requires_grad_(True) for t in base]
            fwd, bwd, full = _modes(fn, ins)
            per_mode["fwd"][prov], per_mode["bwd"][prov], per_mode["full"][prov] = fwd, bwd, full
        # minimal traffic: fwd q, k, v, o; bwd q, k, v, o, dO in and dq, dk, dv out
        yield Case("flash_attention", "fwd", "S", S, per_mode["fwd"], dict(cfg), 4 * tensor_bytes, fl)
        yield Case("flash_attention", "bwd", "S", S, per_mode["bwd"], dict(cfg), 8 * tensor_bytes, 5 * fl // 2)
        yield Case("flash_attention", "full", "S", S, per_mode["full"], dict(cfg), 12 * tensor_bytes, 7 * fl // 2)


def flops_table(rows: list[dict]) -> str:
    """Markdown: per case and provider, time, TFLOP/s, % of peak, and the ratio to SDPA's flash backend."""
    lines = [
        "| shape | mode | S | provider | time (ms) | TFLOP/s | % peak | vs sdpa-flash |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["metric"] == "time_ms":
            c = r["config"]
            by_case.setdefault((c["shape"], r["mode"], c["S"], c["D"], c["causal"]), {})[r["provider"]] = r
    for (shape, mode, S, _d, _causal), provs in by_case.items():
        ref = provs.get("sdpa-flash")
        for prov, r in provs.items():
            c = r["config"]
            ratio = f"{ref['median'] / r['median']:.2f}x" if ref else ""
            pct = c.get("pct_peak_flops")
            lines.append(
                f"| {shape} | {mode} | {S} | {prov} | {r['median']:.4g} | {c.get('tflops', 0):.3g} | "
                f"{'' if pct is None else f'{pct:.0f}%'} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fp32 shapes (CPU smoke run)")
    p.add_argument("--sweep", action="store_true", help="add the long-sequence sweep (512..16k)")
    p.add_argument("--out", default=None, help="JSON rows path (default on a GPU: results/<device>/attention.json)")
    args = p.parse_args(argv)
    env = environment()
    if env["device_kind"] == "cpu":
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows = []
    for case in cases(args.quick, args.sweep):
        new = run_case(case, env, memory=not args.quick)
        rows += new
        times = ", ".join(
            f"{r['provider']} {r['median']:.3g} ms ({r['config'].get('tflops', 0):.2f} TFLOP/s)"
            for r in new
            if r["metric"] == "time_ms"
        )
        print(f"  {case.config['shape']} {case.mode} S={case.x_value}: {times}")
        for prov, err in case.config.get("errors", {}).items():
            print(f"    {prov} failed: {err}")
    print(flops_table(rows))
    out = args.out or (os.path.join(default_results_dir(), "attention.json") if env["device_kind"] == "cuda" else None)
    if out:
        write_rows(rows, out)
        print(f"wrote {len(rows)} rows to {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
