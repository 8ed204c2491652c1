#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (Debian's slurm-wlm + munge), so that CI can submit the
# rlhf_ablate array job and its dependent report job for real (tests/test_slurm_cluster.py).
#
# Idempotent: installs the packages only when missing, rewrites the config only when it is ours, and leaves
# daemons that already run alone. Needs root (apt-get, /etc/munge, daemons). The settings are the ones verified in
# docs/stack.md ("SLURM"): proctrack/linuxproc and task/none need no cgroups, so it also works in a container;
# accounting is off, so finished jobs are seen with `squeue -t all` / `scontrol show job` for MinJobAge seconds.
#
# Usage:   .ci/start_slurm.sh            # prints `export SLURM_CONF=...` as its last line
#          eval "$(.ci/start_slurm.sh | tail -n 1)"   or   source "$RLHF_SLURM_STATE/env.sh"
# Stop:    .ci/stop_slurm.sh
set -euo pipefail

STATE=${RLHF_SLURM_STATE:-/var/lib/rlhf_ablate_slurm}
# /etc/slurm/slurm.conf is where the Debian client tools look by default, so `sinfo` works in every shell (and in
# pytest) even without SLURM_CONF. Set RLHF_SLURM_CONF to keep a machine's own config untouched.
CONF=${RLHF_SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# written by rlhf_ablate .ci/start_slurm.sh"

log() { echo "[start_slurm] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "start_slurm.sh must run as root (it installs packages and starts munged, slurmctld and slurmd)." >&2
  exit 1
fi

# 1. Packages (only if missing: apt-get update is the slow part).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. munge: a key of mode 400 owned by munge (munged refuses anything looser), then the daemon.
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
fi

# 3. slurm.conf for one node that is also the controller.
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MB=$(( MEM_MB * 9 / 10 ))   # leave headroom: slurmd drains a node whose RealMemory exceeds what it finds
mkdir -p "$STATE" "$STATE/slurmctld" "$STATE/slurmd" "$STATE/log" "$(dirname "$CONF")"
if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
  echo "$CONF exists and was not written by this script; set RLHF_SLURM_CONF=/some/other/slurm.conf" >&2
  exit 1
fi
NEW_CONF=$(cat <<EOF
$MARKER
ClusterName=rlhfci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups: works in containers and CI runners.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# CPUs are the consumable resource; memory is only checked against the node's RealMemory, so array tasks that ask
# for no --mem still run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Keep finished jobs visible to squeue/scontrol for 10 minutes (there is no accounting database to ask).
MinJobAge=600
SlurmdTimeout=60
NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"
  CONF_CHANGED=1
else
  CONF_CHANGED=0
fi
export SLURM_CONF=$CONF
printf 'export SLURM_CONF=%q\n' "$CONF" > "$STATE/env.sh"

# 4. Daemons. A running pair with an unchanged config is left alone; a changed config restarts them.
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$CONF_CHANGED" = 1 ]; then
  for p in slurmd slurmctld; do
    if alive "$STATE/$p.pid"; then log "restarting $p (config changed)"; kill "$(cat "$STATE/$p.pid")"; sleep 1; fi
  done
fi
if ! alive "$STATE/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld -f "$CONF"
fi
if ! alive "$STATE/slurmd.pid"; then
  log "starting slurmd"
  slurmd -f "$CONF"
fi

# 5. Wait for the node to be schedulable.
state=""
for _ in $(seq 60); do
  state=$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle|mix|alloc) break ;;
    drain*|down*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
case "$state" in
  idle|mix|alloc) log "node $HOST is $state ($CPUS CPUs, ${REAL_MB} MB)";;
  *) echo "Slurm node $HOST did not become idle (state '${state:-unknown}'); see $STATE/log/" >&2
     tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
     exit 1 ;;
esac
cat "$STATE/env.sh"
