"""The local stack's traffic parts without a control plane: two real predictors (KServe's model server,
started through the planted-faults wrapper, HTTP and gRPC), the local router splitting by weight, the real
Prometheus scraping both through file_sd, the bounded load generator seeing what callers see, and real
gRPC ModelInfer calls (KServe's own V2 stubs), split by the router's gRPC port too, meeting the same planted
faults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from _serving_support import Metrics, free_port, http
from _traffic import Load
from _training_support import ROW
from conveyor_devstack import faults
from conveyor_devstack.router import Backend, RouterHost

pytestmark = [pytest.mark.slow]

NAME = "fraud"
V2_TYPES = {"amount": "FP32", "merchant": "BYTES", "hour": "INT64", "foreign": "BOOL", "card_age_days": "INT64",
            "distance_km": "FP32", "txn_last_hour": "INT64"}  # fmt: skip


def _ready(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/v2/models/{NAME}/ready", timeout=2)[0] == 200
    except OSError:
        return False


@dataclass(frozen=True)
class GrpcAnswer:
    status: grpc.StatusCode
    details: str  # the error's details; "" when OK
    seconds: float
    version: str  # the router's x-conveyor-version, else the model_version the predictor answered


def _grpc_calls(address: str, n: int) -> list[GrpcAnswer]:
    """``n`` ModelInfer calls of one row (10 at a time) to a gRPC address (a predictor's port or the router's);
    KServe's V2 stubs (tritonclient.grpc cannot share this process with KServe's protobufs)."""
    from kserve.constants.constants import GRPC_CONTENT_DATATYPE_MAPPINGS
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=NAME)
    for feature, value in ROW.items():
        tensor = request.inputs.add(name=feature, datatype=V2_TYPES[feature], shape=[1])
        field = getattr(tensor.contents, GRPC_CONTENT_DATATYPE_MAPPINGS[V2_TYPES[feature]])
        field.append(value.encode() if isinstance(value, str) else value)

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def call(_: int) -> GrpcAnswer:
            started = time.perf_counter()
            try:
                answer, outcome = stub.ModelInfer.with_call(request, timeout=30, wait_for_ready=True)
                status, details, version = grpc.StatusCode.OK, "", answer.model_version
            except grpc.RpcError as e:
                outcome, status, details, version = e, e.code(), e.details() or "", ""
            routed = dict(outcome.initial_metadata() or ()).get("x-conveyor-version")
            return GrpcAnswer(status, details, time.perf_counter() - started, routed or version)

        with ThreadPoolExecutor(10) as pool:
            return list(pool.map(call, range(n)))


def _grpc_healthy(address: str) -> bool:
    """Readiness and metadata RPCs answer as a healthy predictor's."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return (
            stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            and stub.ModelReady(pb.ModelReadyRequest(name=NAME), timeout=10).ready
            and stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME), timeout=10).name == NAME
        )


@pytest.fixture
def predictors(
    fraud_versions: tuple[str, list[str]], tmp_path: Path
) -> Iterator[tuple[dict[str, int], dict[str, int], Path]]:
    """Both versions served through conveyor_devstack.faults, with a faults file; ({version: HTTP port},
    {version: gRPC port}, faults file)."""
    faults_file = tmp_path / "faults.json"
    ports, grpc_ports, procs = {}, {}, []
    for uri in fraud_versions[1]:
        version = uri.rsplit("/", 1)[-1]
        ports[version], grpc_ports[version] = free_port(), free_port()
        env = {
            faults.ENV_FILE: str(faults_file),
            faults.ENV_KEY: faults.fault_key("ns", NAME, version),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "conveyor_devstack.faults",
                    "--model-dir",
                    uri,
                    "--name",
                    NAME,
                    "--http-port",
                    str(ports[version]),
                    "--grpc-port",
                    str(grpc_ports[version]),
                    "--host",
                    "127.0.0.1",
                ],
                env={**os.environ, **env},
                stdout=(tmp_path / f"{version}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
    try:
        deadline = time.monotonic() + 120
        for version, port in ports.items():
            while not _ready(port):
                assert time.monotonic() < deadline, (tmp_path / f"{version}.log").read_text()[-3000:]
                time.sleep(0.3)
        yield ports, grpc_ports, faults_file
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_router_splits_by_weight_and_planted_faults_reach_prometheus(predictors, prometheus) -> None:
    ports, grpc_ports, faults_file = predictors
    for version, port in ports.items():
        prometheus.add_target(f"predictor-{version}", f"127.0.0.1:{port}", {"namespace": "ns"})

    def backends(v1: int, v2: int) -> list[Backend]:
        return [
            Backend(v, f"http://127.0.0.1:{ports[v]}", weight, f"127.0.0.1:{grpc_ports[v]}")
            for v, weight in (("v1", v1), ("v2", v2))
        ]

    host = RouterHost()
    try:
        router = host.ensure(("ns", NAME), NAME)
        url = f"{router.url}/v1/models/{NAME}:predict"
        host.set_backends(("ns", NAME), backends(80, 20))
        load = Load(url, {"instances": [ROW]}, rate=25, duration=4).start().wait()
        seen = load.by_version()
        assert sum(seen["v2"].values()) == pytest.approx(20, abs=1), seen  # exactly 20 of each 100
        assert sum(seen["v1"].values()) == pytest.approx(80, abs=1), seen
        assert not load.failures(), seen
        # gRPC through the router's own port, by the same weights: exactly 4 of 20 calls to v2.
        assert router.grpc_url is not None
        grpc_url = router.grpc_url.removeprefix("grpc://")
        calls = _grpc_calls(grpc_url, 20)
        assert all(c.status == grpc.StatusCode.OK for c in calls), calls
        assert sorted(c.version for c in calls) == ["v1"] * 16 + ["v2"] * 4, calls

        # A planted regression: v2 fails half its requests and is slow; v1 stays untouched.
        faults.plant(faults_file, faults.fault_key("ns", NAME, "v2"), error_rate=0.5, delay_ms=150)
        load = Load(url, {"instances": [ROW]}, rate=25, duration=4).start().wait()
        seen = load.by_version()
        assert sum(seen["v2"].values()) == pytest.approx(20, abs=1), seen
        assert 3 <= seen["v2"][503] <= 17, seen  # half of v2's 20, give or take chance
        assert not load.failures("v1"), seen
        slow = [a.latency for a in load.snapshot() if a.version == "v2"]
        assert min(slow) >= 0.15

        # gRPC ModelInfer meets the same fault (all calls to v2 through the router): UNAVAILABLE with the
        # planted message, after the delay; v1 answers; readiness and metadata RPCs stay healthy, as with a
        # model that regressed.
        host.set_backends(("ns", NAME), backends(0, 100))
        calls = _grpc_calls(grpc_url, 20)
        assert {c.version for c in calls} == {"v2"}, calls
        failed = [c for c in calls if c.status != grpc.StatusCode.OK]
        assert 3 <= len(failed) <= 17, calls
        assert all(
            c.status == grpc.StatusCode.UNAVAILABLE and "planted fault" in c.details for c in failed
        ), failed
        assert min(c.seconds for c in calls) >= 0.15, calls
        assert all(c.status == grpc.StatusCode.OK for c in _grpc_calls(f"127.0.0.1:{grpc_ports['v1']}", 10))
        assert _grpc_healthy(f"127.0.0.1:{grpc_ports['v2']}")
        # ... counted by the predictor's own metrics as server errors (503, what UNAVAILABLE stands for),
        # its latency including the delay: of v2's 24 gRPC answers, only the 4 from before the fault under 0.1 s.
        scrape = Metrics.scrape(f"http://127.0.0.1:{ports['v2']}")
        grpc_v2 = {"protocol": "grpc", "model_version": "v2"}
        server_errors = scrape.value("conveyor_requests_total", code="503", outcome="server_error", **grpc_v2)
        assert server_errors == len(failed)
        assert scrape.value("conveyor_requests_total", code="200", **grpc_v2) == 24 - len(failed)
        assert scrape.value("conveyor_request_duration_seconds_count", **grpc_v2) == 24
        assert scrape.value("conveyor_request_duration_seconds_bucket", le="0.1", **grpc_v2) == 4

        # What the predictor's own metrics say, through Prometheus: the 5xx and the delay are counted, for
        # HTTP (the router's V1 traffic) and for gRPC alike.
        for port in ports.values():
            prometheus.wait_for_target(f"127.0.0.1:{port}", timeout=30)
        errors = 'sum(conveyor_requests_total{namespace="ns", model_version="v2", protocol="%s", code="503"})'
        for protocol, count in (("v1", seen["v2"][503]), ("grpc", len(failed))):
            deadline = time.monotonic() + 15
            while (prometheus.value(errors % protocol) or 0) < count:
                assert time.monotonic() < deadline, (protocol, prometheus.value(errors % protocol))
                time.sleep(0.5)
            assert prometheus.value(errors % protocol) == count, protocol
        v1_errors = 'sum(conveyor_requests_total{namespace="ns", model_version="v1", outcome="server_error"})'
        assert prometheus.value(v1_errors) is None
        # v2's HTTP histogram holds its 20 fast answers from before the fault and 20 slow ones: the median sits
        # on the boundary between them, the 90th percentile among the slow ones.
        p90 = prometheus.value(
            "histogram_quantile(0.9, sum by (le) "
            '(conveyor_request_duration_seconds_bucket{model_version="v2", protocol="v1"}))'
        )
        assert p90 is not None and p90 >= 0.1

        # Weights follow the spec at once: all traffic back to v1, HTTP and gRPC.
        host.set_backends(("ns", NAME), backends(100, 0))
        load = Load(url, {"instances": [ROW]}, rate=25, duration=2).start().wait()
        assert set(load.by_version()) == {"v1"} and not load.failures()
        assert {(c.status, c.version) for c in _grpc_calls(grpc_url, 10)} == {(grpc.StatusCode.OK, "v1")}

        # The fault lifted, v2 answers every gRPC call again (half of 10 failing would fail 10 with p=1/1024).
        faults.plant(faults_file, faults.fault_key("ns", NAME, "v2"))
        calls = _grpc_calls(f"127.0.0.1:{grpc_ports['v2']}", 10)
        assert all(c.status == grpc.StatusCode.OK and c.version == "v2" for c in calls), calls
    finally:
        host.shutdown()
