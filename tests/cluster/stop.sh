#!/usr/bin/env bash
# Stop the daemons start.sh started, by their pid files (nothing else), newest first:
#   bash tests/cluster/stop.sh
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
pidfiles=("$STATE/d-n2.pid" "$STATE/d-n1.pid" "$STATE/ctld.pid" "$STATE/dbd/slurmdbd.pid"
          "$STATE/mysql-run/mysqld.pid" "$STATE/munge/munged.pid")
for f in "${pidfiles[@]}"; do
  pid_alive "$f" || continue
  pid="$(cat "$f" 2>/dev/null)" || continue  # slurmd removes its pid file as it exits
  kill -TERM "$pid"
  # A stopped munged can stay a zombie here (nothing reaps it): pid_alive ignores zombies.
  for _ in $(seq 30); do pid_alive "$f" || break; sleep 1; done
  pid_alive "$f" && { echo "cluster stop: pid $pid ($f) ignored TERM, sending KILL" >&2; kill -KILL "$pid"; }
  rm -f "$f"
done
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$STATE/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
echo "cluster stopped (state kept in $STATE)"
