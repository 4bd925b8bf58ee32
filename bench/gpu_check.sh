#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and only torch, triton, ninja, nvcc, pytest and
# pytest-benchmark installed (no network), build the extension, run every GPU test and every GPU
# benchmark, time a wider attention tile sweep, and print one summary table. Budget: under 9 minutes. Each phase has its own timeout and is
# stopped with SIGINT, so pytest still writes its report and the table shows what ran.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # logs, junit XML and bench JSON go to OUT_DIR
#
# Every op adds itself by having tests marked `cuda` or `triton` and a bench/bench_<op>.py file.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu-latest}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET SEER_KERNELS_BACKEND
start=$(date +%s)
phase() { echo "[gpu_check] $(( $(date +%s) - start ))s: $*"; }

phase "building seer_kernels._C (log: $OUT/build.log)"
if MAX_JOBS=${MAX_JOBS:-8} timeout ${BUILD_TIMEOUT:-200} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo ok >"$OUT/build.status"
else
  echo "failed (rc $?)" >"$OUT/build.status"; tail -40 "$OUT/build.log"
fi

# pytest-xdist, where installed, spreads the Triton compiles over the cores, and a test that crashes its
# process (a bad kernel) costs one worker instead of the whole report.
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${TEST_WORKERS:-8}"); fi
phase "GPU tests (pytest -m 'cuda or triton' ${XDIST[*]}; log: $OUT/tests.log)"
timeout -s INT -k 20 ${TEST_TIMEOUT:-150} $PY -m pytest tests -m "cuda or triton" -q -p no:cacheprovider --maxfail=20 \
  "${XDIST[@]}" --junitxml="$OUT/tests.xml" -o addopts="" >"$OUT/tests.log" 2>&1
echo $? >"$OUT/tests.rc"

phase "GPU benchmarks (log: $OUT/bench.log)"
timeout -s INT -k 20 ${BENCH_TIMEOUT:-120} $PY -m pytest bench -q -p no:cacheprovider --bench-device cuda \
  --bench-json "$OUT/bench.json" --benchmark-disable-gc >"$OUT/bench.log" 2>&1
echo $? >"$OUT/bench.rc"

phase "attention tile sweep (log: $OUT/sweep.log)"
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-90}
timeout -s INT -k 10 "$SWEEP_TIMEOUT" $PY -m bench.attention_sweep "$OUT/sweep.json" --budget-s $((SWEEP_TIMEOUT - 20)) \
  >"$OUT/sweep.log" 2>&1
echo $? >"$OUT/sweep.rc"

phase "done"
$PY -m bench.summary "$OUT" | tee "$OUT/summary.txt"
