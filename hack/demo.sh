#!/usr/bin/env bash
# The demo on the local control plane. Today it brings up the real kube-apiserver, installs the CRDs
# (ours, KubeRay's, KServe's), applies the samples and shows them with `kubectl get ml`. The full loop
# (train, gate, deploy, canary, promote through the local executor) is the subject of a later issue.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAMESPACE=${DEMO_NAMESPACE:-conveyor-demo}

kubeconfig=$("$ROOT/hack/local-cluster.sh" up)
eval "$("$ROOT/hack/local-cluster.sh" env)"
export KUBECONFIG=$kubeconfig

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "control plane"
kubectl version
step "CRDs"
kubectl get crd
step "apply the samples into namespace $NAMESPACE"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply --server-side -n "$NAMESPACE" -f "$ROOT/manifests/samples/"
step "kubectl get ml -n $NAMESPACE"
kubectl get ml -n "$NAMESPACE" -o wide
step "an invalid object is rejected naming the field"
if kubectl apply --server-side -n "$NAMESPACE" -f - <<'YAML' 2>&1; then echo "unexpectedly accepted" >&2; exit 1; fi
apiVersion: conveyor.dev/v1alpha1
kind: ModelDeployment
metadata: {name: broken}
spec:
  model: {registryUri: "file:///var/lib/conveyor/registry", name: digits}
  autoscaling: {minReplicas: 5, maxReplicas: 2}
  rollout: {steps: [50, 10]}
YAML
# shellcheck disable=SC2016 # a command for the user to paste
printf '\nThe control plane keeps running: eval "$(hack/local-cluster.sh env)"; kubectl get ml -A\n'
printf 'Stop it with: make cluster-down\n'
