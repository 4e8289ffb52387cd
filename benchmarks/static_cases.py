"""The static sm_90 report's cases: the benchmark suite's shapes, each op called forward and backward.

A case builds its inputs at ``1/div`` of its rows (``div=1``: the suite's shape; the byte replay of a
memory-bound op runs at a smaller ``div`` > 1 on a device with ``1/div`` of the SMs) and returns closures
for one forward call and one backward call through ``fastvl.ops`` with ``backend="triton"``, plus the
minimum bytes of each call: every input the result depends on read once, every output written once
(for a gather, the selected rows; a gradient covers its whole tensor, zeros included).

bf16 on the GPU path. The readiness shapes (``acceptance``: what tests/test_static_sm90.py checks): attention
at All-in-one-B (96 x 237 tokens, 12 heads, D=64, text key padding + roll offsets), D=128 (VidL, 41 x 785, 6
heads) and D=32; contrastive at B=32768, D in {256, 512}, bf16 and fp32, CLIP / MIL-NCE (3 texts per clip) /
SigLIP; LayerNorm with the residual add at C=768 (All-in-one-B tokens) and C=8192 (the width sweep); token ops:
roll at All-in-one-B (96, 40+197, 768), DropToken with positions at VATT-M (8 x 1568 x 1024, keep 0.5), MAE
masking with positions at All-in-one-B frames (96 x 197 x 768, ratio 0.75), gather with repeated and with
unique indices at VATT-M. The rest of the report: LayerNorm at C=16384 (the widest row the kernels serve, 4096
rows; bytes counted too) and, compile figures only, attention at VATT-M with DropToken (64 x 785, 16 heads),
causal at S=4096, packed varlen and deterministic; the masking family at VideoMAE-B (tube masking, the MAE and
VideoMAE V2 decoder inputs, the patch loss; the MAE-B image loss); token selection and merging at VATT-M and
All-in-one-B; linear cross-entropy at BERT's vocabulary (N = 1024 and 16384, D=768).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

BF16 = torch.bfloat16
TRITON = "triton"


@dataclasses.dataclass
class Built:
    """One case at one size: the forward call, the backward call, and each call's minimum bytes."""

    fwd: Callable[[], Any]
    bwd: Callable[[], Any] | None
    min_bytes: dict[str, int]
    rows: int  # the size along the dimension the byte replay scales (samples, frames or rows)


@dataclasses.dataclass
class StaticCase:
    family: str
    op: str
    shape: str
    config: dict[str, Any]
    build: Callable[[int], Built]
    memory_bound: bool = False
    byte_div: int = 1  # rows divisor of the byte replay (memory-bound cases)
    acceptance: bool = True  # one of the shapes the Hopper readiness test (tests/test_static_sm90.py) checks

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape}"


def _sz(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _rows(n: int, div: int, multiple: int = 1) -> int:
    """``n / div`` rows, at least one ``multiple`` and a multiple of it."""
    return max(multiple, n // div // multiple * multiple)


def _fwd_bwd(run: Callable[[], Any], grads: Callable[[Any], tuple]) -> tuple[Callable, Callable]:
    """Closures: fwd runs the op (keeping its outputs), bwd back-propagates fixed gradients through them."""
    state: dict[str, Any] = {}

    def fwd():
        state["out"] = run()

    def bwd():
        outs, gs = grads(state["out"])
        torch.autograd.backward(outs, gs)

    return fwd, bwd


def _randn(*shape, dtype=BF16, grad=False) -> torch.Tensor:
    t = torch.randn(*shape).to(dtype)
    return t.requires_grad_(grad)


# ---- token ops -----------------------------------------------------------------------------


def roll_case() -> StaticCase:
    BT, Tf, text, L, C = 96, 3, 40, 197, 768

    def build(div: int) -> Built:
        bt = _rows(BT, div, Tf)
        x = _randn(bt, text + L, C, grad=True)
        g = _randn(bt, text + L, C)
        import fastvl

        fwd, bwd = _fwd_bwd(
            lambda: fastvl.ops.temporal_token_roll(x, Tf, text_len=text, backend=TRITON), lambda y: (y, g)
        )
        n = x.numel() * x.element_size()
        return Built(fwd, bwd, {"fwd": 2 * n, "bwd": 2 * n}, bt)

    cfg = {"B*T": BT, "T": Tf, "text_len": text, "L": L, "C": C, "dtype": "bf16"}
    return StaticCase("tokens", "temporal_token_roll", "All-in-one-B", cfg, build, True, 16)


def drop_case() -> StaticCase:
    B, L, C, keep = 8, 1568, 1024, 0.5

    def build(div: int) -> Built:
        b = _rows(B, div)
        x = _randn(b, L, C, grad=True)
        pos = _randn(L, C, grad=True)
        K = int(keep * L)
        g = _randn(b, K, C)
        import fastvl

        fwd, bwd = _fwd_bwd(lambda: fastvl.ops.drop_tokens(x, keep, pos=pos, backend=TRITON), lambda o: (o[0], g))
        e = x.element_size()
        # fwd: K rows of x per sample and K rows of pos in, K rows out (+ the K kept indices)
        # bwd: the K-row gradient in, dx (B, L, C) and dpos (L, C) out
        mins = {"fwd": (2 * b * K * C + K * C) * e + K * 8, "bwd": (b * K * C + b * L * C + L * C) * e + K * 8}
        return Built(fwd, bwd, mins, b)

    cfg = {"B": B, "L": L, "C": C, "keep_rate": keep, "pos": True, "dtype": "bf16"}
    return StaticCase("tokens", "drop_tokens", "VATT-M", cfg, build, True, 4)


def masking_case() -> StaticCase:
    B, L, C, ratio = 96, 197, 768, 0.75

    def build(div: int) -> Built:
        b = _rows(B, div)
        x = _randn(b, L, C, grad=True)
        pos = _randn(L, C, grad=True)
        K = int(L * (1 - ratio))
        g = _randn(b, K, C)
        import fastvl

        fwd, bwd = _fwd_bwd(lambda: fastvl.ops.random_masking(x, ratio, pos=pos, backend=TRITON), lambda o: (o[0], g))
        e = x.element_size()
        # fwd: the kept rows of x and the distinct kept rows of pos (expected L (1 - (1 - K/L)^b) for b
        # independent draws) in; visible, mask (x's dtype) and ids_restore out
        pos_rows = L * (1 - (1 - K / L) ** b)
        fmin = round((2 * b * K * C + pos_rows * C) * e + b * L * (e + 8))
        # bwd: the gradient of visible and the kept indices in, dx and dpos out
        bmin = (b * K * C + b * L * C + L * C) * e + b * K * 8
        return Built(fwd, bwd, {"fwd": fmin, "bwd": bmin}, b)

    cfg = {"B": B, "L": L, "C": C, "mask_ratio": ratio, "pos": True, "dtype": "bf16"}
    # replays at 24 and 48 samples: the pos rows some sample keeps saturate near L by then (as at 96); at 6 and 12
    # samples a kernel that reads every pos row once shows an excess that shrinks with the batch, not an affine one
    return StaticCase("tokens", "random_masking", "All-in-one-B frames", cfg, build, True, 4)


def gather_case(unique: bool) -> StaticCase:
    B, L, C = 8, 1568, 1024
    K = L // 2

    def build(div: int) -> Built:
        b = _rows(B, div)
        x = _randn(b, L, C, grad=True)
        gen = torch.Generator().manual_seed(0)
        if unique:
            idx = torch.argsort(torch.rand(b, L, generator=gen), dim=1)[:, :K].contiguous()
        else:
            idx = torch.randint(0, L, (b, K), generator=gen)
        g = _randn(b, K, C)
        import fastvl

        fwd, bwd = _fwd_bwd(
            lambda: fastvl.ops.gather_tokens(x, idx, unique_indices=unique, check_bounds=False, backend=TRITON),
            lambda y: (y, g),
        )
        e = x.element_size()
        rows = b * K if unique else int(torch.unique(idx + torch.arange(b)[:, None] * L).numel())
        mins = {"fwd": (rows + b * K) * C * e + b * K * 8, "bwd": (b * K * C + b * L * C) * e + b * K * 8}
        return Built(fwd, bwd, mins, b)

    cfg = {"B": B, "L": L, "C": C, "K": K, "unique_indices": unique, "dtype": "bf16"}
    name = "VATT-M unique" if unique else "VATT-M repeated"
    return StaticCase("tokens", "gather_tokens", name, cfg, build, True, 4)


# ---- LayerNorm -----------------------------------------------------------------------------


def layer_norm_case(shape: str, M: int, C: int, div: int, acceptance: bool = True) -> StaticCase:
    def build(d: int) -> Built:
        m = _rows(M, d)
        x, r = _randn(m, C, grad=True), _randn(m, C, grad=True)
        w, b = _randn(C, grad=True), _randn(C, grad=True)
        gy, gh = _randn(m, C), _randn(m, C)
        import fastvl

        fwd, bwd = _fwd_bwd(
            lambda: fastvl.ops.layer_norm(x, w, b, 1e-6, r, backend=TRITON), lambda o: ((o[0], o[1]), (gy, gh))
        )
        e = x.element_size()
        # fwd: x, residual in; y, h out. bwd: dy, dh and h in; dx (= d residual) out; w in, dw, db out
        mins = {"fwd": 4 * m * C * e + 2 * C * e, "bwd": 4 * m * C * e + 3 * C * e}
        return Built(fwd, bwd, mins, m)

    cfg = {"M": M, "C": C, "residual": True, "dtype": "bf16"}
    return StaticCase("layer_norm", "layer_norm", shape, cfg, build, True, div, acceptance)


# ---- attention (compile figures only) ------------------------------------------------------


def text_padding(B: int, S: int, text_len: int = 40) -> torch.Tensor:
    """(B, S) key padding mask of All-in-one's [text; video] stream: captions 8..text_len tokens (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, text_len + 1, (B,), generator=g)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, :text_len] = torch.arange(text_len)[None, :] >= lengths[:, None]
    return kpm


def attention_case(shape: str, B: int, S: int, H: int, D: int, *, causal=False, padded=False, roll=False,
                   varlen=False, deterministic=False, acceptance=True) -> StaticCase:  # fmt: skip
    def build(div: int) -> Built:
        import fastvl

        if varlen:
            gen = torch.Generator().manual_seed(0)
            lens = torch.randint(S * 3 // 4, S + 1, (B,), generator=gen)
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0)
            total, mx = int(cu[-1]), int(lens.max())
            q, k, v = (_randn(total, H, D, grad=True) for _ in range(3))
            g = _randn(total, H, D)

            def run():
                return fastvl.ops.flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=causal, backend=TRITON)

        else:
            q, k, v = (_randn(B, S, H, D, grad=True) for _ in range(3))
            g = _randn(B, S, H, D)
            kpm = offsets = None
            if padded:
                kpm = text_padding(B, S)
            if roll:
                offsets = fastvl.ops.roll_frame_offsets(S, 40, fraction=0.125)

            def run():
                return fastvl.ops.flash_attention(
                    q, k, v, causal=causal, key_padding_mask=kpm, frame_offsets=offsets,
                    num_frames=3 if roll else 1, deterministic=deterministic, backend=TRITON,
                )  # fmt: skip

        fwd, bwd = _fwd_bwd(run, lambda o: (o, g))
        return Built(fwd, bwd, {}, 0)

    cfg = {"B": B, "S": S, "H": H, "D": D, "causal": causal, "padded": padded, "roll": roll, "varlen": varlen}
    if deterministic:
        cfg["deterministic"] = True
    return StaticCase("attention", "flash_attention", shape, {**cfg, "dtype": "bf16"}, build, acceptance=acceptance)


def attention_features_case(shape: str, B: int, T: int, N: int, H: int, D: int) -> StaticCase:
    """VATT-style frames with the score features: a per-key bias (ToMe's log size), frame windows of +-1 frame,
    dropout 0.1 and the LSE; then the CLS rows from that LSE (``attention_rows``) and the dropout keep mask
    the kernels draw (``kernels.attention.dropout_mask``, what the tests compare against)."""

    def build(div: int) -> Built:
        from fastvl.kernels.attention import dropout_mask

        import fastvl

        S = 1 + T * N
        q, k, v = (_randn(B, S, H, D, grad=True) for _ in range(3))
        bias = torch.zeros(B, S, dtype=torch.float32)
        g = _randn(B, S, H, D)
        gen = torch.Generator().manual_seed(0)

        def run():
            out, lse = fastvl.ops.flash_attention(
                q, k, v, 0.1, frame_tokens=N, text_tokens=1, frame_window=1, key_bias=bias, return_lse=True,
                generator=gen, backend=TRITON,
            )  # fmt: skip
            rows = fastvl.ops.attention_rows(q[:, :1].detach(), k.detach(), lse[:, :, :1].detach(), backend=TRITON)
            dropout_mask(0, 0.1, 1, 1, 64, S, q.device)
            return out, rows

        fwd, bwd = _fwd_bwd(run, lambda o: (o[0], g))
        return Built(fwd, bwd, {}, 0)

    cfg = {"B": B, "T": T, "N": N, "H": H, "D": D, "frame_window": 1, "key_bias": True, "dropout_p": 0.1}
    return StaticCase("attention", "flash_attention", shape, {**cfg, "dtype": "bf16"}, build, acceptance=False)


# ---- contrastive (compile figures only) ----------------------------------------------------


def contrastive_case(loss: str, B: int, D: int, dtype: torch.dtype) -> StaticCase:
    op = {"clip": "clip_loss", "mil": "mil_nce_loss", "siglip": "siglip_loss"}[loss]

    def build(div: int) -> Built:
        import fastvl

        a = _randn(B, D, dtype=dtype, grad=True)
        b = _randn(*((B, 3, D) if loss == "mil" else (B, D)), dtype=dtype, grad=True)
        s = torch.tensor(14.3, requires_grad=True)
        if loss == "clip":
            run = lambda: fastvl.ops.clip_loss(a, b, s, backend=TRITON)  # noqa: E731
        elif loss == "mil":
            run = lambda: fastvl.ops.mil_nce_loss(a, b, s, backend=TRITON)  # noqa: E731
        else:
            run = lambda: fastvl.ops.siglip_loss(a, b, s, -10.0, backend=TRITON)  # noqa: E731
        fwd, bwd = _fwd_bwd(run, lambda y: (y, torch.ones_like(y)))
        return Built(fwd, bwd, {}, 0)

    dt = "bf16" if dtype == BF16 else "fp32"
    cfg = {"loss": loss, "B": B, "N": B * (3 if loss == "mil" else 1), "D": D, "dtype": dt}
    return StaticCase("contrastive", op, f"B={B} D={D} {dt}", cfg, build)


# ---- masked video modeling, token selection and merging, linear cross-entropy (compile figures only) -------


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tube_masking_case() -> StaticCase:
    B, T, N, C, ratio = 64, 8, 196, 768, 0.9

    def build(div: int) -> Built:
        import fastvl

        x = _randn(B * T, N, C, grad=True)
        pos = _randn(T * N, C, grad=True)
        K = int(N * (1 - ratio) + 1e-6)
        g = _randn(B, T * K, C)
        run = lambda: fastvl.ops.tube_masking(x, T, ratio, tube=T, pos=pos, backend=TRITON)  # noqa: E731
        fwd, bwd = _fwd_bwd(run, lambda o: (o[0], g))
        return Built(fwd, bwd, {}, 0)

    cfg = {"B": B, "T": T, "N": N, "C": C, "mask_ratio": ratio, "tube": T, "pos": True, "dtype": "bf16"}
    return StaticCase("masking", "tube_masking", "VideoMAE-B", cfg, build, acceptance=False)


def restore_case(v2: bool) -> StaticCase:
    B, L, TK, C = 64, 8 * 196, 8 * 19, 384

    def build(div: int) -> Built:
        import fastvl

        gen = torch.Generator().manual_seed(0)
        ids = torch.argsort(torch.argsort(torch.rand(B, L, generator=gen), dim=1), dim=1)
        vis, token, pos = _randn(B, TK, C, grad=True), _randn(C, grad=True), _randn(1, L, C, grad=True)
        # V2's decoder keeps half of the masked places (those with ids >= TK), in ascending order
        keep = torch.argsort(ids, dim=1)[:, TK : TK + (L - TK) // 2].sort(dim=1).values if v2 else None
        g = _randn(B, TK + keep.shape[1] if v2 else L, C)
        run = lambda: fastvl.ops.restore_tokens(  # noqa: E731
            vis, ids, token, pos, decoder_keep=keep, check_indices=False, backend=TRITON
        )
        fwd, bwd = _fwd_bwd(run, lambda y: (y, g))
        return Built(fwd, bwd, {}, 0)

    cfg = {"B": B, "L": L, "K": TK, "C": C, "pos": True, "decoder_keep": (L - TK) // 2 if v2 else None, "dtype": "bf16"}
    name = "VideoMAE-B V2 decoder" if v2 else "VideoMAE-B"
    return StaticCase("masking", "restore_tokens", name, cfg, build, acceptance=False)


def patch_loss_case(video: bool) -> StaticCase:
    B, frames, side, p = (64, 16, 224, 16) if video else (256, 1, 224, 16)

    def build(div: int) -> Built:
        import fastvl

        gen = torch.Generator().manual_seed(0)
        tub = 2 if video else 1
        P = frames // tub * (side // p) ** 2
        clip = torch.randn(B, frames, 3, side, side)
        if video:  # VideoMAE-B: pred at the masked patches, per-channel targets from un-normalised pixels
            keep = frames // tub * 19
            mask = torch.ones(B, P, dtype=torch.bool)
            mask.scatter_(1, torch.argsort(torch.rand(B, P, generator=gen), dim=1)[:, :keep], False)
            pred = _randn(B, P - keep, 3 * tub * p * p, grad=True)
            kw = {"patch": p, "tubelet": tub, "norm_pix": "channel", "unnormalize": IMAGENET}
        else:  # MAE-B images: pred at every patch, 75% masked, norm_pix_loss
            mask = (torch.rand(B, P, generator=gen) < 0.75).to(BF16)
            pred = _randn(B, P, 3 * p * p, grad=True)
            kw = {"patch": p}
        run = lambda: fastvl.ops.masked_patch_loss(pred, clip, mask, backend=TRITON, **kw)  # noqa: E731
        fwd, bwd = _fwd_bwd(run, lambda y: (y, torch.ones_like(y)))
        return Built(fwd, bwd, {}, 0)

    cfg = {"B": B, "frames": frames, "side": side, "patch": p, "tubelet": 2 if video else 1,
           "norm_pix": "channel" if video else "patch", "rows": "masked" if video else "all",
           "dtype": "bf16"}  # fmt: skip
    shape = "VideoMAE-B" if video else "MAE-B images"
    return StaticCase("masking", "masked_patch_loss", shape, cfg, build, acceptance=False)


def select_case(shape: str, B: int, T: int, N: int, C: int, space_time: bool = False) -> StaticCase:
    P, k = (1 if space_time else 0), N // 2

    def build(div: int) -> Built:
        import fastvl

        x = _randn(B, P + T * N, C, grad=True)
        scores = torch.randn(B, T * N)
        if space_time:
            run = lambda: fastvl.ops.select_space_time(  # noqa: E731
                x, scores, k, frames=T, keep_frames=T // 2, protected=P, backend=TRITON
            )
            g = _randn(B, P + T // 2 * k, C)
        else:
            run = lambda: fastvl.ops.select_tokens(x, scores, k, groups=T, backend=TRITON)  # noqa: E731
            g = _randn(B, T * k, C)
        fwd, bwd = _fwd_bwd(run, lambda o: (o[0], g))
        return Built(fwd, bwd, {}, 0)

    op = "select_space_time" if space_time else "select_tokens"
    cfg = {"B": B, "P": P, "T": T, "N": N, "C": C, "k": k, "dtype": "bf16"}
    if space_time:
        cfg["keep_frames"] = T // 2
    return StaticCase("select", op, shape, cfg, build, acceptance=False)


def merge_case(shape: str, B: int, P: int, T: int, N: int, C: int, r: int) -> StaticCase:
    def build(div: int) -> Built:
        import fastvl

        L = P + T * N
        x, metric = _randn(B, L, C, grad=True), _randn(B, L, 64)
        size = torch.ones(B, L, 1, dtype=BF16)
        kw = {"protected": P, "metric": metric, "mode": "joint" if T == 1 else "frame", "frames": T if T > 1 else None}
        state: dict[str, Any] = {}

        def fwd():
            state["out"] = fastvl.ops.merge_tokens(x, size, r, backend=TRITON, **kw)[0]

        def bwd():
            torch.autograd.backward(state["out"], torch.ones_like(state["out"]))

        return Built(fwd, bwd, {}, 0)

    cfg = {"B": B, "L": P + T * N, "C": C, "metric_C": 64, "r": r, "mode": "joint" if T == 1 else "frame",
           "frames": T, "dtype": "bf16"}  # fmt: skip
    return StaticCase("merge", "merge_tokens", shape, cfg, build, acceptance=False)


def lce_case(N: int) -> StaticCase:
    V, D = 30522, 768

    def build(div: int) -> Built:
        import fastvl

        gen = torch.Generator().manual_seed(0)
        h = _randn(N, D, grad=True)
        w = (torch.randn(V, D, generator=gen) * D**-0.5).to(BF16).requires_grad_(True)
        b = torch.zeros(V, dtype=BF16, requires_grad=True)
        t = torch.randint(0, V, (N,), generator=gen)
        t[torch.rand(N, generator=gen) < 0.15] = -100
        run = lambda: fastvl.ops.linear_cross_entropy(h, w, b, t, label_smoothing=0.1, backend=TRITON)  # noqa: E731
        fwd, bwd = _fwd_bwd(run, lambda y: (y, torch.ones_like(y)))
        return Built(fwd, bwd, {}, 0)

    cfg = {"N": N, "V": V, "D": D, "label_smoothing": 0.1, "ignored": 0.15, "dtype": "bf16"}
    return StaticCase("linear_cross_entropy", "linear_cross_entropy", f"N={N}", cfg, build, acceptance=False)


def cases() -> list[StaticCase]:
    """Every static case, in report order."""
    out = [
        attention_case("All-in-one-B padded+roll", 96, 237, 12, 64, padded=True, roll=True),
        attention_case("VidL D=128", 41, 785, 6, 128),
        attention_case("VidL D=32", 64, 197, 12, 32),
    ]
    for D in (256, 512):
        for dtype in (BF16, torch.float32):
            for loss in ("clip", "mil", "siglip"):
                out.append(contrastive_case(loss, 32768, D, dtype))
    out += [
        layer_norm_case("All-in-one-B", 96 * 237, 768, 16),
        layer_norm_case("width 8192", 16384, 8192, 64),
        roll_case(),
        drop_case(),
        masking_case(),
        gather_case(unique=False),
        gather_case(unique=True),
        # beyond the readiness test (its D=64 / 128 / 32 attention cases above have every feature flag a binary
        # depends on but causal and varlen): the other attention shapes, every other kernel of kernels/ at its
        # family's benchmark shapes
        layer_norm_case("width 16384", 4096, 16384, 32, acceptance=False),
        attention_case("VATT-M DropToken", 64, 785, 16, 64, acceptance=False),
        attention_case("long causal", 4, 4096, 32, 64, causal=True, acceptance=False),
        attention_case("varlen", 96, 237, 12, 64, varlen=True, acceptance=False),
        attention_case("All-in-one-B deterministic", 96, 237, 12, 64, deterministic=True, acceptance=False),
        attention_features_case("VATT-M frames, bias, dropout, rows", 8, 8, 196, 16, 64),
        tube_masking_case(),
        restore_case(v2=False),
        restore_case(v2=True),
        patch_loss_case(video=True),
        patch_loss_case(video=False),
        select_case("VATT-M frames", 64, 8, 196, 1024),
        select_case("All-in-one-B frames", 96, 1, 197, 768),
        select_case("VATT-M space-time", 64, 8, 196, 1024, space_time=True),
        merge_case("All-in-one-B frames", 96, 1, 1, 196, 768, 16),
        merge_case("VATT-M joint", 64, 1, 1, 1568, 1024, 196),
        merge_case("VATT-M frames", 64, 0, 8, 196, 1024, 24),
        lce_case(1024),
        lce_case(16384),
    ]
    return out
