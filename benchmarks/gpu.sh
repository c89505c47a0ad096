#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu.py says what it runs; docs/gpu.md names its JSON keys):
#
#   bash benchmarks/gpu.sh [--out FILE] [--skip SECTION ...]
#
# On a CUDA machine with this checkout, its Python packages importable (PYTHON, default python3) and,
# for the demo, Fashion-MNIST's four .gz files in FASHION_MNIST_DIR. About 8 minutes on one H200; no network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "benchmarks/gpu.sh needs a CUDA GPU and a torch that sees it ($python: torch.cuda.is_available() is" \
       "False or torch is missing); on a CPU machine, run the test suite instead: bash scripts/test.sh" >&2
  exit 2
fi
exec "$python" benchmarks/gpu.py "$@"
