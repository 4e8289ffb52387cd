"""Attention: forward, backward and forward+backward, TFLOP/s (and % of the matmul peak) and GB/s.

The ``attention`` family of the suite (compute-bound: % of limit is of the matmul peak). Providers: ``eager``
(``softmax(q k^T * scale) v``, what the VidL codebases run), the peers ``compile`` (torch.compile of eager), torch
SDPA with each fused backend pinned (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``; on the CPU ``sdpa``, torch's
own choice) and ``flash_attn`` when installed, and fastvl: ``fastvl`` (auto dispatch: it hands plain bf16 calls to
flash_attn / SDPA, masked ones to its kernel), ``fastvl-triton`` (fastvl's kernel named) and ``fastvl-triton-det``
(its deterministic backward) on a GPU; on the CPU ``fastvl`` is the fp32 reference. Cases marked ``padded`` carry a
key padding mask (All-in-one's padded text tokens): SDPA then leaves its flash kernel. Shapes: the VidL models
(All-in-one-B: B*T=96 x 12 heads x 237 tokens x 64, also text-padded; VATT-M with DropToken: 64 x 16 x 785 x 64; MAC:
64 x 12 x 197 x 64), the VidL lengths 197-1569 at H=12 and D in {64, 128}, and a long-sequence sweep 512..16k (16k
tokens per batch). FLOPs count 4*B*H*S^2*D forward (half when causal) and 2.5x that backward, like torch's FlopCounter
for fused SDPA.
bf16 on a GPU; ``--quick`` runs small fp32 shapes on the CPU (a CPU run: never a GPU claim).

    python -m benchmarks.bench_attention [--quick] [--sweep] [--out results.json]
    python -m benchmarks --ops attention [suite options]     (the same cases through the suite, no --sweep)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import fastvl

try:
    from .attention_packed import packed_cases
    from .common import Case, default_results_dir, environment, run_case, write_rows
except ImportError:  # run as a script
    from attention_packed import packed_cases
    from common import Case, default_results_dir, environment, run_case, write_rows

FAMILY = "attention"
# every case op (the suite skips this family for selections naming none)
OPS = ("flash_attention", "attention_rows", "flash_attention_qkvpacked")


def eager_attention(q, k, v, causal=False, kpm=None):
    """Eager PyTorch attention on (B, H, S, D): the code VidL repos ship (timm's non-fused path).
    ``kpm (B, S)`` bool, True = padded key (masked out)."""
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
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


def _sdpa(backend, causal, kpm):
    """SDPA on (B, H, S, D), pinned to ``backend`` (None: torch's choice); a key padding mask becomes a boolean
    attn_mask (True = attend)."""
    mask = None if kpm is None else ~kpm[:, None, None, :]

    def fn(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    return fn


def providers(causal: bool, kpm: torch.Tensor | None = None) -> dict[str, tuple[str, object]]:
    """name -> (layout, fn(q, k, v)): layout 'bshd' (fastvl, flash_attn) or 'bhsd' (torch). ``kpm (B, S)``:
    key padding mask (True = ignore), given to every provider that can take one."""
    p: dict[str, tuple[str, object]] = {"eager": ("bhsd", lambda q, k, v: eager_attention(q, k, v, causal, kpm))}
    try:
        comp = torch.compile(lambda q, k, v: eager_attention(q, k, v, causal, kpm), dynamic=False)
        p["compile"] = ("bhsd", comp)
    except Exception:  # torch.compile unavailable
        pass
    if torch.cuda.is_available():
        for name, b in _sdpa_backends().items():
            if kpm is not None and name == "sdpa-flash":
                continue  # SDPA's flash kernel takes no mask
            p[name] = ("bhsd", _sdpa(b, causal, kpm))
        if kpm is None:
            try:
                from flash_attn import flash_attn_func

                p["flash_attn"] = ("bshd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal))
            except ImportError:
                pass
        else:
            p["sdpa"] = ("bhsd", _sdpa(None, causal, kpm))  # torch's own pick for a masked call
        p["fastvl-triton"] = (
            "bshd",
            lambda q, k, v: fastvl.ops.flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, backend="triton"),
        )
        p["fastvl-triton-det"] = (  # the deterministic backward: a dQ pass instead of fp32 atomics
            "bshd",
            lambda q, k, v: fastvl.ops.flash_attention(
                q, k, v, causal=causal, key_padding_mask=kpm, deterministic=True, backend="triton"
            ),
        )
    else:
        p["sdpa"] = ("bhsd", _sdpa(None, causal, kpm))
    # auto: flash_attn / SDPA where they serve the call exactly, fastvl's kernel otherwise (the reference on a CPU)
    p["fastvl"] = ("bshd", lambda q, k, v: fastvl.ops.flash_attention(q, k, v, causal=causal, key_padding_mask=kpm))
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
    """(name, B, H, S, D, causal, padded) points; ``padded``: All-in-one's text padding as a key padding mask."""
    if quick:
        out = [("quick", 2, 2, S, 64, False, False) for S in (197, 237)]
        return out + [("quick-causal", 2, 2, 237, 64, True, False), ("quick-padded", 2, 2, 237, 64, False, True)]
    out = [
        ("All-in-one-B", 96, 12, 237, 64, False, False),
        ("All-in-one-B padded", 96, 12, 237, 64, False, True),
        ("VATT-M DropToken", 64, 16, 785, 64, False, False),
        ("MAC", 64, 12, 197, 64, False, False),
    ]
    for D in (64, 128):
        H = 12 if D == 64 else 6
        for S in (197, 237, 629, 785, 1569):
            out.append((f"VidL D={D}", max(1, 32768 // S), H, S, D, False, False))
    if sweep:
        for causal in (False, True):
            for D in (64, 128):
                for S in (512, 1024, 2048, 4096, 8192, 16384):
                    name = f"long D={D}" + (" causal" if causal else "")
                    out.append((name, max(1, 16384 // S), 2048 // D, S, D, causal, False))
    return out


def text_padding(B: int, S: int, device, text_len: int = 40) -> torch.Tensor:
    """(B, S) bool key padding mask, True = padded: All-in-one's [text; video] stream, each sample's caption
    8..text_len tokens long (drawn with a fixed seed), the rest of the text slots padded, video never."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, text_len + 1, (B,), generator=g)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, :text_len] = torch.arange(text_len)[None, :] >= lengths[:, None]
    return kpm.to(device)


def cases(quick: bool = False, sweep: bool = False):
    """The family's cases (fwd, bwd, full per shape); FLOPs count the full S x S (padding not subtracted)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    for name, B, H, S, D, causal, padded in shapes(quick, sweep):
        base = [torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3)]
        kpm = text_padding(B, S, dev) if padded else None
        fl = 4 * B * H * S * S * D // (2 if causal else 1)
        tensor_bytes = B * S * H * D * esize
        cfg = {"shape": name, "B": B, "H": H, "S": S, "D": D, "causal": causal, "padded": padded, "dtype": str(dtype)}
        per_mode: dict[str, dict] = {"fwd": {}, "bwd": {}, "full": {}}
        for prov, (layout, fn) in providers(causal, kpm).items():
            ins = [t.detach().requires_grad_(True) for t in base]
            if layout == "bhsd":
                ins = [t.detach().transpose(1, 2).requires_grad_(True) for t in base]
            fwd, bwd, full = _modes(fn, ins)
            per_mode["fwd"][prov], per_mode["bwd"][prov], per_mode["full"][prov] = fwd, bwd, full
        # minimal traffic: fwd q, k, v, o; bwd q, k, v, o, dO in and dq, dk, dv out
        for mode, nbytes, flops in (("fwd", 4, fl), ("bwd", 8, 5 * fl // 2), ("full", 12, 7 * fl // 2)):
            yield Case(
                "flash_attention",
                mode,
                "S",
                S,
                per_mode[mode],
                dict(cfg),
                nbytes * tensor_bytes,
                flops,
                bound="compute",
            )
    yield from rows_cases(quick)
    yield from packed_cases(quick)  # the qkv-packed op (benchmarks/attention_packed.py)


# ---- score features and frame-block windows ------------------------------------------------------------
# Key bias (ToMe's proportional attention), frame-local windows (w = 0, 1, 2, all frames) and divided space-time
# attention (spatial_only then temporal_only, TimeSformer) at VATT-M (8 frames x 196 patches + CLS, 16 heads of
# 64) and All-in-one-B's joint stream (40 text + 3 frames x 197, 12 heads of 64). Providers: ``eager`` (the
# materialised mask / bias added to the S x S scores), ``sdpa-mask`` (SDPA with the materialised mask: it leaves
# its flash kernels), ``flex`` (torch.compile'd FlexAttention with the equivalent mask_mod / score_mod and a block
# mask; forward only on the CPU, where it has no backward) and fastvl (``fastvl-triton`` named on a GPU; ``fastvl``
# auto, the reference on the CPU). FLOPs count the attended (query, key) pairs: a narrower window does less work.


def frame_mask(S: int, text: int, F: int, window: int, temporal: bool, device) -> torch.Tensor:
    """(S, S) bool, True = attend: text tokens see and are seen by all; video tokens within ``window`` frames
    (-1: all) and, with ``temporal``, at the same spatial position."""
    i = torch.arange(S, device=device)
    r = (i - text).clamp_min(0)
    near = torch.ones(S, S, dtype=torch.bool, device=device)
    if window >= 0:
        near = (r[:, None] // F - r[None, :] // F).abs() <= window
    if temporal:
        near = near & (r[:, None] % F == r[None, :] % F)
    return (i[:, None] < text) | (i[None, :] < text) | near


def frame_mask_mod(text: int, per_frame: int, window: int, temporal: bool):
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of :func:`frame_mask`."""

    def mask_mod(b, h, qi, kj):
        rq, rk = (qi - text).clamp(min=0), (kj - text).clamp(min=0)
        near = ((rq // per_frame - rk // per_frame).abs() <= window) if window >= 0 else (qi >= 0)
        if temporal:
            near = near & (rq % per_frame == rk % per_frame)
        return (qi < text) | (kj < text) | near

    return mask_mod


def _flex(mask_fn=None, bias=None):
    """Compiled FlexAttention on (B, H, S, D) with a mask_mod (and its block mask) or a per-key bias score_mod."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)
    state = {}

    def fn(q, k, v):
        if mask_fn is not None:
            if "bm" not in state:
                S = q.shape[2]
                state["bm"] = create_block_mask(mask_fn, None, None, S, S, device=q.device.type)
            return compiled(q, k, v, block_mask=state["bm"])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        return compiled(q, k, v, score_mod=score_mod)

    return fn


def feature_points(quick: bool):
    """(name, B, H, text, F, frames, D) joint video(-text) streams."""
    if quick:
        return [("quick VATT-like", 1, 2, 1, 16, 4, 32)]
    return [("VATT-M", 8, 16, 1, 196, 8, 64), ("All-in-one-B joint", 32, 12, 40, 197, 3, 64)]


def feature_settings(frames: int):
    """(label, fastvl kwargs, (window, temporal) of the mask or None for the key bias); w in {0, 1, 2, all}."""
    out = [("key_bias", {}, None)]
    for w in (0, 1, 2):
        if w < frames:
            out.append((f"frame_window={w}", {"frame_window": w}, (w, False)))
    out.append(("all frames", {}, (-1, False)))
    out.append(("spatial_only", {"spatial_only": True}, (0, False)))
    out.append(("temporal_only", {"temporal_only": True}, (-1, True)))
    return out


def feature_cases(quick: bool = False):
    """Fwd and full (fwd + bwd) cases of every feature setting at every point; CPU timings on the CPU."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    for name, B, H, text, per_frame, frames, D in feature_points(quick):
        S = text + per_frame * frames
        base = [torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3)]
        for label, kw, mask_spec in feature_settings(frames):
            if mask_spec is None:
                bias = torch.randn(B, S, device=dev).abs().log1p()  # log(size)-like, fp32
                kw = {"key_bias": bias}
                add = bias[:, None, None, :].to(dtype)
                pairs = B * S * S
                flex = _flex(bias=bias)
            else:
                window, temporal = mask_spec
                mask = frame_mask(S, text, per_frame, window, temporal, dev)
                if label != "all frames":
                    kw = dict(kw, frame_tokens=per_frame, text_tokens=text)
                add = torch.zeros(S, S, device=dev, dtype=dtype).masked_fill(~mask, float("-inf"))
                pairs = B * int(mask.sum())

                mask_fn = frame_mask_mod(text, per_frame, window, temporal)
                flex = _flex(mask_fn=mask_fn)
            provs = {
                "eager": (
                    "bhsd",
                    lambda q, k, v, _a=add: ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + _a).softmax(-1) @ v,
                ),  # fmt: skip
                "sdpa-mask": ("bhsd", lambda q, k, v, _a=add: sdpa_masked(q, k, v, _a)),
                "fastvl": ("bshd", lambda q, k, v, _kw=kw: fastvl.ops.flash_attention(q, k, v, **_kw)),
            }
            if flex is not None:
                provs["flex"] = ("bhsd", flex)
            if dev == "cuda":
                provs["fastvl-triton"] = (
                    "bshd",
                    lambda q, k, v, _kw=kw: fastvl.ops.flash_attention(q, k, v, backend="triton", **_kw),
                )
            per_mode: dict[str, dict] = {"fwd": {}, "full": {}}
            for prov, (layout, fn) in provs.items():
                grad = not (prov == "flex" and dev == "cpu")  # FlexAttention refuses CPU inputs needing grad
                ins = [t.detach().requires_grad_(grad) for t in base]
                if layout == "bhsd":
                    ins = [t.detach().transpose(1, 2).requires_grad_(grad) for t in base]
                fwd, _bwd, full = _modes(fn, ins)
                per_mode["fwd"][prov] = fwd
                if not (prov == "flex" and dev == "cpu"):  # FlexAttention has no CPU backward
                    per_mode["full"][prov] = full
            fl = 4 * pairs * H * D
            cfg = {"shape": name, "setting": label, "B": B, "H": H, "S": S, "D": D, "frames": frames,
                   "attended_pairs": pairs, "dtype": str(dtype), "causal": False}  # fmt: skip
            nbytes = B * S * H * D * esize
            for mode, traffic, flops in (("fwd", 4, fl), ("full", 12, 7 * fl // 2)):
                yield Case("flash_attention", mode, "setting", label, per_mode[mode], dict(cfg), traffic * nbytes,
                           flops, bound="compute")  # fmt: skip


def sdpa_masked(q, k, v, mask):
    """SDPA with a materialised additive mask (it then runs its math / efficient kernels, not flash)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def rows_cases(quick: bool = False):
    """attention_rows: the CLS row's softmax over every key from the forward's LSE (SMAUG scoring) against the
    eager way, the full S x S attention map then the row; forward only (selection takes no gradient)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    B, H, S, D, R = (2, 2, 65, 32, 1) if quick else (8, 16, 1569, 64, 1)
    q, k = (torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(2))
    _, lse = fastvl.ops.flash_attention(q, k, k, return_lse=True)
    lse_rows = lse[:, :, :R].float().contiguous()
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    provs = {
        "eager": lambda: ((qh * D**-0.5) @ kh.transpose(-2, -1)).float().softmax(-1)[:, :, :R],
        "fastvl": lambda: fastvl.ops.attention_rows(q[:, :R], k, lse_rows),
    }
    cfg = {"shape": "VATT-M CLS rows" if not quick else "quick rows", "B": B, "H": H, "S": S, "D": D, "R": R,
           "dtype": str(dtype), "causal": False}  # fmt: skip
    esize = torch.finfo(dtype).bits // 8
    yield Case("attention_rows", "fwd", "S", S, provs, cfg, B * S * H * D * esize + B * H * R * S * 4,
               2 * B * H * R * S * D, covers=("attention_rows",), bound="compute")  # fmt: skip


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
            key = (c["shape"] + (f" {c['setting']}" if "setting" in c else ""), r["mode"], c["S"], c["D"], c["causal"])
            by_case.setdefault(key, {})[r["provider"]] = r
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
    p.add_argument("--features", action="store_true", help="only the key-bias / frame-window / divided cases")
    p.add_argument("--out", default=None, help="JSON rows path (default on a GPU: results/<device>/attention.json)")
    args = p.parse_args(argv)
    env = environment()
    if env["device_kind"] == "cpu":
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows = []
    todo = feature_cases(args.quick) if args.features else cases(args.quick, args.sweep)
    for case in todo:
        new = run_case(case, env, memory=not args.quick, family=FAMILY)
        rows += new
        times = ", ".join(
            f"{r['provider']} {r['median']:.3g} ms ({r['config'].get('tflops', 0):.2f} TFLOP/s)"
            for r in new
            if r["metric"] == "time_ms"
        )
        print(f"  {case.config['shape']} {case.mode} {case.x_name}={case.x_value}: {times}")
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
