"""Benchmark harness: timing, peak memory, device limits, result rows, summaries and tables.

GPU timing uses ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, after warm-up;
median and 20/80 percentiles). CPU timing runs repeated rounds with ``time.perf_counter``
(pytest-benchmark style). Providers of one case are measured in the same process, alternating, after
each has been warmed up (so ``torch.compile`` compiles outside the timed region). Every row carries the
device's name and kind: a CPU figure is never a GPU claim. Peak memory comes from the CUDA allocator
on a GPU and from the process's high-water mark (VmHWM, reset per measurement) on the CPU.

Provider names: ``eager`` is the eager PyTorch code the methods ship (the baseline), ``fastvl`` and
``fastvl-<backend>`` are fastvl; every other provider (``compile``, ``sdpa-flash``, ``flash_attn``, ...)
is a peer. The *best peer* of a case is its fastest non-fastvl provider other than eager.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

ROW_FIELDS = (
    "family",
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
MODES = ("fwd", "bwd", "full")
METRICS = ("time_ms", "memory_mb", "tflops", "gbps")
EAGER = "eager"

# Nominal peaks, used only when no measured limit (``fastvl bench --limits``) is available.
NOMINAL = {
    "H100": {"bandwidth_gbps": 3350.0, "bf16_tflops": 989.0},
    "H200": {"bandwidth_gbps": 4800.0, "bf16_tflops": 989.0},
    "A100": {"bandwidth_gbps": 2039.0, "bf16_tflops": 312.0},
}

# CPU timing defaults (overridable per run: ``--rounds`` / FASTVL_BENCH_ROUNDS fixes the round count)
CPU_WARMUP = 2
CPU_MIN_TIME_S = 0.2  # per provider, when the round count is not fixed
CPU_MIN_ROUNDS = 5
CPU_MAX_ROUNDS = 50
GPU_PASSES = 3  # interleaved do_bench passes per provider
GPU_WARMUP_MS = 25
GPU_REP_MS = 100


@dataclasses.dataclass
class Stats:
    median: float
    p20: float
    p80: float


# ---- environment -----------------------------------------------------------------------------


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


def device_slug(name: str | None = None) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or device_name()).strip("_")[:60]


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


# ---- where results live --------------------------------------------------------------------


def results_root() -> str:
    """``benchmarks/results`` of the source checkout (FASTVL_BENCH_RESULTS overrides; ./benchmarks/results
    when fastvl is installed outside a checkout)."""
    env = os.environ.get("FASTVL_BENCH_RESULTS")
    if env:
        return os.path.abspath(env)
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "..", "pyproject.toml")):
        return os.path.join(here, "results")
    return os.path.abspath(os.path.join("benchmarks", "results"))


def device_results_dir() -> str:
    """``results/<device-slug>/``: committed GPU data lives here; CPU data only in its ``local-*`` entries."""
    return os.path.join(results_root(), device_slug())


def default_results_dir() -> str:
    return device_results_dir()


def default_out_dir() -> str:
    """GPU: ``results/<device>/`` (to be committed). CPU: ``results/<device>/local-run/`` (git-ignored)."""
    d = device_results_dir()
    return d if device_kind() == "cuda" else os.path.join(d, "local-run")


def limits_path(results_dir: str | None = None) -> str:
    name = "limits.json" if device_kind() == "cuda" else "local-limits.json"
    return os.path.join(results_dir or device_results_dir(), name)


# ---- timing --------------------------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list (numpy's default, triton's ``_quantile``)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_of(times: list[float]) -> Stats:
    return Stats(quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8))


def env_rounds() -> int | None:
    v = os.environ.get("FASTVL_BENCH_ROUNDS")
    return int(v) if v else None


def _do_bench_all(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    import triton.testing

    try:
        return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
    except (TypeError, AssertionError):  # a Triton without return_mode="all": keep its quantiles
        return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


def measure_time(
    fn: Callable[[], Any], *, warmup: int = 3, rounds: int | None = None, min_time_s: float = 0.2, max_rounds: int = 50
) -> Stats:
    """Milliseconds per call of one function: do_bench on a GPU, repeated perf_counter rounds on the CPU."""
    if torch.cuda.is_available():
        return stats_of(_do_bench_all(fn, GPU_WARMUP_MS, GPU_REP_MS))
    for _ in range(warmup):
        fn()
    rounds = rounds or env_rounds()
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
    return stats_of(times)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def measure_providers(
    providers: dict[str, Callable[[], Any]], *, rounds: int | None = None
) -> tuple[dict[str, Stats], dict[str, str]]:
    """Time every provider of a case in the same process, alternating, after warming each one up.

    GPU: ``GPU_PASSES`` interleaved ``do_bench`` passes per provider (CUDA events), all samples pooled.
    CPU: warm-up calls, then rounds of one call per provider in turn; ``rounds`` (or FASTVL_BENCH_ROUNDS)
    fixes the number of rounds, otherwise it runs until each provider had ``CPU_MIN_TIME_S`` and
    ``CPU_MIN_ROUNDS`` (at most ``CPU_MAX_ROUNDS``). A provider that raises (OOM, unsupported) is dropped
    and its error returned, never fatal. Returns ({name: Stats in ms}, {name: error}).
    """
    errors: dict[str, str] = {}
    alive: dict[str, Callable[[], Any]] = {}
    gpu = torch.cuda.is_available()
    for name, fn in providers.items():  # warm-up (compiles, autotunes, allocates) outside the timed region
        try:
            for _ in range(1 if gpu else CPU_WARMUP):
                fn()
            sync()
            alive[name] = fn
        except Exception as e:
            errors[name] = _error(e)
            if gpu:
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in alive}
    if gpu:
        for _ in range(GPU_PASSES):
            for name in list(alive):
                try:
                    times[name] += _do_bench_all(alive[name], GPU_WARMUP_MS / GPU_PASSES, GPU_REP_MS / GPU_PASSES)
                except Exception as e:
                    errors[name] = _error(e)
                    alive.pop(name)
                    times.pop(name)
                    torch.cuda.empty_cache()
    else:
        rounds = rounds or env_rounds()
        start = time.perf_counter()
        n = 0
        while alive:
            for name in list(alive):
                t0 = time.perf_counter()
                try:
                    alive[name]()
                except Exception as e:
                    errors[name] = _error(e)
                    alive.pop(name)
                    times.pop(name)
                    continue
                times[name].append((time.perf_counter() - t0) * 1e3)
            n += 1
            if rounds is not None:
                if n >= rounds:
                    break
            elif n >= CPU_MAX_ROUNDS or (
                n >= CPU_MIN_ROUNDS and time.perf_counter() - start >= CPU_MIN_TIME_S * max(1, len(alive))
            ):
                break
    return {name: stats_of(t) for name, t in times.items() if t}, errors


# ---- memory --------------------------------------------------------------------------------


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+)", f.read())
    return int(m.group(1)) * 1024 if m else 0


def _malloc_trim() -> None:
    """Return freed heap pages to the OS, so the high-water mark of the next call starts from live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    base = _vm("VmRSS")
    fn()
    return max(0.0, (_vm("VmHWM") - base) / 2**20)


# ---- device limits -------------------------------------------------------------------------


def measure_bandwidth_gbps(nbytes: int | None = None) -> float:
    """Device copy bandwidth (read + write bytes / time) measured with a large fp32 tensor copy."""
    dev = device_kind()
    nbytes = nbytes or (1 << 28 if dev == "cuda" else 1 << 26)
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    st = measure_time(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (st.median * 1e-3) / 1e9


def measure_matmul_tflops(n: int | None = None) -> float:
    """Square matmul rate: bf16 n=8192 on a GPU (the dtype attention runs in there), fp32 n=1024 on a CPU."""
    dev = device_kind()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n = n or (8192 if dev == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    st = measure_time(lambda: a @ b)
    return 2 * n**3 / (st.median * 1e-3) / 1e12


_LIMITS: dict[str, Any] | None = None


def limits(measure: bool = False, results_dir: str | None = None) -> dict[str, Any]:
    """Device limits for % figures: measured if asked (cached in results/<device>/limits.json, CPU:
    local-limits.json), else the cache, else nominal figures for known GPUs, else ``{"source": "unknown"}``."""
    global _LIMITS
    if _LIMITS is not None and not measure:
        return _LIMITS
    path = limits_path(results_dir)
    if not measure and os.path.exists(path):
        with open(path) as f:
            _LIMITS = json.load(f)
            return _LIMITS
    if measure:
        gpu = device_kind() == "cuda"
        _LIMITS = {
            "bandwidth_gbps": measure_bandwidth_gbps(),
            "matmul_tflops": measure_matmul_tflops(),
            "matmul_dtype": "bfloat16" if gpu else "float32",
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
                "matmul_dtype": "bfloat16",
                "source": "nominal",
            }
            return _LIMITS
    _LIMITS = {"source": "unknown"}
    return _LIMITS


def set_limits(lim: dict[str, Any] | None) -> None:
    """Use ``lim`` for the % figures of the following cases (None: look them up again)."""
    global _LIMITS
    _LIMITS = lim


# ---- rows ----------------------------------------------------------------------------------


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (dtypes and other objects become strings)."""
    return json.loads(json.dumps(cfg, default=str))


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
    family: str = "",
) -> dict[str, Any]:
    if isinstance(stats, Stats):
        med, p20, p80 = stats.median, stats.p20, stats.p80
    else:
        med = p20 = p80 = stats
    return {
        "family": family,
        "op": op,
        "provider": provider,
        "mode": mode,
        "metric": metric,
        "x_name": x_name,
        "x_value": x_value,
        "median": med,
        "p20": p20,
        "p80": p80,
        "config": _jsonable(config),
        **{k: env[k] for k in ("device", "device_kind", "torch", "triton", "commit", "timestamp")},
    }


def write_rows(rows: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1, default=str)


def read_rows(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return json.load(f)


DERIVED = ("gbps", "pct_bandwidth", "tflops", "pct_peak_flops", "limits", "errors", "bound")


def case_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration that identifies a case (derived figures stripped)."""
    return {k: v for k, v in cfg.items() if k not in DERIVED}


def case_key(r: dict[str, Any]) -> tuple:
    """Rows with the same key measure the same case (any provider, any metric)."""
    cfg = json.dumps(case_config(r["config"]), sort_keys=True, default=str)
    return (r["device"], r["op"], r["mode"], r["x_name"], str(r["x_value"]), cfg)


def is_fastvl(provider: str) -> bool:
    return provider == "fastvl" or provider.startswith(("fastvl-", "fastvl_"))


def is_peer(provider: str) -> bool:
    return provider != EAGER and not is_fastvl(provider)


# ---- cases ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One benchmark point: several providers computing the same thing, measured side by side.

    ``providers`` maps a provider name (``eager``, ``compile``, ``fastvl``, ``fastvl-triton``, ``sdpa-flash``,
    ...) to a zero-argument callable. ``bytes_moved`` is the minimal traffic of the op (for GB/s and % of
    bandwidth), ``flops`` its arithmetic (for TFLOP/s and % of matmul peak); both optional. ``covers`` names
    the registry ops (``fastvl.backends.ops()``) the fastvl providers exercise (default: ``(op,)``).
    ``bound`` is ``"memory"`` or ``"compute"``: which device limit the % figure uses (default: compute when
    ``flops`` is given, else memory).
    """

    op: str
    mode: str  # fwd | bwd | full
    x_name: str
    x_value: Any
    providers: dict[str, Callable[[], Any]]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_moved: int | None = None
    flops: int | None = None
    covers: tuple[str, ...] = ()
    bound: str | None = None

    def covered_ops(self) -> tuple[str, ...]:
        return tuple(self.covers) or (self.op,)

    def limit_kind(self) -> str | None:
        if self.bound is not None:
            return self.bound
        if self.flops:
            return "compute"
        if self.bytes_moved:
            return "memory"
        return None


def run_case(
    case: Case,
    env: dict[str, str],
    *,
    memory: bool = True,
    rounds: int | None = None,
    family: str = "",
    skip: Iterable[str] = (),
) -> list[dict]:
    """Measure every provider of ``case`` (alternating, after warm-up), then each one's peak memory.

    Returns rows: ``time_ms`` per provider (config gets gbps / tflops and % of the device limit when the
    case declares bytes / flops), ``gbps`` / ``tflops`` rows, and ``memory_mb`` rows. Providers that fail
    are listed in ``case.config["errors"]``; providers named in ``skip`` are not run.
    """
    lim = limits()
    skip = set(skip)
    providers = {k: v for k, v in case.providers.items() if k not in skip}
    stats, errors = measure_providers(providers, rounds=rounds)
    if errors:
        case.config.setdefault("errors", {}).update(errors)
    bound = case.limit_kind()
    rows = []
    for name, st in stats.items():
        cfg = dict(case.config)
        if bound:
            cfg["bound"] = bound
        if case.bytes_moved:
            cfg["gbps"] = case.bytes_moved / (st.median * 1e-3) / 1e9
            if "bandwidth_gbps" in lim:
                cfg["pct_bandwidth"] = 100 * cfg["gbps"] / lim["bandwidth_gbps"]
        if case.flops:
            cfg["tflops"] = case.flops / (st.median * 1e-3) / 1e12
            if "matmul_tflops" in lim:
                cfg["pct_peak_flops"] = 100 * cfg["tflops"] / lim["matmul_tflops"]
        cfg["limits"] = lim.get("source", "unknown")
        rows.append(row(case.op, name, case.mode, "time_ms", case.x_name, case.x_value, st, cfg, env, family))
        for metric in ("gbps", "tflops"):
            if metric in cfg:
                rows.append(
                    row(
                        case.op,
                        name,
                        case.mode,
                        metric,
                        case.x_name,
                        case.x_value,
                        cfg[metric],
                        case.config,
                        env,
                        family,
                    )
                )
    if memory:
        for name, fn in providers.items():
            if name not in stats:
                continue
            try:
                mb = measure_peak_memory(fn)
            except Exception as e:
                case.config.setdefault("errors", {})[name] = "memory: " + _error(e)
                continue
            if mb is not None:
                rows.append(
                    row(case.op, name, case.mode, "memory_mb", case.x_name, case.x_value, mb, case.config, env, family)
                )
    return rows


# ---- summaries and tables ------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (case, fastvl provider): its time, eager's, the best peer's, the ratios, % of limit, memory.

    Ratios are ``other median / fastvl median`` (> 1: fastvl is faster). The best peer is the fastest
    provider that is neither eager nor fastvl; ``None`` when the case has no peer.
    """
    cases: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        cases.setdefault(case_key(r), {}).setdefault(r["provider"], {})[r["metric"]] = r
    out = []
    for provs in cases.values():
        times = {p: m["time_ms"] for p, m in provs.items() if "time_ms" in m}
        eager = times.get(EAGER)
        peers = {p: r for p, r in times.items() if is_peer(p)}
        best = min(peers, key=lambda p: peers[p]["median"]) if peers else None
        for p, r in times.items():
            if not is_fastvl(p):
                continue
            cfg = r["config"]
            bound = cfg.get("bound") or ("compute" if "tflops" in cfg else "memory" if "gbps" in cfg else None)
            pct = cfg.get("pct_peak_flops") if bound == "compute" else cfg.get("pct_bandwidth")
            mem = provs[p].get("memory_mb")
            emem = provs.get(EAGER, {}).get("memory_mb")
            t = r["median"]
            out.append(
                {
                    **{k: r.get(k) for k in ROW_FIELDS if k not in ("metric", "median", "p20", "p80", "config")},
                    "config": case_config(cfg),
                    "time_ms": t,
                    "p20": r["p20"],
                    "p80": r["p80"],
                    "eager_ms": eager["median"] if eager else None,
                    "best_peer": best,
                    "best_peer_ms": peers[best]["median"] if best else None,
                    "vs_eager": eager["median"] / t if eager and t else None,
                    "vs_best_peer": peers[best]["median"] / t if best and t else None,
                    "bound": bound,
                    "gbps": cfg.get("gbps"),
                    "tflops": cfg.get("tflops"),
                    "pct_limit": pct,
                    "limits": cfg.get("limits"),
                    "memory_mb": mem["median"] if mem else None,
                    "eager_memory_mb": emem["median"] if emem else None,
                }
            )
    return out


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def config_text(cfg: dict[str, Any]) -> str:
    """Compact ``k=v`` text of a case config (dtype shown bare)."""
    parts = []
    for k, v in cfg.items():
        if isinstance(v, str) and v.startswith("torch."):
            parts.append(v[len("torch.") :])
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each fastvl figure with eager's and the best peer's, the ratios, % of the device limit, memory."""
    lines = [
        "| op | mode | size | config | provider | time (ms) | eager (ms) | best peer (ms) | vs eager | vs best peer "
        "| throughput | % of limit | memory MB (fastvl / eager) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summarize(rows):
        peer = f"{s['best_peer']} {_num(s['best_peer_ms'])}" if s["best_peer"] else "none"
        if s["bound"] == "compute" and s["tflops"] is not None:
            thr = f"{s['tflops']:.3g} TFLOP/s"
        elif s["gbps"] is not None:
            thr = f"{s['gbps']:.3g} GB/s"
        else:
            thr = ""
        lim = ""
        if s["pct_limit"] is not None:
            what = "matmul" if s["bound"] == "compute" else "bandwidth"
            lim = f"{s['pct_limit']:.0f}% {what}" + (" (nominal)" if s["limits"] == "nominal" else "")
        mem = f"{_num(s['memory_mb'], '.1f')} / {_num(s['eager_memory_mb'], '.1f')}"
        lines.append(
            f"| {s['op']} | {s['mode']} | {s['x_name']}={s['x_value']} | {config_text(s['config'])} | {s['provider']} "
            f"| {_num(s['time_ms'])} | {_num(s['eager_ms'])} | {peer} | {_ratio(s['vs_eager'])} "
            f"| {_ratio(s['vs_best_peer'])} | {thr} | {lim} | {mem} |"
        )
    return "\n".join(lines)


def providers_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: every provider's median time (p20-p80), throughput and peak memory, per case."""
    cases: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        cases.setdefault(case_key(r), {}).setdefault(r["provider"], {})[r["metric"]] = r
    lines = [
        "| op | mode | size | config | provider | median ms (p20-p80) | GB/s | TFLOP/s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for provs in cases.values():
        for p, m in provs.items():
            t = m.get("time_ms")
            if t is None:
                continue
            mem = m.get("memory_mb")
            lines.append(
                f"| {t['op']} | {t['mode']} | {t['x_name']}={t['x_value']} | {config_text(case_config(t['config']))} "
                f"| {p} | {_num(t['median'])} ({_num(t['p20'])}-{_num(t['p80'])}) "
                f"| {_num(t['config'].get('gbps'), '.0f')} | {_num(t['config'].get('tflops'))} "
                f"| {_num(mem['median'] if mem else None, '.1f')} |"
            )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], baseline: str = EAGER) -> str:
    """The summary table of ``rows``, one section per device (CPU rows labelled, never in a GPU table)."""
    if baseline != EAGER:
        raise ValueError(f"markdown_table: baseline must be {EAGER!r} (the ratios are to eager and the best peer)")
    by_dev: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_dev.setdefault((r["device_kind"], r["device"]), []).append(r)
    parts = []
    for (kind, dev), rs in by_dev.items():
        label = f"CPU run on {dev}: CPU timings, not GPU figures" if kind == "cpu" else f"GPU: {dev}"
        parts.append(f"**{label}**\n\n{summary_table(rs)}")
    return "\n\n".join(parts)
