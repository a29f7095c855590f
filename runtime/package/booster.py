"""A gradient-boosted trees model (XGBoost) as a package holds it: ``model.ubj``, XGBoost's own format.

``BoosterModel`` is what ``ModelPackage.load_model`` returns for ``modelKind: xgboost``: numpy rows (the
package's transformed features) in, class probabilities [B, K] or values [B] out. ``logits`` gives log
probabilities, so the evaluation that softmaxes a torch model's logits reads a booster the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def objective_for(task: str, classes: int) -> dict[str, Any]:
    """XGBoost's objective and evaluation metric for a task (one definition for training and loading)."""
    if task != "classification":
        return {"objective": "reg:squarederror", "eval_metric": "rmse"}
    if classes == 2:
        return {"objective": "binary:logistic", "eval_metric": "logloss"}
    return {"objective": "multi:softprob", "num_class": classes, "eval_metric": "mlogloss"}


@dataclass
class BoosterModel:
    booster: Any  # xgboost.Booster
    task: str
    classes: int

    @classmethod
    def from_bytes(cls, data: bytes, *, task: str, classes: int) -> BoosterModel:
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(bytearray(data))
        return cls(booster, task, classes)

    def to_bytes(self) -> bytes:
        return bytes(self.booster.save_raw(raw_format="ubj"))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [B, K] (classification) or values [B] (regression)."""
        out = np.asarray(self.booster.inplace_predict(np.asarray(x, dtype=np.float32)), dtype=np.float32)
        if self.task != "classification":
            return out.reshape(-1)
        if self.classes == 2 and out.ndim == 1:
            return np.stack([1.0 - out, out], axis=1)
        return out.reshape(len(x), self.classes)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Log probabilities [B, K] (their softmax is the probabilities), or values [B, 1] (regression)."""
        p = self.predict(x)
        if self.task != "classification":
            return p.reshape(-1, 1)
        return np.log(np.clip(p, 1e-12, 1.0))
