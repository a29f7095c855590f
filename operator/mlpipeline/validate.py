"""What the MLPipeline schema cannot check: names KubeRay would refuse, worker groups named twice."""

from __future__ import annotations

from typing import Any

from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.mlpipeline.build import rayjob_name, worker_groups
from conveyor.runtime.spec import MLPipelineSpec

# KubeRay derives the RayCluster and submitter Job names from the RayJob name; its validation
# refuses RayJob names longer than this.
MAX_RAYJOB_NAME = 47
# Leaves room for '-' and a run number of up to six digits.
MAX_PIPELINE_NAME = 40


def validate_pipeline(pipeline: dict[str, Any], spec: MLPipelineSpec, next_run: int) -> None:
    """Raises InvalidSpecError, naming the field, when no RayJob can be built from this spec."""
    name = pipeline["metadata"]["name"]
    if len(name) > MAX_PIPELINE_NAME or len(rayjob_name(name, next_run)) > MAX_RAYJOB_NAME:
        raise InvalidSpecError(
            "metadata.name",
            f"RayJob names <pipeline>-<run> must fit KubeRay's {MAX_RAYJOB_NAME} characters; "
            f"use a pipeline name of at most {MAX_PIPELINE_NAME} characters",
        )
    seen: set[str] = set()
    for i, group in enumerate(worker_groups(spec)):
        if group.name in seen:
            raise InvalidSpecError(f"spec.training.workerGroups[{i}].name", f"group name {group.name!r} is used twice")
        seen.add(group.name)

