"""Prometheus metrics of the predictor, exported on KServe's ``/metrics`` next to KServe's own.

Every series carries ``model_name`` and ``model_version`` so a canary and the stable version can be told
apart in one Prometheus. Names (all prefixed ``conveyor_``):

- ``requests_total{protocol, outcome, code}``: inference requests (``protocol`` v1|v2|grpc; ``outcome``
  success|client_error|server_error; ``code`` the HTTP status, for gRPC the one its status stands for),
  counted by the ASGI middleware (and a gRPC interceptor) so that requests KServe rejects before they
  reach the model are counted too.
- ``request_duration_seconds{protocol}``: end-to-end latency histogram of those requests.
- ``batch_size`` (rows per forward pass) and ``batch_requests`` (requests per forward pass) histograms.
- ``predictions_total{class}`` (classification) or ``prediction_value`` histogram (regression).
- ``drift_bin_total{feature, bin}``: live inputs (and predictions, feature ``__prediction__``) counted
  per bin of the training profile. Additive across replicas and worker processes: the operator's drift
  decision sums these in Prometheus over a window and scores them (``drift.score_counts``). Every
  series starts at 0, so ``increase()`` counts a window's first observations too.
- ``feature_drift{feature, method}``, ``prediction_drift{method}``, ``drift_score{method}`` (the overall
  score: the largest of the others) and ``drift_window_rows``: this process's own window, for people;
  computed at scrape time (see ``conveyor.runtime.package.drift``) and absent until the window holds
  enough rows. Not summable across replicas, so nothing decides on them.
- ``feedback_total{result}`` (correct|incorrect for classification, scored for regression,
  unknown_id), ``online_accuracy`` (classification) or ``online_mae`` (regression) over the last
  ``feedback_window`` labelled rows.
- ``ignored_inputs_total{field}``: request fields the model does not take, dropped rather than
  refused (at most ``MAX_IGNORED_FIELDS`` names, then ``__other__``).
- ``model_info{task, architecture, backend}`` = 1; ``server_processes``: the live server processes.

Several worker processes (``serve --workers N``): prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before any worker starts) keeps each process's
counters and histograms in a memory-mapped file, and ``/metrics`` (``exposition``) answers with their sum
over all processes, live and dead, so counters never go back. The online accuracy/MAE gauges report the
most recent value any process set, ``model_info`` the largest. The drift gauges stay those of the process
that answered the scrape (they are for people; decisions use the summed ``drift_bin_total``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor.runtime.package import profile as profiles
from conveyor.runtime.package.drift import PREDICTION, DriftMonitor, bin_counts, bin_labels, references
from conveyor.runtime.package.features import is_null

LABELS = ("model_name", "model_version")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_IGNORED_FIELDS = 50  # clients choose these names: bound the label's cardinality


def outcome_of(code: int) -> str:
    if code < 400:
        return "success"
    return "client_error" if code < 500 else "server_error"


class _DriftCollector(Collector):
    """Drift gauges computed when Prometheus scrapes, from the monitor's current window."""

    def __init__(self, monitor: DriftMonitor, model_name: str, model_version: str) -> None:
        self.monitor = monitor
        self.labels = [model_name, model_version]

    def describe(self) -> list[Any]:
        return []  # computed at scrape time; nothing to check against at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.monitor.report()
        method = self.monitor.method
        rows = GaugeMetricFamily(
            "conveyor_drift_window_rows",
            "Rows in the drift window (scores appear once it is full enough)",
            labels=LABELS,
        )
        rows.add_metric(self.labels, report.samples)
        yield rows
        feature = GaugeMetricFamily(
            "conveyor_feature_drift",
            "Drift of one input feature (or image statistic): live window vs training profile",
            labels=[*LABELS, "feature", "method"],
        )
        for name, score in sorted(report.features.items()):
            feature.add_metric([*self.labels, name, method], score)
        yield feature
        prediction = GaugeMetricFamily(
            "conveyor_prediction_drift",
            "PSI of the live prediction distribution vs training",
            labels=[*LABELS, "method"],
        )
        if report.prediction is not None:
            prediction.add_metric([*self.labels, method], report.prediction)
        yield prediction
        overall = GaugeMetricFamily(
            "conveyor_drift_score",
            "Overall drift: the largest feature or prediction drift score",
            labels=[*LABELS, "method"],
        )
        if report.overall is not None:
            overall.add_metric([*self.labels, method], report.overall)
        yield overall


class FeedbackTracker:
    """Remembers recent predictions by request id and scores ground truth sent back for them."""

    def __init__(self, *, capacity: int = 100_000, window: int = 1000, task: str = "classification") -> None:
        self.capacity = capacity
        self.task = task
        self._predictions: OrderedDict[str, list[Any]] = OrderedDict()
        self._inputs: dict[str, list[dict[str, Any]]] = {}  # the rows behind each prediction, for the dataset
        self._scores: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def remember(
        self, request_id: str, predictions: Sequence[Any], inputs: list[dict[str, Any]] | None = None
    ) -> None:
        with self._lock:
            self._predictions[request_id] = list(predictions)
            self._predictions.move_to_end(request_id)
            if inputs is not None:
                self._inputs[request_id] = inputs
            while len(self._predictions) > self.capacity:
                gone, _ = self._predictions.popitem(last=False)
                self._inputs.pop(gone, None)

    def inputs(self, request_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            return self._inputs.get(request_id)

    def predictions(self, request_id: str) -> list[Any] | None:
        with self._lock:
            return self._predictions.get(request_id)

    def score(self, request_id: str, truths: Sequence[Any]) -> list[float]:
        """Record ground truth for every row of a request; returns the per-row scores (1/0 correct for
        classification, absolute error for regression). KeyError if the id is unknown or expired."""
        with self._lock:
            predicted = self._predictions.get(request_id)
            if predicted is None:
                raise KeyError(request_id)
            if len(truths) != len(predicted):
                raise ValueError(
                    f"request {request_id!r} had {len(predicted)} row(s); feedback gives {len(truths)} label(s)"
                )
            if self.task == "regression":
                scores = [abs(float(t) - float(p)) for t, p in zip(truths, predicted, strict=True)]
            else:
                scores = [1.0 if str(t) == str(p) else 0.0 for t, p in zip(truths, predicted, strict=True)]
            self._scores.extend(scores)
            return scores

    def compare(self, truths: Sequence[Any], predicted: Sequence[Any]) -> list[float]:
        """Per-row scores as ``score`` gives them, for a request this tracker does not hold."""
        if self.task == "regression":
            return [abs(float(t) - float(p)) for t, p in zip(truths, predicted, strict=True)]
        return [1.0 if str(t) == str(p) else 0.0 for t, p in zip(truths, predicted, strict=True)]

    def online_value(self) -> float | None:
        with self._lock:
            return sum(self._scores) / len(self._scores) if self._scores else None


def multiprocess_dir() -> str | None:
    """The directory of the worker processes' metric files, when several processes serve."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(accept: str | None, extra: Collector | None = None) -> tuple[bytes, str]:
    """The ``/metrics`` body of a multi-process server: every process's series summed (prometheus_client's
    MultiProcessCollector), plus ``extra`` (this process's drift gauges); and its content type."""
    from prometheus_client import exposition as prom_exposition
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    if extra is not None:
        registry.register(extra)
    encoder, content_type = prom_exposition.choose_encoder(accept)
    return encoder(registry), content_type


class ServingMetrics:
    """The predictor's metrics, bound to one model name and version."""

    def __init__(
        self,
        model_name: str,
        model_version: str,
        *,
        task: str,
        architecture: str,
        backend: str = "unknown",
        drift: DriftMonitor | None,
        profile: Mapping[str, Any] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.task = task
        lv = (model_name, model_version)
        self.requests = Counter(
            "conveyor_requests_total",
            "Inference requests by protocol, outcome and HTTP status code",
            [*LABELS, "protocol", "outcome", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "conveyor_request_duration_seconds",
            "Inference request latency, end to end in the server",
            [*LABELS, "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "conveyor_batch_size",
            "Rows per forward pass",
            LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(*lv)
        self.batch_requests = Histogram(
            "conveyor_batch_requests",
            "Requests answered by one forward pass",
            LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(*lv)
        self.predictions = Counter(
            "conveyor_predictions_total",
            "Predicted classes",
            [*LABELS, "class"],
            registry=registry,
        )
        self.prediction_value = Histogram(
            "conveyor_prediction_value",
            "Predicted values (regression)",
            LABELS,
            registry=registry,
        ).labels(*lv)
        self.feedback = Counter(
            "conveyor_feedback_total",
            "Ground-truth rows received, by result",
            [*LABELS, "result"],
            registry=registry,
        )
        self.online_accuracy = Gauge(
            "conveyor_online_accuracy",
            "Accuracy on the last rows that got ground truth",
            LABELS,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.online_mae = Gauge(
            "conveyor_online_mae",
            "Mean absolute error on the last rows that got ground truth (regression)",
            LABELS,
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.drift_bins = Counter(
            "conveyor_drift_bin_total",
            "Live inputs and predictions (feature __prediction__) per training-profile bin; additive across replicas",
            [*LABELS, "feature", "bin"],
            registry=registry,
        )
        self._references = references(profile or {})
        # Children looked up once: prometheus_client's labels() costs more per request than the count.
        self._bin_children: dict[str, dict[str, Any]] = {}
        self._edges: dict[str, np.ndarray] = {}  # a numeric feature's inner bin edges
        for feature, entry in self._references.items():
            self._bin_children[feature] = {label: self.drift_bins.labels(*lv, feature, label)
                                           for label in bin_labels(entry)}  # fmt: skip
            if entry.get("kind") == "numeric" and entry.get("binEdges"):
                self._edges[feature] = np.asarray(entry["binEdges"][1:-1], dtype=np.float64)
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._class_children: dict[str, Any] = {}
        self.ignored_inputs = Counter(
            "conveyor_ignored_inputs_total",
            "Request fields the model does not take, ignored (rows that carried them)",
            [*LABELS, "field"],
            registry=registry,
        )
        self._ignored_names: set[str] = set()
        info = Gauge(
            "conveyor_model_info",
            "The served model version",
            [*LABELS, "task", "architecture", "backend"],
            registry=registry,
            multiprocess_mode="max",
        )
        info.labels(*lv, task, architecture, backend).set(1)  # backend: how the forward pass runs
        # 1 per live server process; summed over the live ones (a dead worker's file is dropped).
        processes = Gauge(
            "conveyor_server_processes",
            "Server processes serving this model version (serve --workers)",
            LABELS,
            registry=registry,
            multiprocess_mode="livesum",
        )
        processes.labels(*lv).set(1)
        self.drift_collector = None
        if drift is not None:
            self.drift_collector = _DriftCollector(drift, model_name, model_version)
            registry.register(self.drift_collector)

    def observe_request(self, protocol: str, code: int, seconds: float) -> None:
        children = self._request_children.get((protocol, code))
        if children is None:
            lv = (self.model_name, self.model_version)
            children = self._request_children[(protocol, code)] = (
                self.requests.labels(*lv, protocol, outcome_of(code), str(code)),
                self.latency.labels(*lv, protocol),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        self.batch_size.observe(rows)
        self.batch_requests.observe(requests)

    def observe_predictions(self, predictions: Sequence[Any]) -> None:
        if self.task == "regression":
            for v in predictions:
                self.prediction_value.observe(float(v))
            return
        counts: dict[str, int] = {}
        for p in predictions:
            counts[str(p)] = counts.get(str(p), 0) + 1
        for cls, n in counts.items():
            child = self._class_children.get(cls)
            if child is None:
                child = self._class_children[cls] = self.predictions.labels(
                    self.model_name, self.model_version, cls
                )
            child.inc(n)

    def observe_bins(self, columns: Mapping[str, Sequence[Any]], predictions: Sequence[Any]) -> None:
        """Count a batch's live values (and predictions) per profile bin."""
        for feature, entry in self._references.items():
            values = predictions if feature == PREDICTION else columns.get(feature)
            if values is None or len(values) == 0:
                continue
            children = self._bin_children[feature]
            edges = self._edges.get(feature)
            if edges is not None and len(values) == 1:  # one row: its bin, without bin_counts' arrays
                v = values[0]
                x = np.nan if is_null(v) else float(v)
                if x == x:  # nulls are not counted (NaN != NaN)
                    children[str(int(np.searchsorted(edges, x, side="right")))].inc()
                continue
            if edges is not None:  # numeric: the cached edges, not bin_counts' per-call arrays
                arr = profiles._as_float(values)
                idx = np.searchsorted(edges, arr[~np.isnan(arr)], side="right")
                counts = np.bincount(idx, minlength=len(edges) + 1)
                for i in np.flatnonzero(counts).tolist():
                    children[str(i)].inc(int(counts[i]))
                continue
            for label, n in bin_counts(entry, values).items():
                children[label].inc(n)

    def observe_ignored(self, fields: Mapping[str, int]) -> None:
        for name, n in fields.items():
            if name not in self._ignored_names and len(self._ignored_names) >= MAX_IGNORED_FIELDS:
                name = "__other__"
            self._ignored_names.add(name)
            self.ignored_inputs.labels(self.model_name, self.model_version, name).inc(n)

    def observe_feedback(
        self, result: str, rows: int, online_value: float | None, *, version: str | None = None
    ) -> None:
        """``version``: the version that answered, when another one's predictor took its feedback."""
        self.feedback.labels(self.model_name, version or self.model_version, result).inc(rows)
        if online_value is not None:
            gauge = self.online_mae if self.task == "regression" else self.online_accuracy
            gauge.labels(self.model_name, self.model_version).set(online_value)
