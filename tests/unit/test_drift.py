"""Drift scores of the serving window against a training profile built by the training code."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.runtime.package.drift import DriftMonitor, binned_ks
from conveyor.runtime.package.profile import numeric_profile, prediction_distribution, tabular_profile

CLASSES = ["no", "yes"]


def _training_profile(rng: np.random.Generator, n: int = 5000) -> dict:
    cols = {
        "amount": rng.lognormal(3.0, 1.0, n),
        "age": rng.integers(18, 90, n).astype(float),  # discrete: tied decile edges
        "country": rng.choice(["de", "fr", "us"], n, p=[0.5, 0.3, 0.2]),
    }
    prof = tabular_profile(cols, {"amount": "float", "age": "int", "country": "string"})
    prof["predictionDistribution"] = prediction_distribution(rng.integers(0, 2, n), CLASSES)
    return prof


def _live(rng: np.random.Generator, n: int, *, shift: float = 0.0) -> tuple[dict, list[str]]:
    cols = {
        "amount": list(rng.lognormal(3.0 + shift, 1.0, n)),
        "age": list(rng.integers(18, 90, n).astype(float)),
        "country": list(rng.choice(["de", "fr", "us"], n, p=[0.5, 0.3, 0.2])),
    }
    return cols, [CLASSES[i] for i in rng.integers(0, 2, n)]


@pytest.mark.parametrize("method", ["psi", "ks"])
def test_in_distribution_scores_stay_low_and_a_shifted_feature_rises(method: str) -> None:
    rng = np.random.default_rng(7)
    prof = _training_profile(rng)
    calm = DriftMonitor(prof, classes=CLASSES, window=1000, min_samples=200, method=method)
    calm.observe(*_live(rng, 1000))
    report = calm.report()
    assert report.ready and report.samples == 1000
    assert set(report.features) == {"amount", "age", "country"}
    assert report.overall is not None and report.overall < 0.05, report

    shifted = DriftMonitor(prof, classes=CLASSES, window=1000, min_samples=200, method=method)
    shifted.observe(*_live(rng, 1000, shift=1.5))
    drifted = shifted.report()
    assert drifted.features["amount"] > 0.25, drifted  # PSI > 0.25 is the usual "act now" line
    assert drifted.features["age"] < 0.05 and drifted.features["country"] < 0.05
    assert drifted.overall == drifted.features["amount"]


def test_the_window_slides_so_drift_fades_once_inputs_return_to_normal() -> None:
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(_training_profile(rng), classes=CLASSES, window=500, min_samples=100)
    monitor.observe(*_live(rng, 500, shift=2.0))
    assert monitor.report().features["amount"] > 1.0
    monitor.observe(*_live(rng, 500))  # pushes every shifted row out
    assert monitor.report().features["amount"] < 0.05


def test_nothing_is_reported_before_the_window_holds_min_samples() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(_training_profile(rng), classes=CLASSES, window=1000, min_samples=200)
    monitor.observe(*_live(rng, 199, shift=3.0))
    report = monitor.report()
    assert not report.ready and report.features == {} and report.overall is None
    monitor.observe(*_live(rng, 1, shift=3.0))
    assert monitor.report().overall > 1.0


def test_prediction_drift_and_unseen_categories_count() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(_training_profile(rng), classes=CLASSES, window=400, min_samples=100)
    cols, _ = _live(rng, 400)
    cols["country"] = ["jp"] * 400  # never seen in training
    monitor.observe(cols, ["yes"] * 400)  # training predicted yes half the time
    report = monitor.report()
    assert report.features["country"] > 1.0
    assert report.prediction is not None and report.prediction > 1.0


def test_image_statistics_are_the_features_of_an_image_model() -> None:
    rng = np.random.default_rng(4)
    prof = {
        "rows": 2000,
        "features": {},
        "imageStats": {"brightness": numeric_profile(rng.uniform(0.2, 0.4, 2000))},
    }
    monitor = DriftMonitor(prof, classes=None, window=300, min_samples=50)
    monitor.observe({"brightness": list(rng.uniform(0.7, 0.9, 300))})
    assert monitor.report().features["brightness"] > 1.0


def test_binned_ks_is_the_largest_gap_between_cumulative_fractions() -> None:
    entry = {"kind": "numeric", "binEdges": [0.0, 1.0, 2.0, 3.0], "binFractions": [0.5, 0.25, 0.25]}
    # live: all rows in the last bin -> cumulative [0, 0, 1] vs [0.5, 0.75, 1]
    assert binned_ks(entry, [2.5, 2.7, 9.0]) == pytest.approx(0.75)
    assert binned_ks(entry, [0.1, 0.2, 1.5, 2.5]) == pytest.approx(0.0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="drift method"):
        DriftMonitor({"features": {}}, classes=None, method="chi2")
    with pytest.raises(ValueError, match="at least 1"):
        DriftMonitor({"features": {}}, classes=None, window=0)


# ---------------------------------------------------------------- the additive form


@pytest.mark.parametrize("method", ["psi", "ks"])
def test_counts_summed_over_processes_score_as_one_window(method: str) -> None:
    """Three predictor processes each count a third of the traffic; the summed counts score exactly as the
    whole traffic seen by one process (what the operator computes from Prometheus)."""
    from conveyor.runtime.package.drift import PREDICTION, bin_counts, feature_score, references, score_counts

    rng = np.random.default_rng(11)
    prof = _training_profile(rng)
    cols, preds = _live(rng, 1500, shift=0.7)
    cols["country"][:40] = ["jp"] * 40  # a category training never saw
    refs = references(prof)
    assert set(refs) == {"amount", "age", "country", PREDICTION}
    for name, entry in refs.items():
        values = preds if name == PREDICTION else cols[name]
        summed: dict[str, int] = {}
        for part in (values[:500], values[500:1000], values[1000:]):
            for label, n in bin_counts(entry, part).items():
                summed[label] = summed.get(label, 0) + n
        assert sum(summed.values()) == len(values)
        additive = score_counts(entry, summed, method)
        whole = score_counts(entry, bin_counts(entry, values), method)
        assert additive == pytest.approx(whole, rel=1e-12)
        if entry["kind"] == "numeric":  # the same statistic as the per-process monitor
            assert additive == pytest.approx(feature_score(entry, values, method), rel=1e-9)
    assert score_counts(refs["amount"], {}, method) is None
    shifted = score_counts(refs["amount"], bin_counts(refs["amount"], cols["amount"]), method)
    calm = score_counts(refs["age"], bin_counts(refs["age"], cols["age"]), method)
    assert shifted > 0.2 and calm < 0.05
    assert bin_counts(refs["country"], cols["country"])["__other__"] == 40
