#!/usr/bin/env bash
# The demo on one machine, on the local control plane (real kube-apiserver, etcd, controller-manager):
#   1. a real local Prometheus (hack/prometheus.sh) scraping the operator and every predictor; the
#      operator (python -m conveyor.operator --prometheus-url) and the local executor, a stand-in for
#      the KubeRay and KServe controllers that runs RayJob entrypoints and predictors as local processes
#      and routes each InferenceService's traffic by its live weights;
#   2. an MLPipeline: its run becomes a RayJob; the executor runs the real training (Ray Train, torch);
#      the operator gates the registered version and hands it to the ModelDeployment;
#   3. the ModelDeployment: its InferenceService is served by KServe's real model server; predictions
#      over HTTP;
#   4. the story (conveyor_devstack.demo, under load throughout): v2 (the full data, v1 saw a sample)
#      promoted through every canary step, v3 (a planted fault) rolled back at its first, drifted traffic
#      retrains v4, which goes through the canary; a BatchPrediction scores a table with the promoted
#      version; one line per event, from the objects' status and events; an HTML report at the end.
# The RayJobs join one local Ray cluster (conveyor_devstack.rayhead: RAY_ADDRESS, as in a KubeRay
# cluster) instead of each starting and stopping a Ray of its own.
# REGISTRY=file (default) keeps the model registry in a folder; REGISTRY=s3 in the local S3 server
# (hack/s3.sh: versitygw), with the credentials delivered as on a cluster: the operator gets them in
# its environment (the chart's registry.credentialsSecret), training and serving from a Secret named in
# the pods' envFrom, which the executor resolves from the apiserver (its own environment has none).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NS=${DEMO_NAMESPACE:-conveyor-demo}
DEMO=${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/demo
PY=$ROOT/.venv/bin/python
REGISTRY=${REGISTRY:-file}
[[ $REGISTRY == file || $REGISTRY == s3 ]] || { echo "REGISTRY must be file or s3, not '$REGISTRY'" >&2; exit 2; }

kubeconfig=$("$ROOT/hack/local-cluster.sh" up)
eval "$("$ROOT/hack/local-cluster.sh" env)"
"$ROOT/hack/prometheus.sh" up >/dev/null
eval "$("$ROOT/hack/prometheus.sh" env)" # CONVEYOR_PROMETHEUS_URL, CONVEYOR_PROMETHEUS_TARGETS
export KUBECONFIG=$kubeconfig

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() {
  printf '\n\033[31mdemo failed: %s\033[0m\nlogs: %s/logs\n' "$1" "$DEMO" >&2
  tail -n 25 "$DEMO"/logs/*.log >&2 || true
  exit 1
}

step "control plane: $(kubectl version -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
kubectl get crd

kubectl delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
kubectl create namespace "$NS" >/dev/null
rm -rf "$DEMO" && mkdir -p "$DEMO/registry" "$DEMO/logs"
registry_uri=file://$DEMO/registry
pod_settings='{}'
if [[ $REGISTRY == s3 ]]; then
  step "the registry in the local S3 server: $("$ROOT/hack/s3.sh" up)"
  eval "$("$ROOT/hack/s3.sh" env)" # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION
  registry_uri=s3://conveyor/demo-$(date +%s)
  kubectl create secret generic registry-credentials -n "$NS" --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
    --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" --from-literal=AWS_ENDPOINT_URL="$AWS_ENDPOINT_URL" \
    --from-literal=AWS_DEFAULT_REGION="$AWS_DEFAULT_REGION" >/dev/null
  pod_settings='{"envFrom": [{"secretRef": {"name": "registry-credentials"}}]}'
fi

step "a Ray cluster for the RayJobs (as KubeRay keeps one up for a job): $("$PY" -m conveyor_devstack.rayhead up "$DEMO/ray")"
trap '"$PY" -m conveyor_devstack.rayhead down "$DEMO/ray"' EXIT
ray_address=$(cat "$DEMO/ray/rayhead.address")

step "start the operator and the local executor (logs in $DEMO/logs); Prometheus at $CONVEYOR_PROMETHEUS_URL"
metrics_port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$DEMO" && exec "$PY" -m conveyor.operator --namespace "$NS" --metrics-port "$metrics_port" --liveness-port 0 \
  --prometheus-url "$CONVEYOR_PROMETHEUS_URL") >"$DEMO/logs/operator.log" 2>&1 &
operator_pid=$!
# The local Prometheus scrapes the operator too (file_sd, as for the predictors the executor lists).
printf '[{"targets": ["127.0.0.1:%s"], "labels": {"component": "operator"}}]\n' "$metrics_port" \
  >"$CONVEYOR_PROMETHEUS_TARGETS/operator-$NS.json"
(cd "$DEMO" && exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_ENDPOINT_URL RAY_ADDRESS="$ray_address" "$PY" -m conveyor_devstack.executor --kubeconfig "$kubeconfig" --namespace "$NS" \
  --state-dir "$DEMO/executor" --prometheus-targets "$CONVEYOR_PROMETHEUS_TARGETS" --faults "$DEMO/faults.json") >"$DEMO/logs/executor.log" 2>&1 &
executor_pid=$!
trap 'kill $operator_pid $executor_pid 2>/dev/null || true; wait 2>/dev/null || true; rm -f "$CONVEYOR_PROMETHEUS_TARGETS/operator-$NS.json"
  "$PY" -m conveyor_devstack.rayhead down "$DEMO/ray"' EXIT

step "the story (hack/devstack/conveyor_devstack/demo.py): v1 trains and serves, v2 is promoted, v3 rolled back, drift retrains v4, a batch is scored"
report=$DEMO/report.html
"$PY" -m conveyor_devstack.demo --kubeconfig "$kubeconfig" --namespace "$NS" --registry "$registry_uri" \
  --faults "$DEMO/faults.json" --prometheus-url "$CONVEYOR_PROMETHEUS_URL" --report "$report" --logs "$DEMO/logs" \
  --pod-settings "$pod_settings" || fail "the story stopped (the line above names the step)"

step "kubectl get ml"
kubectl get -n "$NS" ml
if command -v chromium >/dev/null; then
  # What the report looks like, as a browser draws it (hack/install-deps.sh installs Debian's chromium).
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 --window-size=1340,1900 \
    --screenshot="$DEMO/report.png" "file://$report" >/dev/null 2>&1 && echo "screenshot: $DEMO/report.png"
fi
printf '\nreport: %s\n' "$report"
printf 'The control plane and Prometheus keep running (make cluster-down, hack/prometheus.sh down stop them); the operator and executor stop now.\n'
