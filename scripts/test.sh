#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, Python tests, C++ unit tests (ctest), and the CPU
# benchmark regression gate. This is what CI runs (.ci/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
start=$(date +%s)
# The C++ unit tests build on one core while the Python tests run (about 50 s of compiling off the critical
# path on a 2-core machine); in a session of their own, so that a failed Python run stops them too.
mkdir -p build
MAX_JOBS=1 setsid bash csrc/tests/run.sh build/cmake >build/ctest.log 2>&1 &
ctest_pid=$!
trap 'kill -- -"$ctest_pid" 2>/dev/null || true' EXIT
echo "[test] python tests (the C++ unit tests build meanwhile: build/ctest.log)"
python -m pytest tests -q -p no:cacheprovider --durations=15
echo "[test] C++ unit tests (ctest)"
if ! wait "$ctest_pid"; then
  cat build/ctest.log
  echo "[test] the C++ unit tests failed"
  exit 1
fi
trap - EXIT
grep -E "tests passed|tests failed" build/ctest.log
echo "[test] CPU benchmarks and the regression gate"
python -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc
echo "[test] all passed in $(( $(date +%s) - start )) s (after set-up)"
