#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` (tests/test_slurm.py).
#   tests/slurm/cluster.sh start   install SLURM and munge (Debian packages, as root) when missing, write the
#                                  configuration, start munged, slurmctld and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh stop    stop the daemons (the packages stay installed)
#   tests/slurm/cluster.sh status  exit 0 when the node answers, and print sinfo
# One partition, `debug`, with every core and most of the memory of the machine. Process tracking by /proc
# (proctrack/linuxproc) and no task plugin (task/none): neither needs cgroups, which a container may not offer. No
# accounting database: `sacct` has nothing to read (submitit then reads job states from `squeue` and says so).
set -euo pipefail

state=/var/spool/slurm-test
conf=/etc/slurm/slurm.conf
node=$(hostname -s)

node_idle() {
  [[ "$(sinfo --noheader --nodes="$node" --format=%t 2>/dev/null)" =~ ^(idle|mix|alloc)$ ]]
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "cluster.sh: SLURM is not installed and installing it needs root" >&2
    exit 3
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
  local memory cpus
  cpus=$(nproc)
  # Most of the memory: the tests ask for a few GB per job; the rest is left to the machine.
  memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 ))
  mkdir -p /etc/slurm "$state/ctld" "$state/d" /run/munge
  cat >"$conf" <<CONF
ClusterName=lora-vision-test
SlurmctldHost=$node
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
# Seconds between a job's SIGTERM and SIGKILL at its time limit or on scancel.
KillWait=10
# A job may run past its time limit by this many minutes before it is killed: none.
OverTimeLimit=0
NodeName=$node CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  chown munge:munge /run/munge
}

start() {
  install
  if node_idle; then
    return
  fi
  configure
  pgrep -x munged >/dev/null || sudo_munge
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if node_idle; then
      sinfo
      return
    fi
    # A node that was down (an earlier stop) comes back on request.
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "cluster.sh: the node did not become idle in 60 s; logs in $state" >&2
  sinfo >&2 || true
  exit 1
}

sudo_munge() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u munge -- munged
  else
    munged
  fi
}

stop() {
  scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null || true
  done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) node_idle && sinfo ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
