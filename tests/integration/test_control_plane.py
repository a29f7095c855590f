"""The local control plane behaves like a cluster's: the pinned release answers, owner references are
garbage-collected and namespaces are emptied and removed by the real kube-controller-manager."""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.cluster


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def test_server_reports_the_pinned_release(kubectl) -> None:
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


def test_rbac_is_enforced(kubectl, namespace) -> None:
    kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    can = kubectl("auth", "can-i", "list", "secrets", "-n", namespace,
                  f"--as=system:serviceaccount:{namespace}:nobody", check=False)
    assert can.stdout.strip() == "no"


def test_owned_objects_are_garbage_collected(kubectl, namespace) -> None:
    kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "child", "namespace": namespace,
                     "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]},
    }
    kubectl("apply", "-f", "-", input=json.dumps(child))
    kubectl("delete", "configmap", "owner", "-n", namespace)
    _wait(lambda: kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0,
          60, "the garbage collector to delete the owned ConfigMap")


def test_namespace_deletion_empties_and_removes_it(kubectl) -> None:
    name = f"t-ns-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    kubectl("create", "configmap", "data", "-n", name, "--from-literal=a=b")
    kubectl("delete", "namespace", name, "--wait=false")
    _wait(lambda: kubectl("get", "namespace", name, check=False).returncode != 0, 90,
          f"namespace {name} to be removed by the namespace controller")
