"""Typed models of the conveyor API (group conveyor.dev, v1alpha1), shared by the operator and the runtime.

The CRDs in `crds/` are the schema the apiserver enforces (with defaults and CEL rules); these models
mirror them field for field so that Python code reads a spec with types instead of dict lookups. Field
names are the API's camelCase names (aliases); Python attributes are snake_case.

`RunConfig` is what the operator hands a training run (the RayJob's ConfigMap, `run.json`) and what
`python -m conveyor.runtime.train --config run.json` reads: the pipeline's data, features, training,
evaluation and registry sections plus the run's identity.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "conveyor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class _Model(BaseModel):
    # Unknown fields are ignored: the apiserver already pruned them, and a newer CRD must not break an
    # older runtime image reading a ConfigMap.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_api(self) -> dict[str, Any]:
        """The object as the API spells it (camelCase, unset optional fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- MLPipeline: data


ColumnType = Literal["float", "int", "string", "bool", "image"]


class ColumnContract(_Model):
    """One column of the data contract: what every row must satisfy before training starts."""

    name: str
    type: ColumnType = "float"
    nullable: bool = False
    max_null_fraction: float = 0.0
    min: float | None = None
    max: float | None = None
    allowed_values: list[str] | None = None


class LabelContract(_Model):
    """The label column and how balanced its classes must be."""

    name: str = "label"
    min_class_fraction: float = 0.0
    allowed_values: list[str] | None = None


class DataContract(_Model):
    min_rows: int = 1
    columns: list[ColumnContract] = Field(default_factory=list)
    label: LabelContract | None = None


class DataSource(_Model):
    """Where the data comes from. `builtin://digits` and `builtin://fraud` need no download."""

    uri: str
    format: Literal["parquet", "csv", "imagefolder", "builtin"] = "parquet"


class DataSplit(_Model):
    test_fraction: float = 0.2
    seed: int = 42


class DataSpec(_Model):
    source: DataSource
    label: str = "label"
    task: Literal["classification", "regression"] = "classification"
    contract: DataContract = Field(default_factory=DataContract)
    feedback: bool = False
    split: DataSplit = Field(default_factory=DataSplit)


# ---------------------------------------------------------------- MLPipeline: features


TransformType = Literal["standardize", "minMax", "clip", "impute", "oneHot", "bucketize"]


class FeatureTransform(_Model):
    """A declarative transform, fitted on the training split and shipped with the model."""

    type: TransformType
    columns: list[str]
    # clip
    min: float | None = None
    max: float | None = None
    # impute
    strategy: Literal["mean", "median", "mostFrequent", "constant"] | None = None
    value: float | str | None = None
    # bucketize
    boundaries: list[float] | None = None
    # oneHot: categories seen in training beyond this many become "other"
    max_categories: int | None = None


class FeaturesSpec(_Model):
    transforms: list[FeatureTransform] = Field(default_factory=list)


# ---------------------------------------------------------------- MLPipeline: training


class TreesSpec(_Model):
    """Gradient-boosted trees (`architecture: xgboost`)."""

    max_rounds: int = 500
    max_depth: int = 6
    learning_rate: float = 0.1


class ModelArchitecture(_Model):
    """`auto` (the default): `cnn` for images, `xgboost` for tables with a rare class, `mlp` for other
    tables (``training.run.resolve_architecture``; measured by tests/bench/bench_quality.py); or named:
    `mlp` or `xgboost` for tabular data, a torchvision classification model name (`resnet18`, ...) or
    `cnn` for images, `custom` with `module` (`package.module:function` building a torch.nn.Module)."""

    architecture: str = "auto"
    # Measured by tests/bench/bench_quality.py: [64, 32] was 1.4 points of accuracy behind SVC on digits.
    hidden_layers: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    pretrained: bool = False
    module: str | None = None
    trees: TreesSpec = Field(default_factory=TreesSpec)


class Hyperparameters(_Model):
    # A maximum: training stops once the validation loss has not improved for earlyStoppingPatience epochs.
    epochs: int = 100
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    seed: int = 42
    early_stopping_patience: int = 10


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


class PodSettings(_Model):
    """What platform teams set on every pod the operator asks for (training head and workers, predictors):
    identity, environment and credentials, image pull secrets, placement, priority, metadata, security.

    `env`, `envFrom`, `imagePullSecrets`, `affinity` and the security contexts are Kubernetes' own
    shapes (core/v1), checked by the CRD schema and passed to KubeRay and KServe as they are.
    """

    service_account_name: str | None = None
    env: list[dict[str, Any]] = Field(default_factory=list)
    env_from: list[dict[str, Any]] = Field(default_factory=list)
    image_pull_secrets: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    security_context: dict[str, Any] | None = None
    container_security_context: dict[str, Any] | None = None

    def overlaid(self, override: PodSettings | None) -> PodSettings:
        """These settings with a narrower scope's on top (a Ray group's over the training's): labels,
        annotations and env merge (the override wins per key or name), envFrom adds, the rest replace."""
        if override is None:
            return self
        env = {e["name"]: e for e in self.env} | {e["name"]: e for e in override.env}
        return PodSettings(
            service_account_name=override.service_account_name or self.service_account_name,
            env=list(env.values()),
            env_from=[*self.env_from, *override.env_from],
            image_pull_secrets=override.image_pull_secrets or self.image_pull_secrets,
            affinity=override.affinity if override.affinity is not None else self.affinity,
            priority_class_name=override.priority_class_name or self.priority_class_name,
            labels={**self.labels, **override.labels},
            annotations={**self.annotations, **override.annotations},
            security_context=override.security_context
            if override.security_context is not None
            else self.security_context,
            container_security_context=(
                override.container_security_context
                if override.container_security_context is not None
                else self.container_security_context
            ),
        )


class HeadGroup(_Model):
    cpu: str = "1"
    memory: str = "2Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    pod: PodSettings | None = None


class WorkerGroup(_Model):
    name: str = "workers"
    replicas: int = 1
    cpu: str = "1"
    memory: str = "2Gi"
    gpus: int = 0
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    pod: PodSettings | None = None


class TrainingSpec(_Model):
    model: ModelArchitecture = Field(default_factory=ModelArchitecture)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    image: str = "ghcr.io/conveyor-ml/conveyor-runtime:0.1.0"
    ray_version: str = "2.55.1"
    num_workers: int = 1
    use_gpu: bool = False
    head_group: HeadGroup = Field(default_factory=HeadGroup)
    worker_groups: list[WorkerGroup] = Field(default_factory=list)
    pod: PodSettings = Field(default_factory=PodSettings)
    queue: str | None = None
    active_deadline_seconds: int | None = None
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 600


# ---------------------------------------------------------------- MLPipeline: gate, registry, loop


MetricName = Literal["accuracy", "f1Macro", "rocAuc", "rmse", "mae"]

LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "mae"})

# Metrics of one class (the positive class of a binary task when `class` is not named).
PER_CLASS_METRICS: frozenset[str] = frozenset({"precision", "recall", "f1"})

RequirementMetricName = Literal[
    "accuracy", "f1Macro", "rocAuc", "prAuc", "precision", "recall", "f1", "rmse", "mae"
]


def meets(metric: str, value: float, threshold: float) -> bool:
    """Whether ``value`` of ``metric`` reaches ``threshold`` (at most it for error metrics)."""
    return value <= threshold if metric in LOWER_IS_BETTER else value >= threshold


class MetricRequirement(_Model):
    """One more held-out metric a candidate must reach, beside `evaluation.metric`."""

    metric: RequirementMetricName
    threshold: float
    class_name: str | None = Field(default=None, alias="class")

    @property
    def key(self) -> str:
        """Its name in metrics.json: ``recall:<class>`` for a named class, else the metric itself."""
        return f"{self.metric}:{self.class_name}" if self.class_name is not None else self.metric


class EvaluationSpec(_Model):
    """The gate a trained model must pass before it is registered as deployable."""

    metric: MetricName = "accuracy"
    threshold: float = 0.0
    must_beat_deployed: bool = False
    margin: float = 0.0
    metrics: list[MetricRequirement] = Field(default_factory=list)


class RegistrySpec(_Model):
    uri: str
    model_name: str


class DeploySpec(_Model):
    model_deployment: str


class TriggersSpec(_Model):
    schedule: str | None = None
    on_drift: bool = False


class _TrainingSections(_Model):
    """What a training run needs from a pipeline: defined once, for MLPipelineSpec and RunConfig."""

    data: DataSpec
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    registry: RegistrySpec


class MLPipelineSpec(_TrainingSections):
    deploy: DeploySpec | None = None
    triggers: TriggersSpec = Field(default_factory=TriggersSpec)
    runs_history_limit: int = 5
    suspend: bool = False


class DeployedModel(_Model):
    """The version the pipeline's ModelDeployment served when a run started (for mustBeatDeployed): the
    run scores its package on the run's own test split, so the gate compares the two on the same rows."""

    version: str
    package_uri: str


class RunConfig(_TrainingSections):
    """One training run: what `python -m conveyor.runtime.train --config run.json` executes."""

    pipeline: str
    namespace: str = "default"
    run: int
    # Where Ray Train keeps this run's checkpoints so a retried job resumes (shared storage on a cluster);
    # default `<registry.uri>/<registry.modelName>/.checkpoints`.
    checkpoint_uri: str | None = None
    deployed: DeployedModel | None = None

    @classmethod
    def for_run(
        cls,
        spec: MLPipelineSpec,
        *,
        pipeline: str,
        namespace: str,
        run: int,
        deployed: DeployedModel | None = None,
    ) -> RunConfig:
        sections = {name: getattr(spec, name) for name in _TrainingSections.model_fields}
        return cls(pipeline=pipeline, namespace=namespace, run=run, deployed=deployed, **sections)


# ---------------------------------------------------------------- ModelDeployment


class ModelRef(_Model):
    """Which model version serves. `version: latest` follows what `pipeline` last passed through its gate."""

    registry_uri: str
    name: str
    version: str = "latest"
    pipeline: str | None = None


class Batching(_Model):
    max_batch_size: int = 32
    max_latency_ms: int = 5


class ResourceList(_Model):
    cpu: str | None = None
    memory: str | None = None


class Resources(_Model):
    requests: ResourceList = Field(default_factory=ResourceList)
    limits: ResourceList = Field(default_factory=ResourceList)


class ExplainSpec(_Model):
    """``predictor.explain``: whether :explain is served, and its bounds (serve --explain-*)."""

    enabled: bool = False
    max_instances: int = 16
    steps: int = 32


class PredictorSpec(_Model):
    image: str = "ghcr.io/conveyor-ml/conveyor-runtime:0.1.0"
    protocol: Literal["v1", "v2", "grpc-v2"] = "v2"
    workers: int | None = None  # server processes per replica; None: one per whole CPU of the limit
    resources: Resources = Field(default_factory=Resources)
    gpus: int = 0
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    pod: PodSettings = Field(default_factory=PodSettings)
    batching: Batching = Field(default_factory=Batching)
    explain: ExplainSpec = Field(default_factory=ExplainSpec)


class AutoscalingSpec(_Model):
    min_replicas: int = 1
    max_replicas: int = 3
    metric: Literal["concurrency", "rps", "cpu"] = "concurrency"
    target: int = 10


class LatencyCheck(_Model):
    percentile: int = 99
    max_ms: float = 500.0


class MetricCheck(_Model):
    """A custom PromQL check: the query's scalar result must lie within [min, max]."""

    name: str
    query: str
    min: float | None = None
    max: float | None = None


class AnalysisSpec(_Model):
    min_success_rate: float = 0.99
    latency: LatencyCheck | None = None
    checks: list[MetricCheck] = Field(default_factory=list)
    failure_limit: int = 1
    window: str = "1m"
    min_requests: int = 10
    inconclusive_limit: int = 3
    consecutive_error_limit: int = 4
    # Shadow strategy: the lowest share of mirrored requests whose answers agree with the stable ones.
    min_agreement: float | None = None


class ShadowSpec(_Model):
    """strategy: shadow: the stable predictor mirrors `percent` of its requests to the candidate."""

    percent: int = 100
    timeout_ms: int = 2000
    # After a passed analysis: canary (the steps, with analysis) or promote (straight to 100%).
    then: Literal["canary", "promote"] = "canary"


class ExperimentVersion(_Model):
    version: str
    weight: int


class ExperimentSpec(_Model):
    """strategy: abn: several versions at fixed weights for `duration`, then a verdict."""

    versions: list[ExperimentVersion] = Field(default_factory=list)
    duration: str = "1h"
    metric: Literal["accuracy", "successRate"] = "accuracy"
    min_samples: int = 100
    confidence: float = 0.95
    auto_promote: bool = False


DEFAULT_KSERVE_MODE = "Knative"


class RolloutSpec(_Model):
    strategy: Literal["canary", "immediate", "shadow", "abn"] = "canary"
    steps: list[int] = Field(default_factory=lambda: [10, 50, 100])
    interval: str = "1m"
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    shadow: ShadowSpec = Field(default_factory=ShadowSpec)
    experiment: ExperimentSpec | None = None
    # None: the operator's default (Helm value operator.defaultKServeMode), fixed once the
    # InferenceService exists; see conveyor.operator.modeldeployment.validate.with_kserve_mode.
    mode: Literal["Knative", "Standard"] | None = None
    paused: bool = False


class DriftSpec(_Model):
    method: Literal["psi", "ks"] = "psi"
    threshold: float = 0.2


class MonitoringSpec(_Model):
    drift: DriftSpec = Field(default_factory=DriftSpec)
    retrain_pipeline: str | None = None
    interval: str = "1m"
    window: str = "10m"
    min_samples: int = 100
    retrain_cooldown: str = "1h"
    min_accuracy: float | None = None


class ModelDeploymentSpec(_Model):
    model: ModelRef
    predictor: PredictorSpec = Field(default_factory=PredictorSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)


# ---------------------------------------------------------------- BatchPrediction


class BatchModelRef(_Model):
    """The model a batch scores with: a registry version (`registryUri`, `name`, `version`), the latest
    version an MLPipeline passed through its gate (`pipeline`), or a ModelDeployment's stable version
    (`modelDeployment`). The CRD admits exactly one of the three."""

    registry_uri: str | None = None
    name: str | None = None
    version: str = "latest"
    pipeline: str | None = None
    model_deployment: str | None = None


class BatchInput(DataSource):
    """The rows to score (any URI and format training reads) and the columns that identify a row."""

    id_columns: list[str] = Field(default_factory=list)


class BatchOutput(_Model):
    """Where each run writes `<uri>/run-<N>/` (predictions, rejects, `_SUCCESS`)."""

    uri: str


class BatchRaySpec(_Model):
    """The Ray cluster a batch runs on: the training section's cluster fields, built the same way."""

    image: str = "ghcr.io/conveyor-ml/conveyor-runtime:0.1.0"
    ray_version: str = "2.55.1"
    num_workers: int = 1
    use_gpu: bool = False
    head_group: HeadGroup = Field(default_factory=HeadGroup)
    worker_groups: list[WorkerGroup] = Field(default_factory=list)
    pod: PodSettings = Field(default_factory=PodSettings)
    queue: str | None = None
    active_deadline_seconds: int | None = None
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 600


class BatchPredictionSpec(_Model):
    model: BatchModelRef
    input: BatchInput
    output: BatchOutput
    schedule: str | None = None
    batch_size: int = 1024
    ray: BatchRaySpec = Field(default_factory=BatchRaySpec)
    runs_history_limit: int = 5
    suspend: bool = False


class BatchRunConfig(_Model):
    """One batch run: what `python -m conveyor.runtime.batch --config run.json` executes. The operator
    resolves the model to a registry and version (`latest` is resolved by the job when it starts)."""

    batch_prediction: str
    namespace: str = "default"
    run: int
    registry_uri: str
    model_name: str
    version: str = "latest"
    input: BatchInput
    output: BatchOutput
    batch_size: int = 1024
