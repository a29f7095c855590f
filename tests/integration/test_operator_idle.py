"""An idle operator writes nothing: with a settled MLPipeline and settled ModelDeployments, the operator
running for real against the local kube-apiserver makes no API write over a window in which it
reconciles every object again (a resync every 2 s) and polls the registry for a newer version (every
2 s), as it does in production every 10 minutes and every minute.

Counted three ways: the apiserver's own audit log (hack/local-cluster.sh logs every write at Metadata
level; the operator's requests carry its User-Agent), the operator's request counter, and the
resourceVersions of the objects and their children, which no write may move. The test plays KubeRay
and KServe (their status), as the other operator tests do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _operator_support import Cluster, OperatorProcess, deployment_spec, pipeline_spec, train, wait_for

pytestmark = pytest.mark.cluster

MLP, MDEP = "mlpipelines", "modeldeployments"
WINDOW = 6.0  # seconds: three resyncs and three registry polls
READY = {
    "url": "http://fraud.ns.example.com",
    "observedGeneration": 1,
    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
}


@pytest.fixture
def operator(kubeconfig: str, namespace: str) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        kubeconfig, namespace, "--resync-seconds", "2", "--registry-poll-seconds", "2"
    ).start()
    try:
        yield op
    finally:
        op.stop()
        print(op.logs())  # shown by pytest when the test failed


def audited_writes(kubeconfig: str, namespace: str, since: str) -> dict[str, int]:
    """The operator's writes in `namespace` the apiserver logged since `since` (RFC 3339, UTC), by verb,
    resource and name."""
    log = Path(kubeconfig).parent / "logs" / "audit.log"
    assert log.exists(), f"no audit log at {log}: hack/local-cluster.sh starts the apiserver with one"
    out: dict[str, int] = {}
    for line in log.read_text().splitlines():
        if '"conveyor-operator/' not in line:
            continue
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if ref.get("namespace") != namespace or event.get("stage") != "ResponseComplete":
            continue
        if (event.get("requestReceivedTimestamp") or "") < since:
            continue
        key = f"{event['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''} {ref.get('name', '')}"
        out[key] = out.get(key, 0) + 1
    return out


def versions(cluster: Cluster) -> dict[str, str]:
    """resourceVersion of every object and child in the namespace the operator could write."""
    objs: list[dict[str, Any]] = [
        cluster.get(MLP, "fraud"),
        cluster.get(MDEP, "fraud"),
        cluster.get(MDEP, "newest"),
    ]
    objs += cluster.rayjobs()
    objs += cluster.custom.list_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", cluster.ns, "inferenceservices"
    )["items"]
    cms = cluster.core.list_namespaced_config_map(
        cluster.ns, label_selector="app.kubernetes.io/managed-by=conveyor"
    ).items
    out = {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in objs}
    out.update({f"ConfigMap/{c.metadata.name}": c.metadata.resource_version for c in cms})
    return out


def ready(cluster: Cluster, name: str) -> bool:
    cond = cluster.condition(MDEP, name, "Ready") or {}
    return cond.get("status") == "True"


def test_a_settled_operator_makes_no_api_writes(
    cluster: Cluster, operator: OperatorProcess, registry: str, kubeconfig: str
) -> None:
    # A pipeline whose run 1 succeeded and handed its version to the ModelDeployment "fraud"; a second
    # ModelDeployment following the registry's newest version (polled). Both served and Ready.
    cluster.create(MDEP, "fraud", deployment_spec(registry))
    cluster.create(MLP, "fraud", pipeline_spec(registry, deploy={"modelDeployment": "fraud"}))
    wait_for("RayJob fraud-1", lambda: cluster.rayjob("fraud-1"))
    version = train(registry, "fraud", pipeline="fraud", namespace=cluster.ns, run=1, accuracy=0.95)
    cluster.kuberay_sets(
        "fraud-1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", endTime="2026-01-01T00:10:00Z"
    )
    cluster.create(MDEP, "newest", deployment_spec(registry))
    for name in ("fraud", "newest"):
        wait_for(f"InferenceService {name}", lambda n=name: cluster.isvc(n))
        cluster.kserve_sets(name, READY)
        wait_for(f"{name} Ready", lambda n=name: ready(cluster, n))
    assert cluster.status(MLP, "fraud")["phase"] == "Succeeded"
    assert {cluster.status(MDEP, n).get("stableVersion") for n in ("fraud", "newest")} == {version}

    # Settled: the last transitions' writes (their events are posted in the background) are out.
    operator.settled_writes()

    before = versions(cluster)
    reconciles, writes = operator.metric("conveyor_reconcile_total"), operator.writes()
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    time.sleep(WINDOW)  # the measured window itself, not a wait for a condition
    after_reconciles = operator.metric("conveyor_reconcile_total")
    time.sleep(0.5)  # the apiserver writes its audit lines when a request completes

    # The window did look at everything again (else it proves nothing): 3 objects, ~3 resyncs.
    assert after_reconciles - reconciles >= 6, (
        f"only {after_reconciles - reconciles} reconciles in the window"
    )
    assert audited_writes(kubeconfig, cluster.ns, since) == {}
    assert operator.writes() - writes == 0
    assert versions(cluster) == before
