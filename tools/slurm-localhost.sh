#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying `avse exp NAME --slurm` and for the Slurm test.
#
#   sudo apt-get install slurm-wlm munge      # Debian/Ubuntu packages (22.05 and later)
#   sudo tools/slurm-localhost.sh [STATE_DIR]  # start munged, slurmctld and slurmd (as root)
#   export SLURM_CONF=STATE_DIR/slurm.conf     # then sbatch, squeue, scontrol, avse exp --slurm
#   sudo tools/slurm-localhost.sh --stop [STATE_DIR]
#
# Nothing outside STATE_DIR (default /tmp/avse-slurm) is written: the daemons read the configuration from there.
# The node offers this machine's CPUs and memory, no GPUs: submit with `avse exp NAME --slurm --gpus-per-node 0`.
set -euo pipefail

stop=0
if [[ "${1:-}" == "--stop" ]]; then stop=1; shift; fi
state=$(realpath -m "${1:-/tmp/avse-slurm}")
conf="$state/slurm.conf"

if [[ $(id -u) -ne 0 ]]; then
    echo "error: run as root: the daemons run as root on this one-node cluster (SlurmUser=root)" >&2
    exit 2
fi
for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; install Slurm with: apt-get install slurm-wlm munge" >&2; exit 2; }
done

stop_daemons() {
    for daemon in slurmd slurmctld; do
        if [[ -f "$state/$daemon.pid" ]]; then
            kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true
            rm -f "$state/$daemon.pid"
        fi
    done
}
if (( stop )); then
    stop_daemons
    echo "stopped the Slurm daemons of $state"
    exit 0
fi
stop_daemons  # a second start replaces the first

mkdir -p "$state/ctld" "$state/spool"
host=$(hostname -s)
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
cat > "$conf" <<CONF
ClusterName=avse-localhost
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if ! pgrep -x munged >/dev/null; then
    [[ -s /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown -R munge:munge /etc/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    runuser -u munge -- munged 2>/dev/null || munged --force
fi
slurmctld -f "$conf" -i
slurmd -f "$conf"

export SLURM_CONF=$conf
for _ in $(seq 60); do
    if sinfo --noheader --responding -o %T 2>/dev/null | grep -qx idle; then
        echo "Slurm is up: export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.5
done
echo "error: the node did not become idle within 30 s; see $state/slurmctld.log and $state/slurmd.log" >&2
exit 1
