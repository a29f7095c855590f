#!/usr/bin/env bash
# A real, local Kubernetes control plane for the tests and the demo: etcd, kube-apiserver and
# kube-controller-manager, built once from their Go modules at pinned versions (hack/tools/*/go.mod)
# and cached outside the clone. No kubelet: nothing schedules pods; the local executor plays KubeRay
# and KServe (see README).
#
#   hack/local-cluster.sh build    build (once) and cache the binaries, fetch the third-party CRDs
#   hack/local-cluster.sh up       start everything (or reuse a running one), install the CRDs,
#                                  print the admin kubeconfig path
#   hack/local-cluster.sh down     stop what `up` started, and nothing else
#   hack/local-cluster.sh restart  kill etcd and the apiserver (a crash: SIGKILL) and start them again on
#                                  the same ports with the same data (the chaos tests' outage)
#   hack/local-cluster.sh status   what runs, where, and whether it is healthy
#   hack/local-cluster.sh env      shell exports (KUBECONFIG, PATH with the pinned kubectl)
#
# Environment: CONVEYOR_CLUSTER_DIR (state: certs, etcd data, logs, kubeconfig; default
# $XDG_CACHE_HOME/conveyor/cluster), XDG_CACHE_HOME.
set -euo pipefail

KUBE_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KUBERAY_VERSION=v1.6.0 # v1.7.x is not served by this machine's Go module proxy (403); see README
KSERVE_VERSION=v0.20.0 # matches the kserve Python package pinned in pyproject.toml
GATEWAY_API_VERSION=v1.5.1 # what KServe v0.20.0's module requires (hack/tools/kserve/go.mod)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/lib/reap.sh
source "$ROOT/hack/lib/reap.sh"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/conveyor
KUBE_BIN=$CACHE/kubernetes-$KUBE_VERSION
ETCD_BIN=$CACHE/etcd-$ETCD_VERSION
CRD_CACHE=$CACHE/crds-kuberay-$KUBERAY_VERSION-kserve-$KSERVE_VERSION
STATE=${CONVEYOR_CLUSTER_DIR:-$CACHE/cluster}
KUBECONFIG_PATH=$STATE/admin.kubeconfig
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ build

build_kube() {
  if [[ -x $KUBE_BIN/kube-apiserver && -x $KUBE_BIN/kube-controller-manager && -x $KUBE_BIN/kubectl ]]; then
    return
  fi
  command -v go >/dev/null || die "Go is needed to build the control plane (https://go.dev/dl)"
  log "building kube-apiserver, kube-controller-manager, kubectl $KUBE_VERSION (first time: long on 2 cores)"
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local stamp="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
  stamp="$stamp ${stamp//k8s.io\/component-base\/version/k8s.io\/client-go\/pkg\/version}"
  local tmp; tmp=$(mktemp -d "$CACHE/.build-kube.XXXXXX")
  (cd "$ROOT/hack/tools/kube" && go build -mod=readonly -trimpath -ldflags "-s -w $stamp" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
  chmod 755 "$tmp"; rm -rf "$KUBE_BIN"; mv "$tmp" "$KUBE_BIN"
}

build_etcd() {
  [[ -x $ETCD_BIN/etcd ]] && return
  command -v go >/dev/null || die "Go is needed to build etcd (https://go.dev/dl)"
  log "building etcd $ETCD_VERSION"
  local tmp; tmp=$(mktemp -d "$CACHE/.build-etcd.XXXXXX")
  (cd "$ROOT/hack/tools/etcd" && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  chmod 755 "$tmp"; rm -rf "$ETCD_BIN"; mv "$tmp" "$ETCD_BIN"
}

# KubeRay, KServe and the Gateway API publish their CRDs inside their Go modules; take them from there at
# the pinned versions instead of copying them into this repository. Of the Gateway API only HTTPRoutes:
# the operator writes one per Standard-mode ModelDeployment, and the local router reads its weights.
fetch_crds() {
  # (a cache from before the Gateway API's CRD was fetched is fetched again)
  [[ -f $CRD_CACHE/.complete && -f $CRD_CACHE/gateway.networking.k8s.io_httproutes.yaml ]] && return
  log "fetching KubeRay $KUBERAY_VERSION, KServe $KSERVE_VERSION and Gateway API $GATEWAY_API_VERSION CRDs from their Go modules"
  local ray kserve gw tmp
  ray=$(go mod download -json "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  kserve=$(go mod download -json "github.com/kserve/kserve@$KSERVE_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  gw=$(go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [[ -d $ray && -d $kserve && -d $gw ]] || die "could not download the KubeRay/KServe/Gateway API modules"
  tmp=$(mktemp -d "$CACHE/.crds.XXXXXX")
  cp "$ray/config/crd/bases/ray.io_rayjobs.yaml" "$ray/config/crd/bases/ray.io_rayclusters.yaml" "$tmp/"
  cp "$kserve/config/crd/full/serving.kserve.io_inferenceservices.yaml" "$tmp/"
  cp "$gw/config/crd/standard/gateway.networking.k8s.io_httproutes.yaml" "$tmp/"
  chmod 755 "$tmp"; chmod 644 "$tmp"/*.yaml; touch "$tmp/.complete"
  rm -rf "$CRD_CACHE"; mv "$tmp" "$CRD_CACHE"
}

cmd_build() {
  mkdir -p "$CACHE"
  build_etcd
  build_kube
  fetch_crds
}

# ------------------------------------------------------------------ helpers

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_of() { if [[ -f $STATE/pids/$1 ]]; then cat "$STATE/pids/$1"; fi; }

# A pid file only counts while that pid still runs the binary we started (pids get reused).
running() {
  local pid; pid=$(pid_of "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && grep -q "$1" "/proc/$pid/cmdline" 2>/dev/null
}

wait_for() { # description, timeout seconds, command...
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out after ${timeout}s waiting for $what"; return 1; }
    sleep 0.3
  done
}

start() { # name, command...
  local name=$1; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/pids/$name"
}

apiserver_ready() { curl -sf -o /dev/null --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" "https://127.0.0.1:$(cat "$STATE/ports/apiserver")/readyz"; }

gen_certs() {
  local pki=$STATE/pki
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=conveyor-local-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  issue() { # name, subject, extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    printf '%s\n' "$3" >"$pki/$1.ext"
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 3650 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
  }
  issue apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  issue admin "/O=system:masters/CN=conveyor-admin" "extendedKeyUsage=clientAuth"
  issue controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

write_kubeconfig() { # path, user cert name, server
  local b64="base64 -w0"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: conveyor-local
  cluster:
    server: $3
    certificate-authority-data: $($b64 <"$STATE/pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $($b64 <"$STATE/pki/$2.crt")
    client-key-data: $($b64 <"$STATE/pki/$2.key")
contexts:
- name: conveyor-local
  context: {cluster: conveyor-local, user: $2, namespace: default}
current-context: conveyor-local
EOF
  chmod 600 "$1"
}

# ------------------------------------------------------------------ up / down / status

CRDS=(crd/rayjobs.ray.io crd/rayclusters.ray.io crd/inferenceservices.serving.kserve.io crd/httproutes.gateway.networking.k8s.io
  crd/mlpipelines.conveyor.dev crd/modeldeployments.conveyor.dev crd/batchpredictions.conveyor.dev)

crds_established() { # timeout: every CRD there and Established
  "$KUBE_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" wait --for condition=established --timeout="$1" "${CRDS[@]}" >/dev/null
}

# What is installed is recorded as a checksum of the files: a reused control plane whose CRDs are already
# these (and Established) skips the server-side apply of ~4.6 MB of CRDs, 20-30 s of apiserver CPU on two
# busy cores that every `up` of a running cluster (each test session's first step) used to pay.
install_crds() {
  local kubectl=$KUBE_BIN/kubectl sum
  sum=$(cat "$CRD_CACHE"/*.yaml "$ROOT"/crds/*.yaml | sha256sum | cut -d' ' -f1)
  if [[ -f $STATE/crds.sha256 && $(cat "$STATE/crds.sha256") == "$sum" ]] && crds_established 5s 2>/dev/null; then
    return
  fi
  # The KServe CRD is ~2 MB: only server-side apply handles it (no last-applied annotation).
  "$kubectl" --kubeconfig "$KUBECONFIG_PATH" apply --server-side --force-conflicts --field-manager=conveyor-local-cluster \
    -f "$CRD_CACHE" -f "$ROOT/crds" >/dev/null
  crds_established 60s
  echo "$sum" >"$STATE/crds.sha256"
}

start_etcd() { # on the ports recorded in $STATE/ports, with the data in $STATE/etcd
  local port peer
  port=$(cat "$STATE/ports/etcd"); peer=$(cat "$STATE/ports/etcd-peer")
  start etcd "$ETCD_BIN/etcd" --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "local=http://127.0.0.1:$peer" --unsafe-no-fsync --log-level warn
  wait_for "etcd" 30 curl -sf "http://127.0.0.1:$port/health" || { tail -20 "$STATE/logs/etcd.log" >&2; exit 1; }
}

start_apiserver() { # on the port recorded in $STATE/ports, against the recorded etcd
  local pki=$STATE/pki
  start kube-apiserver "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$(cat "$STATE/ports/etcd")" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$(cat "$STATE/ports/apiserver")" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local --api-audiences https://kubernetes.default.svc.cluster.local \
    --authorization-mode Node,RBAC --service-cluster-ip-range 10.0.0.0/24 --allow-privileged \
    --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/logs/audit.log" \
    --audit-log-maxsize 100 --audit-log-maxbackup 1 \
    --profiling=false --v 1
  wait_for "kube-apiserver /readyz" 120 apiserver_ready || { tail -30 "$STATE/logs/kube-apiserver.log" >&2; exit 1; }
}

stop_components() { # signal, names...: signal those that are ours and still run all at once, give them
  # 5 s together (one after the other, each one's grace added up), then SIGKILL what is left
  local sig=$1 c pid pids=() stopped=()
  shift
  for c in "$@"; do
    if running "$c"; then
      pid=$(pid_of "$c")
      kill "-$sig" "$pid" 2>/dev/null || true
      pids+=("$pid"); stopped+=("$c (pid $pid)")
    fi
  done
  ((${#pids[@]})) || return 0
  reap_pids "${pids[@]}"
  log "stopped ${stopped[*]}"
}

cmd_restart() {
  running kube-apiserver || die "nothing to restart: run '$0 up' first"
  stop_components KILL kube-apiserver
  stop_components KILL etcd
  start_etcd
  start_apiserver
  log "restarted etcd and kube-apiserver at https://127.0.0.1:$(cat "$STATE/ports/apiserver")"
}

cmd_up() {
  cmd_build
  if running kube-apiserver && apiserver_ready; then
    log "already running; reusing it"
  else
    for c in "${COMPONENTS[@]}"; do running "$c" && die "$c from an earlier up is still running but the apiserver is not healthy: run '$0 down' first (logs: $STATE/logs)"; done
    rm -rf "$STATE"
    mkdir -p "$STATE"/{pids,ports,logs,etcd}
    gen_certs
    local api_port kcm_port
    api_port=$(free_port); kcm_port=$(free_port)
    echo "$api_port" >"$STATE/ports/apiserver"; free_port >"$STATE/ports/etcd"; free_port >"$STATE/ports/etcd-peer"
    echo "$kcm_port" >"$STATE/ports/controller-manager"
    start_etcd

    # Audit log: every write at Metadata level, so benchmarks can count what a client really wrote.
    cat >"$STATE/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
EOF
    start_apiserver
    local server="https://127.0.0.1:$api_port" pki=$STATE/pki
    write_kubeconfig "$KUBECONFIG_PATH" admin "$server"
    write_kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager "$server"

    # Garbage collection (owner references) and namespace deletion, plus service-account tokens. Each
    # controller acts as its own service account with its bootstrap RBAC role, as in a real cluster.
    start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
      --kubeconfig "$STATE/controller-manager.kubeconfig" \
      --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
      --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
      --controllers 'garbagecollector,namespace,serviceaccount,serviceaccount-token,clusterrole-aggregation' \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --use-service-account-credentials=true --v 1
    wait_for "kube-controller-manager /healthz" 60 curl -skf "https://127.0.0.1:$kcm_port/healthz" \
      || { tail -30 "$STATE/logs/kube-controller-manager.log" >&2; exit 1; }
    wait_for "the default service account" 60 "$KUBE_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" get serviceaccount default -n default
  fi
  install_crds
  log "ready: kube-apiserver $KUBE_VERSION at https://127.0.0.1:$(cat "$STATE/ports/apiserver"), logs in $STATE/logs"
  log "use it:  eval \"\$($0 env)\"   (or export KUBECONFIG=$KUBECONFIG_PATH)"
  echo "$KUBECONFIG_PATH"
}

cmd_down() {
  local c any=0
  for c in "${COMPONENTS[@]}"; do if running "$c"; then any=1; fi; done
  ((any)) || log "nothing was running"
  # The apiserver and its controller-manager together, then etcd (the apiserver shuts down against it).
  stop_components TERM kube-controller-manager kube-apiserver
  stop_components TERM etcd
  # Keep the logs of the last run; drop its data and credentials.
  rm -rf "$STATE/etcd" "$STATE/pki" "$STATE/pids" "$STATE/ports" "$STATE"/*.kubeconfig
}

cmd_status() {
  local rc=0
  for c in "${COMPONENTS[@]}"; do
    if running "$c"; then echo "$c: running (pid $(pid_of "$c"))"; else echo "$c: stopped"; rc=1; fi
  done
  if running kube-apiserver; then
    if apiserver_ready; then echo "kube-apiserver: ready at https://127.0.0.1:$(cat "$STATE/ports/apiserver")"; else echo "kube-apiserver: NOT ready"; rc=1; fi
    echo "kubeconfig: $KUBECONFIG_PATH"
  fi
  echo "logs: $STATE/logs"
  return $rc
}

cmd_env() {
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
  echo "export PATH=$KUBE_BIN:\$PATH"
}

case ${1:-} in
  build) cmd_build ;;
  up) cmd_up ;;
  down) cmd_down ;;
  restart) cmd_restart ;;
  status) cmd_status ;;
  env) cmd_env ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  bin-dir) echo "$KUBE_BIN" ;;
  *) echo "usage: $0 build|up|down|status|env|kubeconfig|bin-dir" >&2; exit 2 ;;
esac
