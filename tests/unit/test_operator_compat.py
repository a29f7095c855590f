"""Schema compatibility before a canary, pure: what breaks the stable version's clients, and the plan
holding such a candidate back with Compatible=False naming the field."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.operator.controller import conditions as c
from conveyor.operator.modeldeployment.compat import COMPATIBLE, Compatibility, problems
from conveyor.operator.modeldeployment.plan import Resolution, plan_deployment
from conveyor.runtime.spec import ModelDeploymentSpec

NOW = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
STABLE = {"kind": "tabular", "features": [{"name": "amount", "type": "float"}, {"name": "hour", "type": "int"},
                                          {"name": "merchant", "type": "string"}]}


def schema(*features: dict[str, Any], kind: str = "tabular") -> dict[str, Any]:
    return {"kind": kind, "features": list(features)}


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (STABLE, []),
        (schema({"name": "amount", "type": "float"}, {"name": "hour", "type": "float"}, {"name": "merchant", "type": "string"}), []),
        (schema(*STABLE["features"], {"name": "device", "type": "string", "nullable": True}), []),
        (schema({"name": "amount", "type": "float"}, {"name": "hour", "type": "int"}), ["input merchant was removed"]),
        (schema({"name": "amount", "type": "string"}, {"name": "hour", "type": "int"}, {"name": "merchant", "type": "string"}),
         ["input amount changed type from float to string"]),
        (schema(*STABLE["features"], {"name": "device", "type": "string"}),
         ["input device is new and required (clients do not send it yet)"]),
        (schema(kind="image"), ["input kind changed from tabular to image"]),
    ],
)
def test_what_breaks_the_stable_versions_clients(candidate: dict[str, Any], expected: list[str]) -> None:
    assert problems(STABLE, candidate) == expected


def _plan(status: dict[str, Any], compatibility: Compatibility | None) -> Any:
    obj = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 3},
        "spec": {"model": {"registryUri": "file:///r", "name": "fraud"}},
        "status": status,
    }
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    return plan_deployment(obj, spec, None, Resolution("v2", "test"), None, lambda v: f"file:///r/fraud/{v}", NOW,
                           compatibility=compatibility)


def test_an_incompatible_candidate_never_reaches_the_canary() -> None:
    first = plan_deployment(
        {"apiVersion": "conveyor.dev/v1alpha1", "kind": "ModelDeployment",
         "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 3},
         "spec": {"model": {"registryUri": "file:///r", "name": "fraud"}}, "status": {}},
        ModelDeploymentSpec.model_validate({"model": {"registryUri": "file:///r", "name": "fraud"}}),
        None, Resolution("v1", "test"), None, lambda v: f"file:///r/fraud/{v}", NOW,
    )
    refused = _plan(first.status, Compatibility("v1", "v2", ("input merchant was removed",)))
    assert refused.status["stableVersion"] == "v1" and "canaryVersion" not in refused.status
    cond = c.get_condition(refused.status["conditions"], COMPATIBLE)
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "SchemaIncompatible")
    assert "merchant" in cond["message"] and "v2" in cond["message"]
    assert ("Warning", "SchemaIncompatible") in [e[:2] for e in refused.events]
    assert not any(e[1] == "CanaryStarted" for e in refused.events)
    again = _plan(refused.status, Compatibility("v1", "v2", ("input merchant was removed",)))
    assert not any(e[1] == "SchemaIncompatible" for e in again.events)  # the event marks the turn only

    accepted = _plan(first.status, Compatibility("v1", "v2"))
    assert accepted.status.get("canaryVersion") == "v2"
    cond = c.get_condition(accepted.status["conditions"], COMPATIBLE)
    assert cond is not None and cond["status"] == "True"
