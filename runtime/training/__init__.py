"""Training: ``prepare`` (ingest, validate, split, fit transforms), ``loop`` (Ray Train), ``run`` (the whole
run and its registration; ``python -m conveyor.runtime.train``), ``data``, ``models``, ``evaluate``,
``samples`` (small real runs for tests)."""
