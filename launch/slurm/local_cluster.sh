#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying launch/slurm/erc_train.sbatch without a
# real cluster (and for CI). Debian's slurm-wlm 22.05 + munge; everything (config, state, spool,
# logs, munge key and socket) lives under ERC_SLURM_DIR (default /tmp/erc-slurm), nothing in /etc.
#
#   launch/slurm/local_cluster.sh install   # apt-get slurm-wlm + munge if missing (root)
#   launch/slurm/local_cluster.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   export SLURM_CONF=/tmp/erc-slurm/etc/slurm.conf   # for sbatch / srun / squeue / scontrol
#   launch/slurm/local_cluster.sh status
#   launch/slurm/local_cluster.sh stop      # stops the three daemons by the PIDs they wrote
#
# The node declares ERC_SLURM_CPUS CPUs (default 8) whatever the machine has, so a 4-task job fits
# on 2 cores (SlurmdParameters=config_overrides). No cgroups are assumed (containers often have none):
# processes are tracked through /proc, tasks are not bound. There is no slurmdbd, so `sacct` has no
# data: a finished job's state and exit code come from `scontrol show job` (kept MinJobAge seconds)
# and from the job-completion log $ERC_SLURM_DIR/jobcomp.txt ("ExitCode=0:0").
set -euo pipefail

DIR=${ERC_SLURM_DIR:-/tmp/erc-slurm}
CPUS=${ERC_SLURM_CPUS:-8}
CTLD_PORT=${ERC_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${ERC_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT=${ERC_SLURM_START_TIMEOUT:-60}
CONF=$DIR/etc/slurm.conf
NODE=$(hostname -s)
export SLURM_CONF=$CONF

say() { echo "[local_cluster] $*"; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    say "slurm $(slurmctld -V | awk '{print $2}') and munge already installed"
    return
  fi
  [[ $(id -u) == 0 ]] || { echo "installing slurm-wlm needs root (apt-get)" >&2; exit 1; }
  # Package scripts would start the system's munge/slurm services: forbid that for this install
  # (we run our own daemons under $DIR), unless the machine already forbids it.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  local t0=$SECONDS
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
  (( made_policy )) && rm -f "$policy"
  say "installed slurm $(slurmctld -V | awk '{print $2}') and munge in $((SECONDS - t0)) s"
}

pid_of() {  # the PID a daemon wrote, if that process is still alive
  local f=$1 pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ -d /proc/$pid ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && echo "$pid"
}

write_config() {
  mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
  chmod 700 "$DIR/munge"
  cat > "$CONF" <<EOF
# written by launch/slurm/local_cluster.sh
ClusterName=erc-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
InactiveLimit=0
KillWait=10
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
EOF
}

start_munge() {
  if pid_of "$DIR/munge/munged.pid" >/dev/null; then return; fi
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
  fi
  # --force: munged refuses root and sticky-bit parents such as /tmp without it
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.sock" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
}

status() {
  local ok=0 name pidfile pid
  for name in munged slurmctld slurmd; do
    case $name in munged) pidfile=$DIR/munge/munged.pid ;; *) pidfile=$DIR/run/$name.pid ;; esac
    if pid=$(pid_of "$pidfile"); then say "$name running (pid $pid)"; else say "$name not running"; ok=1; fi
  done
  if (( ok == 0 )); then
    say "node: $(sinfo -h -n "$NODE" -o '%N %T %c CPUs' 2>&1)"
    say "export SLURM_CONF=$CONF"
  fi
  return $ok
}

start() {
  command -v slurmctld >/dev/null || { echo "slurm is not installed: run '$0 install' first" >&2; exit 1; }
  local t0=$SECONDS
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null && pid_of "$DIR/run/slurmd.pid" >/dev/null; then
    say "already running"; status; return
  fi
  write_config
  start_munge
  pid_of "$DIR/run/slurmctld.pid" >/dev/null || slurmctld -c -f "$CONF"  # -c: fresh state, no old jobs
  pid_of "$DIR/run/slurmd.pid" >/dev/null || slurmd -f "$CONF"
  local state=""
  while (( SECONDS - t0 < START_TIMEOUT )); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    if [[ $state == idle ]]; then
      say "node $NODE idle with $CPUS CPUs after $((SECONDS - t0)) s; export SLURM_CONF=$CONF"
      return
    fi
    if [[ $state == drain* || $state == down* || $state == inval* ]]; then
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
  echo "node $NODE not idle after ${START_TIMEOUT}s (state '${state}'); logs in $DIR/log and $DIR/munge:" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$DIR/munge/munged.log" >&2 2>/dev/null || true
  stop >&2
  exit 1
}

stop_one() {  # name pidfile
  local pid
  pid=$(pid_of "$2") || { rm -f "$2"; return; }
  kill "$pid"
  for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
  if [[ -d /proc/$pid ]]; then kill -9 "$pid"; say "$1 (pid $pid) killed"; else say "$1 (pid $pid) stopped"; fi
  rm -f "$2"
}

stop() {
  # jobs first, so that no job step outlives its slurmd
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null; then
    scancel --full --quiet -p local >/dev/null 2>&1 || true
  fi
  stop_one slurmd "$DIR/run/slurmd.pid"
  stop_one slurmctld "$DIR/run/slurmctld.pid"
  stop_one munged "$DIR/munge/munged.pid"
}

case ${1:-} in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status   (state under ERC_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
