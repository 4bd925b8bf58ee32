#!/usr/bin/env bash
# Configure, build and run the C++ unit tests (ctest) against the torch of the active Python.
#   bash csrc/tests/run.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-build/cmake}
PY=${PYTHON:-python}
prefix=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
if $PY -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  # torch is a CUDA build: its CMake config needs a toolkit (not a GPU) to configure.
  cuda=${CUDA_HOME:-/usr/local/cuda}
  nvlib=$($PY -c 'import os, torch; p = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "lib"); print(p if os.path.isdir(p) else "")')
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda" -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc" -DSEER_PIP_NVIDIA_LIB="$nvlib")
fi
mkdir -p "$BUILD"
cmake "${args[@]}" ${SEER_CMAKE_ARGS:-} >"$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
