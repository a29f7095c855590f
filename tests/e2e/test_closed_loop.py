"""The closed loop end to end on the local stack: real predictors (KServe's model server) behind the
executor's router, a real Prometheus scraping them, the operator measuring drift from it, and real
training runs on Ray through the executor.

- in-distribution traffic keeps Drifted=False; shifted traffic turns it True within two windows and
  starts exactly one retrain run (trigger Drift);
- ground truth for a prediction one predictor process served, sent to ANOTHER process (a second server
  on another port over the same registry), is accepted through the served-request log in storage and
  joins the retrain run's training data (data.feedback); an id nobody served gets a 400;
- a data-contract violation shows DataValidated=False naming the column, after one attempt only.

Small settings keep it short: monitoring window 15s, interval 2s; a 1000-row, one-epoch fraud model."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _closed_loop_support import drifted, pipeline_spec, rows
from _rollout_support import MDEP, NAME, Stack, rollout_stack, wait_until
from _serving_support import ServerProcess, post_json
from _traffic import Load

from conveyor.runtime.package.registry import Registry

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MLP = "mlpipelines"
WINDOW_S = 15


@pytest.fixture
def stack(
    kubeconfig: str,
    kube_api: Any,
    namespace: str,
    prometheus: Any,
    fraud_versions: Any,
    ray_head: str,
    tmp_path: Path,
) -> Iterator[Stack]:
    # A registry of this test's own (v1 copied): the retrain run registers into it. The runs join the
    # session's Ray head (ray_head sets RAY_ADDRESS for the executor).
    registry = tmp_path / "registry"
    shutil.copytree(Path(fraud_versions[1][0].removeprefix("file://")), registry / NAME / "v1")
    with rollout_stack(kubeconfig, kube_api, namespace, prometheus, f"file://{registry}", tmp_path) as s:
        yield s


@pytest.fixture
def bare_stack(
    kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any, ray_head: str, tmp_path: Path
) -> Iterator[Stack]:
    """The same stack over an empty registry."""
    (tmp_path / "registry").mkdir()
    with rollout_stack(
        kubeconfig, kube_api, namespace, prometheus, f"file://{tmp_path / 'registry'}", tmp_path
    ) as s:
        yield s


@pytest.mark.timeout(1200)  # it also waits for the retrain run to read the feedback (900 s is the default)
def test_drift_is_measured_across_replicas_and_starts_one_retrain(stack: Stack) -> None:
    stack.cluster.create(
        MDEP,
        NAME,
        {
            "model": {"registryUri": stack.registry, "name": NAME, "version": "v1"},
            "rollout": {"strategy": "immediate"},
            "monitoring": {
                "drift": {"threshold": 0.2},
                "interval": "2s",
                "window": f"{WINDOW_S}s",
                "minSamples": 100,
                "retrainPipeline": "fraud",
                "retrainCooldown": "1h",
            },
        },
    )
    status = stack.wait("v1 Ready", lambda s: s.get("stableVersion") == "v1" and s.get("url"), timeout=120)
    url = f"{status['url']}/v1/models/{NAME}:predict"
    spec = pipeline_spec(stack.registry)
    spec["data"]["feedback"] = True  # the retrain run trains on the ground truth sent below, too
    stack.cluster.create(MLP, "fraud", spec)

    with Load(url, {"instances": rows(200, seed=21)}, rate=2):
        calm = stack.wait(
            "a drift reading of in-distribution traffic",
            lambda s: (
                (s.get("drift") or {}).get("samples", 0) >= 100 and drifted(s).get("status") != "Unknown"
            ),
            timeout=90,
        )
        assert drifted(calm)["status"] == "False", calm["drift"]
        # Run 1 (trigger Created) trains meanwhile; the retrain test needs it finished.
        wait_until(
            "run 1 finished",
            lambda: stack.cluster.status(MLP, "fraud"),
            lambda s: s.get("runs") and s["runs"][0].get("outcome") not in ("Pending", "Running"),
            timeout=240,
        )
        status = stack.status()
        assert drifted(status)["status"] == "False", status["drift"]
        assert status["drift"]["score"] < 0.2
        labelled = _feedback_through_another_process(stack, url)

    shifted_at = time.monotonic()
    with Load(url, {"instances": rows(200, seed=22, shift=True)}, rate=2):
        stack.wait("Drifted=True", lambda s: drifted(s).get("status") == "True", timeout=6 * WINDOW_S)
        to_drifted = time.monotonic() - shifted_at
        wait_until(
            "the retrain RayJob",
            lambda: stack.cluster.rayjob("fraud-2"),
            lambda rj: rj is not None,
            timeout=60,
        )
        to_rayjob = time.monotonic() - shifted_at
        # The predictions move first (the shifted rows look like fraud); the shifted inputs follow as the
        # window fills with them, and the message names them; untouched inputs stay out of it.
        status = stack.wait(
            "the shifted inputs named",
            lambda s: (
                "amount" in drifted(s).get("message", "") and "distance_km" in drifted(s).get("message", "")
            ),
            timeout=2 * WINDOW_S,
        )
        assert "merchant" not in drifted(status)["message"] and "hour" not in drifted(status)["message"]
        assert {f["name"] for f in status["drift"]["features"][:3]} >= {"amount", "distance_km"}
        drifted_at = time.monotonic()
        # The retrain run reads the feedback dataset: the source's 1000 rows plus the labelled ones. The
        # shifted traffic goes on while it trains (a fixed wait of its own added 10 s to this test).
        store = Registry(stack.registry, NAME)
        record = wait_until(
            "run 2's outcome record",
            lambda: store.read_run_record(stack.cluster.ns, "fraud", 2),
            lambda r: r is not None,
            timeout=300,
        )
        assert record["dataValidation"]["rows"] == 1000 + labelled, record
        # At least five drift intervals of shifted traffic since Drifted=True (the run above takes longer
        # than that; a short wait only if it did not): still exactly one retrain run.
        time.sleep(max(0.0, drifted_at + 5 * 2 - time.monotonic()))
        runs = stack.cluster.status(MLP, "fraud")["runs"]
    assert [r["trigger"] for r in runs] == ["Created", "Drift"], runs
    assert sorted(r["metadata"]["name"] for r in stack.cluster.rayjobs()) == ["fraud-1", "fraud-2"]
    stack.cluster.event(NAME, "Warning", "DriftDetected")
    print(
        f"shifted traffic -> Drifted=True {to_drifted:.1f}s, -> retrain RayJob {to_rayjob:.1f}s (window {WINDOW_S}s)"
    )
    assert to_drifted <= 2 * WINDOW_S, to_drifted


def _feedback_through_another_process(stack: Stack, url: str) -> int:
    """A prediction served by the stack's predictor; its ground truth sent to a second predictor process
    of v1 (another port, the same registry), which finds the request in the served-request log."""
    status, body = post_json(url, {"instances": rows(4, seed=31)})
    assert status == 200, body
    rid, predicted = body["id"], [p["label"] for p in body["predictions"]]
    truth = ["1" if p == "0" else "0" for p in predicted]
    with ServerProcess(f"{stack.registry}/{NAME}/v1", NAME, stack.workdir) as other:
        feedback = f"{other.url}/v1/models/{NAME}/feedback"
        # Accepted once the serving process has flushed its log (every second): until then a 400 says so.
        answer = wait_until(
            "feedback accepted by the other process",
            lambda: post_json(feedback, {"id": rid, "labels": truth}),
            lambda a: a[0] != 400,
            timeout=30,
        )
        assert answer[0] == 200 and answer[1]["results"] == [{"id": rid, "status": "recorded", "rows": 4}], (
            answer
        )
        status, body = post_json(feedback, {"id": "nobody-served-this", "label": "1"})
        assert status == 400 and "nobody-served-this" in json.dumps(body), body
    stored = [r for r in Registry(stack.registry, NAME).read_feedback(["v1"]) if r["id"] == rid]
    assert [r["label"] for r in stored] == truth and [r["prediction"] for r in stored] == predicted
    assert stored[0]["inputs"]["merchant"] == rows(4, seed=31)[0]["merchant"]
    return len(truth)


def test_a_contract_violation_fails_the_run_once_naming_the_column(bare_stack: Stack) -> None:
    stack = bare_stack
    contract = {"columns": [{"name": "amount", "type": "float", "min": 0, "max": 50}]}
    spec = pipeline_spec(stack.registry, triggers={})
    spec["data"]["contract"] = contract
    del spec["deploy"]
    stack.cluster.create(MLP, "fraud", spec)
    status = wait_until(
        "run 1 failed",
        lambda: stack.cluster.status(MLP, "fraud"),
        lambda s: s.get("runs") and s["runs"][0].get("outcome") == "Failed",
        timeout=180,
    )
    run = status["runs"][0]
    assert (run["reason"], run["attempts"]) == ("DataContractViolated", 1), run
    cond = next(c for c in status["conditions"] if c["type"] == "DataValidated")
    assert cond["status"] == "False" and "column amount: max" in cond["message"], cond
    # Not retried: the job ended once, having recorded the violation; no second run or RayJob.
    time.sleep(3)
    assert [r["metadata"]["name"] for r in stack.cluster.rayjobs()] == ["fraud-1"]
    assert len(stack.cluster.status(MLP, "fraud")["runs"]) == 1
