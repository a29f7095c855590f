"""Small, real runs of the built-in data sets that train in seconds on a CPU (tests and samples)."""

from __future__ import annotations

from typing import Any

from conveyor.runtime.spec import RunConfig
from conveyor.runtime.training import data as data_mod

FRAUD_TRANSFORMS = [
    {"type": "impute", "columns": ["distance_km"], "strategy": "median"},
    {"type": "clip", "columns": ["amount"], "min": 0, "max": 5000},
    {"type": "standardize", "columns": ["amount", "card_age_days", "distance_km", "txn_last_hour"]},
    {"type": "oneHot", "columns": ["merchant"]},
    {"type": "bucketize", "columns": ["hour"], "boundaries": [6, 12, 18]},
]


def quick_config(
    dataset: str,
    registry_uri: str,
    *,
    model_name: str | None = None,
    pipeline: str = "quick",
    run: int = 1,
    **data,
) -> RunConfig:
    """A small, real run of a built-in set that trains in seconds on a CPU: ``fraud`` (tabular MLP with
    every transform kind, ROC AUC ~0.85) or ``digits`` (8x8 images, small CNN, accuracy ~0.95).
    ``data`` overrides builtin query parameters (``rows=...``, ``seed=...``)."""
    if dataset == "fraud":
        params = {"rows": 8000, "seed": 7, **data}
        query = "&".join(f"{k}={v}" for k, v in params.items())
        raw: dict[str, Any] = {
            "data": {
                "source": {"uri": f"builtin://fraud?{query}", "format": "builtin"},
                "contract": {
                    "minRows": 1000,
                    "columns": [
                        {"name": "amount", "type": "float", "min": 0},
                        {"name": "merchant", "type": "string", "allowedValues": list(data_mod.MERCHANTS)},
                        {"name": "hour", "type": "int", "min": 0, "max": 23},
                        {"name": "foreign", "type": "bool"},
                        {"name": "card_age_days", "type": "int", "min": 0},
                        {
                            "name": "distance_km",
                            "type": "float",
                            "min": 0,
                            "nullable": True,
                            "maxNullFraction": 0.1,
                        },
                        {"name": "txn_last_hour", "type": "int", "min": 0},
                    ],
                    "label": {"name": "label", "allowedValues": ["0", "1"], "minClassFraction": 0.005},
                },
            },
            "features": {"transforms": FRAUD_TRANSFORMS},
            "training": {
                "model": {"architecture": "mlp", "hiddenLayers": [32, 16]},
                "hyperparameters": {"epochs": 4, "batchSize": 128, "learningRate": 0.01},
            },
            "evaluation": {"metric": "rocAuc", "threshold": 0.75},
        }
    elif dataset == "digits":
        raw = {
            "data": {
                "source": {"uri": "builtin://digits", "format": "builtin"},
                "contract": {
                    "minRows": 1000,
                    "columns": [{"name": "image", "type": "image", "min": 0, "max": 16}],
                    "label": {"name": "label", "minClassFraction": 0.05},
                },
            },
            "training": {
                "model": {"architecture": "cnn"},
                "hyperparameters": {"epochs": 10, "batchSize": 64, "learningRate": 0.005},
            },
            "evaluation": {"metric": "accuracy", "threshold": 0.9},
        }
    else:
        raise ValueError(f"quick_config: dataset must be 'fraud' or 'digits', got {dataset!r}")
    raw.update(
        {
            "pipeline": pipeline,
            "run": run,
            "registry": {"uri": registry_uri, "modelName": model_name or dataset},
        }
    )
    return RunConfig.model_validate(raw)
