#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and only torch, triton, ninja, nvcc, pytest and
# pytest-benchmark installed (no network), build the extension, run every GPU test and every GPU
# benchmark, time where each op's host and GPU time goes, and print one summary table. Budget: under 9
# minutes (about 6 on an H200 before the compiled training-step case: build 35 s, tests 90 s + 40 s,
# benchmarks ~3 min, profile 15 s; that case, last in the benchmarks, compiles a 1B model's blocks, about
# a minute more, and BENCH_TIMEOUT cuts it first; the attention candidates with TMA features, added since,
# compile and time about a minute more in the benchmarks, hence the cap of 330 s and, for the profile's
# new cases, 90 s); the wider attention tile sweep (SWEEP_TIMEOUT=90) adds about 70 s, a rebuild with the
# system compiler (only where the C++ error path fails) about 35 s.
# Phase time limits, in seconds (caps, each phase usually ends well before): BUILD_TIMEOUT NATIVE_TIMEOUT
# TEST_TIMEOUT MATRIX_TIMEOUT BENCH_TIMEOUT SWEEP_TIMEOUT (0: no sweep) PROFILE_TIMEOUT. Each phase has its
# own timeout and is stopped with SIGINT, so pytest still writes its report and the table shows what ran.
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
# The compilers matter: on the H200 image, CC/CXX point at /opt/gcc, whose build of the extension carries its
# own copy of libstdc++'s stream code (bench/native_errors.py checks for it after the build).
echo "CC=${CC:-} CXX=${CXX:-} c++: $(${CXX:-c++} --version 2>&1 | head -1)" >"$OUT/build.log"
if MAX_JOBS=${MAX_JOBS:-8} timeout ${BUILD_TIMEOUT:-200} $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
  echo ok >"$OUT/build.status"
else
  echo "failed (rc $?)" >"$OUT/build.status"; tail -40 "$OUT/build.log"
fi

phase "C++ error path of the native ops (log: $OUT/native_errors.log)"
timeout ${NATIVE_TIMEOUT:-60} $PY -m bench.native_errors >"$OUT/native_errors.log" 2>&1
echo $? >"$OUT/native_errors.rc"
# Where the error path crashes, or the extension carries its own copy of libstdc++'s stream code, and a
# system compiler is there: one rebuild with it, kept only if the error path then works (FORCE_SYSTEM_REBUILD=1
# tries it regardless).
if { { [ "$(cat "$OUT/native_errors.rc")" != 0 ] || grep -q "^WARNING" "$OUT/native_errors.log"; } \
     && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ] && [ "${CXX:-}" != /usr/bin/g++ ]; } \
   || [ -n "${FORCE_SYSTEM_REBUILD:-}" ]; then
  phase "rebuilding with /usr/bin/g++ (log: $OUT/build-system.log)"
  saved=$(mktemp -d)
  cp seer_kernels/_C*.so "$saved"/ 2>/dev/null
  if CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=${MAX_JOBS:-8} timeout ${BUILD_TIMEOUT:-200} \
       $PY setup.py build_ext --inplace --force >"$OUT/build-system.log" 2>&1 \
     && timeout ${NATIVE_TIMEOUT:-60} $PY -m bench.native_errors >"$OUT/native_errors-system.log" 2>&1 \
     && ! grep -q "^WARNING" "$OUT/native_errors-system.log"; then
    echo "rebuilt with /usr/bin/g++: the C++ error path works (this build is used)" >>"$OUT/build.status"
  else
    cp "$saved"/_C*.so seer_kernels/ 2>/dev/null
    echo "a rebuild with /usr/bin/g++ did not fix the C++ error path (the first build is used)" >>"$OUT/build.status"
  fi
  rm -rf "$saved"
fi

# pytest-xdist, where installed, spreads the Triton compiles over the cores, and a test that crashes its
# process (a bad kernel) costs one worker instead of the whole report. Each worker gets its share of the
# cores for torch's CPU threads: 8 workers x all cores of spinning OpenMP threads made every test ~18 s.
XDIST=()
WORKERS=${TEST_WORKERS:-8}
if [ "$WORKERS" -ge 2 ] && $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); else WORKERS=1; fi
THREADS=$(( $(nproc) / WORKERS )); [ "$THREADS" -ge 1 ] || THREADS=1
# Two runs: every GPU test but the attention matrix first (the kernels that have never run elsewhere), then
# the attention matrix (163 cases), each with its own time limit, so that neither can starve the other.
phase "GPU tests (pytest -m 'cuda or triton' ${XDIST[*]+${XDIST[*]}}, $THREADS CPU threads each; log: $OUT/tests.log)"
OMP_NUM_THREADS=$THREADS timeout -s INT -k 10 ${TEST_TIMEOUT:-120} $PY -m pytest tests -m "cuda or triton" \
  -k "not test_matches_float64" -q -p no:cacheprovider --maxfail=30 ${XDIST[@]+"${XDIST[@]}"} --durations=15 \
  --junitxml="$OUT/tests.xml" -o addopts="" >"$OUT/tests.log" 2>&1
echo $? >"$OUT/tests.rc"
phase "attention test matrix (log: $OUT/tests-matrix.log)"
OMP_NUM_THREADS=$THREADS timeout -s INT -k 10 ${MATRIX_TIMEOUT:-120} $PY -m pytest tests -m "cuda or triton" \
  -k "test_matches_float64" -q -p no:cacheprovider --maxfail=30 ${XDIST[@]+"${XDIST[@]}"} --durations=10 \
  --junitxml="$OUT/tests-matrix.xml" -o addopts="" >"$OUT/tests-matrix.log" 2>&1
echo $? >"$OUT/tests-matrix.rc"

# A TMA feature that fails its tests (or crashes a worker: an illegal instruction spoils the whole CUDA
# context) must not take the benchmarks down with it: they and the profile then run without the TMA features.
if [ -f "$OUT/tests.xml" ] && $PY -m bench.summary --failed "$OUT/tests.xml" tma candidate_tile >/dev/null; then
  export SEER_KERNELS_TMA=0
  echo "TMA or candidate-tile tests failed: benchmarks and profile ran with SEER_KERNELS_TMA=0" >"$OUT/tma.status"
fi

phase "GPU benchmarks (log: $OUT/bench.log)"
timeout -s INT -k 10 ${BENCH_TIMEOUT:-330} $PY -m pytest bench -q -p no:cacheprovider --bench-device cuda \
  --bench-json "$OUT/bench.json" --benchmark-disable-gc >"$OUT/bench.log" 2>&1
echo $? >"$OUT/bench.rc"

SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-0}
if [ "$SWEEP_TIMEOUT" -gt 0 ]; then
  phase "attention tile sweep (log: $OUT/sweep.log)"
  SWEEP_BUDGET=$(( SWEEP_TIMEOUT > 40 ? SWEEP_TIMEOUT - 20 : SWEEP_TIMEOUT / 2 ))  # room to write the JSON
  timeout -s INT -k 10 "$SWEEP_TIMEOUT" $PY -m bench.attention_sweep "$OUT/sweep.json" --budget-s "$SWEEP_BUDGET" \
    >"$OUT/sweep.log" 2>&1
  echo $? >"$OUT/sweep.rc"
fi

phase "host and device time per call (log: $OUT/profile.log)"
timeout -s INT -k 10 ${PROFILE_TIMEOUT:-90} $PY -m bench.gpu_profile >"$OUT/profile.log" 2>&1

phase "done"
$PY -m bench.summary "$OUT" | tee "$OUT/summary.txt"
