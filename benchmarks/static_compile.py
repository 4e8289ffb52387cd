"""Compile captured launches for sm_90a and read the figures a GPU run would depend on.

Per compiled binary: registers, spill stores / loads and stack frame (ptxas ``-v``), shared memory and warps
(Triton's metadata), the matrix instructions (``wgmma.mma_async`` = Hopper MMA, ``mma.sync`` = Ampere-style,
by operand type; the TTGIR's ``tt.dot`` / ``warp_group_dot`` ops and their operand types) and the global
memory traffic instructions (``ld.global`` / ``st.global`` by width in bytes, ``cp.async`` by copy size,
``cp.async.bulk.tensor`` = TMA). *Tile loads* are the TTGIR loads of rank >= 2 floating-point tiles
(``tt.load``, ``ttg.async_copy_global_to_local``, descriptor / TMA loads); each is matched by its source line
(TTGIR ``loc`` -> the LLVM IR's debug locations) to the instructions that implement it (``ld.global`` with
its width, ``cp.async`` with its copy size, ``cp.async.bulk.tensor``), so a tile is reported with the
widths it is really loaded with. Occupancy on one sm_90 SM (65536 registers, 228 KB shared memory with 227 KB
per block and 1 KB reserved per block, 64 warps, 32 blocks) is computed from these figures.

Figures are cached beside the binary in Triton's cache (``static_sm90.json``): a rerun that hits Triton's cache
(where ptxas does not run) reads them there, or compiles the launch once more in a scratch cache to get them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections import Counter
from typing import Any

REGS_PER_SM = 65536
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED = 1024  # per block, by the driver
SMEM_UNIT = 128
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
NUM_SMS = 132
ANALYSIS_FILE = "static_sm90.json"
ANALYSIS_VERSION = 3  # bump whenever the figures read from a binary change: cached figures are keyed by it


def occupancy(regs: int, smem: int, warps: int) -> dict[str, Any]:
    """Blocks and warps per SM from registers per thread, shared bytes per block and warps per block."""
    if smem > SMEM_PER_BLOCK:
        return {"blocks_per_sm": 0, "warps_per_sm": 0, "limit": "shared memory > 227 KB per block"}
    per_warp = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // per_warp) // warps
    alloc = math.ceil((smem + SMEM_RESERVED) / SMEM_UNIT) * SMEM_UNIT
    by_smem = SMEM_PER_SM // alloc
    by_warps = WARPS_PER_SM // warps
    limits = {"warps": by_warps, "blocks": BLOCKS_PER_SM, "shared memory": by_smem, "registers": by_regs}
    blocks = min(limits.values())
    limit = next(k for k, v in limits.items() if v == blocks)  # a tie names the hardware limit first
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "limit": limit}


# ---- ptxas -----------------------------------------------------------------------------------

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas(log: str) -> dict[str, int] | None:
    out = {}
    for k, rx in _PTXAS.items():
        m = rx.search(log)
        if m is None:
            return None
        out[k] = int(m.group(1))
    return out


def run_ptxas(ptx: str, arch: str) -> dict[str, int] | None:
    """ptxas -v on ``ptx`` with Triton's bundled ptxas (used when the binary came from Triton's cache)."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path if "arch" in get_ptxas.__code__.co_varnames else get_ptxas().path
    except Exception:
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", "-lineinfo", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
            capture_output=True,
            text=True,
        )
    return parse_ptxas(res.stdout + res.stderr)


# ---- PTX -----------------------------------------------------------------------------------

_LD = re.compile(r"\bld\.global((?:\.[a-z0-9:_]+)*)")
_ST = re.compile(r"\bst\.global((?:\.[a-z0-9:_]+)*)")
_CP = re.compile(
    r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.[a-z0-9:_]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)
_TMA = re.compile(r"\bcp\.async\.bulk\.tensor\.\d+d")
_WGMMA = re.compile(r"\bwgmma\.mma_async[.a-z0-9_]*?\.(f16|bf16|tf32|e4m3|e5m2|s8|u8)\.")
_MMA = re.compile(r"\bmma\.sync\.aligned\.[a-z0-9.]*?\.(f16|bf16|tf32|f64|s8|u8|e4m3|e5m2)\.")


def _width(suffixes: str) -> int | None:
    """Bytes per access of an ld/st.global: vector count times element bits."""
    parts = suffixes.split(".")
    vec = 1
    bits = None
    for p in parts:
        if p in ("v2", "v4", "v8"):
            vec = int(p[1:])
        m = re.fullmatch(r"[bsuf](8|16|32|64|128)", p)
        if m:
            bits = int(m.group(1))
    return None if bits is None else vec * bits // 8


def scan_ptx(ptx: str) -> dict[str, Any]:
    """Counts of the global memory and MMA instructions of a PTX module (by width / operand type)."""
    ld, st, cp = Counter(), Counter(), Counter()
    tma = 0
    wgmma, mma = Counter(), Counter()
    target = None
    for line in ptx.splitlines():
        if target is None and line.strip().startswith(".target"):
            target = line.split()[1].rstrip(",")
        if "ld.global" in line:
            m = _LD.search(line)
            w = _width(m.group(1)) if m else None
            if w:
                ld[w] += 1
        elif "st.global" in line:
            m = _ST.search(line)
            w = _width(m.group(1)) if m else None
            if w:
                st[w] += 1
        elif "cp.async.bulk.tensor" in line and _TMA.search(line) and "shared" in line.split("[")[0]:
            tma += 1
        elif "cp.async" in line:
            m = _CP.search(line)
            if m:
                cp[int(m.group(1), 0)] += 1
        if "wgmma.mma_async" in line:
            m = _WGMMA.search(line)
            wgmma[m.group(1) if m else "?"] += 1
        elif "mma.sync" in line:
            m = _MMA.search(line)
            mma[m.group(1) if m else "?"] += 1
    return {
        "target": target,
        "ld_global": dict(sorted(ld.items())),
        "st_global": dict(sorted(st.items())),
        "cp_async": dict(sorted(cp.items())),
        "tma": tma,
        "wgmma": dict(wgmma),
        "mma_sync": dict(mma),
    }


# ---- LLVM IR: which source line each global load comes from ---------------------------------

_MD = re.compile(r"^!(\d+) = (?:distinct )?!(\w+)\((.*)\)\s*$")
_DBG = re.compile(r"!dbg !(\d+)\s*$")
_LLVM_LOAD = re.compile(r"= load (<(\d+) x ([a-z0-9]+)>|[a-z0-9]+), ptr addrspace\(1\)")
_BITS = {"i8": 8, "i16": 16, "half": 16, "bfloat": 16, "i32": 32, "float": 32, "i64": 64, "double": 64}


def scan_llir(llir: str) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """(file, line) -> [(kind, bytes)] for every global load ('ld'), cp.async and TMA copy ('tma') of the
    module. The LLVM IR keeps each instruction's source location as Triton emitted it (the PTX's ``.loc`` can
    move when the backend schedules loads), so a tile load is matched to the instructions that implement it."""
    md: dict[str, tuple[str, str]] = {}
    lines = llir.splitlines()
    for line in lines:
        m = _MD.match(line)
        if m:
            md[m.group(1)] = (m.group(2), m.group(3))

    def field(body: str, name: str) -> str | None:
        m = re.search(rf"\b{name}: (!?)(\"[^\"]*\"|\d+)", body)
        return m.group(2).strip('"') if m else None

    def file_of(ref: str | None, depth: int = 0) -> str | None:
        if ref is None or ref not in md or depth > 32:
            return None
        kind, body = md[ref]
        if kind == "DIFile":
            return field(body, "filename")
        f = field(body, "file")
        return file_of(f, depth + 1) if f else file_of(field(body, "scope"), depth + 1)

    out: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for line in lines:
        d = _DBG.search(line)
        if d is None:
            continue
        item = None
        if "cp.async.bulk.tensor" in line:
            item = ("tma", 0)
        elif "ld.global" in line and "asm" in line:
            m = _LD.search(line)
            w = _width(m.group(1)) if m else None
            item = ("ld", w) if w else None
        elif "cp.async.c" in line:
            m = _CP.search(line.replace("$", "%"))
            item = ("cp.async", int(m.group(1), 0)) if m else None
        else:
            m = _LLVM_LOAD.search(line)
            if m:
                n, ty = (int(m.group(2)), m.group(3)) if m.group(2) else (1, m.group(1))
                item = ("ld", n * _BITS.get(ty, 0) // 8) if ty in _BITS else None
        if item is None:
            continue
        kind, body = md.get(d.group(1), ("", ""))
        ln = field(body, "line") if kind == "DILocation" else None
        fname = file_of(field(body, "scope")) if ln else None
        if ln and fname:
            out.setdefault((fname, int(ln)), []).append(item)
    return out


# ---- TTGIR ---------------------------------------------------------------------------------

_LOCDEF = re.compile(r"^#(loc\d*)\s*=\s*loc\((.*)\)\s*$")
_FLOAT = ("bf16", "f16", "f32", "tf32", "f64")


def _loc_table(ttgir: str) -> dict[str, tuple[str, int] | None]:
    raw = {}
    for line in ttgir.splitlines():
        m = _LOCDEF.match(line)
        if m:
            raw[m.group(1)] = m.group(2)
    memo: dict[str, tuple[str, int] | None] = {}

    def resolve(body: str, depth: int = 0) -> tuple[str, int] | None:
        if depth > 64:
            return None
        m = re.match(r'^"([^"]+)":(\d+):\d+', body)
        if m:
            return (m.group(1), int(m.group(2)))
        m = re.match(r"^callsite\(#(loc\d*) at #(loc\d*)\)", body)
        if m:  # the op's own location is the callee's line
            return ref(m.group(1), depth + 1)
        m = re.match(r'^"[^"]*"\(#(loc\d*)\)', body)
        if m:
            return ref(m.group(1), depth + 1)
        m = re.match(r"^fused\[#(loc\d*)", body)
        if m:
            return ref(m.group(1), depth + 1)
        return None

    def ref(name: str, depth: int) -> tuple[str, int] | None:
        if name not in memo:
            memo[name] = None
            memo[name] = resolve(raw.get(name, ""), depth)
        return memo[name]

    return {name: ref(name, 0) for name in raw}


_TILE_OPS = {
    "tt.load": "sync",
    "ttg.async_copy_global_to_local": "cp.async",
    "ttng.async_tma_copy_global_to_local": "tma",
    "tt.descriptor_load": "tma",
    "tt.experimental_descriptor_load": "tma",
}
_TENSOR = re.compile(r"tensor<((?:\d+x)+)(?:!tt\.ptr<)?([a-z0-9]+)")
_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*?:\s*(?:tensor|!ttg\.memdesc)<(?:\d+x)+([a-z0-9]+)")


def scan_ttgir(ttgir: str) -> dict[str, Any]:
    """Tile loads (rank >= 2 float tiles) with their source line, and the dot ops with their operand type."""
    locs = _loc_table(ttgir)
    tiles = []
    dots = Counter()
    for line in ttgir.splitlines():
        s = line.strip()
        m = _DOT.search(s)
        if m:
            dots[("wgmma" if "warp_group" in m.group(1) else "dot", m.group(2))] += 1
            continue
        op = next((o for o in _TILE_OPS if re.search(rf"(^|=\s*){re.escape(o)}\s", s)), None)
        if op is None:
            continue
        kind = _TILE_OPS[op]
        tys = [(dims, ty) for dims, ty in _TENSOR.findall(s)]
        tile = next(((d, t) for d, t in tys if d.count("x") >= 2 and t in _FLOAT), None)
        if tile is None and kind == "tma":
            tile = next(((d, t) for d, t in tys if t in _FLOAT), None)
        if tile is None:
            continue
        lm = re.search(r"loc\(#(loc\d*)\)\s*$", s)
        where = locs.get(lm.group(1)) if lm else None
        tiles.append({"op": op, "kind": kind, "shape": tile[0].rstrip("x"), "dtype": tile[1], "where": where})
    return {"tiles": tiles, "dots": {f"{k[0]}:{k[1]}": n for k, n in dots.items()}}


def tile_loads(ttgir_scan: dict[str, Any], by_line: dict[tuple[str, int], list[tuple[str, int]]]) -> list[dict]:
    """Each tile load with how it is issued: 'tma', 'cp.async' or 'ld' and the widths in bytes
    (``by_line``: :func:`scan_llir`)."""
    out: list[dict[str, Any]] = []
    for t in ttgir_scan["tiles"]:
        where = t["where"]
        insts = []
        if where is not None:
            name = where[0].split("/")[-1]
            for (f, ln), items in by_line.items():
                if ln == where[1] and f.split("/")[-1] == name:
                    insts += items
        kinds = sorted({k for k, _ in insts})
        widths = sorted({w for k, w in insts if k in ("ld", "cp.async")})
        if "tma" in kinds:
            how = "tma"
        elif "cp.async" in kinds:
            how = "cp.async"
        elif "ld" in kinds:
            how = "ld"
        else:
            how = "unmatched"
        line = f"{where[0].split('/')[-1]}:{where[1]}" if where else "?"
        entry = {"line": line, "shape": t["shape"], "dtype": t["dtype"], "how": how, "widths": widths}
        if entry not in out:  # a pipelined load appears once per prologue stage and once in the loop
            out.append(entry)
    return out


# ---- one compile ---------------------------------------------------------------------------


def _cached(kernel) -> dict | None:
    from triton.runtime.cache import get_cache_manager

    path = get_cache_manager(kernel.metadata.hash).get_file(ANALYSIS_FILE)
    if path is None:
        return None
    with open(path) as f:
        data = json.load(f)
    return data if data.get("version") == ANALYSIS_VERSION else None


def _store(kernel, data: dict) -> None:
    from triton.runtime.cache import get_cache_manager

    with contextlib.suppress(Exception):
        get_cache_manager(kernel.metadata.hash).put(json.dumps(data), ANALYSIS_FILE, binary=False)


def _compile(src, options: dict[str, Any]):
    """triton.compile for sm_90a, with ptxas's ``-v`` report captured (empty when Triton's cache served it)."""
    import triton
    from triton import knobs

    from .static_capture import target

    log = io.StringIO()
    dump = getattr(knobs.nvidia, "dump_ptxas_log", None)
    if dump is not None:
        knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target(), options=dict(options))
    finally:
        if dump is not None:
            knobs.nvidia.dump_ptxas_log = dump
    return kernel, log.getvalue()


@contextlib.contextmanager
def _fresh_cache():
    import tempfile

    from triton import knobs

    old = knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="fastvl-static-cache-") as d:
        knobs.cache.dir = d
        try:
            yield
        finally:
            knobs.cache.dir = old


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one captured launch for sm_90a; return its figures (or ``{"error": ...}``)."""
    from triton.compiler import ASTSource

    from .static_capture import jit_function

    try:
        src = ASTSource(jit_function(job["kernel"]), job["signature"], job["constexprs"], job["attrs"])
        kernel, log = _compile(src, job["options"])
    except Exception as e:  # a launch that does not compile is a finding, not a crash
        return {"error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
    data = _cached(kernel)
    if data is not None:
        return data
    ptxas = parse_ptxas(log)
    if ptxas is None:  # the binary came from Triton's cache: compile it once more, aside, for ptxas's report
        with _fresh_cache():
            ptxas = parse_ptxas(_compile(src, job["options"])[1])
    ptx = kernel.asm["ptx"]
    ptx_scan = scan_ptx(ptx)
    ptxas = ptxas or run_ptxas(ptx, ptx_scan["target"] or "sm_90a")
    ttgir_scan = scan_ttgir(kernel.asm["ttgir"])
    data = {
        "version": ANALYSIS_VERSION,
        "target": ptx_scan["target"],
        **(ptxas or {"registers": None, "spill_stores": None, "spill_loads": None, "stack": None}),
        "shared": int(kernel.metadata.shared),
        "num_warps": int(kernel.metadata.num_warps),
        "num_stages": int(job["options"].get("num_stages", 0)),
        "wgmma": ptx_scan["wgmma"],
        "mma_sync": ptx_scan["mma_sync"],
        "dots": ttgir_scan["dots"],
        "ld_global": {str(k): v for k, v in ptx_scan["ld_global"].items()},
        "st_global": {str(k): v for k, v in ptx_scan["st_global"].items()},
        "cp_async": {str(k): v for k, v in ptx_scan["cp_async"].items()},
        "tma": ptx_scan["tma"],
        "tiles": tile_loads(ttgir_scan, scan_llir(kernel.asm["llir"])),
    }
    if ptxas is not None:
        _store(kernel, data)
    return data


def compile_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Compile ``jobs`` in ``workers`` fresh processes (spawned: no interpreter state, TRITON_INTERPRET unset)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(compile_job, jobs, chunksize=1))
