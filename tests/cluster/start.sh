#!/usr/bin/env bash
# Start the two-node SLURM test cluster (as root; idempotent: running daemons are kept):
#   bash tests/cluster/start.sh && source tests/cluster/.state/env && sinfo
# munged, mariadbd, slurmdbd, slurmctld and one slurmd per node name (n1, n2, both on this
# machine), all with their files in the private state folder and their own ports; stop.sh
# stops exactly these by their pid files.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for exe in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr sinfo; do
  command -v "$exe" >/dev/null || { echo "cluster start: $exe not found: run tests/cluster/install.sh" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "cluster start: needs root (daemons run as munge, mysql, slurm)" >&2; exit 1; }

mkdir -p "$STATE"/{munge,mysql,mysql-run,ctld,dbd,d-n1,d-n2}
chown munge:munge "$STATE/munge"; chmod 0755 "$STATE/munge"
chown mysql:mysql "$STATE/mysql" "$STATE/mysql-run"
chown slurm:slurm "$STATE/ctld" "$STATE/dbd"

# slurm.conf and slurmdbd.conf (slurmdbd reads the one beside $SLURM_CONF)
sed -e "s#@STATE@#$STATE#g" -e "s#@CLUSTER@#$CLUSTER#g" -e "s#@CTLD_PORT@#$CTLD_PORT#g" \
    -e "s#@P1@#${SLURMD_PORTS[0]}#g" -e "s#@P2@#${SLURMD_PORTS[1]}#g" -e "s#@DBD_PORT@#$DBD_PORT#g" \
    -e "s#@MUNGE_SOCKET@#$MUNGE_SOCKET#g" "$HERE/slurm.conf.in" > "$STATE/slurm.conf"
cat > "$STATE/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=slurm
PidFile=$STATE/dbd/slurmdbd.pid
LogFile=$STATE/dbd/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=deepimage_slurm_acct
CONF
chown slurm:slurm "$STATE/slurmdbd.conf"; chmod 0600 "$STATE/slurmdbd.conf"
printf 'export SLURM_CONF=%s\n' "$STATE/slurm.conf" > "$ENV_FILE"
export SLURM_CONF="$STATE/slurm.conf"
# Snakemake's jobstep plugin runs each job's command without SLURM_CONF (it drops the SLURM_*
# variables), so srun inside a job reads SLURM's default path: link it here unless this machine
# has a SLURM config of its own (then the tests are refused below). stop.sh removes the link.
mkdir -p /etc/slurm
# A link left by another checkout's test cluster that was killed before stop.sh ran (its
# slurmctld is gone) is stale: take it over, saying so. A live one, or a real file, is refused.
link="$(readlink /etc/slurm/slurm.conf 2>/dev/null || true)"
if [ -n "$link" ] && [ "$link" != "$STATE/slurm.conf" ] && [ "$(basename "$link")" = slurm.conf ] \
   && { [ ! -e "$link" ] || grep -q "^ClusterName=$CLUSTER\$" "$link"; } \
   && ! pid_alive "$(dirname "$link")/ctld.pid"; then
  echo "cluster start: replacing the stale link /etc/slurm/slurm.conf -> $link (its test cluster is not running)" >&2
  rm -f /etc/slurm/slurm.conf
fi
[ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ] || ln -s "$STATE/slurm.conf" /etc/slurm/slurm.conf
if [ "$(readlink /etc/slurm/slurm.conf)" != "$STATE/slurm.conf" ]; then
  echo "cluster start: /etc/slurm/slurm.conf belongs to another SLURM setup; jobs would read it instead" >&2; exit 1
fi

# munged on the default socket, unless one (ours or the machine's) already answers there
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
fi
wait_for 20 munged bash -c "munge --socket='$MUNGE_SOCKET' -n | unmunge --socket='$MUNGE_SOCKET'"

# MariaDB for slurmdbd: own data folder, socket and port, 127.0.0.1 only
if [ ! -d "$STATE/mysql/mysql" ]; then
  mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
    --auth-root-authentication-method=socket > "$STATE/mysql-install.log" 2>&1
fi
if ! pid_alive "$STATE/mysql-run/mysqld.pid"; then
  setsid runuser -u mysql -- /usr/sbin/mariadbd --no-defaults --datadir="$STATE/mysql" \
    --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --pid-file="$STATE/mysql-run/mysqld.pid" --log-error="$STATE/mysql-run/error.log" \
    --innodb-buffer-pool-size=64M < /dev/null > /dev/null 2>&1 &
fi
wait_for 60 mariadbd mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "SELECT 1"
mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON deepimage_slurm_acct.* TO 'slurm'@'127.0.0.1';"

# slurmdbd, then the cluster, an account and this user in it (sacct and the plugin's account check)
if ! pid_alive "$STATE/dbd/slurmdbd.pid"; then
  slurmdbd
fi
wait_for 60 slurmdbd sacctmgr -n list cluster
# (each list read whole first: `grep -q` closing the pipe early would fail it under pipefail)
have() { local out; out="$(sacctmgr -n -P list "$1" format="$1")"; grep -qx "$2" <<<"$out"; }
have cluster "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
have account deepimage || sacctmgr -i add account deepimage Cluster="$CLUSTER" \
  Description="deepimage tests" Organization=deepimage >/dev/null
assoc="$(sacctmgr -n -P list assoc user="$(id -un)" account=deepimage format=user)"
[ -n "$assoc" ] || sacctmgr -i add user "$(id -un)" Account=deepimage Cluster="$CLUSTER" >/dev/null

if ! pid_alive "$STATE/ctld.pid"; then
  slurmctld -f "$SLURM_CONF"
fi
wait_for 30 slurmctld scontrol ping
for i in 0 1; do
  n="${NODES[$i]}"
  pid_alive "$STATE/d-$n.pid" || slurmd -N "$n" -f "$SLURM_CONF"
done
"$HERE/status.sh"
