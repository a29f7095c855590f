"""Cross-fitted trees (runtime/training/trees.py): the fold boosters merge into one booster that predicts
their average log-odds, loads through the package's BoosterModel as serving loads it, and the folds deal
every class evenly. No Ray: xgboost on a small generated table (~2 s)."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost

from conveyor.runtime.package.booster import BoosterModel
from conveyor.runtime.training.trees import average_boosters, stratified_folds


def _boosters(k: int) -> tuple[list[xgboost.Booster], np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=600) > 1.2).astype(np.int64)
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "base_score": float(y.mean())}
    fold = stratified_folds(y, k, seed=1)
    # Folds stop at different rounds, as early stopping leaves them.
    boosters = [
        xgboost.train(params, xgboost.DMatrix(x[fold != f], label=y[fold != f]), num_boost_round=5 + 3 * f)
        for f in range(k)
    ]
    return boosters, x


def test_merged_booster_predicts_the_folds_average_log_odds_through_the_package_loader() -> None:
    boosters, x = _boosters(3)
    merged = average_boosters(boosters)
    expected = np.mean([b.predict(xgboost.DMatrix(x), output_margin=True) for b in boosters], axis=0)
    got = merged.predict(xgboost.DMatrix(x), output_margin=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert merged.num_boosted_rounds() == sum(b.num_boosted_rounds() for b in boosters)
    # What the package holds (model.ubj) and serving loads: probabilities of the averaged log-odds.
    model = BoosterModel.from_bytes(
        bytes(merged.save_raw(raw_format="ubj")), task="classification", classes=2
    )
    p = model.predict(x)
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-expected)), atol=1e-5)
    assert not np.allclose(got, boosters[0].predict(xgboost.DMatrix(x), output_margin=True), atol=1e-3)


def test_boosters_with_different_intercepts_are_refused() -> None:
    x = np.random.default_rng(1).normal(size=(100, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    a = xgboost.train({"objective": "binary:logistic", "base_score": 0.3}, xgboost.DMatrix(x, label=y), 2)
    b = xgboost.train({"objective": "binary:logistic", "base_score": 0.6}, xgboost.DMatrix(x, label=y), 2)
    with pytest.raises(ValueError, match="base_score"):
        average_boosters([a, b])


def test_folds_deal_every_class_evenly_and_offsets_spread_a_rare_class() -> None:
    y = np.array([0] * 97 + [1] * 3)
    fold = stratified_folds(y, 5, seed=7)
    assert sorted(np.bincount(fold[y == 0], minlength=5).tolist()) == [19, 19, 19, 20, 20]
    assert np.bincount(fold[y == 1], minlength=5).tolist() == [1, 1, 1, 0, 0]
    # Another worker (offset 3) deals its three positives to folds 3, 4 and 0.
    assert sorted(stratified_folds(y, 5, seed=7, offset=3)[y == 1].tolist()) == [0, 3, 4]
    np.testing.assert_array_equal(fold, stratified_folds(y, 5, seed=7))  # seeded
