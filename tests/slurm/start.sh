#!/usr/bin/env bash
# A real Slurm on this one host, for the tests: one controller and two emulated nodes (n1, n2) that are
# both this machine. Installs Debian's slurmctld, slurmd, slurm-client and munge when missing, writes a
# private slurm.conf, starts the daemons by hand (no systemd needed) and waits until both nodes are idle.
#
#     bash tests/slurm/start.sh [DIR]     # DIR defaults to /tmp/pipeline-slurm; prints SLURM_CONF=...
#     bash tests/slurm/stop.sh [DIR]      # stops only the daemons this script started
#
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf. Accounting is off, so `sacct` (which
# submitit polls) warns and job states come from squeue. Needs root (apt, /etc/hosts, munge).
set -euo pipefail
dir="${1:-/tmp/pipeline-slurm}"
cpus="${PIPELINE_SLURM_CPUS:-4}"   # CPUs each emulated node declares (config_overrides: more than the host has is fine)

fail() { echo "tests/slurm/start.sh: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || fail "needs root (apt-get, /etc/hosts, munged); run it as root or start a Slurm yourself and set SLURM_CONF"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "start.sh: installing slurmctld slurmd slurm-client munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; } \
    || fail "could not install Debian's slurmctld slurmd slurm-client munge"
fi

mkdir -p "$dir"/{state,log,run}
host="$(hostname -s)"
# The node names must resolve: they become MASTER_ADDR, and gloo hangs on a name it cannot resolve.
if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
  echo "127.0.0.1 n1 n2  # pipeline tests/slurm" >> /etc/hosts
  touch "$dir/run/hosts-added"
fi

# munge: reuse a running munged, else start one as the munge user (it writes its own PID file).
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none;
                                      chown munge: /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null || fail "munged did not start; see /var/log/munge/munged.log"
  cp /run/munge/munged.pid "$dir/run/munged.started"
fi

cat > "$dir/slurm.conf" <<CONF
ClusterName=pipeline-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=17000
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/state/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Look for startable jobs every second or two (a requeued job waits for such a pass, 60 s by default).
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=600
JobRequeue=1
# A requeued job may start again once its old credentials expire (default 120 s); tests requeue often.
AuthInfo=cred_expire=5
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$dir/slurm.conf"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
trap '[[ ${ok:-0} == 1 ]] || bash "$here/stop.sh" "$dir"' EXIT  # a failed start leaves nothing running

start() {  # name, command...: start a daemon in the foreground mode, in the background; record its PID
  local name="$1"; shift
  if [[ -f "$dir/run/$name.started" ]] && kill -0 "$(cat "$dir/run/$name.started")" 2>/dev/null; then return; fi
  "$@" >>"$dir/log/$name.out" 2>&1 &
  echo $! > "$dir/run/$name.started"
}
start slurmctld slurmctld -D -f "$SLURM_CONF"
start slurmd-n1 slurmd -D -f "$SLURM_CONF" -N n1
start slurmd-n2 slurmd -D -f "$SLURM_CONF" -N n2

for _ in $(seq 60); do
  states="$(sinfo -h -N -o '%N %t' 2>/dev/null || true)"
  if [[ "$(grep -c ' idle$' <<<"$states")" == 2 ]]; then
    echo "SLURM_CONF=$SLURM_CONF"
    ok=1
    exit 0
  fi
  for name in slurmctld slurmd-n1 slurmd-n2; do
    kill -0 "$(cat "$dir/run/$name.started")" 2>/dev/null \
      || fail "$name exited; its log: $dir/log/$name.out, $dir/log/*.log"$'\n'"$(tail -5 "$dir/log/$name.out")"
  done
  sleep 1
done
fail "nodes not idle after 60 s: $states; logs in $dir/log"
