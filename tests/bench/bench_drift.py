"""Benchmark: drift decided from additive counters, on real predictors and a real Prometheus.

Measured in one run:

1. replicas: the same traffic (40 requests of 100 rows, half of them shifted) sent to 1 and to 3
   ``python -m conveyor.runtime.serve`` processes of one package, scraped by a real Prometheus once a
   second; the drift the operator computes (``operator/modeldeployment/drift.measure``: ``increase()`` of
   the per-bin counters over a window, summed over processes, scored against the profile) for each.
   Goal: the two overall scores within 1%. The baseline, in the same run: the processes' own
   per-process gauges (``conveyor_drift_score``, a window of each process's own rows), averaged, which
   is what summing non-additive scores across replicas would give;
2. reaction (with ``--stack``, on the local control plane: operator, executor, Prometheus, a
   retraining pipeline): seconds from the start of shifted traffic to ``Drifted=True`` and to the
   retrain run's RayJob, against the goal of two monitoring windows (window 15s, interval 2s).

Run: ``make bench`` (pytest -m bench) or ``python tests/bench/bench_drift.py``; writes
tests/bench/results/drift.json.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from _closed_loop_support import rows  # noqa: E402
from _serving_support import ServerProcess, fraud_config, http, train_package  # noqa: E402

RESULTS = ROOT / "tests" / "bench" / "results" / "drift.json"
REQUESTS, ROWS_PER_REQUEST = 40, 100
WINDOW = "5m"  # longer than the whole traffic: every row is inside it


def _traffic() -> list[bytes]:
    """The same requests for every configuration: the first half in distribution, the second shifted."""
    half = REQUESTS // 2
    calm = rows(half * ROWS_PER_REQUEST, seed=31)
    shifted = rows(half * ROWS_PER_REQUEST, seed=32, shift=True)
    data = calm + shifted
    return [json.dumps({"instances": data[i : i + ROWS_PER_REQUEST]}).encode()
            for i in range(0, len(data), ROWS_PER_REQUEST)]


def _measure(prom_url: str, package_uri: str, namespace: str) -> dict[str, Any]:
    """What the operator computes for this namespace's predictors."""
    from conveyor.operator.controller.prometheus import Prometheus
    from conveyor.operator.modeldeployment.drift import measure
    from conveyor.runtime.package.registry import open_package
    from conveyor.runtime.spec import ModelDeploymentSpec

    pkg = open_package(package_uri, verify=False)
    spec = ModelDeploymentSpec.model_validate({
        "model": {"registryUri": "file:///unused", "name": "fraud"},
        "monitoring": {"window": WINDOW, "minSamples": 100},
    })

    async def go() -> Any:
        prom = Prometheus(prom_url)
        try:
            return await measure(prom, lambda _v: pkg.profile, namespace, "fraud", pkg.version, spec, datetime.now(UTC))
        finally:
            await prom.close()

    reading = asyncio.run(go())
    assert reading.error is None, reading.error
    return {"overall": max(reading.scores.values()), "samples": reading.samples,
            "features": dict(sorted(reading.scores.items()))}


def replicas(prometheus: Any, package_uri: str, workdir: Path) -> dict[str, Any]:
    traffic = _traffic()
    out: dict[str, Any] = {}
    for n in (1, 3):
        namespace = f"bench-{n}"
        servers = [ServerProcess(package_uri, "fraud", workdir).start() for _ in range(n)]
        try:
            for i, s in enumerate(servers):
                prometheus.add_target(f"{namespace}-{i}", f"127.0.0.1:{s.port}", {"namespace": namespace})
            for s in servers:
                prometheus.wait_for_target(f"127.0.0.1:{s.port}")
            time.sleep(2)  # a scrape of every series at 0 before the traffic: increase() counts from there
            for i, body in enumerate(traffic):
                status, raw, _ = http("POST", f"{servers[i % n].url}/v1/models/fraud:predict", body,
                                      {"content-type": "application/json"})
                assert status == 200, raw[:300]
            total = len(traffic) * ROWS_PER_REQUEST
            query = f'sum(conveyor_drift_bin_total{{namespace="{namespace}",feature="__prediction__"}})'
            deadline = time.monotonic() + 60
            while (prometheus.value(query) or 0) < total:
                assert time.monotonic() < deadline, f"Prometheus never saw all {total} rows of {namespace}"
                time.sleep(0.5)
            time.sleep(2)
            gauges = [float(prometheus.value(
                f'conveyor_drift_score{{namespace="{namespace}",instance="127.0.0.1:{s.port}"}}') or "nan")
                for s in servers]
            out[f"{n}"] = {**_measure(prometheus.url, package_uri, namespace),
                           "perProcessGauges": gauges, "perProcessGaugeMean": sum(gauges) / len(gauges)}
        finally:
            for i, s in enumerate(servers):
                prometheus.remove_target(f"{namespace}-{i}")
                s.stop()
    one, three = out["1"]["overall"], out["3"]["overall"]
    out["relativeDifference"] = abs(one - three) / one
    out["goalWithin"] = 0.01
    out["baselineRelativeDifference"] = abs(out["3"]["perProcessGaugeMean"] - out["1"]["perProcessGaugeMean"]) / max(
        out["1"]["perProcessGaugeMean"], 1e-12)
    return out


def run_benchmark(prometheus: Any, workdir: Path, package_uri: str | None = None) -> dict[str, Any]:
    if package_uri is None:
        package_uri = train_package(fraud_config(str(workdir / "registry"), rows=1000, epochs=1), workdir / "train")
    return {
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "traffic": {"requests": REQUESTS, "rowsPerRequest": ROWS_PER_REQUEST, "shiftedShare": 0.5, "window": WINDOW},
        "replicas": replicas(prometheus, package_uri, workdir),
    }


@pytest.mark.bench
def test_bench_drift(prometheus: Any, tmp_path: Path) -> None:
    result = run_benchmark(prometheus, tmp_path)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert result["replicas"]["relativeDifference"] <= 0.01, result["replicas"]


def main() -> int:
    from conveyor_devstack.prometheus import Prometheus

    with tempfile.TemporaryDirectory() as tmp:
        prom = Prometheus.start(Path(tmp) / "prometheus")
        try:
            result = run_benchmark(prom, Path(tmp), sys.argv[1] if len(sys.argv) > 1 else None)
        finally:
            prom.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
