"""The benchmark suite: discover the family modules, select, measure, write JSON / Markdown / plots.

A *family module* is any ``benchmarks/bench_*.py`` exposing ``FAMILY: str`` and
``cases(quick: bool) -> Iterable[Case]``. A model family may also expose
``model_cases(names: list[str], quick: bool) -> Iterable[Case]`` (and ``MODELS``, the names it knows);
``--models`` is routed to it. A family may declare ``OPS``, every op name its ``cases`` use (``case.op`` and
``covers``): a selection by op name then skips the families that name none of them without building their
cases (tests/test_bench.py holds ``OPS`` to what the cases use). A module that fails to import is reported
with its error, not fatal.

    fastvl bench [--ops tokens,attention] [--models allinone-b] [--match TEXT] [--quick] [--limits] [--out DIR]
    fastvl bench --static sm90 [--ops ...]   (no timings: the static sm_90 report, benchmarks/static_sm90.py)
    python -m benchmarks ...   (same options)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from . import common
from .common import Case

PACKAGE = __package__ or "benchmarks"


@dataclasses.dataclass
class Family:
    name: str
    module: ModuleType

    @property
    def models(self) -> tuple[str, ...] | None:
        m = getattr(self.module, "MODELS", None)
        return tuple(m) if m is not None else None

    def has_models(self) -> bool:
        return callable(getattr(self.module, "model_cases", None))

    @property
    def ops(self) -> frozenset[str] | None:
        """The op names the family's cases use, when it declares them (``OPS``)."""
        o = getattr(self.module, "OPS", None)
        return frozenset(o) if o is not None else None

    def may_match(self, names: set[str]) -> bool:
        """Whether a selection by these family / op names can pick any of its cases."""
        return self.name in names or self.ops is None or bool(self.ops & names)


@dataclasses.dataclass
class Discovery:
    families: dict[str, Family]
    errors: dict[str, str]  # module name -> why it is not used
    skipped: dict[str, str]  # module name -> not a family module (no FAMILY / cases)


def discover(package: str = PACKAGE) -> Discovery:
    """Import every ``bench_*.py`` of ``package``; keep those exposing FAMILY and cases(quick)."""
    pkg = importlib.import_module(package)
    directory = os.path.dirname(os.path.abspath(pkg.__file__))
    families: dict[str, Family] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for fname in sorted(os.listdir(directory)):
        if not (fname.startswith("bench_") and fname.endswith(".py")):
            continue
        stem = fname[:-3]
        try:
            mod = importlib.import_module(f"{package}.{stem}")
        except BaseException as e:  # noqa: B036  (a module calling sys.exit or failing in any way is reported)
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.extract_tb(e.__traceback__)
            where = f" ({tb[-1].filename}:{tb[-1].lineno})" if tb else ""
            errors[stem] = f"{type(e).__name__}: {e}{where}"
            continue
        fam = getattr(mod, "FAMILY", None)
        if not isinstance(fam, str) or not callable(getattr(mod, "cases", None)):
            skipped[stem] = "not a family module: needs FAMILY: str and cases(quick: bool) -> Iterable[Case]"
            continue
        if fam in families:
            errors[stem] = f"family {fam!r} is already defined by {families[fam].module.__name__}"
            continue
        families[fam] = Family(fam, mod)
    return Discovery(families, errors, skipped)


def registry_ops() -> list[str]:
    import fastvl.backends

    return fastvl.backends.ops()


def public_ops() -> list[str]:
    import fastvl.ops

    return list(getattr(fastvl.ops, "__all__", []))


def coverage(disc: Discovery, quick: bool = True) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({registry op: [cases covering it]}, {family: error}) over every case of every family (not run).

    Each family's cases (and a model family's ``model_cases(MODELS)``) are generated and released one at a
    time; an op mapped to [] has no benchmark case.
    """
    cov: dict[str, list[str]] = {op: [] for op in registry_ops()}
    errors: dict[str, str] = {}
    for fam in disc.families.values():
        try:
            gens = [fam.module.cases(quick)]
            if fam.has_models() and fam.models:
                gens.append(fam.module.model_cases(list(fam.models), quick))
            for gen in gens:
                for case in gen:
                    for op in case.covered_ops():
                        cov.setdefault(op, []).append(f"{fam.name}:{case.op}:{case.mode}")
        except Exception as e:
            errors[fam.name] = f"{type(e).__name__}: {e}"
    return cov, errors


def case_ops(disc: Discovery) -> set[str]:
    """Every case op and covered op of every family (cases generated at --quick sizes, not run)."""
    names: set[str] = set()
    for fam in disc.families.values():
        if fam.ops is not None:
            names |= fam.ops
            continue
        try:
            for case in fam.module.cases(True):
                names |= {case.op, *case.covered_ops()}
        except Exception:  # reported by coverage() / the run itself
            pass
    return names


# ---- selection -----------------------------------------------------------------------------


def _split(v: str | None) -> list[str]:
    return [s.strip() for s in (v or "").split(",") if s.strip()]


def _matches(case: Case, family: str, names: set[str]) -> bool:
    return family in names or case.op in names or any(op in names for op in case.covered_ops())


def case_text(case: Case) -> str:
    """What ``--match`` searches: ``op mode x=value config``."""
    return f"{case.op} {case.mode} {case.x_name}={case.x_value} {common.config_text(common.case_config(case.config))}"


def select_cases(
    disc: Discovery,
    ops: list[str],
    models: list[str],
    quick: bool,
    max_cases: int | None,
    errors: dict[str, str] | None = None,
    match: list[str] | None = None,
) -> Iterator[tuple[str, Case]]:
    """(family, case) pairs of the selection, generated lazily (a case's tensors live while it is measured).

    ``match``: keep only cases whose :func:`case_text` contains one of these strings. A family whose case
    generator raises is recorded in ``errors`` (family -> error) and skipped, not fatal.
    """
    names = set(ops)
    run_all = not ops and not models
    for fam in disc.families.values():
        n = 0
        gens: list[tuple[Iterable[Case], bool]] = []
        try:
            if run_all or (names and fam.may_match(names)):
                gens.append((fam.module.cases(quick), False))
            if models and fam.has_models():
                known = fam.models
                chosen = [m for m in models if m == "all" or known is None or m in known]
                if "all" in chosen and known is not None:
                    chosen = list(known)
                if chosen:
                    gens.append((fam.module.model_cases(chosen, quick), True))
            for gen, is_model in gens:
                it = iter(gen)
                while max_cases is None or n < max_cases:
                    try:
                        case = next(it)
                    except StopIteration:
                        break
                    if match and not any(m in case_text(case) for m in match):
                        continue
                    if run_all or is_model or _matches(case, fam.name, names):
                        n += 1
                        yield fam.name, case
        except Exception as e:
            if errors is None:
                raise
            errors[fam.name] = f"{type(e).__name__}: {e}"


# ---- outputs -------------------------------------------------------------------------------


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows whose (case, provider, metric) was not measured again, then ``new``."""
    fresh = {(common.case_key(r), r["provider"], r["metric"]) for r in new}
    return [r for r in old if (common.case_key(r), r["provider"], r["metric"]) not in fresh] + new


def results_markdown(rows: list[dict], lim: dict[str, Any], errors: dict[str, dict[str, str]]) -> str:
    """The run's results.md: provenance, the CPU label, the summary per family, every provider, errors."""
    envs = {(r["device_kind"], r["device"]) for r in rows}
    out = ["# fastvl benchmark results", ""]
    if not rows:
        out.append("No rows were measured.")
    for kind, dev in sorted(envs):
        if kind == "cpu":
            out.append(
                f"**CPU run** on {dev}: these are CPU timings, not GPU figures; never compare them with GPU tables."
            )
        else:
            out.append(f"**GPU run** on {dev}.")
    prov = sorted({(r["torch"], r["triton"], r["commit"]) for r in rows})
    for t, tr, c in prov:
        stamps = sorted({r["timestamp"] for r in rows if (r["torch"], r["triton"], r["commit"]) == (t, tr, c)})
        out.append(
            f"- torch {t}, triton {tr}, fastvl commit {c}, measured {stamps[0]}"
            + (f" to {stamps[-1]}" if len(stamps) > 1 else "")
        )
    out.append("")
    if lim.get("source") in ("measured", "nominal"):
        out.append(
            f"Device limits ({lim['source']}): copy bandwidth {lim['bandwidth_gbps']:.4g} GB/s, "
            f"{lim.get('matmul_dtype', '')} matmul {lim['matmul_tflops']:.4g} TFLOP/s."
        )
    else:
        out.append("Device limits: unknown (run with `--limits` to measure them); no % figures.")
    out += [
        "",
        "Ratios are the other provider's median time over fastvl's (> 1: fastvl is faster). *Best peer*: the fastest "
        "provider that is neither eager PyTorch nor fastvl (torch.compile of the eager code, SDPA, flash-attn, ...). "
        "% of limit: of the measured copy bandwidth for memory-bound ops, of the matmul peak for compute-bound ones.",
        "",
    ]
    fams = sorted({r.get("family", "") for r in rows})
    for fam in fams:
        rs = [r for r in rows if r.get("family", "") == fam]
        out += [
            f"## {fam or 'other'}",
            "",
            common.summary_table(rs),
            "",
            "All providers:",
            "",
            common.providers_table(rs),
            "",
        ]
    if errors:
        out += ["## Provider errors", ""]
        for case, errs in errors.items():
            for p, e in errs.items():
                out.append(f"- {case} / {p}: {e}")
        out.append("")
    return "\n".join(out)


def _series(rs: list[dict]) -> tuple[list[str], bool]:
    """Config keys that separate lines of one (op, mode) panel, and whether x is numeric.

    The keys are those x does not determine, reduced to a smallest set that still tells the lines apart
    (named keys such as ``shape`` kept in preference to the numbers and flags they imply), so labels stay short.
    """
    cfgs: dict[str, dict[str, set]] = {}
    for r in rs:
        for k, v in common.case_config(r["config"]).items():
            cfgs.setdefault(k, {}).setdefault(str(r["x_value"]), set()).add(json.dumps(v, default=str))
    keys = [k for k, per_x in cfgs.items() if any(len(vals) > 1 for vals in per_x.values())]

    def distinct(ks: list[str]) -> int:
        return len({tuple(json.dumps(r["config"].get(k), default=str) for k in ks) for r in rs})

    n = distinct(keys)
    named = {k for k in keys if all(isinstance(r["config"].get(k), str) for r in rs)}
    for k in sorted(keys, key=lambda k: (k in named, -keys.index(k))):  # drop numbers and flags first
        trial = [key for key in keys if key != k]
        if distinct(trial) == n:
            keys = trial
    numeric = all(isinstance(r["x_value"], (int, float)) and not isinstance(r["x_value"], bool) for r in rs)
    return keys, numeric


FASTVL_COLORS = ("C0", "C2", "C9", "C4", "C6")
PEER_COLORS = ("C1", "C3", "C5", "C8", "C7", "C6")
MARKERS = "osv^D<>pP*"


def provider_styles(providers: Iterable[str]) -> dict[str, tuple[str, str]]:
    """provider -> (colour, line style), stable within a plot: fastvl providers solid blues/greens, eager a
    dashed dark grey line, peers dotted in warm colours (each group in name order)."""
    provs = sorted(set(providers))
    fast = [p for p in provs if common.is_fastvl(p)]
    peers = [p for p in provs if common.is_peer(p)]
    out = {p: (FASTVL_COLORS[i % len(FASTVL_COLORS)], "-") for i, p in enumerate(fast)}
    out.update({p: (PEER_COLORS[i % len(PEER_COLORS)], ":") for i, p in enumerate(peers)})
    if common.EAGER in provs:
        out[common.EAGER] = ("0.25", "--")
    return out


def _legend_order(p: str) -> tuple:
    return (not common.is_fastvl(p), p != common.EAGER, p)


def plot_family(rows: list[dict], family: str, path: str) -> str | None:
    """PNG of time and peak memory vs size for each (op, mode) of a family; returns a message if skipped.

    One row of panels per (op, mode): time (p20-p80 band shaded) and peak memory. Numeric sizes: colour and
    line style per provider, marker per configuration series, log axes where values span a wide range.
    Named sizes (models): grouped bars per provider, p20-p80 error bars. One legend per row, on the right.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install 'fastvl[bench]')"
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["metric"] in ("time_ms", "memory_mb"):
            panels.setdefault((r["op"], r["mode"]), []).append(r)
    if not panels:
        return f"{family}: nothing to plot"
    n = len(panels)
    fig, axes = plt.subplots(n, 2, figsize=(14, 3.4 * n + 0.6), squeeze=False)
    kinds = {r["device_kind"] for r in rows}
    dev = "; ".join(sorted({r["device"] for r in rows}))
    fig.suptitle(f"fastvl bench: {family} on {dev}" + (" (CPU run: not GPU figures)" if "cpu" in kinds else ""))
    style = provider_styles(r["provider"] for r in rows)
    for i, ((op, mode), rs) in enumerate(panels.items()):
        keys, numeric = _series(rs)
        xs_all = sorted({r["x_value"] for r in rs}, key=lambda v: (str(type(v)), v))
        series = sorted({tuple(str(r["config"].get(k)) for k in keys) for r in rs})
        provs = sorted({r["provider"] for r in rs}, key=_legend_order)
        for j, metric in enumerate(("time_ms", "memory_mb")):
            ax = axes[i][j]
            lines: dict[tuple[str, tuple], list[tuple]] = {}
            for r in rs:
                if r["metric"] != metric:
                    continue
                s = tuple(str(r["config"].get(k)) for k in keys)
                x = r["x_value"] if numeric else xs_all.index(r["x_value"])
                lines.setdefault((r["provider"], s), []).append((x, r["median"], r["p20"], r["p80"]))
            order = sorted(lines, key=lambda ps: (_legend_order(ps[0]), ps[1]))
            width = 0.8 / max(1, len(order))
            for k, (prov, s) in enumerate(order):
                x, y, lo, hi = zip(*sorted(lines[(prov, s)]))
                color, ls = style[prov]
                if numeric:
                    ax.plot(x, y, ls, color=color, marker=MARKERS[series.index(s) % len(MARKERS)], ms=5)
                    if metric == "time_ms" and len(x) > 1:
                        ax.fill_between(x, lo, hi, color=color, alpha=0.1)
                    elif metric == "time_ms":
                        ax.errorbar(x, y, yerr=[[y[0] - lo[0]], [hi[0] - y[0]]], color=color, capsize=2)
                else:
                    pos = [xi + (k - (len(order) - 1) / 2) * width for xi in x]
                    err = None
                    if metric == "time_ms":
                        err = [[yi - li for yi, li in zip(y, lo)], [h - yi for yi, h in zip(y, hi)]]
                    hatch = "//" if common.is_peer(prov) else None
                    ax.bar(pos, y, width, yerr=err, color=color, alpha=0.85, hatch=hatch, capsize=2, ecolor="0.5")
            values = [pt[1] for pts in lines.values() for pt in pts if pt[1] > 0]
            if numeric and len(xs_all) > 1 and max(xs_all) >= 4 * max(min(xs_all), 1e-12):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            if numeric and values and max(values) >= 20 * min(values):
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            if numeric and len(xs_all) <= 8:
                ax.set_xticks(xs_all, [str(v) for v in xs_all])
            if not numeric:
                ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
            ax.set_xlabel(rs[0]["x_name"])
            ax.set_ylabel("time (ms)" if metric == "time_ms" else "peak memory (MB)")
            ax.set_title(f"{op} {mode}: {'time' if metric == 'time_ms' else 'peak memory'}", fontsize=9)
            ax.grid(alpha=0.3)
        handles = []
        for prov in provs:
            color, ls = style[prov]
            if numeric:
                handles.append(Line2D([], [], color=color, linestyle=ls, label=prov))
            else:
                handles.append(Patch(color=color, alpha=0.85, hatch="//" if common.is_peer(prov) else None, label=prov))
        if numeric and len(series) > 1:
            for idx, s in enumerate(series):
                label = " ".join(f"{k}={v}" for k, v in zip(keys, s))
                handles.append(
                    Line2D([], [], color="0.4", linestyle="", marker=MARKERS[idx % len(MARKERS)], label=label)
                )
        axes[i][1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.4 * n + 0.6)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# ---- command line --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ops", default=None, help="comma-separated families or op names (default: every family)")
    p.add_argument("--models", default=None, help="comma-separated model names, routed to the model family module")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument(
        "--limits",
        action="store_true",
        help="(re)measure the device's copy bandwidth and matmul rate and cache them in results/<device>/ "
        "(measured automatically when no cache exists); alone, it does only that",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: benchmarks/results/<device>/ on a GPU, "
        "benchmarks/results/<device>/local-run/ for CPU runs, which git ignores)",
    )
    p.add_argument("--rounds", type=int, default=None, help="CPU timing rounds per provider (default: adaptive)")
    p.add_argument("--max-cases", type=int, default=None, help="at most N cases per family (smoke runs)")
    p.add_argument("--skip-providers", default=None, help="comma-separated providers not to run (e.g. compile)")
    p.add_argument(
        "--match",
        default=None,
        help="comma-separated strings: only cases whose 'op mode x=value config' text contains one "
        "(e.g. 'shape=All-in-one-B,B=32768')",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--fresh", action="store_true", help="overwrite results.json instead of merging into it")
    p.add_argument("--list", action="store_true", help="list the selected cases and the op coverage, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--static",
        default=None,
        metavar="TARGET",
        help="no timings: the static report of what a GPU would run (sm90: every launch at the suite's shapes, "
        "compiled for sm_90a; registers, spills, shared memory, occupancy, MMA, tile loads, bytes per op call) "
        "to benchmarks/results/sm_90-static/ (see benchmarks/static_sm90.py)",
    )
    p.add_argument("--jobs", type=int, default=None, help="--static: compile processes (default 2)")
    p.add_argument("--no-bytes", action="store_true", help="--static: skip the interpreter replay that counts bytes")
    p.add_argument("--check", action="store_true", help="--static: exit 1 when a Hopper readiness check fails")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return add_arguments(p)


def _say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def _compile_room() -> Iterator[None]:
    """Room for one compiled graph per case and grad mode while the suite runs (dynamo's default limit of 8
    would silently fall back to eager and report eager's time as torch.compile's); restored afterwards."""
    try:
        import torch._dynamo.config as dc
    except ImportError:
        yield
        return
    wanted = {"recompile_limit": 256, "cache_size_limit": 256, "accumulated_recompile_limit": 4096}
    old = {k: getattr(dc, k) for k in wanted if hasattr(dc, k)}
    try:
        for k, v in wanted.items():
            if k in old and old[k] < v:
                setattr(dc, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(dc, k, v)


def check_names(disc: Discovery, ops: list[str], models: list[str]) -> str | None:
    """Why the ``--ops`` / ``--models`` names select nothing (one line), or None when they are known.

    Names must be families, registry ops, public ops, or ops of some case (scanned at --quick sizes); models
    must be known to a model family. ``--models`` without any model family is an error only when no ``--ops``
    selection is left to run (otherwise it is said and the run goes on).
    """
    known = set(disc.families) | set(registry_ops()) | set(public_ops())
    unknown = [n for n in ops if n not in known]
    if unknown:
        known |= case_ops(disc)
        unknown = [n for n in unknown if n not in known]
    if unknown:
        fams = ", ".join(sorted(disc.families)) or "none"
        names = ", ".join(sorted(set(registry_ops()) | set(public_ops())))
        return f"[bench] --ops: unknown name(s) {', '.join(unknown)}; families: {fams}; ops: {names}"
    model_fams = [f for f in disc.families.values() if f.has_models()]
    if models and not model_fams:
        msg = (
            f"[bench] --models {','.join(models)}: no model benchmark family is registered yet (a bench_*.py with "
            "FAMILY and model_cases(names, quick)); no model was measured"
        )
        if not ops:
            return msg
        _say(msg)
    if models:
        known_models = set().union(*[set(f.models or ()) for f in model_fams])
        open_ended = any(f.models is None for f in model_fams)
        bad = [m for m in models if m != "all" and not open_ended and m not in known_models]
        if bad:
            return f"[bench] --models: unknown model(s) {', '.join(bad)}; known: {', '.join(sorted(known_models))}"
    return None


def list_selection(disc: Discovery, ops: list[str], models: list[str], args: argparse.Namespace) -> None:
    """``--list``: the selected cases (nothing run) and the registered ops no case covers."""
    for fam, case in select_cases(disc, ops, models, args.quick, args.max_cases, match=_split(args.match)):
        _say(
            f"{fam}: {case.op} {case.mode} {case.x_name}={case.x_value} providers={','.join(case.providers)} "
            f"covers={','.join(case.covered_ops())} bound={case.limit_kind()} "
            f"[{common.config_text(common.case_config(case.config))}]"
        )
    cov, errs = coverage(disc, quick=True)
    for fam, e in errs.items():
        _say(f"[bench] {fam}: cases failed: {e}")
    missing = [op for op, cs in cov.items() if not cs]
    _say("ops without a benchmark case: " + (", ".join(missing) if missing else "none"))


def previous_rows(args: argparse.Namespace, env: dict[str, str]) -> tuple[str, list[dict]] | str:
    """(output directory, rows kept from its results.json), or why that file cannot be merged into."""
    out_dir = os.path.abspath(args.out or common.default_out_dir())
    path = os.path.join(out_dir, "results.json")
    old_rows = common.read_rows(path) if os.path.exists(path) and not args.fresh else []
    if other := {r["device"] for r in old_rows} - {env["device"]}:
        return (
            f"[bench] {path} holds rows of another device ({', '.join(sorted(other))}): "
            "use another --out, or --fresh to overwrite it"
        )
    return out_dir, old_rows


def device_limits(measure: bool) -> dict[str, Any]:
    """The device's copy bandwidth and matmul rate: measured (and cached) when asked or never cached."""
    lim_path = common.limits_path()
    if measure or not os.path.exists(lim_path):
        _say(f"[bench] measuring device limits (copy bandwidth, matmul rate) -> {lim_path}")
        lim = common.limits(measure=True)
    else:
        common.set_limits(None)
        lim = common.limits()
    if lim.get("source") == "measured":
        _say(
            f"[bench] limits: copy {lim['bandwidth_gbps']:.4g} GB/s, {lim.get('matmul_dtype', '')} matmul "
            f"{lim['matmul_tflops']:.4g} TFLOP/s"
        )
    return lim


@dataclasses.dataclass
class Measured:
    rows: list[dict]
    errors: dict[str, dict[str, str]]  # case label -> provider -> error
    seen_ops: set[str]


def measure(disc: Discovery, ops: list[str], models: list[str], args: argparse.Namespace, env) -> Measured:
    """Run every selected case (a progress bar on stderr, one line per case); failures are recorded."""
    from tqdm import tqdm

    rows: list[dict] = []
    errors: dict[str, dict[str, str]] = {}
    family_errors: dict[str, str] = {}
    seen_ops: set[str] = set()
    skip = _split(args.skip_providers)
    bar = tqdm(unit="case", desc="bench", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    with _compile_room():
        try:
            selected = select_cases(
                disc, ops, models, args.quick, args.max_cases, family_errors, match=_split(args.match)
            )
            for fam, case in selected:
                label = f"{fam}: {case.op} {case.mode} {case.x_name}={case.x_value}"
                bar.set_postfix_str(label)
                seen_ops |= {case.op, *case.covered_ops()}
                rs = common.run_case(case, env, memory=not args.no_memory, rounds=args.rounds, family=fam, skip=skip)
                rows += rs
                if case.config.get("errors"):
                    errors[label] = dict(case.config["errors"])
                times = ", ".join(f"{r['provider']} {r['median']:.3g}" for r in rs if r["metric"] == "time_ms")
                bar.write(f"  {label}: {times} ms")
                bar.update(1)
        finally:
            bar.close()
    for fam, e in family_errors.items():
        _say(f"[bench] family {fam}: its cases failed, skipped: {e}")
        errors[f"{fam}: case generation"] = {"-": e}
    return Measured(rows, errors, seen_ops)


def write_outputs(out_dir: str, old_rows: list[dict], m: Measured, lim: dict[str, Any]) -> list[dict]:
    """Merge the new rows into results.json; write results.md and one plot per family; returns all rows."""
    all_rows = merge_rows(old_rows, m.rows)
    common.write_rows(all_rows, os.path.join(out_dir, "results.json"))
    errors = dict(m.errors)
    for r in all_rows[: len(all_rows) - len(m.rows)]:  # provider errors of the cases kept from earlier runs
        if r["metric"] == "time_ms" and r["config"].get("errors"):
            label = f"{r['family']}: {r['op']} {r['mode']} {r['x_name']}={r['x_value']}"
            errors.setdefault(label, dict(r["config"]["errors"]))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(all_rows, lim, errors))
    for fam in sorted({r["family"] for r in all_rows}):
        msg = plot_family([r for r in all_rows if r["family"] == fam], fam, os.path.join(out_dir, f"{fam}.png"))
        if msg:
            _say(f"[bench] {msg}")
            break
    return all_rows


def run(args: argparse.Namespace, package: str = PACKAGE) -> int:
    """The suite: check the selection, list it or measure it, write the outputs (``--static``: the static report)."""
    if getattr(args, "static", None):
        return importlib.import_module(f"{package}.static_sm90").run(args)
    ops, models = _split(args.ops), _split(args.models)
    disc = discover(package)
    for stem, err in disc.errors.items():
        _say(f"[bench] {stem}: not used: {err}")
    if (why := check_names(disc, ops, models)) is not None:
        _say(why)
        return 2
    if args.list:
        list_selection(disc, ops, models, args)
        return 0
    env = common.environment()
    prev = previous_rows(args, env)
    if isinstance(prev, str):
        _say(prev)
        return 2
    out_dir, old_rows = prev
    os.makedirs(out_dir, exist_ok=True)
    if env["device_kind"] == "cpu":
        _say(f"[bench] CPU run on {env['device']}: CPU timings, not GPU figures")
    lim = device_limits(args.limits)
    if args.limits and not ops and not models:
        return 0  # `--limits` alone: measure and cache the limits, nothing else
    m = measure(disc, ops, models, args, env)
    if fam_ops := [n for n in ops if n not in disc.families and n not in m.seen_ops]:
        _say(f"[bench] --ops: no benchmark case covers {', '.join(fam_ops)}")
    if not m.rows:
        _say("[bench] nothing was measured")
        return 2
    all_rows = write_outputs(out_dir, old_rows, m, lim)
    _say(common.markdown_table(m.rows))
    for case, errs in m.errors.items():
        for p, e in errs.items():
            _say(f"[bench] {case} / {p} failed: {e}")
    _say(f"[bench] wrote {len(all_rows)} rows ({len(m.rows)} new) to {out_dir} (results.json, results.md, plots)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
