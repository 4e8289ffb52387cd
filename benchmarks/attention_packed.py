"""Attention on a packed qkv, backward and forward + backward: what writing d(qkv) as one buffer saves.

Cases of the ``attention`` family (``bench_attention.cases`` includes them), covering the registry op
``flash_attention_qkvpacked``. The input is a ``(B, S, 3, H, D)`` qkv leaf, as a ViT's qkv Linear gives it.
Providers: ``eager`` (``qkv.unbind(2)`` then eager attention: autograd stacks dq, dk, dv into d(qkv)), the peers
``compile`` (torch.compile of eager) and ``sdpa`` (SDPA on the unbound views, torch's choice of kernel, its
gradients stacked by autograd), and fastvl: ``fastvl`` (``flash_attention_qkvpacked`` under auto), and on a GPU
``fastvl-triton`` (the packed op on fastvl's kernel: d(qkv) written in place) against ``fastvl-triton-unpacked``
(``flash_attention`` on the views with fastvl's kernel: the same kernel plus autograd's stack). Shapes:
All-in-one-B (96 x 237 tokens, 12 heads of 64) and VATT-M with DropToken (64 x 785, 16 heads of 64); ``--quick``:
small fp32 shapes on the CPU (CPU timings, never a GPU claim).

    python -m benchmarks.attention_packed [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastvl

try:
    from .common import Case, environment, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, environment, run_case, write_rows


def _eager(qkv: torch.Tensor) -> torch.Tensor:
    """Eager attention of a (B, S, 3, H, D) qkv, as timm's non-fused path: unbind, transpose, softmax."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (s.softmax(-1) @ v).transpose(1, 2)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def providers() -> dict[str, object]:
    """name -> fn(qkv) -> (B, S, H, D)."""
    p: dict[str, object] = {"eager": _eager}
    try:
        p["compile"] = torch.compile(_eager, dynamic=False)
    except Exception:  # torch.compile unavailable
        pass
    p["sdpa"] = _sdpa
    p["fastvl"] = fastvl.ops.flash_attention_qkvpacked
    if torch.cuda.is_available():
        p["fastvl-triton"] = lambda qkv: fastvl.ops.flash_attention_qkvpacked(qkv, backend="triton")
        p["fastvl-triton-unpacked"] = lambda qkv: fastvl.ops.flash_attention(*qkv.unbind(2), backend="triton")
    return p


def shapes(quick: bool):
    """(name, B, S, H, D)."""
    if quick:
        return [("quick", 2, 197, 2, 64)]
    return [("All-in-one-B", 96, 237, 12, 64), ("VATT-M DropToken", 64, 785, 16, 64)]


def _modes(fn, qkv: torch.Tensor):
    """(bwd, full) closures on the leaf ``qkv``; bwd replays the backward of one retained graph."""
    state = {}

    def bwd():
        if "out" not in state:
            state["out"] = fn(qkv)
            state["g"] = torch.randn_like(state["out"])
        qkv.grad = None
        state["out"].backward(state["g"], retain_graph=True)

    def full():
        qkv.grad = None
        out = fn(qkv)
        out.backward(torch.ones_like(out))

    return bwd, full


def packed_cases(quick: bool = False):
    """Backward and forward + backward per shape; FLOPs as flash_attention's (4 B H S^2 D forward, 2.5x backward)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    for name, B, S, H, D in shapes(quick):
        base = torch.randn(B, S, 3, H, D, device=dev, dtype=dtype)
        fl = 4 * B * H * S * S * D
        tensor_bytes = B * S * H * D * esize
        cfg = {"shape": name, "B": B, "H": H, "S": S, "D": D, "layout": "qkv (B, S, 3, H, D)", "dtype": str(dtype)}
        per_mode: dict[str, dict] = {"bwd": {}, "full": {}}
        for prov, fn in providers().items():
            per_mode["bwd"][prov], per_mode["full"][prov] = _modes(fn, base.detach().clone().requires_grad_(True))
        # minimal traffic: bwd reads q, k, v, o, dO and writes d(qkv) once; full adds the forward's q, k, v, o
        for mode, nbytes, flops in (("bwd", 8, 5 * fl // 2), ("full", 12, 7 * fl // 2)):
            yield Case(
                "flash_attention_qkvpacked", mode, "S", S, per_mode[mode], dict(cfg), nbytes * tensor_bytes, flops,
                bound="compute",
            )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fp32 shapes (CPU smoke run)")
    p.add_argument("--out", default=None, help="JSON rows path")
    args = p.parse_args(argv)
    env = environment()
    if env["device_kind"] == "cpu":
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows = []
    for case in packed_cases(args.quick):
        new = run_case(case, env, memory=not args.quick, family="attention")
        rows += new
        times = ", ".join(f"{r['provider']} {r['median']:.3g} ms" for r in new if r["metric"] == "time_ms")
        print(f"  {case.config['shape']} {case.mode}: {times}")
        for prov, err in case.config.get("errors", {}).items():
            print(f"    {prov} failed: {err}")
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
