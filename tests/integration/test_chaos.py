"""The operator SIGKILLed at random (seeded) points across 20 pipeline runs and their hand-offs.

The test plays KubeRay (a RayJob's status) and the training job's last step (a package committed to a
real file:// registry), as the other operator integration tests do; the operator, the apiserver and the
registry are real. A second thread kills the operator with SIGKILL at random moments and starts a new
one each time. At the end: every run succeeded; no RayJob was created twice (the same object all along,
and the apiserver's own audit log shows no second creation and no deletion); every registry version
v1..v20 exists once, whole, made by its run; and the ModelDeployment that follows the pipeline serves the
last version, as it would without the kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from _operator_support import Cluster, OperatorProcess, deployment_spec, pipeline_spec, train, wait_for

from conveyor.runtime.package.registry import Registry

pytestmark = pytest.mark.cluster

MLP = "mlpipelines"
MDEP = "modeldeployments"
RUNS = 20
SEED = int(os.environ.get("CONVEYOR_CHAOS_SEED", "20261201"))


class Killer(threading.Thread):
    """Kills the operator at random moments and starts another, until told to stop."""

    def __init__(self, kubeconfig: str, namespace: str, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.kubeconfig, self.namespace, self.rng = kubeconfig, namespace, rng
        self.operator = OperatorProcess(kubeconfig, namespace).start()
        self.kills = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            # A random moment after the operator's first write (a write in flight, an apply just made, a
            # status not yet written...): on two shared cores a start-up alone can outlast a fixed delay.
            self._wait_for_a_write()
            if self.done.wait(self.rng.uniform(0.0, 3.0)):
                return
            self.operator.stop(signal.SIGKILL)
            self.kills += 1
            self.operator = OperatorProcess(self.kubeconfig, self.namespace).start()

    def _wait_for_a_write(self) -> None:
        while not self.done.wait(0.2):
            try:
                if self.operator.writes() > 0:
                    return
            except OSError:
                continue


def rayjob_writes(kubeconfig: str, namespace: str) -> tuple[dict[str, int], list[str]]:
    """From the apiserver's own audit log: RayJobs created (201) by name, and RayJobs deleted.

    A creation whose client was killed mid-request is logged with the client's 504 although the object
    was stored, so creations are at most one per name, and the uids the test saw tell the rest."""
    log = Path(kubeconfig).parent / "logs" / "audit.log"
    created: dict[str, int] = {}
    deleted: list[str] = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if ref.get("resource") != "rayjobs" or ref.get("namespace") != namespace or ref.get("subresource"):
            continue
        if event.get("stage") != "ResponseComplete":
            continue
        if (event.get("responseStatus") or {}).get("code") == 201:
            created[ref["name"]] = created.get(ref["name"], 0) + 1
        if event.get("verb") == "delete":
            deleted.append(ref["name"])
    return created, deleted


def run_outcome(cluster: Cluster, n: int) -> str | None:
    return next((r.get("outcome") for r in cluster.status(MLP, "fraud").get("runs") or [] if r["run"] == n), None)


def test_runs_survive_random_operator_kills(kubeconfig: str, cluster: Cluster, registry: str) -> None:
    rng = random.Random(SEED)
    print(f"chaos seed {SEED} (CONVEYOR_CHAOS_SEED)")
    cluster.create(MDEP, "fraud", deployment_spec(registry, rollout={"strategy": "immediate"}))
    killer = Killer(kubeconfig, cluster.ns, rng)
    killer.start()
    uids: dict[str, str] = {}
    try:
        cluster.create(MLP, "fraud", pipeline_spec(registry, runsHistoryLimit=RUNS, deploy={"modelDeployment": "fraud"}))
        for n in range(1, RUNS + 1):
            if n > 1:
                cluster.patch(MLP, "fraud", {"metadata": {"annotations": {"conveyor.dev/rerun": str(n)}}})
            rj = wait_for(f"RayJob fraud-{n}", lambda n=n: cluster.rayjob(f"fraud-{n}"), timeout=90)
            uids[f"fraud-{n}"] = rj["metadata"]["uid"]
            cluster.kuberay_sets(f"fraud-{n}", jobDeploymentStatus="Running", jobStatus="RUNNING")
            train(registry, "fraud", pipeline="fraud", namespace=cluster.ns, run=n, accuracy=0.95)
            cluster.kuberay_sets(f"fraud-{n}", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
            wait_for(f"run {n} succeeded", lambda n=n: run_outcome(cluster, n) == "Succeeded" or None, timeout=90)
    except AssertionError:
        print(json.dumps(cluster.status(MLP, "fraud"), indent=1)[-3000:], killer.operator.logs())
        raise
    finally:
        killer.done.set()
        killer.join(timeout=60)
    operator = killer.operator
    try:
        print(f"{killer.kills} kills")
        assert killer.kills >= 5
        status = cluster.status(MLP, "fraud")
        assert status["lastRun"] == RUNS
        assert [r["outcome"] for r in status["runs"]] == ["Succeeded"] * RUNS
        assert [r["modelVersion"] for r in status["runs"]] == [f"v{n}" for n in range(1, RUNS + 1)]
        # No RayJob created twice: the same object all along, and one creation each in the audit log.
        assert {r["metadata"]["name"]: r["metadata"]["uid"] for r in cluster.rayjobs()} == uids
        created, deleted = rayjob_writes(kubeconfig, cluster.ns)
        assert set(created) <= set(uids) and max(created.values()) == 1 and deleted == []
        # Every version whole (checksums verified), once, from its own run.
        reg = Registry(registry, "fraud")
        versions = reg.versions(verify=True)
        assert versions == [f"v{n}" for n in range(1, RUNS + 1)]
        assert [reg.read_metadata(v)["lineage"]["run"] for v in versions] == list(range(1, RUNS + 1))
        # The hand-off ends where it would have without the kills.
        wait_for("the deployment serves the last version", lambda: cluster.status(MDEP, "fraud").get("stableVersion") == f"v{RUNS}" or None)
        isvc: dict[str, Any] = cluster.isvc("fraud")
        assert isvc["metadata"]["annotations"]["conveyor.dev/stable-version"] == f"v{RUNS}"
    finally:
        operator.stop()
        print(operator.logs())
