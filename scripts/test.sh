#!/usr/bin/env bash
# The test suite: installs what is missing, then runs pytest (extra arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
exec "${PIPELINE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
