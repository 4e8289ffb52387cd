"""Model training steps and sizes: AllInOne-B, VATT-MBS, MAC-B, fastvl's path against eager PyTorch.

One training step = forward (all the model's losses) + backward + AdamW step, in bf16 autocast on a GPU
(fp32 on the CPU). Providers share the model and its weights:
  ``eager``   every op on its plain-PyTorch reference (``fastvl.use_backend("reference")``)
  ``fastvl``  the default dispatch (auto: fused kernels where they qualify)
Rows: step time, peak memory, input tokens/s, and TFLOP/s and % of the device's peak from the step's
FLOPs (forward + backward counted by ``torch.utils.flop_counter`` on the meta device; the optimizer is not
counted). ``--sizes`` prints parameters and forward FLOPs beside the papers' figures (``describe``).
``--quick`` runs the tiny configs (a CPU smoke run: CPU timings, never GPU figures).

    python -m benchmarks.bench_models [--quick] [--sizes] [--models allinone-b,vatt-mbs,mac-b] [--out FILE]
"""

from __future__ import annotations

import argparse
import os

import torch

import fastvl
from fastvl.models import create_model, describe, example_batch
from fastvl.models.flops import count

try:
    from .common import Case, environment, markdown_table, row, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, environment, markdown_table, row, run_case, write_rows

# realistic per-GPU batch sizes on an 80 GB H100 in bf16 (the eager path must fit too)
GPU_BATCH = {"allinone-b": 32, "vatt-mbs": 16, "mac-b": 64}
TINY = {"allinone-b": "allinone-tiny", "vatt-mbs": "vatt-tiny", "mac-b": "mac-tiny"}
PAPER_MODELS = [
    "allinone-ti",
    "allinone-s",
    "allinone-b",
    "vatt-bbs",
    "vatt-mbs",
    "vatt-lbs",
    "vatt-ma-medium",
    "mac-b",
]


def input_tokens(model, batch) -> int:
    """Input tokens per step before any dropping: video patches + text tokens (+ audio patches)."""
    cfg = model.config
    B, T = batch["video"].shape[:2]
    Lt = batch["text_ids"].shape[-1]
    if hasattr(cfg, "audio_patch"):
        video = (T // cfg.patch_t) * (cfg.img_size // cfg.patch_s) ** 2
        return B * (video + batch["audio"].shape[1] // cfg.audio_patch + Lt)
    per_frame = (cfg.img_size // cfg.patch_size) ** 2
    if type(model).__name__ == "AllInOne":
        return B * T * (Lt + 1 + per_frame)  # the fused [text; video] stream per frame
    return B * (T * per_frame + Lt)


def train_flops(name: str, batch_size: int) -> int:
    """Forward + backward FLOPs of one step at ``batch_size`` (meta device)."""
    with torch.device("meta"):
        m = create_model(name)
    m.train()
    b = example_batch(m, batch_size)
    return count(lambda: m(b)["loss"].backward()).total


def step_fn(model, batch, optimizer, backend: str, autocast: bool):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with fastvl.use_backend(backend):
            if autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(batch)["loss"]
            else:
                loss = model(batch)["loss"]
            loss.backward()
        optimizer.step()

    return step


def cases(names: list[str], quick: bool, batch_override: int | None):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name in names:
        run_name = TINY[name] if quick else name
        B = batch_override or (GPU_BATCH.get(name, 8) if dev == "cuda" else 4)
        torch.manual_seed(0)
        model = create_model(run_name).to(dev).train()
        batch = example_batch(model, B, device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if dev == "cuda" else {}))
        autocast = dev == "cuda"
        providers = {
            p: step_fn(model, batch, opt, b, autocast) for p, b in (("eager", "reference"), ("fastvl", "auto"))
        }
        cfg = {
            "model": run_name,
            "batch": B,
            "dtype": "bf16 autocast" if autocast else "fp32",
            "tokens_per_step": input_tokens(model, batch),
            "optimizer": "AdamW",
        }
        yield Case(run_name, "full", "batch", B, providers, cfg, flops=train_flops(run_name, B))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs (CPU smoke run)")
    p.add_argument("--sizes", action="store_true", help="print parameters and FLOPs beside the papers' figures")
    p.add_argument("--models", default="allinone-b,vatt-mbs,mac-b", help="comma-separated: allinone-b,vatt-mbs,mac-b")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--out", default=None, help="JSON rows path (default: print the table only)")
    args = p.parse_args(argv)
    if args.sizes:
        for name in PAPER_MODELS:
            describe(name)
            print()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in TINY]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(TINY)}")
    env = environment()
    if env["device_kind"] == "cpu":
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows = []
    for case in cases(names, args.quick, args.batch):
        got = run_case(case, env, rounds=None)
        tokens = case.config["tokens_per_step"]
        for r in [r for r in got if r["metric"] == "time_ms"]:
            tps = tokens / (r["median"] * 1e-3)
            got.append(
                row(case.op, r["provider"], "full", "tokens_per_s", "batch", case.x_value, tps, case.config, env)
            )
        rows += got
        t = {r["provider"]: r for r in got if r["metric"] == "time_ms"}
        mem = {r["provider"]: r["median"] for r in got if r["metric"] == "memory_mb"}
        for prov, r in t.items():
            c = r["config"]
            util = f", {c['pct_peak_flops']:.0f}% of peak" if "pct_peak_flops" in c else ""
            ratio = f" ({t['eager']['median'] / r['median']:.2f}x eager)" if "eager" in t else ""
            print(
                f"  {case.op} batch {case.x_value} {prov}: {r['median']:.1f} ms/step{ratio}, "
                f"{tokens / (r['median'] * 1e-3):,.0f} tokens/s, {c.get('tflops', 0):.3g} TFLOP/s{util}, "
                f"peak memory {mem.get(prov, float('nan')):.0f} MB"
            )
    print(markdown_table(rows))
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
