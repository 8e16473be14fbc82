# Paths and ports of the test cluster, sourced by start.sh, stop.sh and status.sh.
# Everything lives in one private state folder; every port differs from SLURM's and MariaDB's
# defaults so a site's own daemons on this machine are never touched.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${DEEPIMAGE_SLURM_STATE:-$HERE/.state}"
CLUSTER=deepimage2n
CTLD_PORT=6917
SLURMD_PORTS=(17101 17102)
NODES=(n1 n2)
DBD_PORT=17103
DB_PORT=17104
DB_PASS=deepimage-test-only   # a throwaway database that listens on 127.0.0.1 only
# munge keeps its default socket: sacctmgr's connection to slurmdbd ignores AuthInfo=socket=
# (22.05, tried). start.sh starts a munged only when none answers there, and stop.sh stops only that one.
MUNGE_SOCKET=/run/munge/munge.socket.2
DB_SOCKET="$STATE/mysql-run/mysqld.sock"
ENV_FILE="$STATE/env"

# pid_alive FILE: the pid in FILE is a running (not zombie) process
pid_alive() {
  [ -s "$1" ] || return 1
  local pid; pid="$(cat "$1" 2>/dev/null)" || return 1  # a daemon removes its pid file as it exits
  [ -d "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every second until it succeeds
wait_for() {
  local secs="$1" what="$2"; shift 2
  for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "cluster: $what not ready after ${secs}s (logs in $STATE)" >&2; return 1
}
