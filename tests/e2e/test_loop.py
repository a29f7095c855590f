"""The whole loop on the local control plane: the operator and the local executor (the stand-in for the
KubeRay and KServe controllers) turn an MLPipeline into a real training run on Ray, gate and register
the model, and serve it through the ModelDeployment's InferenceService on KServe's model server."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _training_support import ROW, executor_command, get_object, operator_command, wait_ready, wait_with_logs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture
def loop(
    kubeconfig: str, namespace: str, ray_head: str, tmp_path: Path
) -> Iterator[tuple[str, Path, list[Path]]]:
    """The operator and the local executor watching `namespace`, with logs under tmp_path; the RayJobs
    join the session's Ray head (RAY_ADDRESS, set by ray_head), as a RayJob joins its KubeRay cluster."""
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / "operator.log", tmp_path / "executor.log"]
    commands = [operator_command(namespace), executor_command(kubeconfig, namespace, tmp_path / "executor")]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        for cmd, log in zip(commands, logs, strict=True)
    ]
    try:
        yield namespace, tmp_path / "registry", logs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_pipeline_trains_gates_registers_and_serves(loop, kubectl) -> None:
    namespace, registry, logs = loop
    registry.mkdir()
    manifests = (ROOT / "hack" / "demo" / "fraud.yaml").read_text().replace("REGISTRY", f"file://{registry}")
    kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=manifests)

    pipeline = wait_with_logs(
        "the pipeline's first run to succeed",
        600,
        lambda: (
            (p := get_object(kubectl, namespace, "mlpipeline/fraud")).get("status", {}).get("phase")
            in ("Succeeded", "Failed")
            and p
        ),
        logs,
    )
    status = pipeline["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["latestVersion"] == "v1"
    run = status["runs"][-1]
    assert run["outcome"] == "Succeeded" and run["modelVersion"] == "v1"
    assert run["metrics"]["rocAuc"] >= 0.7
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Succeeded"] == "True"

    rayjob = get_object(kubectl, namespace, f"rayjob/{run['rayJob']}")
    assert rayjob["metadata"]["ownerReferences"][0]["name"] == "fraud"
    assert "conveyor.runtime.train" in rayjob["spec"]["entrypoint"]

    package = registry / "fraud" / "v1"
    manifest = json.loads((package / "package.json").read_text())
    assert manifest["version"] == "v1"
    assert json.loads((package / "lineage.json").read_text())["pipeline"] == "fraud"

    deployment = wait_ready(kubectl, namespace, "modeldeployment/fraud", 300, logs)
    assert deployment["status"]["stableVersion"] == "v1"
    url = deployment["status"]["url"]

    code, answer = _post(
        f"{url}/v1/models/fraud:predict", {"instances": [ROW, {**ROW, "amount": 3100.0, "foreign": True}]}
    )
    assert code == 200, answer
    assert answer["model_version"] == "v1" and len(answer["predictions"]) == 2
    probabilities = answer["predictions"][0]["probabilities"]
    assert abs(sum(probabilities.values()) - 1.0) < 1e-4

    code, answer = _post(f"{url}/v1/models/fraud:predict", {"instances": [{**ROW, "amount": "lots"}]})
    assert code == 400 and "amount" in answer["error"]
