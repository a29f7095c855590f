"""Data contract validation: every violation reported as the user needs it to fix the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conveyor.runtime.package.validation import DataValidationError, ValidationReport, validate_frame
from conveyor.runtime.spec import DataSpec


def _spec(
    columns: list[dict], *, min_rows: int = 1, label: dict | None = None, task: str = "classification"
) -> DataSpec:
    contract: dict = {"minRows": min_rows, "columns": columns}
    if label is not None:
        contract["label"] = label
    return DataSpec.model_validate(
        {"source": {"uri": "file:///data/tx.parquet"}, "label": "label", "task": task, "contract": contract}
    )


def _clean(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "amount": np.linspace(1.0, 99.0, n),
            "merchant": ["grocery", "travel"] * (n // 2),
            "hour": np.arange(n) % 24,
            "foreign": [False, True, False, False] * (n // 4),
            "label": [0, 1] * (n // 2),
        }
    )


CONTRACT = [
    {"name": "amount", "type": "float", "min": 0, "max": 100},
    {"name": "merchant", "type": "string", "allowedValues": ["grocery", "travel", "fuel"]},
    {"name": "hour", "type": "int", "min": 0, "max": 23},
    {"name": "foreign", "type": "bool"},
]


def test_clean_data_passes() -> None:
    report = validate_frame(_clean(), _spec(CONTRACT, min_rows=40, label={"minClassFraction": 0.4}))
    assert report.ok, report.format()
    assert report.rows == 40 and report.label_counts == {"0": 20, "1": 20}


def _break(df: pd.DataFrame, column: str, rows: list[int], value) -> pd.DataFrame:
    df = df.copy()
    if df[column].dtype != object:
        df[column] = df[column].astype(object)
    for r in rows:
        df.at[r, column] = value
    return df


# Each case: what is wrong with the data -> the one violation the user must see (column, rule, count,
# an example value, and what the contract asks for).
CASES = [
    (
        "negative amounts",
        lambda d: _break(d, "amount", [3, 7, 9], -5.0),
        {},
        ("amount", "min", 3, -5.0, ">= 0"),
    ),
    ("amount too large", lambda d: _break(d, "amount", [1], 1e6), {}, ("amount", "max", 1, 1e6, "<= 100")),
    (
        "text in a number column",
        lambda d: _break(d, "amount", [2, 4], "n/a"),
        {},
        ("amount", "type", 2, "n/a", "a float"),
    ),
    (
        "fractional hour",
        lambda d: _break(d, "hour", [5], 2.5),
        {},
        ("hour", "type", 1, 2.5, "a whole number"),
    ),
    ("hour out of range", lambda d: _break(d, "hour", [0, 1], 24), {}, ("hour", "max", 2, 24.0, "<= 23")),
    (
        "unknown merchant",
        lambda d: _break(d, "merchant", [6, 8], "casino"),
        {},
        ("merchant", "allowedValues", 2, "casino", "one of ['fuel', 'grocery', 'travel']"),
    ),
    (
        "number as merchant",
        lambda d: _break(d, "merchant", [6], 7.5),
        {},
        ("merchant", "type", 1, 7.5, "a string"),
    ),
    (
        "null in a required column",
        lambda d: _break(d, "hour", [10, 11], None),
        {},
        ("hour", "nullable", 2, None, "no nulls"),
    ),
    ("not a boolean", lambda d: _break(d, "foreign", [0], 3), {}, ("foreign", "type", 1, 3, "a bool")),
    (
        "column missing",
        lambda d: d.drop(columns=["hour"]),
        {},
        ("hour", "missing", 40, None, "a column of the data"),
    ),
    (
        "label missing",
        lambda d: d.drop(columns=["label"]),
        {},
        ("label", "missing", 40, None, "the label column"),
    ),
    (
        "unlabelled rows",
        lambda d: _break(d, "label", [0, 2, 4], None),
        {},
        ("label", "nullable", 3, None, "a label on every row"),
    ),
    ("too few rows", lambda d: d.iloc[:10], {"min_rows": 20}, ("*", "minRows", 10, None, ">= 20 rows")),
    (
        "rare class",
        lambda d: d.assign(label=[1] + [0] * 39),
        {"label": {"minClassFraction": 0.1}},
        ("label", "minClassFraction", 1, "1", "class '1' >= 10.0% of rows, got 2.50%"),
    ),
    (
        "unexpected label",
        lambda d: _break(d, "label", [5], 9),
        {"label": {"allowedValues": ["0", "1"]}},
        ("label", "allowedValues", 1, "9", "one of ['0', '1']"),
    ),
]


@pytest.mark.parametrize(("what", "damage", "spec_kw", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_violation_is_reported_for_the_user(what, damage, spec_kw, expected) -> None:
    column, rule, count, example, asks = expected
    report = validate_frame(damage(_clean()), _spec(CONTRACT, **spec_kw), batch_rows=16)
    assert not report.ok
    assert [(v.column, v.rule) for v in report.violations] == [(column, rule)], report.format()
    v = report.violations[0]
    assert v.count == count
    assert asks in v.expected
    if example is not None:
        assert example in v.examples
    # The message the run fails with names all of it.
    text = str(DataValidationError(report))
    assert column in text and rule in text and str(count) in text and "tx.parquet" in text


def test_all_violations_are_reported_at_once() -> None:
    df = _clean()
    df = _break(df, "amount", [1, 2], -1.0)
    df = _break(df, "merchant", [3], "casino")
    df = df.drop(columns=["foreign"])
    report = validate_frame(df, _spec(CONTRACT, min_rows=100), batch_rows=7)
    assert {(v.column, v.rule) for v in report.violations} == {
        ("amount", "min"),
        ("merchant", "allowedValues"),
        ("foreign", "missing"),
        ("*", "minRows"),
    }
    lines = report.format().splitlines()
    assert lines[0] == "data validation failed: 4 violation(s) in 40 rows of file:///data/tx.parquet"
    assert lines[1].split() == ["column", "rule", "count", "expected", "examples"]
    assert report.to_json()["violations"][0]["column"] == "amount"


def test_counts_and_examples_add_up_across_batches() -> None:
    df = _break(_clean(400), "amount", list(range(0, 400, 4)), -2.0)
    for batch_rows in (1, 33, 1000):
        report = validate_frame(df, _spec(CONTRACT), batch_rows=batch_rows)
        (v,) = report.violations
        assert (v.column, v.rule, v.count) == ("amount", "min", 100)
        assert 1 <= len(v.examples) <= 5


def test_null_fraction_cap_on_nullable_column() -> None:
    cols = [{"name": "amount", "type": "float", "nullable": True, "maxNullFraction": 0.05}]
    few = _break(_clean(), "amount", [0], None)  # 2.5%
    many = _break(_clean(), "amount", [0, 1, 2, 3], None)  # 10%
    assert validate_frame(few, _spec(cols)).ok
    (v,) = validate_frame(many, _spec(cols)).violations
    assert (v.column, v.rule, v.count) == ("amount", "maxNullFraction", 4)
    assert "got 10.0%" in v.expected


def test_image_columns_check_shape_and_pixel_range() -> None:
    images = [np.zeros((1, 8, 8)) for _ in range(10)]
    images[3] = np.full((1, 8, 8), 20.0)
    images[4] = np.zeros((1, 9, 9))
    df = pd.DataFrame({"image": images, "label": [0, 1] * 5})
    report = validate_frame(df, _spec([{"name": "image", "type": "image", "min": 0, "max": 16}]))
    assert {(v.column, v.rule, v.count) for v in report.violations} == {
        ("image", "max", 1),
        ("image", "shape", 1),
    }


def test_contract_mistakes_name_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"contract.columns\[0\] \(amount\): min 5.0 is greater than max 1.0"
    ):
        validate_frame(_clean(), _spec([{"name": "amount", "min": 5, "max": 1}]))
    with pytest.raises(ValueError, match=r"contract.label.name 'y' differs from data.label 'label'"):
        validate_frame(_clean(), _spec([], label={"name": "y"}))
    with pytest.raises(ValueError, match=r"columns\[1\].name 'amount' appears twice"):
        validate_frame(_clean(), _spec([{"name": "amount"}, {"name": "amount"}]))


def test_report_round_trips_to_json() -> None:
    report = validate_frame(_break(_clean(), "amount", [0], -1.0), _spec(CONTRACT))
    doc = report.to_json()
    assert doc["ok"] is False and doc["rows"] == 40
    assert doc["violations"] == [
        {"column": "amount", "rule": "min", "count": 1, "expected": ">= 0", "examples": [-1.0]}
    ]
    assert isinstance(report, ValidationReport)
