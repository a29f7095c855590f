"""The Argo CD health checks (manifests/argocd/health/*.lua) run by a real Lua interpreter.

Argo CD runs these scripts in gopher-lua (Lua 5.1) with the live object bound to `obj`; here Debian's
lua5.4 (and lua5.1 where installed, the dialect Argo CD speaks) runs them against sample statuses of
the shape the operator writes, and the verdict is what Argo CD's UI would show.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from _chart_support import HEALTH_DIR, lua_health  # noqa: E402 - the support module lives beside the integration tests

INTERPRETERS = [name for name in ("lua5.4", "lua5.1") if shutil.which(name)]


def cond(kind: str, status: str, reason: str = "", message: str = "", generation: int = 1) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-11-22T10:00:00Z",
    }


def obj(kind: str, status: dict[str, Any] | None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "fraud", "namespace": "ml", "generation": generation},
        "spec": spec,
    }
    if status is not None:
        body["status"] = status
    return body


MD = "ModelDeployment"
MDEP_CASES = [
    ("not yet seen by the operator", obj(MD, None), "Progressing", "observe"),
    (
        "spec changed, not observed yet",
        obj(MD, {"observedGeneration": 1, "conditions": [cond("Ready", "True", "Serving")]}, generation=2),
        "Progressing",
        "generation 2",
    ),
    (
        "serving the stable version",
        obj(
            MD,
            {
                "observedGeneration": 3,
                "stableVersion": "v4",
                "url": "http://fraud.ml.example.com",
                "conditions": [
                    cond("Ready", "True", "InferenceServiceReady", generation=3),
                    cond("Progressing", "False", "Stable", generation=3),
                    cond("Degraded", "False", "AsExpected", generation=3),
                ],
            },
            generation=3,
        ),
        "Healthy",
        "Serving v4 at http://fraud.ml.example.com",
    ),
    (
        "canary at its first step",
        obj(
            MD,
            {
                "observedGeneration": 1,
                "stableVersion": "v4",
                "canaryVersion": "v5",
                "canaryWeight": 10,
                "conditions": [
                    cond("Ready", "True", "InferenceServiceReady"),
                    cond("Progressing", "True", "CanaryStep", "v5 at 10% of traffic"),
                    cond("Degraded", "False", "AsExpected"),
                ],
            },
        ),
        "Progressing",
        "Progressing=True (CanaryStep): v5 at 10% of traffic",
    ),
    (
        "canary rolled back",
        obj(
            MD,
            {
                "observedGeneration": 1,
                "stableVersion": "v4",
                "conditions": [
                    cond("Ready", "True", "InferenceServiceReady"),
                    cond("Progressing", "False", "RolledBack"),
                    cond("Degraded", "True", "RolledBack", "v5 failed analysis: success rate 0.91 < 0.99"),
                ],
            },
        ),
        "Degraded",
        "success rate 0.91 < 0.99",
    ),
    (
        "canary paused for a person",
        obj(
            MD,
            {
                "observedGeneration": 1,
                "stableVersion": "v4",
                "canaryVersion": "v5",
                "canaryWeight": 10,
                "rolloutPhase": "Paused",
                "pauseReason": "InconclusiveAnalysis",
                "pauseMessage": "4 inconclusive analyses at 10%",
                "conditions": [
                    cond("Ready", "True", "InferenceServiceReady"),
                    cond("Progressing", "Unknown", "RolloutPaused", "v5 held at 10%"),
                    cond("Degraded", "False", "AsExpected"),
                ],
            },
        ),
        "Suspended",
        "Rollout paused (InconclusiveAnalysis): 4 inconclusive analyses at 10%",
    ),
    (
        "InferenceService failed",
        obj(
            MD,
            {
                "observedGeneration": 1,
                "conditions": [
                    cond("Ready", "False", "InferenceServiceFailed", "predictor: CrashLoopBackOff"),
                    cond("Progressing", "False", "Stalled"),
                ],
            },
        ),
        "Degraded",
        "Ready=False (InferenceServiceFailed): predictor: CrashLoopBackOff",
    ),
    (
        "InferenceService starting",
        obj(MD, {"observedGeneration": 1, "conditions": [cond("Ready", "Unknown", "InferenceServicePending")]}),
        "Progressing",
        "Ready=Unknown (InferenceServicePending)",
    ),
    (
        "Ready computed from the previous spec",
        obj(
            MD,
            {"observedGeneration": 2, "conditions": [cond("Ready", "True", "InferenceServiceReady", generation=1)]},
            generation=2,
        ),
        "Progressing",
        "Ready=True",
    ),
    (
        "serving but drifted",
        obj(
            MD,
            {
                "observedGeneration": 1,
                "stableVersion": "v4",
                "conditions": [
                    cond("Ready", "True", "InferenceServiceReady"),
                    cond("Drifted", "True", "DriftOverThreshold", "psi 0.31 > 0.2"),
                ],
            },
        ),
        "Healthy",
        "Drifted=True (DriftOverThreshold): psi 0.31 > 0.2",
    ),
]

MP = "MLPipeline"
STAGES = ("DataValidated", "Trained", "Evaluated", "Registered", "Succeeded")
MLP_CASES = [
    ("not yet seen by the operator", obj(MP, None), "Progressing", "observe"),
    (
        "spec changed, not observed yet",
        obj(MP, {"observedGeneration": 2, "conditions": [cond(s, "True") for s in STAGES]}, generation=3),
        "Progressing",
        "generation 3",
    ),
    (
        "latest run succeeded",
        obj(
            MP,
            {
                "observedGeneration": 1,
                "latestVersion": "v7",
                "latestMetric": "accuracy=0.962",
                "conditions": [cond(s, "True", "Passed") for s in STAGES],
            },
        ),
        "Healthy",
        "Latest version v7 (accuracy=0.962)",
    ),
    (
        "training running",
        obj(
            MP,
            {
                "observedGeneration": 1,
                "conditions": [
                    cond("DataValidated", "True", "ContractSatisfied"),
                    cond("Trained", "Unknown", "RayJobRunning", "RayJob fraud-3 is RUNNING"),
                    cond("Evaluated", "Unknown", "Pending"),
                    cond("Registered", "Unknown", "Pending"),
                    cond("Succeeded", "Unknown", "Running"),
                ],
            },
        ),
        "Progressing",
        "Trained=Unknown (RayJobRunning): RayJob fraud-3 is RUNNING",
    ),
    (
        "data contract violated",
        obj(
            MP,
            {
                "observedGeneration": 1,
                "conditions": [
                    cond("DataValidated", "False", "ContractViolated", "column amount: 12 values below min 0"),
                    cond("Succeeded", "Unknown", "Running"),
                ],
            },
        ),
        "Degraded",
        "DataValidated=False (ContractViolated): column amount: 12 values below min 0",
    ),
    (
        "model failed the evaluation gate",
        obj(
            MP,
            {
                "observedGeneration": 1,
                "conditions": [
                    cond("DataValidated", "True"),
                    cond("Trained", "True"),
                    cond("Evaluated", "False", "GateFailed", "accuracy 0.71 < threshold 0.9"),
                    cond("Succeeded", "False", "GateFailed"),
                ],
            },
        ),
        "Degraded",
        "Evaluated=False (GateFailed)",
    ),
    (
        "training failed",
        obj(MP, {"observedGeneration": 1, "conditions": [cond("Succeeded", "False", "TrainingFailed", "OOMKilled")]}),
        "Degraded",
        "Succeeded=False (TrainingFailed): OOMKilled",
    ),
    ("suspended", obj(MP, {"observedGeneration": 1}, suspend=True), "Suspended", "spec.suspend"),
]


@pytest.fixture(params=INTERPRETERS or [pytest.param(None, marks=pytest.mark.skip)])
def lua(request: pytest.FixtureRequest) -> str:
    return request.param


def test_a_lua_interpreter_is_installed() -> None:
    # The health checks are shipped untested without one: fail loudly instead of skipping everything.
    assert "lua5.4" in INTERPRETERS, "install Debian's lua5.4 (apt-get install -y lua5.4)"


@pytest.mark.parametrize(("case", "body", "status", "message"), MDEP_CASES, ids=[c[0] for c in MDEP_CASES])
def test_modeldeployment_health(lua: str, case: str, body: dict, status: str, message: str) -> None:
    got_status, got_message = lua_health("modeldeployment.lua", body, lua)
    assert (got_status, message in got_message) == (status, True), f"{case}: {got_status!r} {got_message!r}"


@pytest.mark.parametrize(("case", "body", "status", "message"), MLP_CASES, ids=[c[0] for c in MLP_CASES])
def test_mlpipeline_health(lua: str, case: str, body: dict, status: str, message: str) -> None:
    got_status, got_message = lua_health("mlpipeline.lua", body, lua)
    assert (got_status, message in got_message) == (status, True), f"{case}: {got_status!r} {got_message!r}"


def test_health_scripts_compile_as_lua_5_1() -> None:
    # gopher-lua speaks Lua 5.1: no goto, integer division or bitwise operators may slip in.
    if not shutil.which("luac5.1"):
        pytest.skip("luac5.1 not installed (apt-get install -y lua5.1)")
    for script in sorted(HEALTH_DIR.glob("*.lua")):
        done = subprocess.run(["luac5.1", "-p", str(script)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
