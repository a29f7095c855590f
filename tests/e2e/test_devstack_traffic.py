"""The local stack's traffic parts without a control plane: two real predictors (KServe's model server,
started through the planted-faults wrapper), the local router splitting by weight, the real Prometheus
scraping both through file_sd, and the bounded load generator seeing what callers see."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving_support import free_port, http
from _traffic import Load
from conveyor_devstack import faults
from conveyor_devstack.router import Backend, RouterHost

pytestmark = [pytest.mark.slow]

ROW = {"amount": 24.5, "merchant": "grocery", "hour": 14, "foreign": False, "card_age_days": 900,
       "distance_km": 2.1, "txn_last_hour": 0}
NAME = "fraud"


def _ready(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/v2/models/{NAME}/ready", timeout=2)[0] == 200
    except OSError:
        return False


@pytest.fixture
def predictors(fraud_versions: tuple[str, list[str]], tmp_path: Path) -> Iterator[tuple[dict[str, int], Path]]:
    """Both versions served through conveyor_devstack.faults, with a faults file; {version: port}."""
    faults_file = tmp_path / "faults.json"
    ports, procs = {}, []
    for uri in fraud_versions[1]:
        version = uri.rsplit("/", 1)[-1]
        ports[version] = free_port()
        env = {faults.ENV_FILE: str(faults_file), faults.ENV_KEY: faults.fault_key("ns", NAME, version),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "conveyor_devstack.faults", "--model-dir", uri, "--name", NAME,
             "--http-port", str(ports[version]), "--host", "127.0.0.1"],
            env={**os.environ, **env}, stdout=(tmp_path / f"{version}.log").open("wb"),
            stderr=subprocess.STDOUT,
        ))
    try:
        deadline = time.monotonic() + 120
        for version, port in ports.items():
            while not _ready(port):
                assert time.monotonic() < deadline, (tmp_path / f"{version}.log").read_text()[-3000:]
                time.sleep(0.3)
        yield ports, faults_file
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_router_splits_by_weight_and_planted_faults_reach_prometheus(predictors, prometheus) -> None:
    ports, faults_file = predictors
    for version, port in ports.items():
        prometheus.add_target(f"predictor-{version}", f"127.0.0.1:{port}", {"namespace": "ns"})
    host = RouterHost()
    try:
        router = host.ensure(("ns", NAME), NAME)
        url = f"{router.url}/v1/models/{NAME}:predict"
        host.set_backends(("ns", NAME), [Backend("v1", f"http://127.0.0.1:{ports['v1']}", 80),
                                          Backend("v2", f"http://127.0.0.1:{ports['v2']}", 20)])
        load = Load(url, {"instances": [ROW]}, rate=25, duration=4).start().wait()
        seen = load.by_version()
        assert sum(seen["v2"].values()) == pytest.approx(20, abs=1), seen  # exactly 20 of each 100
        assert sum(seen["v1"].values()) == pytest.approx(80, abs=1), seen
        assert not load.failures(), seen

        # A planted regression: v2 fails half its requests and is slow; v1 stays untouched.
        faults.plant(faults_file, faults.fault_key("ns", NAME, "v2"), error_rate=0.5, delay_ms=150)
        load = Load(url, {"instances": [ROW]}, rate=25, duration=4).start().wait()
        seen = load.by_version()
        assert sum(seen["v2"].values()) == pytest.approx(20, abs=1), seen
        assert 3 <= seen["v2"][503] <= 17, seen  # half of v2's 20, give or take chance
        assert not load.failures("v1"), seen
        slow = [a.latency for a in load.snapshot() if a.version == "v2"]
        assert min(slow) >= 0.15

        # What the predictor's own metrics say, through Prometheus: the 5xx and the delay are counted.
        for port in ports.values():
            prometheus.wait_for_target(f"127.0.0.1:{port}", timeout=30)
        errors = 'sum(conveyor_requests_total{namespace="ns", model_version="v2", code="503"})'
        deadline = time.monotonic() + 15
        while (prometheus.value(errors) or 0) < seen["v2"][503]:
            assert time.monotonic() < deadline, prometheus.value(errors)
            time.sleep(0.5)
        assert prometheus.value(errors) == seen["v2"][503]
        assert prometheus.value(
            'sum(conveyor_requests_total{namespace="ns", model_version="v1", outcome="server_error"})'
        ) is None
        # v2's histogram holds its 20 fast answers from before the fault and 20 slow ones: the median sits on
        # the boundary between them, the 90th percentile among the slow ones.
        p90 = prometheus.value(
            'histogram_quantile(0.9, sum by (le) (conveyor_request_duration_seconds_bucket{model_version="v2"}))'
        )
        assert p90 is not None and p90 >= 0.1

        # Weights follow the spec at once: all traffic back to v1.
        host.set_backends(("ns", NAME), [Backend("v1", f"http://127.0.0.1:{ports['v1']}", 100),
                                          Backend("v2", f"http://127.0.0.1:{ports['v2']}", 0)])
        load = Load(url, {"instances": [ROW]}, rate=25, duration=2).start().wait()
        assert set(load.by_version()) == {"v1"} and not load.failures()
    finally:
        host.shutdown()
