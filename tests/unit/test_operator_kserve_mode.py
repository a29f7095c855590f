"""Which KServe mode a ModelDeployment gets: its own, else the one its InferenceService already runs in
(KServe cannot switch a live one), else the operator's default (Helm value operator.defaultKServeMode)."""

from __future__ import annotations

import pytest

from conveyor.operator.modeldeployment.build import KSERVE_DEPLOYMENT_MODE, build_inference_service
from conveyor.operator.modeldeployment.validate import kserve_mode_conflict, with_kserve_mode
from conveyor.runtime.spec import ModelDeploymentSpec


def _spec(mode: str | None, **autoscaling) -> ModelDeploymentSpec:
    rollout = {"mode": mode} if mode else {}
    return ModelDeploymentSpec.model_validate(
        {"model": {"registryUri": "file:///r", "name": "m"}, "rollout": rollout,
         "autoscaling": {"minReplicas": 1, "maxReplicas": 2, **autoscaling}}
    )


def _isvc(mode: str | None) -> dict | None:
    return None if mode is None else {"metadata": {"annotations": {KSERVE_DEPLOYMENT_MODE: mode}}}


@pytest.mark.parametrize(
    ("spec_mode", "live_mode", "default", "expected"),
    [
        ("Standard", None, "Knative", "Standard"),   # the spec wins over the default
        (None, None, "Standard", "Standard"),        # unset: the operator's default
        (None, None, "Knative", "Knative"),
        (None, "Knative", "Standard", "Knative"),    # unset, already running: stays as it is
        (None, "Standard", "Knative", "Standard"),
    ],
)
def test_mode_resolution(spec_mode, live_mode, default, expected) -> None:
    resolved = with_kserve_mode(_spec(spec_mode, metric="cpu", target=70), _isvc(live_mode), default)
    assert resolved.rollout.mode == expected


def test_default_mode_reaches_the_inference_service() -> None:
    spec = with_kserve_mode(_spec(None, metric="cpu", target=70), None, "Standard")
    isvc = build_inference_service(
        {"metadata": {"name": "m", "namespace": "ns", "uid": "u"}, "apiVersion": "conveyor.dev/v1alpha1",
         "kind": "ModelDeployment"},
        spec, stable=("v1", "file:///r/m/v1"), candidate=("v2", "file:///r/m/v2"), weight=10,
    )
    assert isvc["metadata"]["annotations"][KSERVE_DEPLOYMENT_MODE] == "Standard"
    assert isvc["spec"]["canary"][0]["trafficPercent"] == 10


def test_switching_a_live_inference_service_is_refused_naming_the_field() -> None:
    message = kserve_mode_conflict(_spec("Standard", metric="cpu", target=70), _isvc("Knative"))
    assert message is not None and message.startswith("spec.rollout.mode") and "Knative" in message
    assert kserve_mode_conflict(_spec("Knative"), _isvc("Knative")) is None
    assert kserve_mode_conflict(_spec(None), _isvc("Standard")) is None
