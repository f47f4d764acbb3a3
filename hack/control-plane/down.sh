#!/usr/bin/env bash
# Stop what up.sh started in STATE_DIR, by the PIDs it recorded: TERM, then KILL after a grace.
#   down.sh STATE_DIR [--purge]   (--purge also removes STATE_DIR)
set -uo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
STATE="${1:?usage: down.sh STATE_DIR [--purge]}"
PIDS="$STATE/pids"
[[ -f "$PIDS" ]] || exit 0
mapfile -t pids < <(tac "$PIDS")   # controller-manager first, etcd last
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
for _ in $(seq 50); do
  left=()
  for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
  ((${#left[@]})) || break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
rm -f "$PIDS"
[[ "${2:-}" == "--purge" ]] && rm -rf "$STATE"
exit 0
