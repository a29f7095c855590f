# shellcheck shell=bash
# Sourced by hack/local-cluster.sh and hack/placement.sh.

reap_pids() { # pids...: already signalled; give them 5 s together, then SIGKILL what is left
  local pid alive
  (($#)) || return 0
  for _ in $(seq 1 50); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "$@"; do kill -9 "$pid" 2>/dev/null || true; done
}
