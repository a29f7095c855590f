"""Data preparation for a training run: ingest with Ray Data, validate against the data contract, split
(seeded, stratified for classification), profile the training split and fit the declared feature
transforms on it only, then carve a validation split out of the training split (early stopping and the
decision threshold are chosen on it; the test split stays untouched for the gate)."""

from __future__ import annotations

import logging
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
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    data_sha256: str
    validation: ValidationReport
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    # The test split's raw rows (features and label, a pandas DataFrame): the deployed version is scored
    # on them through its own transforms (mustBeatDeployed compares both on the same rows).
    test_rows: Any = None

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1


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
    label_contract = config.data.contract.label
    if label_contract is not None and label_contract.allowed_values:
        return list(label_contract.allowed_values)
    keys = {category_key(v) for v in labels.tolist()}

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


def prepare_data(config: RunConfig) -> PreparedData:
    """Ingest, validate, split, profile and fit transforms, then carve the validation split (raises
    DataValidationError on bad data)."""
    return with_validation(_prepare_split(config), config.data.split.seed)


def _prepare_split(config: RunConfig) -> PreparedData:
    source = config.data.source
    ds = data_mod.load_dataset(source, label=config.data.label).materialize()
    if config.data.feedback:  # ground truth from the predictors joins the source, under the same contract
        ds, added = data_mod.with_feedback(ds, config.registry.uri, config.registry.model_name, config.data.label)
        log.info("feedback: %d labelled rows added to %s", added, source.uri)
    report = validate_dataset(ds, config.data)
    if not report.ok:
        raise DataValidationError(report)
    log.info("data validated: %d rows of %s", report.rows, source.uri)
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
