"""Benchmark harness: timing, peak memory, device limits, result rows, tables.

GPU timing uses ``triton.testing.do_bench`` (CUDA events, after warm-up; median and 20/80 percentiles).
CPU timing runs repeated rounds with ``time.perf_counter`` (pytest-benchmark style) and every row is
labelled with the CPU's name: a CPU figure is never a GPU claim. Peak memory comes from the CUDA
allocator on a GPU and from the process's high-water mark (VmHWM, reset per case) on the CPU.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

ROW_FIELDS = (
    "op",
    "provider",
    "mode",
    "metric",
    "x_name",
    "x_value",
    "median",
    "p20",
    "p80",
    "config",
    "device",
    "device_kind",
    "torch",
    "triton",
    "commit",
    "timestamp",
)

# Nominal peaks, used only when no measured limit (``fastvl bench --limits``) is available.
NOMINAL = {
    "H100": {"bandwidth_gbps": 3350.0, "bf16_tflops": 989.0},
    "H200": {"bandwidth_gbps": 4800.0, "bf16_tflops": 989.0},
    "A100": {"bandwidth_gbps": 2039.0, "bf16_tflops": 312.0},
}


@dataclasses.dataclass
class Stats:
    median: float
    p20: float
    p80: float


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                name = m.group(1).strip()
    except OSError:
        pass
    return f"CPU ({name}, {os.cpu_count()} cores)"


def device_slug() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name()).strip("_")[:60]


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTVL_COMMIT", "unknown")


def environment() -> dict[str, str]:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return {
        "device": device_name(),
        "device_kind": device_kind(),
        "torch": torch.__version__,
        "triton": tv,
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_time(
    fn: Callable[[], Any], *, warmup: int = 3, rounds: int | None = None, min_time_s: float = 0.2, max_rounds: int = 50
) -> Stats:
    """Milliseconds per call: do_bench on a GPU, repeated perf_counter rounds on the CPU."""
    if torch.cuda.is_available():
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Stats(med, p20, p80)
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        n = len(times)
        if rounds is not None and n >= rounds:
            break
        if rounds is None and ((time.perf_counter() - start >= min_time_s and n >= 5) or n >= max_rounds):
            break
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Stats(statistics.median(times), q[1], q[7])


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+)", f.read())
    return int(m.group(1)) * 1024 if m else 0


def measure_peak_memory(fn: Callable[[], Any]) -> float | None:
    """Peak extra memory (MB) while ``fn`` runs: CUDA allocator peak, or the process high-water mark."""
    if torch.cuda.is_available():
        sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    base = _vm("VmRSS")
    fn()
    return max(0.0, (_vm("VmHWM") - base) / 2**20)


def measure_bandwidth_gbps(nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth (read + write bytes / time) measured with a large tensor copy."""
    n = nbytes // 4
    dev = device_kind()
    a = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    st = measure_time(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (st.median * 1e-3) / 1e9


def measure_matmul_tflops(n: int = 8192) -> float:
    dev = device_kind()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n = n if dev == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    st = measure_time(lambda: a @ b)
    return 2 * n**3 / (st.median * 1e-3) / 1e12


_LIMITS: dict[str, float] | None = None


def limits(measure: bool = False, results_dir: str | None = None) -> dict[str, float]:
    """Device limits for % figures: measured if asked (or cached in results/<device>/limits.json), else nominal."""
    global _LIMITS
    if _LIMITS is not None and not measure:
        return _LIMITS
    path = os.path.join(results_dir or default_results_dir(), "limits.json")
    if not measure and os.path.exists(path):
        with open(path) as f:
            _LIMITS = json.load(f)
            return _LIMITS
    if measure:
        _LIMITS = {
            "bandwidth_gbps": measure_bandwidth_gbps(),
            "matmul_tflops": measure_matmul_tflops(),
            "source": "measured",
            **environment(),
        }
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(_LIMITS, f, indent=1)
        return _LIMITS
    name = device_name()
    for key, lim in NOMINAL.items():
        if key in name:
            _LIMITS = {
                "bandwidth_gbps": lim["bandwidth_gbps"],
                "matmul_tflops": lim["bf16_tflops"],
                "source": "nominal",
            }
            return _LIMITS
    _LIMITS = {"source": "unknown"}
    return _LIMITS


def default_results_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "results", device_slug())


def row(
    op: str,
    provider: str,
    mode: str,
    metric: str,
    x_name: str,
    x_value: Any,
    stats: Stats | float | None,
    config: dict[str, Any],
    env: dict[str, str],
) -> dict[str, Any]:
    if isinstance(stats, Stats):
        med, p20, p80 = stats.median, stats.p20, stats.p80
    else:
        med = p20 = p80 = stats
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "metric": metric,
        "x_name": x_name,
        "x_value": x_value,
        "median": med,
        "p20": p20,
        "p80": p80,
        "config": config,
        **{k: env[k] for k in ("device", "device_kind", "torch", "triton", "commit", "timestamp")},
    }


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


DERIVED = ("gbps", "pct_bandwidth", "tflops", "pct_peak_flops", "limits", "errors")


def case_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration that identifies a case (derived figures stripped)."""
    return {k: v for k, v in cfg.items() if k not in DERIVED}


def markdown_table(rows: list[dict[str, Any]], baseline: str = "eager") -> str:
    """One line per (op, mode, x, config) with each provider's time and its ratio to ``baseline``."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["metric"] != "time_ms":
            continue
        key = (r["op"], r["mode"], r["x_name"], str(r["x_value"]), json.dumps(case_config(r["config"]), sort_keys=True))
        by_case.setdefault(key, {})[r["provider"]] = r
    lines = [
        "| op | mode | size | provider | time (ms) | vs eager | GB/s | % of bandwidth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (op, mode, xn, xv, _), provs in by_case.items():
        base = provs.get(baseline)
        for prov, r in provs.items():
            ratio = f"{base['median'] / r['median']:.2f}x" if base and r["median"] else ""
            gbps = r["config"].get("gbps")
            pct = r["config"].get("pct_bandwidth")
            lines.append(
                f"| {op} | {mode} | {xn}={xv} | {prov} | {r['median']:.4g} | {ratio} | "
                f"{'' if gbps is None else f'{gbps:.0f}'} | {'' if pct is None else f'{pct:.0f}%'} |"
            )
    return "\n".join(lines)


@dataclasses.dataclass
class Case:
    """One benchmark point: several providers computing the same thing, measured side by side.

    ``bytes_moved`` is the minimal traffic of the op (for GB/s and % of bandwidth), ``flops`` its
    arithmetic (for TFLOP/s and % of peak); both optional.
    """

    op: str
    mode: str  # fwd | bwd | full
    x_name: str
    x_value: Any
    providers: dict[str, Callable[[], Any]]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_moved: int | None = None
    flops: int | None = None


def run_case(case: Case, env: dict[str, str], *, memory: bool = True, rounds: int | None = None) -> list[dict]:
    """Time every provider (interleaved: one pass of each, twice, keeping the better median), then memory."""
    lim = limits()
    rows = []
    stats: dict[str, Stats] = {}
    for _ in range(2):
        for name, fn in case.providers.items():
            try:
                st = measure_time(fn, rounds=rounds)
            except Exception as e:  # a provider that fails (OOM, unsupported) is reported, not fatal
                case.config.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if name not in stats or st.median < stats[name].median:
                stats[name] = st
    for name, st in stats.items():
        cfg = dict(case.config)
        if case.bytes_moved:
            cfg["gbps"] = case.bytes_moved / (st.median * 1e-3) / 1e9
            if "bandwidth_gbps" in lim:
                cfg["pct_bandwidth"] = 100 * cfg["gbps"] / lim["bandwidth_gbps"]
        if case.flops:
            cfg["tflops"] = case.flops / (st.median * 1e-3) / 1e12
            if "matmul_tflops" in lim:
                cfg["pct_peak_flops"] = 100 * cfg["tflops"] / lim["matmul_tflops"]
        cfg["limits"] = lim.get("source", "unknown")
        rows.append(row(case.op, name, case.mode, "time_ms", case.x_name, case.x_value, st, cfg, env))
        if "gbps" in cfg:
            rows.append(row(case.op, name, case.mode, "gbps", case.x_name, case.x_value, cfg["gbps"], case.config, env))
    if memory:
        for name, fn in case.providers.items():
            if name not in stats:
                continue
            mb = measure_peak_memory(fn)
            if mb is not None:
                rows.append(row(case.op, name, case.mode, "memory_mb", case.x_name, case.x_value, mb, case.config, env))
    return rows
