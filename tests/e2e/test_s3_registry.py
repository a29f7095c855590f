"""The loop against a real S3 API (versitygw from hack/s3.sh's module, on loopback): training registers a
version to s3://, the operator gates it and the predictor serves it, and the credentials reach the
training and serving processes the way a cluster delivers them: a Secret on the apiserver that the
pipeline's and the deployment's pod settings name in envFrom (the local executor resolves it as a
kubelet would; its own environment holds no AWS credentials). The runs join one Ray cluster of the
module's (``ray_address``), whose processes hold the Secret's values as the RayJob's worker pods would.
An operator that cannot read the registry says so in Accepted=False, naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _training_support import (
    ROW,
    executor_command,
    get_object,
    operator_command,
    stop_ray_head,
    wait_ready,
    wait_with_logs,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "models"
REGISTRY = f"s3://{BUCKET}/registry"
SECRET = "registry-credentials"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    sys.path.insert(0, str(ROOT / "hack" / "devstack"))
    from conveyor_devstack.s3 import S3Error, S3Server

    try:
        server = S3Server.start(tmp_path_factory.mktemp("s3"))
    except S3Error as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_address(s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray cluster the module's RayJobs join (RAY_ADDRESS), as a RayJob joins the cluster KubeRay brought
    up for it, instead of each run starting and stopping a Ray of its own (tens of seconds each way on
    two busy cores). Its processes hold what the Secret holds, as the RayJob's worker pods would from
    their envFrom: Ray Train's workers write the checkpoints to s3://. The entrypoint, which registers
    the package, still gets the credentials only from the Secret, through the executor."""
    from conveyor_devstack import rayhead

    state = tmp_path_factory.mktemp("ray-head")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():
            mp.setenv(k, v)
        address = rayhead.up(state)
    try:
        yield address
    finally:
        stop_ray_head(state)


def _without_aws(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


def _start(cmds: list[tuple[list[str], dict[str, str], Path]], cwd: Path) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        for cmd, env, log in cmds
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def _secret(kubectl, namespace: str, values: dict[str, str]) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "type": "Opaque",
        "stringData": values,
    }
    kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(secret))


def _manifests() -> str:
    pod = {"envFrom": [{"secretRef": {"name": SECRET}}]}
    pipeline = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "MLPipeline",
        "metadata": {"name": "fraud"},
        "spec": {
            "data": {"source": {"uri": "builtin://fraud?rows=4000&seed=3", "format": "builtin"}},
            "features": {
                "transforms": [
                    {"type": "impute", "columns": ["distance_km"], "strategy": "median"},
                    {"type": "clip", "columns": ["amount"], "min": 0, "max": 20000},
                    {
                        "type": "standardize",
                        "columns": ["amount", "distance_km", "card_age_days", "txn_last_hour"],
                    },
                    {"type": "oneHot", "columns": ["merchant"]},
                ]
            },
            # Tiny and one epoch: small batches and a brisk learning rate make that epoch count.
            "training": {
                "model": {"architecture": "mlp", "hiddenLayers": [16]},
                "hyperparameters": {"epochs": 1, "batchSize": 32, "learningRate": 0.01, "seed": 1},
                "numWorkers": 1,
                "pod": pod,
            },
            "evaluation": {"metric": "rocAuc", "threshold": 0.5},
            "registry": {"uri": REGISTRY, "modelName": "fraud"},
            "deploy": {"modelDeployment": "fraud"},
        },
    }
    deployment = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "fraud"},
        "spec": {
            "model": {"registryUri": REGISTRY, "name": "fraud", "version": "latest", "pipeline": "fraud"},
            "predictor": {"protocol": "v1", "pod": pod},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [pipeline, deployment]})


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_trains_to_s3_gates_and_serves_with_credentials_from_a_secret(
    s3, ray_address, kubeconfig, kubectl, namespace, tmp_path
) -> None:
    _secret(kubectl, namespace, s3.env())
    base = {
        **_without_aws(dict(os.environ)),
        "KUBECONFIG": kubeconfig,
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": ray_address,
    }
    logs = [tmp_path / "operator.log", tmp_path / "executor.log"]
    procs = _start(
        [
            # The operator reads the registry with what the chart's envFrom would give it.
            (operator_command(namespace), {**base, **s3.env()}, logs[0]),
            # The executor has no credentials: training and serving get them only from the Secret.
            (executor_command(kubeconfig, namespace, tmp_path / "executor"), base, logs[1]),
        ],
        tmp_path,
    )
    try:
        kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=_manifests())
        pipeline = wait_with_logs(
            "the run to finish",
            420,
            lambda: (
                (p := get_object(kubectl, namespace, "mlpipeline/fraud")).get("status", {}).get("phase")
                in ("Succeeded", "Failed")
                and p
            ),
            logs,
        )
        assert pipeline["status"]["phase"] == "Succeeded", json.dumps(pipeline["status"], indent=1)
        assert pipeline["status"]["latestVersion"] == "v1"
        rayjob = get_object(kubectl, namespace, f"rayjob/{pipeline['status']['runs'][-1]['rayJob']}")
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["envFrom"] == [{"secretRef": {"name": SECRET}}]

        # The version is in the S3 server, read back through its API.
        import s3fs

        env = s3.env()
        fs = s3fs.S3FileSystem(
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=env["AWS_ENDPOINT_URL"],
            skip_instance_cache=True,
        )
        manifest = json.loads(fs.cat_file(f"{BUCKET}/registry/fraud/v1/package.json"))
        assert manifest["version"] == "v1"

        deployment = wait_ready(kubectl, namespace, "modeldeployment/fraud", 240, logs)
        isvc = get_object(kubectl, namespace, "inferenceservice/fraud")
        assert isvc["spec"]["predictor"]["containers"][0]["envFrom"] == [{"secretRef": {"name": SECRET}}]
        assert isvc["spec"]["predictor"]["containers"][0]["env"][0]["value"] == f"{REGISTRY}/fraud/v1"
        code, answer = _post(f"{deployment['status']['url']}/v1/models/fraud:predict", {"instances": [ROW]})
        assert code == 200, answer
        assert answer["model_version"] == "v1" and len(answer["predictions"]) == 1
    finally:
        _stop(procs)


def test_an_operator_that_cannot_read_the_registry_says_so(
    s3, kubeconfig, kubectl, namespace, tmp_path
) -> None:
    env = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    log = tmp_path / "operator.log"
    procs = _start(
        [
            (
                operator_command(namespace),
                {**_without_aws(dict(os.environ)), **env, "KUBECONFIG": kubeconfig},
                log,
            )
        ],
        tmp_path,
    )
    try:
        kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=_manifests())

        def accepted_false(kind: str) -> dict | None:
            conds = get_object(kubectl, namespace, f"{kind}/fraud").get("status", {}).get("conditions", [])
            return next((c for c in conds if c["type"] == "Accepted" and c["status"] == "False"), None)

        for kind, field in (
            ("mlpipeline", "spec.registry.uri"),
            ("modeldeployment", "spec.model.registryUri"),
        ):
            cond = wait_with_logs(f"{kind} Accepted=False", 60, lambda kind=kind: accepted_false(kind), [log])
            assert field in cond["message"] and REGISTRY in cond["message"], cond
            # The reason as S3 gave it: the signature (made with the wrong secret) does not match.
            assert "PermissionError" in cond["message"] and "signature" in cond["message"], cond
        # No run was started, and the operator is still up (no crash loop).
        assert not get_object(kubectl, namespace, "rayjobs").get("items")
        assert procs[0].poll() is None, log.read_text()[-3000:]
    finally:
        _stop(procs)


def test_the_gpu_sample_registers_into_its_s3_registry(
    s3, ray_address, kubeconfig, kubectl, namespace, tmp_path
) -> None:
    """manifests/samples/mlpipeline-fraud-gpu.yaml as written (its s3://ml-models/conveyor registry, its
    pod settings' Secret), less what needs a GPU node pool here: CPU workers, one short epoch."""
    import yaml

    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "mlpipeline-fraud-gpu.yaml").read_text())
    registry = sample["spec"]["registry"]["uri"]
    bucket = registry.removeprefix("s3://").split("/", 1)[0]
    s3.create_bucket(bucket)
    training = sample["spec"]["training"]
    training.update(
        {"useGpu": False, "numWorkers": 1, "hyperparameters": {**training["hyperparameters"], "epochs": 1}}
    )
    training["workerGroups"] = [{"name": "cpu", "replicas": 1, "cpu": "1", "memory": "2Gi", "gpus": 0}]
    sample["spec"]["data"]["source"]["uri"] = "builtin://fraud?rows=20000&seed=7"
    _secret(kubectl, namespace, s3.env())
    base = {
        **_without_aws(dict(os.environ)),
        "KUBECONFIG": kubeconfig,
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": ray_address,
    }
    logs = [tmp_path / "operator.log", tmp_path / "executor.log"]
    procs = _start(
        [
            (operator_command(namespace), {**base, **s3.env()}, logs[0]),
            (executor_command(kubeconfig, namespace, tmp_path / "executor"), base, logs[1]),
        ],
        tmp_path,
    )
    try:
        kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(sample))
        pipeline = wait_with_logs(
            "the sample's run to finish",
            420,
            lambda: (
                (p := get_object(kubectl, namespace, f"mlpipeline/{sample['metadata']['name']}"))
                .get("status", {})
                .get("phase")
                in ("Succeeded", "Failed")
                and p
            ),
            logs,
        )
        run = pipeline["status"]["runs"][-1]
        # Registered into the sample's own s3:// registry; the gate judged it (pass or not: its thresholds
        # are for 10 GPU epochs on 50k rows).
        assert run.get("modelVersion") == "v1", json.dumps(pipeline["status"], indent=1)
        assert run["outcome"] in ("Succeeded", "GateFailed"), run
        env = s3.env()
        import s3fs

        fs = s3fs.S3FileSystem(
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=env["AWS_ENDPOINT_URL"],
            skip_instance_cache=True,
        )
        assert (
            json.loads(fs.cat_file(f"{registry.removeprefix('s3://')}/fraud/v1/package.json"))["version"]
            == "v1"
        )
    finally:
        _stop(procs)
