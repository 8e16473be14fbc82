#!/usr/bin/env bash
# Wait (up to 60 s) until `sinfo` shows both test nodes idle; exit 1 otherwise:
#   bash tests/cluster/status.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ -f "$ENV_FILE" ] || { echo "cluster: not started ($ENV_FILE missing): run tests/cluster/start.sh" >&2; exit 1; }
source "$ENV_FILE"
both_idle() { [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -eq 2 ]; }
if wait_for 60 "both nodes idle" both_idle; then
  sinfo -N -o '%N %P %T %c'; exit 0
fi
sinfo -N -o '%N %P %T %c %E' >&2 || true; exit 1
