"""Batch scoring: ``python -m conveyor.runtime.batch --config run.json`` (a BatchPrediction's run)."""
