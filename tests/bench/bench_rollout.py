"""Benchmark: a canary rollout judged by a real Prometheus, on the local stack.

Measured in one run, on the real local kube-apiserver with the operator (``--prometheus-url``), the local
executor (KServe's stand-in: real predictors behind its router, file_sd targets, planted faults) and a
real Prometheus scraping once a second, under a bounded load (10 requests/s), Knative mode, steps
[20, 50], interval 5s, window 10s:

1. promotion of a good version: from the InferenceService first carrying the first step's weight to the
   promotion write, against the ideal ``len(steps) x interval`` (the baseline: a state machine that
   steps exactly on its interval);
2. operator API writes during that rollout, by verb and resource, per rollout transition (start,
   step, promote; the goal is one InferenceService apply and one status write each);
3. rollback of a bad version (a planted 50% 5xx share): from the first scrape that saw one of its 5xx
   (Prometheus' own sample timestamp) to the rollback write (the InferenceService's canary weight
   leaving its step), against one interval.

Run: ``make bench`` (pytest -m bench) with the local control plane; writes
tests/bench/results/rollout.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from _rollout_support import (  # noqa: E402
    MDEP,
    NAME,
    RATE,
    ROW,
    Stack,
    canary_weight,
    republish,
    rollout_stack,
    serving_v1,
    stable_in_isvc,
)
from _serving_support import fraud_config, train_package  # noqa: E402
from _traffic import Load  # noqa: E402
from conveyor_devstack import faults  # noqa: E402

RESULTS = ROOT / "tests" / "bench" / "results" / "rollout.json"
MODE = "Knative"
STEPS = [20, 50]
INTERVAL_S = 5.0


def _writes(stack: Stack) -> dict[str, float]:
    """The operator's API writes so far, by 'VERB resource'."""
    out: dict[str, float] = {}
    for key, value in stack.operator.metrics().items():
        if key.startswith("conveyor_api_requests_total{") and 'verb="GET"' not in key:
            labels = dict(part.split("=", 1) for part in key[key.index("{") + 1 : -1].split(","))
            name = f"{labels['verb'].strip(chr(34))} {labels['resource'].strip(chr(34))}"
            out[name] = out.get(name, 0) + value
    return out


def _watch_weights(stack: Stack, done: Any, timeout: float = 180) -> dict[Any, float]:
    """Poll the InferenceService every 0.1 s: {weight or 'done': when first seen (time.time())}."""
    seen: dict[Any, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        isvc, status = stack.isvc(), stack.status()
        weight = canary_weight(isvc, MODE)
        if weight not in seen:
            seen[weight] = time.time()
        if done(isvc, status, weight):
            seen["done"] = time.time()
            return seen
        time.sleep(0.1)
    raise AssertionError(f"timed out; saw {seen}; status {stack.status()}")


def _first_bad_scrape(stack: Stack, version: str) -> float | None:
    """Prometheus' timestamp of the first sample counting a 5xx of ``version``."""
    series = stack.prometheus.query(
        f'conveyor_requests_total{{namespace="{stack.cluster.ns}", model_version="{version}", outcome="server_error"}}[10m]'
    )
    times = [float(t) for s in series for t, v in s.get("values", []) if float(v) > 0]
    return min(times) if times else None


def run_benchmark(stack: Stack) -> dict[str, Any]:
    ns = stack.cluster.ns
    url = serving_v1(stack, MODE)
    with Load(url, {"instances": [ROW]}, rate=RATE) as load:
        # 1 + 2: a good version, promoted.
        before = _writes(stack)
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v2"}}})
        seen = _watch_weights(stack, lambda i, s, w: w is None and s.get("stableVersion") == "v2"
                              and stable_in_isvc(i, MODE) == "v2")
        time.sleep(3)  # let the last status write land
        after = _writes(stack)
        promote_s = seen["done"] - seen[STEPS[0]]
        writes = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after) if after.get(k, 0) - before.get(k, 0)}
        transitions = len(STEPS) + 1  # start the canary, step up, promote

        # 3: a bad version (v1 again, as the candidate, now answering 5xx half the time), rolled back.
        faults.plant(stack.faults_file, faults.fault_key(ns, NAME, "v1"), error_rate=0.5)
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v1"}}})
        arrived: list[bool] = []

        def rolled_back(isvc: dict[str, Any], status: dict[str, Any], weight: int | None) -> bool:
            if weight == STEPS[0]:
                arrived.append(True)
            return bool(arrived) and weight in (None, 0)

        rollback_write = _watch_weights(stack, rolled_back)["done"]
        first_bad = _first_bad_scrape(stack, "v1")
        status = stack.status()
    stable_failures = len(load.failures("v2"))
    return {
        "benchmark": "rollout",
        "mode": MODE,
        "steps": STEPS,
        "interval_s": INTERVAL_S,
        "window_s": 10,
        "load_rps": RATE,
        "promotion": {
            "first_step_to_promotion_s": round(promote_s, 2),
            "ideal_s": len(STEPS) * INTERVAL_S,
            "ratio_to_ideal": round(promote_s / (len(STEPS) * INTERVAL_S), 2),
            "weights_seen_s": {str(k): round(v - seen[STEPS[0]], 2) for k, v in seen.items() if k is not None},
        },
        "api_writes": {
            "during_rollout": writes,
            "transitions": transitions,
            "per_transition": round(sum(writes.values()) / transitions, 2),
            "note": "POST events are the transition Events; PATCH inferenceservices the applies; PATCH modeldeployments/status the status writes",
        },
        "rollback": {
            "first_bad_scrape_to_rollback_write_s": round(rollback_write - first_bad, 2) if first_bad else None,
            "goal_s": INTERVAL_S,
            "rejected": status.get("rejectedVersions"),
            "stable_version_failures_seen_by_callers": stable_failures,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@pytest.mark.bench
@pytest.mark.cluster
def test_bench_rollout(kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any,
                       tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    v1 = train_package(fraud_config(str(registry), rows=1000, epochs=1), tmp_path / "train")
    republish(Path(v1), f"file://{registry}", "fraud")  # v2: the same trained package, the next version
    with rollout_stack(kubeconfig, kube_api, namespace, prometheus, f"file://{registry}", tmp_path) as stack:
        result = run_benchmark(stack)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert result["rollback"]["rejected"], "the bad version was not rolled back"
