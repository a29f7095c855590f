"""The weighted Gateway API HTTPRoute of a Standard-mode ModelDeployment, pure.

Why the operator writes a route at all: KServe v0.20.0 runs a Standard-mode canary (`spec.canary[]`) as
its own Deployment and Service (`<isvc>-<version>-predictor`), but the HTTPRoutes it writes with
`enableGatewayApi` (its ingress reconciler, `httproute_reconciler.go`) have one backend, the stable
predictor's Service, at every step: nothing splits the traffic. So in Standard mode the operator:

- labels the InferenceService `networking.kserve.io/visibility: cluster-local`, which makes KServe's
  HTTPRoute reconciler create no route at all (and report IngressReady=True); KServe still reports the
  external `status.url` from its domain template, the host callers use;
- writes its own HTTPRoute `<name>-traffic`, owned by the ModelDeployment, attached to the gateway KServe
  would have used (`--standard-gateway`, default KServe's `kserve/kserve-ingress-gateway`), for the host
  of that `status.url`, with KServe's rule (every path: KServe matches `^/.*$`, here the equivalent
  core `PathPrefix /`; its `KServe-Isvc-Name`/`-Namespace` request headers; its 60 s request timeout)
  and one weighted backendRef per version: the stable predictor's Service at 100-w, the canary's at w
  (A/B/N: every version's Service at its weight), on the Services' port 80 as KServe's own route;
- gives a version its weight only once KServe reports its canary Ready (`status.canaryStatuses`): until
  then its share stays on the stable predictor, rather than on a Service without endpoints (503s);
- deletes the routes KServe wrote for this InferenceService before it was labelled (KServe does not
  remove them itself), once the label is live, so no older route competes for the same host.

status.traffic reports what this route carries (`carried_traffic`: the versions and weights of its
backends as the API last showed it), since that is what the gateway serves; before the route exists,
nothing. A shadow's InferenceService (`<name>-shadow`) is labelled cluster-local too, so KServe exposes
it nowhere; the stable predictor mirrors to the cluster address KServe reports for it
(`status.address.url`, the predictor Service's `<svc>.<namespace>.svc.cluster.local`), and routes KServe
wrote for it before are deleted like the main one's.

After promotion or rollback the route has the one stable backend at 100. An empty `--standard-gateway`
turns all of this off (KServe exposes the InferenceService itself, unsplit); so does a cluster that does
not serve the Gateway API (no HTTPRoute resource: KServe then uses an Ingress, which the label would
also switch off).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from conveyor.operator.controller.children import LABEL_MANAGED_BY, MANAGED_BY, owner_reference, stamp
from conveyor.operator.modeldeployment.build import (
    CLUSTER_LOCAL,
    KSERVE_VISIBILITY,
    LABEL_DEPLOYMENT,
    predictor_name,
)

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
GATEWAY_GROUP = "gateway.networking.k8s.io"
DEFAULT_GATEWAY = "kserve/kserve-ingress-gateway"  # KServe v0.20.0's `kserveIngressGateway`
ROUTE_SUFFIX = "-traffic"
ISVC_NAME_HEADER = "KServe-Isvc-Name"
ISVC_NAMESPACE_HEADER = "KServe-Isvc-Namespace"
REQUEST_TIMEOUT = "60s"  # KServe's DefaultTimeout for a predictor without timeoutSeconds
SERVICE_PORT = 80  # KServe's predictor Service port (CommonDefaultHttpPort), REST and gRPC alike

NO_ROUTE_MESSAGE = (
    "Standard-mode canary without a gateway route: KServe sends all traffic to the stable predictor"
)

_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IP = re.compile(r"^[0-9.]+$|:")


def parse_gateway(text: str | None) -> tuple[str, str] | None:
    """`namespace/name` of the Gateway (KServe's `kserveIngressGateway` form); None when empty (off).
    Raises ValueError naming the flag for anything else."""
    text = (text or "").strip()
    if not text:
        return None
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(
            f"--standard-gateway {text!r}: expected <namespace>/<name> of a Gateway (KServe's default is "
            f"{DEFAULT_GATEWAY}), or empty to leave Standard-mode routing to KServe"
        )
    return namespace, name


def route_name(deployment_name: str) -> str:
    return deployment_name + ROUTE_SUFFIX


def predictor_service(isvc_name: str, version: str) -> str:
    """The Service KServe v0.20.0 creates for a named predictor or canary (`PredictorServiceName`)."""
    return f"{isvc_name}-{predictor_name(version)}-predictor"


def hostname(isvc: dict[str, Any] | None) -> str | None:
    """The host of the InferenceService's `status.url`: the one KServe's own route would have served.
    None until KServe reports one. An IP address (the local stack's router) is no Gateway API hostname:
    "" then, a route without hostnames."""
    url = ((isvc or {}).get("status") or {}).get("url")
    if not url:
        return None
    host = (urlsplit(url).hostname or "").lower()
    if not host or _IP.search(host) or not _DNS_NAME.match(host):
        return ""
    return host


def ready_canaries(isvc: dict[str, Any] | None) -> set[str]:
    """Predictor names of the canaries KServe reports Ready (`status.canaryStatuses`)."""
    st = (isvc or {}).get("status") or {}
    return {
        e.get("name") for e in st.get("canaryStatuses") or [] if e.get("ready") is not False and e.get("name")
    }


def effective_backends(versions: list[tuple[str, int]], isvc: dict[str, Any] | None) -> list[tuple[str, int]]:
    """(version, weight) per backend: the first version is the stable predictor, the others canaries; a
    canary KServe does not report Ready yet gets 0 and its share goes to the stable predictor. Backends
    at 0 are left out, so a finished rollout is one backend at 100."""
    ready = ready_canaries(isvc)
    stable, *canaries = versions
    served = [(v, w) for v, w in canaries if w > 0 and predictor_name(v) in ready]
    rest = 100 - sum(w for _, w in served)
    return [(stable[0], rest), *served] if rest > 0 else served


def build_route(
    deployment: dict[str, Any],
    gateway: tuple[str, str],
    host: str,
    backends: list[tuple[str, int]],
) -> dict[str, Any]:
    """The HTTPRoute sending every path of `host` to the versions' predictor Services at their weights."""
    meta = deployment["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    rule: dict[str, Any] = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "filters": [
            {
                "type": "RequestHeaderModifier",
                "requestHeaderModifier": {
                    "set": [
                        {"name": ISVC_NAME_HEADER, "value": name},
                        {"name": ISVC_NAMESPACE_HEADER, "value": namespace},
                    ]
                },
            }
        ],
        "backendRefs": [
            {
                "group": "",
                "kind": "Service",
                "name": predictor_service(name, version),
                "port": SERVICE_PORT,
                "weight": weight,
            }
            for version, weight in backends
        ],
        "timeouts": {"request": REQUEST_TIMEOUT},
    }
    spec: dict[str, Any] = {
        "parentRefs": [
            {"group": GATEWAY_GROUP, "kind": "Gateway", "namespace": gateway[0], "name": gateway[1]}
        ],
        "rules": [rule],
    }
    if host:
        spec["hostnames"] = [host]
    return stamp(
        {
            "apiVersion": GATEWAY_API_VERSION,
            "kind": "HTTPRoute",
            "metadata": {
                "name": route_name(name),
                "namespace": namespace,
                "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: name},
                "ownerReferences": [owner_reference(deployment)],
            },
            "spec": spec,
        }
    )


def backends_of(route: dict[str, Any] | None) -> list[tuple[str, int]]:
    """(Service, weight) of a route's backendRefs (weight 1 when unset, the Gateway API default)."""
    out = []
    for rule in ((route or {}).get("spec") or {}).get("rules") or []:
        for ref in rule.get("backendRefs") or []:
            out.append((ref.get("name", ""), int(ref.get("weight", 1))))
    return out


def carried_traffic(
    route: dict[str, Any] | None, isvc_name: str, tags: dict[str, str]
) -> list[dict[str, Any]]:
    """What a route sends where, per backend: the version whose predictor Service it names (`tags`: version
    -> tag, the versions the deployment serves), its share in percent of the route's total weight (a
    weight is relative in the Gateway API), the Service as `revision`. A Service of no version in `tags`
    is reported by its name, tag "unknown"."""
    services = {predictor_service(isvc_name, v): (v, tag) for v, tag in tags.items()}
    backends = backends_of(route)
    total = sum(w for _, w in backends)
    out = []
    for service, weight in backends:
        version, tag = services.get(service, (service, "unknown"))
        percent = round(100 * weight / total) if total > 0 else 0
        out.append({"version": version, "percent": percent, "revision": service, "tag": tag})
    return out


def owned_by(obj: dict[str, Any], kind: str, name: str) -> bool:
    return any(
        r.get("kind") == kind and r.get("name") == name for r in obj["metadata"].get("ownerReferences") or []
    )


def cluster_local(isvc: dict[str, Any] | None) -> bool:
    """KServe has been told not to expose the InferenceService (the label is on the live object)."""
    return ((isvc or {}).get("metadata", {}).get("labels") or {}).get(KSERVE_VISIBILITY) == CLUSTER_LOCAL
