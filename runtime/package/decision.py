"""The decision rule a classification package ships: which class a row of probabilities means.

A binary model's package may carry ``decisionThreshold`` in schema.json (chosen at training time on a
validation split): the positive (second) class is predicted when its probability reaches the threshold.
Without one, and for more than two classes, the most probable class wins. Evaluation, serving and
anything else that scores apply this one function, so they agree on every row.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def decision_threshold(schema: dict[str, Any]) -> float | None:
    """The package's threshold for the positive class, or None (argmax)."""
    value = schema.get("decisionThreshold")
    classes = schema.get("classes") or []
    return float(value) if value is not None and len(classes) == 2 else None


def decide(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class indices [B] for probabilities [B, K] under the package's decision rule."""
    probabilities = np.asarray(probabilities)
    if threshold is None or probabilities.shape[1] != 2:
        return np.argmax(probabilities, axis=1)
    return (probabilities[:, 1] >= threshold).astype(np.int64)
