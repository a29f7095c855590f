"""What runs inside pods, one subpackage per role:

- ``spec``: the API models (MLPipeline, ModelDeployment, the run config); torch-free, the operator imports it;
- ``package``: the model package format (registry, features, profile, data contract, drift); torch-free;
- ``training``: the training run on Ray Train (``python -m conveyor.runtime.train``);
- ``serving``: the predictor on KServe's model server (``python -m conveyor.runtime.serve``).
"""
