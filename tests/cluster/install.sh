#!/usr/bin/env bash
# Install the packages of the two-node test cluster (Debian, as root; idempotent):
#   sudo bash tests/cluster/install.sh
# slurmdbd + mariadb give the cluster accounting, so `sacct` works as on users' clusters.
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
need=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "cluster install: ${PKGS[*]} already installed"; exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "cluster install: needs root for apt-get install ${need[*]} (run it with sudo)" >&2; exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "cluster install: apt-get not found (Debian/Ubuntu only); install ${need[*]} yourself" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -q
# The packages' own service start is refused here (no systemd); start.sh starts the daemons.
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
