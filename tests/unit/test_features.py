"""Feature transforms fitted on the training split and applied identically at serving time; the profile."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conveyor.runtime.package import profile
from conveyor.runtime.package.features import (
    FeatureSchema,
    FittedTransforms,
    fit_image_transforms,
    fit_transforms,
)
from conveyor.runtime.spec import FeatureTransform

FEATURES = [
    FeatureSchema("amount", "float", nullable=True),
    FeatureSchema(
        "merchant", "string", nullable=True, allowed_values=["grocery", "travel", "online", "fuel"]
    ),
    FeatureSchema("hour", "int"),
    FeatureSchema("foreign", "bool"),
]
TRANSFORMS = [
    FeatureTransform(type="impute", columns=["amount"], strategy="median"),
    FeatureTransform(type="clip", columns=["amount"], min=0, max=1000),
    FeatureTransform(type="standardize", columns=["amount"]),
    FeatureTransform(type="impute", columns=["merchant"], strategy="mostFrequent"),
    FeatureTransform(type="oneHot", columns=["merchant"], max_categories=2),
    FeatureTransform(type="bucketize", columns=["hour"], boundaries=[6, 12, 18]),
]


def _train() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "amount": [10.0, 20.0, None, 40.0, 5000.0, 30.0],
            "merchant": ["grocery", "grocery", "travel", None, "online", "grocery"],
            "hour": [1, 7, 13, 19, 23, 12],
            "foreign": [False, True, False, False, True, False],
        }
    )


def test_fit_uses_training_data_only_and_layout_is_named() -> None:
    train = _train()
    fitted = fit_transforms(train, FEATURES, TRANSFORMS)
    steps = {(s.type, s.column): s.params for s in fitted.steps}
    # Imputed with the TRAIN median (of 10, 20, 30, 40, 5000), clipped, then standardized on those values.
    assert steps[("impute", "amount")]["value"] == 30.0
    expected = np.clip(np.array([10, 20, 30, 40, 5000, 30], dtype=float), 0, 1000)
    assert steps[("standardize", "amount")]["mean"] == pytest.approx(expected.mean())
    assert steps[("standardize", "amount")]["std"] == pytest.approx(expected.std())
    # maxCategories keeps the two most frequent; the rest share the "other" column.
    assert steps[("oneHot", "merchant")]["categories"] == ["grocery", "online"] or steps[
        ("oneHot", "merchant")
    ]["categories"] == ["grocery", "travel"]
    assert fitted.output_columns == [
        "amount",
        *[f"merchant={c}" for c in steps[("oneHot", "merchant")]["categories"]],
        "merchant=__other__",
        "hour[<6]",
        "hour[6,12)",
        "hour[12,18)",
        "hour[>=18]",
        "foreign",
    ]

    # Fitting on a different split gives different parameters: nothing leaks from data it did not see.
    other = fit_transforms(train.iloc[:3], FEATURES, TRANSFORMS)
    assert {(s.type, s.column): s.params for s in other.steps}[("standardize", "amount")] != steps[
        ("standardize", "amount")
    ]


def test_apply_matches_the_declared_semantics() -> None:
    fitted = fit_transforms(_train(), FEATURES, TRANSFORMS)
    std = {(s.type, s.column): s.params for s in fitted.steps}[("standardize", "amount")]
    out = fitted.apply(
        [
            {"amount": 2000.0, "merchant": "grocery", "hour": 6, "foreign": True},
            {"amount": None, "merchant": "fuel", "hour": 0, "foreign": False},
        ]
    )
    assert out.dtype == np.float32 and out.shape == (2, len(fitted.output_columns))
    cols = fitted.output_columns
    row0 = dict(zip(cols, out[0], strict=True))
    row1 = dict(zip(cols, out[1], strict=True))
    assert row0["amount"] == pytest.approx((1000 - std["mean"]) / std["std"], rel=1e-5)  # clipped at 1000
    assert row1["amount"] == pytest.approx((30 - std["mean"]) / std["std"], rel=1e-5)  # imputed with 30
    assert row0["merchant=grocery"] == 1 and row0["merchant=__other__"] == 0
    assert row1["merchant=__other__"] == 1  # an allowed value unseen in training
    assert row0["hour[6,12)"] == 1 and row1["hour[<6]"] == 1  # boundary goes to the upper bucket
    assert row0["foreign"] == 1 and row1["foreign"] == 0


def test_round_trip_through_json_gives_identical_outputs() -> None:
    fitted = fit_transforms(_train(), FEATURES, TRANSFORMS)
    restored = FittedTransforms.from_json(json.loads(json.dumps(fitted.to_json())))
    batch = _train()
    assert np.array_equal(fitted.apply(batch), restored.apply(batch))
    assert restored.to_json() == fitted.to_json()
    assert fitted.to_json()["outputColumns"] == fitted.output_columns


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"merchant": "grocery", "hour": 1, "foreign": False}, r"\['amount'\] missing"),
        (
            {"amount": 1.0, "merchant": "grocery", "hour": 1, "foreign": False, "tip": 3},
            r"unknown feature\(s\) \['tip'\]",
        ),
        (
            {"amount": "lots", "merchant": "grocery", "hour": 1, "foreign": False},
            "'amount' expects a float.*'lots'",
        ),
        ({"amount": 1.0, "merchant": "casino", "hour": 1, "foreign": False}, "'merchant' allows.*'casino'"),
        ({"amount": 1.0, "merchant": 3.5, "hour": 1, "foreign": False}, "'merchant' expects a string"),
        ({"amount": 1.0, "merchant": "grocery", "hour": None, "foreign": False}, "'hour' is not nullable"),
        ({"amount": 1.0, "merchant": "grocery", "hour": 1, "foreign": 2}, "'foreign' expects true/false"),
    ],
    ids=["missing", "unknown", "not-a-number", "not-allowed", "wrong-type", "null", "bad-bool"],
)
def test_bad_requests_name_the_feature(row: dict, message: str) -> None:
    fitted = fit_transforms(_train(), FEATURES, TRANSFORMS)
    with pytest.raises(ValueError, match=message):
        fitted.apply([row])


@pytest.mark.parametrize(
    ("features", "transforms", "message"),
    [
        ([FeatureSchema("merchant", "string")], [], "'merchant' is a string column: add a oneHot"),
        ([FeatureSchema("amount", "float", nullable=True)], [], "'amount' has 1 null.*add an impute"),
        (
            [FeatureSchema("merchant", "string", nullable=True)],
            [{"type": "standardize", "columns": ["merchant"]}],
            r"transforms\[0\] \(standardize\): column 'merchant' is a string",
        ),
        (
            [FeatureSchema("hour", "int")],
            [{"type": "oneHot", "columns": ["nope"]}],
            "column 'nope' is not an input",
        ),
        (
            [FeatureSchema("hour", "int")],
            [{"type": "bucketize", "columns": ["hour"], "boundaries": [5, 3]}],
            "strictly increasing",
        ),
        (
            [FeatureSchema("amount", "float", nullable=True)],
            [{"type": "impute", "columns": ["amount"], "strategy": "constant"}],
            "constant needs a value",
        ),
    ],
    ids=[
        "string-needs-onehot",
        "nulls-need-impute",
        "numeric-transform-on-text",
        "unknown-column",
        "bad-boundaries",
        "constant-without-value",
    ],
)
def test_transforms_that_cannot_work_fail_at_fit_time(features, transforms, message: str) -> None:
    data = _train()[[f.name for f in features]]
    with pytest.raises(ValueError, match=message):
        fit_transforms(data, features, transforms)


def test_image_transforms_normalize_per_channel_from_training_images() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 17, size=(50, 1, 8, 8)).astype(np.float32)
    fitted = fit_image_transforms(train, scale=16.0)
    out = fitted.apply(train)
    assert out.shape == (50, 1, 8, 8)
    assert abs(float(out.mean())) < 1e-4 and float(out.std()) == pytest.approx(1.0, rel=1e-3)
    restored = FittedTransforms.from_json(json.loads(json.dumps(fitted.to_json())))
    flat = train[:3].reshape(3, 64).tolist()
    assert np.allclose(restored.apply([{"image": row} for row in flat]), out[:3], atol=1e-6)
    assert np.allclose(restored.apply(train[:3, 0]), out[:3], atol=1e-6)  # [B, H, W] for one channel
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 8, 8\].*got \[2, 1, 9, 9\]"):
        restored.apply(np.zeros((2, 1, 9, 9)))


# ---------------------------------------------------------------- profile (drift reference)


def test_numeric_profile_bins_and_psi() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, 5000)
    entry = profile.numeric_profile(train)
    assert len(entry["binEdges"]) == 11 and sum(entry["binFractions"]) == pytest.approx(1.0)
    assert all(f == pytest.approx(0.1, abs=0.01) for f in entry["binFractions"])
    assert entry["quantiles"]["0.5"] == pytest.approx(0.0, abs=0.1)
    same = profile.feature_psi(entry, rng.normal(0, 1, 2000))
    shifted = profile.feature_psi(entry, rng.normal(1.5, 1, 2000))
    assert same < 0.05 < 0.5 < shifted
    # Values outside the training range land in the open outer bins, not nowhere.
    assert profile.bin_fractions(entry, [-100.0, 100.0]) == [0.5] + [0.0] * 8 + [0.5]


def test_categorical_profile_and_class_balance() -> None:
    entry = profile.categorical_profile(["a", "a", "b", None])
    assert entry["frequencies"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    assert entry["nullFraction"] == 0.25
    assert profile.feature_psi(entry, ["a", "a", "b"]) < 0.01
    assert profile.feature_psi(entry, ["c", "c", "c"]) > 1.0
    assert profile.class_balance(np.array([0, 0, 0, 1])) == {"0": 0.75, "1": 0.25}


def test_tabular_profile_has_every_feature() -> None:
    train = _train()
    types = {f.name: f.type for f in FEATURES}
    prof = profile.tabular_profile(
        {c: train[c].to_numpy() for c in train.columns}, types, labels=[0, 1, 0, 0, 1, 0]
    )
    assert prof["rows"] == 6
    assert prof["features"]["amount"]["kind"] == "numeric"
    assert prof["features"]["amount"]["nullFraction"] == pytest.approx(1 / 6)
    assert prof["features"]["merchant"]["kind"] == "categorical"
    assert prof["features"]["foreign"]["frequencies"] == {
        "false": pytest.approx(4 / 6),
        "true": pytest.approx(2 / 6),
    }
    assert prof["classBalance"] == {"0": pytest.approx(4 / 6), "1": pytest.approx(2 / 6)}
    json.dumps(prof, allow_nan=False)  # a valid JSON document, no NaN


def test_pandas_missing_values_count_as_null() -> None:
    frame = _train().astype({"hour": "Int64", "merchant": "string", "amount": "Float64"})
    assert frame["merchant"].isna().sum() == 1 and frame.loc[3, "merchant"] is pd.NA
    fitted = fit_transforms(frame, FEATURES, TRANSFORMS)
    assert np.array_equal(fitted.apply(frame), fit_transforms(_train(), FEATURES, TRANSFORMS).apply(_train()))
    row = {"amount": pd.NA, "merchant": "grocery", "hour": 3, "foreign": False}
    assert fitted.apply([row]).shape == (1, len(fitted.output_columns))  # amount imputed
    with pytest.raises(ValueError, match="'hour' is not nullable"):
        fitted.apply([{**row, "hour": pd.NA}])
    assert profile.categorical_profile(["a", pd.NA, None])["nullFraction"] == pytest.approx(2 / 3)
