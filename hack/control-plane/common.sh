# Sourced by up.sh, down.sh and watchdog.sh.

# alive PID: the process exists and has not exited. `kill -0` also succeeds on a zombie, and
# orphans here are reaped by an init that may take seconds to, so an exited process would look
# alive: read its state from /proc instead.
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }" # after the command name, which may hold spaces and parentheses
  [[ "${stat%% *}" != Z ]]
}
