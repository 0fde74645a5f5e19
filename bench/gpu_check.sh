#!/usr/bin/env bash
# One-shot GPU check of the fused MGG kernels (run once on a lent GPU; every step time-boxed).
#
#   OUT=dir bash bench/gpu_check.sh            # everything: at most 9.5 minutes of time boxes
#   QUICK=1 OUT=dir bash bench/gpu_check.sh    # at most 6 minutes: no f=16/32 or bf16-memory
#                                              # sweeps, no multi-head steps, no other benchmarks
#   DRY_RUN=1 bash bench/gpu_check.sh          # any machine, no GPU: every pytest step only
#                                              # collects (imports, -k filters); no install
#
# 1. versions: nvidia-smi, torch, triton                                  -> env.txt
# 2. GPU tests (no TRITON_INTERPRET): tests/test_kernels_step.py, tests/test_kernels_forward.py
#    and every test file with a CUDA-only test                            -> gpu_tests.txt
# 3. fused-step benchmarks (JSON) + summary against DESIGN.md             -> bench_fused.json,
#    bench_fused.txt, summary.md (fused, bf16 memory, reference and Adam(fused=True) at 38,400 /
#    1 M / 8 M coords, CUDA-graph replay, copy-bandwidth yardstick, memory, BLOCK x warps sweeps,
#    multi-head steps)
# 4. (not QUICK) the rest of bench/                                       -> bench_other.json/.txt
# A failing or timed-out step is recorded and the script goes on, then exits 1.
# PYTHON: an interpreter with torch, triton, pytest and pytest-benchmark (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
DRY_RUN="${DRY_RUN:-0}"
status=0

{
    date -u
    nvidia-smi || echo "nvidia-smi not available"
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, '| triton', triton.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
    echo "QUICK=$QUICK DRY_RUN=$DRY_RUN commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} 2>&1 | tee "$OUT_DIR/env.txt"

# mgg_fast.kernels exists only once installed (package-dir mapping of kernels/). The GPU machine is
# offline and may hold other torch/triton versions than the pins: install without dependencies,
# and if even that fails, import from a copy laid out as installed (PYTHONSAFEPATH keeps the
# checkout's own mgg_fast/, which lacks kernels/, off sys.path).
if [ "$DRY_RUN" != 1 ] && ! $PY -c "import mgg_fast.kernels" 2>/dev/null; then
    $PY -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -3 || true
fi
if ! $PY -c "import mgg_fast.kernels" 2>/dev/null; then
    shim=$(mktemp -d)
    cp -r mgg_fast "$shim/mgg_fast"
    cp -r kernels "$shim/mgg_fast/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
$PY -c "import mgg_fast.kernels as k; print('mgg_fast.kernels from', k.__file__)" 2>&1 | tee -a "$OUT_DIR/env.txt"

pytest_args=(-p no:cacheprovider)
[ "$DRY_RUN" = 1 ] && pytest_args+=(--collect-only -q)

run() {  # run <seconds> <log> <command...>: time-boxed, logged, failure recorded
    local seconds=$1 log=$2
    shift 2
    echo "== (at most ${seconds}s) $*" | tee "$OUT_DIR/$log"
    if ! timeout "$seconds" "$@" 2>&1 | tee -a "$OUT_DIR/$log"; then
        echo "!! FAILED or timed out: $*" | tee -a "$OUT_DIR/$log"
        status=1
    fi
}

# the kernel tests, and every test file that has a CUDA-only test or runs on CUDA when it is there
mapfile -t gpu_tests < <({
    echo tests/test_kernels_step.py
    echo tests/test_kernels_forward.py
    grep -lE '^\s*(@pytest\.mark\.skipif\()?\s*not torch\.cuda\.is_available\(\)|mark\.gpu|"cuda" if torch\.cuda\.is_available\(\)' \
        tests/*.py || true
} | sort -u)
# every new (sizes, dtype, BLOCK, warps) compiles for 1-3 s: spread the tests over workers if xdist is there
workers=()
[ "$DRY_RUN" != 1 ] && $PY -c "import xdist" 2>/dev/null && workers=(-n 4)
filter="not 1M-16 and not 1M-32 and not bf16memory and not heads"
tests_box=120 fused_box=240
if [ "$QUICK" != 1 ]; then
    filter="" tests_box=150 fused_box=330
fi
run "$tests_box" gpu_tests.txt $PY -m pytest "${gpu_tests[@]}" "${workers[@]}" "${pytest_args[@]}" -rs --durations=5
run "$fused_box" bench_fused.txt $PY -m pytest bench/test_bench_fused.py --benchmark-only "${pytest_args[@]}" \
    ${filter:+-k "$filter"} --benchmark-json="$OUT_DIR/bench_fused.json"
if [ -s "$OUT_DIR/bench_fused.json" ]; then
    $PY bench/summarize_fused.py "$OUT_DIR/bench_fused.json" >"$OUT_DIR/summary.md" || status=1
fi
if [ "$QUICK" != 1 ]; then
    run 100 bench_other.txt $PY -m pytest bench/ --benchmark-only "${pytest_args[@]}" \
        --ignore=bench/test_bench_fused.py --benchmark-json="$OUT_DIR/bench_other.json"
fi

[ -s "$OUT_DIR/summary.md" ] && cat "$OUT_DIR/summary.md"  # last, so the summary ends the output
echo "results in $OUT_DIR (status $status)"
exit "$status"
