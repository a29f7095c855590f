"""ModelDeployment -> KServe InferenceService: version resolution, rollout, status."""
