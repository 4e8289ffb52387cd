"""Token reduction in the models (ToMe merging, SMAUG selection): FLOPs, step time and peak memory per setting.

The ``tokred`` family of the suite. One case = one model at one setting (``none`` = unreduced, then
``fastvl.models.reduction_presets(name)``: ``merge_r=...`` per block, ``select_keep=0.5`` before block 4, with
``select_frames=2``): op ``train_step``, x = ``"<model> <setting>"``. One training step = forward (all the model's
losses) + backward + AdamW step (bf16 autocast on a GPU, fp32 on the CPU). Providers share the model and weights:
  ``eager``   every op on its plain-PyTorch reference (``fastvl.use_backend("reference")``)
  ``fastvl``  the default dispatch (auto: fused kernels where they qualify)
No peer and no ``torch.compile`` provider, as in ``bench_models.py`` (no other library implements these models).
Each row's config carries the setting's training-forward FLOPs per sample (``fastvl.models.train_forward_flops``,
the convention of ``fastvl.models.flops``) and their ratio to the unreduced model; this script's table prints FLOPs,
step time and peak memory of each setting relative to ``none``.

Models (``REDUCED_MODELS``, all of them the suite's default): ``allinone-b``, ``vatt-mbs``, ``mac-b``; ``--quick`` runs
their tiny configs (allinone-tiny, vatt-tiny, mac-tiny) at batch 4: on a CPU these are CPU timings, never GPU figures.

    python -m benchmarks.bench_tokred [--quick] [--models allinone-b,vatt-mbs,mac-b] [--settings none,merge_r=8]
                                      [--batch N] [--rounds N] [--fastvl-only] [--out FILE]
    python -m benchmarks --ops tokred [--quick]     (the same cases through the suite)
"""

from __future__ import annotations

import argparse
import os

import torch

import fastvl
from fastvl.models import create_model, example_batch, reduction_presets, train_forward_flops
from fastvl.models.flops import count

try:
    from .common import Case, environment, markdown_table, run_case, write_rows
except ImportError:  # run as a script
    from common import Case, environment, markdown_table, run_case, write_rows

FAMILY = "tokred"
OPS = ("train_step",)
# the suite routes --models to families exposing MODELS / model_cases (bench_models.py); this one takes its own
REDUCED_MODELS = ("allinone-b", "vatt-mbs", "mac-b")
TINY = {"allinone-b": "allinone-tiny", "vatt-mbs": "vatt-tiny", "mac-b": "mac-tiny"}
GPU_BATCH = {"allinone-b": 32, "vatt-mbs": 16, "mac-b": 64}
CPU_BATCH = 4


def settings(name: str) -> dict[str, dict]:
    """``none`` then the model's reduction presets: label -> config overrides."""
    return {"none": {}, **reduction_presets(name)}


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


def train_step_flops(name: str, batch_size: int, overrides: dict) -> int:
    """Forward + backward FLOPs of one step at ``batch_size`` (meta device)."""
    with torch.device("meta"):
        m = create_model(name, **overrides)
    m.train()
    b = example_batch(m, batch_size)
    return count(lambda: m(b)["loss"].backward()).total


def setting_cases(names: list[str], quick: bool, batch_override: int | None = None, only: list[str] | None = None):
    """One training-step case per model of ``names`` and setting (``only``: these setting labels)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    unknown = [n for n in names if n not in REDUCED_MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; models: {', '.join(REDUCED_MODELS)}")
    for name in names:
        run_name = TINY[name] if quick else name
        B = batch_override or (GPU_BATCH[name] if dev == "cuda" else CPU_BATCH)
        base = train_forward_flops(run_name).total
        for label, overrides in settings(run_name).items():
            if only and label not in only:
                continue
            torch.manual_seed(0)
            model = create_model(run_name, **overrides).to(dev).train()
            batch = example_batch(model, B, device=dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if dev == "cuda" else {}))
            autocast = dev == "cuda"
            providers = {
                p: step_fn(model, batch, opt, b, autocast) for p, b in (("eager", "reference"), ("fastvl", "auto"))
            }
            fwd = train_forward_flops(run_name, **overrides).total
            cfg = {
                "model": run_name,
                "setting": label,
                "batch": B,
                "dtype": "bf16 autocast" if autocast else "fp32",
                "fwd_gflops_per_sample": fwd / 1e9,
                "fwd_vs_none": fwd / base,
                "optimizer": "AdamW",
            }
            flops = train_step_flops(run_name, B, overrides)
            yield Case("train_step", "full", "setting", f"{run_name} {label}", providers, cfg, flops=flops,
                       bound="compute")  # fmt: skip


def cases(quick: bool = False):
    """The suite's default: every setting of each of ``REDUCED_MODELS``."""
    return setting_cases(list(REDUCED_MODELS), quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs (CPU smoke run)")
    p.add_argument(
        "--models", default=",".join(REDUCED_MODELS), help=f"comma-separated, of: {', '.join(REDUCED_MODELS)}"
    )
    p.add_argument("--settings", default=None, help="comma-separated setting labels (default: all)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per provider (default: the suite's rule)")
    p.add_argument("--fastvl-only", action="store_true", help="skip the eager provider (long CPU runs)")
    p.add_argument("--out", default=None, help="JSON rows path (default: print the tables only)")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in REDUCED_MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(REDUCED_MODELS)}")
    only = [s for s in args.settings.split(",") if s] if args.settings else None
    env = environment()
    cpu = env["device_kind"] == "cpu"
    if cpu:
        print(f"CPU run on {env['device']}: these are CPU timings, not GPU figures")
    rows, table = [], []
    for case in setting_cases(names, args.quick, args.batch, only):
        got = run_case(case, env, rounds=args.rounds, family=FAMILY, skip=("eager",) if args.fastvl_only else ())
        rows += got
        t = {r["provider"]: r["median"] for r in got if r["metric"] == "time_ms"}
        mem = {r["provider"]: r["median"] for r in got if r["metric"] == "memory_mb"}
        table.append((case.config, t, mem))
    for model in dict.fromkeys(c["model"] for c, _, _ in table):
        part = [x for x in table if x[0]["model"] == model]
        ref = next((x for x in part if x[0]["setting"] == "none"), None)
        print(f"\n{model}, batch {part[0][0]['batch']}, {part[0][0]['dtype']} (fastvl provider; eager in brackets)")
        print(f"  {'setting':<34} | {'fwd GFLOPs/sample':<22} | {'step ms':<22} | peak MB")
        for cfg, t, mem in part:

            def rel(v, r):
                return f" ({v / r:.2f}x)" if r and v == v else ""

            ft, fm = t.get("fastvl", float("nan")), mem.get("fastvl", float("nan"))
            rt = ref[1].get("fastvl") if ref else None
            rm = ref[2].get("fastvl") if ref else None
            fl = f"{cfg['fwd_gflops_per_sample']:.4g} ({cfg['fwd_vs_none']:.2f}x)"
            st = f"{ft:.1f}{rel(ft, rt)} [{t.get('eager', float('nan')):.1f}]"
            print(f"  {cfg['setting']:<34} | {fl:<22} | {st:<22} | {fm:.0f}{rel(fm, rm)}")
    print()
    print(markdown_table(rows))
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
