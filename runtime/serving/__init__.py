"""Serving on KServe's model server: ``server`` (the process, ``python -m conveyor.runtime.serve``),
``predictor`` (the ``kserve.Model``), ``batching`` (dynamic batching), ``metrics`` (Prometheus metrics,
drift gauges, feedback)."""
