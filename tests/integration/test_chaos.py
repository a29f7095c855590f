"""The operator SIGKILLed at random (seeded) points across 20 pipeline runs and their hand-offs, and
across canary rollouts judged by a real Prometheus.

The test plays KubeRay (a RayJob's status) and the training job's last step (a package committed to a
real file:// registry), as the other operator integration tests do; the operator, the apiserver and the
registry are real. A second thread kills the operator with SIGKILL at random moments and starts a new
one each time. At the end: every run succeeded; no RayJob was created twice (the same object all along,
and the apiserver's own audit log shows no second creation and no deletion); every registry version
v1..v20 exists once, whole, made by its run; and the ModelDeployment that follows the pipeline serves the
last version, as it would without the kills. For rollouts (the second test, KServe played as in
test_rollout_control.py): every good version is promoted through every step, every bad one is rolled
back and recorded once, and the InferenceService is the same object all along.
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
from _canary_support import Load, env, follow, kserve_reports
from _operator_support import Cluster, OperatorProcess, deployment_spec, pipeline_spec, train, wait_for

from conveyor.runtime.package.registry import Registry

pytestmark = pytest.mark.cluster

MLP = "mlpipelines"
MDEP = "modeldeployments"
RUNS = 20
SEED = int(os.environ.get("CONVEYOR_CHAOS_SEED", "20261201"))


class Killer(threading.Thread):
    """Kills the operator at random moments and starts another, until told to stop."""

    def __init__(self, kubeconfig: str, namespace: str, rng: random.Random, *extra: str) -> None:
        super().__init__(daemon=True)
        self.kubeconfig, self.namespace, self.rng, self.extra = kubeconfig, namespace, rng, extra
        self.operator = OperatorProcess(kubeconfig, namespace, *extra).start()
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
            self.operator = OperatorProcess(self.kubeconfig, self.namespace, *self.extra).start()

    def stop(self) -> OperatorProcess:
        """No more kills; returns the operator left running."""
        self.done.set()
        self.join(timeout=60)
        return self.operator

    def _wait_for_a_write(self) -> None:
        while not self.done.wait(0.2):
            try:
                if self.operator.writes() > 0:
                    return
            except OSError:
                continue


def audited_writes(kubeconfig: str, namespace: str, resource: str = "rayjobs") -> tuple[dict[str, int], list[str]]:
    """From the apiserver's own audit log: objects of `resource` created (201) by name, and those deleted.

    A creation whose client was killed mid-request is logged with the client's 504 although the object
    was stored, so creations are at most one per name, and the uids the test saw tell the rest."""
    log = Path(kubeconfig).parent / "logs" / "audit.log"
    created: dict[str, int] = {}
    deleted: list[str] = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if ref.get("resource") != resource or ref.get("namespace") != namespace or ref.get("subresource"):
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
        operator = killer.stop()
    try:
        print(f"{killer.kills} kills")
        assert killer.kills >= 5
        status = cluster.status(MLP, "fraud")
        assert status["lastRun"] == RUNS
        assert [r["outcome"] for r in status["runs"]] == ["Succeeded"] * RUNS
        assert [r["modelVersion"] for r in status["runs"]] == [f"v{n}" for n in range(1, RUNS + 1)]
        # No RayJob created twice: the same object all along, and one creation each in the audit log.
        assert {r["metadata"]["name"]: r["metadata"]["uid"] for r in cluster.rayjobs()} == uids
        created, deleted = audited_writes(kubeconfig, cluster.ns)
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


ROLLOUT = {
    "steps": [30, 100],
    "interval": "4s",
    "analysis": {"window": "10s", "minRequests": 5, "minSuccessRate": 0.95, "failureLimit": 0,
                 "consecutiveErrorLimit": 1},
}
VERSIONS = [f"v{n}" for n in range(1, 7)]
BAD = {"v3", "v5"}  # each answers 30% of its requests with a 503


def test_rollouts_survive_random_operator_kills(
    kubeconfig: str, cluster: Cluster, prometheus: Any, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    print(f"chaos seed {SEED + 1} (CONVEYOR_CHAOS_SEED + 1)")
    registry = f"file://{tmp_path}/registry"
    for n, _ in enumerate(VERSIONS, start=1):
        train(registry, "fraud", pipeline="offline", namespace=cluster.ns, run=n, accuracy=0.9)
    load = Load(prometheus, cluster.ns, tuple(VERSIONS))
    load.error_share.update(dict.fromkeys(BAD, 0.3))
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1", rollout=ROLLOUT))
    killer = Killer(kubeconfig, cluster.ns, rng, "--prometheus-url", prometheus.url)
    outcomes = []
    try:
        isvc = wait_for("v1 served", lambda: cluster.exists(lambda: cluster.isvc("fraud")) and cluster.isvc("fraud"))
        uid = isvc["metadata"]["uid"]
        kserve_reports(cluster, None)
        killer.start()
        for version in VERSIONS[1:]:
            cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": version}}})
            wait_for(f"canary {version}", lambda v=version: cluster.status(MDEP, "fraud").get("canaryVersion") == v
                     or cluster.status(MDEP, "fraud").get("stableVersion") == v or None, timeout=90)
            status = follow(cluster, ("Stable", "RolledBack"), timeout=180)
            outcomes.append((version, status["rolloutPhase"], status["stableVersion"]))
    except AssertionError:
        print(json.dumps(cluster.status(MDEP, "fraud"), indent=1)[-3000:], killer.operator.logs())
        raise
    finally:
        operator = killer.stop()
        load.stop()
    try:
        print(f"{killer.kills} kills; outcomes {outcomes}")
        assert killer.kills >= 3
        # What a run without kills reaches: good versions promoted, bad ones rolled back to the last good.
        expected, last_good = [], "v1"
        for version in VERSIONS[1:]:
            last_good = last_good if version in BAD else version
            expected.append((version, "RolledBack" if version in BAD else "Stable", last_good))
        assert outcomes == expected
        status = cluster.status(MDEP, "fraud")
        assert [r["version"] for r in status["rejectedVersions"]] == sorted(BAD)
        assert all(r["check"] == "successRate" for r in status["rejectedVersions"])
        predictor = cluster.isvc("fraud")["spec"]["predictor"]
        assert env(predictor)["CONVEYOR_MODEL_VERSION"] == expected[-1][2] == VERSIONS[-1]
        assert "canaryTrafficPercent" not in predictor
        # One InferenceService all along: created once, never deleted.
        assert cluster.isvc("fraud")["metadata"]["uid"] == uid
        created, deleted = audited_writes(kubeconfig, cluster.ns, "inferenceservices")
        assert created == {"fraud": 1} and deleted == []
    finally:
        operator.stop()
        print(operator.logs())
