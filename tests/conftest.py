"""Shared fixtures: the real local control plane (hack/local-cluster.sh) and ways to talk to it.

The control plane is brought up once per session (or a running one is reused, and then left running);
what this session started, it stops at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = ROOT / "hack" / "local-cluster.sh"


def _local_cluster(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LOCAL_CLUSTER), *args], capture_output=True, text=True, check=check, timeout=3600
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    # An empty selection must fail loudly, not pass as "0 tests".
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests collected: check the paths and -m/-k filters")


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[str]:
    """Path to an admin kubeconfig of the running local control plane (our CRDs and KubeRay's and KServe's installed)."""
    already_running = _local_cluster("status", check=False).returncode == 0
    up = _local_cluster("up", check=False)
    if up.returncode != 0:
        pytest.fail(f"hack/local-cluster.sh up failed:\n{up.stderr[-4000:]}")
    path = up.stdout.strip().splitlines()[-1]
    try:
        yield path
    finally:
        if not already_running and not os.environ.get("CONVEYOR_KEEP_CLUSTER"):
            _local_cluster("down", check=False)


@pytest.fixture(scope="session")
def kube_bin_dir() -> str:
    return _local_cluster("bin-dir").stdout.strip()


Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def kubectl(kubeconfig: str, kube_bin_dir: str) -> Kubectl:
    """Run the pinned kubectl against the local control plane: kubectl("get", "crd", input=..., check=...)."""

    def run(*args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [f"{kube_bin_dir}/kubectl", "--kubeconfig", kubeconfig, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def kube_api(kubeconfig: str):
    """A `kubernetes.client.ApiClient` with admin rights on the local control plane."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=kubeconfig)
    yield api
    api.close()


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (the real namespace controller empties it)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)


def kubectl_json(kubectl: Kubectl, *args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json").stdout)


@pytest.fixture
def prometheus(tmp_path: Path):
    """A real Prometheus (hack/devstack's helper over Debian's binary) scraping file_sd targets once a
    second, with its own temporary state; ``.add_target(name, "127.0.0.1:PORT", labels)``, ``.url``,
    ``.query(promql)``, ``.value(promql)``. Missing binary: a skip locally, a failure under CI=true."""
    from conveyor_devstack.prometheus import Prometheus, PrometheusError, binary

    try:
        binary()
    except PrometheusError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    prom = Prometheus.start(tmp_path / "prometheus")
    try:
        yield prom
    finally:
        prom.stop()
