#!/usr/bin/env bash
# A team's MLflow tracking server on PostgreSQL, in one private folder.
#
#   bash envs/tracking_server.sh start     # or: make tracking-server
#   bash envs/tracking_server.sh status
#   bash envs/tracking_server.sh stop      # or: make tracking-server-stop
#   bash envs/tracking_server.sh db-stop   # stop only PostgreSQL (a fault drill); db-start again
#
# The folder (TRACKING_SERVER_DIR, default .tracking-server/ in the checkout) holds everything
# it starts: postgres/ (the cluster, its own unix socket under run/, no TCP listener), mlflow.pid
# (the server's process group), the logs, artifacts/ (unless TRACKING_ARTIFACTS names a shared
# path) and `env`, the lines a workflow or the tests read:
#   DEEPIMAGE_TEST_TRACKING_URI=http://127.0.0.1:5055
# Point a workflow at it with `mlflow: {tracking_uri: http://<host>:<port>}` in its config.
# `stop` stops what `start` started here and nothing else; the data stays for the next start.
#
# Settings (environment): TRACKING_HOST (127.0.0.1; 0.0.0.0 for jobs on other nodes),
# TRACKING_PORT (5055), TRACKING_PG_PORT (55432: names the socket), TRACKING_WORKERS (2),
# TRACKING_ARTIFACTS (<folder>/artifacts; a path every worker's server can write), PYTHON.
# PostgreSQL 15 (or the newest under /usr/lib/postgresql) runs as the `postgres` user when this
# runs as root; missing on Debian as root, it is installed with apt.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${TRACKING_SERVER_DIR:-$ROOT/.tracking-server}"
HOST="${TRACKING_HOST:-127.0.0.1}"
PORT="${TRACKING_PORT:-5055}"
PG_PORT="${TRACKING_PG_PORT:-55432}"
WORKERS="${TRACKING_WORKERS:-2}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PGDATA="$DIR/postgres/data"
SOCKET_DIR="$DIR/postgres/run"
PIDFILE="$DIR/mlflow.pid"
START_TIMEOUT_S="${TRACKING_START_TIMEOUT_S:-180}"

die() { echo "tracking_server: $*" >&2; exit 1; }

pg_bin() {
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [[ -z "$bin" ]] && command -v pg_ctl >/dev/null; then bin="$(dirname "$(command -v pg_ctl)")"; fi
    echo "$bin"
}

install_postgres() {
    [[ -n "$(pg_bin)" ]] && return
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "tracking_server: PostgreSQL not found: installing it with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
    fi
    [[ -n "$(pg_bin)" ]] || die "PostgreSQL not found: install it (Debian: apt-get install postgresql-15) and run again"
}

# PostgreSQL refuses to run as root: as root its commands run as the `postgres` user.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_ctl() { as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" "$@"; }

db_running() { [[ -f "$PGDATA/postmaster.pid" ]] && pg_ctl status >/dev/null 2>&1; }

init_db() {
    [[ -f "$PGDATA/PG_VERSION" ]] && return
    mkdir -p "$DIR/postgres"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres: "$DIR/postgres"
        runuser -u postgres -- test -x "$DIR/postgres" \
            || die "the postgres user cannot reach $DIR (a parent folder is private): set TRACKING_SERVER_DIR to a folder it can reach"
    fi
    chmod 700 "$DIR/postgres"
    as_pg mkdir -p "$SOCKET_DIR"
    # Only local socket connections, trusted: the socket's folder is private to this user.
    as_pg "$(pg_bin)/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=reject \
        -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 || die "initdb failed: see $DIR/initdb.log"
    cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = ''
port = $PG_PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 200
EOF
}

start_db() {
    db_running && return
    rm -f "$SOCKET_DIR/.s.PGSQL.$PG_PORT.lock"
    pg_ctl -l "$DIR/postgres/server.log" -w -t 60 start >/dev/null \
        || die "PostgreSQL did not start: see $DIR/postgres/server.log"
    # The MLflow database and its role, once.
    local psql=("$(pg_bin)/psql" -h "$SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres -qtA)
    if [[ -z "$(as_pg "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'")" ]]; then
        as_pg "${psql[@]}" -c "CREATE ROLE mlflow LOGIN" -c "CREATE DATABASE mlflow OWNER mlflow" >/dev/null
    fi
}

stop_db() {
    db_running || return 0
    pg_ctl -m fast -w -t 60 stop >/dev/null
}

backend_uri() { echo "postgresql+psycopg2://mlflow@/mlflow?host=$SOCKET_DIR&port=$PG_PORT"; }

mlflow_pid() {
    # The pid in the pid file, if that process is still this folder's mlflow server.
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--backend-store-uri $(backend_uri)" \
        && echo "$pid"
}

healthy() { curl -fsS -m 2 "http://$1:$PORT/health" >/dev/null 2>&1; }

local_host() { if [[ "$HOST" == "0.0.0.0" ]]; then echo 127.0.0.1; else echo "$HOST"; fi; }

start_mlflow() {
    mlflow_pid >/dev/null && return
    "$PY" -c "import psycopg2" 2>/dev/null \
        || die "$PY has no psycopg2 (PostgreSQL's Python driver): run \`make setup\` (envs/requirements.txt)"
    if healthy "$(local_host)"; then die "port $PORT already answers (another server): set TRACKING_PORT"; fi
    local artifacts="${TRACKING_ARTIFACTS:-$DIR/artifacts}"
    mkdir -p "$artifacts"
    # Its own session, so `stop` ends the server and its workers as one process group. Without
    # MLflow's job runner (GenAI jobs, unused here), which leaves a folder in /dev/shm per start.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PY" -m mlflow server \
        --backend-store-uri "$(backend_uri)" --artifacts-destination "$artifacts" \
        --host "$HOST" --port "$PORT" --workers "$WORKERS" \
        >>"$DIR/mlflow.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until healthy "$(local_host)"; do
        if ! mlflow_pid >/dev/null; then
            rm -f "$PIDFILE"
            die "mlflow server exited: see $DIR/mlflow.log"
        fi
        ((SECONDS < deadline)) || { stop_mlflow; die "mlflow server not up after $START_TIMEOUT_S s: see $DIR/mlflow.log"; }
        sleep 0.5
    done
}

stop_mlflow() {
    local pid
    if pid="$(mlflow_pid)"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
}

write_env() {
    cat >"$DIR/env" <<EOF
DEEPIMAGE_TEST_TRACKING_URI=http://$(local_host):$PORT
DEEPIMAGE_TRACKING_SERVER_DIR=$DIR
EOF
}

status() {
    local db=down server=down
    db_running && db=up
    mlflow_pid >/dev/null && healthy "$(local_host)" && server=up
    echo "tracking_server: PostgreSQL $db ($PGDATA), mlflow server $server (http://$(local_host):$PORT)"
    [[ $db == up && $server == up ]]
}

case "${1:-}" in
    start)
        install_postgres
        mkdir -p "$DIR"
        init_db
        start_db
        start_mlflow
        write_env
        echo "tracking_server: MLflow on PostgreSQL at http://$(local_host):$PORT (artifacts ${TRACKING_ARTIFACTS:-$DIR/artifacts}; state $DIR)"
        ;;
    stop)
        [[ -d "$DIR" ]] || exit 0
        stop_mlflow
        [[ -n "$(pg_bin)" ]] && stop_db
        rm -f "$DIR/env"
        echo "tracking_server: stopped ($DIR)"
        ;;
    status) status ;;
    db-stop) stop_db ;;
    db-start) start_db ;;
    *) echo "usage: $0 start|stop|status|db-stop|db-start" >&2; exit 2 ;;
esac
