"""What the BatchPrediction schema cannot check: names KubeRay would refuse, worker groups named twice."""

from __future__ import annotations

from typing import Any

from conveyor.operator.batchprediction.build import rayjob_name
from conveyor.operator.controller.raycluster import worker_groups
from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.mlpipeline.validate import MAX_RAYJOB_NAME
from conveyor.runtime.spec import BatchPredictionSpec

# Leaves room for "-batch-" and a run number of up to six digits.
MAX_BATCH_NAME = MAX_RAYJOB_NAME - len("-batch-") - 6


def validate_batch(bp: dict[str, Any], spec: BatchPredictionSpec, next_run: int) -> None:
    """Raises InvalidSpecError, naming the field, when no RayJob can be built from this spec."""
    name = bp["metadata"]["name"]
    if len(name) > MAX_BATCH_NAME or len(rayjob_name(name, next_run)) > MAX_RAYJOB_NAME:
        raise InvalidSpecError(
            "metadata.name",
            f"RayJob names <name>-batch-<run> must fit KubeRay's {MAX_RAYJOB_NAME} characters; "
            f"use a name of at most {MAX_BATCH_NAME} characters",
        )
    seen: set[str] = set()
    for i, group in enumerate(worker_groups(spec.ray)):
        if group.name in seen:
            raise InvalidSpecError(f"spec.ray.workerGroups[{i}].name", f"group name {group.name!r} is used twice")
        seen.add(group.name)
