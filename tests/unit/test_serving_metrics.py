"""The predictor's additive drift counts (ServingMetrics.observe_bins): a request of many rows lands in
the same profile bins, row for row, as the rows sent one at a time and as the drift module bins them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from conveyor.runtime.package.drift import bin_counts
from conveyor.runtime.serving.metrics import ServingMetrics

PROFILE = {
    "features": {
        "amount": {"kind": "numeric", "binEdges": [0.0, 10.0, 50.0, 200.0, 1000.0]},
        "merchant": {"kind": "categorical", "frequencies": {"grocery": 0.7, "travel": 0.3}},
    },
    "predictionDistribution": {"ok": 0.9, "fraud": 0.1},
}
AMOUNTS = [5.0, None, 10.0, 49.9, 50.0, 999.0, 5000.0, -1.0, float("nan"), 12]
MERCHANTS = ["grocery", "travel", "casino", None, "grocery", "grocery", "travel", "x", "grocery", "travel"]
ANSWERS = ["ok", "fraud", "ok", "ok", "ok", "ok", "fraud", "ok", "ok", "ok"]


def _counts(metrics: ServingMetrics, registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.labels["feature"], s.labels["bin"]): s.value
        for fam in registry.collect()
        for s in fam.samples
        if s.name == "conveyor_drift_bin_total" and s.value
    }


def _metrics() -> tuple[ServingMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    m = ServingMetrics("fraud", "v1", task="classification", architecture="mlp", drift=None, registry=registry,
                       profile=PROFILE)  # fmt: skip
    return m, registry


def test_many_rows_count_as_the_rows_one_by_one_and_as_the_drift_module_bins_them() -> None:
    batch, batch_registry = _metrics()
    batch.observe_bins({"amount": AMOUNTS, "merchant": MERCHANTS}, ANSWERS)
    single, single_registry = _metrics()
    for a, m, p in zip(AMOUNTS, MERCHANTS, ANSWERS, strict=True):
        single.observe_bins({"amount": [a], "merchant": [m]}, [p])
    counted = _counts(batch, batch_registry)
    assert counted == _counts(single, single_registry)
    expected = bin_counts(PROFILE["features"]["amount"], AMOUNTS)
    assert {b: n for (f, b), n in counted.items() if f == "amount"} == expected
    assert sum(expected.values()) == 8  # nulls (None, NaN) are not counted; out-of-range values are
    assert (
        counted[("amount", "0")] == 2 and counted[("amount", "3")] == 2
    )  # below the first / above the last edge
