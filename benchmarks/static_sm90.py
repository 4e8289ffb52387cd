"""The static sm_90 report: what an H100 would run for each op at the suite's shapes, read from the compiler.

``fastvl bench --static sm90`` (``python -m benchmarks --static sm90``) runs every op's Triton host launchers
at the benchmark suite's shapes with no GPU and records each kernel launch as a CUDA device would bind it
(``benchmarks/static_capture.py``), compiles every autotune config its pruning keeps for sm_90a
(``benchmarks/static_compile.py``) and reports per kernel and config: registers, spills, shared memory, blocks
and warps per SM, grid and waves on 132 SMs, the MMA instructions and how the tiles are loaded. For the
memory-bound ops (roll, gather and its backward, DropToken / masking and their backward with positions,
LayerNorm forward and backward) it replays the op calls in the Triton interpreter at ``1/div`` of the rows on a
device with ``1/div`` of the SMs (so grids sized by the SM count keep their share of the work), counts the
bytes each launch reads and writes at distinct addresses plus the aten ops' bytes, and compares them with
the minimum (each input read once, each output written once); the same replay at twice the rows checks that
the ratio does not depend on the scale. These are compiler figures and byte counts, not timings.

Writes ``results.json`` (rows in the suite's format, ``device`` "sm_90 (static)", ``device_kind`` "static";
each row's ``figures`` hold everything, ``median`` its headline figure: registers per thread of a kernel row,
the byte ratio of a bytes row) and ``results.md`` to ``benchmarks/results/sm_90-static/`` (or ``--out``).
``python benchmarks/readme.py`` turns them into the README's static section. :func:`check` is the Hopper
readiness test (tests/test_static_sm90.py): launchable configs within shared memory and without spills,
16-bit dots on wgmma, attention and contrastive tiles loaded 16 bytes wide or asynchronously, memory-bound op
calls within 1.15x of the minimum bytes.

    fastvl bench --static sm90 [--ops attention,layer_norm] [--out DIR] [--jobs N] [--no-bytes] [--check]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

try:
    from . import common
    from .static_cases import StaticCase, cases
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]
    from static_cases import StaticCase, cases  # type: ignore[no-redef]

LABEL = "sm_90 (static)"
KIND = "static"
DIR_NAME = "sm_90-static"
TARGETS = ("sm90",)
RATIO_LIMIT = 1.15  # bytes moved / minimum bytes, per memory-bound op call
STABLE = 0.05  # largest relative change of that ratio between the two replay scales
TILE_D = (32, 64, 128)  # attention head dims whose q/k/v/dO tiles must load 16 bytes wide or asynchronously
MMA_FAMILIES = ("attention", "contrastive")
PACKAGE = __package__ or "benchmarks"


def default_out_dir() -> str:
    return os.path.join(common.results_root(), DIR_NAME)


def select(names: Iterable[str]) -> list[StaticCase]:
    """Cases whose family, op or shape label is named (all when ``names`` is empty)."""
    names = set(names)
    out = [c for c in cases() if not names or c.family in names or c.op in names or c.label in names]
    return out


# ---- capture workers (fresh processes, TRITON_INTERPRET unset) -----------------------------


def _capture(kind: str, labels: list[str], scale: int) -> list[dict[str, Any]]:
    """Run the named cases; ``launches``: full size, recorded only; ``bytes``: scaled, interpreted, counted."""
    import torch

    from . import static_capture as sc

    sc.kernel_modules()
    torch.manual_seed(0)
    out = []
    for case in [c for c in cases() if c.label in labels]:
        div = 1 if kind == "launches" else max(1, case.byte_div // scale)
        sms = sc.H100_SMS if div == 1 else max(1, round(sc.H100_SMS / div))
        cap = sc.Capture(execute=kind == "bytes")
        try:
            built = case.build(div)
            with sc.gpu_view(sms, zero_empty=kind == "launches"), sc.device_queries(sms), cap:
                for mode, fn in (("fwd", built.fwd), ("bwd", built.bwd)):
                    if fn is None:
                        continue
                    rec = sc.record_call(cap, fn)
                    out.append(
                        {
                            "case": case.label,
                            "mode": mode,
                            "div": div,
                            "sms": sms,
                            "rows": built.rows,
                            "min_bytes": built.min_bytes.get(mode),
                            "launches": rec.launches,
                            "aten_read": rec.aten_read,
                            "aten_written": rec.aten_written,
                            "aten_launches": rec.aten_launches,
                            "aten_ops": rec.aten_ops,
                        }
                    )
        except Exception as e:  # a case that cannot run is reported, the others still are
            out.append({"case": case.label, "mode": "-", "error": f"{type(e).__name__}: {str(e)[:1500]}"})
    return out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_POISON")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _worker_cmd(kind: str, labels: list[str], scale: int, path: str) -> list[str]:
    module = f"{PACKAGE}.static_sm90"
    return [sys.executable, "-m", module, "--worker", kind, "--scale", str(scale), "--cases", "|".join(labels),
            "--worker-out", path]  # fmt: skip


def _start(kind: str, labels: list[str], scale: int, tmp: str) -> tuple[subprocess.Popen, str, str]:
    path = os.path.join(tmp, f"{kind}-{scale}.pkl")
    log = os.path.join(tmp, f"{kind}-{scale}.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(_worker_cmd(kind, labels, scale, path), stdout=f, stderr=subprocess.STDOUT, env=_env())
    return proc, path, log


def _finish(proc: subprocess.Popen, path: str, log: str) -> list[dict[str, Any]]:
    rc = proc.wait()
    if rc != 0 or not os.path.exists(path):
        with open(log) as f:
            raise RuntimeError(f"static capture worker failed (exit {rc}):\n{f.read()[-4000:]}")
    with open(path, "rb") as f:
        return pickle.load(f)


# ---- the report ----------------------------------------------------------------------------


def build(selected: list[StaticCase], jobs: int = 2, measure_bytes: bool = True, say=print) -> dict[str, Any]:
    """Capture, compile and (for memory-bound cases) count bytes; returns the report's raw data."""
    from .static_compile import compile_all

    t0 = time.time()
    labels = [c.label for c in selected]
    with tempfile.TemporaryDirectory(prefix="fastvl-static-") as tmp:
        say(f"[static] capturing the launches of {len(labels)} cases at the suite's shapes")
        calls = _finish(*_start("launches", labels, 1, tmp))
        byte_labels = [c.label for c in selected if c.memory_bound]
        workers = []
        if measure_bytes and byte_labels:
            say(f"[static] replaying {len(byte_labels)} memory-bound cases in the interpreter (bytes, 2 scales)")
            workers = [_start("bytes", byte_labels, s, tmp) for s in (1, 2)]
        unique: dict[str, Any] = {}
        for c in calls:
            for ln in c.get("launches", []):
                unique.setdefault(ln.compile_key(), ln)
        say(f"[static] compiling {len(unique)} distinct launches for sm_90a in {jobs} processes")
        figures = dict(zip(unique, compile_all([ln.job() for ln in unique.values()], jobs)))
        byte_calls = [_finish(*w) for w in workers]
    say(f"[static] done in {time.time() - t0:.0f} s")
    return {"cases": selected, "calls": calls, "figures": figures, "bytes": byte_calls}


def _mma(fig: dict[str, Any]) -> str:
    if fig.get("wgmma"):
        return "wgmma " + "/".join(sorted(fig["wgmma"]))
    if fig.get("mma_sync"):
        return "mma.sync " + "/".join(sorted(fig["mma_sync"]))
    if fig.get("dots"):
        return "none (FMA)"
    return "none"


def _tiles(fig: dict[str, Any]) -> str:
    """'ld 2B x5' / 'cp.async 16B x2, ld 16B x1' / 'tma x2': how the tile loads are issued."""
    counts: dict[str, int] = {}
    for t in fig.get("tiles", []):
        key = t["how"] if t["how"] in ("tma", "unmatched") else f"{t['how']} {min(t['widths'] or [0])}B"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "-"


def rows(report: dict[str, Any], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """results.json rows: one per (case, call, kernel launch, autotune config), one per memory-bound op call."""
    from .static_compile import NUM_SMS, occupancy

    env = dict(env or common.environment())
    env.update(device=LABEL, device_kind=KIND)
    by_label = {c.label: c for c in report["cases"]}
    out: list[dict[str, Any]] = []

    def row(case: StaticCase, mode: str, metric: str, value: Any, figures: dict[str, Any]) -> dict[str, Any]:
        r = common.row(
            case.op, "fastvl-triton", mode, metric, "shape", case.shape, value, case.config, env, case.family
        )
        r["figures"] = figures
        return r

    for c in report["calls"]:
        case = by_label[c["case"]]
        if "error" in c:
            out.append(row(case, c["mode"], "static_error", None, {"error": c["error"]}))
            continue
        order = {}
        for ln in c["launches"]:
            order.setdefault(ln.call, len(order))
            fig = dict(report["figures"][ln.compile_key()])
            programs = ln.grid[0] * ln.grid[1] * ln.grid[2]
            f = {
                "kernel": ln.name,
                "module": ln.module.split(".")[-1],
                "launch": order[ln.call],
                "config": ln.config_text(),
                "autotuned": ln.config is not None,
                "n_configs": ln.n_configs,
                "grid": list(ln.grid),
                "programs": programs,
                "num_warps": ln.options.get("num_warps"),
                "num_stages": ln.options.get("num_stages"),
                **fig,
            }
            if "error" not in fig:
                occ = occupancy(fig["registers"] or 255, fig["shared"], fig["num_warps"])
                f.update(occ)
                f["waves"] = programs / (occ["blocks_per_sm"] * NUM_SMS) if occ["blocks_per_sm"] else None
                f["mma"] = _mma(fig)
                f["tile_loads"] = _tiles(fig)
            out.append(row(case, c["mode"], "static_kernel", fig.get("registers"), f))
    out += _byte_rows(report, row, by_label)
    return out


def _byte_rows(report, row, by_label) -> list[dict[str, Any]]:
    """Bytes rows: the replays at two sizes, the bytes above the minimum extrapolated to the suite's shape."""
    if not report["bytes"]:
        return []
    full = {(c["case"], c["mode"]): c for c in report["calls"] if "error" not in c}
    second = {(c["case"], c["mode"]): c for c in report["bytes"][1]}
    out = []
    for c in report["bytes"][0]:
        case = by_label[c["case"]]
        o = second.get((c["case"], c["mode"]))
        bad = next((x for x in (c, o) if x is None or "error" in x), False)
        if bad is not False:
            out.append(row(case, c["mode"], "static_error", None, {"error": (bad or {}).get("error", "no replay")}))
            continue
        f = _extrapolate(_bytes(c), _bytes(o), full[(c["case"], c["mode"])])
        out.append(row(case, c["mode"], "static_bytes", f["ratio"], f))
    return out


def _bytes(c: dict[str, Any]) -> dict[str, Any]:
    """One replayed call: unique and issued bytes (Triton launches + aten ops), launches, the minimum."""
    run = [ln for ln in c["launches"] if ln.executed]
    aten = c["aten_read"] + c["aten_written"]
    triton = len({ln.call for ln in c["launches"]})
    return {
        "rows": c["rows"],
        "div": c["div"],
        "sms": c["sms"],
        "bytes": sum(ln.bytes_unique for ln in run) + aten,
        "issued": sum(ln.bytes_issued for ln in run) + aten,
        "min_bytes": c["min_bytes"],
        "launches": triton + c["aten_launches"],
        "triton_launches": triton,
        "per_kernel": {ln.name: ln.bytes_unique for ln in run},
        "aten_bytes": aten,
        "aten_ops": c["aten_ops"],
    }


def _extrapolate(a: dict[str, Any], b: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Bytes above the minimum are affine in the rows (per-row work plus shared tensors); fit them on the two
    replays and add them to the minimum at the suite's shape."""
    ea, eb = a["bytes"] - a["min_bytes"], b["bytes"] - b["min_bytes"]
    ia, ib = a["issued"] - a["min_bytes"], b["issued"] - b["min_bytes"]
    rows = full["rows"]
    if b["rows"] != a["rows"]:
        t = (rows - b["rows"]) / (b["rows"] - a["rows"])
        excess, issued = eb + (eb - ea) * t, ib + (ib - ia) * t
    else:
        excess, issued = eb * rows / b["rows"], ib * rows / b["rows"]
    m = full["min_bytes"]
    return {
        "ratio": (m + excess) / m,
        "issued_ratio": (m + issued) / m,
        "bytes": round(m + excess),
        "min_bytes": m,
        "rows": rows,
        "launches": b["launches"],
        "triton_launches": b["triton_launches"],
        "per_kernel": b["per_kernel"],
        "aten_ops": b["aten_ops"],
        "replays": [{k: v for k, v in x.items() if k not in ("per_kernel", "aten_ops")} for x in (a, b)],
    }


# ---- the Hopper readiness checks -----------------------------------------------------------


def _what(r: dict[str, Any]) -> str:
    f = r["figures"]
    config = f"[{f['config']}]" if f.get("config") else ""
    return " ".join(x for x in (r["op"], str(r["x_value"]), r["mode"], f.get("kernel", ""), config) if x)


def check(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Failures per check (an empty list passes): 'capture', 'resources', 'wgmma', 'tile loads', 'bytes'."""
    out: dict[str, list[str]] = {"capture": [], "resources": [], "wgmma": [], "tile loads": [], "bytes": []}
    for r in rows:
        f = r["figures"]
        if r["metric"] == "static_error" or "error" in f:
            out["capture"].append(f"{_what(r)}: {f['error'].splitlines()[0][:300]}")
            continue
        if r["metric"] == "static_bytes":
            if f["ratio"] > RATIO_LIMIT:
                out["bytes"].append(f"{_what(r)}: {f['ratio']:.2f}x the minimum bytes ({_bytes_text(f)})")
            elif f["ratio"] < 1 - 0.02:
                out["bytes"].append(f"{_what(r)}: {f['ratio']:.2f}x: fewer bytes than the minimum, the count or the "
                                    f"minimum is wrong ({_bytes_text(f)})")  # fmt: skip
            continue
        if r["metric"] != "static_kernel":
            continue
        spills = (f["spill_stores"] or 0) + (f["spill_loads"] or 0)
        if f["shared"] > 227 * 1024:
            out["resources"].append(f"{_what(r)}: {f['shared'] / 1024:.1f} KB shared memory > 227 KB")
        if spills or f["registers"] is None:
            out["resources"].append(
                f"{_what(r)}: spills {f['spill_stores']} B stores / {f['spill_loads']} B loads ({f['registers']} regs)"
            )
        if r["family"] in MMA_FAMILIES:
            dots16 = {k: n for k, n in f["dots"].items() if k.split(":")[1] in ("bf16", "f16")}
            mma16 = {k: n for k, n in f["mma_sync"].items() if k in ("bf16", "f16")}
            plain = {k: n for k, n in dots16.items() if not k.startswith("wgmma")}
            if dots16 and (plain or mma16 or not f["wgmma"]):
                out["wgmma"].append(f"{_what(r)}: 16-bit dots {dots16} lower to {_mma(f)}")
            need = r["family"] == "contrastive" or r["config"].get("D") in TILE_D
            bad = [t for t in f["tiles"] if need and not _tile_ok(t)]
            if bad:
                desc = ", ".join(f"{t['shape']} {t['dtype']} at {t['line']}: {_how(t)}" for t in bad)
                out["tile loads"].append(f"{_what(r)}: {desc}")
    return out


def _tile_ok(t: dict[str, Any]) -> bool:
    return t["how"] in ("tma", "cp.async") or (t["how"] == "ld" and min(t["widths"] or [0]) >= 16)


def _how(t: dict[str, Any]) -> str:
    if t["how"] == "unmatched":
        return "no PTX instruction found for it"
    return t["how"] + (f" {min(t['widths'])}-byte" if t["widths"] else "")


def _bytes_text(f: dict[str, Any]) -> str:
    a, b = f["replays"]
    return (
        f"{f['bytes'] / 1e6:.1f} MB vs {f['min_bytes'] / 1e6:.1f} MB at {f['rows']} rows, {f['launches']} launches "
        f"({f['triton_launches']} Triton); replays at {a['rows']} / {b['rows']} rows: "
        f"{a['bytes'] / a['min_bytes']:.2f}x / {b['bytes'] / b['min_bytes']:.2f}x; per kernel {_mb(f['per_kernel'])}, "
        f"aten ops {f['aten_ops']}"
    )


def _mb(d: dict[str, int]) -> str:
    return "{" + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in d.items()) + "}"


# ---- Markdown ------------------------------------------------------------------------------


def _kb(b: int) -> str:
    return f"{b / 1024:.1f}"


def kernel_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| op | shape | mode | kernel | config | grid | waves | regs | spills (B) | smem KB | blocks/SM | warps/SM "
        "| MMA | tile loads | ld.global widths (B: count) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["figures"]
        if r["metric"] != "static_kernel":
            continue
        if "error" in f:
            lines.append(f"| {r['op']} | {r['x_value']} | {r['mode']} | {f['kernel']} | {f['config']} | | | | | | | | "
                         f"| compile error: {f['error'].splitlines()[0][:120]} | |")  # fmt: skip
            continue
        waves = "" if f["waves"] is None else f"{f['waves']:.2f}"
        ld = " ".join(f"{k}:{v}" for k, v in f["ld_global"].items())
        lines.append(
            f"| {r['op']} | {r['x_value']} | {r['mode']} | {f['kernel']} | {f['config']} | "
            f"{'x'.join(map(str, f['grid']))} | {waves} | {f['registers']} | {f['spill_stores']}/{f['spill_loads']} | "
            f"{_kb(f['shared'])} | {f['blocks_per_sm']} ({f['limit']}) | {f['warps_per_sm']} | {f['mma']} | "
            f"{f['tile_loads']} | {ld} |"
        )
    return "\n".join(lines)


def bytes_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| op | shape | mode | bytes / minimum | MB (minimum) | launches (Triton + aten) | replays: rows -> ratio "
        "| issued / minimum | per kernel at the larger replay (MB) | aten ops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["metric"] != "static_bytes":
            continue
        f = r["figures"]
        reps = ", ".join(f"{x['rows']} -> {x['bytes'] / x['min_bytes']:.3f}" for x in f["replays"])
        per = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in f["per_kernel"].items())
        aten = ", ".join(f"{k} x{n}" for k, n in f["aten_ops"].items()) or "-"
        lines.append(
            f"| {r['op']} | {r['x_value']} | {r['mode']} | **{f['ratio']:.2f}x** | {f['bytes'] / 1e6:.1f} "
            f"({f['min_bytes'] / 1e6:.1f}) | {f['launches']} ({f['triton_launches']} + "
            f"{f['launches'] - f['triton_launches']}) | {reps} | {f['issued_ratio']:.2f}x | {per} | {aten} |"
        )
    return "\n".join(lines)


def readiness_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of the readiness shapes, the other rows): the cases marked ``acceptance`` are what
    tests/test_static_sm90.py checks; the others are reported with the same checks, outside the test."""
    labels = {c.label for c in cases() if c.acceptance}
    mine = [r for r in rows if f"{r['op']} {r['x_value']}" in labels]
    return mine, [r for r in rows if f"{r['op']} {r['x_value']}" not in labels]


def failures_text(failures: dict[str, list[str]], title: str = "Hopper readiness checks") -> list[str]:
    n = sum(len(v) for v in failures.values())
    out = [f"**{title}: {'all pass' if n == 0 else f'{n} failures'}.**", ""]
    for name, items in failures.items():
        out.append(f"- {name}: " + ("pass" if not items else f"{len(items)} failing"))
        out += [f"  - {i}" for i in items]
    return out


def results_markdown(rows: list[dict[str, Any]]) -> str:
    from .static_compile import NUM_SMS

    env = rows[0] if rows else {}
    out = [
        f"# fastvl static report: {LABEL}",
        "",
        "**Compiler figures and byte counts, not timings.** No GPU ran: every op's Triton launchers ran at the "
        "benchmark suite's shapes with launches bound as a CUDA device binds them, and every autotune config "
        f"was compiled for sm_90a. Occupancy is per SM (65536 registers, 228 KB shared memory, 64 warps); waves on "
        f"{NUM_SMS} SMs. Bytes: distinct addresses each launch reads and writes (interpreter replay) plus aten ops, "
        "against each input read once and each output written once. Method: benchmarks/static_sm90.py.",
        "",
        f"- torch {env.get('torch')}, triton {env.get('triton')}, fastvl commit {env.get('commit')}, "
        f"generated {env.get('timestamp')}",
        "",
    ]
    ready, other = readiness_rows(rows)
    out += failures_text(check(ready), "Hopper readiness checks (the test's shapes, tests/test_static_sm90.py)")
    out += [""]
    if other:
        out += failures_text(check(other), "The same checks on the other cases (not part of the test)") + [""]
    for fam in sorted({r["family"] for r in rows}):
        rs = [r for r in rows if r["family"] == fam]
        out += [f"## {fam}", ""]
        if any(r["metric"] == "static_bytes" for r in rs):
            out += ["Bytes per op call:", "", bytes_table(rs), ""]
        out += ["Kernels (every autotune config that can be launched):", "", kernel_table(rs), ""]
    return "\n".join(out).rstrip() + "\n"


# ---- command line --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``fastvl bench --static sm90``: build the report, write results.json / results.md, print the checks."""
    if args.static not in TARGETS:
        print(f"[bench] --static: unknown target {args.static!r}; known: {', '.join(TARGETS)}")
        return 2
    names = [s.strip() for s in (args.ops or "").split(",") if s.strip()]
    selected = select(names)
    if not selected:
        known = sorted({c.family for c in cases()} | {c.op for c in cases()})
        print(f"[bench] --ops {args.ops}: no static case; families and ops: {', '.join(known)}")
        return 2
    if args.list:
        for c in selected:
            print(f"{c.family}: {c.label} {common.config_text(c.config)}" + (" (bytes)" if c.memory_bound else ""))
        return 0
    report = build(selected, jobs=args.jobs or 2, measure_bytes=not args.no_bytes)
    rs = rows(report)
    out_dir = os.path.abspath(args.out or default_out_dir())
    os.makedirs(out_dir, exist_ok=True)
    common.write_rows(rs, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(rs))
    ready, other = readiness_rows(rs)
    failures = check(ready)
    print("\n".join(failures_text(failures)))
    if other:
        print("\n".join(failures_text(check(other), "The same checks on the other cases (not part of the test)")))
    print(f"[static] wrote {len(rs)} rows to {out_dir} (results.json, results.md)")
    return 1 if args.check and any(failures.values()) else 0


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=("launches", "bytes"))
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--cases", required=True)
    p.add_argument("--worker-out", required=True)
    a = p.parse_args(argv)
    res = _capture(a.worker, a.cases.split("|"), a.scale)
    with open(a.worker_out, "wb") as f:
        pickle.dump(res, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return _worker_main(argv)
    from .suite import build_parser

    args = build_parser().parse_args(argv)
    if args.static is None:
        args.static = "sm90"
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
