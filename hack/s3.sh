#!/usr/bin/env bash
# A real S3 API for the local stack: versitygw (its posix backend) built from its published Go module
# at the version pinned in hack/tools/versitygw/go.mod (hack/build-tool.sh versitygw, cached under
# ~/.cache/conveyor), on a free loopback port, with root credentials made once per state directory.
# `make demo REGISTRY=s3` and tests/e2e/test_s3_registry.py keep the model registry in it.
#
#   hack/s3.sh up      start it (or reuse a running one), make sure bucket `conveyor` exists; print its URL
#   hack/s3.sh down    stop what `up` started (the recorded pid, only while it runs versitygw)
#   hack/s3.sh status  pid, URL, health, data directory and log
#   hack/s3.sh env     shell exports: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION
#
# Environment: CONVEYOR_S3_DIR (default $XDG_CACHE_HOME/conveyor/s3), CONVEYOR_S3_BIN (default: the
# pinned build).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CONVEYOR_S3_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/s3}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3
case ${1:-} in
  up|down|status|env) ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
# One implementation of the lifecycle, shared with the tests' fixture.
exec env PYTHONPATH="$ROOT/hack/devstack${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m conveyor_devstack.s3 "$1" --state-dir "$STATE"
