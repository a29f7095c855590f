"""Held-out evaluation and the pipeline's gate.

Classification: accuracy, macro F1, per-class precision, recall and F1 (``recall:<class>``), confusion
matrix (rows = true class, columns = predicted, in ``classes`` order); for a binary task also ROC AUC, PR
AUC (average precision) and the positive (second) class's ``precision``, ``recall`` and ``f1``, with
predictions made by the package's decision threshold (``choose_threshold``, on the validation split).
Regression: RMSE and MAE.

``evaluate_deployed`` scores the version deployed now on a run's own test split (raw rows, through that
version's own fitted transforms and decision rule, the shared scoring path of serving), so the gate's
``mustBeatDeployed`` compares the candidate and the deployed version on the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from conveyor.runtime.package.decision import decide
from conveyor.runtime.spec import LOWER_IS_BETTER, EvaluationSpec, meets

# Metrics that depend on the decision rule and can be maximised by choosing the threshold.
THRESHOLD_METRICS = ("accuracy", "f1Macro")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(
    logits: np.ndarray, y_true: np.ndarray, classes: Sequence[str], threshold: float | None = None
) -> dict[str, Any]:
    from sklearn.metrics import (
        average_precision_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = softmax(logits)
    pred = decide(probabilities, threshold)
    labels = list(range(len(classes)))
    out: dict[str, Any] = {
        "accuracy": float((pred == y_true).mean()),
        "f1Macro": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "confusionMatrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
        "classes": list(classes),
    }
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        out[f"precision:{c}"] = float(precision[i])
        out[f"recall:{c}"] = float(recall[i])
        out[f"f1:{c}"] = float(f1[i])
    if len(classes) == 2:
        out.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
        if threshold is not None:
            out["decisionThreshold"] = threshold
        # AUCs are undefined when the test split holds one class only.
        both = len(np.unique(y_true)) == 2
        out["rocAuc"] = float(roc_auc_score(y_true, probabilities[:, 1])) if both else None
        out["prAuc"] = float(average_precision_score(y_true, probabilities[:, 1])) if both else None
    return out


def choose_threshold(logits: np.ndarray, y_true: np.ndarray, objective: str) -> float | None:
    """The positive-class probability threshold that maximises ``objective`` (accuracy or f1Macro; F1 of
    the positive class for threshold-free metrics such as rocAuc) on a validation split; None (argmax)
    for more than two classes or a split without both classes."""
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true, dtype=np.int64)
    if logits.shape[1] != 2 or len(np.unique(y_true)) < 2:
        return None
    p = softmax(logits)[:, 1]
    # Every distinct score is a candidate (at most ~400, by quantile, for large splits); 0.5 first, so a
    # tie keeps the plain rule.
    candidates = np.unique(np.quantile(p, np.linspace(0, 1, 401))) if len(p) > 400 else np.unique(p)
    best, best_score = 0.5, -1.0
    for t in [0.5, *candidates.tolist()]:
        pred = (p >= t).astype(np.int64)
        if objective == "accuracy":
            score = float((pred == y_true).mean())
        elif objective == "f1Macro":
            score = float(f1_score(y_true, pred, average="macro", zero_division=0))
        else:
            score = float(f1_score(y_true, pred, zero_division=0))
        if score > best_score + 1e-12:
            best, best_score = float(t), score
    return best


def regression_metrics(predictions: np.ndarray, y_true: np.ndarray) -> dict[str, Any]:
    err = np.asarray(predictions, dtype=np.float64).reshape(-1) - np.asarray(
        y_true, dtype=np.float64
    ).reshape(-1)
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


def gate(metrics: dict[str, Any], spec: EvaluationSpec) -> dict[str, Any]:
    """Whether the held-out ``spec.metric`` passes ``spec.threshold`` and every ``spec.metrics[]``
    requirement passes its own (the operator adds the comparison with the deployed version, which only
    it knows)."""
    checks = [(spec.metric, spec.metric, spec.threshold)] + [
        (r.key, r.metric, r.threshold) for r in spec.metrics
    ]
    reasons, passed = [], True
    for key, metric, threshold in checks:
        value = metrics.get(key)
        cmp = "<=" if metric in LOWER_IS_BETTER else ">="
        if value is None:
            passed = False
            reasons.append(f"metric {key!r} is not available for this task/data")
            continue
        ok = meets(metric, value, threshold)
        passed = passed and ok
        reasons.append(f"{key} {value:.4f} {'' if ok else 'not '}{cmp} threshold {threshold}")
    return {
        "metric": spec.metric,
        "value": metrics.get(spec.metric),
        "threshold": spec.threshold,
        "lowerIsBetter": spec.metric in LOWER_IS_BETTER,
        "passed": passed,
        "reason": "; ".join(reasons),
    }


def evaluate_deployed(
    version: str, package_uri: str, batches: Iterable[Any], *, label: str, task: str
) -> dict[str, Any]:
    """The deployed ``version`` (its package at ``package_uri``) scored on raw test rows: ``batches`` is an
    iterable of pandas DataFrames holding the features and ``label``, scored batch by batch through the
    package's own transforms, model and decision rule (``serving.model.ScoringModel``).

    Returns ``{"version", "packageUri", "testSamples", "metrics"}`` (scalar metrics only), or with
    ``"error"`` instead of metrics when the package cannot be read or cannot score these rows: the gate
    then fails (not knowing how good the deployed version is, is no reason to pass).
    """
    from conveyor.runtime.package.features import category_key
    from conveyor.runtime.serving.model import ScoringModel

    out: dict[str, Any] = {"version": version, "packageUri": package_uri}
    try:
        model = ScoringModel.open(package_uri, device="cpu")
    except Exception as e:  # PackageError, a storage error, a model that does not load: all "unreadable"
        return {**out, "error": f"the deployed package cannot be read: {type(e).__name__}: {e}"[:1000]}
    if (model.task == "classification") != (task == "classification"):
        return {**out, "error": f"the deployed package is a {model.task} model, this run trains {task}"}
    index = {c: i for i, c in enumerate(model.classes or [])}
    scores, truths, n = [], [], 0
    try:
        for batch in batches:
            if len(batch) == 0:
                continue
            if model.kind == "image":
                raw = np.stack(batch[model.package.schema.get("imageField", "image")].to_numpy()).astype(np.float32)
                x = model.transform(raw[:, None] if raw.ndim == 3 else raw)
            else:
                x = model.transform(batch[[f.name for f in model.package.transforms.features]])
            scores.append(model.forward(x))
            truths.append(batch[label].to_numpy())
            n += len(batch)
    except (KeyError, ValueError, TypeError) as e:
        return {**out, "error": f"the deployed package cannot score this run's test rows: {e}"[:1000]}
    if n == 0:
        return {**out, "error": "the run's test split is empty"}
    y_raw = np.concatenate(truths)
    if model.task == "classification":
        probabilities = np.concatenate(scores)
        y = np.array([index.get(category_key(v), -1) for v in y_raw.tolist()], dtype=np.int64)
        if (y < 0).any():
            unknown = sorted({category_key(v) for v, i in zip(y_raw.tolist(), y.tolist(), strict=True) if i < 0})
            return {**out, "error": f"the run's test split holds label(s) {unknown[:5]} the deployed version "
                    f"does not know (its classes: {model.classes}): they cannot be compared"[:1000]}
        metrics = classification_metrics(np.log(np.clip(probabilities, 1e-12, None)), y, model.classes or [],
                                         model.threshold)
    else:
        metrics = regression_metrics(np.concatenate(scores), y_raw.astype(np.float64))
    scalars = {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }
    return {**out, "testSamples": int(n), "metrics": scalars}
