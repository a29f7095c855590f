"""A/B/N end to end (strategy abn), on the rollout stack of test_rollout: three versions served side by
side at 50/30/20 through the local router (Standard mode: the predictor and two canary[] entries), a
bounded load of real callers, faults planted in two versions, and the verdict from a real Prometheus."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _rollout_support import MDEP, NAME, ROW, Stack, republish, rollout_spec, rollout_stack, wait_until
from _traffic import Load
from conveyor_devstack import faults
from kubernetes.client.exceptions import ApiException

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RATE = 15  # requests a second: over 30 s about 225 / 135 / 90 answers per version


@pytest.fixture
def stack(kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any, fraud_versions: Any,
          tmp_path: Path) -> Iterator[Stack]:
    with rollout_stack(kubeconfig, kube_api, namespace, prometheus, fraud_versions[0], tmp_path) as s:
        yield s


def experiment_spec(stack: Stack, mode: str, versions: list[tuple[str, int]]) -> dict[str, Any]:
    spec = rollout_spec(stack, mode)
    spec["rollout"].update(strategy="abn", experiment={
        "versions": [{"version": v, "weight": w} for v, w in versions], "duration": "30s",
        "metric": "successRate", "minSamples": 50, "confidence": 0.95, "autoPromote": True})
    return spec


def test_knative_refuses_three_versions_at_admission(stack: Stack) -> None:
    spec = experiment_spec(stack, "Knative", [("v1", 50), ("v2", 30), ("v3", 20)])
    with pytest.raises(ApiException) as e:
        stack.cluster.create(MDEP, NAME, spec)
    assert e.value.status == 422 and "rollout.experiment.versions" in e.value.body


def test_three_versions_split_50_30_20_and_the_better_one_wins(stack: Stack, fraud_versions: Any) -> None:
    v3 = republish(Path(fraud_versions[1][0]), stack.registry, NAME)  # a third copy of the package
    split = [("v1", 50), ("v2", 30), (v3, 20)]
    # v2 is the better model: v1 fails a fifth of its requests, the third version two fifths.
    faults.plant(stack.faults_file, faults.fault_key(stack.cluster.ns, NAME, "v1"), error_rate=0.2)
    faults.plant(stack.faults_file, faults.fault_key(stack.cluster.ns, NAME, v3), error_rate=0.4)
    stack.cluster.create(MDEP, NAME, experiment_spec(stack, "Standard", split))
    status = stack.wait("the split served", lambda s: (s.get("experiment") or {}).get("phase") == "Running"
                        and s.get("url"), timeout=150)
    url = f"{status['url']}/v1/models/{NAME}:predict"
    with Load(url, {"instances": [ROW]}, rate=RATE) as load:
        running = time.monotonic()
        status = stack.wait("the verdict", lambda s: (s.get("experiment") or {}).get("phase") in ("Promoted", "Concluded"),
                            timeout=120)
        ended = time.monotonic()
    exp = status["experiment"]
    # What callers saw while the three versions ran: each version's share within a few points of its weight.
    answers = [a for a in load.snapshot() if running <= a.sent <= ended and a.status]
    assert len(answers) >= 200, len(answers)
    for version, weight in split:
        share = sum(a.version == version for a in answers) / len(answers)
        assert abs(share - weight / 100) <= 0.05, (version, share, load.by_version())
    # The figures per version, and the verdict: v2 wins, significantly, and is promoted.
    figures = {f["version"]: f for f in exp["figures"]}
    assert set(figures) == {v for v, _ in split}
    assert figures["v2"]["successRate"] > figures["v1"]["successRate"] > figures[v3]["successRate"]
    assert all(f["requests"] > 0 and "latencyP99Ms" in f for f in figures.values())
    verdict = exp["verdict"]
    assert (verdict["outcome"], verdict["winner"]) == ("Winner", "v2"), verdict
    assert "z-test" in verdict["test"] and all(c["significant"] and c["pValue"] < 0.025 for c in verdict["comparisons"])
    assert exp["phase"] == "Promoted" and status["stableVersion"] == "v2"
    wait_until("v2 alone", stack.isvc, lambda i: not i["spec"].get("canary")
               and i["spec"]["predictor"]["name"] == "v2", timeout=30)
