#!/usr/bin/env bash
# Stops what tests/slurm/start.sh started (and only that): the daemons whose PIDs it recorded, and the
# /etc/hosts line it added. Jobs still running are cancelled first.
set -uo pipefail
dir="${1:-/tmp/pipeline-slurm}"
[[ -d "$dir/run" ]] || exit 0
SLURM_CONF="$dir/slurm.conf" scancel --user="$(id -un)" 2>/dev/null
for name in slurmd-n1 slurmd-n2 slurmctld munged; do
  file="$dir/run/$name.started"
  [[ -f "$file" ]] || continue
  pid="$(cat "$file")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
done
if [[ -f "$dir/run/hosts-added" ]]; then
  sed -i '/# pipeline tests\/slurm$/d' /etc/hosts
  rm -f "$dir/run/hosts-added"
fi
