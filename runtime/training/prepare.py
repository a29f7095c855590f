"""Data preparation for a training run: ingest with Ray Data, validate against the data contract (a
streamed aggregation: every rule, every violation with examples), split, profile the training split and
fit the declared feature transforms on it only, with a validation split carved from training (early
stopping and the decision threshold are chosen on it; the test split stays untouched for the gate).

Two paths, one package format:

- **in memory** (the rows collected into the driver as one table): a seeded split stratified by class,
  exact quantiles. Used when the validated source has at most ``CONVEYOR_IN_MEMORY_MAX_ROWS`` rows
  (default IN_MEMORY_MAX_ROWS, the size up to which the streamed quantiles would be exact anyway, and a
  table of a few tens of MB) and for built-in sets (generated in the driver to begin with): small sets
  are where stratification matters (a rare class gets exactly its share of the test split) and where
  collecting is cheapest.
- **streaming** (``streaming``): everything larger. The split is a hash of the row, the profile and the
  transforms are fitted by streamed aggregations, and the splits stay Ray Datasets that the Ray Train
  workers read shard by shard; the driver's memory does not grow with the rows.

``CONVEYOR_DATA_PATH=memory|streaming`` forces one path (benchmarks, tests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from conveyor.runtime.package import profile
from conveyor.runtime.package.features import (
    FeatureSchema,
    FittedTransforms,
    category_key,
    fit_image_transforms,
    fit_transforms,
)
from conveyor.runtime.package.validation import DataValidationError, ValidationReport, validate_dataset
from conveyor.runtime.spec import RunConfig
from conveyor.runtime.training import data as data_mod
from conveyor.runtime.training import streaming

log = logging.getLogger("conveyor.train")


@dataclass
class PreparedData:
    """The split, transformed data and everything the package describes about it."""

    kind: str  # "tabular" | "image"
    task: str
    classes: list[str] | None
    transforms: FittedTransforms
    schema: dict[str, Any]
    profile: dict[str, Any]
    # The in-memory path's arrays (None on the streaming path, whose splits are ``streams``).
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    data_sha256: str
    validation: ValidationReport
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    # The test split's raw rows (features and label, a pandas DataFrame): the deployed version is scored
    # on them through its own transforms (mustBeatDeployed compares both on the same rows).
    test_rows: Any = None
    # The streaming path's splits (Ray Datasets read on demand); None in memory.
    streams: streaming.Streams | None = None

    @property
    def input_shape(self) -> list[int]:
        if self.x_train is not None:
            return list(self.x_train.shape[1:])
        return list(self.transforms.input_shape)

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1

    @property
    def streamed(self) -> bool:
        return self.streams is not None

    def rows(self, split: str) -> int:
        """Rows in ``split`` (train, validation or test)."""
        if self.streams is not None:
            return int(self.streams.rows[split])
        y = {"train": self.y_train, "validation": self.y_val, "test": self.y_test}[split]
        return 0 if y is None else int(len(y))

    def train_class_counts(self) -> np.ndarray:
        """Training rows per class index (classification)."""
        assert self.classes is not None
        if self.streams is not None:
            counts = self.streams.train_label_counts
            return np.array([counts.get(c, 0) for c in self.classes], dtype=np.int64)
        return np.bincount(np.asarray(self.y_train, dtype=np.int64), minlength=len(self.classes))

    def target_stats(self) -> tuple[float, float]:
        """Mean and standard deviation (never 0) of the training targets (regression)."""
        if self.streams is not None:
            return self.streams.target_mean, self.streams.target_std or 1.0
        y = np.asarray(self.y_train, dtype=np.float64)
        return float(y.mean()), float(y.std()) or 1.0

    def dataset(self, split: str, target_scale: tuple[float, float] | None = None) -> Any:
        """``split`` as a Ray Dataset of ``x`` (model inputs) and ``y`` (class index, or the target,
        standardized by ``target_scale``); None when the split is empty. A streamed split is
        materialized in Ray's object store (which spills to local disk past its memory) when it takes at
        most ``streaming.cache_limit_bytes()``, else read and transformed again on every pass."""
        import ray.data

        if self.streams is not None:
            if not self.rows(split):
                return None
            ds = self.streams.xy(split, target_scale)
            fits = self.rows(split) * self.streams.bytes_per_row() <= streaming.cache_limit_bytes()
            return ds.materialize() if fits else ds
        x, y = {
            "train": (self.x_train, self.y_train),
            "validation": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }[split]
        if x is None or y is None:
            return None
        if target_scale is not None:
            y = ((np.asarray(y, dtype=np.float64) - target_scale[0]) / target_scale[1]).astype(np.float32)
        ds = ray.data.from_numpy(x).zip(ray.data.from_numpy(y))
        return ds.rename_columns({"data": "x", "data_1": "y"}).materialize()

    def score_batches(
        self, logits_of: Callable[[np.ndarray], np.ndarray], split: str, batch_size: int = 8192
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The model's outputs on ``split`` (validation or test) and its labels, batch by batch on either
        path (a streamed split is read and transformed as it goes): evaluation folds them into tallies
        (``evaluate.ClassificationTally``), so the driver never holds a split's outputs."""
        if self.streams is None:
            x, y = (self.x_val, self.y_val) if split == "validation" else (self.x_test, self.y_test)
            if x is None or y is None:
                return
            for i in range(0, len(x), batch_size):
                yield logits_of(x[i : i + batch_size]), np.asarray(y[i : i + batch_size])
            return
        for b in self.streams.xy(split).iter_batches(batch_format="numpy", batch_size=batch_size):
            yield logits_of(np.asarray(b["x"], dtype=np.float32)), np.asarray(b["y"])

    def raw_test_batches(self, batch_size: int = 4096) -> Iterator[Any]:
        """The test split's raw rows (features and label, as the source has them) as pandas batches, on
        either path: what a deployed version is scored on, through its own package's transforms."""
        if self.streams is not None:
            yield from self.streams.raw("test").iter_batches(batch_format="pandas", batch_size=batch_size)
            return
        frame = self.test_rows
        if frame is None:
            return
        for i in range(0, len(frame), batch_size):
            yield frame.iloc[i : i + batch_size]


def _infer_type(values: Any) -> str:
    import pandas as pd

    s = pd.Series(values)
    present = s.dropna()
    if len(present) and isinstance(present.iloc[0], np.ndarray):
        return "image"
    if pd.api.types.is_bool_dtype(s) or (
        len(present) and present.map(lambda v: isinstance(v, bool | np.bool_)).all()
    ):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_numeric_dtype(s):
        return "float"
    return "string"


def _classes(labels: np.ndarray, config: RunConfig) -> list[str]:
    return _ordered_classes({category_key(v) for v in labels.tolist()}, config)


def _ordered_classes(keys: set[str], config: RunConfig) -> list[str]:
    label_contract = config.data.contract.label
    if label_contract is not None and label_contract.allowed_values:
        return list(label_contract.allowed_values)

    def order(k: str) -> tuple[int, float, str]:
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)

    return sorted(keys, key=order)


# The share of the training split held out for validation, and the fewest training rows that get one.
VALIDATION_FRACTION = 0.15
MIN_ROWS_FOR_VALIDATION = 50


def _split(y: np.ndarray, config: RunConfig, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test row indices; stratified by class for classification."""
    frac = config.data.split.test_fraction
    if not 0.0 < frac < 1.0:
        raise ValueError(f"data.split.testFraction must be within (0, 1), got {frac}")
    return _seeded_split(y, frac, config.data.split.seed, stratify)


def _seeded_split(y: np.ndarray, frac: float, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(y == c)[0] for c in np.unique(y)] if stratify else [np.arange(len(y))]
    train, test = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        n_test = round(len(idx) * frac) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(
            f"data.split.testFraction {frac} leaves an empty train or test split of {len(y)} rows"
        )
    return tr, te


def _with_default_scaling(config: RunConfig, features: list[FeatureSchema]) -> list[Any]:
    """The declared transforms, plus standardize for every int/float feature no transform names, for
    neural networks (whose optimisers expect inputs on a unit scale); trees need no scaling."""
    declared = list(config.features.transforms)
    if config.training.model.architecture == "xgboost":
        return declared
    named = {c for t in declared for c in t.columns}
    unscaled = [f.name for f in features if f.type in ("int", "float") and f.name not in named]
    return declared + ([{"type": "standardize", "columns": unscaled}] if unscaled else [])


def with_validation(prepared: PreparedData, seed: int) -> PreparedData:
    """``prepared`` with VALIDATION_FRACTION of its training rows moved to a validation split (seeded,
    stratified for classification); unchanged when the training split is too small to spare them."""
    y = prepared.y_train
    if len(y) < MIN_ROWS_FOR_VALIDATION:
        return prepared
    fit_idx, val_idx = _seeded_split(y, VALIDATION_FRACTION, seed + 1, prepared.classes is not None)
    x = prepared.x_train
    return replace(prepared, x_train=x[fit_idx], y_train=y[fit_idx], x_val=x[val_idx], y_val=y[val_idx])


# The in-memory path's limit (see the module docstring); CONVEYOR_IN_MEMORY_MAX_ROWS overrides it.
IN_MEMORY_MAX_ROWS = 100_000


def data_path(config: RunConfig, rows: int) -> str:
    """``memory`` or ``streaming`` for a validated source of ``rows`` rows (the rule in the docstring)."""
    forced = os.environ.get("CONVEYOR_DATA_PATH", "auto")
    if forced in ("memory", "streaming"):
        return forced
    source = config.data.source
    if source.format == "builtin" or source.uri.startswith("builtin://"):
        return "memory"
    limit = int(os.environ.get("CONVEYOR_IN_MEMORY_MAX_ROWS", str(IN_MEMORY_MAX_ROWS)))
    return "memory" if rows <= limit else "streaming"


def prepare_data(config: RunConfig) -> PreparedData:
    """Ingest, validate (raises DataValidationError on bad data), then split, profile and fit the
    transforms in memory or streaming (``data_path``)."""
    source = config.data.source
    ds = data_mod.load_dataset(source, label=config.data.label)
    if config.data.feedback:  # ground truth from the predictors joins the source, under the same contract
        ds, added = data_mod.with_feedback(
            ds, config.registry.uri, config.registry.model_name, config.data.label
        )
        log.info("feedback: %d labelled rows added to %s", added, source.uri)
    report = validate_dataset(ds, config.data)
    if not report.ok:
        raise DataValidationError(report)
    path = data_path(config, report.rows)
    log.info("data validated: %d rows of %s; %s data path", report.rows, source.uri, path)
    if path == "streaming":
        return _prepare_streamed(config, ds, report)
    return with_validation(_prepare_in_memory(config, ds, report), config.data.split.seed)


def _prepare_in_memory(config: RunConfig, ds: Any, report: ValidationReport) -> PreparedData:
    source = config.data.source
    frame = ds.to_pandas()
    del ds
    label = config.data.label
    contract_cols = list(config.data.contract.columns)
    feature_names = [c.name for c in contract_cols] or [c for c in frame.columns if c != label]
    declared = {c.name: c for c in contract_cols}
    types = {n: (declared[n].type if n in declared else _infer_type(frame[n])) for n in feature_names}
    images = [n for n, t in types.items() if t == "image"]
    if images and len(feature_names) > 1:
        raise ValueError(
            f"data: an image column ({images[0]!r}) must be the only feature, got {feature_names}"
        )

    raw_labels = frame[label].to_numpy()
    classification = config.data.task == "classification"
    if classification:
        classes = _classes(raw_labels, config)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[category_key(v)] for v in raw_labels], dtype=np.int64)
    else:
        classes = None
        try:
            y = raw_labels.astype(np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.label {label!r} must be numeric for task regression ({e})") from e
    train_idx, test_idx = _split(y, config, stratify=classification)
    train, test = frame.iloc[train_idx], frame.iloc[test_idx]
    sha = data_mod.content_sha256(source, frame if source.format == "builtin" else None)
    task_fields = {
        "task": config.data.task,
        "label": label,
        **({"classes": classes} if classes is not None else {}),
    }

    if images:
        col = images[0]
        x_all = np.stack(frame[col].to_numpy()).astype(np.float32)
        if x_all.ndim == 3:
            x_all = x_all[:, None]
        declared_max = declared[col].max if col in declared else None
        x_train_raw = x_all[train_idx]
        scale = float(declared_max) if declared_max else (255.0 if float(x_train_raw.max()) > 1.0 else 1.0)
        transforms = fit_image_transforms(x_train_raw, scale=scale, image_field=col)
        schema = {
            "kind": "image",
            "imageField": col,
            "channels": transforms.channels,
            "height": transforms.height,
            "width": transforms.width,
            "scale": scale,
            "mean": transforms.mean,
            "std": transforms.std,
            **task_fields,
        }
        prof = profile.image_profile(
            x_train_raw, scale=scale, labels=raw_labels[train_idx] if classes else None
        )
        x_train = transforms.apply_images(x_train_raw)
        x_test = transforms.apply_images(x_all[test_idx])
        return PreparedData(
            "image",
            config.data.task,
            classes,
            transforms,
            schema,
            prof,
            x_train,
            y[train_idx],
            x_test,
            y[test_idx],
            sha,
            report,
            test_rows=test,
        )

    features = []
    for n in feature_names:
        if n in declared:
            c = declared[n]
            features.append(FeatureSchema(n, c.type, c.nullable, c.min, c.max, c.allowed_values))
        else:
            features.append(FeatureSchema(n, types[n], nullable=bool(frame[n].isna().any())))
    transforms = fit_transforms(train[feature_names], features, _with_default_scaling(config, features))
    prof = profile.tabular_profile(
        {n: train[n].to_numpy() for n in feature_names},
        types,
        labels=raw_labels[train_idx] if classes else None,
    )
    if not classes:
        prof["target"] = profile.numeric_profile(y[train_idx])
    schema = {"kind": "tabular", "features": [f.to_json() for f in features], **task_fields}
    x_train = _apply_with_ray(transforms, train[feature_names])
    x_test = transforms.apply(test[feature_names])
    return PreparedData(
        "tabular",
        config.data.task,
        classes,
        transforms,
        schema,
        prof,
        x_train,
        y[train_idx],
        x_test,
        y[test_idx],
        sha,
        report,
        test_rows=test,
    )


def _prepare_streamed(config: RunConfig, ds: Any, report: ValidationReport) -> PreparedData:
    """The streaming path (``streaming``'s docstring): nothing here holds more than a batch of rows."""
    from conveyor.runtime.package.summary import QUANTILE_RANK_ERROR, SAMPLE_SIZE

    source, label = config.data.source, config.data.label
    frac = config.data.split.test_fraction
    if not 0.0 < frac < 1.0:
        raise ValueError(f"data.split.testFraction must be within (0, 1), got {frac}")
    contract_cols = list(config.data.contract.columns)
    declared = {c.name: c for c in contract_cols}
    head = ds.take_batch(256, batch_format="pandas")  # a few rows: the column names and inferred types
    feature_names = [c.name for c in contract_cols] or [str(c) for c in head.columns if c != label]
    types = {n: (declared[n].type if n in declared else _infer_type(head[n])) for n in feature_names}
    images = [n for n, t in types.items() if t == "image"]
    if images and len(feature_names) > 1:
        raise ValueError(
            f"data: an image column ({images[0]!r}) must be the only feature, got {feature_names}"
        )
    classification = config.data.task == "classification"
    classes = _ordered_classes(set(report.label_counts), config) if classification else None
    if not classification:
        try:
            head[label].to_numpy().astype(np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.label {label!r} must be numeric for task regression ({e})") from e
    rule = streaming.SplitRule(config.data.split.seed, frac, VALIDATION_FRACTION)
    expected_train = report.rows * (1 - frac) * (1 - VALIDATION_FRACTION)
    image = images[0] if images else None
    features = [] if image else [
        FeatureSchema(n, types[n]) if n not in declared else
        FeatureSchema(n, declared[n].type, declared[n].nullable, declared[n].min, declared[n].max,
                      declared[n].allowed_values)
        for n in feature_names
    ]  # fmt: skip
    plan = streaming.Plan(
        rule, features, label, classification, streaming.sample_cutoff(expected_train), image
    )
    first = streaming.summarize(ds, plan)
    rows = dict(zip(("train", "validation", "test"), (int(v) for v in first["split"]), strict=True))
    if rows["train"] == 0 or rows["test"] == 0:
        raise ValueError(
            f"data.split.testFraction {frac} leaves an empty train or test split of {report.rows} rows"
        )
    log.info("streamed split (train/validation/test rows): %s", rows)
    label_counts = {k: int(v) for k, v in first.get("labels", {}).items()}
    task_fields = {"task": config.data.task, "label": label, **({"classes": classes} if classes else {})}
    if image:
        img = first["image"]
        c, h, w = img["shape"]
        declared_max = declared[image].max if image in declared else None
        scale = float(declared_max) if declared_max else (255.0 if img["max"] > 1.0 else 1.0)
        mean = img["sum"] / (img["pixels"] * scale)
        std = np.sqrt(np.maximum(img["sumsq"] / (img["pixels"] * scale * scale) - mean**2, 0.0))
        std = np.where(std > 0, std, 1.0)
        transforms = FittedTransforms(
            kind="image", channels=int(c), height=int(h), width=int(w), scale=scale,
            mean=[float(v) for v in mean], std=[float(v) for v in std], image_field=image,
        )  # fmt: skip
        schema = {
            "kind": "image", "imageField": image, "channels": transforms.channels,
            "height": transforms.height, "width": transforms.width, "scale": scale,
            "mean": transforms.mean, "std": transforms.std, **task_fields,
        }  # fmt: skip
        prof: dict[str, Any] = {
            "rows": rows["train"],
            "features": {},
            "imageStats": {
                k: profile.numeric_profile_from_summary(s.scaled(1.0 / scale))
                for k, s in img["stats"].items()
            },
        }
    else:
        cols = first["columns"]
        features = [
            f if f.name in declared
            else FeatureSchema(f.name, f.type, nullable=cols[f.name].n_present < cols[f.name].rows)
            for f in features
        ]  # fmt: skip
        plan = replace(plan, features=features)
        transforms = streaming.fit_transforms_streamed(
            lambda pl: streaming.summarize(ds, pl), plan, first, _with_default_scaling(config, features)
        )
        prof = {"rows": rows["train"], "features": {}}
        for f in features:
            if f.type in ("string", "bool"):
                keys = first.get("keys", {}).get(f.name, {})
                prof["features"][f.name] = profile.categorical_profile_from_counts(keys, cols[f.name].rows)
            else:
                prof["features"][f.name] = profile.numeric_profile_from_summary(cols[f.name])
        schema = {"kind": "tabular", "features": [f.to_json() for f in features], **task_fields}
    if classes:
        prof["classBalance"] = profile.class_balance_from_counts(label_counts)
    target_mean, target_std = 0.0, 1.0
    if not classes:
        target = first["target"]
        prof["target"] = profile.numeric_profile_from_summary(target)
        target_mean, target_std = target.mean(), target.std() or 1.0
    prof["streamed"] = {
        "split": "hash of the row",
        "sampleSize": SAMPLE_SIZE,
        "quantileRankError": round(QUANTILE_RANK_ERROR, 4),
    }
    streams = streaming.Streams(
        source=ds, rule=rule, feature_names=feature_names, label=label, classes=classes,
        transforms=transforms, rows=rows, image=image, train_label_counts=label_counts,
        target_mean=float(target_mean), target_std=float(target_std),
    )  # fmt: skip
    sha = data_mod.content_sha256(source)
    return PreparedData(
        "image" if image else "tabular", config.data.task, classes, transforms, schema, prof,
        None, None, None, None, sha, report, streams=streams,
    )  # fmt: skip


def _apply_with_ray(transforms: FittedTransforms, frame: Any) -> np.ndarray:
    """The fitted transforms applied to the training split by Ray Data, batch by batch (the same code
    serving runs), gathered back in row order (Ray Data may finish batches in any order)."""
    import ray.data

    row = "__conveyor_row__"

    def apply(batch: Any) -> dict[str, np.ndarray]:
        return {"x": transforms.apply(batch.drop(columns=[row])), row: batch[row].to_numpy()}

    indexed = frame.reset_index(drop=True).assign(**{row: np.arange(len(frame))})
    ds = ray.data.from_pandas(indexed).map_batches(apply, batch_format="pandas")
    xs, rows = [], []
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        xs.append(np.asarray(b["x"]))
        rows.append(np.asarray(b[row]))
    x = np.concatenate(xs)
    out = np.empty_like(x)
    out[np.concatenate(rows)] = x
    return out
