"""Held-out evaluation and the pipeline's gate.

Classification: accuracy, macro F1, ROC AUC (binary only), confusion matrix (rows = true class,
columns = predicted, in ``classes`` order). Regression: RMSE and MAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from conveyor.runtime.spec import LOWER_IS_BETTER, EvaluationSpec


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    pred = logits.argmax(axis=1)
    labels = list(range(len(classes)))
    out: dict[str, Any] = {
        "accuracy": float((pred == y_true).mean()),
        "f1Macro": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "confusionMatrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
        "classes": list(classes),
    }
    if len(classes) == 2:
        # AUC is undefined when the test split holds one class only.
        present = np.unique(y_true)
        out["rocAuc"] = float(roc_auc_score(y_true, softmax(logits)[:, 1])) if len(present) == 2 else None
    return out


def regression_metrics(predictions: np.ndarray, y_true: np.ndarray) -> dict[str, Any]:
    err = np.asarray(predictions, dtype=np.float64).reshape(-1) - np.asarray(
        y_true, dtype=np.float64
    ).reshape(-1)
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


def gate(metrics: dict[str, Any], spec: EvaluationSpec) -> dict[str, Any]:
    """Whether the held-out ``spec.metric`` passes ``spec.threshold`` (the operator adds the comparison
    with the deployed version, which only it knows)."""
    value = metrics.get(spec.metric)
    lower = spec.metric in LOWER_IS_BETTER
    if value is None:
        passed, reason = False, f"metric {spec.metric!r} is not available for this task/data"
    else:
        passed = value <= spec.threshold if lower else value >= spec.threshold
        cmp = "<=" if lower else ">="
        reason = f"{spec.metric} {value:.4f} {'' if passed else 'not '}{cmp} threshold {spec.threshold}"
    return {
        "metric": spec.metric,
        "value": value,
        "threshold": spec.threshold,
        "lowerIsBetter": lower,
        "passed": passed,
        "reason": reason,
    }
