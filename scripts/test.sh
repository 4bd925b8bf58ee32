#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, Python tests, C++ unit tests (ctest), and the CPU
# benchmark regression gate. This is what CI runs (.ci/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
start=$(date +%s)
echo "[test] python tests"
python -m pytest tests -q -p no:cacheprovider --durations=15
echo "[test] C++ unit tests (ctest)"
bash csrc/tests/run.sh build/cmake
echo "[test] CPU benchmarks and the regression gate"
python -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc
echo "[test] all passed in $(( $(date +%s) - start )) s (after set-up)"
