#!/usr/bin/env bash
# Builds a pinned command-line tool from the Go module in hack/tools/<tool>/ (its go.mod names the
# tool with a `tool` directive and pins every dependency; go.sum is committed) and caches the binary
# outside the clone, at ${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/<tool>-<version>/<tool>, so a fresh
# clone and CI reuse it. It builds only when that binary is missing.
#
# Usage: hack/build-tool.sh <tool>          build if needed; print the binary's path on stdout
#        hack/build-tool.sh --path <tool>   print the path only; exit 1 if it is not built yet
# Tools: helm (helm.sh/helm/v3), kubectl (k8s.io/kubernetes/cmd/kubectl at the k8s.io/kubectl release),
#        versitygw (github.com/versity/versitygw: the local stack's S3 server, run by hack/s3.sh)
#        and the placement tier's (hack/placement.sh): kube-scheduler (k8s.io/kubernetes, the module and
#        version of the apiserver: hack/tools/kube), kwok (sigs.k8s.io/kwok), kuberay
#        (github.com/ray-project/kuberay/ray-operator), kueue (sigs.k8s.io/kueue), kserve (github.com/kserve/kserve
#        cmd/manager: built inside a copy of its own module, see hack/tools/kserve/go.mod)
set -euo pipefail

usage() {
    echo "usage: $0 [--path] helm|kubectl|versitygw|kube-scheduler|kwok|kuberay|kueue|kserve" >&2
    exit 2
}

path_only=false
if [[ "${1:-}" == "--path" ]]; then
    path_only=true
    shift
fi
[[ $# -eq 1 ]] || usage
tool="$1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
module_dir="${repo_root}/hack/tools/${tool}"
# The scheduler comes from the same pinned module as the control plane it schedules for.
[[ "${tool}" == kube-scheduler ]] && module_dir="${repo_root}/hack/tools/kube"
[[ -f "${module_dir}/go.mod" ]] || { echo "build-tool: no Go module for '${tool}' at ${module_dir}" >&2; usage; }

# The module version of a dependency as pinned by the wrapper's go.mod (no network: go.mod is tidy).
module_version() {
    (cd "${module_dir}" && GOFLAGS=-mod=mod go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1")
}

case "${tool}" in
    helm)
        package=helm.sh/helm/v3/cmd/helm
        version="$(module_version helm.sh/helm/v3)"
        # Helm renders and lints against the Kubernetes release of its client-go (v0.N -> 1.N), like
        # its own Makefile; unset, it would claim Kubernetes 1.20 and fail charts needing newer.
        k8s_minor="$(module_version k8s.io/client-go | cut -d. -f2)"
        ldflags="-s -w \
            -X helm.sh/helm/v3/internal/version.version=${version} \
            -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
            -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
            -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${k8s_minor} \
            -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
            -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${k8s_minor}"
        ;;
    kubectl | kube-scheduler)
        package=k8s.io/kubernetes/cmd/${tool}
        version="$(module_version k8s.io/kubernetes)"
        major="$(echo "${version#v}" | cut -d. -f1)"
        minor="$(echo "${version#v}" | cut -d. -f2)"
        ldflags="-s -w"
        for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ldflags+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=${major}"
            ldflags+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
            ldflags+=" -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
        done
        ;;
    versitygw)
        package=github.com/versity/versitygw/cmd/versitygw
        version="$(module_version github.com/versity/versitygw)"
        ldflags="-s -w -X main.Version=${version}"
        ;;
    kwok)
        package=sigs.k8s.io/kwok/cmd/kwok
        version="$(module_version sigs.k8s.io/kwok)"
        ldflags="-s -w"
        ;;
    kuberay)
        package=github.com/ray-project/kuberay/ray-operator
        version="$(module_version github.com/ray-project/kuberay/ray-operator)"
        ldflags="-s -w"
        ;;
    kueue)
        package=sigs.k8s.io/kueue/cmd/kueue
        version="$(module_version sigs.k8s.io/kueue)"
        ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=${version}"
        ;;
    kserve)
        # Its own module is the main one (its replaces apply): the version pinned, downloaded, copied.
        version="$(awk '$1 == "github.com/kserve/kserve" {print $2}' "${module_dir}/go.mod")"
        package=./cmd/manager
        ldflags="-s -w"
        build_in_copy="github.com/kserve/kserve@${version}"
        ;;
    *)
        echo "build-tool: unknown tool '${tool}'" >&2
        usage
        ;;
esac

cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/${tool}-${version}"
binary="${cache_dir}/${tool}"

if [[ -x "${binary}" ]]; then
    echo "${binary}"
    exit 0
fi
if ${path_only}; then
    echo "${binary}"
    exit 1
fi

mkdir -p "${cache_dir}"
# One build at a time per tool and version (parallel test sessions may ask together).
exec 9>"${cache_dir}/.lock"
flock 9
if [[ ! -x "${binary}" ]]; then
    echo "build-tool: building ${tool} ${version} (${package}) into ${cache_dir}; the first build takes minutes" >&2
    tmp="$(mktemp "${cache_dir}/.${tool}.XXXXXX")"
    trap 'rm -f "${tmp}"' EXIT
    if [[ -n "${build_in_copy:-}" ]]; then
        src="$(cd / && go mod download -json "${build_in_copy}" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
        [[ -d "${src}" ]] || { echo "build-tool: could not download ${build_in_copy}" >&2; exit 1; }
        work="$(mktemp -d "${cache_dir}/.src.XXXXXX")"
        trap 'rm -f "${tmp}"; rm -rf "${work}"' EXIT
        cp -r "${src}/." "${work}"
        chmod -R u+w "${work}"
        (cd "${work}" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "${ldflags}" -o "${tmp}" "${package}")
        rm -rf "${work}"
    else
        (cd "${module_dir}" && GOFLAGS=-mod=readonly \
            go build -trimpath -ldflags "${ldflags}" -o "${tmp}" "${package}")
    fi
    chmod 0755 "${tmp}"
    mv -f "${tmp}" "${binary}"
    trap - EXIT
    echo "build-tool: built ${binary}" >&2
fi
echo "${binary}"
