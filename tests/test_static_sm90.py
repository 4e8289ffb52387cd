"""Hopper readiness without a GPU: the static sm_90 report (benchmarks/static_sm90.py) at the suite's shapes.

One fresh process (TRITON_INTERPRET unset: the launchers take their GPU paths) runs the ops at the readiness
shapes (the cases of benchmarks/static_cases.py marked ``acceptance``: attention at D=32/64/128, contrastive
at B=32768, LayerNorm, the token ops) under a CUDA view of CPU tensors, binds each launch as a CUDA device
would (16-byte aligned pointers and integers divisible by 16 get ``tt.divisibility``, integers equal to 1
become constants), compiles every autotune config the kernels' own pruning keeps for sm_90a in 2 processes
(each distinct binary once; Triton's cache is reused within the run and across runs) and replays the
memory-bound op calls in the interpreter to count their bytes. The checks, each a test:

* every config that can be launched fits in sm_90's 227 KB of shared memory per block and spills no register;
* every bf16/fp16 dot in the attention and contrastive kernels lowers to wgmma (no mma.sync, no FMA);
* attention q/k/v/o/dO tiles at D in {32, 64, 128} and the contrastive feature tiles load 16 bytes per thread
  or asynchronously (cp.async, TMA);
* a memory-bound op call (roll, gather and its backward, DropToken / masking and their backward with
  positions, LayerNorm forward and backward) moves at most 1.15x its minimum bytes.

The committed report (every case, every kernel of kernels/) is checked to hold every kernel the launchers
launch. The instrument itself is checked first on probe kernels with known answers (binding, vector widths,
cp.async, wgmma, byte counts), so a check cannot pass because the instrument went blind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from fastvl.benchmarks import static_capture, static_sm90
from fastvl.benchmarks.static_compile import occupancy, scan_llir, scan_ptx, scan_ttgir, tile_loads

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this Triton build has no NVIDIA backend",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_POISON")}


def _failures(items: list[str]) -> str:
    return f"{len(items)} failing:\n" + "\n".join(items)


# ---- the instrument on probe kernels ---------------------------------------------------------

_PROBE_KERNELS = """
import triton
import triton.language as tl


@triton.jit
def copy(X, Y, n, stride, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(Y + o * stride, tl.load(X + o * stride, mask=m), mask=m)


@triton.jit
def matmul(A, B, C, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * N + rn[None, :], acc.to(C.dtype.element_ty))
"""

_PROBE = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import probe_kernels as pk
from fastvl.benchmarks import static_capture as sc
from fastvl.benchmarks.static_compile import compile_job

out = {}
x = torch.randn(4096, dtype=torch.bfloat16)
y = torch.empty_like(x)
cap = sc.Capture(execute=True)
with sc.gpu_view(), cap:
    out["view"] = [str(x.device), x.is_cuda, torch.cuda.get_device_properties(0).multi_processor_count,
                   str(torch.empty(3, device=x.device).device)]
    rec = sc.record_call(cap, lambda: pk.copy[(4,)](x, y, 4096, 1, BLOCK=1024))
    pk.copy[(4,)](x[1:], y[1:], 4095, 1, BLOCK=1024)  # a misaligned pointer, n not a multiple of 16
    rec_glue = sc.record_call(cap, lambda: (x.float() * 2).sum(0))
a, b = torch.randn(256, 128).to(torch.bfloat16), torch.randn(128, 256).to(torch.bfloat16)
c = torch.empty(256, 256, dtype=torch.bfloat16)
mm = sc.Capture(execute=False)
with sc.gpu_view(), mm:
    pk.matmul[(2, 2)](a, b, c, 256, 256, 128, BM=128, BN=128, BK=64, num_warps=4, num_stages=3)
aligned, misaligned = cap.launches[:2]
out["aligned"] = {"signature": aligned.signature, "constexprs": {str(k): v for k, v in aligned.constexprs.items()},
                  "attrs": {str(k): v for k, v in aligned.attrs.items()}, "grid": aligned.grid}
out["misaligned_attrs"] = {str(k): v for k, v in misaligned.attrs.items()}
out["copy_bytes"] = [rec.bytes_unique(), rec.bytes_issued(), rec.n_launches(), bool(torch.equal(x, y))]
out["glue"] = [rec_glue.aten_read, rec_glue.aten_written, rec_glue.aten_launches, rec_glue.aten_ops]
out["copy_fig"] = compile_job(aligned.job())
out["misaligned_fig"] = compile_job(misaligned.job())
out["matmul_fig"] = compile_job(mm.launches[0].job())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    (d / "probe_kernels.py").write_text(_PROBE_KERNELS)
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, str(d)], capture_output=True, text=True, env=_env(), timeout=900, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_gpu_view_makes_cpu_tensors_look_like_one_h100(probe):
    assert probe["view"] == ["cuda:0", True, 132, "cuda:0"]


def test_launches_are_bound_as_on_a_cuda_device(probe):
    a = probe["aligned"]
    assert a["signature"] == {"X": "*bf16", "Y": "*bf16", "n": "i32", "stride": "constexpr", "BLOCK": "constexpr"}
    assert a["constexprs"] == {"(3,)": 1, "(4,)": 1024}  # stride == 1 is a constant
    div = [["tt.divisibility", 16]]
    assert a["attrs"]["(0,)"] == div and a["attrs"]["(1,)"] == div and a["attrs"]["(2,)"] == div
    assert a["grid"] == [4, 1, 1]
    m = probe["misaligned_attrs"]
    assert m["(0,)"] == [] and m["(1,)"] == [] and m["(2,)"] == []  # 2-byte offset pointers, n = 4095


def test_interpreted_replay_counts_bytes_and_runs_the_kernel(probe):
    unique, issued, launches, copied = probe["copy_bytes"]
    assert (unique, issued, launches, copied) == (2 * 4096 * 2, 2 * 4096 * 2, 1, True)
    read, written, launches, ops = probe["glue"]
    # x.float(): read 8 KB, write 16 KB; * 2: read 16 KB, write 16 KB; sum(0): read 16 KB, write 4 B
    assert (read, written, launches) == (8192 + 16384 + 16384, 16384 + 16384 + 4, 3), ops


def test_compiled_figures_see_vector_widths_async_tiles_and_wgmma(probe):
    cp, mis, mm = probe["copy_fig"], probe["misaligned_fig"], probe["matmul_fig"]
    for f in (cp, mis, mm):
        assert f["target"] == "sm_90a" and f["registers"] > 0 and f["spill_stores"] == 0, f
    assert set(cp["ld_global"]) == {"16"}, cp["ld_global"]  # 8 bf16 per thread per load
    assert "16" not in mis["ld_global"] and min(int(w) for w in mis["ld_global"]) == 2, mis["ld_global"]
    assert mm["wgmma"] and not mm["mma_sync"] and mm["dots"] == {"wgmma:bf16": 1}, mm
    # a and b: loaded by cp.async (pipelined: num_stages=3), each listed once
    assert sorted(t["shape"] for t in mm["tiles"]) == ["128x64", "64x128"], mm["tiles"]
    assert all(t["how"] in ("cp.async", "tma") for t in mm["tiles"]), mm["tiles"]
    assert mm["shared"] > 0


def test_occupancy_on_one_sm90_sm():
    assert occupancy(240, 24 * 1024, 4) == {"blocks_per_sm": 2, "warps_per_sm": 8, "limit": "registers"}
    assert occupancy(32, 0, 4)["blocks_per_sm"] == 16  # 64 warps
    assert occupancy(32, 100 * 1024, 4) == {"blocks_per_sm": 2, "warps_per_sm": 8, "limit": "shared memory"}
    assert occupancy(64, 228 * 1024, 4)["blocks_per_sm"] == 0
    assert occupancy(16, 0, 1) == {"blocks_per_sm": 32, "warps_per_sm": 32, "limit": "blocks"}


def test_tile_loads_are_matched_to_the_instructions_of_their_source_line():
    ttgir = textwrap.dedent(
        """\
        #loc3 = loc("/k/attn.py":12:3)
        #loc9 = loc("/k/attn.py":20:5)
        %a = tt.load %p, %m : tensor<64x64x!tt.ptr<bf16>, #blocked> loc(#loc12)
        %b = ttg.async_copy_global_to_local %q, %s : tensor<64x64x!tt.ptr<bf16>, #blocked> -> <64x64xbf16> loc(#loc9)
        %c = tt.load %r : tensor<64x!tt.ptr<f32>, #blocked1> loc(#loc3)
        %d = ttng.warp_group_dot %x, %y, %z : !ttg.memdesc<64x64xbf16, #shared> * !ttg.memdesc<64x64xbf16> -> x
        #loc12 = loc("a"(#loc13))
        #loc13 = loc(callsite(#loc3 at #loc9))
        """
    )
    llir = textwrap.dedent(
        """\
        %1 = tail call i16 asm sideeffect "ld.global.b16 { $0 }, [ $1 + 0 ];", "=c,l"(ptr addrspace(1) %0), !dbg !7
        %2 = tail call { i32, i32, i32, i32 } asm "ld.global.v4.b32 { $0, $1, $2, $3 }, [ $4 + 0 ];", "=r"(), !dbg !8
        tail call void asm sideeffect "cp.async.cg.shared.global [ $0 + 0 ], [ $1 + 0 ], 0x10, $2;", "r,l,r"(), !dbg !9
        %3 = load <4 x float>, ptr addrspace(1) %4, align 16, !dbg !10
        !1 = !DIFile(filename: "attn.py", directory: "/k")
        !5 = distinct !DISubprogram(name: "k", scope: !1, file: !1, line: 1)
        !6 = distinct !DILexicalBlockFile(scope: !5, file: !1, discriminator: 0)
        !7 = !DILocation(line: 12, column: 3, scope: !6, inlinedAt: !9)
        !8 = !DILocation(line: 12, column: 9, scope: !5)
        !9 = !DILocation(line: 20, column: 5, scope: !5)
        !10 = !DILocation(line: 30, column: 1, scope: !5)
        """
    )
    ptx = textwrap.dedent(
        """\
        .target sm_90a
        ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
        cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd4, %rd5, p, 1, 1, 0, 1;
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
        """
    )
    p, t, lines = scan_ptx(ptx), scan_ttgir(ttgir), scan_llir(llir)
    assert p["target"] == "sm_90a" and p["ld_global"] == {2: 1, 16: 1} and p["cp_async"] == {16: 1}
    assert p["wgmma"] == {"bf16": 1} and p["mma_sync"] == {"bf16": 1} and t["dots"] == {"wgmma:bf16": 1}
    assert lines == {("attn.py", 12): [("ld", 2), ("ld", 16)], ("attn.py", 20): [("cp.async", 16)],
                     ("attn.py", 30): [("ld", 16)]}  # fmt: skip
    tiles = tile_loads(t, lines)
    assert [(x["line"], x["shape"], x["how"], x["widths"]) for x in tiles] == [
        ("attn.py:12", "64x64", "ld", [2, 16]),
        ("attn.py:20", "64x64", "cp.async", [16]),
    ]


# ---- the committed report covers every kernel --------------------------------------------------


def _launched_kernels() -> dict[str, set[str]]:
    """{module: its @triton.jit functions no code of kernels/ calls}: the kernels the launchers launch."""
    kdir = os.path.join(ROOT, "kernels")
    sources = {}
    for name in sorted(os.listdir(kdir)):
        if name.endswith(".py"):
            with open(os.path.join(kdir, name)) as f:
                sources[name[:-3]] = f.read()
    everything = "\n".join(sources.values())
    out = {}
    for module, src in sources.items():
        jit = re.findall(r"@triton\.jit[^\n]*\n\s*def (\w+)\(", src)
        kernels = {k for k in jit if not re.search(rf"(?<!def )\b{k}\(", everything)}
        if kernels:
            out[module] = kernels
    return out


def test_committed_report_has_every_case_and_every_kernel_of_kernels_dir():
    """benchmarks/results/sm_90-static/ is the report of the current cases and kernels (regenerate it with
    ``fastvl bench --static sm90`` and the README section with ``python benchmarks/readme.py``)."""
    launched = _launched_kernels()
    assert set(launched) == set(static_capture.MODULES), "static_capture.MODULES must name every kernel module"
    with open(os.path.join(ROOT, "benchmarks", "results", static_sm90.DIR_NAME, "results.json")) as f:
        rows = json.load(f)
    assert {r["device"] for r in rows} == {static_sm90.LABEL} and {r["device_kind"] for r in rows} == {"static"}
    for k in ("torch", "triton", "commit", "timestamp"):
        assert all(r[k] for r in rows), k
    assert _cases_and_modes(rows) == {c.label: {"fwd", "bwd"} for c in static_sm90.cases()}
    seen: dict[str, set[str]] = {}
    for r in rows:
        if r["metric"] == "static_kernel":
            seen.setdefault(r["figures"]["module"], set()).add(r["figures"]["kernel"])
    missing = {m: sorted(ks - seen.get(m, set())) for m, ks in launched.items() if ks - seen.get(m, set())}
    assert not missing, f"kernels the committed static report never launched: {missing}"


# ---- the report at the suite's shapes --------------------------------------------------------


ACCEPTANCE = [c for c in static_sm90.cases() if c.acceptance]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of the readiness shapes only (the full report, every kernel of kernels/, is the command's:
    ``fastvl bench --static sm90``, committed under benchmarks/results/sm_90-static/)."""
    out = tmp_path_factory.mktemp("static")
    ops = ",".join(c.label for c in ACCEPTANCE)
    cmd = [sys.executable, "-m", "fastvl.benchmarks.static_sm90", "--ops", ops, "--out", str(out), "--jobs", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=3600, cwd=ROOT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    rows = json.loads((out / "results.json").read_text())
    return rows, static_sm90.check(rows), out


def _cases_and_modes(rows: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(f"{r['op']} {r['x_value']}", set()).add(r["mode"])
    return out


def test_report_covers_every_readiness_case(report):
    rows, failures, out = report
    assert not failures["capture"], _failures(failures["capture"])
    assert {r["device"] for r in rows} == {static_sm90.LABEL} and {r["device_kind"] for r in rows} == {"static"}
    assert _cases_and_modes(rows) == {c.label: {"fwd", "bwd"} for c in ACCEPTANCE}
    modules = {r["figures"]["module"] for r in rows if r["metric"] == "static_kernel"}
    assert modules == {"roll", "tokens", "attention", "layer_norm", "contrastive"}, modules
    bytes_cases = {f"{r['op']} {r['x_value']}" for r in rows if r["metric"] == "static_bytes"}
    assert bytes_cases == {c.label for c in ACCEPTANCE if c.memory_bound}
    md = (out / "results.md").read_text()
    assert f"# fastvl static report: {static_sm90.LABEL}" in md and "not timings" in md


def test_launchable_configs_fit_in_shared_memory_and_do_not_spill(report):
    failures = report[1]["resources"]
    assert not failures, _failures(failures)


def test_16bit_dots_in_attention_and_contrastive_lower_to_wgmma(report):
    failures = report[1]["wgmma"]
    assert not failures, _failures(failures)


def test_attention_and_contrastive_tiles_load_16_bytes_wide_or_asynchronously(report):
    failures = report[1]["tile loads"]
    assert not failures, _failures(failures)


def test_memory_bound_op_calls_move_at_most_1_15x_their_minimum_bytes(report):
    failures = report[1]["bytes"]
    assert not failures, _failures(failures)
