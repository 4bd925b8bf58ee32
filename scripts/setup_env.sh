#!/usr/bin/env bash
# Set up everything on a fresh machine (idempotent): a virtual environment in .venv with the pinned
# requirements, then the package with its native kernels built in place. Source it or run it.
#   SEER_VENV=path   use another environment folder (default: .venv in the repository)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.seer-requirements.sha"
want="$(sha256sum "$ROOT/requirements-ci.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (torch from the local wheel cache; a few minutes the first time)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$ROOT/requirements-ci.txt"
  echo "$want" >"$stamp"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # torch's own guess picks the wrong folder on GPU-less machines
fi
echo "[setup] building seer_kernels._C (C++ CPU kernels; CUDA kernels too when nvcc is found)"
# pip's own chatter (editable-install banners, deprecation notes) is dropped; errors still show.
(cd "$ROOT" && python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 \
  | grep -vE "^\s*$|DEPRECATION|egg_info|WheelFile|!!|\*{8}|BuildBackendWarning|Please be careful|name as your package" || true)
# A failed native build is an error, unless native code was skipped on purpose.
python -c "import os, seer_kernels, sys; s = seer_kernels.native_status(); print('[setup] native kernels:', 'loaded' if not s else s); sys.exit(1 if s and os.environ.get('SEER_KERNELS_SKIP_NATIVE') != '1' else 0)"
