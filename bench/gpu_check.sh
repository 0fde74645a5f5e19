#!/usr/bin/env bash
# One-shot GPU check of the fused MGG kernels (run once on a lent H100; < 10 minutes, usually about 5).
#
#   bash bench/gpu_check.sh            # writes to ${OUT:-bench/out}
#   QUICK=1 bash bench/gpu_check.sh    # skips step 5, the f=16/32 sweeps and the multi-head steps
#                                      # (about 3 minutes less)
#
# 1. versions: nvidia-smi, torch, triton          -> env.txt
# 2. kernel tests on the GPU (no TRITON_INTERPRET) -> kernel_tests.txt
# 3. fused-step benchmarks (JSON) + summary        -> bench_fused.json, bench_fused.txt, summary.md
#    (fused vs reference vs Adam(fused=True) at 38,400 / 1 M / 8 M coords, the opt-in bf16 memory
#    matrices, CUDA-graph replay, copy-bandwidth yardstick, memory at 8 M, BLOCK x num_warps sweeps)
# 4. the opt-in single-launch step: its GPU tests and benchmarks, each time-boxed on its own (a
#    grid barrier that hung would cost only this step) -> single_tests.txt, bench_single.json
# 5. the rest of bench/ (other benchmarks), time-boxed -> bench_other.json, bench_other.txt
# Every step runs under `timeout`; a failing step is recorded and the script goes on, then exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # interpreter with torch, triton, pytest, pytest-benchmark
status=0

{
    date -u
    nvidia-smi || echo "nvidia-smi not available"
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, '| triton', triton.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} 2>&1 | tee "$OUT_DIR/env.txt"

# mgg_fast.kernels exists only once installed (package-dir mapping of kernels/). The GPU machine is
# offline and may hold other torch/triton versions than the pins: install without dependencies,
# and if even that fails, import from a copy laid out as installed (PYTHONSAFEPATH keeps the
# checkout's own mgg_fast/, which lacks kernels/, off sys.path).
if ! $PY -c "import mgg_fast.kernels" 2>/dev/null; then
    $PY -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -3 || true
fi
if ! $PY -c "import mgg_fast.kernels" 2>/dev/null; then
    shim=$(mktemp -d)
    cp -r mgg_fast "$shim/mgg_fast"
    cp -r kernels "$shim/mgg_fast/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
$PY -c "import mgg_fast.kernels as k; print('mgg_fast.kernels from', k.__file__)" 2>&1 | tee -a "$OUT_DIR/env.txt"

run() {  # run <seconds> <log> <command...>: time-boxed, logged, failure recorded
    local seconds=$1 log=$2
    shift 2
    echo "== $*" | tee "$OUT_DIR/$log"
    if ! timeout "$seconds" "$@" 2>&1 | tee -a "$OUT_DIR/$log"; then
        echo "!! FAILED or timed out: $*" | tee -a "$OUT_DIR/$log"
        status=1
    fi
}

# every new (sizes, dtype, BLOCK, warps) compiles for 1-3 s: spread the tests over workers if xdist is there
workers=()
$PY -c "import xdist" 2>/dev/null && workers=(-n 4)
run 150 kernel_tests.txt $PY -m pytest tests/test_kernels_step.py tests/test_kernels_forward.py tests/test_relaunch.py \
    "${workers[@]}" -p no:cacheprovider -rs --durations=5
filter="not single_launch"
fused_box=400  # seconds; the full run sweeps f=16/32 and times multi-head steps too
if [ "${QUICK:-0}" = 1 ]; then
    filter="$filter and not 1M-16 and not 1M-32 and not heads"
    fused_box=300
fi
run "$fused_box" bench_fused.txt $PY -m pytest bench/test_bench_fused.py --benchmark-only -p no:cacheprovider \
    -k "$filter" --benchmark-json="$OUT_DIR/bench_fused.json"
run 60 single_tests.txt $PY -m pytest tests/test_kernels_step_single.py -p no:cacheprovider -rs
run 90 bench_single.txt $PY -m pytest bench/test_bench_fused.py --benchmark-only -p no:cacheprovider \
    -k single_launch --benchmark-json="$OUT_DIR/bench_single.json"
runs=()
for json in bench_fused.json bench_single.json; do
    [ -s "$OUT_DIR/$json" ] && runs+=("$OUT_DIR/$json")
done
if [ "${#runs[@]}" -gt 0 ]; then
    $PY bench/summarize_fused.py "${runs[@]}" | tee "$OUT_DIR/summary.md"
fi
if [ "${QUICK:-0}" != 1 ]; then
    run 150 bench_other.txt $PY -m pytest bench/ --benchmark-only -p no:cacheprovider \
        --ignore=bench/test_bench_fused.py --benchmark-json="$OUT_DIR/bench_other.json"
fi

[ -s "$OUT_DIR/summary.md" ] && cat "$OUT_DIR/summary.md"  # last, so the summary ends the output
echo "results in $OUT_DIR (status $status)"
exit "$status"
