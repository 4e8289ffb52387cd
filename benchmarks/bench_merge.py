"""ToMe token merging: fastvl's fused matching and weighted merge against ToMe's eager code, forward and
forward+backward.

The ``merge`` family of the suite (memory-bound: % of limit is of the copy bandwidth). ``eager`` is ToMe's
algorithm as facebookresearch/ToMe's ``tome/merge.py`` runs it, ``bipartite_soft_matching`` then
``merge_wavg`` (normalised metric, ``a @ b^T``, max / argsort, ``gather`` + ``scatter_reduce`` of ``x * size``
and ``size``, divide), transcribed below; ``compile`` is torch.compile of it; ``fastvl`` dispatches
``merge_tokens`` (the reference on the CPU), ``fastvl-triton`` names the kernels (GPU). Before any timing each
case checks that fastvl and eager produce the same merge on its input (same sizes, same values). The metric is
ToMe's: the keys averaged over heads (width 64). Shapes: a ViT-B frame with its CLS (96 x 197, C=768, r=16: an
All-in-one-B frame), VATT-M video tokens merged jointly (64 x (1 + 1568), C=1024, r=196) and per frame
(8 frames of 196, r=24 each: the eager code runs ToMe on the frames as a batch). Minimal traffic: x, the
metric and the sizes read, the merged tokens and sizes written; the backward reads the merged gradient and
writes dx. ``--quick`` shrinks everything for a CPU smoke run (a CPU figure is never a GPU claim).

    python -m benchmarks.bench_merge [--quick] [--out DIR]   (= python -m benchmarks --ops merge ...)
"""

from __future__ import annotations

import math
import sys

import torch

import fastvl

try:
    from .common import Case
except ImportError:  # run as a script
    from common import Case

FAMILY = "merge"
OPS = ("merge_tokens",)


def tome_merge_eager(x, metric, size, r, class_token):
    """ToMe's ``bipartite_soft_matching(metric, r, class_token)`` + ``merge_wavg(merge, x, size)``, in ToMe's
    steps (transcribed from its algorithm, not copied: ToMe is CC BY-NC 4.0). ``size (B, L, 1)``."""
    t = x.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        sim = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
        if class_token:
            sim[:, 0, :] = -math.inf
        best_val, best_b = sim.max(dim=-1)
        ranked = best_val.argsort(dim=-1, descending=True)
        src, unm = ranked[:, :r], ranked[:, r:]
        if class_token:
            unm = unm.sort(dim=1).values
        dst = best_b.gather(1, src)

    def merge(v):
        a, b = v[:, 0::2], v[:, 1::2]
        n = v.shape[-1]
        kept = a.gather(1, unm[..., None].expand(-1, -1, n))
        b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, n), a.gather(1, src[..., None].expand(-1, -1, n)), "sum")
        return torch.cat([kept, b], dim=1)

    w = merge(size)
    return merge(x * size) / w, w


def _compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # torch.compile unavailable here
        return None


def _kernels(op: str) -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b.name for b in fastvl.backends.backends(op) if b.name != "reference" and not b.available()]


def _same_merge(ours, eager, ordered, what):
    """fastvl and eager agree: the same rows (in the same order when ``ordered``; ToMe without a class token
    keeps its unmerged rows in score order) with the same sizes. eager ran in fp32 on the same values."""
    (m, s), (em, es) = ours, eager
    m, s = m.float().reshape(em.shape), s.float().reshape(es.shape)
    rows = [m, s, em, es]
    if not ordered:
        rows = [t.gather(1, key.argsort(1)[..., None].expand_as(t)) for t, key in zip(rows, [m.sum(-1)] * 2
                                                                                    + [em.sum(-1)] * 2)]  # fmt: skip
    tol = 2e-2 if ours[0].dtype == torch.bfloat16 else 1e-5
    if not (torch.equal(rows[1], rows[3]) and torch.allclose(rows[0], rows[2], rtol=tol, atol=tol)):
        raise RuntimeError(f"bench_merge {what}: fastvl and ToMe's eager merge differ on the same input")


def _case(B, P, T, N, C, r, dev, dtype):
    """One shape: merge_tokens (joint when T == 1, per frame otherwise) against ToMe's eager code."""
    esize = torch.finfo(dtype).bits // 8
    L = P + T * N
    x = torch.randn(B, L, C, device=dev, dtype=dtype, requires_grad=True)
    metric = torch.randn(B, L, 64, device=dev, dtype=dtype)
    size = torch.ones(B, L, 1, device=dev, dtype=dtype)
    mode = "joint" if T == 1 else "frame"
    if T == 1:
        eager = lambda: tome_merge_eager(x, metric, size, r, P == 1)  # noqa: E731
    else:  # ToMe per frame: the frames as a batch (no CLS in the frames)
        xs, ms, ss = (t.reshape(B * T, N, -1) for t in (x, metric, size))
        eager = lambda: tome_merge_eager(xs, ms, ss, r, False)  # noqa: E731
    provs = {"eager": eager}
    comp = _compiled(tome_merge_eager)
    if comp is not None:
        args = (x, metric, size, r, P == 1) if T == 1 else (xs, ms, ss, r, False)
        provs["compile"] = lambda: comp(*args)
    kw = {"protected": P, "metric": metric, "mode": mode, "frames": T if T > 1 else None}
    provs["fastvl"] = lambda: fastvl.ops.merge_tokens(x, size, r, **kw)
    for b in _kernels("merge_tokens"):
        provs[f"fastvl-{b}"] = lambda b=b: fastvl.ops.merge_tokens(x, size, r, backend=b, **kw)
    with torch.no_grad():
        ours = fastvl.ops.merge_tokens(x, size, r, **kw)[:2]
        f32 = [t.detach().float().reshape(B * T, -1, t.shape[-1]) for t in (x, metric, size)]
        ref = tome_merge_eager(*f32, r, P == 1)
        _same_merge(ours, ref, P == 1, f"B={B} L={L} mode={mode}")
    Lo = ours[0].shape[1]
    cfg = {"B": B, "L": L, "C": C, "metric_C": 64, "r": r, "mode": mode, "frames": T, "dtype": str(dtype)}
    nbytes = (B * L * (C + 64) + B * Lo * C) * esize + B * (L + Lo) * 4
    bwd = (B * Lo * C + B * L * C) * esize

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    def full(fn):
        def run():
            x.grad = None
            merged = fn()[0]
            merged.backward(torch.ones_like(merged))

        return run

    yield Case("merge_tokens", "fwd", "tokens", B * L, {k: fwd(f) for k, f in provs.items()}, dict(cfg), nbytes)
    yield Case("merge_tokens", "full", "tokens", B * L, {k: full(f) for k, f in provs.items()}, dict(cfg), nbytes + bwd)


def cases(quick: bool = False):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if quick:
        shapes = [(6, 1, 1, 196, 64, 16), (4, 1, 1, 392, 64, 49), (4, 0, 4, 98, 64, 12)]
    else:
        shapes = [(96, 1, 1, 196, 768, 16), (64, 1, 1, 1568, 1024, 196), (64, 0, 8, 196, 1024, 24)]
    for B, P, T, N, C, r in shapes:
        yield from _case(B, P, T, N, C, r, dev, dtype)


def main(argv: list[str] | None = None) -> int:
    """This family through the suite: ``python -m benchmarks.bench_merge [suite options]``."""
    from .suite import main as suite_main

    return suite_main(["--ops", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
