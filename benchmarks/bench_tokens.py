"""Token ops: temporal roll, DropToken, random masking, gather, forward and forward+backward.

fastvl against the eager code the methods ship (All-in-one's slice-and-roll, VATT's permutation
gather, MAE's rand + argsort + gather), torch.compile of that eager code, and each fastvl backend
that can run here. Shapes: All-in-one-B (B*T=96, 40 text + 197 video tokens, C=768) and VATT-M video
(B=64, L=1568, C=1024). ``--quick`` shrinks everything for a CPU smoke run.

    python -m benchmarks.bench_tokens [--quick] [--out DIR]   (= python -m benchmarks --ops tokens ...)
"""

from __future__ import annotations

import sys

import torch

import fastvl
from fastvl.ops.tokens import gather_reference

try:
    from .common import Case
except ImportError:  # run as a script
    from common import Case

FAMILY = "tokens"
# every case op and covered op (the suite skips this family for selections naming none)
OPS = ("temporal_token_roll", "drop_tokens", "random_masking", "gather_tokens", "draw_tokens", "scatter_tokens")


# ---- the eager code the methods ship -------------------------------------------------------


def allinone_roll_eager(x, T, text_len, fold_div=8):
    """All-in-one's TemporalRoll (zeros_like + slices + torch.roll) on the video part, text concatenated."""
    text, vid = x[:, :text_len], x[:, text_len:]
    nt, l, c = vid.shape
    v = vid.reshape(nt // T, T, l, c)
    fold = l // fold_div
    out = torch.zeros_like(v)
    out[:, :, 0] = v[:, :, 0]
    out[:, :, 1 : fold + 1] = torch.roll(v[:, :, 1 : fold + 1], 1, 1)
    out[:, :, -fold:] = torch.roll(v[:, :, -fold:], -1, 1)
    out[:, :, 1 + fold : -fold] = v[:, :, 1 + fold : -fold]
    return torch.cat([text, out.view(nt, l, c)], dim=1)


def vatt_droptoken_eager(x, pos, keep_rate):
    """VATT: add positions, one shuffled index set for the batch, gather."""
    L = x.shape[1]
    idx = torch.randperm(L, device=x.device)[: int(keep_rate * L)]
    return (x + pos)[:, idx]


def mae_masking_eager(x, pos, mask_ratio):
    """MAE's random_masking after adding positions."""
    x = x + pos
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def _compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # torch.compile unavailable here
        return None


def _backends(op: str) -> list[str]:
    """fastvl backends that can run on this device (named ones, so each is measured)."""
    names = []
    if torch.cuda.is_available():
        for b in fastvl.backends.backends(op):
            if b.name != "reference" and not b.available():
                names.append(b.name)
    return names


def _fwd_full(fn, inputs, grad_like=None):
    """(fwd, fwd+bwd) closures for fn(*inputs) -> tensor or tuple whose first item gets a gradient."""

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def full():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_like if grad_like is not None else torch.ones_like(out))

    return fwd, full


def cases(quick: bool = False):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8

    # roll: All-in-one-B, 3 frames, text fused in front
    BT, T, text, L, C = (6, 3, 40, 197, 64) if quick else (96, 3, 40, 197, 768)
    x = torch.randn(BT, text + L, C, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    provs = {"eager": lambda a: allinone_roll_eager(a, T, text)}
    comp = _compiled(provs["eager"])
    if comp is not None:
        provs["compile"] = comp
    provs["fastvl"] = lambda a: fastvl.ops.temporal_token_roll(a, T, text_len=text)
    for b in _backends("temporal_token_roll"):
        provs[f"fastvl-{b}"] = lambda a, b=b: fastvl.ops.temporal_token_roll(a, T, text_len=text, backend=b)
    nbytes = 2 * x.numel() * esize
    cfg = {"B*T": BT, "T": T, "text_len": text, "L": L, "C": C, "dtype": str(dtype)}
    fw = {k: _fwd_full(f, (x,), g)[0] for k, f in provs.items()}
    fu = {k: _fwd_full(f, (x,), g)[1] for k, f in provs.items()}
    yield Case("temporal_token_roll", "fwd", "tokens", BT * (text + L), fw, dict(cfg), nbytes)
    yield Case("temporal_token_roll", "full", "tokens", BT * (text + L), fu, dict(cfg), 2 * nbytes)

    # DropToken / masking / gather at VATT-M video and All-in-one-B frame shapes
    shapes = [(4, 196, 64), (4, 1568 // 4, 64)] if quick else [(96, 197, 768), (64, 1568, 1024)]
    for B, L, C in shapes:
        x = torch.randn(B, L, C, device=dev, dtype=dtype, requires_grad=True)
        pos = torch.randn(L, C, device=dev, dtype=dtype)
        cfg = {"B": B, "L": L, "C": C, "dtype": str(dtype)}
        # drop (keep 0.5): read K rows of x and pos, write K rows
        K = int(0.5 * L)
        provs = {"eager": lambda a, pos=pos: vatt_droptoken_eager(a, pos, 0.5)}
        comp = _compiled(provs["eager"])
        if comp is not None:
            provs["compile"] = comp
        provs["fastvl"] = lambda a, pos=pos: fastvl.ops.drop_tokens(a, 0.5, pos=pos)[0]
        for b in _backends("gather_tokens"):
            provs[f"fastvl-{b}"] = lambda a, b=b, pos=pos: fastvl.ops.drop_tokens(a, 0.5, pos=pos, backend=b)[0]
        nbytes = (2 * B * K * C + K * C) * esize
        fw = {k: _fwd_full(f, (x,))[0] for k, f in provs.items()}
        fu = {k: _fwd_full(f, (x,))[1] for k, f in provs.items()}
        draw_gather = ("draw_tokens", "gather_tokens")
        yield Case("drop_tokens", "fwd", "tokens", B * L, fw, {**cfg, "keep_rate": 0.5}, nbytes, covers=draw_gather)
        yield Case(
            "drop_tokens",
            "full",
            "tokens",
            B * L,
            fu,
            {**cfg, "keep_rate": 0.5},
            nbytes + (B * K * C + B * L * C) * esize,
            covers=draw_gather,
        )
        # masking (ratio 0.75, per sample)
        K = int(L * 0.25)
        provs = {"eager": lambda a, pos=pos: mae_masking_eager(a, pos, 0.75)}
        comp = _compiled(provs["eager"])
        if comp is not None:
            provs["compile"] = comp
        provs["fastvl"] = lambda a, pos=pos: fastvl.ops.random_masking(a, 0.75, pos=pos)
        for b in _backends("gather_tokens"):
            provs[f"fastvl-{b}"] = lambda a, b=b, pos=pos: fastvl.ops.random_masking(a, 0.75, pos=pos, backend=b)
        nbytes = (2 * B * K * C + min(B * K, L) * C) * esize + B * L * (8 + esize)
        fw = {k: _fwd_full(f, (x,))[0] for k, f in provs.items()}
        fu = {k: _fwd_full(f, (x,))[1] for k, f in provs.items()}
        yield Case(
            "random_masking", "fwd", "tokens", B * L, fw, {**cfg, "mask_ratio": 0.75}, nbytes, covers=draw_gather
        )
        yield Case(
            "random_masking",
            "full",
            "tokens",
            B * L,
            fu,
            {**cfg, "mask_ratio": 0.75},
            nbytes + (B * K * C + B * L * C) * esize,
            covers=draw_gather,
        )
        # plain gather with given unique indices, fwd + bwd
        idx = torch.argsort(torch.rand(B, L, device=dev), dim=1)[:, : L // 2]
        provs = {"eager": lambda a, idx=idx: gather_reference(a, idx)}
        comp = _compiled(provs["eager"])
        if comp is not None:
            provs["compile"] = comp
        provs["fastvl"] = lambda a, idx=idx: fastvl.ops.gather_tokens(a, idx, unique_indices=True, check_bounds=False)
        for b in _backends("gather_tokens"):
            provs[f"fastvl-{b}"] = lambda a, b=b, idx=idx: fastvl.ops.gather_tokens(
                a, idx, unique_indices=True, check_bounds=False, backend=b
            )
        K = L // 2
        nbytes = 2 * B * K * C * esize
        fu = {k: _fwd_full(f, (x,))[1] for k, f in provs.items()}
        fw = {k: _fwd_full(f, (x,))[0] for k, f in provs.items()}
        cfg_u = {**cfg, "K": K, "unique_indices": True}
        yield Case("gather_tokens", "fwd", "tokens", B * L, fw, cfg_u, nbytes)
        yield Case("gather_tokens", "full", "tokens", B * L, fu, cfg_u, nbytes + (B * K * C + B * L * C) * esize)
        # indices that may repeat: the backward is the scatter-add (scatter_tokens)
        idx = torch.randint(0, L, (B, K), device=dev)
        provs = {"eager": lambda a, idx=idx: gather_reference(a, idx)}
        comp = _compiled(provs["eager"])
        if comp is not None:
            provs["compile"] = comp
        provs["fastvl"] = lambda a, idx=idx: fastvl.ops.gather_tokens(a, idx, check_bounds=False)
        for b in _backends("scatter_tokens"):
            provs[f"fastvl-{b}"] = lambda a, b=b, idx=idx: fastvl.ops.gather_tokens(
                a, idx, check_bounds=False, backend=b
            )
        fu = {k: _fwd_full(f, (x,))[1] for k, f in provs.items()}
        yield Case(
            "gather_tokens",
            "full",
            "tokens",
            B * L,
            fu,
            {**cfg, "K": K, "unique_indices": False},
            nbytes + (B * K * C + B * L * C) * esize,
            covers=("gather_tokens", "scatter_tokens"),
        )


def main(argv: list[str] | None = None) -> int:
    """This family through the suite: ``python -m benchmarks.bench_tokens [suite options]``."""
    from .suite import main as suite_main

    return suite_main(["--ops", FAMILY, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
