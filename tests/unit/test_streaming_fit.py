"""The streaming data path's pieces, without Ray: the hash split, the mergeable column summaries, and the
streamed fit of the transforms and the profile, against the in-memory fit on the same rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conveyor.runtime.package import profile
from conveyor.runtime.package.features import FeatureSchema, fit_transforms
from conveyor.runtime.package.summary import SAMPLE_SIZE, ColumnSummary
from conveyor.runtime.training import streaming
from conveyor.runtime.training.data import fraud_frame
from conveyor.runtime.training.samples import FRAUD_TRANSFORMS

RULE = streaming.SplitRule(seed=42, test_fraction=0.2, validation_fraction=0.15)
FEATURES = [
    FeatureSchema("amount", "float"),
    FeatureSchema("merchant", "string"),
    FeatureSchema("hour", "int"),
    FeatureSchema("foreign", "bool"),
    FeatureSchema("card_age_days", "int"),
    FeatureSchema("distance_km", "float", nullable=True),
    FeatureSchema("txn_last_hour", "int"),
]


def _chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


def _streamed(frame: pd.DataFrame, plan: streaming.Plan, size: int) -> dict:
    """What ``streaming.summarize`` folds from Ray Data's batches, with pandas chunks as the batches."""
    acc = None
    for chunk in _chunks(frame, size):
        acc = streaming._merge(acc, streaming.summarize_batch(chunk, plan))
    return acc


def _plan(cutoff: float = 1.0) -> streaming.Plan:
    return streaming.Plan(RULE, FEATURES, "label", True, cutoff)


def test_split_is_a_function_of_the_row_alone() -> None:
    frame = fraud_frame(rows=6000, seed=3)
    whole, _ = RULE.codes_and_priority(frame)
    # Cut into batches another way, shuffled: every row keeps its split.
    shuffled = frame.sample(frac=1.0, random_state=1)
    parts = np.concatenate([RULE.codes_and_priority(c)[0] for c in _chunks(shuffled, 777)])
    assert np.array_equal(pd.Series(parts, index=shuffled.index).sort_index().to_numpy(), whole)
    shares = np.bincount(whole, minlength=3) / len(frame)
    assert shares[streaming.TEST] == pytest.approx(0.2, abs=0.02)
    assert shares[streaming.VALIDATION] == pytest.approx(0.8 * 0.15, abs=0.02)
    # A copy of a row goes where the row goes; another seed makes another split.
    twice = pd.concat([frame.iloc[:50], frame.iloc[:50]], ignore_index=True)
    codes, _ = RULE.codes_and_priority(twice)
    assert np.array_equal(codes[:50], codes[50:])
    other, _ = streaming.SplitRule(7, 0.2, 0.15).codes_and_priority(frame)
    assert (other != whole).mean() > 0.2


def test_summaries_merge_to_exact_moments_whatever_the_batches() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(3, 1, 20_000)
    values[rng.random(len(values)) < 0.05] = np.nan
    prio = rng.random(len(values))
    present = values[~np.isnan(values)]

    def build(size: int) -> ColumnSummary:
        acc = ColumnSummary(False, sample_size=5000)
        for i in range(0, len(values), size):
            acc.merge(ColumnSummary(False, sample_size=5000).add(values[i : i + size], prio[i : i + size]))
        return acc

    a, b = build(333), build(4096)
    for s in (a, b):
        assert s.rows == len(values) and s.n_present == len(present)
        assert s.mean() == pytest.approx(present.mean(), rel=1e-12)
        assert s.std() == pytest.approx(present.std(), rel=1e-9)
        assert (s.min(), s.max()) == (present.min(), present.max())
    # The same bottom-k sample, however the rows were batched: a uniform sample of the present values.
    assert np.array_equal(np.sort(a.sample), np.sort(b.sample)) and len(a.sample) == 5000
    assert abs(a.quantile(0.5) - np.quantile(present, 0.5)) < 0.05 * np.quantile(present, 0.5)


def test_streamed_fit_equals_the_in_memory_fit_on_the_same_rows() -> None:
    # Under SAMPLE_SIZE rows, every streamed statistic is exact: the same package artifacts.
    frame = fraud_frame(rows=5000, seed=5)
    plan = _plan()
    first = _streamed(frame, plan, 700)
    codes, _ = RULE.codes_and_priority(frame)
    train = frame[codes == streaming.TRAIN]
    assert first["rows"] == len(train) and list(first["split"]) == list(np.bincount(codes, minlength=3))

    fitted = streaming.fit_transforms_streamed(lambda p: _streamed(frame, p, 900), plan, first, FRAUD_TRANSFORMS)
    expected = fit_transforms(train[[f.name for f in FEATURES]], FEATURES, FRAUD_TRANSFORMS)
    got, want = fitted.to_json(), expected.to_json()
    assert got["outputColumns"] == want["outputColumns"]
    for g, w in zip(got["steps"], want["steps"], strict=True):
        assert g.keys() == w.keys() and g["type"] == w["type"] and g["column"] == w["column"]
        for k, v in w.items():
            assert g[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), (w, g)

    cols = first["columns"]
    amount = profile.numeric_profile_from_summary(cols["amount"])
    exact = profile.numeric_profile(train["amount"].to_numpy())
    for k in ("binEdges", "binFractions", "count", "nullFraction"):
        assert amount[k] == pytest.approx(exact[k]), k
    assert amount["quantiles"] == pytest.approx(exact["quantiles"])
    merchant = profile.categorical_profile_from_counts(first["keys"]["merchant"], cols["merchant"].rows)
    want = profile.categorical_profile(train["merchant"].to_numpy())
    assert merchant["frequencies"] == pytest.approx(want["frequencies"])
    assert (merchant["count"], merchant["nullFraction"]) == (want["count"], want["nullFraction"])
    foreign = profile.categorical_profile_from_counts(first["keys"]["foreign"], cols["foreign"].rows)
    assert foreign["frequencies"] == pytest.approx(profile.categorical_profile(train["foreign"])["frequencies"])
    assert profile.class_balance_from_counts(first["labels"]) == pytest.approx(profile.class_balance(train["label"]))


def test_past_the_sample_size_quantiles_stay_within_the_stated_error() -> None:
    rng = np.random.default_rng(1)
    n = 4 * SAMPLE_SIZE
    values, prio = rng.normal(size=n), rng.random(n)
    cutoff = streaming.SAMPLE_OVERSHOOT * SAMPLE_SIZE / n  # what a batch keeps for the driver
    s = ColumnSummary(False)
    for i in range(0, n, 50_000):
        s.merge(ColumnSummary(False).add(values[i : i + 50_000], prio[i : i + 50_000], cutoff))
    assert len(s.sample) == SAMPLE_SIZE and not s.exact_quantiles
    entry = profile.numeric_profile_from_summary(s)
    assert entry["count"] == n and entry["mean"] == pytest.approx(values.mean())
    ranks = np.searchsorted(np.sort(values), entry["binEdges"][1:-1]) / n
    assert np.abs(ranks - np.arange(1, 10) / 10).max() < 0.0052
    assert entry["approximate"]["sampleSize"] == SAMPLE_SIZE


def test_streamed_fit_reports_what_cannot_work_like_the_in_memory_fit() -> None:
    frame = fraud_frame(rows=600, seed=2)
    plan = _plan()
    first = _streamed(frame, plan, 200)
    with pytest.raises(ValueError, match="feature 'merchant' is a string column: add a oneHot"):
        streaming.fit_transforms_streamed(None, plan, first, [])
    with pytest.raises(ValueError, match="'distance_km' has .* null value.*add an impute"):
        streaming.fit_transforms_streamed(None, plan, first, [{"type": "oneHot", "columns": ["merchant"]}])
    with pytest.raises(ValueError, match=r"features.transforms\[0\] \(standardize\): column 'nope'"):
        streaming.fit_transforms_streamed(None, plan, first, [{"type": "standardize", "columns": ["nope"]}])


def test_a_regression_target_is_summarized_exactly_for_its_scale() -> None:
    frame = fraud_frame(rows=3000, seed=4).rename(columns={"label": "is_fraud", "amount": "label"})
    features = [f for f in FEATURES if f.name != "amount"]
    plan = streaming.Plan(RULE, features, "label", False, 1.0)
    first = _streamed(frame, plan, 500)
    codes, _ = RULE.codes_and_priority(frame)
    train = frame["label"][codes == streaming.TRAIN]
    assert "labels" not in first and first["target"].n_present == len(train)
    assert (first["target"].mean(), first["target"].std()) == (
        pytest.approx(train.mean()),
        pytest.approx(train.std(ddof=0)),
    )
