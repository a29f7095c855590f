#!/usr/bin/env bash
# The placement tier's stack: where the pods the operator asks for would really land. On a control plane
# of its own (hack/local-cluster.sh with CONVEYOR_CLUSTER_DIR under this stack's state, never the shared
# one), as local processes built from pinned Go modules (hack/build-tool.sh):
#   - the real kube-scheduler (k8s.io/kubernetes, the apiserver's module and version);
#   - kwok, playing two node pools and their kubelets' pod status: a CPU pool and a GPU pool whose nodes
#     carry `nvidia.com/gpu` capacity, the pool's labels and a `nvidia.com/gpu:NoSchedule` taint;
#   - the real KubeRay operator (ray-operator, the release whose CRDs the control plane installs);
#   - kube-controller-manager's job, deployment, replicaset, horizontal-pod-autoscaler and node-lifecycle
#     controllers (the HPA controller holds KServe's Standard-mode predictors at their minReplicas: no
#     metrics server runs, so it never scales on load);
#   - Kueue (sigs.k8s.io/kueue's manager, its CRDs, the RayJob integration only), its admission webhooks
#     served on 127.0.0.1 with a self-signed certificate ($STATE/webhooks; also its metrics server's:
#     Kueue reads that one from the fixed path /etc/kueue/metrics/certs when it does not manage its own
#     certificates); no visibility API server, no leader election, no CRD conversion webhooks (the tier
#     uses Kueue's storage version only);
#   - the real KServe controller (github.com/kserve/kserve cmd/manager, the release whose CRDs the control
#     plane installs) with the KServe CRDs it watches, its own `inferenceservice-config` ConfigMap (from
#     its module, with `enableGatewayApi` on) in namespace kserve, and its InferenceService defaulting and
#     validating webhooks served on 127.0.0.1 with the same self-signed certificate (controller-runtime reads it from
#     $TMPDIR/k8s-webhook-server/serving-certs); not its pod mutator (the storage initializer it injects
#     would never run under kwok). CRDs only, no controllers, for what it writes to: the Gateway API's
#     (sigs.k8s.io/gateway-api: its HTTPRoutes) and Knative Serving's (knative.dev/serving: its Services,
#     with Knative's own config-autoscaler ConfigMap, which KServe reads in Knative mode), at the versions
#     hack/tools/kserve/go.mod pins. Nothing plays a gateway or Knative: a test that needs their status
#     writes it and says so.
# Pods never run: kwok marks them Running (and a Job's Succeeded). Training stays in the devstack executor.
#
#   hack/placement.sh build    build (once) and cache the binaries
#   hack/placement.sh up       start everything (or reuse a running one); print the kubeconfig path
#   hack/placement.sh down     stop what `up` started, and the control plane under it
#   hack/placement.sh status   what runs and whether it is healthy
#   hack/placement.sh env      shell exports (KUBECONFIG, PATH with the pinned kubectl)
#
# Environment: CONVEYOR_PLACEMENT_DIR (state and logs; default $XDG_CACHE_HOME/conveyor/placement).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/lib/reap.sh
source "$ROOT/hack/lib/reap.sh"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/conveyor
STATE=${CONVEYOR_PLACEMENT_DIR:-$CACHE/placement}
export CONVEYOR_CLUSTER_DIR=$STATE/cluster
KUBECONFIG_PATH=$CONVEYOR_CLUSTER_DIR/admin.kubeconfig
TOOLS=(kube-scheduler kwok kuberay kueue kserve)
COMPONENTS=(kube-scheduler kwok kuberay kube-controller-manager-jobs kueue kserve)
# The pools' shape: what the samples ask for (manifests/samples/mlpipeline-fraud-gpu.yaml selects L4s).
CPU_NODES=2
GPU_NODES=2
GPUS_PER_NODE=4
GPU_POOL_LABELS=(cloud.google.com/gke-accelerator=nvidia-l4 nvidia.com/gpu.present=true)

log() { printf '[placement] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

tool() { "$ROOT/hack/build-tool.sh" "$1"; }

module_dir() { # the pinned module's source in the Go module cache (downloaded if missing)
  (cd "$ROOT/hack/tools/$1" && go mod download -json "$2" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
}

cmd_build() {
  "$ROOT/hack/local-cluster.sh" build
  for t in "${TOOLS[@]}"; do tool "$t" >/dev/null; done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_of() { if [[ -f $STATE/pids/$1 ]]; then cat "$STATE/pids/$1"; fi; }

running() {
  local pid; pid=$(pid_of "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

start() { # name, command...
  local name=$1; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name"
}

wait_for() { # description, timeout seconds, command...
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out after ${timeout}s waiting for $what"; return 1; }
    sleep 0.5
  done
}

kubectl() { "$("$ROOT/hack/local-cluster.sh" bin-dir)/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# kwok's own stage definitions, from its pinned module: nodes become Ready, pods on them Running, a
# Job's pods Succeeded, deleted pods go.
kwok_config() {
  local dir; dir=$(module_dir kwok sigs.k8s.io/kwok)/kustomize/stage
  [[ -d $dir ]] || die "kwok's module source is missing from the Go module cache"
  local f
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"; cat "$dir/$f"
  done
}

node() { # name, pool, gpus, labels...
  local name=$1 pool=$2 gpus=$3 l; shift 3
  local labels="" taints="[]" resources='{cpu: "32", memory: 128Gi, pods: "110"}'
  for l in "$@"; do labels+=", ${l%%=*}: \"${l#*=}\""; done
  if ((gpus)); then
    taints='[{key: nvidia.com/gpu, value: present, effect: NoSchedule}]'
    resources="{cpu: \"32\", memory: 128Gi, pods: \"110\", nvidia.com/gpu: \"$gpus\"}"
  fi
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {kubernetes.io/hostname: $name, kubernetes.io/os: linux, type: kwok, conveyor.dev/pool: $pool$labels}
spec: {taints: $taints}
status: {allocatable: $resources, capacity: $resources}
EOF
}

nodes() {
  local i
  for ((i = 0; i < CPU_NODES; i++)); do node "cpu-$i" cpu 0; done
  for ((i = 0; i < GPU_NODES; i++)); do node "gpu-$i" gpu "$GPUS_PER_NODE" "${GPU_POOL_LABELS[@]}"; done
}

# One self-signed serving certificate for the webhooks the apiserver calls on 127.0.0.1.
webhook_cert() {
  local dir=$STATE/webhooks
  [[ -s $dir/tls.crt && -s $dir/tls.key ]] && return 0
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=conveyor-placement-webhooks" \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -addext "basicConstraints=critical,CA:TRUE" \
    -keyout "$dir/tls.key.tmp" -out "$dir/tls.crt.tmp" 2>/dev/null
  mv "$dir/tls.key.tmp" "$dir/tls.key"
  mv "$dir/tls.crt.tmp" "$dir/tls.crt"
}

# Kueue's own admission webhooks and its RayJob ones (the tier's only integration), from its module's
# manifests, pointed at the local process: a url instead of a service, our certificate as caBundle.
kueue_webhooks() { # port
  python3 - "$(module_dir kueue sigs.k8s.io/kueue)/config/components/webhook/manifests.yaml" "$1" \
    "$(base64 -w0 <"$STATE/webhooks/tls.crt")" <<'PY'
import sys, yaml
manifests, port, ca = sys.argv[1], sys.argv[2], sys.argv[3]
out = []
for doc in yaml.safe_load_all(open(manifests)):
    if not doc:
        continue
    kind = doc["kind"].removesuffix("WebhookConfiguration").lower()
    doc["metadata"] = {"name": f"kueue-{kind}-webhook-configuration"}
    keep = []
    for hook in doc["webhooks"]:
        rules = hook.get("rules") or []
        if not any("kueue.x-k8s.io" in r["apiGroups"] or "rayjobs" in r["resources"] for r in rules):
            continue
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
        keep.append(hook)
    doc["webhooks"] = keep
    out.append(doc)
print(yaml.safe_dump_all(out))
PY
}

kueue_config() {
  cat <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health: {healthProbeBindAddress: "127.0.0.1:$(cat "$STATE/ports/kueue-health")"}
metrics: {bindAddress: "127.0.0.1:$(cat "$STATE/ports/kueue-metrics")"}
webhook: {host: 127.0.0.1, port: $(cat "$STATE/ports/kueue-webhook"), certDir: "$STATE/webhooks"}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: false}
manageJobsWithoutQueueName: false
integrations: {frameworks: [ray.io/rayjob]}
EOF
}

# Kueue reads its metrics server's certificate from this fixed path when it does not manage its own.
KUEUE_METRICS_CERTS=/etc/kueue/metrics/certs
kueue_metrics_cert() {
  [[ -s $KUEUE_METRICS_CERTS/tls.crt && -s $KUEUE_METRICS_CERTS/tls.key ]] && return 0
  mkdir -p "$KUEUE_METRICS_CERTS" 2>/dev/null && [[ -w $KUEUE_METRICS_CERTS ]] \
    || die "Kueue reads its metrics certificate from $KUEUE_METRICS_CERTS: make that folder writable"
  (
    flock 9
    if [[ ! -s $KUEUE_METRICS_CERTS/tls.crt ]]; then
      cp "$STATE/webhooks/tls.key" "$KUEUE_METRICS_CERTS/tls.key"
      cp "$STATE/webhooks/tls.crt" "$KUEUE_METRICS_CERTS/tls.crt"
    fi
  ) 9>"$KUEUE_METRICS_CERTS/.lock"
}

start_kueue() {
  local dir; dir=$(module_dir kueue sigs.k8s.io/kueue)/config/components/crd/bases
  kubectl apply --server-side --force-conflicts --field-manager=conveyor-placement -f "$dir" >/dev/null
  wait_for "Kueue's CRDs Established" 60 kubectl wait --for condition=Established --timeout=5s -f "$dir"
  kubectl create namespace kueue-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  webhook_cert
  kueue_metrics_cert
  if ! running kueue; then
    local p
    for p in kueue-health kueue-metrics kueue-webhook; do free_port >"$STATE/ports/$p"; done
    kueue_config >"$STATE/kueue.yaml"
    KUBECONFIG=$KUBECONFIG_PATH start kueue "$(tool kueue)" --config "$STATE/kueue.yaml" \
      --feature-gates VisibilityOnDemand=false --zap-log-level info
  fi
  wait_for "Kueue /readyz" 90 curl -sf "http://127.0.0.1:$(cat "$STATE/ports/kueue-health")/readyz" \
    || { tail -20 "$STATE/logs/kueue.log" >&2; exit 1; }
  kueue_webhooks "$(cat "$STATE/ports/kueue-webhook")" | kubectl apply --server-side --force-conflicts \
    --field-manager=conveyor-placement -f - >/dev/null
}

# A module KServe's build pins (hack/tools/kserve/go.mod), downloaded at that version outside any module
# (that go.mod only pins versions and has no go.sum to update).
kserve_module_dir() {
  local version; version=$(awk -v m="$1" '$1 == m {print $2}' "$ROOT/hack/tools/kserve/go.mod")
  [[ -n $version ]] || die "hack/tools/kserve/go.mod does not pin $1"
  (cd / && go mod download -json "$1@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
}

# KServe's own inferenceservice-config, from its module, with the Gateway API ingress on.
kserve_config() { # KServe's module directory
  python3 - "$1/config/configmap/inferenceservice.yaml" <<'PY'
import json, sys, yaml
cm = yaml.safe_load(open(sys.argv[1]))
ingress = json.loads(cm["data"]["ingress"])
ingress["enableGatewayApi"] = True
cm["data"]["ingress"] = json.dumps(ingress, indent=2)
cm["metadata"] = {"name": cm["metadata"]["name"], "namespace": "kserve"}
print(yaml.safe_dump(cm))
PY
}

# KServe's InferenceService defaulting and validating webhooks from its module's manifests, pointed at the
# local process (a url instead of its service, our certificate as caBundle).
kserve_webhooks() { # KServe's module directory, port
  python3 - "$1/config/webhook/manifests.yaml" "$2" "$(base64 -w0 <"$STATE/webhooks/tls.crt")" <<'PY'
import sys, yaml
manifests, port, ca = sys.argv[1], sys.argv[2], sys.argv[3]
out = []
for doc in yaml.safe_load_all(open(manifests)):
    if not doc:
        continue
    keep = []
    for hook in doc["webhooks"]:
        if not any("inferenceservices" in r["resources"] for r in hook.get("rules") or []):
            continue
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
        keep.append(hook)
    if keep:
        doc["webhooks"] = keep
        doc["metadata"] = {"name": doc["metadata"]["name"]}
        out.append(doc)
print(yaml.safe_dump_all(out))
PY
}

# KServe's part of `up` in two halves, so that it starts while Kueue does: its CRDs, the Gateway API's
# and Knative Serving's (one apply, one wait), its namespace and ConfigMaps, then the process...
launch_kserve() {
  local kserve gw kn
  kserve=$(kserve_module_dir github.com/kserve/kserve)
  gw=$(kserve_module_dir sigs.k8s.io/gateway-api)/config/crd/standard
  kn=$(kserve_module_dir knative.dev/serving)/config/core
  [[ -d $kserve && -d $gw && -d $kn ]] || die "KServe's, the Gateway API's or Knative Serving's module is missing"
  # Only the kinds KServe's manager watches or writes here (the CRDs are large and the apiserver is slow
  # to take them): InferenceServices come with the control plane (hack/local-cluster.sh, the same file);
  # no ClusterServingRuntimes (KServe skips them when absent); of the Gateway API only HTTPRoutes; of
  # Knative Serving only Services.
  local crds=("$kserve"/config/crd/full/serving.kserve.io_{trainedmodels,servingruntimes,inferencegraphs}.yaml
    "$kserve"/config/crd/full/clusterstoragecontainer/serving.kserve.io_clusterstoragecontainers.yaml
    "$gw"/gateway.networking.k8s.io_httproutes.yaml "$kn"/300-resources/service.yaml)
  kubectl apply --server-side --force-conflicts --field-manager=conveyor-placement "${crds[@]/#/--filename=}" >/dev/null
  wait_for "KServe's, the Gateway API's and Knative Serving's CRDs Established" 60 \
    kubectl wait --for condition=Established --timeout=5s "${crds[@]/#/--filename=}"
  {
    printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n---\n' kserve knative-serving
    cat "$kn/configmaps/autoscaler.yaml"
    printf '\n---\n'
    kserve_config "$kserve"
  } | kubectl apply --server-side --force-conflicts --field-manager=conveyor-placement -f - >/dev/null
  webhook_cert
  local tmp=$STATE/kserve-tmp
  mkdir -p "$tmp/k8s-webhook-server/serving-certs"
  cp "$STATE/webhooks/tls.crt" "$STATE/webhooks/tls.key" "$tmp/k8s-webhook-server/serving-certs/"
  if ! running kserve; then
    local p
    for p in kserve-health kserve-metrics kserve-webhook; do free_port >"$STATE/ports/$p"; done
    KUBECONFIG=$KUBECONFIG_PATH POD_NAMESPACE=kserve TMPDIR=$tmp start kserve "$(tool kserve)" \
      --metrics-addr "127.0.0.1:$(cat "$STATE/ports/kserve-metrics")" \
      --health-probe-addr "127.0.0.1:$(cat "$STATE/ports/kserve-health")" \
      --webhook-port "$(cat "$STATE/ports/kserve-webhook")" --leader-elect=false
  fi
}

# ... and, once it is ready, its admission webhooks.
kserve_ready() {
  wait_for "KServe /readyz" 90 curl -sf "http://127.0.0.1:$(cat "$STATE/ports/kserve-health")/readyz" \
    || { tail -20 "$STATE/logs/kserve.log" >&2; exit 1; }
  kserve_webhooks "$(kserve_module_dir github.com/kserve/kserve)" "$(cat "$STATE/ports/kserve-webhook")" \
    | kubectl apply --server-side --force-conflicts --field-manager=conveyor-placement -f - >/dev/null
}

cmd_up() {
  cmd_build
  mkdir -p "$STATE"/{pids,logs,ports}
  "$ROOT/hack/local-cluster.sh" up >/dev/null
  local ray; ray=$(module_dir kuberay github.com/ray-project/kuberay/ray-operator)
  # Every KubeRay CRD: its operator watches all its kinds and stops if one is missing.
  kubectl apply --server-side --force-conflicts --field-manager=conveyor-placement -f "$ray/config/crd/bases" >/dev/null

  if ! running kwok; then
    kwok_config >"$STATE/kwok.yaml"
    free_port >"$STATE/ports/kwok"
    start kwok "$(tool kwok)" --kubeconfig "$KUBECONFIG_PATH" --config "$STATE/kwok.yaml" \
      --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
      --cidr 10.1.0.0/16 --node-ip 127.0.0.1 --server-address "127.0.0.1:$(cat "$STATE/ports/kwok")"
  fi
  nodes | kubectl apply -f - >/dev/null
  wait_for "the kwok nodes Ready" 60 kubectl wait --for condition=Ready --timeout=2s node -l type=kwok \
    || { tail -20 "$STATE/logs/kwok.log" >&2; exit 1; }

  local cluster=$CONVEYOR_CLUSTER_DIR
  if ! running kube-scheduler; then
    free_port >"$STATE/ports/kube-scheduler"
    start kube-scheduler "$(tool kube-scheduler)" --kubeconfig "$KUBECONFIG_PATH" \
      --authentication-kubeconfig "$KUBECONFIG_PATH" --authorization-kubeconfig "$KUBECONFIG_PATH" \
      --bind-address 127.0.0.1 --secure-port "$(cat "$STATE/ports/kube-scheduler")" --leader-elect=false --v 1
  fi
  if ! running kube-controller-manager-jobs; then
    # A second controller-manager (the one under it stays as local-cluster.sh made it): the job
    # controller (KubeRay's submitter is a Job), deployment and replicaset, the HPA controller (KServe's
    # Standard mode leaves a predictor's replica count to its HPA), and node lifecycle, which
    # lifts the not-ready taint the apiserver puts on new nodes once kwok reports them Ready.
    free_port >"$STATE/ports/kube-controller-manager-jobs"
    start kube-controller-manager-jobs "$("$ROOT/hack/local-cluster.sh" bin-dir)/kube-controller-manager" \
      --kubeconfig "$cluster/controller-manager.kubeconfig" \
      --authentication-kubeconfig "$cluster/controller-manager.kubeconfig" \
      --authorization-kubeconfig "$cluster/controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$(cat "$STATE/ports/kube-controller-manager-jobs")" --leader-elect=false \
      --controllers 'job-controller,deployment-controller,replicaset-controller,horizontal-pod-autoscaler-controller,node-lifecycle-controller' \
      --horizontal-pod-autoscaler-sync-period 2s \
      --use-service-account-credentials=true --v 1
  fi
  if ! running kuberay; then
    free_port >"$STATE/ports/kuberay-metrics"; free_port >"$STATE/ports/kuberay-health"
    KUBECONFIG=$KUBECONFIG_PATH start kuberay "$(tool kuberay)" --enable-leader-election=false \
      --metrics-addr "127.0.0.1:$(cat "$STATE/ports/kuberay-metrics")" \
      --health-probe-bind-address "127.0.0.1:$(cat "$STATE/ports/kuberay-health")" --log-stdout-encoder console
  fi
  launch_kserve
  start_kueue
  kserve_ready
  wait_for "kube-scheduler /healthz" 60 curl -skf "https://127.0.0.1:$(cat "$STATE/ports/kube-scheduler")/healthz" \
    || { tail -20 "$STATE/logs/kube-scheduler.log" >&2; exit 1; }
  wait_for "KubeRay /readyz" 60 curl -sf "http://127.0.0.1:$(cat "$STATE/ports/kuberay-health")/readyz" \
    || { tail -20 "$STATE/logs/kuberay.log" >&2; exit 1; }
  log "ready: ${CPU_NODES} CPU and ${GPU_NODES} GPU kwok nodes, kube-scheduler, KubeRay, Kueue, KServe; logs in $STATE/logs"
  echo "$KUBECONFIG_PATH"
}

cmd_down() {
  # All at once, 5 s together (one after the other, their graces added up to ~20 s), then SIGKILL.
  local c pid pids=()
  for c in "${COMPONENTS[@]}"; do
    if running "$c"; then
      pid=$(pid_of "$c")
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
      log "stopping $c (pid $pid)"
    fi
    rm -f "$STATE/pids/$c"
  done
  reap_pids "${pids[@]}"
  "$ROOT/hack/local-cluster.sh" down
}

cmd_status() {
  local rc=0 c
  for c in "${COMPONENTS[@]}"; do
    if running "$c"; then echo "$c: running (pid $(pid_of "$c"))"; else echo "$c: stopped"; rc=1; fi
  done
  "$ROOT/hack/local-cluster.sh" status || rc=1
  return $rc
}

case ${1:-} in
  build) cmd_build ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) "$ROOT/hack/local-cluster.sh" env ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  *) echo "usage: $0 build|up|down|status|env|kubeconfig" >&2; exit 2 ;;
esac
