#!/usr/bin/env bash
# A single-node Slurm on this machine, for the opt-in `pytest -m slurm` (Debian 12, as root).
# Installs Debian's slurmctld, slurmd and munge, writes a one-node slurm.conf and starts the
# daemons; `scontrol ping` then answers UP. Stop them with: pkill slurmd; pkill slurmctld.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd munge slurm-client >/dev/null
host=$(hostname)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd.log
ReturnToService=2
NodeName=$host CPUs=$(nproc) RealMemory=$(($(free -m | awk '/Mem:/ {print $2}') / 2)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# Slurm 22.05 has no "disabled" cgroup plugin; autodetect works in a container without cgroups.
echo "CgroupPlugin=autodetect" > /etc/slurm/cgroup.conf
mkdir -p /var/spool/slurmctld /var/spool/slurmd /run/munge
chown munge:munge /run/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 30); do
    scontrol ping 2>/dev/null | grep -q UP && sinfo && exit 0
    sleep 1
done
echo "slurmctld did not answer within 30 s; see /var/log/slurmctld.log" >&2
exit 1
