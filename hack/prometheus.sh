#!/usr/bin/env bash
# A real, local Prometheus (Debian's package, installed by hack/install-deps.sh) for the demo and the
# tests: it scrapes the operator and every local predictor through file-based service discovery (the
# local executor writes one targets file per predictor), once a second, on a free loopback port. The
# pinned configuration, the pid and port, the TSDB and the log live in the state directory.
#
#   hack/prometheus.sh up      start it (or reuse a running one); print its URL
#   hack/prometheus.sh down    stop what `up` started (the recorded pid, only while it runs prometheus)
#   hack/prometheus.sh status  pid, URL, readiness and the targets it scrapes
#   hack/prometheus.sh env     shell exports: CONVEYOR_PROMETHEUS_URL, CONVEYOR_PROMETHEUS_TARGETS
#
# Environment: CONVEYOR_PROMETHEUS_DIR (default $XDG_CACHE_HOME/conveyor/prometheus),
# CONVEYOR_PROMETHEUS_BIN (default: prometheus on PATH).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CONVEYOR_PROMETHEUS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/prometheus}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3
case ${1:-} in
  up|down|status|env) ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
# One implementation of the configuration and the lifecycle, shared with the tests' fixture.
exec env PYTHONPATH="$ROOT/hack/devstack${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m conveyor_devstack.prometheus "$1" --state-dir "$STATE"
