"""What runs inside pods: training entrypoint, data validation, features, registry, predictor."""
