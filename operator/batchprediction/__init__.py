"""The BatchPrediction kind: reconcile.py (observe -> plan -> act), plan.py, build.py, validate.py."""
