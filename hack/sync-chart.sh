#!/usr/bin/env bash
# Keeps the copies that exist for Helm and kustomize in step with their one source:
#   crds/*.yaml                  -> charts/conveyor/crds/   (Helm installs CRDs from the chart's crds/;
#                                   its kustomization.yaml lets manifests/base include them)
#   charts/conveyor (rendered)   -> manifests/base/operator.yaml   (the kustomize base)
# Usage: hack/sync-chart.sh            rewrite the copies
#        hack/sync-chart.sh --check    change nothing; exit 1 naming each copy that drifted
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="${ROOT}/charts/conveyor"
BASE_OPERATOR="${ROOT}/manifests/base/operator.yaml"
check=false
[[ "${1:-}" == "--check" ]] && check=true

helm="$("${ROOT}/hack/build-tool.sh" helm)"

staged="$(mktemp -d)"
trap 'rm -rf "${staged}"' EXIT
mkdir "${staged}/crds"
cp "${ROOT}"/crds/*.yaml "${staged}/crds/"
{
    echo "# Lets manifests/base take the CRDs from here (kustomize loads a directory only through its"
    echo "# kustomization). Helm skips this file (.helmignore). Written by hack/sync-chart.sh, like the"
    echo "# CRD files beside it, which are copies of the repository's crds/."
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    for src in "${ROOT}"/crds/*.yaml; do
        echo "  - $(basename "${src}")"
    done
} >"${staged}/crds/kustomization.yaml"
{
    echo "# Rendered from charts/conveyor by hack/sync-chart.sh with the chart's default values; do not edit."
    "${helm}" template conveyor "${CHART}" --namespace conveyor-system --skip-crds
} >"${staged}/operator.yaml"

if ${check}; then
    drift=0
    if ! diff -r "${staged}/crds" "${CHART}/crds" >/dev/null; then
        echo "drift: charts/conveyor/crds/ is not a copy of crds/:" >&2
        diff -rq "${staged}/crds" "${CHART}/crds" | sed "s|${staged}/||; s|${ROOT}/||g" >&2 || true
        drift=1
    fi
    if ! cmp -s "${staged}/operator.yaml" "${BASE_OPERATOR}"; then
        echo "drift: manifests/base/operator.yaml is not the chart's current rendering" >&2
        drift=1
    fi
    if [[ ${drift} -ne 0 ]]; then
        echo "run hack/sync-chart.sh (make chart-crds) and commit the result" >&2
    fi
    exit "${drift}"
fi

rm -f "${CHART}"/crds/*.yaml
cp "${staged}"/crds/*.yaml "${CHART}/crds/"
cp "${staged}/operator.yaml" "${BASE_OPERATOR}"
echo "synced charts/conveyor/crds/ and manifests/base/operator.yaml" >&2
