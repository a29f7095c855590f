"""make demo's story as a test: the demo's driver (conveyor_devstack.demo) on the rollout stack (the operator
with --prometheus-url, the executor with its router and faults file, a real Prometheus, the real
kube-apiserver), with its exit status and the objects' final states checked: v2 promoted through every
step, v3 rejected with its failing check recorded, Drifted=True with a Drift-triggered run, v4 in the
canary (or past it), v2 better than v1 on the gate metric, the BatchPrediction's run scored with the
promoted version (its rejects named), and the report written with every plot. The RayJobs join one Ray
cluster (conveyor_devstack.rayhead, the e2e session's: tests/e2e/conftest.py), as make demo's do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _rollout_support import MDEP, NAME, Stack, rollout_stack

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def stack(
    kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any, ray_head: str, tmp_path: Path
) -> Iterator[Stack]:
    (tmp_path / "registry").mkdir()
    # The executor's jobs join the session's Ray head (ray_head sets RAY_ADDRESS), as make demo's join its own.
    with rollout_stack(
        kubeconfig, kube_api, namespace, prometheus, f"file://{tmp_path / 'registry'}", tmp_path
    ) as s:
        yield s


@pytest.mark.timeout(1260)
def test_the_demo_tells_the_whole_story(stack: Stack, kubeconfig: str, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "conveyor_devstack.demo",
            "--kubeconfig",
            kubeconfig,
            "--namespace",
            stack.cluster.ns,
            "--registry",
            stack.registry,
            "--faults",
            str(stack.faults_file),
            "--prometheus-url",
            stack.prometheus.url,
            "--report",
            str(report),
            "--logs",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, (
        f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n--- operator\n{stack.operator.logs()[-3000:]}"
    )
    print(done.stdout)

    out = done.stdout
    status = stack.status()
    # The status keeps the last few analyses only: v2's steps are read from the demo's lines (taken from
    # the status as it went) and the Promoted event.
    assert "canary v2 at 20%: analysis Passed" in out and "canary v2 at 50%: analysis Passed" in out, out
    stack.cluster.event(NAME, "Normal", "Promoted", says="v2")
    rejected = next(r for r in status["rejectedVersions"] if r["version"] == "v3")
    assert rejected["check"] and rejected["value"] is not None and rejected["value"] < 0.9, rejected
    assert "canary v3 takes 20%" in out and "canary v3 takes 50%" not in out, (
        out
    )  # rolled back at its first step
    # Drifted went True naming a shifted input (v4, trained since, may have settled it again).
    lines = out.splitlines()
    shift = next(i for i, line in enumerate(lines) if "the traffic shifts" in line)
    drift_line = next(line for line in lines if "Drifted=True" in line)
    assert lines.index(drift_line) > shift, "Drifted=True before the traffic shifted: " + drift_line
    # The shifted inputs, or the predictions they move (the predictions' PSI can cross first).
    assert any(name in drift_line for name in ("amount", "distance_km", "__prediction__")), drift_line
    stack.cluster.event(NAME, "Warning", "DriftDetected")
    runs = stack.cluster.status("mlpipelines", NAME)["runs"]
    assert any(r["trigger"] == "Drift" for r in runs), runs
    # v4 from the Drift run (or, had its job failed on busy cores, from the rerun the demo asked for).
    assert any(r.get("modelVersion") == "v4" and r["trigger"] in ("Drift", "Rerun") for r in runs), runs
    assert any(a["version"] == "v4" for a in status["analyses"]) or status["stableVersion"] == "v4", status
    assert stack.cluster.get(MDEP, NAME)

    # v2, on the full data, beats v1 (a sample) on the gate metric.
    by_version = {
        r.get("modelVersion"): r["metrics"]["rocAuc"] for r in runs if r.get("metrics", {}).get("rocAuc")
    }
    assert by_version["v2"] > by_version["v1"], by_version
    assert "v2 is better: rocAuc" in out, out
    # 5. the batch: scored with the promoted version, the three bad rows rejected with the reason.
    bp = stack.cluster.status("batchpredictions", "fraud-scores")
    batch_run = bp["runs"][-1]
    assert batch_run["outcome"] == "Succeeded" and batch_run["modelVersion"] == status["stableVersion"], bp
    assert (batch_run["rowsScored"], batch_run["rowsRejected"]) == (19997, 3), batch_run
    assert "rows scored, 3 rejected" in out and "rejected t00017: feature 'hour'" in out, out

    page = report.read_text()
    titles = re.findall(r'<img class=plot alt="([^"]+)"', page)
    assert len(titles) == 6 and any(t.startswith("Drift score") for t in titles), titles
    assert "Batch scoring" in page and "t00017" in page
    for line in ("run 1 started", "v2 serves all traffic", "v3 rolled back", "Drifted=True", "trigger Drift"):
        assert line in out, line
