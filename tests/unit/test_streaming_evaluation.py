"""Evaluation folded batch by batch (evaluate.ClassificationTally / RegressionTally): the figures a user
reads in metrics.json agree with scikit-learn's on the whole split, within the binning error the tally
states, and the driver keeps a fixed amount whatever the rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    mean_absolute_error,
    precision_recall_fscore_support,
    roc_auc_score,
)

from conveyor.runtime.package.decision import decide
from conveyor.runtime.training import evaluate


def _binary(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.05).astype(np.int64)
    s = rng.normal(0, 1.5, n) + 2.5 * y - 3.0  # log-odds of the positive class
    logits = np.stack([np.zeros(n), s], axis=1).astype(np.float32)
    return logits, y


def test_binary_metrics_batch_by_batch_match_sklearn_on_the_whole_split() -> None:
    logits, y = _binary(200_000)
    threshold = 0.3
    tally = evaluate.ClassificationTally(["0", "1"], threshold)
    for i in range(0, len(y), 7_919):  # uneven batches, as a stream delivers them
        tally.add(logits[i : i + 7_919], y[i : i + 7_919])
    m = tally.metrics()
    p = evaluate.softmax(logits.astype(np.float64))[:, 1]
    pred = decide(evaluate.softmax(logits.astype(np.float64)), threshold)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    assert m["accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-12)
    assert m["f1Macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(
        (precision[1], recall[1], f1[1]), abs=1e-12
    )
    assert m["recall:0"] == pytest.approx(recall[0], abs=1e-12)
    # The AUCs come from the score histograms: within their stated (small) binning error of the exact ones.
    assert 0 < m["rocAucMaxBinningError"] < 1e-3 and 0 < m["prAucMaxBinningError"] < 1e-2
    assert abs(m["rocAuc"] - roc_auc_score(y, p)) <= m["rocAucMaxBinningError"] + 1e-9
    assert abs(m["prAuc"] - average_precision_score(y, p)) <= m["prAucMaxBinningError"] + 1e-9
    # The driver's share is fixed: a confusion matrix and two histograms, not the rows.
    assert tally.hist is not None and tally.hist.nbytes + tally.confusion.nbytes < 2 * 2**20
    assert tally.rows == len(y) and tally.predicted_counts().tolist() == np.bincount(pred).tolist()


def test_tallies_merge_and_the_threshold_search_maximises_f1() -> None:
    logits, y = _binary(50_000, seed=2)
    a = evaluate.ClassificationTally(["0", "1"]).add(logits[:20_000], y[:20_000])
    b = evaluate.ClassificationTally(["0", "1"]).add(logits[20_000:], y[20_000:])
    whole = evaluate.ClassificationTally(["0", "1"]).add(logits, y)
    assert a.merge(b).metrics() == whole.metrics()
    # Up to EXACT_ROWS rows the AUCs are scikit-learn's own, with no binning error to state.
    p_all = evaluate.softmax(logits.astype(np.float64))[:, 1]
    assert (
        whole.metrics()["rocAuc"] == roc_auc_score(y, p_all)
        and "rocAucMaxBinningError" not in whole.metrics()
    )
    t = whole.best_threshold("rocAuc")  # threshold-free gate metric: F1 of the positive class
    assert t is not None and t != 0.5
    p = evaluate.softmax(logits.astype(np.float64))[:, 1]
    chosen = f1_score(y, (p >= t).astype(int))
    # No threshold on a fine grid does better than the one chosen (up to a row or so at a bin's edge).
    grid = max(f1_score(y, (p >= q).astype(int)) for q in np.linspace(0.01, 0.99, 99))
    assert chosen >= grid - 1e-3


def test_multiclass_and_regression_tallies() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(10_000, 3))
    y = rng.integers(0, 3, 10_000)
    t = evaluate.ClassificationTally(["a", "b", "c"])
    for i in range(0, 10_000, 3_000):
        t.add(logits[i : i + 3_000], y[i : i + 3_000])
    m = t.metrics()
    assert "rocAuc" not in m and t.best_threshold("accuracy") is None
    assert m["f1Macro"] == pytest.approx(f1_score(y, logits.argmax(1), average="macro"), abs=1e-12)
    pred, truth = rng.normal(size=10_000), rng.normal(size=10_000)
    r = evaluate.RegressionTally()
    for i in range(0, 10_000, 4_096):
        r.add(pred[i : i + 4_096], truth[i : i + 4_096])
    assert r.metrics()["mae"] == pytest.approx(mean_absolute_error(truth, pred))
    assert r.metrics()["rmse"] == pytest.approx(float(np.sqrt(np.mean((pred - truth) ** 2))))
    assert r.predictions.rows == 10_000
