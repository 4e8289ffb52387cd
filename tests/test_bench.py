"""The benchmark suite on the CPU: a --quick smoke run of the real families (outputs, row schema), op
coverage of the registry, discovery / selection / model routing on toy families, summaries and the
README generator. Timings here are only checked for shape and consistency: figures live in benchmarks."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import runpy
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import torch
from fastvl.benchmarks import common, readme, static_sm90, suite

from fastvl import backends
from fastvl.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["bench", "--quick", "--max-cases", "1", "--rounds", "3", "--no-progress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CLI run of every family at --quick sizes, results in tmp: the first case of each family, 3 timing
    rounds (cold compile caches, 2 quiet cores: ~30 s; two cases per family took ~41 s). Every case's providers,
    bound and ops are checked without running them in test_families_follow_the_provider_convention."""
    root = tmp_path_factory.mktemp("results")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTVL_BENCH_RESULTS", str(root))
        common.set_limits(None)
        try:
            rc = cli_main([*SMOKE, "--out", str(out)])
        finally:
            common.set_limits(None)
    rows = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    return rc, root, out, rows


def test_smoke_run_writes_every_output(smoke):
    rc, root, out, rows = smoke
    assert rc == 0
    assert rows, "no rows written"
    md = (out / "results.md").read_text()
    assert "**CPU run**" in md and "not GPU figures" in md
    assert "vs eager" in md and "vs best peer" in md and "% of limit" in md
    for fam in {r["family"] for r in rows}:
        png = out / f"{fam}.png"
        assert png.exists(), f"no plot for family {fam}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lim = json.loads((root / common.device_slug() / "local-limits.json").read_text())
    assert lim["source"] == "measured" and lim["bandwidth_gbps"] > 0 and lim["matmul_tflops"] > 0


def test_smoke_rows_schema(smoke):
    _, _, _, rows = smoke
    for r in rows:
        assert set(r) == set(common.ROW_FIELDS), sorted(set(r) ^ set(common.ROW_FIELDS))
        for k in ("family", "op", "provider", "x_name", "device", "torch", "triton", "commit", "timestamp"):
            assert isinstance(r[k], str) and r[k], (k, r)
        assert r["mode"] in common.MODES
        assert r["metric"] in common.METRICS
        assert r["device_kind"] == "cpu" and r["device"].startswith("CPU")
        assert isinstance(r["x_value"], (int, float, str)) and not isinstance(r["x_value"], bool)
        for k in ("median", "p20", "p80"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] >= 0, (k, r)
        assert r["p20"] <= r["median"] <= r["p80"]
        assert isinstance(r["config"], dict)
        json.dumps(r["config"])
        dt.datetime.fromisoformat(r["timestamp"])
        if r["metric"] == "time_ms":
            assert r["median"] > 0
            assert r["config"]["limits"] == "measured"


FAMILIES = {
    "tokens",
    "attention",
    "layer_norm",
    "contrastive",
    "linear_cross_entropy",
    "masking",
    "models",
    "select",
    "merge",
    "tokred",
}
BOUND = {
    "tokens": "memory",
    "masking": "memory",
    "layer_norm": "memory",
    "select": "memory",
    "merge": "memory",
    "attention": "compute",
    "contrastive": "compute",
    "linear_cross_entropy": "compute",
    "models": "compute",
    "tokred": "compute",
}


def test_smoke_cases_measure_eager_compile_and_fastvl(smoke):
    _, _, _, rows = smoke
    assert {r["family"] for r in rows} == FAMILIES
    per_case = {}
    for r in rows:
        if r["metric"] == "time_ms":
            per_case.setdefault(common.case_key(r), {})[r["provider"]] = r
    assert len(per_case) == len(FAMILIES)
    for provs in per_case.values():
        assert {"eager", "fastvl"} <= set(provs)
    summary = common.summarize(rows)  # one entry per case and fastvl provider
    fastvl_rows = {(k, p) for k, provs in per_case.items() for p in provs if common.is_fastvl(p)}
    assert {(common.case_key(s), s["provider"]) for s in summary} == fastvl_rows
    for s in summary:
        provs = per_case[common.case_key(s)]
        mine = provs[s["provider"]]
        peers = {p: r["median"] for p, r in provs.items() if common.is_peer(p)}
        if s["family"] in ("models", "tokred"):  # no peer implements these models; no compile (bench_models.py)
            assert not peers and s["best_peer"] is None and s["vs_best_peer"] is None
        else:
            assert "compile" in peers  # torch.compile of the eager code is a peer wherever it runs
            assert s["best_peer"] == min(peers, key=peers.get)
            assert s["vs_best_peer"] == pytest.approx(peers[s["best_peer"]] / mine["median"])
        assert s["vs_eager"] == pytest.approx(provs["eager"]["median"] / mine["median"])
        assert s["bound"] == BOUND[s["family"]]
        # % of limit: of the matmul peak for compute-bound families, of the copy bandwidth for memory-bound ones
        lim = mine["config"]
        want = lim["pct_peak_flops"] if s["bound"] == "compute" else lim["pct_bandwidth"]
        assert s["pct_limit"] == want and s["pct_limit"] > 0 and s["memory_mb"] is not None
    mem = {(common.case_key(r), r["provider"]) for r in rows if r["metric"] == "memory_mb"}
    assert {(k, p) for k, provs in per_case.items() for p in provs} == mem


def test_every_registered_op_has_a_benchmark_case():
    disc = suite.discover("fastvl.benchmarks")
    assert not disc.errors, disc.errors
    cov, errors = suite.coverage(disc, quick=True)
    assert not errors, errors
    missing = [op for op in backends.ops() if not cov.get(op)]
    assert not missing, (
        f"registered ops with no benchmark case: {missing}; add a Case (covers=...) to a benchmarks/bench_*.py family"
    )


def test_families_follow_the_provider_convention():
    """Every case of every family at --quick sizes (generated, not run): one eager baseline, fastvl providers,
    the limit its % figure uses, and the ops it declares in OPS (what a selection by op name relies on)."""
    disc = suite.discover("fastvl.benchmarks")
    assert set(disc.families) == FAMILIES and "bench_data" in disc.skipped
    for fam in disc.families.values():
        gens = [fam.module.cases(True)]
        if fam.has_models():
            gens.append(fam.module.model_cases(list(fam.models), True))
        n = 0
        for case in (c for g in gens for c in g):
            n += 1
            names = set(case.providers)
            assert "eager" in names and any(common.is_fastvl(p) for p in names), (fam.name, names)
            assert case.limit_kind() == BOUND[fam.name], (fam.name, case.op)
            assert case.flops if BOUND[fam.name] == "compute" else case.bytes_moved, (fam.name, case.op)
            assert {case.op, *case.covered_ops()} <= fam.ops, (fam.name, case.op, case.covered_ops())
            assert case.mode in common.MODES
        assert n > 0, fam.name


def test_model_family_takes_models_by_name(capsys, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["bench", "--quick", "--list", "--models", "allinone-b,allinone-s,mac-b", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": " in line and "=" in line]
    assert [line.split(" providers")[0] for line in lines] == [
        "models: train_step full model=allinone-tiny",  # allinone-b and -s share the tiny config: measured once
        "models: train_step full model=mac-tiny",
    ]
    assert all("providers=eager,fastvl " in line and "bound=compute" in line for line in lines)
    assert cli_main(["bench", "--quick", "--list", "--models", "allinone-xl", "--out", str(out)]) == 2
    assert "unknown model(s) allinone-xl; known: allinone-b" in capsys.readouterr().out


def test_module_entry_point_lists_cases(tmp_path, monkeypatch, capsys):
    """``python -m benchmarks`` (run in-process: its __main__ from the checkout) with --list."""
    monkeypatch.setenv("FASTVL_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, "argv", ["benchmarks", "--quick", "--list", "--ops", "temporal_token_roll"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("tokens:")]
    assert lines and all("temporal_token_roll" in line for line in lines)
    assert "ops without a benchmark case:" in out


def test_unknown_op_name_is_an_error(capsys, tmp_path):
    assert cli_main(["bench", "--ops", "no_such_op", "--out", str(tmp_path), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "unknown name(s) no_such_op" in out and "tokens" in out


# ---- toy families: discovery, selection, model routing, best peer on real (sleep) timings ---------


def _write_pkg(base, name, files):
    d = base / name
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "common.py").write_text("from fastvl.benchmarks.common import Case  # noqa: F401\n")
    for fname, src in files.items():
        (d / fname).write_text(textwrap.dedent(src))
    return name


TOY = """
    import time
    from .common import Case

    FAMILY = "toy"

    def _sleep(ms):
        return lambda: time.sleep(ms / 1e3)

    def cases(quick):
        for n in (1, 2):
            provs = {"eager": _sleep(20 * n), "peer_slow": _sleep(12 * n), "peer_fast": _sleep(6 * n)}
            provs["fastvl"] = _sleep(2 * n)
            yield Case("toy_op", "fwd", "n", n, provs, {"n": n}, bytes_moved=10**6, covers=("toy_op",))
"""
MODELS = """
    import time
    from .common import Case

    FAMILY = "toymodels"
    MODELS = ("toy-s", "toy-b")

    def cases(quick):
        return iter(())

    def model_cases(names, quick):
        for name in names:
            yield Case("model_step", "full", "model", name, {"eager": lambda: time.sleep(0.002),
                       "fastvl": lambda: time.sleep(0.001)}, {"model": name}, covers=())
"""

DECLARED = """
    FAMILY = "declared"
    OPS = ("declared_op",)

    def cases(quick):
        raise RuntimeError("declared cases were built")
        yield
"""


@pytest.fixture
def toy_pkgs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FASTVL_BENCH_RESULTS", str(tmp_path / "results"))
    common.set_limits(None)
    lim = common.limits_path()  # cached limits (the smoke run measures real ones): keeps these runs short
    os.makedirs(os.path.dirname(lim))
    with open(lim, "w") as f:
        json.dump({"source": "measured", "bandwidth_gbps": 10.0, "matmul_tflops": 0.1, "matmul_dtype": "float32"}, f)
    plain = _write_pkg(
        tmp_path,
        "toybench_plain",
        {
            "bench_toy.py": TOY,
            "bench_broken.py": "raise RuntimeError('boom: a missing dependency')\n",
            "bench_helpers.py": "X = 1\n",
            "bench_badcases.py": "FAMILY = 'bad'\n\ndef cases(quick):\n    raise ValueError('bad shapes')\n    yield\n",
        },
    )
    models = _write_pkg(
        tmp_path, "toybench_models", {"bench_toy.py": TOY, "bench_models.py": MODELS, "bench_declared.py": DECLARED}
    )
    yield plain, models
    common.set_limits(None)
    for name in list(sys.modules):
        if name.startswith(("toybench_plain", "toybench_models")):
            sys.modules.pop(name)


def _run(pkg, *argv):
    args = suite.build_parser().parse_args(["--no-progress", "--rounds", "3", *argv])
    return suite.run(args, package=pkg)


def test_discovery_reports_broken_modules_and_runs_the_rest(toy_pkgs, tmp_path, capsys):
    plain, _ = toy_pkgs
    disc = suite.discover(plain)
    assert sorted(disc.families) == ["bad", "toy"]
    assert "boom: a missing dependency" in disc.errors["bench_broken"]
    assert "not a family module" in disc.skipped["bench_helpers"]
    out = tmp_path / "out"
    assert _run(plain, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "bench_broken: not used: RuntimeError: boom" in printed
    assert "family bad: its cases failed, skipped: ValueError: bad shapes" in printed
    assert "bad shapes" in (out / "results.md").read_text()
    rows = json.loads((out / "results.json").read_text())
    summary = common.summarize(rows)
    assert len(summary) == 2
    for s in summary:  # sleeps of 20n / 12n / 6n / 2n ms: margins far above timer and scheduling noise
        assert s["best_peer"] == "peer_fast"
        assert 1.5 < s["vs_best_peer"] < 3.5 and 4 < s["vs_eager"] < 11


def test_models_are_routed_to_the_model_family(toy_pkgs, tmp_path, capsys):
    plain, models = toy_pkgs
    assert _run(plain, "--models", "toy-s", "--out", str(tmp_path / "a")) == 2
    assert "no model benchmark family is registered yet" in capsys.readouterr().out
    assert _run(models, "--models", "nope", "--out", str(tmp_path / "b")) == 2
    assert "unknown model(s) nope" in capsys.readouterr().out
    out = tmp_path / "c"
    assert _run(models, "--models", "toy-b", "--out", str(out), "--no-memory") == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["family"], r["op"], r["x_value"]) for r in rows} == {("toymodels", "model_step", "toy-b")}


def test_selection_skips_families_whose_ops_do_not_match(toy_pkgs, tmp_path, capsys):
    _, models = toy_pkgs
    assert _run(models, "--ops", "toy_op", "--out", str(tmp_path / "a"), "--no-memory") == 0
    assert "declared cases were built" not in capsys.readouterr().out  # OPS names no toy_op: never built
    assert _run(models, "--ops", "declared_op", "--out", str(tmp_path / "b")) == 2
    assert (
        "family declared: its cases failed, skipped: RuntimeError: declared cases were built" in capsys.readouterr().out
    )


def test_selection_by_op_and_merge_of_reruns(toy_pkgs, tmp_path):
    plain, _ = toy_pkgs
    out = tmp_path / "out"
    assert _run(plain, "--ops", "toy_op", "--max-cases", "1", "--skip-providers", "peer_slow", "--out", str(out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert {r["x_value"] for r in first} == {1} and "peer_slow" not in {r["provider"] for r in first}
    assert _run(plain, "--ops", "toy", "--out", str(out), "--no-memory") == 0
    merged = json.loads((out / "results.json").read_text())
    times = [r for r in merged if r["metric"] == "time_ms"]
    assert len(times) == 8  # 2 cases x 4 providers, n=1 rows replaced, not duplicated
    assert any(r["metric"] == "memory_mb" for r in merged)  # kept from the first run (not re-measured)
    for r in merged:
        r["device"] = "another device"
    common.write_rows(merged, str(out / "results.json"))
    assert _run(plain, "--ops", "toy", "--out", str(out)) == 2  # never mixes devices in one file
    assert json.loads((out / "results.json").read_text()) == merged


def test_match_keeps_the_cases_whose_text_contains_a_string(toy_pkgs, tmp_path, capsys):
    plain, _ = toy_pkgs
    out = tmp_path / "out"
    assert _run(plain, "--ops", "toy", "--match", "n=2", "--out", str(out), "--no-memory") == 0
    assert {r["x_value"] for r in json.loads((out / "results.json").read_text())} == {2}
    assert _run(plain, "--ops", "toy", "--match", "n=7", "--out", str(tmp_path / "none"), "--no-memory") == 2
    assert "nothing was measured" in capsys.readouterr().out


def test_measure_providers_alternates_after_warmup_and_drops_failures():
    calls = []

    def fail():
        calls.append("bad")
        raise RuntimeError("unsupported")

    stats, errors = common.measure_providers(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": fail}, rounds=4
    )
    if not torch.cuda.is_available():
        warm = ["a"] * common.CPU_WARMUP + ["b"] * common.CPU_WARMUP + ["bad"]
        assert calls == warm + ["a", "b"] * 4
    assert set(stats) == {"a", "b"} and errors == {"bad": "RuntimeError: unsupported"}


def test_quantiles_and_stats():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert common.quantile(xs, 0.5) == 3.0
    assert common.quantile(xs, 0.2) == pytest.approx(1.8)
    assert common.quantile(xs, 0.8) == pytest.approx(4.2)
    st = common.stats_of([7.0])
    assert st.median == st.p20 == st.p80 == 7.0


def test_plots_skip_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    env = {**common.environment(), "device": "CPU (x)", "device_kind": "cpu"}
    rows = [common.row("op", "fastvl", "fwd", "time_ms", "n", 1, common.Stats(1.0, 0.9, 1.1), {}, env, "fam")]
    msg = suite.plot_family(rows, "fam", str(tmp_path / "fam.png"))
    assert msg and "matplotlib is not installed" in msg
    assert not (tmp_path / "fam.png").exists()


def test_plot_series_are_told_apart_by_the_fewest_keys():
    env = {**common.environment(), "device": "CPU (x)", "device_kind": "cpu"}

    def r(S, shape, causal, padded, B=2):
        cfg = {"shape": shape, "B": B, "S": S, "causal": causal, "padded": padded}
        return common.row("attn", "fastvl", "fwd", "time_ms", "S", S, common.Stats(1.0, 0.9, 1.1), cfg, env, "f")

    rows = [r(197, "quick", False, False), r(237, "quick", False, False)]
    rows += [r(237, "quick-causal", True, False), r(237, "quick-padded", False, True)]
    assert suite._series(rows) == (["shape"], True)  # shape names the series; causal / padded follow from it
    rows += [r(237, "quick", False, False, B=4)]  # a second batch size of the same shape: B separates it too
    assert suite._series(rows) == (["shape", "B"], True)
    styles = suite.provider_styles(["eager", "fastvl", "fastvl-triton", "compile", "sdpa"])
    assert styles["eager"][1] == "--" and styles["fastvl"][1] == styles["fastvl-triton"][1] == "-"
    assert styles["compile"][1] == styles["sdpa"][1] == ":" and len({c for c, _ in styles.values()}) == 5


def test_peak_memory_sees_an_allocation():
    if torch.cuda.is_available():
        pytest.skip("the CPU high-water mark path")
    mb = common.measure_peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum())
    assert mb is not None and 48 < mb < 512


# ---- summaries and the README section ----------------------------------------------------------


def _env(kind, device, commit="abc123", torch_v="2.11.0", triton_v="3.6.0"):
    return {
        "device": device,
        "device_kind": kind,
        "torch": torch_v,
        "triton": triton_v,
        "commit": commit,
        "timestamp": "2026-01-02T03:04:05+00:00",
    }


def _case_rows(env, times, x=197, mem=None):
    """Synthetic rows of one case (provider -> ms): the generator's input, not a measurement."""
    cfg = {"S": x, "dtype": "torch.bfloat16", "bound": "memory", "limits": "measured"}
    rows = []
    for p, t in times.items():
        rows.append(
            common.row(
                "flash_attention",
                p,
                "fwd",
                "time_ms",
                "S",
                x,
                common.Stats(t, t * 0.9, t * 1.1),
                {**cfg, "gbps": 100 / t, "pct_bandwidth": 50 / t},
                env,
                "attention",
            )
        )
        if mem:
            rows.append(
                common.row(
                    "flash_attention", p, "fwd", "memory_mb", "S", x, mem[p], common.case_config(cfg), env, "attention"
                )
            )
    return rows


def test_summarize_best_peer_and_ratios():
    env = _env("cuda", "NVIDIA H100 80GB HBM3")
    rows = _case_rows(
        env,
        {"eager": 4.0, "compile": 3.0, "sdpa-flash": 1.5, "fastvl": 1.0, "fastvl-triton": 2.0},
        mem={"eager": 10.0, "compile": 9.0, "sdpa-flash": 2.0, "fastvl": 1.0, "fastvl-triton": 1.0},
    )
    rows += _case_rows(env, {"eager": 2.0, "fastvl": 4.0}, x=785)
    s = {(r["provider"], r["x_value"]): r for r in common.summarize(rows)}
    assert set(s) == {("fastvl", 197), ("fastvl-triton", 197), ("fastvl", 785)}
    a = s[("fastvl", 197)]
    assert a["best_peer"] == "sdpa-flash" and a["vs_best_peer"] == 1.5 and a["vs_eager"] == 4.0
    assert a["memory_mb"] == 1.0 and a["eager_memory_mb"] == 10.0 and a["pct_limit"] == 50.0
    assert s[("fastvl-triton", 197)]["vs_best_peer"] == 0.75
    b = s[("fastvl", 785)]
    assert b["best_peer"] is None and b["vs_best_peer"] is None and b["vs_eager"] == 0.5
    table = common.markdown_table(rows)
    assert "**GPU: NVIDIA H100 80GB HBM3**" in table and "sdpa-flash 1.5" in table and "4.00x" in table


def test_readme_section_from_gpu_results_only(tmp_path):
    root = tmp_path / "benchmarks" / "results"
    gpu = _env("cuda", "NVIDIA H100 80GB HBM3")
    cpu = _env("cpu", "CPU (Some CPU, 2 cores)")
    d = root / "NVIDIA_H100_80GB_HBM3"
    d.mkdir(parents=True)
    rows = _case_rows(gpu, {"eager": 4.0, "compile": 3.0, "fastvl": 1.0})
    rows += _case_rows(gpu, {"eager": 2.0, "compile": 1.0, "fastvl": 1.6}, x=785)
    rows += _case_rows(cpu, {"eager": 40.0, "fastvl": 10.0}, x=629)
    common.write_rows(rows, str(d / "results.json"))
    (d / "limits.json").write_text(
        json.dumps(
            {
                "source": "measured",
                "bandwidth_gbps": 3000.0,
                "matmul_tflops": 700.0,
                "matmul_dtype": "bfloat16",
                "torch": "2.11.0",
                "commit": "abc123",
            }
        )
    )
    local = root / "CPU_Some" / "local-run"
    local.mkdir(parents=True)
    common.write_rows(_case_rows(cpu, {"eager": 40.0, "fastvl": 10.0}, x=1569), str(local / "results.json"))
    md = tmp_path / "README.md"
    md.write_text("# x\n\n## Performance\n\n<!-- perf:start -->\nold\n<!-- perf:end -->\n\n## Next\n")

    assert readme.main(["--readme", str(md), "--results", str(root), "--check"]) == 1
    assert readme.main(["--readme", str(md), "--results", str(root)]) == 0
    assert readme.main(["--readme", str(md), "--results", str(root), "--check"]) == 0
    text = md.read_text()
    section = text[text.index(readme.START) : text.index(readme.END)]
    assert "### NVIDIA H100 80GB HBM3" in section
    assert "torch 2.11.0, triton 3.6.0, fastvl commit `abc123`" in section
    assert "benchmarks/results/NVIDIA_H100_80GB_HBM3/results.json" in section
    assert "copy bandwidth 3000 GB/s" in section
    assert "S=197" in section and "S=785" in section
    assert "CPU (Some CPU" not in section and "S=629" not in section and "S=1569" not in section
    assert "2 CPU rows" in section  # the CPU rows of the GPU file are counted, never tabled
    assert "slower than eager or the best peer" in section and "S=785" in section.split("slower than")[1]
    assert text.startswith("# x\n") and text.endswith("<!-- perf:end -->\n\n## Next\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No GPU results are committed yet" in readme.render(str(empty), str(tmp_path))


def _static_rows() -> list[dict]:
    env = {**_env("static", static_sm90.LABEL), "commit": "abc123"}
    cfg = {"D": 64, "dtype": "bf16"}
    kernel = {
        "kernel": "_attn_fwd", "module": "attention", "launch": 0, "config": "BLOCK_M=128 BLOCK_N=64 w4 s3",
        "autotuned": True, "n_configs": 2, "grid": [2, 1152, 1], "programs": 2304, "num_warps": 4, "num_stages": 3,
        "registers": 240, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 24576, "target": "sm_90a",
        "wgmma": {"bf16": 32}, "mma_sync": {}, "dots": {"wgmma:bf16": 2}, "ld_global": {"2": 192}, "st_global": {},
        "cp_async": {}, "tma": 0, "blocks_per_sm": 2, "warps_per_sm": 8, "limit": "registers", "waves": 8.7,
        "mma": "wgmma bf16", "tile_loads": "ld 2B x3",
        "tiles": [{"line": "attention.py:183", "shape": "128x64", "dtype": "bf16", "how": "ld", "widths": [2]}],
    }  # fmt: skip
    spill = {**kernel, "config": "BLOCK_M=64 BLOCK_N=64 w4 s3", "registers": 255, "spill_stores": 24}
    rows = []
    for f in (kernel, spill):
        r = common.row("flash_attention", "fastvl-triton", "fwd", "static_kernel", "shape", "All-in-one-B padded+roll",
                       f["registers"], cfg, env, "attention")  # fmt: skip
        r["figures"] = f
        rows.append(r)
    # a case outside the readiness test (its failures are reported apart)
    merge = {**spill, "kernel": "_merge_kernel", "module": "merge", "wgmma": {}, "dots": {}, "tiles": []}
    r = common.row("merge_tokens", "fastvl-triton", "fwd", "static_kernel", "shape", "VATT-M joint", 255, cfg, env,
                   "merge")  # fmt: skip
    r["figures"] = merge
    rows.append(r)
    rep = {"rows": 96, "div": 16, "sms": 8, "bytes": 200, "issued": 200, "min_bytes": 100, "launches": 1}
    b = {
        "ratio": 1.9, "issued_ratio": 1.9, "bytes": 190e6, "min_bytes": 100e6, "rows": 96, "launches": 3,
        "triton_launches": 1, "per_kernel": {"_gather_kernel": 10**7}, "aten_ops": {"sum": 1}, "replays": [rep, rep],
    }  # fmt: skip
    r = common.row("drop_tokens", "fastvl-triton", "bwd", "static_bytes", "shape", "VATT-M", 1.9, cfg, env, "tokens")
    r["figures"] = b
    return rows + [r]


def test_static_checks_and_readme_section(tmp_path):
    rows = _static_rows()
    ready, other = static_sm90.readiness_rows(rows)
    assert [r["op"] for r in other] == ["merge_tokens"] and len(ready) == 3
    assert static_sm90.check(other)["resources"] == [
        "merge_tokens VATT-M joint fwd _merge_kernel [BLOCK_M=64 BLOCK_N=64 w4 s3]: spills 24 B stores / 0 B loads "
        "(255 regs)"
    ]
    fails = static_sm90.check(ready)
    assert (
        len(fails["resources"]) == 1
        and "BLOCK_M=64" in fails["resources"][0]
        and "spills 24 B" in fails["resources"][0]
    )
    assert len(fails["tile loads"]) == 2 and "128x64 bf16 at attention.py:183: ld 2-byte" in fails["tile loads"][0]
    assert not fails["wgmma"] and not fails["capture"]
    assert len(fails["bytes"]) == 1 and "1.90x the minimum bytes" in fails["bytes"][0]
    root = tmp_path / "benchmarks" / "results"
    common.write_rows(rows, str(root / static_sm90.DIR_NAME / "results.json"))
    md = tmp_path / "README.md"
    md.write_text(
        "# x\n\n<!-- perf:start -->\n<!-- perf:end -->\n\n## Performance, static\n\n"
        f"{readme.STATIC_START}\nold\n{readme.STATIC_END}\n\n## Next\n"
    )
    assert readme.main(["--readme", str(md), "--results", str(root), "--check"]) == 1
    assert readme.main(["--readme", str(md), "--results", str(root)]) == 0
    assert readme.main(["--readme", str(md), "--results", str(root), "--check"]) == 0
    text = md.read_text()
    section = text[text.index(readme.STATIC_START) : text.index(readme.STATIC_END)]
    assert "never timings" in section and "fastvl commit `abc123`" in section
    assert "benchmarks/results/sm_90-static/results.md" in section
    assert "**Hopper readiness checks** (`tests/test_static_sm90.py`): 4 failures" in section
    assert "The same checks on the other cases (not part of the test): 1 failures (resources 1)." in section
    assert (
        "| flash_attention | All-in-one-B padded+roll | fwd | _attn_fwd | 2 | 240-255 | 1 | 24 | 2 | 8.7 | wgmma bf16 |"
        in section
    )
    assert "| drop_tokens | VATT-M | bwd | 1.90x | 190.0 (100.0) | 3 (1 + 2) |" in section
    assert "No GPU results are committed yet" in text  # the GPU section ignores static rows
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No static report is committed yet" in readme.render_static(str(empty), str(tmp_path))


def test_static_report_command_line(capsys, tmp_path):
    assert cli_main(["bench", "--static", "sm90", "--list"]) == 0
    listed = capsys.readouterr().out
    for fam in ("attention", "contrastive", "layer_norm", "tokens"):
        assert f"{fam}: " in listed
    assert "temporal_token_roll All-in-one-B" in listed and "(bytes)" in listed
    assert cli_main(["bench", "--static", "sm80", "--out", str(tmp_path)]) == 2
    assert "unknown target 'sm80'" in capsys.readouterr().out
    assert cli_main(["bench", "--static", "sm90", "--ops", "no_such_op", "--out", str(tmp_path)]) == 2
    assert "no static case" in capsys.readouterr().out


def test_repository_readme_has_the_static_section():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "## Performance, static (sm_90 compiler figures, not timings)" in text
    assert readme.STATIC_START in text and readme.STATIC_END in text


@pytest.mark.slow
def test_gpu_session_script_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_session.sh without a GPU: says so, runs every step at tiny sizes, leaves its 7 files."""
    out = tmp_path / "session"
    env = {**os.environ, "FASTVL_SESSION_BUDGET": "1800", "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), str(out)],
        capture_output=True, text=True, env=env, timeout=2000,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no CUDA device here: dry run" in res.stdout
    files = sorted(os.listdir(out))
    assert files == ["env.txt", "limits.json", "plots.tar", "pytest_gpu.log", "results.json", "results.md",
                     "session.log"]  # fmt: skip
    log = (out / "session.log").read_text()
    assert "stopped at its" not in log and "exit status" not in log and "skipped" not in log, log[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert {r["device_kind"] for r in rows} == {"cpu"}
    assert {"tokens", "layer_norm", "attention", "contrastive", "models"} <= {r["family"] for r in rows}
    with tarfile.open(out / "plots.tar") as tar:
        assert {"tokens.png", "models.png"} <= {os.path.basename(n) for n in tar.getnames()}
    assert "test_gpu" in (out / "pytest_gpu.log").read_text()
    assert "dry run" in (out / "env.txt").read_text()


def test_repository_readme_performance_section_is_current():
    assert readme.main(["--check"]) == 0, "run: python benchmarks/readme.py"


def test_time_units_are_milliseconds():
    st = common.measure_time(lambda: time.sleep(0.01), warmup=0, rounds=3)
    assert 9 < st.median < 50


def test_gpu_timing_path_interleaves_do_bench_passes(monkeypatch):
    """The GPU branch's control flow with do_bench faked (no GPU here; the real path is untested on a CPU)."""
    import triton.testing

    seen = []

    def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        seen.append((calls[-1], warmup, rep, return_mode))
        return {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}[calls[-1]]

    calls = []
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(common, "sync", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    stats, errors = common.measure_providers({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    assert not errors
    assert [s[0] for s in seen] == ["a", "b"] * common.GPU_PASSES
    assert all(s[2] == pytest.approx(common.GPU_REP_MS / common.GPU_PASSES) and s[3] == "all" for s in seen)
    assert stats["a"].median == 2.0 and stats["b"].median == 5.0  # pooled over the passes
    assert stats["a"].p20 == pytest.approx(common.quantile([1.0, 2.0, 3.0] * common.GPU_PASSES, 0.2))


# ---- on a GPU (skipped on the CPU): the providers each family measures there, and a real run ---------------


@pytest.mark.gpu
def test_gpu_families_name_fastvl_kernels_and_peers():
    fams = suite.discover("fastvl.benchmarks").families
    att = list(fams["attention"].module.cases(True))
    plain = next(c for c in att if not c.config["padded"])
    assert {"eager", "compile", "sdpa-flash", "sdpa-efficient", "fastvl", "fastvl-triton"} <= set(plain.providers)
    padded = next(c for c in att if c.config["padded"])
    assert "sdpa-flash" not in padded.providers and {"sdpa", "fastvl", "fastvl-triton"} <= set(padded.providers)
    ln = next(iter(fams["layer_norm"].module.cases(True)))
    assert {"eager", "compile", "fastvl", "fastvl-triton"} <= set(ln.providers)
    for case in fams["contrastive"].module.cases(True):
        assert {"eager", "compile", "fastvl", "fastvl-chunked", "fastvl-triton"} <= set(case.providers)
        assert case.config["dtype"] == "torch.bfloat16"


@pytest.mark.gpu
def test_gpu_run_measures_fastvl_kernels_without_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVL_BENCH_RESULTS", str(tmp_path))
    common.set_limits(None)
    try:
        argv = ["bench", "--quick", "--ops", "attention,layer_norm,contrastive", "--max-cases", "3", "--no-progress"]
        assert cli_main([*argv, "--out", str(tmp_path / "run")]) == 0
    finally:
        common.set_limits(None)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {r["device_kind"] for r in rows} == {"cuda"}
    times = [r for r in rows if r["metric"] == "time_ms"]
    for r in times:
        assert not any(common.is_fastvl(p) for p in r["config"].get("errors", {})), r["config"]["errors"]
    provs = {(r["family"], r["provider"]) for r in times}
    for fam in ("attention", "layer_norm", "contrastive"):
        assert (fam, "fastvl-triton") in provs and (fam, "eager") in provs
    assert ("attention", "sdpa-flash") in provs
    for s in common.summarize(rows):
        assert s["pct_limit"] is not None and 0 < s["pct_limit"] < 150, s  # a unit slip would be off by 1000x
