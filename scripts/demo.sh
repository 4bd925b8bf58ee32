#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, then run the demonstration.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m seer train --preset demo --out runs/demo "$@"
