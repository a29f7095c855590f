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
#   4. a spec change starts run 2; its version, if it passes the gate, arrives as a canary at the first
#      step's weight. (Stepping, analysis, promotion and rollback come with a later issue.)
# REGISTRY=file (default) keeps the model registry in a folder; REGISTRY=s3 in the local S3 server
# (hack/s3.sh: versitygw), with the credentials delivered as on a cluster: the operator gets them in
# its environment (the chart's registry.credentialsSecret), training and serving from a Secret named in
# the pods' envFrom, which the executor resolves from the apiserver (its own environment has none).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NS=${DEMO_NAMESPACE:-conveyor-demo}
DEMO=${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/demo
PY=$ROOT/.venv/bin/python
TIMEOUT=${DEMO_TIMEOUT:-900s}
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

step "start the operator and the local executor (logs in $DEMO/logs); Prometheus at $CONVEYOR_PROMETHEUS_URL"
metrics_port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$DEMO" && exec "$PY" -m conveyor.operator --namespace "$NS" --metrics-port "$metrics_port" --liveness-port 0 \
  --prometheus-url "$CONVEYOR_PROMETHEUS_URL") >"$DEMO/logs/operator.log" 2>&1 &
operator_pid=$!
# The local Prometheus scrapes the operator too (file_sd, as for the predictors the executor lists).
printf '[{"targets": ["127.0.0.1:%s"], "labels": {"component": "operator"}}]\n' "$metrics_port" \
  >"$CONVEYOR_PROMETHEUS_TARGETS/operator-$NS.json"
(cd "$DEMO" && exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_ENDPOINT_URL "$PY" -m conveyor_devstack.executor --kubeconfig "$kubeconfig" --namespace "$NS" \
  --state-dir "$DEMO/executor" --prometheus-targets "$CONVEYOR_PROMETHEUS_TARGETS") >"$DEMO/logs/executor.log" 2>&1 &
executor_pid=$!
trap 'kill $operator_pid $executor_pid 2>/dev/null || true; wait 2>/dev/null || true; rm -f "$CONVEYOR_PROMETHEUS_TARGETS/operator-$NS.json"' EXIT

step "apply the MLPipeline and the ModelDeployment (hack/demo/fraud.yaml)"
# With REGISTRY=s3, the pipeline's and the deployment's pods name the credentials Secret (pod settings).
sed "s#REGISTRY#$registry_uri#g" "$ROOT/hack/demo/fraud.yaml" | "$PY" -c '
import json, sys, yaml
pod = json.loads(sys.argv[1])
docs = list(yaml.safe_load_all(sys.stdin))
for d in docs:
    if pod:
        (d["spec"]["training"] if d["kind"] == "MLPipeline" else d["spec"]["predictor"])["pod"] = pod
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))' "$pod_settings" \
  | kubectl apply --server-side -n "$NS" -f -

step "run 1: data validation, training on Ray, evaluation, registration"
kubectl wait -n "$NS" mlp/fraud --for=jsonpath='{.status.phase}'=Succeeded --timeout="$TIMEOUT" >/dev/null \
  || fail "the pipeline did not succeed"
kubectl get -n "$NS" mlp,rayjobs
# Read back through fsspec, whichever storage holds the registry.
"$PY" -c 'import fsspec, json, sys
fs, root = fsspec.core.url_to_fs(sys.argv[1] + "/fraud")
print(sys.argv[1] + "/fraud:", sorted(n for p in fs.ls(root, detail=False) if (n := p.rstrip("/").rsplit("/", 1)[-1]) != "fraud"))
m = json.loads(fs.cat_file(root + "/v1/metrics.json"))
print({k: round(v, 4) for k, v in m.items() if isinstance(v, float)})' "$registry_uri"

step "serving v1 through the InferenceService"
kubectl wait -n "$NS" mdep/fraud --for=condition=Ready --timeout="$TIMEOUT" >/dev/null || fail "the deployment is not Ready"
kubectl get -n "$NS" mdep,inferenceservices
url=$(kubectl get -n "$NS" mdep/fraud -o jsonpath='{.status.url}')
request='{"instances": [
  {"amount": 24.5, "merchant": "grocery", "hour": 14, "foreign": false, "card_age_days": 900, "distance_km": 2.1, "txn_last_hour": 0},
  {"amount": 2450.0, "merchant": "electronics", "hour": 3, "foreign": true, "card_age_days": 9, "distance_km": 840.0, "txn_last_hour": 4}]}'
echo "POST $url/v1/models/fraud:predict"
curl -sf -H 'content-type: application/json' -d "$request" "$url/v1/models/fraud:predict" | "$PY" -m json.tool \
  || fail "prediction failed"
echo "a bad request gets a 4xx naming the problem:"
curl -s -w '  (HTTP %{http_code})\n' -H 'content-type: application/json' \
  -d '{"instances": [{"amount": "lots", "merchant": "grocery", "hour": 14, "foreign": false, "card_age_days": 900, "distance_km": 2.1, "txn_last_hour": 0}]}' \
  "$url/v1/models/fraud:predict"

step "run 2: a spec change retrains; a version that passes the gate arrives as a canary"
kubectl patch -n "$NS" mlp/fraud --type merge -p '{"spec":{"training":{"hyperparameters":{"epochs":6}}}}'
kubectl wait -n "$NS" mlp/fraud --for=jsonpath='{.status.lastRun}'=2 --timeout=120s >/dev/null || fail "run 2 did not start"
kubectl wait -n "$NS" mlp/fraud --for=jsonpath='{.status.phase}'=Succeeded --timeout="$TIMEOUT" >/dev/null \
  || { kubectl get -n "$NS" mlp/fraud -o jsonpath='{.status.runs[-1]}'; echo; }
if kubectl wait -n "$NS" mdep/fraud --for=jsonpath='{.status.canaryVersion}'=v2 --timeout=120s >/dev/null; then
  kubectl wait -n "$NS" mdep/fraud --for=condition=Ready --timeout="$TIMEOUT" >/dev/null || fail "the canary did not become Ready"
else
  echo "(no canary: see the run's outcome above)"
fi
kubectl get -n "$NS" ml
echo "traffic:"
kubectl get -n "$NS" mdep/fraud -o jsonpath='{range .status.traffic[*]}  {.version}{"\t"}{.tag}{"\t"}{.percent}%{"\n"}{end}'

printf '\nThe control plane and Prometheus keep running (make cluster-down, hack/prometheus.sh down stop them); the operator and executor stop now.\n'
