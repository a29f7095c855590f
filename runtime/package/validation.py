"""Data validation against the pipeline's data contract, before any training.

Every violation is reported (column, rule, count, a few example values, what the contract asks), not
just the first. The check runs per batch (``check_batch``, pure pandas) and the partial results merge
(``merge``), so Ray Data can validate a large dataset in parallel (``validate_dataset``) and a unit test
can validate a DataFrame directly (``validate_frame``).

Contract semantics:
- a contract column missing from the data is a violation (``missing``); data columns the contract does
  not name are not checked;
- ``type``: float (any number), int (whole numbers), bool (true/false or 0/1), string, image (an array
  of numbers; ``min``/``max`` then apply to its pixels);
- ``nullable: false`` allows no null; ``nullable: true`` with ``maxNullFraction > 0`` caps the fraction;
- ``min``/``max`` are inclusive; ``allowedValues`` are compared as text (``3`` matches ``"3"``);
- ``minRows`` counts all rows; the label must be present and non-null, within ``label.allowedValues``,
  and (classification) every class must make up at least ``label.minClassFraction`` of the rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conveyor.runtime.package.features import category_key, is_null
from conveyor.runtime.spec import ColumnContract, DataContract, DataSpec

MAX_EXAMPLES = 5


class DataValidationError(Exception):
    """The data broke its contract; ``report`` holds every violation and the message shows them all."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.format())


@dataclass
class Violation:
    column: str
    rule: str
    count: int
    expected: str
    examples: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "rule": self.rule,
            "count": self.count,
            "expected": self.expected,
            "examples": [_jsonable(v) for v in self.examples],
        }


@dataclass
class ValidationReport:
    source: str
    rows: int
    violations: list[Violation]
    label_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "ok": self.ok,
            "labelCounts": self.label_counts,
            "violations": [v.to_json() for v in self.violations],
        }

    def format(self) -> str:
        if self.ok:
            return f"data validation passed: {self.rows} rows of {self.source}"
        head = ["column", "rule", "count", "expected", "examples"]
        body = [
            [v.column, v.rule, str(v.count), v.expected, ", ".join(repr(_jsonable(e)) for e in v.examples)]
            for v in self.violations
        ]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = [
            f"data validation failed: {len(self.violations)} violation(s) in {self.rows} rows of {self.source}",
            "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
        ]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
        return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)}"
    return v


# ---------------------------------------------------------------- per-batch checks (mergeable)


def _add(
    partial: dict[str, Any], column: str, rule: str, expected: str, bad: Iterable[Any], count: int
) -> None:
    if count <= 0:
        return
    key = f"{column}\x00{rule}"
    entry = partial["violations"].setdefault(
        key, {"column": column, "rule": rule, "expected": expected, "count": 0, "examples": []}
    )
    entry["count"] += count
    for v in bad:
        if len(entry["examples"]) >= MAX_EXAMPLES:
            break
        entry["examples"].append(_jsonable(v))


def _nulls(values: np.ndarray) -> np.ndarray:
    """Null mask; vectorized for numeric arrays (NaN), per value only for object arrays."""
    if values.dtype.kind in "iub":
        return np.zeros(len(values), dtype=bool)
    if values.dtype.kind == "f":
        return np.isnan(values)
    return np.array([is_null(v) for v in values], dtype=bool)


def _check_column(partial: dict[str, Any], c: ColumnContract, values: np.ndarray) -> None:
    nulls = _nulls(values)
    partial["nulls"][c.name] = partial["nulls"].get(c.name, 0) + int(nulls.sum())
    if not c.nullable:
        _add(partial, c.name, "nullable", "no nulls (nullable: false)", [None], int(nulls.sum()))
    present = values[~nulls]
    if c.type == "image":
        _check_images(partial, c, present)
        return
    if c.type == "string":
        bad = [v for v in present if not isinstance(v, str)]
        _add(partial, c.name, "type", "a string", bad, len(bad))
        texts = [v for v in present if isinstance(v, str)]
    else:
        numbers, bad = _numbers(present, c.type)
        _add(partial, c.name, "type", f"a {c.type}" if c.type != "int" else "a whole number", bad, len(bad))
        if c.min is not None:
            low = numbers[numbers < c.min]
            _add(partial, c.name, "min", f">= {c.min:g}", low, len(low))
        if c.max is not None:
            high = numbers[numbers > c.max]
            _add(partial, c.name, "max", f"<= {c.max:g}", high, len(high))
        texts = [category_key(v) for v in numbers] if c.allowed_values is not None else []
    if c.allowed_values is not None:
        allowed = set(c.allowed_values)
        bad = [v for v in texts if v not in allowed]
        _add(partial, c.name, "allowedValues", f"one of {sorted(allowed)}", bad, len(bad))


def _numbers(values: np.ndarray, ctype: str) -> tuple[np.ndarray, list[Any]]:
    """The values that are numbers of the column's type, and the ones that are not."""
    if values.dtype.kind in "iub" or (values.dtype.kind == "f" and ctype == "float"):
        nums = values.astype(np.float64)
        if ctype == "bool":
            bad_mask = ~np.isin(nums, (0.0, 1.0))
            return nums[~bad_mask], list(values[bad_mask])
        return nums, []
    good, bad = [], []
    for v in values:
        if isinstance(v, bool | np.bool_):
            (good if ctype in ("bool", "int", "float") else bad).append(float(v))
            continue
        if isinstance(v, int | float | np.integer | np.floating) and math.isfinite(float(v)):
            f = float(v)
            if (ctype == "int" and not f.is_integer()) or (ctype == "bool" and f not in (0.0, 1.0)):
                bad.append(v)
            else:
                good.append(f)
        else:
            bad.append(v)
    return np.asarray(good, dtype=np.float64), bad


def _check_images(partial: dict[str, Any], c: ColumnContract, values: np.ndarray) -> None:
    shapes: dict[str, int] = partial["shapes"].setdefault(c.name, {})
    bad_type, low, high = [], 0, 0
    for v in values:
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            bad_type.append(v)
            continue
        if arr.ndim < 2 or not np.isfinite(arr).all():
            bad_type.append(v)
            continue
        key = "x".join(str(d) for d in arr.shape)
        shapes[key] = shapes.get(key, 0) + 1
        if c.min is not None and (arr < c.min).any():
            low += 1
        if c.max is not None and (arr > c.max).any():
            high += 1
    _add(partial, c.name, "type", "an image (array of finite numbers, 2+ dims)", bad_type, len(bad_type))
    _add(partial, c.name, "min", f"every pixel >= {c.min:g}" if c.min is not None else "", [], low)
    _add(partial, c.name, "max", f"every pixel <= {c.max:g}" if c.max is not None else "", [], high)


def check_batch(batch: Any, data: DataSpec) -> dict[str, Any]:
    """Partial validation of one batch (a pandas DataFrame); combine partials with ``merge``."""
    contract: DataContract = data.contract
    n = len(batch)
    partial: dict[str, Any] = {"rows": n, "violations": {}, "nulls": {}, "labels": {}, "shapes": {}}
    columns = set(map(str, batch.columns))
    for c in contract.columns:
        if c.name not in columns:
            _add(partial, c.name, "missing", "a column of the data", [], max(n, 1))
            continue
        _check_column(partial, c, batch[c.name].to_numpy())
    label = data.label
    if label not in columns:
        _add(partial, label, "missing", "the label column (data.label)", [], max(n, 1))
        return partial
    values = batch[label].to_numpy()
    nulls = _nulls(values)
    _add(partial, label, "nullable", "a label on every row", [None], int(nulls.sum()))
    counts = partial["labels"]
    present = values[~nulls]
    if present.dtype.kind in "iufb":  # numbers: count the distinct values, not every row
        uniq, n = np.unique(present, return_counts=True)
        pairs = zip(uniq.tolist(), n.tolist(), strict=True)
    else:
        pairs = ((v, 1) for v in present)
    for v, k in pairs:
        key = category_key(v) if not isinstance(v, np.ndarray) else repr(v)
        counts[key] = counts.get(key, 0) + k
    return partial


def merge(partials: Iterable[Mapping[str, Any]], data: DataSpec, source: str) -> ValidationReport:
    """Combine batch partials and apply the whole-dataset rules (rows, null fraction, class balance)."""
    contract = data.contract
    rows = 0
    merged: dict[str, dict[str, Any]] = {}
    nulls: dict[str, int] = {}
    labels: dict[str, int] = {}
    shapes: dict[str, dict[str, int]] = {}
    for p in partials:
        rows += p["rows"]
        for key, v in p["violations"].items():
            entry = merged.setdefault(key, {**v, "count": 0, "examples": []})
            entry["count"] += v["count"]
            for ex in v["examples"]:
                if len(entry["examples"]) < MAX_EXAMPLES and ex not in entry["examples"]:
                    entry["examples"].append(ex)
        for k, v in p["nulls"].items():
            nulls[k] = nulls.get(k, 0) + v
        for k, v in p["labels"].items():
            labels[k] = labels.get(k, 0) + v
        for col, s in p.get("shapes", {}).items():
            for k, v in s.items():
                shapes.setdefault(col, {})[k] = shapes.setdefault(col, {}).get(k, 0) + v
    # "missing" is reported once per column, not once per batch.
    violations = []
    for entry in merged.values():
        if entry["rule"] == "missing":
            entry["count"] = rows
        violations.append(
            Violation(entry["column"], entry["rule"], entry["count"], entry["expected"], entry["examples"])
        )

    if rows < contract.min_rows:
        violations.append(Violation("*", "minRows", rows, f">= {contract.min_rows} rows"))
    for c in contract.columns:
        if (
            c.nullable
            and c.max_null_fraction > 0
            and rows
            and nulls.get(c.name, 0) / rows > c.max_null_fraction
        ):
            violations.append(
                Violation(
                    c.name,
                    "maxNullFraction",
                    nulls[c.name],
                    f"<= {c.max_null_fraction:.1%} nulls, got {nulls[c.name] / rows:.1%}",
                    [None],
                )
            )
        if c.name in shapes and len(shapes[c.name]) > 1:
            common = max(shapes[c.name], key=shapes[c.name].get)
            odd = {k: v for k, v in shapes[c.name].items() if k != common}
            violations.append(
                Violation(c.name, "shape", sum(odd.values()), f"every image {common}", sorted(odd))
            )
    label_contract = contract.label
    if label_contract is not None and labels:
        if label_contract.allowed_values is not None:
            allowed = set(label_contract.allowed_values)
            bad = {k: v for k, v in labels.items() if k not in allowed}
            if bad:
                violations.append(
                    Violation(
                        data.label,
                        "allowedValues",
                        sum(bad.values()),
                        f"one of {sorted(allowed)}",
                        sorted(bad)[:MAX_EXAMPLES],
                    )
                )
        if data.task == "classification" and label_contract.min_class_fraction > 0:
            total = sum(labels.values())
            expected = list(label_contract.allowed_values or labels)
            for cls in expected:
                frac = labels.get(cls, 0) / total
                if frac < label_contract.min_class_fraction:
                    violations.append(
                        Violation(
                            data.label,
                            "minClassFraction",
                            labels.get(cls, 0),
                            f"class {cls!r} >= {label_contract.min_class_fraction:.1%} of rows, got {frac:.2%}",
                            [cls],
                        )
                    )
    order = {
        "missing": 0,
        "type": 1,
        "nullable": 2,
        "maxNullFraction": 3,
        "min": 4,
        "max": 5,
        "allowedValues": 6,
    }
    violations.sort(key=lambda v: (v.column == "*", v.column, order.get(v.rule, 9), v.rule))
    return ValidationReport(
        source=source, rows=rows, violations=violations, label_counts=dict(sorted(labels.items()))
    )


def check_contract_config(data: DataSpec) -> None:
    """Mistakes in the contract itself (not the data): raise ValueError naming the field."""
    contract = data.contract
    if contract.label is not None and contract.label.name != data.label:
        raise ValueError(
            f"data.contract.label.name {contract.label.name!r} differs from data.label {data.label!r}; make them equal"
        )
    seen = set()
    for i, c in enumerate(contract.columns):
        if c.name in seen:
            raise ValueError(f"data.contract.columns[{i}].name {c.name!r} appears twice")
        seen.add(c.name)
        if c.name == data.label:
            raise ValueError(
                f"data.contract.columns[{i}] is the label {c.name!r}; describe it in data.contract.label"
            )
        if c.min is not None and c.max is not None and c.min > c.max:
            raise ValueError(
                f"data.contract.columns[{i}] ({c.name}): min {c.min} is greater than max {c.max}"
            )
        if not 0.0 <= c.max_null_fraction <= 1.0:
            raise ValueError(f"data.contract.columns[{i}] ({c.name}): maxNullFraction must be within [0, 1]")


def validate_frame(
    frame: Any, data: DataSpec, *, source: str | None = None, batch_rows: int = 4096
) -> ValidationReport:
    """Validate a pandas DataFrame (in batches, the same code path Ray Data runs)."""
    check_contract_config(data)
    partials = [
        check_batch(frame.iloc[i : i + batch_rows], data) for i in range(0, max(len(frame), 1), batch_rows)
    ]
    return merge(partials, data, source or data.source.uri)


def validate_dataset(ds: Any, data: DataSpec, *, source: str | None = None) -> ValidationReport:
    """Validate a Ray Dataset as one aggregation over the stream: Ray Data checks the batches in parallel
    (``check_batch``: each batch becomes one small partial) and the partials are folded here as they
    arrive (``merge`` consumes an iterator), so the caller holds one running report, never the rows: its
    memory depends on the contract and the examples kept, not on the number of rows."""
    import json

    import pandas as pd

    check_contract_config(data)

    def check(batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"partial": [json.dumps(check_batch(batch, data), default=_jsonable)]})

    def partials() -> Iterable[dict[str, Any]]:
        stream = ds.map_batches(check, batch_format="pandas", batch_size=16384)
        for batch in stream.iter_batches(batch_format="pandas", batch_size=None):
            for text in batch["partial"]:
                yield json.loads(text)

    return merge(partials(), data, source or data.source.uri)
