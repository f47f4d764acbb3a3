#!/usr/bin/env bash
# Run down.sh on STATE_DIR once process OWNER is gone; exit quietly when down.sh ran first
# (its pid file removed). Started by `up.sh --owner`, so a test run killed with -9 leaves nothing.
#   watchdog.sh OWNER STATE_DIR
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
OWNER="${1:?usage: watchdog.sh OWNER STATE_DIR}"
STATE="${2:?usage: watchdog.sh OWNER STATE_DIR}"
while alive "$OWNER" && [[ -f "$STATE/pids" ]]; do sleep 1; done
[[ -f "$STATE/pids" ]] && exec "$HERE/down.sh" "$STATE"
exit 0
