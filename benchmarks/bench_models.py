"""Model training steps and sizes: AllInOne-B, VATT-MBS, MAC-B, fastvl's path against eager PyTorch.

The ``models`` family of the suite: ``fastvl bench --models allinone-b`` (any of ``MODELS``, or ``all``) is
routed to ``model_cases``; the whole suite (``fastvl bench``, ``--ops models``) runs ``DEFAULT_MODELS``.
One case = one model: op ``train_step``, x = the model that ran. One training step = forward (all the model's
losses) + backward + AdamW step, in bf16 autocast on a GPU (fp32 on the CPU). Providers share the model and
its weights:
  ``eager``   every op on its plain-PyTorch reference (``fastvl.use_backend("reference")``)
  ``fastvl``  the default dispatch (auto: fused kernels where they qualify)
There is no peer (no other library implements these models) and no ``torch.compile`` provider: compiling a
tiny model's training step took 36-77 s per model on a 2-core CPU, and the next compiled steps still took
0.3 s (allinone-tiny) and 1.8 s (mac-tiny) against 0.07-0.08 s eager, so the figure would time the compiler.
Rows: step time, peak memory, and TFLOP/s and % of the device's matmul peak from the step's FLOPs (forward +
backward counted by ``torch.utils.flop_counter`` on the meta device; the optimizer is not counted); this
script's own table adds input tokens/s. ``--sizes`` prints parameters and forward FLOPs beside the papers'
figures (``describe``). ``--quick`` runs each model's tiny config (allinone-tiny, vatt-tiny, vatt-ma-tiny,
mac-tiny) at batch 4 (a CPU smoke run: CPU timings, never GPU figures).

    python -m benchmarks.bench_models [--quick] [--sizes] [--models allinone-b,vatt-mbs,mac-b] [--out FILE]
    python -m benchmarks --models allinone-b [--quick] [suite options]     (the same cases through the suite)
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

FAMILY = "models"
OPS = ("train_step",)  # every case op (the suite skips this family for selections naming none)
# realistic per-GPU batch sizes on an 80 GB H100 in bf16 (the eager path must fit too); others: 8
GPU_BATCH = {"allinone-b": 32, "vatt-mbs": 16, "mac-b": 64}
CPU_BATCH = 4
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
MODELS = tuple(PAPER_MODELS)  # the names --models takes (the suite checks them)
DEFAULT_MODELS = ("allinone-b", "vatt-mbs", "mac-b")  # what the whole suite runs


def tiny(name: str) -> str:
    """The tiny config standing in for ``name`` in --quick runs."""
    if name.startswith("allinone-"):
        return "allinone-tiny"
    if name.startswith("vatt-ma-"):
        return "vatt-ma-tiny"
    if name.startswith("vatt-"):
        return "vatt-tiny"
    if name.startswith("mac-"):
        return "mac-tiny"
    raise ValueError(f"no tiny config for model {name!r}; models: {', '.join(MODELS)}")


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


def model_cases(names: list[str], quick: bool, batch_override: int | None = None):
    """One training-step case per model of ``names`` (``MODELS``; --quick: their tiny configs, each run once)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; models: {', '.join(MODELS)}")
    seen = set()
    for name in names:
        run_name = tiny(name) if quick else name
        if run_name in seen:
            continue
        seen.add(run_name)
        B = batch_override or (GPU_BATCH.get(name, 8) if dev == "cuda" else CPU_BATCH)
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
        flops = train_flops(run_name, B)
        yield Case("train_step", "full", "model", run_name, providers, cfg, flops=flops, bound="compute")


def cases(quick: bool = False):
    """The suite's default: a training step of each of ``DEFAULT_MODELS``."""
    return model_cases(list(DEFAULT_MODELS), quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs (CPU smoke run)")
    p.add_argument("--sizes", action="store_true", help="print parameters and FLOPs beside the papers' figures")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--out", default=None, help="JSON rows path (default: print the table only)")
    args = p.parse_args(argv)
    if args.sizes:
        for name in PAPER_MODELS:
            describe(name)
            print()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    env = environment()
    if env["device_kind"] == "cpu":
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows = []
    for case in model_cases(names, args.quick, args.batch):
        got = run_case(case, env, rounds=None, family=FAMILY)
        tokens = case.config["tokens_per_step"]
        for r in [r for r in got if r["metric"] == "time_ms"]:
            tps = tokens / (r["median"] * 1e-3)
            got.append(
                row(
                    case.op, r["provider"], "full", "tokens_per_s", "model", case.x_value, tps, case.config, env, FAMILY
                )
            )
        rows += got
        t = {r["provider"]: r for r in got if r["metric"] == "time_ms"}
        mem = {r["provider"]: r["median"] for r in got if r["metric"] == "memory_mb"}
        for prov, r in t.items():
            c = r["config"]
            util = f", {c['pct_peak_flops']:.0f}% of peak" if "pct_peak_flops" in c else ""
            ratio = f" ({t['eager']['median'] / r['median']:.2f}x eager)" if "eager" in t else ""
            print(
                f"  {case.x_value} batch {case.config['batch']} {prov}: {r['median']:.1f} ms/step{ratio}, "
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
