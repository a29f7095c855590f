"""The training data profile (``profile.json``): the reference that serving scores drift against.

numpy only, so the operator and the predictor can import it.

Numeric features: quantiles, ``binEdges`` (the training split's deciles, duplicates dropped for
discrete features) and ``binFractions``. Binning rule, shared by training and drift scoring:
the interior edges ``binEdges[1:-1]`` cut the line and the outer bins are open, so a live value below
the training minimum falls in the first bin and one above the maximum in the last
(``bin_fractions`` implements it). Categorical features: value frequencies. Drift is the PSI between the
training fractions and the live ones (``psi``, ``drift_scores``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from conveyor.runtime.package.features import category_key, is_null

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
N_BINS = 10
# Fractions are floored at this before PSI so an empty bin does not make the score infinite.
PSI_EPSILON = 1e-4


def _as_float(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        return values.astype(np.float64)
    return np.asarray([np.nan if is_null(v) else float(v) for v in values], dtype=np.float64)


def numeric_profile(values: Any, bins: int = N_BINS) -> dict[str, Any]:
    """Quantiles, decile bins, mean/std and null fraction of one numeric column."""
    arr = _as_float(values)
    n = len(arr)
    present = arr[~np.isnan(arr)]
    entry: dict[str, Any] = {
        "kind": "numeric",
        "count": int(n),
        "nullFraction": float(1 - len(present) / n) if n else 0.0,
    }
    if len(present) == 0:
        entry.update({"quantiles": {}, "binEdges": [], "binFractions": [], "mean": None, "std": None})
        return entry
    edges = np.unique(np.quantile(present, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    entry["quantiles"] = {
        str(q): float(v) for q, v in zip(QUANTILES, np.quantile(present, QUANTILES), strict=True)
    }
    entry["binEdges"] = [float(e) for e in edges]
    entry["binFractions"] = bin_fractions(entry, present)
    entry["mean"] = float(present.mean())
    entry["std"] = float(present.std())
    entry["min"] = float(present.min())
    entry["max"] = float(present.max())
    return entry


def numeric_profile_from_summary(summary: Any, bins: int = N_BINS) -> dict[str, Any]:
    """``numeric_profile`` of a streamed column (``runtime.package.summary.ColumnSummary``): count, null
    fraction, mean, std, min and max exact; quantiles, decile edges and bin fractions from its uniform
    sample (exact up to its SAMPLE_SIZE present values; rank error stated in that module past it)."""
    entry = numeric_profile(summary._sorted_sample().astype(np.float64), bins)
    entry["count"] = int(summary.rows)
    entry["nullFraction"] = float(1 - summary.n_present / summary.rows) if summary.rows else 0.0
    if summary.n_present and entry["binEdges"]:
        entry["binEdges"][0] = min(entry["binEdges"][0], summary.min())
        entry["binEdges"][-1] = max(entry["binEdges"][-1], summary.max())
        entry.update(mean=summary.mean(), std=summary.std(), min=summary.min(), max=summary.max())
    if not summary.exact_quantiles:
        from conveyor.runtime.package.summary import QUANTILE_RANK_ERROR

        entry["approximate"] = {
            "sampleSize": int(len(summary.sample)),
            "quantileRankError": round(QUANTILE_RANK_ERROR, 4),
        }
    return entry


def categorical_profile_from_counts(counts: Mapping[str, int], rows: int) -> dict[str, Any]:
    """``categorical_profile`` from streamed value counts (keys as ``category_key`` text, nulls not
    counted) over ``rows`` rows."""
    present = sum(counts.values())
    return {
        "kind": "categorical",
        "count": int(rows),
        "nullFraction": float(1 - present / rows) if rows else 0.0,
        "frequencies": {k: c / present for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
        if present
        else {},
    }


def class_balance_from_counts(counts: Mapping[str, int]) -> dict[str, float]:
    n = sum(counts.values())
    return {k: c / n for k, c in sorted(counts.items())} if n else {}


def bin_fractions(entry: Mapping[str, Any], values: Any) -> list[float]:
    """Fractions of ``values`` (nulls dropped) in the bins of a numeric profile ``entry``."""
    edges = entry["binEdges"]
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n_bins = max(len(edges) - 1, 1)
    if len(arr) == 0:
        return [0.0] * n_bins
    idx = np.searchsorted(np.asarray(edges[1:-1], dtype=np.float64), arr, side="right")
    counts = np.bincount(idx, minlength=n_bins)
    return [float(c) / len(arr) for c in counts]


def categorical_profile(values: Any) -> dict[str, Any]:
    """Frequencies of each value (as text) and the null fraction of one categorical column."""
    vals = list(values)
    n = len(vals)
    present = [category_key(v) for v in vals if not is_null(v)]
    counts = Counter(present)
    return {
        "kind": "categorical",
        "count": n,
        "nullFraction": float(1 - len(present) / n) if n else 0.0,
        "frequencies": {
            k: c / len(present) for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        }
        if present
        else {},
    }


def class_balance(labels: Sequence[Any] | np.ndarray) -> dict[str, float]:
    vals = [_label_text(v) for v in np.asarray(labels).tolist()]
    n = len(vals)
    counts = Counter(vals)
    return {k: c / n for k, c in sorted(counts.items())} if n else {}


def _label_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def tabular_profile(
    columns: Mapping[str, Any],
    feature_types: Mapping[str, str],
    *,
    labels: Any = None,
) -> dict[str, Any]:
    """Profile of a tabular training split: ``columns`` maps feature -> values, types are
    ``float|int|bool|string`` (strings and bools are profiled as categorical)."""
    rows = len(next(iter(columns.values()))) if columns else (len(labels) if labels is not None else 0)
    features: dict[str, Any] = {}
    for name, ftype in feature_types.items():
        vals = columns[name]
        features[name] = categorical_profile(vals) if ftype in ("string", "bool") else numeric_profile(vals)
    out: dict[str, Any] = {"rows": int(rows), "features": features}
    if labels is not None:
        out["classBalance"] = class_balance(labels)
    return out


def image_profile(images: np.ndarray, *, scale: float, labels: Any = None) -> dict[str, Any]:
    """Profile of training images [N, C, H, W] (raw pixels, 0..scale): per-image mean, std and brightness."""
    stats = image_stats(images, scale=scale)
    out: dict[str, Any] = {
        "rows": int(len(images)),
        "features": {},
        "imageStats": {name: numeric_profile(values) for name, values in stats.items()},
    }
    if labels is not None:
        out["classBalance"] = class_balance(labels)
    return out


def image_stats(images: np.ndarray, *, scale: float) -> dict[str, np.ndarray]:
    """Per-image statistics compared with ``imageStats`` (images [N, C, H, W], raw pixels)."""
    x = images.astype(np.float64) / scale
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2] if x.shape[1] == 3 else x.mean(axis=1)
    return {"mean": x.mean(axis=(1, 2, 3)), "std": x.std(axis=(1, 2, 3)), "brightness": lum.mean(axis=(1, 2))}


def prediction_distribution(predicted: Any, classes: Sequence[str] | None) -> dict[str, Any]:
    """Class -> fraction of predictions (classification), or a numeric entry (regression)."""
    if classes is None:
        return numeric_profile(np.asarray(predicted, dtype=np.float64))
    idx = np.asarray(predicted, dtype=np.int64)
    n = len(idx)
    counts = np.bincount(idx, minlength=len(classes)) if n else np.zeros(len(classes))
    return {str(c): float(counts[i]) / n if n else 0.0 for i, c in enumerate(classes)}


# ---------------------------------------------------------------- drift


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = PSI_EPSILON) -> float:
    """Population stability index between two distributions over the same bins."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_psi(entry: Mapping[str, Any], values: Any) -> float:
    """PSI of live ``values`` of one feature against its training profile ``entry``."""
    if entry["kind"] == "numeric":
        if not entry.get("binEdges"):
            return 0.0
        return psi(entry["binFractions"], bin_fractions(entry, _as_float(values)))
    freqs: Mapping[str, float] = entry["frequencies"]
    live = categorical_profile(values)["frequencies"]
    keys = list(freqs) + [k for k in live if k not in freqs]
    return psi([freqs.get(k, 0.0) for k in keys], [live.get(k, 0.0) for k in keys])


def drift_scores(profile: Mapping[str, Any], columns: Mapping[str, Any]) -> dict[str, float]:
    """PSI per profiled feature present in ``columns`` (feature -> live values)."""
    return {
        name: feature_psi(entry, columns[name])
        for name, entry in profile.get("features", {}).items()
        if name in columns and len(columns[name])
    }
