#!/usr/bin/env bash
# A Slurm cluster on this one machine, for trying launch/slurm/erc_train.sbatch without a real
# cluster (and for CI). Debian's slurm-wlm 22.05 + munge; everything (config, state, spool, logs,
# munge key and socket) lives under ERC_SLURM_DIR (default /tmp/erc-slurm), nothing in /etc.
#
#   launch/slurm/local_cluster.sh install   # apt-get slurm-wlm + munge if missing (root)
#   launch/slurm/local_cluster.sh start     # munged, slurmctld, one slurmd per node; waits until all are idle
#   export SLURM_CONF=/tmp/erc-slurm/etc/slurm.conf   # for sbatch / srun / squeue / scontrol
#   launch/slurm/local_cluster.sh status
#   launch/slurm/local_cluster.sh stop      # stops the daemons by the PIDs they wrote
#
# Two nodes by default (ERC_SLURM_NODES=1 for one): this host's short name and `localhost`, each with
# its own slurmd on its own port. Both names resolve to this machine, so a job's node names work as
# host names exactly as on a real cluster (MASTER_ADDR, rollout server URLs), and `srun -w NODE`
# really goes through that node's slurmd. Each node declares ERC_SLURM_CPUS CPUs (default 8) whatever
# the machine has, so a 4-task job fits on 2 cores (SlurmdParameters=config_overrides).
# No cgroups are assumed (containers often have none): processes are tracked through /proc, tasks
# are not bound. There is no slurmdbd, so `sacct` has no data: a finished job's state and exit code
# come from `scontrol show job` (kept MinJobAge seconds) and from the job-completion log
# $ERC_SLURM_DIR/jobcomp.txt ("JobState=COMPLETED ... ExitCode=0:0").
set -euo pipefail

DIR=${ERC_SLURM_DIR:-/tmp/erc-slurm}
CPUS=${ERC_SLURM_CPUS:-8}
NNODES=${ERC_SLURM_NODES:-2}
CTLD_PORT=${ERC_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${ERC_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT=${ERC_SLURM_START_TIMEOUT:-60}
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
NODES=("$(hostname -s)")
case $NNODES in
  1) ;;
  2) [[ ${NODES[0]} != localhost ]] || { echo "this host is called localhost: use ERC_SLURM_NODES=1" >&2; exit 2; }
     NODES+=(localhost) ;;
  *) echo "ERC_SLURM_NODES must be 1 or 2 (node names must resolve to this machine), got '$NNODES'" >&2; exit 2 ;;
esac

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
  if (( made_policy )); then rm -f "$policy"; fi
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
SlurmctldHost=${NODES[0]}(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
EOF
  local i
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$CPUS State=UNKNOWN" >> "$CONF"
    mkdir -p "$DIR/spool/${NODES[$i]}"
  done
  echo "PartitionName=local Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP" \
    >> "$CONF"
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

all_daemons_up() {
  local n
  pid_of "$DIR/munge/munged.pid" >/dev/null || return 1
  pid_of "$DIR/run/slurmctld.pid" >/dev/null || return 1
  for n in "${NODES[@]}"; do pid_of "$DIR/run/slurmd-$n.pid" >/dev/null || return 1; done
}

status() {
  local ok=0 name pidfile pid
  for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
    case $name in munged) pidfile=$DIR/munge/munged.pid ;; *) pidfile=$DIR/run/$name.pid ;; esac
    if pid=$(pid_of "$pidfile"); then say "$name running (pid $pid)"; else say "$name not running"; ok=1; fi
  done
  if (( ok == 0 )); then
    sinfo -h -N -o '%N %T %c' | sort -u | while read -r n st c; do say "node $n: $st, $c CPUs"; done
    say "export SLURM_CONF=$CONF"
  fi
  return $ok
}

start() {
  command -v slurmctld >/dev/null || { echo "slurm is not installed: run '$0 install' first" >&2; exit 1; }
  local t0=$SECONDS n states="" busy
  if all_daemons_up; then say "already running"; status; return; fi
  write_config
  start_munge
  pid_of "$DIR/run/slurmctld.pid" >/dev/null || slurmctld -c -f "$CONF"  # -c: fresh state, no old jobs
  for n in "${NODES[@]}"; do
    pid_of "$DIR/run/slurmd-$n.pid" >/dev/null || slurmd -f "$CONF" -N "$n"
  done
  while (( SECONDS - t0 < START_TIMEOUT )); do
    states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    busy=0
    for n in "${NODES[@]}"; do
      [[ " $states" == *" $n=idle "* ]] || busy=1
      if [[ " $states" =~ \ $n=(drain|down|inval) ]]; then
        scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
      fi
    done
    if (( busy == 0 )); then
      say "nodes ${NODES[*]} idle, $CPUS CPUs each, after $((SECONDS - t0)) s; export SLURM_CONF=$CONF"
      return
    fi
    sleep 0.5
  done
  echo "nodes not idle after ${START_TIMEOUT}s (${states}); logs in $DIR/log and $DIR/munge:" >&2
  tail -n 20 "$DIR"/log/*.log "$DIR/munge/munged.log" >&2 2>/dev/null || true
  stop >&2
  exit 1
}

stop_one() {  # name pidfile
  local pid
  pid=$(pid_of "$2") || { rm -f "$2"; return 0; }
  kill "$pid"
  for _ in $(seq 100); do [[ -d /proc/$pid ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || break; sleep 0.1; done
  if pid_of "$2" >/dev/null; then kill -9 "$pid"; say "$1 (pid $pid) killed"; else say "$1 (pid $pid) stopped"; fi
  rm -f "$2"
}

stop() {
  local n
  # jobs first, so that no job step outlives its slurmd
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null; then
    scancel --full --quiet -p local >/dev/null 2>&1 || true
  fi
  for n in "${NODES[@]}"; do stop_one "slurmd $n" "$DIR/run/slurmd-$n.pid"; done
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
