#!/usr/bin/env bash
# The test command of README.md: the whole tier-1 suite on the CPU (GPU/TensorRT tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q --durations=15 "$@"
