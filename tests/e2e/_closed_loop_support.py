"""Helpers of the closed-loop e2e test and its benchmark: traffic from the fraud generator (in
distribution or shifted), a small retraining pipeline, the Drifted condition."""

from __future__ import annotations

import math
from typing import Any

NAME = "fraud"


def rows(n: int, *, seed: int, shift: bool = False) -> list[dict[str, Any]]:
    """Card transactions from the generator the model was trained on (shifted: big, far-away purchases)."""
    from conveyor.runtime.training.data import fraud_frame

    frame = fraud_frame(rows=n, seed=seed, fraud_rate=0.1).drop(columns=["label"])
    if shift:
        frame["amount"] = frame["amount"] * 25
        frame["distance_km"] = frame["distance_km"] * 40
    out = frame.to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in out]


def pipeline_spec(registry: str, **over: Any) -> dict[str, Any]:
    spec = {
        "data": {"source": {"uri": "builtin://fraud?rows=1000&seed=7&fraudRate=0.1", "format": "builtin"},
                 "label": "label"},
        "features": {"transforms": [{"type": "standardize", "columns": ["amount", "distance_km"]},
                                    {"type": "impute", "columns": ["distance_km"], "strategy": "median"},
                                    {"type": "oneHot", "columns": ["merchant"]}]},
        "training": {"model": {"architecture": "mlp", "hiddenLayers": [16]},
                     "hyperparameters": {"epochs": 1, "batchSize": 128}},
        "evaluation": {"metric": "rocAuc", "threshold": 0.5},
        "registry": {"uri": registry, "modelName": NAME},
        "deploy": {"modelDeployment": NAME},
        "triggers": {"onDrift": True},
    }
    spec.update(over)
    return spec


def drifted(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == "Drifted"), {})
