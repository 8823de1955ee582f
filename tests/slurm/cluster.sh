#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine for the tests: slurmctld + 2 slurmd "nodes" (node1, node2 on
# 127.0.1.1/2, each with its own hostname via unshare --uts), munge, no systemd or cgroups.
#   bash tests/slurm/cluster.sh start   # installs Debian's slurm-wlm if missing (root), starts the daemons
#   bash tests/slurm/cluster.sh stop    # stops what start started
# It refuses to touch a machine whose /etc/slurm/slurm.conf it did not write.
set -euo pipefail
ROOT=/tmp/dsllm-slurm
CONF=/etc/slurm/slurm.conf
MARK="# dsllm-test-cluster"
NODES=(node1 node2)

stop() {
  for pidfile in "$ROOT"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  pkill -f "slurmd -N node" 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  sleep 0.5
}

install() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
}

start() {
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: needs root" >&2; exit 3; }
  if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -q "$MARK"; then
    echo "cluster.sh: $CONF exists and is not ours; refusing to replace a real Slurm config" >&2; exit 3
  fi
  install
  stop
  rm -rf "$ROOT"; mkdir -p "$ROOT"/state /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
  # munge: a key, and the daemon running as the munge user
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- munged
  # A fixed node shape, not this machine's: CI runners differ in cores and topology, and a job asking for
  # --cpus-per-task=2 was refused there ("CPU count per node can not be satisfied"). config_overrides makes
  # slurmd trust the config over detected hardware; tasks are not bound (task/none), so oversubscribing is fine.
  cpus=4
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
  {
    echo "$MARK"
    cat <<CONF
ClusterName=dsllmci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool-%n
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd-%n.pid
SlurmctldLogFile=$ROOT/slurmctld.log
SlurmdLogFile=$ROOT/slurmd-%n.log
TmpFS=$ROOT/tmp-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/jobcomp.log
MpiDefault=none
ReturnToService=2
MinJobAge=5
KillWait=20
SchedulerParameters=sched_interval=1
SlurmdTimeout=60
NodeName=node1 NodeAddr=127.0.1.1 Port=17001 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=127.0.1.2 Port=17002 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
CONF
  } > "$CONF"
  for i in 1 2; do
    grep -q "^127.0.1.$i node$i\$" /etc/hosts || echo "127.0.1.$i node$i" >> /etc/hosts
    mkdir -p "$ROOT/spool-node$i" "$ROOT/tmp-node$i"
  done
  slurmctld -c
  for n in "${NODES[@]}"; do
    unshare --uts sh -c "hostname $n && exec slurmd -N $n"
  done
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | grep -c idle || true)" -ge 1 ] && \
       [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle || true)" -ge 2 ]; then
      # "idle" in sinfo is not yet "runs jobs": wait until a trivial job on both nodes succeeds.
      for _ in $(seq 1 30); do
        if timeout 20 srun -N2 -n2 --time=1 true >/dev/null 2>&1; then
          # ...and until that job has left the nodes: a job submitted while they are still "completing" is
          # rejected with "No nodes satisfy requirements" (seen in CI).
          for _ in $(seq 1 30); do
            [ -z "$(squeue -h)" ] && [ "$(sinfo -h -N -o '%T' | grep -vc '^idle$')" = 0 ] && break
            sleep 0.5
          done
          echo "cluster.sh: up: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"
          return 0
        fi
        sleep 1
      done
      break
    fi
    sleep 0.5
  done
  echo "cluster.sh: nodes did not come up" >&2
  sinfo -N >&2 || true
  tail -20 "$ROOT"/*.log >&2 || true
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop; echo "cluster.sh: stopped" ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
