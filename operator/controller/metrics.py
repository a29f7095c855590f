"""The operator's own Prometheus metrics, served on --metrics-port (default 8000) at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "conveyor_reconcile_total", "Reconciles by kind and result (ok, error, conflict).", ["kind", "result"]
)
RECONCILE_ERRORS = Counter("conveyor_reconcile_errors_total", "Reconciles that raised, by kind.", ["kind"])
RECONCILE_DURATION = Histogram(
    "conveyor_reconcile_duration_seconds",
    "Time one reconcile took, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_DEPTH = Gauge("conveyor_workqueue_depth", "Objects waiting to be reconciled, by kind.", ["kind"])
API_REQUESTS = Counter(
    "conveyor_api_requests_total",
    "Kubernetes API requests the operator made (watches excluded), by verb, resource and HTTP code.",
    ["verb", "resource", "code"],
)
API_LATENCY = Histogram(
    "conveyor_api_request_duration_seconds",
    "Kubernetes API request latency, by verb.",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LEADER = Gauge("conveyor_leader", "1 while this replica holds the leader Lease (or runs without leader election).")
ACTIVE_RUNS = Gauge("conveyor_active_runs", "Training runs in progress (MLPipelines with an active run).")
ACTIVE_ROLLOUTS = Gauge("conveyor_active_rollouts", "ModelDeployments with a canary in progress.")
RUNS_FINISHED = Counter(
    "conveyor_runs_finished_total", "Training runs finished, by outcome (Succeeded, Failed, GateFailed).", ["outcome"]
)

ROLLOUTS_FINISHED = Counter(
    "conveyor_rollouts_finished_total",
    "Canary rollouts finished, by ModelDeployment and outcome (Promoted, RolledBack by analysis, Aborted by hand).",
    ["namespace", "deployment", "outcome"],
)
CANARY_WEIGHT = Gauge(
    "conveyor_canary_weight",
    "Percent of a ModelDeployment's traffic its canary takes (0 without a canary).",
    ["namespace", "deployment"],
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on a background thread (prometheus_client's own server)."""
    start_http_server(port, addr=addr)
