"""What the ModelDeployment schema cannot check: rules that depend on the KServe mode (the operator's
default, or the live InferenceService's), and versions KServe could not name a predictor after."""

from __future__ import annotations

from typing import Any

from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.modeldeployment.build import KSERVE_DEPLOYMENT_MODE, predictor_name
from conveyor.runtime.spec import DEFAULT_KSERVE_MODE, ModelDeploymentSpec


def validate_deployment(spec: ModelDeploymentSpec) -> None:
    """Raises InvalidSpecError, naming the field, when no InferenceService can be built from this spec
    in its KServe mode."""
    a = spec.autoscaling
    if a.min_replicas > a.max_replicas:
        raise InvalidSpecError("spec.autoscaling.minReplicas", "must not exceed spec.autoscaling.maxReplicas")
    experiment = spec.rollout.experiment
    if spec.rollout.strategy == "abn" and experiment is None:
        raise InvalidSpecError("spec.rollout.experiment", "is required with strategy abn")
    if (spec.rollout.mode or DEFAULT_KSERVE_MODE) == "Knative":
        if spec.rollout.strategy == "abn" and experiment is not None and len(experiment.versions) > 2:
            raise InvalidSpecError(
                "spec.rollout.experiment.versions",
                "KServe's Knative mode splits traffic between two revisions only (canaryTrafficPercent); "
                "more versions need rollout.mode Standard")
        return
    # Standard mode: Kubernetes HPA, which KServe v0.20.0 allows only on cpu or memory, never at 0.
    if a.min_replicas < 1:
        raise InvalidSpecError(
            "spec.autoscaling.minReplicas", "scale to zero (0) needs spec.rollout.mode Knative; use 1 or more"
        )
    if a.metric != "cpu":
        raise InvalidSpecError(
            "spec.autoscaling.metric",
            f"{a.metric!r} is not supported in Standard mode (KServe's HPA autoscaler scales on cpu); "
            "use metric cpu, or rollout.mode Knative",
        )
    if a.target > 100:
        raise InvalidSpecError("spec.autoscaling.target", "for metric cpu it is a utilisation percentage (1..100)")


def validate_version(version: str) -> None:
    """A version KServe can name a predictor after (its Deployment is `<isvc>-<version>-predictor`)."""
    if not predictor_name(version):
        raise InvalidSpecError("spec.model.version", f"version {version!r} has no usable characters")


def with_kserve_mode(
    spec: ModelDeploymentSpec, isvc: dict[str, Any] | None, default: str = DEFAULT_KSERVE_MODE
) -> ModelDeploymentSpec:
    """The spec with its KServe mode settled: `spec.rollout.mode` when set; otherwise the mode its live
    InferenceService was created in (KServe cannot switch a running one), else the operator's default."""
    if spec.rollout.mode is not None:
        return spec
    mode = settled_kserve_mode(None, isvc, default)
    return spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"mode": mode})})


def settled_kserve_mode(mode: str | None, isvc: dict[str, Any] | None, default: str = DEFAULT_KSERVE_MODE) -> str:
    """The rule `with_kserve_mode` applies, for a mode read from a raw object: `mode` (`spec.rollout.mode`)
    when set, else the live InferenceService's, else the operator's default."""
    return mode or live_kserve_mode(isvc) or default


def kserve_mode_conflict(spec: ModelDeploymentSpec, isvc: dict[str, Any] | None) -> str | None:
    """Why the spec's mode cannot apply to the live InferenceService (KServe cannot switch modes), if so."""
    live = live_kserve_mode(isvc)
    if live is not None and spec.rollout.mode not in (None, live):
        return (
            f"spec.rollout.mode: the InferenceService runs in {live} mode and KServe cannot switch it to "
            f"{spec.rollout.mode}; set it back to {live}, or create a new ModelDeployment"
        )
    return None


def live_kserve_mode(isvc: dict[str, Any] | None) -> str | None:
    """The mode the InferenceService was created in, if it exists and says so."""
    annotations = ((isvc or {}).get("metadata") or {}).get("annotations") or {}
    live = annotations.get(KSERVE_DEPLOYMENT_MODE)
    return live if live in ("Knative", "Standard") else None
