#!/usr/bin/env bash
# The main job on its embedded default: installs what is missing, then trains the Fashion-MNIST demo.
# Extra arguments go to pipeline.submit (e.g. --dry-run, or key=value overrides).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
# Local processes even where srun is on PATH (e.g. after the tests installed Slurm): the demo is for this machine.
exec "${PIPELINE_VENV:-$root/.venv}/bin/python" -m pipeline.submit --preset demo --cluster local "$@"
