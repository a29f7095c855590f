"""`python -m conveyor.operator`: run the operator (cluster-wide, or in the namespaces named).

    python -m conveyor.operator                      # every namespace
    python -m conveyor.operator -n team-a -n team-b  # only these
    python -m conveyor.operator --metrics-port 8000 --liveness-port 8080

Credentials: the pod's service account in a cluster, else $KUBECONFIG or ~/.kube/config.
Liveness: GET http://<addr>:<liveness-port>/healthz (kopf's probe endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

# kopf imports the official `kubernetes` client when it is installed, only to recognise that client's
# objects; the operator never hands it any (controller/client.py talks to the API), and the import
# costs ~37 MiB of resident memory and seconds of start-up. It stays installed for `kubectl conveyor`.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import kopf  # noqa: E402

from conveyor.operator import handlers  # noqa: E402, F401 - registers the kopf handlers
from conveyor.operator.controller.leader import LeaseConfig  # noqa: E402
from conveyor.operator.controller.manager import Config  # noqa: E402
from conveyor.operator.modeldeployment.route import parse_gateway  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m conveyor.operator", description=__doc__.split("\n")[0])
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; default: every namespace)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("CONVEYOR_METRICS_PORT", "8000")),
        help="Prometheus /metrics port, 0 to disable (default 8000)",
    )
    p.add_argument(
        "--liveness-port",
        type=int,
        default=int(os.environ.get("CONVEYOR_LIVENESS_PORT", "8080")),
        help="liveness endpoint port (/healthz), 0 to disable (default 8080)",
    )
    p.add_argument(
        "--bind", default=os.environ.get("CONVEYOR_BIND", "0.0.0.0"), help="address for both endpoints"
    )
    p.add_argument(
        "--pipeline-workers",
        type=int,
        default=16,
        help="MLPipelines (and BatchPredictions) reconciled at once (default 16)",
    )
    p.add_argument(
        "--deployment-workers", type=int, default=16, help="ModelDeployments reconciled at once (default 16)"
    )
    p.add_argument("--resync-seconds", type=float, default=600.0, help="reconcile everything this often")
    p.add_argument(
        "--registry-poll-seconds",
        type=float,
        default=60.0,
        help="how often a ModelDeployment following a registry's latest version looks for a new one",
    )
    p.add_argument(
        "--default-kserve-mode",
        choices=["Knative", "Standard"],
        default=os.environ.get("CONVEYOR_DEFAULT_KSERVE_MODE", "Knative"),
        help="KServe mode of a ModelDeployment that sets no spec.rollout.mode (fixed once its "
        "InferenceService exists)",
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("CONVEYOR_PROMETHEUS_URL") or None,
        help="Prometheus that canary analysis and drift query (e.g. http://prometheus:9090); "
        "unset: a canary pauses for a person at its first analysis",
    )
    p.add_argument(
        "--standard-gateway",
        default=os.environ.get("CONVEYOR_STANDARD_GATEWAY", "kserve/kserve-ingress-gateway"),
        help="namespace/name of the Gateway that a Standard-mode ModelDeployment's weighted HTTPRoute "
        "attaches to (KServe's kserveIngressGateway; default kserve/kserve-ingress-gateway); empty: "
        "KServe exposes Standard mode itself, every request to the stable predictor",
    )
    p.add_argument(
        "--leader-elect",
        action="store_true",
        default=os.environ.get("CONVEYOR_LEADER_ELECT") == "true",
        help="for several replicas: only the holder of a coordination.k8s.io Lease reconciles",
    )
    p.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE)",
    )
    p.add_argument("--leader-election-id", default="conveyor-operator", help="name of the Lease")
    p.add_argument("--log-level", default=os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    try:
        parse_gateway(args.standard_gateway)
    except ValueError as e:
        p.error(str(e))
    for ns in args.namespace:
        if not ns or len(ns) > 63:
            p.error(f"--namespace {ns!r} is not a namespace name")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf's per-object chatter is noise at INFO for an event-only operator.
    logging.getLogger("kopf").setLevel(
        logging.WARNING if args.log_level.upper() == "INFO" else args.log_level.upper()
    )
    config = Config(
        pipeline_workers=args.pipeline_workers,
        deployment_workers=args.deployment_workers,
        resync_seconds=args.resync_seconds,
        registry_poll_seconds=args.registry_poll_seconds,
        metrics_port=args.metrics_port or None,
        default_kserve_mode=args.default_kserve_mode,
        prometheus_url=args.prometheus_url,
        standard_gateway=args.standard_gateway,
        leader_election=LeaseConfig(
            namespace=args.leader_election_namespace,
            name=args.leader_election_id,
            identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        )
        if args.leader_elect
        else None,
    )
    liveness = f"http://{args.bind}:{args.liveness_port}/healthz" if args.liveness_port else None
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=True,  # kopf's peering pauses peers of equal priority; replicas use the Lease instead
            liveness_endpoint=liveness,
            memo=kopf.Memo(config=config),
        )
    )


if __name__ == "__main__":
    main()
