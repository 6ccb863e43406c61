#!/usr/bin/env bash
# A one-node Slurm on 127.0.0.1 for the Slurm launcher's test (Debian's slurm-wlm and munge, run as root).
# Prints nothing on success; `sbatch` is then on PATH and accepts jobs. Idempotent.
set -euo pipefail
if ! command -v slurmctld >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
node=$(hostname)
state=/var/spool/slurm-ci
mkdir -p "$state/ctld" "$state/d" /var/log/slurm /run/munge /etc/slurm
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=sweep-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName=${node} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
# Two stand-in GPUs: Slurm schedules `--gpus-per-node=1` against them (it needs a character device per GPU).
printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/null\nNodeName=%s Name=gpu File=/dev/zero\n' "$node" "$node" \
  >/etc/slurm/gres.conf
chown -R munge:munge /run/munge /etc/munge 2>/dev/null || true
pgrep -x munged >/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld -c  # -c: no state from an earlier run
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^idle' && exit 0
  sleep 1
done
echo "slurm did not come up:" >&2; sinfo >&2 || true; tail -n 20 /var/log/slurm/*.log >&2
exit 1
