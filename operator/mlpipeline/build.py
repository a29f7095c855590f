"""The children of an MLPipeline run, pure: a spec in, the manifests out. No I/O; unit-tested table-style.

- `build_rayjob(pipeline, spec, run)` -> the KubeRay RayJob (ray.io/v1) of run N of a pipeline.
- `build_run_configmap(pipeline, spec, run, rayjob, deployed)` -> the ConfigMap holding that run's
  `RunConfig` as `run.json` (with mustBeatDeployed, the deployed version and its package URI, which the
  run scores on its own test split), owned by the RayJob (collected with it).

Builders assume a spec that `validate.validate_pipeline` accepted.
"""

from __future__ import annotations

import json
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
from conveyor.operator.controller.raycluster import worker_groups as cluster_worker_groups
from conveyor.operator.controller.runs import (
    ANNOTATION_RERUN,
    ANNOTATION_SPEC_GENERATION,
    ANNOTATION_SPEC_HASH,
    ANNOTATION_TRIGGER,
    LABEL_RUN,
)
from conveyor.runtime.spec import DeployedModel, MLPipelineSpec, RunConfig, WorkerGroup

LABEL_PIPELINE = "conveyor.dev/pipeline"
ANNOTATION_RUN_CONFIG = "conveyor.dev/run-config"

# Spec fields whose change does not ask for retraining.
NON_TRAINING_FIELDS = ("triggers", "deploy", "runsHistoryLimit", "suspend")


def spec_hash(spec: dict[str, Any]) -> str:
    """Digest of the training-relevant part of an MLPipeline spec (a change starts a new run)."""
    return spec_digest(spec, NON_TRAINING_FIELDS)


def rayjob_name(pipeline: str, run: int) -> str:
    return f"{pipeline}-{run}"


def run_configmap_name(pipeline: str, run: int) -> str:
    return f"{pipeline}-{run}-config"


def run_labels(pipeline: str, run: int) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_PIPELINE: pipeline, LABEL_RUN: str(run)}


def worker_groups(spec: MLPipelineSpec) -> list[WorkerGroup]:
    """The explicit worker groups, or one group of `numWorkers` replicas (one GPU each with useGpu)."""
    return cluster_worker_groups(spec.training)


def build_rayjob(pipeline: dict[str, Any], spec: MLPipelineSpec, run: int, trigger: str = "") -> dict[str, Any]:
    """The RayJob of run `run`: the cluster from spec.training, the entrypoint training with run.json."""
    meta = pipeline["metadata"]
    t = spec.training
    config_map = run_configmap_name(meta["name"], run)
    labels = run_labels(meta["name"], run)
    if t.queue:
        labels[LABEL_KUEUE_QUEUE] = t.queue
    job_spec: dict[str, Any] = {
        "entrypoint": f"python -m conveyor.runtime.train --config {RUN_CONFIG_DIR}/{RUN_CONFIG_FILE} --exit-zero-when-reported",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": t.ttl_seconds_after_finished,
        "backoffLimit": t.backoff_limit,
        "rayClusterSpec": ray_cluster(t, config_map),
        "submitterPodTemplate": submitter_template(t),
    }
    if t.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = t.active_deadline_seconds
    # With a Kueue queue, Kueue's webhook suspends the job and admits it: we never set `suspend`, so
    # the field stays Kueue's.
    return stamp(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {
                "name": rayjob_name(meta["name"], run),
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": run_annotations(pipeline, config_map, trigger),
                "ownerReferences": [owner_reference(pipeline)],
            },
            "spec": job_spec,
        }
    )


def run_annotations(pipeline: dict[str, Any], config_map: str, trigger: str) -> dict[str, str]:
    meta = pipeline["metadata"]
    annotations = {
        ANNOTATION_RUN_CONFIG: config_map,
        ANNOTATION_SPEC_HASH: spec_hash(pipeline.get("spec") or {}),
        ANNOTATION_SPEC_GENERATION: str(meta.get("generation", "")),
    }
    if trigger:
        annotations[ANNOTATION_TRIGGER] = trigger
    token = (meta.get("annotations") or {}).get(ANNOTATION_RERUN)
    if token:
        annotations[ANNOTATION_RERUN] = token
    return annotations


def build_run_config(
    pipeline: dict[str, Any], spec: MLPipelineSpec, run: int, deployed: DeployedModel | None = None
) -> RunConfig:
    """The run's config; `deployed` (the version the target serves, with mustBeatDeployed) is scored by the
    run on its own test split, so the gate compares both on the same rows."""
    meta = pipeline["metadata"]
    if not spec.evaluation.must_beat_deployed:
        deployed = None
    return RunConfig.for_run(spec, pipeline=meta["name"], namespace=meta["namespace"], run=run, deployed=deployed)


def build_run_configmap(
    pipeline: dict[str, Any],
    spec: MLPipelineSpec,
    run: int,
    rayjob: dict[str, Any],
    deployed: DeployedModel | None = None,
) -> dict[str, Any]:
    """run.json for `python -m conveyor.runtime.train --config`, owned by the run's RayJob."""
    meta = pipeline["metadata"]
    config = build_run_config(pipeline, spec, run, deployed)
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
