"""MLPipeline -> RayJob runs, the evaluation gate and the hand-off to a ModelDeployment."""
