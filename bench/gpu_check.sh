#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and only torch, triton, ninja, nvcc, pytest and
# pytest-benchmark installed (no network), build the extension, run every GPU test and every GPU
# benchmark, time where each op's host and GPU time goes, and print one summary table. Typical phases on an
# H100: build 50 s, tests 95-125 s + 45 s, Nsight Compute ~30 s, benchmarks up to their cap of 330 s (the
# attention candidates with TMA features take about a minute of it; the compiled training-step case, last,
# compiles a 1B model's blocks and is what a cap cuts first), profile 15-90 s; the wider attention tile
# sweep (SWEEP_TIMEOUT=90) adds about 70 s. The whole check stays within GPU_CHECK_BUDGET (below).
# Phase time limits, in seconds (caps, each phase usually ends well before): BUILD_TIMEOUT NATIVE_TIMEOUT
# TEST_TIMEOUT MATRIX_TIMEOUT NCU_TIMEOUT (0: no Nsight Compute) BENCH_TIMEOUT SWEEP_TIMEOUT (0: no sweep)
# PROFILE_TIMEOUT. Each phase has its own timeout and is stopped with SIGINT, so pytest still writes its
# report and the table shows what ran. GPU_CHECK_BUDGET (default 570) bounds the whole check: a phase gets
# its cap or what is left of the budget (less 15 s for the summary), whichever is smaller, and is skipped
# when under 10 s are left, so that a run under a 600-second limit still ends with its summary.
# Nsight Compute (ncu, about 40 s; bench/attention_ncu.py) profiles the attention kernels at the target shape
# next to cuDNN's and FlashAttention's, before the benchmarks (whose last case, the compiled training step,
# is the one the budget then cuts); it does not lock the GPU's clocks (--clock-control none).
#
#   bash bench/gpu_check.sh [OUT_DIR]        # logs, junit XML and bench JSON go to OUT_DIR
#
# Every op adds itself by having tests marked `cuda` or `triton` and a bench/bench_<op>.py file.
#
# GPU_CHECK_OPS="sinkhorn multicrop" narrows a re-check after a change to some ops: the GPU tests of
# tests/ops/test_<op>.py only, bench/bench_<op>.py only, the profile of those ops; the attention matrix and
# Nsight Compute run only when attention is named. Unset: everything (model, trainer and train-step too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu-latest}}
mkdir -p "$OUT"
# A folder that held an earlier check keeps its files: an old tests.xml would pass for this run's report (and
# decide SEER_KERNELS_TMA below), so this run's files go first. Only the names this script writes.
( cd "$OUT" && rm -f -- *.log *.rc *.xml *.status bench.json sweep.json summary.txt bundle.tar.gz \
    attention.ncu-rep ncu.csv ncu_cases.json )
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET SEER_KERNELS_BACKEND
start=$(date +%s)
phase() { echo "[gpu_check] $(( $(date +%s) - start ))s: $*"; }
BUDGET=${GPU_CHECK_BUDGET:-570}
OPS=${GPU_CHECK_OPS:-}
TEST_PATHS=(tests); BENCH_PATHS=(bench); PROFILE_ONLY=()
if [ -n "$OPS" ]; then
  TEST_PATHS=(); BENCH_PATHS=(); PROFILE_ONLY=(--only)
  for op in $OPS; do
    [ -f "tests/ops/test_$op.py" ] || { echo "GPU_CHECK_OPS: no tests/ops/test_$op.py" >&2; exit 2; }
    TEST_PATHS+=("tests/ops/test_$op.py"); [ -f "bench/bench_$op.py" ] && BENCH_PATHS+=("bench/bench_$op.py")
    for f in tests/ops/test_"$op"_*.py; do [ -f "$f" ] && TEST_PATHS+=("$f"); done  # e.g. test_attention_packed
    case "$op" in attention|sinkhorn) PROFILE_ONLY+=("$op");; esac
  done
  case " $OPS " in
    *" attention "*) ;;
    *) MATRIX_TIMEOUT=0; NCU_TIMEOUT=0
       for f in tests-matrix ncu; do echo "not run (GPU_CHECK_OPS=$OPS)" >"$OUT/$f.rc"; done;;
  esac
  if [ "${#PROFILE_ONLY[@]}" -le 1 ]; then  # no op gpu_profile times: not run, not "out of time"
    PROFILE_TIMEOUT=0; echo "not run (GPU_CHECK_OPS=$OPS)" >"$OUT/profile.rc"
  fi
  phase "only the ops $OPS (GPU_CHECK_OPS)"
fi
# cap SECONDS: a phase's time limit, SECONDS or what is left of the budget (less 15 s for the summary); 0: skip
cap() {
  local left=$(( BUDGET - ($(date +%s) - start) - 15 ))
  if [ "$left" -lt "$1" ]; then echo $(( left >= 10 ? left : 0 )); else echo "$1"; fi
}
skipped() { phase "skipped ($1): out of time (GPU_CHECK_BUDGET=$BUDGET)"; echo "skipped: out of time" >"$OUT/$1.rc"; }

phase "building seer_kernels._C (log: $OUT/build.log)"
# The compilers matter: on the GPU images (H200 and H100 runs of 2026-11-26) CC/CXX point at /opt/gcc, whose
# build of the extension carries its own copy of libstdc++'s stream code (the C++ error path crashed on it
# on the H200); a rebuild with /usr/bin/g++ was clean on both, at a cost of 70 s of the budget. So the
# system compiler builds first where there is one (GPU_CHECK_CXX=env keeps CC/CXX), the environment's
# compilers where that build fails; bench/native_errors.py then checks the error path of the build used.
# build_with CC CXX [--force]: one build of the extension (an empty CC or CXX leaves that variable as it is)
build_with() {
  echo "== build with CC=${1:-${CC:-}} CXX=${2:-${CXX:-}}: $(${2:-${CXX:-c++}} --version 2>&1 | head -1)" >>"$OUT/build.log"
  env ${1:+CC=$1} ${2:+CXX=$2} MAX_JOBS=${MAX_JOBS:-8} timeout ${BUILD_TIMEOUT:-200} \
    $PY setup.py build_ext --inplace ${3:-} >>"$OUT/build.log" 2>&1
}
: >"$OUT/build.log"
SYSTEM_CXX=""
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ] && [ "${CXX:-}" != /usr/bin/g++ ] && [ "${GPU_CHECK_CXX:-}" != env ]; then
  SYSTEM_CXX=1
fi
if [ -n "$SYSTEM_CXX" ] && build_with /usr/bin/gcc /usr/bin/g++; then
  echo "ok (/usr/bin/g++; CXX was ${CXX:-unset})" >"$OUT/build.status"
elif build_with "" "" ${SYSTEM_CXX:+--force}; then
  echo "ok${SYSTEM_CXX:+ (CXX=${CXX:-c++}: the /usr/bin/g++ build failed)}" >"$OUT/build.status"
else
  echo "failed (rc $?)" >"$OUT/build.status"; tail -40 "$OUT/build.log"
fi

phase "C++ error path of the native ops (log: $OUT/native_errors.log)"
timeout ${NATIVE_TIMEOUT:-60} $PY -m bench.native_errors >"$OUT/native_errors.log" 2>&1
echo $? >"$OUT/native_errors.rc"

# pytest-xdist, where installed, spreads the Triton compiles over the cores, and a test that crashes its
# process (a bad kernel) costs one worker instead of the whole report. Each worker gets its share of the
# cores for torch's CPU threads: 8 workers x all cores of spinning OpenMP threads made every test ~18 s.
XDIST=()
WORKERS=${TEST_WORKERS:-8}
if [ "$WORKERS" -ge 2 ] && $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); else WORKERS=1; fi
THREADS=$(( $(nproc) / WORKERS )); [ "$THREADS" -ge 1 ] || THREADS=1
# Two runs: every GPU test but the attention matrix first (the kernels that have never run elsewhere), then
# the attention matrix (163 cases), each with its own time limit, so that neither can starve the other.
# gpu_tests NAME CAP K_EXPRESSION DURATIONS WHAT: one pytest run of the GPU tests within the budget, its
# log, junit XML and exit status as OUT/NAME.{log,xml,rc}
gpu_tests() {
  local t; t=$(cap "$2")
  if [ "$t" -le 0 ]; then skipped "$1"; return; fi
  phase "$5 (log: $OUT/$1.log)"
  OMP_NUM_THREADS=$THREADS timeout -s INT -k 10 "$t" $PY -m pytest "${TEST_PATHS[@]}" -m "cuda or triton" -k "$3" -q \
    -p no:cacheprovider --maxfail=30 ${XDIST[@]+"${XDIST[@]}"} --durations="$4" --junitxml="$OUT/$1.xml" \
    -o addopts="" >"$OUT/$1.log" 2>&1
  echo $? >"$OUT/$1.rc"
}
gpu_tests tests "${TEST_TIMEOUT:-180}" "not test_matches_float64" 15 \
  "GPU tests (pytest -m 'cuda or triton' ${XDIST[*]+${XDIST[*]}}, $THREADS CPU threads each)"
if [ "${MATRIX_TIMEOUT:-120}" -gt 0 ]; then
  gpu_tests tests-matrix "${MATRIX_TIMEOUT:-120}" "test_matches_float64" 10 "attention test matrix"
fi

# A TMA feature that fails its tests (or crashes a worker: an illegal instruction spoils the whole CUDA
# context) must not take the benchmarks down with it: they and the profile then run without the TMA features.
if [ -f "$OUT/tests.xml" ] && $PY -m bench.summary --failed "$OUT/tests.xml" tma candidate_tile >/dev/null; then
  export SEER_KERNELS_TMA=0
  echo "TMA or candidate-tile tests failed: benchmarks and profile ran with SEER_KERNELS_TMA=0" >"$OUT/tma.status"
fi

NCU=$(command -v ncu || true)
if [ -z "$NCU" ] && [ -x "$CUDA_HOME/bin/ncu" ]; then NCU="$CUDA_HOME/bin/ncu"; fi
T=$(cap ${NCU_TIMEOUT:-75})
NCU_RESERVE=25  # ncu writes its report at the end: the workload starts no case in the phase's last 25 s
if [ -z "$NCU" ]; then
  echo "no ncu on PATH or in $CUDA_HOME/bin" >"$OUT/ncu.rc"
elif [ "${NCU_TIMEOUT:-75}" -le 0 ]; then
  :  # turned off
elif [ "$T" -le "$NCU_RESERVE" ]; then
  skipped ncu
else
  phase "Nsight Compute on the attention kernels (log: $OUT/ncu.log)"
  # --clock-control none: leave the GPU's clocks as they are (ncu would lock them to base otherwise).
  timeout -s INT -k 10 "$T" "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis -f -o "$OUT/attention" $PY -m bench.attention_ncu run \
    --labels "$OUT/ncu_cases.json" --budget-s $(( T - NCU_RESERVE )) >"$OUT/ncu.log" 2>&1
  echo $? >"$OUT/ncu.rc"
  if [ -f "$OUT/attention.ncu-rep" ]; then
    # (within the budget, at least a second: `timeout 0` would not time out at all)
    TI=$(cap 30); [ "$TI" -gt 0 ] || TI=1
    timeout "$TI" "$NCU" --import "$OUT/attention.ncu-rep" --csv --page raw --print-units base \
      >"$OUT/ncu.csv" 2>>"$OUT/ncu.log"
  fi
fi

T=$(cap ${BENCH_TIMEOUT:-330})
if [ "$T" -gt 0 ]; then
  phase "GPU benchmarks (log: $OUT/bench.log)"
  timeout -s INT -k 10 "$T" $PY -m pytest "${BENCH_PATHS[@]}" -q -p no:cacheprovider --bench-device cuda \
    --bench-json "$OUT/bench.json" --benchmark-disable-gc >"$OUT/bench.log" 2>&1
  echo $? >"$OUT/bench.rc"
else
  skipped bench
fi

SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-0}
T=$(cap "$SWEEP_TIMEOUT")
if [ "$SWEEP_TIMEOUT" -gt 0 ] && [ "$T" -gt 0 ]; then
  phase "attention tile sweep (log: $OUT/sweep.log)"
  SWEEP_BUDGET=$(( T > 40 ? T - 20 : T / 2 ))  # room to write the JSON
  timeout -s INT -k 10 "$T" $PY -m bench.attention_sweep "$OUT/sweep.json" --budget-s "$SWEEP_BUDGET" \
    >"$OUT/sweep.log" 2>&1
  echo $? >"$OUT/sweep.rc"
fi

T=$(cap ${PROFILE_TIMEOUT:-90})
if [ "${PROFILE_TIMEOUT:-90}" -le 0 ]; then
  :  # turned off (GPU_CHECK_OPS without attention or sinkhorn)
elif [ "$T" -gt 0 ]; then
  phase "host and device time per call (log: $OUT/profile.log)"
  timeout -s INT -k 10 "$T" $PY -m bench.gpu_profile ${PROFILE_ONLY[@]+"${PROFILE_ONLY[@]}"} >"$OUT/profile.log" 2>&1
  echo $? >"$OUT/profile.rc"
else
  skipped profile
fi

phase "done"
$PY -m bench.summary "$OUT" | tee "$OUT/summary.txt"
# Everything in one file next to the summary and the JSON: a caller that can bring back only a few files
# (the device tool returns about 8) copies these three: summary.txt, bench.json, bundle.tar.gz.
BUNDLE=$(mktemp "${TMPDIR:-/tmp}/seer-bundle.XXXXXX")
tar -czf "$BUNDLE" -C "$OUT" --exclude=bundle.tar.gz . 2>/dev/null && mv "$BUNDLE" "$OUT/bundle.tar.gz" || rm -f "$BUNDLE"
