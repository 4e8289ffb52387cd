"""Regenerate README.md's performance sections from the committed results.

Reads ``benchmarks/results/<device>/results.json`` (GPU rows only: CPU rows, and the git-ignored
``local-*`` CPU runs, are never shown) and writes, between ``<!-- perf:start -->`` and
``<!-- perf:end -->``, one table per device and provenance (torch, triton, fastvl commit) with each fastvl
figure next to eager PyTorch and the best peer, plus the list of cases where fastvl is slower. From
``benchmarks/results/sm_90-static/results.json`` (``fastvl bench --static sm90``) it writes, between
``<!-- perf-static:start -->`` and ``<!-- perf-static:end -->``, the static sm_90 summary: the Hopper
readiness checks, each kernel launch with its configs' registers, spills, shared memory, occupancy, waves,
MMA and tile loads, and the bytes of each memory-bound op call against the minimum (a README without these
markers keeps no static section).

    python benchmarks/readme.py            # rewrite the section
    python benchmarks/readme.py --check    # exit 1 when a section is stale (run by tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

try:
    from . import common, static_sm90
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]
    import static_sm90  # type: ignore[no-redef]

START = "<!-- perf:start -->"
END = "<!-- perf:end -->"
STATIC_START = "<!-- perf-static:start -->"
STATIC_END = "<!-- perf-static:end -->"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_README = os.path.join(HERE, "..", "README.md")
DEFAULT_RESULTS = os.path.join(HERE, "results")


def result_files(root: str) -> list[str]:
    """``<root>/<device>/results.json`` of every committed device directory (``local-*`` excluded)."""
    return sorted(
        p
        for p in glob.glob(os.path.join(root, "*", "results.json"))
        if not os.path.basename(os.path.dirname(p)).startswith("local-")
    )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def render(root: str, base: str) -> str:
    """The section's Markdown (without the markers); paths are written relative to ``base``."""
    blocks: list[str] = []
    skipped = 0
    for path in result_files(root):
        rows = common.read_rows(path)
        gpu = [r for r in rows if r.get("device_kind") == "cuda"]
        skipped += sum(r.get("device_kind") == "cpu" for r in rows)
        if not gpu:
            continue
        d = os.path.dirname(path)
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        lim_path = os.path.join(d, "limits.json")
        lim = {}
        if os.path.exists(lim_path):
            with open(lim_path) as f:
                lim = json.load(f)
        for dev in sorted({r["device"] for r in gpu}):
            blocks.append(f"### {dev}")
            blocks.append("")
            note = f"From `{rel}`."
            if lim.get("source") == "measured":
                note += (
                    f" Measured limits: copy bandwidth {lim['bandwidth_gbps']:.4g} GB/s, {lim.get('matmul_dtype', '')} "
                    f"matmul {lim['matmul_tflops']:.4g} TFLOP/s (torch {lim.get('torch')}, commit {lim.get('commit')})."
                )
            else:
                note += " No measured limits committed: % figures use nominal device peaks where marked."
            blocks += [note, ""]
            drows = [r for r in gpu if r["device"] == dev]
            for prov in sorted({(r["torch"], r["triton"], r["commit"]) for r in drows}):
                prows = [r for r in drows if (r["torch"], r["triton"], r["commit"]) == prov]
                stamps = sorted({r["timestamp"] for r in prows})
                when = stamps[0][:10] + (f" to {stamps[-1][:10]}" if stamps[-1][:10] != stamps[0][:10] else "")
                blocks += [f"torch {prov[0]}, triton {prov[1]}, fastvl commit `{prov[2]}`, measured {when}:", ""]
                for fam in sorted({r.get("family", "") for r in prows}):
                    frows = [r for r in prows if r.get("family", "") == fam]
                    blocks += [f"**{fam or 'other'}**", "", common.summary_table(frows), ""]
                    png = os.path.join(d, f"{fam}.png")
                    if fam and os.path.exists(png):
                        blocks += [f"![{fam} on {dev}]({os.path.relpath(png, base).replace(os.sep, '/')})", ""]
                slower = [
                    s
                    for s in common.summarize(prows)
                    if (s["vs_eager"] is not None and s["vs_eager"] < 1)
                    or (s["vs_best_peer"] is not None and s["vs_best_peer"] < 1)
                ]
                if slower:
                    blocks += ["Cases where fastvl is slower than eager or the best peer:", ""]
                    for s in slower:
                        blocks.append(
                            f"- {s['op']} {s['mode']} {s['x_name']}={s['x_value']} "
                            f"({common.config_text(s['config'])}), {s['provider']} {_fmt(s['time_ms'])} ms: "
                            f"eager {_fmt(s['eager_ms'])} ms ({_fmt(s['vs_eager'])}x), best peer {s['best_peer']} "
                            f"{_fmt(s['best_peer_ms'])} ms ({_fmt(s['vs_best_peer'])}x)"
                        )
                    blocks.append("")
    rel_root = os.path.relpath(root, base).replace(os.sep, "/")
    if not blocks:
        return (
            "No GPU results are committed yet, so there is no performance table. `fastvl bench` on a GPU writes "
            f"`{rel_root}/<device>/` (results.json, results.md, plots); commit that directory and run "
            "`python benchmarks/readme.py` to generate this section from it. CPU runs go to git-ignored "
            "`local-*` directories and are never shown here."
        )
    head = [
        f"Generated by `python benchmarks/readme.py` from the GPU results committed in `{rel_root}/` "
        "(do not edit by hand). Ratios are the other provider's median time over fastvl's (> 1: fastvl is "
        "faster); the best peer is the fastest provider that is neither eager PyTorch nor fastvl "
        "(torch.compile of the eager code, SDPA, flash-attn, ...); % of limit is of the measured copy bandwidth "
        "for memory-bound ops and of the bf16 matmul peak for compute-bound ones.",
        "",
    ]
    if skipped:
        head += [f"({skipped} CPU rows in those files are not shown.)", ""]
    return "\n".join(head + blocks).rstrip()


def update(text: str, section: str, start: str = START, end: str = END) -> str:
    """``text`` with the part between the markers replaced by ``section``."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README has no {start} ... {end} markers")
    return text[: i + len(start)] + "\n" + section + "\n" + text[j:]


def _span(values: list) -> str:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return ""
    fmt = (lambda v: f"{v:.2g}") if isinstance(vals[0], float) else str
    return fmt(vals[0]) if vals[0] == vals[-1] else f"{fmt(vals[0])}-{fmt(vals[-1])}"


def _counts(fails: dict[str, list[str]]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in fails.items() if v)


def render_static(root: str, base: str) -> str:
    """The static sm_90 section (without the markers) from ``<root>/sm_90-static/results.json``."""
    path = os.path.join(root, static_sm90.DIR_NAME, "results.json")
    rel_root = os.path.relpath(root, base).replace(os.sep, "/")
    if not os.path.exists(path):
        return (
            f"No static report is committed yet: `fastvl bench --static sm90` writes `{rel_root}/"
            f"{static_sm90.DIR_NAME}/`; commit it and run `python benchmarks/readme.py`."
        )
    rows = common.read_rows(path)
    rel = os.path.relpath(path, base).replace(os.sep, "/")
    md = rel[: -len("results.json")] + "results.md"
    env = rows[0] if rows else {}
    ready, other = static_sm90.readiness_rows(rows)
    fails = static_sm90.check(ready)
    n = sum(len(v) for v in fails.values())
    others = static_sm90.check(other)
    n_other = sum(len(v) for v in others.values())
    out = [
        f"Generated by `python benchmarks/readme.py` from `{rel}` (`fastvl bench --static sm90`; do not edit by "
        "hand). No GPU ran: each op ran at the benchmark suite's shapes with its launches bound as on a CUDA "
        "device, every autotune config was compiled for sm_90a, and the memory-bound op calls were replayed in "
        "the Triton interpreter to count bytes. These are compiler figures and byte counts, never timings. "
        f"torch {env.get('torch')}, triton {env.get('triton')}, fastvl commit `{env.get('commit')}`, "
        f"generated {str(env.get('timestamp'))[:10]}. Every config and instruction count: [{md}]({md}).",
        "",
        "**Hopper readiness checks** (`tests/test_static_sm90.py`): "
        + ("all pass." if n == 0 else f"{n} failures (" + ", ".join(f"{k} {len(v)}" for k, v in fails.items()) + ").")
        + (
            ""
            if not other
            else " The same checks on the other cases (not part of the test): "
            + ("all pass." if n_other == 0 else f"{n_other} failures (" + _counts(others) + ").")
        ),
        "",
        "| op | shape | mode | kernel | configs | regs | configs spilling | smem KB | blocks/SM | waves | MMA "
        "| tile loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["metric"] == "static_kernel":
            f = r["figures"]
            groups.setdefault((r["family"], r["op"], r["x_value"], r["mode"], f["launch"], f["kernel"]), []).append(r)
    for (_fam, op, shape, mode, _launch, kernel), rs in groups.items():
        figs = [r["figures"] for r in rs if "error" not in r["figures"]]
        errors = len(rs) - len(figs)
        spilling = sum(1 for f in figs if (f["spill_stores"] or 0) + (f["spill_loads"] or 0))
        smem = max((f["shared"] for f in figs), default=0) / 1024
        mma = " / ".join(sorted({f["mma"] for f in figs}))
        tiles = " / ".join(sorted({f["tile_loads"] for f in figs}))
        out.append(
            f"| {op} | {shape} | {mode} | {kernel} | {len(rs)}"
            + (f" ({errors} fail to compile)" if errors else "")
            + f" | {_span([f['registers'] for f in figs])} | {spilling} | {smem:.0f} "
            f"| {_span([f['blocks_per_sm'] for f in figs])} | {_span([f['waves'] for f in figs])} | {mma} | {tiles} |"
        )
    byte_rows = [r for r in rows if r["metric"] == "static_bytes"]
    if byte_rows:
        out += [
            "",
            "Memory-bound op calls: bytes read + written against the minimum (each input read once, each output "
            "written once) at the suite's shape, and kernel launches per call (Triton + aten):",
            "",
            "| op | shape | mode | bytes / minimum | MB (minimum) | launches |",
            "|---|---|---|---|---|---|",
        ]
        for r in byte_rows:
            f = r["figures"]
            out.append(
                f"| {r['op']} | {r['x_value']} | {r['mode']} | {f['ratio']:.2f}x | {f['bytes'] / 1e6:.1f} "
                f"({f['min_bytes'] / 1e6:.1f}) | {f['launches']} ({f['triton_launches']} + "
                f"{f['launches'] - f['triton_launches']}) |"
            )
    return "\n".join(out)


def regenerate(text: str, root: str, base: str) -> str:
    """``text`` with its performance section (and static section, when it has the markers) regenerated."""
    text = update(text, render(root, base))
    if STATIC_START in text:
        text = update(text, render_static(root, base), STATIC_START, STATIC_END)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=DEFAULT_README)
    p.add_argument("--results", default=DEFAULT_RESULTS, help="the results root (one directory per device)")
    p.add_argument("--check", action="store_true", help="exit 1 if the README's section is not up to date")
    args = p.parse_args(argv)
    readme = os.path.abspath(args.readme)
    with open(readme) as f:
        text = f.read()
    new = regenerate(text, os.path.abspath(args.results), os.path.dirname(readme))
    if args.check:
        if new != text:
            print(f"{readme}: a performance section is stale: run python benchmarks/readme.py", file=sys.stderr)
            return 1
        print(f"{readme}: the performance sections are up to date")
        return 0
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
        print(f"{readme}: performance sections regenerated")
    else:
        print(f"{readme}: performance sections already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
