"""Feature transforms: declared in the pipeline, fitted on the training split, shipped with the model.

Serving applies exactly the transforms that training fitted (``transforms.json`` in the model package),
so there is no training/serving skew. This module needs numpy only (no pandas, torch or ray): the
operator and the predictor import it.

Tabular semantics, in the order the pipeline declares them (each declared transform is expanded into
one step per column, fitted on the output of the steps before it):

- ``impute``: replace nulls; ``mean``/``median`` (numeric), ``mostFrequent`` (any), ``constant`` (``value``).
- ``standardize``: ``(x - mean) / std`` (std 0 -> 1).
- ``minMax``: ``(x - min) / (max - min)`` (range 0 -> 1).
- ``clip``: clip to ``[min, max]``; a bound left out is fitted as the 1st / 99th percentile.
- ``oneHot``: one output column per training category (most frequent first, at most ``maxCategories``)
  plus ``<col>=__other__`` for anything else, so an unseen category at serving time is not an error.
- ``bucketize``: one-hot over the buckets cut by ``boundaries`` (fitted as quintiles when left out).

A feature that is still a string after its steps, or still null, is an error naming the feature.
The output is float32 ``[B, F]`` in the order of ``output_columns``.

Image semantics: raw pixels divided by ``scale`` then normalized per channel with ``mean``/``std``;
output float32 ``[B, C, H, W]``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
OTHER = "__other__"
FEATURE_TYPES = ("float", "int", "string", "bool")
NUMERIC_TYPES = ("float", "int", "bool")


# ---------------------------------------------------------------- input schema


@dataclass
class FeatureSchema:
    """One input feature a client must send (an entry of ``schema.json``'s ``features``)."""

    name: str
    type: str = "float"
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    allowed_values: list[str] | None = None

    def __post_init__(self) -> None:
        if self.type not in FEATURE_TYPES:
            raise ValueError(f"feature {self.name!r}: type must be one of {FEATURE_TYPES}, got {self.type!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "nullable": self.nullable}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.allowed_values is not None:
            out["allowedValues"] = list(self.allowed_values)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FeatureSchema:
        return cls(
            name=d["name"],
            type=d.get("type", "float"),
            nullable=bool(d.get("nullable", False)),
            min=d.get("min"),
            max=d.get("max"),
            allowed_values=d.get("allowedValues"),
        )


# ---------------------------------------------------------------- value handling


def is_null(v: Any) -> bool:
    """None, NaN, and pandas' NA/NaT (recognized by type name: this module does not import pandas)."""
    if v is None:
        return True
    if isinstance(v, float | np.floating):
        return math.isnan(v)
    return type(v).__name__ in ("NAType", "NaTType")


def _count(bad: Sequence[Any]) -> str:
    return "1 value is" if len(bad) == 1 else f"{len(bad)} values are"


def _examples(values: Iterable[Any], limit: int = 3) -> str:
    out = []
    for v in values:
        if len(out) >= limit:
            break
        out.append(repr(v.item() if isinstance(v, np.generic) else v))
    return ", ".join(out)


def _numeric_column(values: np.ndarray, feat: FeatureSchema) -> np.ndarray:
    """Numbers as float64 with NaN for null; a value that is not a number is a ValueError."""
    if values.dtype.kind in "fiub":
        return values.astype(np.float64)
    out = np.empty(len(values), dtype=np.float64)
    bad = []
    for i, v in enumerate(values):
        if is_null(v):
            out[i] = np.nan
        elif isinstance(v, bool | np.bool_):
            if feat.type != "bool":
                bad.append(v)
            out[i] = float(v)
        elif isinstance(v, int | float | np.integer | np.floating):
            out[i] = float(v)
        elif isinstance(v, str):
            try:
                out[i] = float(v)
            except ValueError:
                bad.append(v)
                out[i] = np.nan
        else:
            bad.append(v)
            out[i] = np.nan
    if bad:
        raise ValueError(
            f"feature {feat.name!r} expects a {feat.type} value; {_count(bad)} not: {_examples(bad)}"
        )
    if feat.type == "bool":
        ok = np.isnan(out) | (out == 0.0) | (out == 1.0)
        if not ok.all():
            raise ValueError(f"feature {feat.name!r} expects true/false, got {_examples(out[~ok])}")
    return out


def _string_column(values: np.ndarray, feat: FeatureSchema) -> np.ndarray:
    """Strings as an object array with None for null; numbers are accepted and turned into text."""
    out = np.empty(len(values), dtype=object)
    bad = []
    for i, v in enumerate(values):
        if is_null(v):
            out[i] = None
        elif isinstance(v, str):
            out[i] = v
        elif isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_):
            out[i] = str(int(v))
        else:
            bad.append(v)
    if bad:
        raise ValueError(
            f"feature {feat.name!r} expects a string; {_count(bad)} not: {_examples(bad)}"
        )
    return out


def category_key(v: Any) -> str:
    """The text a category value is known by (numbers one-hot encoded by their value)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    f = float(v)
    return str(int(f)) if f.is_integer() else repr(f)


def _columns_from_input(data: Any) -> tuple[dict[str, np.ndarray], int]:
    """rows (list of dicts), a pandas DataFrame, or a mapping of column -> values -> columns."""
    if hasattr(data, "columns") and hasattr(data, "__getitem__") and not isinstance(data, Mapping):
        cols = {
            str(c): np.asarray(data[c].to_numpy() if hasattr(data[c], "to_numpy") else data[c])
            for c in data.columns
        }
        n = len(data)
        return cols, n
    if isinstance(data, Mapping):
        cols = {str(k): np.asarray(list(v) if not isinstance(v, np.ndarray) else v) for k, v in data.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        return cols, (lengths.pop() if lengths else 0)
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        rows = list(data)
        names: dict[str, None] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(
                    f"row {i} must be an object mapping feature name to value, got {type(row).__name__}"
                )
            for k in row:
                names.setdefault(str(k), None)
        cols = {}
        for name in names:
            missing = [i for i, row in enumerate(rows) if name not in row]
            if missing:
                raise ValueError(f"feature {name!r} is missing from row(s) {missing[:5]}")
            arr = np.empty(len(rows), dtype=object)
            for i, row in enumerate(rows):
                arr[i] = row[name]
            cols[name] = arr
        return cols, len(rows)
    raise ValueError(
        f"expected a list of rows, a DataFrame or a mapping of columns, got {type(data).__name__}"
    )


# ---------------------------------------------------------------- fitted steps


@dataclass
class Step:
    """One fitted transform on one column (an entry of ``transforms.json``'s ``steps``)."""

    type: str
    column: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "column": self.column, **self.params}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Step:
        params = {k: v for k, v in d.items() if k not in ("type", "column")}
        return cls(type=d["type"], column=d["column"], params=params)

    def output_names(self) -> list[str]:
        if self.type == "oneHot":
            return [f"{self.column}={c}" for c in self.params["categories"]] + [f"{self.column}={OTHER}"]
        if self.type == "bucketize":
            b = self.params["boundaries"]
            if not b:
                return [f"{self.column}[all]"]
            names = [f"{self.column}[<{b[0]:g}]"]
            names += [f"{self.column}[{lo:g},{hi:g})" for lo, hi in zip(b[:-1], b[1:], strict=True)]
            names.append(f"{self.column}[>={b[-1]:g}]")
            return names
        return [self.column]


def _apply_step(step: Step, col: np.ndarray) -> np.ndarray:
    p = step.params
    if step.type == "impute":
        out = col.copy()
        if out.dtype == object:
            out[np.array([is_null(v) for v in out], dtype=bool)] = p["value"]
        else:
            out[np.isnan(out)] = float(p["value"])
        return out
    if step.type == "standardize":
        return (col - p["mean"]) / p["std"]
    if step.type == "minMax":
        return (col - p["min"]) / (p["max"] - p["min"])
    if step.type == "clip":
        return np.clip(col, p["min"], p["max"])
    if step.type == "oneHot":
        cats = p["categories"]
        index = {c: i for i, c in enumerate(cats)}
        out = np.zeros((len(col), len(cats) + 1), dtype=np.float64)
        for r, v in enumerate(col):
            if is_null(v):
                out[r, :] = np.nan
            else:
                out[r, index.get(category_key(v), len(cats))] = 1.0
        return out
    if step.type == "bucketize":
        b = np.asarray(p["boundaries"], dtype=np.float64)
        idx = np.searchsorted(b, col, side="right")
        out = np.zeros((len(col), len(b) + 1), dtype=np.float64)
        out[np.arange(len(col)), idx] = 1.0
        out[np.isnan(col)] = np.nan
        return out
    raise ValueError(f"unknown transform type {step.type!r} for column {step.column!r}")


# ---------------------------------------------------------------- the fitted pipeline


@dataclass
class FittedTransforms:
    """What serving applies to a request: input checks, fitted steps, output layout."""

    kind: str = "tabular"
    features: list[FeatureSchema] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    # image kind
    channels: int = 0
    height: int = 0
    width: int = 0
    scale: float = 1.0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    image_field: str = "image"

    # ------------------------------------------------------------ layout

    @property
    def output_columns(self) -> list[str]:
        if self.kind == "image":
            return []
        expanded: dict[str, list[str]] = {f.name: [f.name] for f in self.features}
        for s in self.steps:
            if s.type in ("oneHot", "bucketize"):
                expanded[s.column] = s.output_names()
        return [c for f in self.features for c in expanded[f.name]]

    @property
    def input_shape(self) -> list[int]:
        """The model input's shape without the batch dimension."""
        if self.kind == "image":
            return [self.channels, self.height, self.width]
        return [len(self.output_columns)]

    # ------------------------------------------------------------ apply

    def apply(self, data: Any) -> np.ndarray:
        """Transform a batch: tabular rows/DataFrame -> float32 [B, F]; images -> float32 [B, C, H, W].

        Raises ValueError naming the feature for a missing, unknown, null or badly typed value.
        """
        if self.kind == "image":
            return self.apply_images(data)
        cols, n = _columns_from_input(data)
        known = {f.name for f in self.features}
        unknown = [c for c in cols if c not in known]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; the model takes {sorted(known)}")
        missing = [f.name for f in self.features if f.name not in cols]
        if missing:
            raise ValueError(f"feature(s) {missing} missing from the input")

        values: dict[str, np.ndarray] = {}
        for f in self.features:
            raw = cols[f.name]
            col = _string_column(raw, f) if f.type == "string" else _numeric_column(raw, f)
            nulls = np.array([v is None for v in col], dtype=bool) if col.dtype == object else np.isnan(col)
            if nulls.any() and not f.nullable:
                raise ValueError(
                    f"feature {f.name!r} is not nullable but {int(nulls.sum())} value(s) are null"
                )
            if f.type == "string" and f.allowed_values is not None:
                allowed = set(f.allowed_values)
                bad = [v for v in col if v is not None and v not in allowed]
                if bad:
                    raise ValueError(
                        f"feature {f.name!r} allows {sorted(allowed)}, got {len(bad)} other value(s): {_examples(bad)}"
                    )
            values[f.name] = col

        for s in self.steps:
            values[s.column] = _apply_step(s, values[s.column])

        parts = []
        for f in self.features:
            col = values[f.name]
            if col.dtype == object:
                raise ValueError(f"feature {f.name!r} is text; it needs a oneHot transform")
            parts.append(col.reshape(n, -1))
        out = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0))
        if np.isnan(out).any():
            nan_cols = sorted({self._feature_of(c) for c in np.nonzero(np.isnan(out).any(axis=0))[0]})
            raise ValueError(f"feature(s) {nan_cols} are null and no impute transform covers them")
        return out.astype(np.float32)

    def _feature_of(self, out_index: int) -> str:
        col = self.output_columns[out_index]
        for f in self.features:
            if col == f.name or col.startswith(f.name + "=") or col.startswith(f.name + "["):
                return f.name
        return col

    def apply_images(self, data: Any) -> np.ndarray:
        """Raw pixels (0..scale) as [B, C, H, W], [B, H, W] (one channel), [B, H, W, C] or flat [B, C*H*W],
        or rows ``{"image": pixels}`` -> normalized float32 [B, C, H, W]."""
        if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
            try:
                data = [row[self.image_field] for row in data]
            except KeyError as e:
                raise ValueError(f"each row needs the field {self.image_field!r} holding the pixels") from e
        try:
            arr = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"feature {self.image_field!r}: pixels must be numbers ({e})") from e
        c, h, w = self.channels, self.height, self.width
        if arr.ndim == 2 and arr.shape[1] == c * h * w:
            arr = arr.reshape(-1, c, h, w)
        elif arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
            arr = arr[:, None]
        elif arr.ndim == 4 and arr.shape[1:] == (h, w, c) and arr.shape[1:] != (c, h, w):
            arr = arr.transpose(0, 3, 1, 2)
        if arr.ndim != 4 or arr.shape[1:] != (c, h, w):
            raise ValueError(
                f"feature {self.image_field!r}: expected images of shape [B, {c}, {h}, {w}] "
                f"(or [B, {h}, {w}, {c}] or flat [B, {c * h * w}]), got {list(arr.shape)}"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"feature {self.image_field!r}: pixels must be finite numbers")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, c, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, c, 1, 1)
        return ((arr / np.float32(self.scale) - mean) / std).astype(np.float32)

    # ------------------------------------------------------------ serialization

    def to_json(self) -> dict[str, Any]:
        if self.kind == "image":
            return {
                "formatVersion": FORMAT_VERSION,
                "kind": "image",
                "imageField": self.image_field,
                "channels": self.channels,
                "height": self.height,
                "width": self.width,
                "scale": self.scale,
                "mean": list(self.mean),
                "std": list(self.std),
                "outputShape": self.input_shape,
            }
        return {
            "formatVersion": FORMAT_VERSION,
            "kind": "tabular",
            "features": [f.to_json() for f in self.features],
            "steps": [s.to_json() for s in self.steps],
            "outputColumns": self.output_columns,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FittedTransforms:
        if d.get("formatVersion", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"transforms formatVersion {d.get('formatVersion')!r} is not supported")
        kind = d.get("kind", "tabular")
        if kind == "image":
            return cls(
                kind="image",
                channels=int(d["channels"]),
                height=int(d["height"]),
                width=int(d["width"]),
                scale=float(d.get("scale", 1.0)),
                mean=[float(x) for x in d["mean"]],
                std=[float(x) for x in d["std"]],
                image_field=d.get("imageField", "image"),
            )
        if kind != "tabular":
            raise ValueError(f"transforms kind must be 'tabular' or 'image', got {kind!r}")
        fitted = cls(
            kind="tabular",
            features=[FeatureSchema.from_json(f) for f in d["features"]],
            steps=[Step.from_json(s) for s in d.get("steps", [])],
        )
        declared = d.get("outputColumns")
        if declared is not None and declared != fitted.output_columns:
            raise ValueError("transforms outputColumns do not match the fitted steps")
        return fitted


# ---------------------------------------------------------------- fitting


def _get(t: Any, name: str, default: Any = None) -> Any:
    """Read a transform field from a spec model (snake_case) or a dict (camelCase)."""
    if isinstance(t, Mapping):
        camel = "".join(w if i == 0 else w.capitalize() for i, w in enumerate(name.split("_")))
        return t.get(camel, t.get(name, default))
    return getattr(t, name, default)


def fit_transforms(
    data: Any, features: Sequence[FeatureSchema], transforms: Sequence[Any]
) -> FittedTransforms:
    """Fit the declared transforms on the TRAINING split ``data`` (rows, DataFrame or columns).

    ``features`` are the model's inputs in order; ``transforms`` are ``spec.FeatureTransform`` models
    (or their API dicts). Raises ValueError naming the transform and column for anything that cannot work.
    """
    cols, n = _columns_from_input(data)
    if n == 0:
        raise ValueError("cannot fit transforms on an empty training split")
    by_name = {f.name: f for f in features}
    fitted = FittedTransforms(kind="tabular", features=list(features))
    values: dict[str, np.ndarray] = {}
    for f in features:
        if f.name not in cols:
            raise ValueError(f"feature {f.name!r} is not a column of the training data")
        values[f.name] = (
            _string_column(cols[f.name], f) if f.type == "string" else _numeric_column(cols[f.name], f)
        )

    for i, t in enumerate(transforms):
        ttype = _get(t, "type")
        where = f"features.transforms[{i}] ({ttype})"
        for column in _get(t, "columns", []) or []:
            if column not in by_name:
                raise ValueError(
                    f"{where}: column {column!r} is not an input feature; features are {sorted(by_name)}"
                )
            feat = by_name[column]
            col = values[column]
            step = _fit_step(ttype, column, feat, col, t, where)
            fitted.steps.append(step)
            values[column] = _apply_step(step, col)

    for f in features:
        col = values[f.name]
        if col.dtype == object:
            raise ValueError(f"feature {f.name!r} is a string column: add a oneHot transform for it")
        if np.isnan(col).any():
            raise ValueError(
                f"feature {f.name!r} has {int(np.isnan(col.reshape(n, -1)).any(axis=1).sum())} null value(s) in the "
                "training split: add an impute transform for it"
            )
    return fitted


class ArrayStats:
    """Exact statistics of one column's values (the in-memory fit): what ``fit_step`` asks of its data.

    ``runtime.package.summary.ColumnSummary`` answers the same questions from a streamed, mergeable summary
    (exact moments and counts, quantiles from a bounded uniform sample), so both paths fit by one rule."""

    def __init__(self, col: np.ndarray) -> None:
        self.is_text = col.dtype == object
        self.expanded = not self.is_text and col.ndim != 1
        if self.expanded:
            self.present = col
        else:
            self.present = (
                col[np.array([v is not None for v in col], dtype=bool)] if self.is_text else col[~np.isnan(col)]
            )
        self.n_present = len(self.present)

    def mean(self) -> float:
        return float(np.mean(self.present))

    def std(self) -> float:
        return float(np.std(self.present))

    def min(self) -> float:
        return float(np.min(self.present))

    def max(self) -> float:
        return float(np.max(self.present))

    def quantile(self, q: Any) -> Any:
        return np.quantile(self.present, q)

    def most_frequent(self) -> Any:
        if self.is_text:
            counts = Counter(self.present.tolist())
            return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        uniq, counts = np.unique(self.present, return_counts=True)
        return float(uniq[np.argmax(counts)])

    def category_counts(self) -> Counter[str]:
        return Counter(category_key(v) for v in self.present.tolist())


def _fit_step(ttype: str, column: str, feat: FeatureSchema, col: np.ndarray, t: Any, where: str) -> Step:
    return fit_step(ttype, column, ArrayStats(col), t, where)


def fit_step(ttype: str, column: str, stats: Any, t: Any, where: str) -> Step:
    """One declared transform fitted from ``stats`` (an ``ArrayStats`` or a streamed ``ColumnSummary``)."""
    is_text = stats.is_text
    if is_text and ttype in ("standardize", "minMax", "clip", "bucketize"):
        raise ValueError(f"{where}: column {column!r} is a string; {ttype} needs a numeric column")
    if stats.expanded:
        raise ValueError(f"{where}: column {column!r} was already expanded by an earlier oneHot/bucketize")
    n_present = stats.n_present
    if ttype == "impute":
        strategy = _get(t, "strategy") or ("mostFrequent" if is_text else "mean")
        if strategy == "constant":
            value = _get(t, "value")
            if value is None:
                raise ValueError(f"{where}: strategy constant needs a value")
            if not is_text:
                try:
                    value = float(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"{where}: column {column!r} is numeric; constant {value!r} is not"
                    ) from e
        elif strategy == "mostFrequent":
            if n_present == 0:
                raise ValueError(f"{where}: column {column!r} has no values to impute from")
            value = stats.most_frequent()
        elif strategy in ("mean", "median"):
            if is_text:
                raise ValueError(
                    f"{where}: column {column!r} is a string; use strategy mostFrequent or constant"
                )
            if n_present == 0:
                raise ValueError(f"{where}: column {column!r} has no values to impute from")
            value = float(stats.mean() if strategy == "mean" else stats.quantile(0.5))
        else:
            raise ValueError(f"{where}: unknown impute strategy {strategy!r}")
        return Step("impute", column, {"strategy": strategy, "value": value})
    if ttype in ("standardize", "minMax", "clip", "bucketize") and n_present == 0:
        raise ValueError(f"{where}: column {column!r} has only nulls in the training split")
    if ttype == "standardize":
        mean, std = stats.mean(), stats.std()
        return Step("standardize", column, {"mean": mean, "std": std if std > 0 else 1.0})
    if ttype == "minMax":
        lo, hi = stats.min(), stats.max()
        return Step("minMax", column, {"min": lo, "max": hi if hi > lo else lo + 1.0})
    if ttype == "clip":
        lo, hi = _get(t, "min"), _get(t, "max")
        lo = float(stats.quantile(0.01)) if lo is None else float(lo)
        hi = float(stats.quantile(0.99)) if hi is None else float(hi)
        if lo > hi:
            raise ValueError(f"{where}: min {lo} is greater than max {hi}")
        return Step("clip", column, {"min": lo, "max": hi})
    if ttype == "oneHot":
        counts = stats.category_counts()
        ordered = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        limit = _get(t, "max_categories")
        if limit is not None:
            if limit < 1:
                raise ValueError(f"{where}: maxCategories must be at least 1")
            ordered = ordered[:limit]
        return Step("oneHot", column, {"categories": ordered})
    if ttype == "bucketize":
        b = _get(t, "boundaries")
        if b is None:
            b = sorted(set(np.asarray(stats.quantile([0.2, 0.4, 0.6, 0.8])).tolist()))
        b = [float(x) for x in b]
        if any(x >= y for x, y in zip(b[:-1], b[1:], strict=True)):
            raise ValueError(f"{where}: boundaries must be strictly increasing, got {b}")
        return Step("bucketize", column, {"boundaries": b})
    raise ValueError(f"{where}: unknown transform type {ttype!r}")


def apply_step(step: Step, col: np.ndarray) -> np.ndarray:
    """One fitted step applied to one column (the streamed fit replays earlier steps with it)."""
    return _apply_step(step, col)


def coerce_column(values: np.ndarray, feat: FeatureSchema) -> np.ndarray:
    """Raw values as the fit sees them: float64 with NaN for null, or an object array of text/None."""
    return _string_column(values, feat) if feat.type == "string" else _numeric_column(values, feat)


def fit_image_transforms(images: np.ndarray, *, scale: float, image_field: str = "image") -> FittedTransforms:
    """Per-channel mean/std of the TRAINING images [N, C, H, W] (raw pixels, 0..scale)."""
    if images.ndim != 4:
        raise ValueError(f"expected training images as [N, C, H, W], got shape {list(images.shape)}")
    x = images.astype(np.float64) / scale
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    std = np.where(std > 0, std, 1.0)
    _, c, h, w = images.shape
    return FittedTransforms(
        kind="image",
        channels=int(c),
        height=int(h),
        width=int(w),
        scale=float(scale),
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        image_field=image_field,
    )
