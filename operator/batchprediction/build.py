"""The children of a BatchPrediction run, pure: a spec and the resolved model in, the manifests out.

- `build_rayjob(bp, spec, run, model, trigger)` -> the KubeRay RayJob of run N: the Ray cluster of
  `spec.ray` (controller/raycluster.py, as training's), the entrypoint `python -m conveyor.runtime.batch`.
- `build_run_configmap(bp, spec, run, model, rayjob)` -> the ConfigMap holding the run's
  `BatchRunConfig` as `run.json`, owned by the RayJob (collected with it).

Builders assume a spec that `validate.validate_batch` accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from conveyor.operator.controller.children import (
    LABEL_MANAGED_BY,
    MANAGED_BY,
    owner_reference,
    spec_digest,
    stamp,
)
from conveyor.operator.controller.raycluster import (
    LABEL_KUEUE_QUEUE,
    RUN_CONFIG_DIR,
    RUN_CONFIG_FILE,
    ray_cluster,
    submitter_template,
)
from conveyor.operator.controller.runs import (
    ANNOTATION_RERUN,
    ANNOTATION_SPEC_GENERATION,
    ANNOTATION_SPEC_HASH,
    ANNOTATION_TRIGGER,
    LABEL_RUN,
)
from conveyor.runtime.spec import BatchPredictionSpec, BatchRunConfig

LABEL_BATCH = "conveyor.dev/batchprediction"
ANNOTATION_MODEL = "conveyor.dev/model"
# Spec fields whose change does not ask for a new run.
NON_SCORING_FIELDS = ("schedule", "runsHistoryLimit", "suspend")


@dataclass(frozen=True)
class ResolvedModel:
    """The registry and version a run scores with (`latest` is resolved by the job when it starts)."""

    registry_uri: str
    name: str
    version: str

    def describe(self) -> str:
        return f"{self.registry_uri.rstrip('/')}/{self.name}/{self.version}"


def spec_hash(spec: dict[str, Any]) -> str:
    """Digest of the scoring-relevant part of a BatchPrediction spec (a change starts a new run)."""
    return spec_digest(spec, NON_SCORING_FIELDS)


def rayjob_name(batch: str, run: int) -> str:
    # "-batch-" keeps a BatchPrediction's RayJobs apart from an MLPipeline's of the same name.
    return f"{batch}-batch-{run}"


def run_configmap_name(batch: str, run: int) -> str:
    return f"{rayjob_name(batch, run)}-config"


def run_labels(batch: str, run: int) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_BATCH: batch, LABEL_RUN: str(run)}


def build_rayjob(
    bp: dict[str, Any], spec: BatchPredictionSpec, run: int, model: ResolvedModel, trigger: str = ""
) -> dict[str, Any]:
    meta = bp["metadata"]
    r = spec.ray
    config_map = run_configmap_name(meta["name"], run)
    labels = run_labels(meta["name"], run)
    if r.queue:
        labels[LABEL_KUEUE_QUEUE] = r.queue
    job_spec: dict[str, Any] = {
        "entrypoint": f"python -m conveyor.runtime.batch --config {RUN_CONFIG_DIR}/{RUN_CONFIG_FILE}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": r.ttl_seconds_after_finished,
        "backoffLimit": r.backoff_limit,
        "rayClusterSpec": ray_cluster(r, config_map),
        "submitterPodTemplate": submitter_template(r),
    }
    if r.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = r.active_deadline_seconds
    annotations = {
        ANNOTATION_SPEC_HASH: spec_hash(bp.get("spec") or {}),
        ANNOTATION_SPEC_GENERATION: str(meta.get("generation", "")),
        ANNOTATION_MODEL: model.describe(),
    }
    if trigger:
        annotations[ANNOTATION_TRIGGER] = trigger
    token = (meta.get("annotations") or {}).get(ANNOTATION_RERUN)
    if token:
        annotations[ANNOTATION_RERUN] = token
    return stamp(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {
                "name": rayjob_name(meta["name"], run),
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [owner_reference(bp)],
            },
            "spec": job_spec,
        }
    )


def build_run_config(bp: dict[str, Any], spec: BatchPredictionSpec, run: int, model: ResolvedModel) -> BatchRunConfig:
    meta = bp["metadata"]
    return BatchRunConfig(
        batch_prediction=meta["name"],
        namespace=meta["namespace"],
        run=run,
        registry_uri=model.registry_uri,
        model_name=model.name,
        version=model.version,
        input=spec.input,
        output=spec.output,
        batch_size=spec.batch_size,
    )


def build_run_configmap(
    bp: dict[str, Any], spec: BatchPredictionSpec, run: int, model: ResolvedModel, rayjob: dict[str, Any]
) -> dict[str, Any]:
    """run.json for `python -m conveyor.runtime.batch --config`, owned by the run's RayJob."""
    meta = bp["metadata"]
    config = build_run_config(bp, spec, run, model)
    return stamp(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": run_configmap_name(meta["name"], run),
                "namespace": meta["namespace"],
                "labels": run_labels(meta["name"], run),
                "ownerReferences": [owner_reference(rayjob, controller=False)],
            },
            "data": {RUN_CONFIG_FILE: json.dumps(config.to_api(), indent=2, sort_keys=True)},
        }
    )
