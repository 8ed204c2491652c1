#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by .ci/start_slurm.sh (slurmd, slurmctld, then munged).
# Only the daemons whose pid files that script wrote are signalled.
set -uo pipefail
STATE=${RLHF_SLURM_STATE:-/var/lib/rlhf_ablate_slurm}
for p in slurmd slurmctld; do
  if [ -s "$STATE/$p.pid" ] && kill -0 "$(cat "$STATE/$p.pid")" 2>/dev/null; then
    kill "$(cat "$STATE/$p.pid")" && echo "stopped $p"
  fi
done
if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  kill "$(cat /run/munge/munged.pid)" && echo "stopped munged"
fi
