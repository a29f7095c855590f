"""The operator when its apiserver (and etcd) crash mid-run: its watches come back and it misses nothing.

kopf's watches have been seen to go silent after a connection loss (kopf issues 585 and 810). This test
runs a control plane of its own (CONVEYOR_CLUSTER_DIR), so killing it disturbs no other test: the
operator starts a run, etcd and the apiserver are SIGKILLed and started again on the same ports with the
same data (`hack/local-cluster.sh restart`), and then changes made after the outage must reach the
operator within 30 s.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _operator_support import Cluster, OperatorProcess, pipeline_spec, wait_for
from kubernetes import client, config

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = ROOT / "hack" / "local-cluster.sh"
MLP = "mlpipelines"


def local_cluster(state: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        [str(LOCAL_CLUSTER), *args], env={**os.environ, "CONVEYOR_CLUSTER_DIR": str(state)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0 or not check, f"hack/local-cluster.sh {' '.join(args)}: {done.stderr[-4000:]}"
    return done.stdout.strip()


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    state = tmp_path / "cluster"
    try:
        kubeconfig = local_cluster(state, "up").splitlines()[-1]
        yield state, kubeconfig
    finally:  # also after a failed `up`: stop whatever it started
        print(local_cluster(state, "down", check=False))


def test_watches_recover_after_the_apiserver_and_etcd_crash(private_cluster: tuple[Path, str], tmp_path: Path) -> None:
    state, kubeconfig = private_cluster
    api = config.new_client_from_config(config_file=kubeconfig)
    client.CoreV1Api(api).create_namespace({"metadata": {"name": "chaos"}})
    cluster = Cluster(api, "chaos")
    registry = f"file://{tmp_path}/registry"
    op = OperatorProcess(kubeconfig, "chaos").start()
    try:
        cluster.create(MLP, "fraud", pipeline_spec(registry))
        wait_for("RayJob fraud-1", lambda: cluster.rayjob("fraud-1"))

        local_cluster(state, "restart")  # returns once the apiserver is ready again
        back = time.monotonic()

        # A child's status change (the RayJob watch) and a new object (the MLPipeline watch).
        cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Running", jobStatus="RUNNING")
        cluster.create(MLP, "second", pipeline_spec(registry, registry={"uri": registry, "modelName": "second"}))
        wait_for(
            "run 1 seen running",
            lambda: (cluster.status(MLP, "fraud")["runs"][0]["outcome"] == "Running") or None,
            timeout=30,
        )
        wait_for("RayJob second-1", lambda: cluster.rayjob("second-1"), timeout=30)
        recovered = time.monotonic() - back
        assert recovered <= 30, recovered
        assert sorted(r["metadata"]["name"] for r in cluster.rayjobs()) == ["fraud-1", "second-1"]
        assert op.alive()
        print(f"watches recovered {recovered:.1f}s after the apiserver was ready again")
    finally:
        op.stop()
        print(op.logs())
        api.close()
