#!/usr/bin/env bash
# A kind cluster with everything conveyor needs, for machines with Docker:
# KubeRay (RayJobs), cert-manager + KServe in Standard (RawDeployment) mode (InferenceServices),
# optionally kube-prometheus-stack (canary analysis, the chart's ServiceMonitor, alerts, dashboard),
# and conveyor itself from charts/conveyor with the operator and runtime images built from this
# checkout and loaded into the cluster (no registry needed).
#
# Usage: hack/kind-up.sh [up] [--monitoring] [--no-build]
#        hack/kind-up.sh down
# Environment: CLUSTER_NAME (conveyor), KIND_NODE_IMAGE (kind's default), KUBERAY_VERSION,
# KSERVE_VERSION, CERT_MANAGER_VERSION, KUBE_PROMETHEUS_STACK_VERSION, IMAGE_TAG (dev).
# Needs docker and kind on PATH; helm and kubectl are taken from PATH or built by hack/build-tool.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-conveyor}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
# Pinned to the releases the local control plane's CRDs come from (hack/local-cluster.sh).
KUBERAY_VERSION="${KUBERAY_VERSION:-1.6.0}"
KSERVE_VERSION="${KSERVE_VERSION:-v0.20.0}"
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.17.0}"
KUBE_PROMETHEUS_STACK_VERSION="${KUBE_PROMETHEUS_STACK_VERSION:-75.15.1}"
IMAGE_TAG="${IMAGE_TAG:-dev}"
OPERATOR_IMAGE="conveyor-operator:${IMAGE_TAG}"
RUNTIME_IMAGE="conveyor-runtime:${IMAGE_TAG}"
NAMESPACE=conveyor-system

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'kind-up: %s\n' "$*" >&2; exit 1; }

tool() {
    # A tool from PATH, else the pinned build from hack/build-tool.sh.
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        "${ROOT}/hack/build-tool.sh" "$1"
    fi
}

cluster_exists() {
    kind get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"
}

down() {
    if cluster_exists; then
        log "deleting kind cluster ${CLUSTER_NAME}"
        kind delete cluster --name "${CLUSTER_NAME}"
    else
        log "no kind cluster named ${CLUSTER_NAME}"
    fi
}

up() {
    local monitoring=false build=true arg
    for arg in "$@"; do
        case "${arg}" in
            --monitoring) monitoring=true ;;
            --no-build) build=false ;;
            *) die "unknown option ${arg} (see the header of $0)" ;;
        esac
    done
    command -v docker >/dev/null 2>&1 || die "docker is not on PATH: kind needs Docker"
    command -v kind >/dev/null 2>&1 || die "kind is not on PATH (go install sigs.k8s.io/kind@latest, or your package manager)"
    docker info >/dev/null 2>&1 || die "docker does not answer: is the daemon running?"

    local helm kubectl
    helm="$(tool helm)"
    kubectl="$(tool kubectl)"

    if cluster_exists; then
        log "reusing kind cluster ${CLUSTER_NAME}"
    else
        log "creating kind cluster ${CLUSTER_NAME}"
        local args=(create cluster --name "${CLUSTER_NAME}" --wait 120s)
        if [[ -n "${KIND_NODE_IMAGE}" ]]; then
            args+=(--image "${KIND_NODE_IMAGE}")
        fi
        kind "${args[@]}"
    fi
    local context="kind-${CLUSTER_NAME}"
    local k=("${kubectl}" --context "${context}")
    local h=("${helm}" --kube-context "${context}")

    if ${build}; then
        log "building ${OPERATOR_IMAGE} and ${RUNTIME_IMAGE}"
        docker build -f "${ROOT}/docker/operator.Dockerfile" -t "${OPERATOR_IMAGE}" "${ROOT}"
        docker build -f "${ROOT}/docker/runtime.Dockerfile" -t "${RUNTIME_IMAGE}" "${ROOT}"
    fi
    log "loading the images into the kind nodes"
    kind load docker-image --name "${CLUSTER_NAME}" "${OPERATOR_IMAGE}" "${RUNTIME_IMAGE}"

    log "installing cert-manager ${CERT_MANAGER_VERSION} (KServe's webhooks need it)"
    "${h[@]}" repo add jetstack https://charts.jetstack.io --force-update >/dev/null
    "${h[@]}" upgrade --install cert-manager jetstack/cert-manager \
        --namespace cert-manager --create-namespace \
        --version "${CERT_MANAGER_VERSION}" --set crds.enabled=true --wait

    log "installing KubeRay ${KUBERAY_VERSION}"
    "${h[@]}" repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
    "${h[@]}" upgrade --install kuberay-operator kuberay/kuberay-operator \
        --namespace kuberay-system --create-namespace \
        --version "${KUBERAY_VERSION}" --wait

    log "installing KServe ${KSERVE_VERSION} in Standard (RawDeployment) mode"
    "${h[@]}" upgrade --install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd \
        --namespace kserve --create-namespace --version "${KSERVE_VERSION}" --wait
    "${h[@]}" upgrade --install kserve-resources oci://ghcr.io/kserve/charts/kserve-resources \
        --namespace kserve --version "${KSERVE_VERSION}" \
        --set kserve.controller.deploymentMode=Standard --wait

    local monitoring_values=()
    if ${monitoring}; then
        log "installing kube-prometheus-stack ${KUBE_PROMETHEUS_STACK_VERSION}"
        "${h[@]}" repo add prometheus-community https://prometheus-community.github.io/helm-charts \
            --force-update >/dev/null
        # Select ServiceMonitors and rules from every release, not only the stack's own.
        "${h[@]}" upgrade --install monitoring prometheus-community/kube-prometheus-stack \
            --namespace monitoring --create-namespace --version "${KUBE_PROMETHEUS_STACK_VERSION}" \
            --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
            --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false --wait
        monitoring_values=(--set serviceMonitor.enabled=true --set prometheusRule.enabled=true
            --set grafanaDashboard.enabled=true
            --set operator.prometheusUrl=http://monitoring-kube-prometheus-prometheus.monitoring.svc:9090)
    fi

    log "installing conveyor from charts/conveyor"
    "${h[@]}" upgrade --install conveyor "${ROOT}/charts/conveyor" \
        --namespace "${NAMESPACE}" --create-namespace \
        --set image.repository=conveyor-operator --set image.tag="${IMAGE_TAG}" \
        --set image.pullPolicy=Never --set operator.defaultKServeMode=Standard \
        "${monitoring_values[@]}" --wait --timeout 5m
    "${k[@]}" -n "${NAMESPACE}" rollout status deployment/conveyor-operator --timeout 180s

    log "ready: kubectl --context ${context} get ml -A"
    cat >&2 <<MSG
The runtime image is ${RUNTIME_IMAGE}: set spec.training.image and spec.predictor.image to it in
your MLPipeline and ModelDeployment (the samples in manifests/samples/ use the published image).
Remove everything with: $0 down
MSG
}

case "${1:-up}" in
    up)
        [[ $# -gt 0 ]] && shift
        up "$@"
        ;;
    --*) up "$@" ;;
    down) down ;;
    *) die "usage: $0 [up [--monitoring] [--no-build] | down]" ;;
esac
