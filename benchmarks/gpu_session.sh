#!/usr/bin/env bash
# One GPU session in one command: install fastvl, run the GPU tests, then the benchmark suite's core cases,
# and leave few files in OUTDIR (a lent machine returns at most 8).
#
#   bash benchmarks/gpu_session.sh OUTDIR
#
# Made for an H100 / H200 with the lent machine's image (Python 3.12, torch 2.11, Triton 3.6, nvcc 13.0; no
# flash-attn / xformers / apex, no registry, no internet) and a lease of 15 minutes in all, its start
# included: the whole script keeps to FASTVL_SESSION_BUDGET seconds of wall time (default 450, under 8
# minutes). Each step has its own limit and is stopped there (the next one still runs); a step that no longer
# fits is skipped and says so. Steps:
#   1. pip install --no-deps --no-build-isolation -e .   (builds fastvl._C for sm_90; on failure: without it)
#   2. pytest -m gpu                                       (bf16 numerics, the GPU paths)     -> pytest_gpu.log
#   3. the suite (torch.compile providers skipped: compiling every case would take the whole lease):
#      device limits; tokens (roll, DropToken, masking, gather); LayerNorm; attention at All-in-one-B (also
#      text-padded) and VATT-M; contrastive at B=32768; one training step of allinone-b
# OUTDIR gets: session.log (every step's output and time), pytest_gpu.log, results.json, results.md,
# limits.json, plots.tar (one PNG per family), env.txt (GPU, driver, versions, commit): 7 files.
#
# Without a CUDA device it says so and runs a dry run of the same steps at tiny sizes (no install; the GPU
# tests are only collected; --quick cases, one per family; each step may take 5x its limit), writes the same
# files and exits 0 (tests/test_bench.py runs it with a longer budget).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_session.sh OUTDIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
PY=${PYTHON:-python3}
BUDGET=${FASTVL_SESSION_BUDGET:-450}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastvl-session.XXXXXX")
LOG=$OUT/session.log
: >"$LOG"
export FASTVL_BENCH_RESULTS=$WORK/results PYTHONUNBUFFERED=1

say() { echo "[gpu_session $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S LOGFILE COMMAND...: run COMMAND for at most LIMIT_S x SLACK (less if the budget is shorter)
SLACK=1
step() {
    local name=$1 cap=$(($2 * SLACK)) log=$3
    shift 3
    local l t rc t0
    l=$(left)
    t=$((cap < l ? cap : l))
    if [ "$t" -lt 15 ]; then
        say "$name: skipped ($l s of the $BUDGET s budget left)"
        return 0
    fi
    say "$name (limit $t s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "$name: stopped at its $t s limit"
    elif [ $rc -ne 0 ]; then
        say "$name: exit status $rc after $(($(date +%s) - t0)) s"
    else
        say "$name: done in $(($(date +%s) - t0)) s"
    fi
    return 0
}

if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    GPU=1
    say "GPU session on $($PY -c 'import torch; print(torch.cuda.get_device_name())'), budget $BUDGET s"
else
    GPU=0
    SLACK=5 # CPU steps are slower than their GPU limits allow: the dry run gives each 5x (the budget still holds)
    say "no CUDA device here: dry run of the same steps at tiny sizes (CPU timings, not GPU figures)"
fi

# 1. install
if [ $GPU -eq 1 ]; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    step "install" 180 "$LOG" $PY -m pip install --no-deps --no-build-isolation -e .
    if ! $PY -c 'import fastvl' 2>>"$LOG"; then
        step "install without fastvl._C" 60 "$LOG" env FASTVL_SKIP_CUDA_BUILD=1 \
            $PY -m pip install --no-deps --no-build-isolation -e .
    fi
else
    say "install: dry run, not installing (would run: $PY -m pip install --no-deps --no-build-isolation -e .)"
    step "import fastvl" 60 "$LOG" $PY -c 'import fastvl; print("fastvl", fastvl.__file__)'
fi

# 2. GPU tests
: >"$OUT/pytest_gpu.log"
if [ $GPU -eq 1 ]; then
    step "pytest -m gpu" 150 "$OUT/pytest_gpu.log" $PY -m pytest -m gpu -q -rA -p no:cacheprovider --durations=15
else
    step "pytest -m gpu (collected only)" 120 "$OUT/pytest_gpu.log" \
        $PY -m pytest -m gpu -q --collect-only -p no:cacheprovider
fi

# 3. the suite's core cases, merged into one results.json
BENCH=($PY -m benchmarks --out "$WORK/bench" --no-progress --skip-providers compile)
if [ $GPU -eq 1 ]; then
    ATTENTION=(--match "shape=All-in-one-B,shape=VATT-M")
    CONTRASTIVE=(--match "B=32768")
    MODELS=()
else
    BENCH+=(--quick --max-cases 1 --rounds 1 --no-memory)
    ATTENTION=()
    CONTRASTIVE=()
    MODELS=(--quick)
fi
step "device limits" 40 "$LOG" "${BENCH[@]}" --limits
step "tokens" 60 "$LOG" "${BENCH[@]}" --ops tokens
step "layer_norm" 45 "$LOG" "${BENCH[@]}" --ops layer_norm
step "attention" 100 "$LOG" "${BENCH[@]}" --ops attention "${ATTENTION[@]}"
step "contrastive" 60 "$LOG" "${BENCH[@]}" --ops contrastive "${CONTRASTIVE[@]}"
step "allinone-b training step" 60 "$LOG" "${BENCH[@]}" --models allinone-b "${MODELS[@]}"

# collect
for f in results.json results.md; do
    if [ -f "$WORK/bench/$f" ]; then cp "$WORK/bench/$f" "$OUT/"; else say "no $f was written"; fi
done
lim=$(find "$WORK/results" -name '*limits.json' 2>/dev/null | head -n 1)
if [ -n "$lim" ]; then cp "$lim" "$OUT/limits.json"; else say "no limits.json was written"; fi
if ls "$WORK"/bench/*.png >/dev/null 2>&1; then
    tar -C "$WORK/bench" -cf "$OUT/plots.tar" $(cd "$WORK/bench" && ls ./*.png)
else
    say "no plots were written"
    tar -cf "$OUT/plots.tar" --files-from /dev/null
fi
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (dirty)')"
    $PY -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda)'
    $PY -c 'import triton; print("triton", triton.__version__)' 2>&1
    if [ $GPU -eq 1 ]; then
        nvidia-smi 2>&1
        nvcc --version 2>&1 | tail -n 2
    else
        echo "dry run: no CUDA device"
    fi
} >"$OUT/env.txt" 2>&1
rm -rf "$WORK"
say "finished in $(($(date +%s) - START)) s; in $OUT: $(ls "$OUT" | tr "\n" " ")"
exit 0
