"""The streaming data path: a data set that need not fit in the driver (``prepare.prepare_data`` says when
it is used).

- **Split** by a hash of the row (every column, in name order, salted with ``data.split.seed``; images by
  their pixels' bytes): the top 53 bits give a uniform number that puts the row in test
  (``testFraction``), validation (VALIDATION_FRACTION of the rest) or train, so any worker can tell a
  row's split from the row alone, the same way every pass and every run with the same seed. Identical
  rows land in the same split. Not stratified: with this many rows each split's class shares follow
  the data's within sampling error.
- **Fit** (profile and transforms) by streamed aggregations over the training split: each batch becomes
  one small summary per column (``runtime.package.summary``) and the driver folds them as they arrive.
  A column's N-th declared transform is fitted on the output of its first N-1, so a pipeline whose
  longest per-column chain is N steps takes N passes (one for the usual single step per column; the
  first pass also gives the profile and the label counts).
- **Train and evaluate** on datasets that apply the fitted transforms batch by batch (``xy``): each Ray
  Train worker iterates its own shard; the driver never holds the rows.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from conveyor.runtime.package import profile
from conveyor.runtime.package.features import (
    FeatureSchema,
    FittedTransforms,
    apply_step,
    category_key,
    coerce_column,
    fit_step,
)
from conveyor.runtime.package.summary import SAMPLE_SIZE, ColumnSummary

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "validation": VALIDATION, "test": TEST}
# A batch keeps rows under this many times the expected sample's share of the training split, so the
# summaries sent to the driver hold about this multiple of SAMPLE_SIZE values, whatever the row count.
SAMPLE_OVERSHOOT = 2.0
# Rows per batch of the split and transform tasks: large enough that per-batch overhead (and the number
# of blocks a training iterator walks) stays small, small enough for any worker's memory.
BATCH_ROWS = 16384


# ---------------------------------------------------------------- the split


def _hash_key(seed: int) -> str:
    return hashlib.sha256(f"conveyor-split-{seed}".encode()).hexdigest()[:16]


def _is_array_column(values: Any) -> bool:
    for v in values:
        if v is not None:
            return isinstance(v, np.ndarray)
    return False


def row_hash(batch: Any, seed: int) -> np.ndarray:
    """A 64-bit hash per row of a pandas batch, from its values only (not its position)."""
    import pandas as pd

    cols = {}
    for name in sorted(map(str, batch.columns)):
        values = batch[name]
        if values.dtype == object or not isinstance(values.dtype, np.dtype):
            raw = list(values)
            if _is_array_column(raw):
                values = pd.Series(
                    [
                        hashlib.blake2b(np.ascontiguousarray(v).tobytes(), digest_size=8).hexdigest()
                        for v in raw
                    ]
                )
        cols[name] = values.reset_index(drop=True)
    frame = pd.DataFrame(cols)
    return pd.util.hash_pandas_object(frame, index=False, hash_key=_hash_key(seed)).to_numpy(np.uint64)


def split_codes(hashes: np.ndarray, test_fraction: float, validation_fraction: float) -> np.ndarray:
    u = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
    codes = np.full(len(hashes), TRAIN, dtype=np.int8)
    codes[u < test_fraction + (1.0 - test_fraction) * validation_fraction] = VALIDATION
    codes[u < test_fraction] = TEST
    return codes


def priority(hashes: np.ndarray) -> np.ndarray:
    """A second uniform number per row (the low 32 bits, independent of the split's top bits)."""
    return (hashes & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32


@dataclass(frozen=True)
class SplitRule:
    seed: int
    test_fraction: float
    validation_fraction: float

    def codes_and_priority(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        h = row_hash(batch, self.seed)
        return split_codes(h, self.test_fraction, self.validation_fraction), priority(h)


def _select(batch: Any, rule: SplitRule, split: int) -> Any:
    codes, _ = rule.codes_and_priority(batch)
    return batch[codes == split]


# ---------------------------------------------------------------- per-batch summaries


@dataclass
class Plan:
    """What a summary pass computes on each training batch."""

    rule: SplitRule
    features: list[FeatureSchema]
    label: str
    classification: bool
    cutoff: float
    image: str | None = None
    depth: int = 0
    # column -> the steps to replay before summarizing (depth > 0)
    chains: dict[str, list[Any]] = field(default_factory=dict)


def _label_keys(values: np.ndarray) -> Counter[str]:
    out: Counter[str] = Counter()
    nulls = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), dtype=bool)
    present = values[~nulls]
    if present.dtype.kind in "iufb":
        uniq, n = np.unique(present, return_counts=True)
        pairs = zip(uniq.tolist(), n.tolist(), strict=True)
    else:
        pairs = ((v, 1) for v in present if v is not None)
    for v, k in pairs:
        out[category_key(v)] += k
    return out


def _raw_keys(values: np.ndarray) -> Counter[str]:
    """Counts of the raw values by the text the profile knows them by (nulls dropped)."""
    from conveyor.runtime.package.features import is_null

    if values.dtype.kind in "iub":
        uniq, n = np.unique(values, return_counts=True)
        return Counter({category_key(v): int(k) for v, k in zip(uniq.tolist(), n.tolist(), strict=True)})
    return Counter(category_key(v) for v in values if not is_null(v))


def _image_array(values: Any) -> np.ndarray:
    x = np.stack([np.asarray(v, dtype=np.float64) for v in values]) if len(values) else np.zeros((0, 1, 1, 1))
    return x[:, None] if x.ndim == 3 else x


def summarize_batch(batch: Any, plan: Plan) -> dict[str, Any]:
    codes, prio = plan.rule.codes_and_priority(batch)
    train = codes == TRAIN
    batch, prio = batch[train], prio[train]
    out: dict[str, Any] = {
        "rows": int(len(batch)),
        "split": np.bincount(codes, minlength=3).astype(np.int64),
        "columns": {},
    }
    if plan.image is not None:
        x = _image_array(list(batch[plan.image]))
        stats = profile.image_stats(x, scale=1.0) if len(x) else {}
        out["image"] = {
            "shape": list(x.shape[1:]) if len(x) else None,
            "sum": x.sum(axis=(0, 2, 3)) if len(x) else None,
            "sumsq": (x**2).sum(axis=(0, 2, 3)) if len(x) else None,
            "pixels": int(x.shape[0] * x.shape[2] * x.shape[3]) if len(x) else 0,
            "max": float(x.max()) if len(x) else 0.0,
            "stats": {
                k: ColumnSummary(False).add(v, prio, plan.cutoff) for k, v in stats.items()
            },
        }
    for f in plan.features if plan.image is None else []:
        if plan.depth > 0 and f.name not in plan.chains:
            continue
        raw = batch[f.name].to_numpy()
        col = coerce_column(raw, f)
        chain = plan.chains.get(f.name, [])
        if any(s.type in ("oneHot", "bucketize") for s in chain):
            s = ColumnSummary(False)
            s.expanded = True
            out["columns"][f.name] = s
            continue
        for step in chain:
            col = apply_step(step, col)
        out["columns"][f.name] = ColumnSummary(col.dtype == object).add(col, prio, plan.cutoff)
        if plan.depth == 0 and f.type in ("string", "bool"):
            out.setdefault("keys", {})[f.name] = _raw_keys(raw)
    if plan.depth == 0:
        labels = batch[plan.label].to_numpy()
        if plan.classification:
            out["labels"] = _label_keys(labels)
        else:
            y = np.asarray(labels, dtype=np.float64)
            out["target"] = ColumnSummary(False).add(y, prio, plan.cutoff)
    return out


def _summarize_blob(batch: Any, plan: Plan) -> dict[str, np.ndarray]:
    return {"summary": np.array([pickle.dumps(summarize_batch(batch, plan))], dtype=object)}


def _merge(acc: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    if acc is None:
        return part
    acc["rows"] += part["rows"]
    acc["split"] = acc["split"] + part["split"]
    for name, s in part["columns"].items():
        if name in acc["columns"]:
            if not s.expanded:
                acc["columns"][name].merge(s)
        else:
            acc["columns"][name] = s
    for name, c in part.get("keys", {}).items():
        acc.setdefault("keys", {}).setdefault(name, Counter()).update(c)
    if "labels" in part:
        acc.setdefault("labels", Counter()).update(part["labels"])
    if "target" in part:
        acc["target"] = acc["target"].merge(part["target"]) if "target" in acc else part["target"]
    img = part.get("image")
    if img is not None and img["pixels"]:
        mine = acc.get("image")
        if mine is None or not mine["pixels"]:
            acc["image"] = img
        else:
            if img["shape"] != mine["shape"]:
                raise ValueError(f"images of different shapes in one data set: {mine['shape']} and {img['shape']}")
            mine["sum"] = mine["sum"] + img["sum"]
            mine["sumsq"] = mine["sumsq"] + img["sumsq"]
            mine["pixels"] += img["pixels"]
            mine["max"] = max(mine["max"], img["max"])
            for k, s in img["stats"].items():
                mine["stats"][k].merge(s)
    return acc


def summarize(ds: Any, plan: Plan) -> dict[str, Any]:
    """One streamed pass: per-batch summaries of the training split, folded as they arrive."""
    acc: dict[str, Any] | None = None
    stream = ds.map_batches(_summarize_blob, fn_kwargs={"plan": plan}, batch_format="pandas", batch_size=16384)
    for batch in stream.iter_batches(batch_format="numpy", batch_size=None):
        for blob in batch["summary"]:
            acc = _merge(acc, pickle.loads(blob))
    return acc or {"rows": 0, "split": np.zeros(3, dtype=np.int64), "columns": {}}


# ---------------------------------------------------------------- fitting from the summaries


def _get(t: Any, name: str) -> Any:
    from conveyor.runtime.package.features import _get as get

    return get(t, name)


def fit_transforms_streamed(
    summarize_pass: Any, plan: Plan, first: dict[str, Any], transforms: list[Any]
) -> FittedTransforms:
    """``features.fit_transforms`` by the same rule (``fit_step``), from streamed summaries: the first
    pass's (``first``) for each column's first step, one more pass (``summarize_pass(plan)``, e.g.
    ``lambda plan: summarize(ds, plan)``) per further step in a column's chain."""
    features = plan.features
    by_name = {f.name: f for f in features}
    entries: list[tuple[int, str, str, Any, str]] = []
    depth_of: list[int] = []
    seen: Counter[str] = Counter()
    for i, t in enumerate(transforms):
        ttype = _get(t, "type")
        where = f"features.transforms[{i}] ({ttype})"
        for column in _get(t, "columns") or []:
            if column not in by_name:
                raise ValueError(
                    f"{where}: column {column!r} is not an input feature; features are {sorted(by_name)}"
                )
            entries.append((i, ttype, column, t, where))
            depth_of.append(seen[column])
            seen[column] += 1
    steps: list[Any] = [None] * len(entries)
    chains: dict[str, list[Any]] = {f.name: [] for f in features}
    current = first
    for depth in range(max(depth_of, default=-1) + 1):
        at = [k for k, d in enumerate(depth_of) if d == depth]
        if depth > 0:
            wanted = {entries[k][2]: list(chains[entries[k][2]]) for k in at}
            current = summarize_pass(replace(plan, depth=depth, chains=wanted))
        for k in at:
            _, ttype, column, t, where = entries[k]
            step = fit_step(ttype, column, current["columns"][column], t, where)
            steps[k] = step
            chains[column].append(step)
    fitted = FittedTransforms(kind="tabular", features=list(features), steps=steps)
    for f in features:
        chain = chains[f.name]
        text = f.type == "string" and not any(s.type == "oneHot" for s in chain)
        if text:
            raise ValueError(f"feature {f.name!r} is a string column: add a oneHot transform for it")
        nulls = first["columns"][f.name].rows - first["columns"][f.name].n_present
        if nulls and not any(s.type == "impute" for s in chain):
            raise ValueError(
                f"feature {f.name!r} has {nulls} null value(s) in the training split: add an impute "
                "transform for it"
            )
    return fitted


# ---------------------------------------------------------------- the training-ready streams


def _label_index(values: np.ndarray, index: dict[str, int]) -> np.ndarray:
    try:
        uniq, inverse = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types: one at a time
        return np.array([index[category_key(v)] for v in values], dtype=np.int64)
    codes = np.array([index[category_key(v)] for v in uniq.tolist()], dtype=np.int64)
    return codes[inverse.reshape(-1)] if len(values) else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class _XY:
    """What a task needs to turn raw rows into model inputs (small: shipped with every task)."""

    transforms: FittedTransforms
    feature_names: list[str]
    label: str
    classes: list[str] | None
    image: str | None


def _to_xy(batch: Any, streams: _XY, target_scale: tuple[float, float] | None) -> dict[str, np.ndarray]:
    if streams.image is not None:
        x = streams.transforms.apply_images(_image_array(list(batch[streams.image])).astype(np.float32))
    else:
        x = streams.transforms.apply(batch[streams.feature_names])
    labels = batch[streams.label].to_numpy()
    if streams.classes is not None:
        y = _label_index(labels, {c: i for i, c in enumerate(streams.classes)})
    else:
        y = np.asarray(labels, dtype=np.float32)
        if target_scale is not None:
            y = ((y - target_scale[0]) / target_scale[1]).astype(np.float32)
    return {"x": x, "y": y}


@dataclass
class Streams:
    """A validated source and its fitted transforms: the splits as Ray Datasets, read on demand."""

    source: Any
    rule: SplitRule
    feature_names: list[str]
    label: str
    classes: list[str] | None
    transforms: FittedTransforms
    rows: dict[str, int]
    image: str | None = None
    train_label_counts: dict[str, int] = field(default_factory=dict)
    target_mean: float = 0.0
    target_std: float = 1.0

    def raw(self, split: str) -> Any:
        """The split's raw rows (every source column, the label included), as the source has them."""
        return self.source.map_batches(
            _select,
            fn_kwargs={"rule": self.rule, "split": SPLITS[split]},
            batch_format="pandas",
            batch_size=BATCH_ROWS,
        )

    def xy(self, split: str, target_scale: tuple[float, float] | None = None) -> Any:
        """The split transformed for the model: ``x`` float32 and ``y`` (class index, or the target)."""
        return self.raw(split).map_batches(
            partial(_to_xy, streams=self.spec(), target_scale=target_scale),
            batch_format="pandas",
            batch_size=BATCH_ROWS,
        )

    def spec(self) -> _XY:
        return _XY(self.transforms, self.feature_names, self.label, self.classes, self.image)

    def bytes_per_row(self) -> int:
        return int(np.prod(self.transforms.input_shape)) * 4 + 8


def cache_limit_bytes() -> float:
    """The most bytes a transformed split may take to be materialized in Ray's object store (which
    spills to local disk past its memory) instead of re-read from the source every epoch:
    CONVEYOR_DATASET_CACHE_BYTES, else half the cluster's object store."""
    env = os.environ.get("CONVEYOR_DATASET_CACHE_BYTES")
    if env:
        return float(env)
    import ray

    return 0.5 * float(ray.cluster_resources().get("object_store_memory", 2**30))


def sample_cutoff(expected_train_rows: float) -> float:
    return min(1.0, SAMPLE_OVERSHOOT * SAMPLE_SIZE / max(expected_train_rows, 1.0))
