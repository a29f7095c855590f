"""Shadow traffic end to end (strategy shadow), on the rollout stack of test_rollout: the real
kube-apiserver, the operator, the local executor serving each InferenceService with KServe's real model
server behind its router, a real Prometheus, and a bounded load of real callers.

The stable predictor mirrors every request (shadow.percent 100) to the candidate's own InferenceService
(`fraud-shadow`); what callers see must not change at all, and the shadow's agreement decides."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _rollout_support import (
    MDEP,
    NAME,
    RATE,
    ROW,
    Stack,
    republish,
    rollout_spec,
    rollout_stack,
    serving_v1,
    wait_until,
)
from _traffic import Load

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SHADOW = f"{NAME}-shadow"
# Rows with fixed ids: the answer of the stable version to each is then the same bytes every time.
PROBES = [{"id": f"probe-{i}", "instances": [{**ROW, "amount": 10.0 + 40 * i, "hour": 3 + i}]} for i in range(3)]


@pytest.fixture
def stack(kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any, fraud_versions: Any,
          tmp_path: Path) -> Iterator[Stack]:
    with rollout_stack(kubeconfig, kube_api, namespace, prometheus, fraud_versions[0], tmp_path) as s:
        yield s


def shadow_rollout(stack: Stack, mode: str, **analysis: Any) -> dict[str, Any]:
    rollout = rollout_spec(stack, mode)["rollout"]
    rollout.update(strategy="shadow", shadow={"percent": 100, "then": "promote"})
    rollout["analysis"].update(minAgreement=0.9, **analysis)
    return rollout


def different_version(stack: Stack, tmp_path: Path) -> str:
    """The same network with another decision rule (threshold 0: every row is fraud): a different model."""
    src = Path(stack.registry.removeprefix("file://")) / NAME / "v1"
    dst = tmp_path / "always-fraud"
    shutil.copytree(src, dst)
    schema = json.loads((dst / "schema.json").read_text())
    schema["decisionThreshold"] = 0.0
    (dst / "schema.json").write_text(json.dumps(schema))
    return republish(dst, stack.registry, NAME)


def probe_answers(url: str) -> list[bytes]:
    out = []
    for body in PROBES:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            out.append(r.read())
    return out


def stable_metric(stack: Stack, result: str) -> float:
    """The stable predictor's own mirror counter, read from its /metrics (the predictor the router uses)."""
    traffic = ((stack.isvc().get("status") or {}).get("components") or {}).get("predictor", {}).get("traffic") or []
    total = 0.0
    for entry in traffic:
        with urllib.request.urlopen(entry["url"] + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("conveyor_shadow_requests_total{") and f'result="{result}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
    return total


def mirrored(stack: Stack) -> float:
    return sum(stable_metric(stack, r) for r in ("agree", "disagree", "error", "timeout"))


def analysis_check(status: dict[str, Any], version: str, name: str) -> list[float]:
    return [c["candidate"] for a in status.get("analyses") or [] if a["version"] == version
            for c in a["checks"] if c["name"] == name and c.get("candidate") is not None]


def test_an_identical_shadow_agrees_is_promoted_and_callers_see_only_stable(stack: Stack) -> None:
    url = serving_v1(stack, "Knative", rollout=shadow_rollout(stack, "Knative"))
    baseline = probe_answers(url)  # stable-only serving
    with Load(url, {"instances": [ROW]}, rate=RATE) as load:
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v2"}}})
        stack.wait("the shadow mirrored to", lambda s: (s.get("shadow") or {}).get("mirroring"), timeout=120)
        wait_until("mirrored requests", lambda: mirrored(stack), lambda n: n >= 5, timeout=60)
        assert probe_answers(url) == baseline  # byte for byte, while every request is mirrored
        shadowed_until = time.monotonic()
        status = stack.wait("promoted from the shadow", lambda s: s.get("stableVersion") == "v2", timeout=120)
    assert not load.failures(), load.by_version()
    assert {a.version for a in load.snapshot() if a.sent < shadowed_until} == {"v1"}
    agreement = analysis_check(status, "v2", "agreement")
    assert agreement and agreement[-1] >= 0.99, status.get("analyses")
    wait_until("the shadow InferenceService removed", lambda: stack.cluster.exists(lambda: stack.cluster.isvc(SHADOW)),
               lambda exists: not exists, timeout=30)


def test_a_different_shadow_disagrees_is_rejected_and_killing_it_costs_callers_nothing(
        stack: Stack, tmp_path: Path) -> None:
    v3 = different_version(stack, tmp_path)
    url = serving_v1(stack, "Standard", rollout=shadow_rollout(stack, "Standard", failureLimit=1))
    baseline = probe_answers(url)
    with Load(url, {"instances": [ROW]}, rate=RATE) as load:
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": v3}}})
        stack.wait("the shadow mirrored to", lambda s: (s.get("shadow") or {}).get("mirroring"), timeout=120)
        wait_until("disagreements", lambda: stable_metric(stack, "disagree"), lambda n: n >= 5, timeout=60)
        assert probe_answers(url) == baseline
        stack.wait("a first analysis of the shadow", lambda s: analysis_check(s, v3, "agreement"), timeout=60)
        # The shadow's model server dies (SIGKILL): callers must not notice.
        victims = [p for p in psutil.process_iter(["cmdline"])
                   if "--name" in (cmd := p.info["cmdline"] or []) and SHADOW in cmd]
        assert victims
        killed = time.monotonic()
        for p in victims:
            p.send_signal(signal.SIGKILL)
        # The mirror sees the shadow go (its router answers 502/503, or the connection fails).
        wait_until("shadow errors", lambda: stable_metric(stack, "error") + stable_metric(stack, "timeout"),
                   lambda n: n > 0, timeout=30)
        status = stack.wait("the shadow rejected", lambda s: any(r.get("version") == v3
                                                                 for r in s.get("rejectedVersions") or []), timeout=90)
        wait_until("callers after the kill", lambda: len(load.snapshot(since=killed)), lambda n: n >= 3 * RATE,
                   timeout=30)
    assert not load.failures(), load.by_version()
    assert {a.version for a in load.snapshot()} == {"v1"}
    agreement = analysis_check(status, v3, "agreement")
    assert agreement and max(agreement) <= 0.5, status.get("analyses")
    assert status["stableVersion"] == "v1" and "shadow" not in status
