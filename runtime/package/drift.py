"""Live drift scores: a sliding window of served inputs compared with the training profile.

The reference is the model package's ``profile.json``; binning and PSI come from
``conveyor.runtime.package.profile`` so training and serving cut the line the same way.

Methods (``--drift-method``, the ModelDeployment's ``spec.monitoring.drift.method``):

- ``psi`` (default): population stability index of the window over the profile's decile bins
  (numeric features, image statistics) or category frequencies (categorical features).
- ``ks``: for numeric features, the Kolmogorov-Smirnov statistic between the window and the training
  split evaluated at the profile's decile edges (the largest gap between the two cumulative bin
  fractions; the profile keeps bins, not raw rows, so this is a binned KS). Categorical features and
  the prediction distribution have no order, so they are scored with PSI under both methods.

The overall drift score is the largest per-feature score, prediction drift included: one drifted feature
is enough to act on, and averaging over many stable features would hide it.
Nothing is reported until the window holds ``min_samples`` rows; a score from a handful of requests is noise.

Two forms of the same math:

- ``DriftMonitor`` scores one process's sliding window (the predictor's own gauges, for people);
- ``bin_counts`` / ``score_counts`` are the additive form the decisions use: a predictor counts live
  values per feature and bin (``bin_labels``: a numeric profile's bin index, a categorical profile's
  value or ``__other__``), those counters are summed across replicas and worker processes by
  Prometheus over a window, and the operator scores the summed counts against the profile. Summing
  counts is exact; averaging per-process scores is not.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conveyor.runtime.package import profile as profiles
from conveyor.runtime.package.features import category_key, is_null

METHODS = ("psi", "ks")
PREDICTION = "__prediction__"


def binned_ks(entry: Mapping[str, Any], values: Any) -> float:
    """KS statistic between live ``values`` and a numeric profile ``entry`` at its bin edges."""
    if not entry.get("binEdges"):
        return 0.0
    live = np.asarray(profiles.bin_fractions(entry, values), dtype=np.float64)
    ref = np.asarray(entry["binFractions"], dtype=np.float64)
    return float(np.max(np.abs(np.cumsum(live) - np.cumsum(ref))))


def feature_score(entry: Mapping[str, Any], values: Any, method: str) -> float:
    if method == "ks" and entry.get("kind") == "numeric":
        return binned_ks(entry, np.asarray(values, dtype=np.float64))
    return profiles.feature_psi(entry, values)


@dataclass
class DriftReport:
    samples: int
    ready: bool
    features: dict[str, float] = field(default_factory=dict)
    prediction: float | None = None

    @property
    def overall(self) -> float | None:
        scores = list(self.features.values())
        if self.prediction is not None:
            scores.append(self.prediction)
        return max(scores) if scores else None


class DriftMonitor:
    """Keeps the last ``window`` rows of every profiled input (and of the predictions) and scores them.

    ``observe`` is called from the batch worker thread and ``report`` from the metrics scrape, hence the lock.
    """

    def __init__(
        self,
        profile: Mapping[str, Any],
        *,
        classes: Sequence[str] | None,
        window: int = 1000,
        min_samples: int = 200,
        method: str = "psi",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"drift method must be one of {METHODS}, got {method!r}")
        if window < 1 or min_samples < 1:
            raise ValueError("drift window and min_samples must be at least 1")
        self.method = method
        self.window = window
        self.min_samples = min(min_samples, window)
        # Image models are profiled on per-image statistics, tabular ones on their features.
        self.reference: dict[str, Mapping[str, Any]] = dict(profile.get("features") or {})
        self.reference.update(profile.get("imageStats") or {})
        self.prediction_reference = self._prediction_reference(profile, classes)
        self.classes = list(classes) if classes is not None else None
        self._values: dict[str, deque[Any]] = {name: deque(maxlen=window) for name in self.reference}
        self._predictions: deque[Any] = deque(maxlen=window)
        self._lock = threading.Lock()

    @staticmethod
    def _prediction_reference(
        profile: Mapping[str, Any], classes: Sequence[str] | None
    ) -> dict[str, Any] | None:
        dist = profile.get("predictionDistribution")
        if not dist:
            return None
        if isinstance(dist, Mapping) and dist.get("kind") == "numeric":
            return dict(dist)
        if classes is None:
            return None
        return {"kind": "categorical", "frequencies": {str(k): float(v) for k, v in dist.items()}}

    @property
    def features(self) -> list[str]:
        return list(self.reference)

    def observe(self, columns: Mapping[str, Sequence[Any]], predictions: Sequence[Any] | None = None) -> None:
        """Add a batch: ``columns`` maps a profiled feature to its live values; ``predictions`` are class
        labels (classification) or values (regression)."""
        with self._lock:
            for name, values in columns.items():
                buf = self._values.get(name)
                if buf is not None:
                    buf.extend(values.tolist() if isinstance(values, np.ndarray) else values)
            if predictions is not None:
                self._predictions.extend(
                    predictions.tolist() if isinstance(predictions, np.ndarray) else predictions
                )

    def samples(self) -> int:
        with self._lock:
            return max((len(b) for b in self._values.values()), default=len(self._predictions))

    def report(self) -> DriftReport:
        with self._lock:
            snapshot = {name: list(buf) for name, buf in self._values.items()}
            predictions = list(self._predictions)
        samples = max((len(v) for v in snapshot.values()), default=len(predictions))
        report = DriftReport(samples=samples, ready=samples >= self.min_samples)
        if not report.ready:
            return report
        for name, values in snapshot.items():
            if len(values) >= self.min_samples:
                report.features[name] = feature_score(self.reference[name], values, self.method)
        ref = self.prediction_reference
        if ref is not None and len(predictions) >= self.min_samples:
            # Prediction drift is a distribution over classes (no order): PSI under either method.
            report.prediction = (
                profiles.feature_psi(ref, predictions)
                if ref.get("kind") == "categorical"
                else feature_score(ref, predictions, self.method)
            )
        return report


# ---------------------------------------------------------------- the additive form

OTHER = "__other__"  # a category the training split never had: one bin, so label cardinality stays bounded


def references(profile: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Every profiled input (features or image statistics) and the prediction distribution, by name."""
    out: dict[str, Mapping[str, Any]] = dict(profile.get("features") or {})
    out.update(profile.get("imageStats") or {})
    dist = profile.get("predictionDistribution")
    if isinstance(dist, Mapping) and dist.get("kind") == "numeric":
        out[PREDICTION] = dict(dist)
    elif isinstance(dist, Mapping) and dist:
        out[PREDICTION] = {"kind": "categorical", "frequencies": {str(k): float(v) for k, v in dist.items()}}
    return out


def bin_labels(entry: Mapping[str, Any]) -> list[str]:
    """The bins of one profile entry, in order: numeric bin indexes, or the categories then ``__other__``."""
    if entry.get("kind") == "numeric":
        return [str(i) for i in range(max(len(entry.get("binEdges") or []) - 1, 1))]
    return [*(entry.get("frequencies") or {}), OTHER]


def reference_fractions(entry: Mapping[str, Any]) -> list[float]:
    """The training split's fraction in each of ``bin_labels(entry)``."""
    if entry.get("kind") == "numeric":
        return [float(f) for f in entry.get("binFractions") or [1.0]]
    return [*(float(f) for f in (entry.get("frequencies") or {}).values()), 0.0]


def bin_counts(entry: Mapping[str, Any], values: Any) -> dict[str, int]:
    """How many of ``values`` fall in each bin of ``entry`` (nulls are not counted, as in the profile)."""
    if entry.get("kind") == "numeric":
        if not entry.get("binEdges"):
            return {}
        arr = profiles._as_float(values)
        arr = arr[~np.isnan(arr)]
        n_bins = len(bin_labels(entry))
        idx = np.searchsorted(np.asarray(entry["binEdges"][1:-1], dtype=np.float64), arr, side="right")
        counts = np.bincount(idx, minlength=n_bins)
        return {str(i): int(c) for i, c in enumerate(counts) if c}
    known = entry.get("frequencies") or {}
    out: dict[str, int] = {}
    for v in values:
        if is_null(v):
            continue
        key = category_key(v)
        key = key if key in known else OTHER
        out[key] = out.get(key, 0) + 1
    return out


def score_counts(entry: Mapping[str, Any], counts: Mapping[str, float], method: str = "psi") -> float | None:
    """Drift of live bin ``counts`` (summed over any number of processes) against ``entry``; None when
    there are none. KS for numeric entries under ``ks``, PSI otherwise (as ``feature_score``)."""
    labels = bin_labels(entry)
    live = np.asarray([max(float(counts.get(label, 0.0)), 0.0) for label in labels], dtype=np.float64)
    total = live.sum()
    if total <= 0:
        return None
    live /= total
    ref = np.asarray(reference_fractions(entry), dtype=np.float64)
    if method == "ks" and entry.get("kind") == "numeric":
        return float(np.max(np.abs(np.cumsum(live) - np.cumsum(ref))))
    return profiles.psi(ref, live)
