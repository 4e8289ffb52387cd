"""Score-based token selection: fastvl's fused top-k + gather against torch.topk + gather, forward and
forward+backward.

The ``select`` family of the suite (memory-bound: % of limit is of the copy bandwidth). ``eager`` is what a
SMAUG-style selector writes in PyTorch: ``torch.topk`` per group, the indices sorted back into token order,
``torch.gather`` (its backward a scatter); ``compile`` is torch.compile of it; ``fastvl`` dispatches
``select_tokens`` / ``select_space_time`` (the reference on the CPU), ``fastvl-triton`` names the kernel (GPU).
Shapes: VATT-M video (64 clips x 8 frames x 196 tokens, C=1024, the top half of each frame), All-in-one-B frame
sequences (96 x 197, C=768, top half of each row), and the space-time form (CLS kept, the 4 best of 8 frames,
the top half of each). Minimal traffic: the kept rows read and written once, plus the scores; the backward
reads the kept gradient and writes the whole dx. ``--quick`` shrinks everything for a CPU smoke run (a CPU
figure is never a GPU claim).

    python -m benchmarks.bench_select [--quick] [--out DIR]   (= python -m benchmarks --ops select ...)
"""

from __future__ import annotations

import sys

import torch

import fastvl

try:
    from .common import Case
except ImportError:  # run as a script
    from common import Case

FAMILY = "select"
OPS = ("select_tokens", "select_space_time")


def topk_gather_eager(x, scores, k, groups=1):
    """torch.topk per group, indices back in token order, torch.gather."""
    B, L, C = x.shape
    S = L // groups
    idx = torch.topk(scores.reshape(B, groups, S), k, dim=-1).indices.sort(dim=-1).values
    ids = (idx + torch.arange(groups, device=x.device)[:, None] * S).reshape(B, groups * k)
    return torch.gather(x, 1, ids[..., None].expand(B, groups * k, C)), ids


def space_time_eager(x, scores, k, frames, keep_frames, protected):
    """Frames by mean score (torch.topk), then topk + gather inside the kept frames, the protected tokens first."""
    B, L, C = x.shape
    N = (L - protected) // frames
    f = torch.topk(scores.reshape(B, frames, N).mean(-1), keep_frames, dim=1).indices.sort(dim=1).values
    s = torch.gather(scores.reshape(B, frames, N), 1, f[..., None].expand(B, keep_frames, N))
    idx = torch.topk(s, k, dim=-1).indices.sort(dim=-1).values + f[..., None] * N + protected
    ids = torch.cat([torch.arange(protected, device=x.device).expand(B, protected), idx.reshape(B, -1)], dim=1)
    return torch.gather(x, 1, ids[..., None].expand(B, ids.shape[1], C)), ids


def _compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # torch.compile unavailable here
        return None


def _kernels(op: str) -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b.name for b in fastvl.backends.backends(op) if b.name != "reference" and not b.available()]


def _modes(provs, x, nbytes_fwd, nbytes_bwd, op, cfg, tokens):
    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    def full(fn):
        def run():
            x.grad = None
            kept = fn()[0]
            kept.backward(torch.ones_like(kept))

        return run

    yield Case(op, "fwd", "tokens", tokens, {k: fwd(f) for k, f in provs.items()}, dict(cfg), nbytes_fwd,
               covers=("select_tokens",))  # fmt: skip
    yield Case(op, "full", "tokens", tokens, {k: full(f) for k, f in provs.items()}, dict(cfg),
               nbytes_fwd + nbytes_bwd, covers=("select_tokens",))  # fmt: skip


def _group_cases(B, T, N, C, dev, dtype):
    """select_tokens keeping the top half of each of T groups of N tokens."""
    esize = torch.finfo(dtype).bits // 8
    L, k = T * N, N // 2
    x = torch.randn(B, L, C, device=dev, dtype=dtype, requires_grad=True)
    scores = torch.randn(B, L, device=dev)
    provs = {"eager": lambda: topk_gather_eager(x, scores, k, T)}
    comp = _compiled(topk_gather_eager)
    if comp is not None:
        provs["compile"] = lambda: comp(x, scores, k, T)
    provs["fastvl"] = lambda: fastvl.ops.select_tokens(x, scores, k, groups=T)
    for b in _kernels("select_tokens"):
        provs[f"fastvl-{b}"] = lambda b=b: fastvl.ops.select_tokens(x, scores, k, groups=T, backend=b)
    kept = B * T * k
    cfg = {"B": B, "T": T, "N": N, "C": C, "k": k, "dtype": str(dtype)}
    yield from _modes(provs, x, 2 * kept * C * esize + B * L * 4, (kept + B * L) * C * esize, "select_tokens",
                      cfg, B * L)  # fmt: skip


def _space_time_cases(B, T, N, C, dev, dtype):
    """SMAUG space-time: CLS kept, the best half of the frames, the top half of each kept frame."""
    esize = torch.finfo(dtype).bits // 8
    P, F, k = 1, T // 2, N // 2
    x = torch.randn(B, P + T * N, C, device=dev, dtype=dtype, requires_grad=True)
    scores = torch.randn(B, T * N, device=dev)
    provs = {"eager": lambda: space_time_eager(x, scores, k, T, F, P)}
    comp = _compiled(space_time_eager)
    if comp is not None:
        provs["compile"] = lambda: comp(x, scores, k, T, F, P)
    provs["fastvl"] = lambda: fastvl.ops.select_space_time(x, scores, k, frames=T, keep_frames=F, protected=P)
    for b in _kernels("select_tokens"):
        provs[f"fastvl-{b}"] = lambda b=b: fastvl.ops.select_space_time(
            x, scores, k, frames=T, keep_frames=F, protected=P, backend=b
        )
    kept = B * (P + F * k)
    cfg = {"B": B, "P": P, "T": T, "N": N, "C": C, "keep_frames": F, "k": k, "dtype": str(dtype)}
    yield from _modes(provs, x, 2 * kept * C * esize + B * T * N * 4, (kept + B * (P + T * N)) * C * esize,
                      "select_space_time", cfg, B * T * N)  # fmt: skip


def cases(quick: bool = False):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes = [(4, 4, 49, 64), (6, 1, 197, 64)] if quick else [(64, 8, 196, 1024), (96, 1, 197, 768)]
    for B, T, N, C in shapes:
        yield from _group_cases(B, T, N, C, dev, dtype)
    yield from _space_time_cases(*((4, 4, 49, 64) if quick else (64, 8, 196, 1024)), dev, dtype)


def main(argv: list[str] | None = None) -> int:
    """This family through the suite: ``python -m benchmarks.bench_select [suite options]``."""
    from .suite import main as suite_main

    return suite_main(["--ops", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
