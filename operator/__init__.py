"""conveyor operator (import as conveyor.operator; run with `python -m conveyor.operator`).

Where things are:
- handlers.py   kopf wiring (watch events -> cache -> work queues) and the two reconcilers
- pipeline.py   MLPipeline -> runs, triggers, RayJob states, gate outcomes, conditions (pure)
- deployment.py ModelDeployment -> stable/canary versions, the hand-off from pipelines, status (pure)
- builders.py   RayJob, run ConfigMap and InferenceService manifests (pure)
- gate.py       the evaluation gate over the registry's package metadata
- conditions.py condition types and their meaning
- kube.py, workqueue.py, metrics.py  the API client, the level-triggered queue, Prometheus metrics
"""
