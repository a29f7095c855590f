"""The predictor end to end: packages trained by the training runtime, served by KServe's real
ModelServer in a child process on a free 127.0.0.1 port, called with clients nobody here wrote
(KServe's ``InferenceRESTClient`` for V1 and V2, ``tritonclient.http`` for V2) and plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import http.client as httpclient
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _serving_support import (
    FRAUD_FEATURES,
    ROOT,
    Metrics,
    ServerProcess,
    free_port,
    http,
    post_json,
    rows_of,
)

pytestmark = pytest.mark.slow

FRAUD = "fraud"
DIGITS = "digits"
MAX_BODY = 1024 * 1024
MAX_ROWS = 2000
EXPLAIN_MAX = 8  # --explain-max-instances of the fraud server


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def fraud_package(registry_dir: Path, fraud_versions: tuple[str, list[str]]) -> str:
    """The session's fraud v1 (tests/e2e/conftest.py: a real training run on transactions from the same
    generator, with this file's transforms), copied into a registry of this file's own: the feedback and
    served-request logs these tests write stay out of the rollout tests' registry."""
    package = registry_dir / FRAUD / "v1"
    if not package.exists():
        shutil.copytree(Path(fraud_versions[1][0].removeprefix("file://")), package)
    return str(package)


@pytest.fixture(scope="session")
def digits_package(digits_run: tuple[Any, Any]) -> str:
    """The session's sample digits package (tests/e2e/conftest.py), which test_training checks too."""
    return str(digits_run[1].uri)


@pytest.fixture(scope="module")
def fraud_server(fraud_package: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(
        fraud_package, FRAUD, tmp_path_factory.mktemp("logs"),
        "--max-batch-size", "32", "--max-latency-ms", "20",
        "--drift-window", "400", "--drift-min-samples", "200",
        "--max-body-bytes", str(MAX_BODY), "--max-rows", str(MAX_ROWS),
        "--explain", "--explain-max-instances", str(EXPLAIN_MAX),
    )  # fmt: skip
    with server:
        yield server


@pytest.fixture(scope="module")
def digits_server(digits_package: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(
        digits_package, DIGITS, tmp_path_factory.mktemp("logs"),
        "--drift-window", "200", "--drift-min-samples", "200", "--explain",
    )  # fmt: skip
    with server:
        yield server


@pytest.fixture(scope="module")
def live_frame() -> Any:
    """Fresh transactions from the training distribution (another seed of the same generator)."""
    from conveyor.runtime.training.data import fraud_frame

    return fraud_frame(rows=1200, seed=11, fraud_rate=0.1)


def in_process_probabilities(package_uri: str, data: Any) -> np.ndarray:
    """What the package computes without the server: its fitted transforms, its TorchScript module."""
    import torch

    from conveyor.runtime.package.registry import open_package

    pkg = open_package(package_uri)
    x = torch.from_numpy(pkg.transforms.apply(data))
    with torch.inference_mode():
        return torch.softmax(pkg.load_model("cpu")(x), dim=1).numpy()


def expected_labels(package_uri: str, probabilities: np.ndarray) -> list[str]:
    """The labels the package's decision rule gives (its tuned threshold for a binary model, else argmax)."""
    from conveyor.runtime.package.decision import decide, decision_threshold
    from conveyor.runtime.package.registry import open_package

    threshold = decision_threshold(open_package(package_uri).schema)
    return [str(i) for i in decide(probabilities, threshold)]


def kserve_infer(url: str, protocol: str, data: Any, name: str) -> Any:
    from kserve import InferenceRESTClient, RESTConfig

    async def call() -> Any:
        client = InferenceRESTClient(RESTConfig(protocol=protocol, timeout=60, retries=0))
        try:
            return await client.infer(url, data, model_name=name)
        finally:
            await client.close()

    return asyncio.run(call())


def v2_request(rows: list[dict[str, Any]], request_id: str | None = None) -> Any:
    """A KServe InferRequest with one input tensor per feature, typed as the model metadata says."""
    from kserve import InferInput, InferRequest

    types = {"amount": "FP32", "merchant": "BYTES", "hour": "INT64", "foreign": "BOOL",
             "card_age_days": "INT64", "distance_km": "FP32", "txn_last_hour": "INT64"}  # fmt: skip
    inputs = []
    for name in FRAUD_FEATURES:
        values = [r[name] for r in rows]
        if name == "distance_km":
            values = [float("nan") if v is None else v for v in values]
        arr = np.array(values, dtype=object if types[name] == "BYTES" else None)
        if types[name] == "FP32":
            arr = arr.astype(np.float32)
        inp = InferInput(name, [len(rows)], types[name])
        inp.set_data_from_numpy(arr, binary_data=True)  # NaN needs the binary extension; JSON has none
        inputs.append(inp)
    return InferRequest(model_name=FRAUD, infer_inputs=inputs, request_id=request_id)


# ---------------------------------------------------------------- protocols


def test_v1_with_kserve_client_applies_exactly_the_fitted_transforms(
    fraud_server: ServerProcess, fraud_package: str, live_frame: Any
) -> None:
    rows = rows_of(live_frame.iloc[:16])
    rows[3]["distance_km"] = None  # nullable: imputed with the training median, as in training
    answer = kserve_infer(fraud_server.url, "v1", {"instances": rows}, FRAUD)

    assert answer["model_name"] == FRAUD and answer["model_version"] == Path(fraud_package).name
    assert isinstance(answer["id"], str) and answer["id"]
    preds = answer["predictions"]
    assert len(preds) == 16
    served = np.array([[p["probabilities"]["0"], p["probabilities"]["1"]] for p in preds])
    expected = in_process_probabilities(fraud_package, rows)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert [p["label"] for p in preds] == expected_labels(fraud_package, expected)


def test_v2_with_kserve_client_matches_v1_and_carries_id_and_version(
    fraud_server: ServerProcess, fraud_package: str, live_frame: Any
) -> None:
    rows = rows_of(live_frame.iloc[16:40])
    response = kserve_infer(fraud_server.url, "v2", v2_request(rows, request_id="req-v2-1"), FRAUD)
    assert response.id == "req-v2-1"
    # (KServe's client drops model_version when it parses a binary response; tritonclient's test checks it.)
    out = {o.name: o.as_numpy() for o in response.outputs}
    assert out["probabilities"].shape == (24, 2)
    np.testing.assert_allclose(out["probabilities"], in_process_probabilities(fraud_package, rows), atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in out["label"].tolist()]
    v1 = kserve_infer(fraud_server.url, "v1", {"instances": rows}, FRAUD)
    assert labels == [p["label"] for p in v1["predictions"]]


def test_v2_metadata_and_inference_with_tritonclient(
    fraud_server: ServerProcess, fraud_package: str, live_frame: Any
) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{fraud_server.port}")
    try:
        assert client.is_server_live() and client.is_model_ready(FRAUD)
        meta = client.get_model_metadata(FRAUD)
        assert meta["versions"] == ["v1"]
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
            ("amount", "FP32"), ("merchant", "BYTES"), ("hour", "INT64"), ("foreign", "BOOL"),
            ("card_age_days", "INT64"), ("distance_km", "FP32"), ("txn_last_hour", "INT64"),
        ]  # fmt: skip
        assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}

        frame = live_frame.iloc[40:60]
        inputs = []
        for i in meta["inputs"]:
            col = frame[i["name"]].to_numpy()
            arr = (
                col.astype(object)
                if i["datatype"] == "BYTES"
                else col.astype(triton.triton_to_np_dtype(i["datatype"]))
            )
            inp = triton.InferInput(i["name"], [len(frame)], i["datatype"])
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        result = client.infer(FRAUD, inputs, request_id="triton-1")
        assert result.get_response()["id"] == "triton-1"
        assert result.get_response()["model_version"] == "v1"
        probs = result.as_numpy("probabilities")
        assert probs.shape == (20, 2)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        labels = [v.decode() for v in result.as_numpy("label").tolist()]
        assert labels == expected_labels(fraud_package, probs)
    finally:
        client.close()


# ---------------------------------------------------------------- batching and metrics


def test_concurrent_requests_are_batched(fraud_server: ServerProcess, live_frame: Any) -> None:
    from kserve import InferenceRESTClient, RESTConfig

    before = Metrics.scrape(fraud_server.url)
    rows = rows_of(live_frame.iloc[100:164])

    async def burst() -> list[Any]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60, retries=0))
        try:
            return await asyncio.gather(
                *(client.infer(fraud_server.url, v2_request([r]), model_name=FRAUD) for r in rows)
            )
        finally:
            await client.close()

    answers = asyncio.run(burst())
    assert len({a.id for a in answers}) == 64  # every request answered individually
    after = Metrics.scrape(fraud_server.url)
    labels = {"model_name": FRAUD, "model_version": "v1"}
    passes = after.value("conveyor_batch_size_count", **labels) - (
        before.value("conveyor_batch_size_count", **labels) or 0
    )
    rows_run = after.value("conveyor_batch_size_sum", **labels) - (
        before.value("conveyor_batch_size_sum", **labels) or 0
    )
    assert rows_run == 64
    assert passes < 64, "64 concurrent one-row requests should share forward passes"
    singles = after.value("conveyor_batch_size_bucket", le="1.0", **labels) - (
        before.value("conveyor_batch_size_bucket", le="1.0", **labels) or 0
    )
    assert singles < passes or passes == 1, "some batch must hold more than one row"


def test_metrics_count_requests_by_outcome_and_code_with_model_labels(
    fraud_server: ServerProcess, live_frame: Any
) -> None:
    before = Metrics.scrape(fraud_server.url)
    labels = {"model_name": FRAUD, "model_version": "v1"}
    ok = {**labels, "protocol": "v1", "outcome": "success", "code": "200"}
    bad = {**labels, "protocol": "v1", "outcome": "client_error", "code": "400"}
    for _ in range(3):
        assert (
            post_json(
                f"{fraud_server.url}/v1/models/{FRAUD}:predict", {"instances": rows_of(live_frame.iloc[:2])}
            )[0]
            == 200
        )
    assert (
        post_json(f"{fraud_server.url}/v1/models/{FRAUD}:predict", {"instances": [{"amount": 1}]})[0] == 400
    )
    after = Metrics.scrape(fraud_server.url)
    assert (
        after.value("conveyor_requests_total", **ok) - (before.value("conveyor_requests_total", **ok) or 0)
        == 3
    )
    assert (
        after.value("conveyor_requests_total", **bad) - (before.value("conveyor_requests_total", **bad) or 0)
        == 1
    )
    lat = {**labels, "protocol": "v1"}
    assert (
        after.value("conveyor_request_duration_seconds_count", **lat)
        - (before.value("conveyor_request_duration_seconds_count", **lat) or 0)
        == 4
    )
    predicted = after.value("conveyor_predictions_total", **labels) - (
        before.value("conveyor_predictions_total", **labels) or 0
    )
    assert predicted == 6  # rows of the successful requests, by class
    assert after.value("conveyor_model_info", **labels, task="classification", architecture="mlp") == 1
    assert after.find("request_predict_seconds_count", model_name=FRAUD), (
        "KServe's own metrics are still there"
    )


# ---------------------------------------------------------------- several processes, gRPC


@pytest.fixture(scope="module")
def fraud_workers(fraud_package: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three server processes on one port (``--workers 3``), with KServe's gRPC server in each."""
    grpc_port = free_port()
    server = ServerProcess(
        fraud_package, FRAUD, tmp_path_factory.mktemp("logs"),
        "--workers", "3", "--grpc-port", str(grpc_port), "--max-latency-ms", "2",
    )  # fmt: skip
    server.grpc_port = grpc_port  # type: ignore[attr-defined]
    server.start(timeout=300)  # three processes load the model at once on a shared machine
    try:
        wait_for_processes(server, 3)
        yield server
    finally:
        server.stop()


def wait_for_processes(server: ServerProcess, n: int, timeout: float = 300) -> Metrics:
    deadline = time.monotonic() + timeout
    while True:
        m = Metrics.scrape(server.url)
        if m.value("conveyor_server_processes", model_name=FRAUD) == n:
            return m
        assert time.monotonic() < deadline, (
            f"{n} server processes not up after {timeout}s:\n{server.log_tail()}"
        )
        time.sleep(0.3)


def worker_pids(server: ServerProcess) -> list[int]:
    assert server.proc is not None
    text = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_three_processes_report_every_request_in_one_scrape(
    fraud_workers: ServerProcess, live_frame: Any
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    labels = {"model_name": FRAUD, "model_version": "v1"}
    ok = {**labels, "protocol": "v1", "outcome": "success", "code": "200"}
    before = Metrics.scrape(fraud_workers.url)
    rows = rows_of(live_frame.iloc[200:290])
    url = f"{fraud_workers.url}/v1/models/{FRAUD}:predict"
    with ThreadPoolExecutor(6) as pool:  # a new connection per request: the kernel spreads them
        codes = list(pool.map(lambda r: post_json(url, {"instances": [r]})[0], rows))
    assert codes == [200] * len(rows)
    after = Metrics.scrape(fraud_workers.url)  # one scrape, whichever process answers it

    def grew(name: str, **lab: str) -> float:
        return after.value(name, **lab) - (before.value(name, **lab) or 0)

    assert grew("conveyor_requests_total", **ok) == len(rows)
    assert grew("conveyor_request_duration_seconds_count", **labels, protocol="v1") == len(rows)
    assert grew("conveyor_batch_size_sum", **labels) == len(rows)
    assert grew("conveyor_predictions_total", **labels) == len(rows)
    for feature in ("amount", "merchant", "__prediction__"):  # the additive drift counts, summed
        assert grew("conveyor_drift_bin_total", **labels, feature=feature) == len(rows), feature
    # The drift window is the answering process's own: the others served some of the rows.
    window = after.value("conveyor_drift_window_rows", **labels)
    assert window is not None and window < after.value("conveyor_drift_bin_total", **labels, feature="amount")


def test_a_killed_worker_is_replaced_and_no_count_goes_back(
    fraud_workers: ServerProcess, live_frame: Any
) -> None:
    labels = {"model_name": FRAUD, "model_version": "v1"}
    url = f"{fraud_workers.url}/v1/models/{FRAUD}:predict"
    for r in rows_of(live_frame.iloc[300:320]):
        assert post_json(url, {"instances": [r]})[0] == 200
    before = Metrics.scrape(fraud_workers.url)
    pids = worker_pids(fraud_workers)
    assert len(pids) == 3
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pids[0] in worker_pids(fraud_workers) or len(worker_pids(fraud_workers)) != 3:
        assert time.monotonic() < deadline, (
            f"no replacement for the killed worker:\n{fraud_workers.log_tail()}"
        )
        time.sleep(0.2)
    after = wait_for_processes(
        fraud_workers, 3
    )  # the replacement loaded the model (the dead one's gauge is gone)
    for name in ("conveyor_requests_total", "conveyor_batch_size_sum"):
        assert after.value(name, **labels) == before.value(name, **labels), name
    assert post_json(url, {"instances": rows_of(live_frame.iloc[:1])})[0] == 200


def test_grpc_v2_with_tritonclient_and_invalid_argument_naming_the_input(
    fraud_workers: ServerProcess, fraud_package: str, live_frame: Any
) -> None:
    frame = live_frame.iloc[400:408]
    types = {"amount": "FP32", "merchant": "BYTES", "hour": "INT64", "foreign": "BOOL",
             "card_age_days": "INT64", "distance_km": "FP32", "txn_last_hour": "INT64"}  # fmt: skip
    inputs = [
        {"name": f, "datatype": types[f], "data": [r[f] for r in rows_of(frame)]} for f in FRAUD_FEATURES
    ]

    def grpc_infer(tensors: list[dict[str, Any]]) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "_grpc_client.py"),
             f"127.0.0.1:{fraud_workers.grpc_port}", FRAUD],  # type: ignore[attr-defined]
            input=json.dumps({"inputs": tensors}), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    before = Metrics.scrape(fraud_workers.url)
    answer = grpc_infer(inputs)
    assert answer["ready"] and answer["model_version"] == "v1"
    assert answer["label"] == expected_labels(
        fraud_package, in_process_probabilities(fraud_package, frame[FRAUD_FEATURES])
    )
    bad = grpc_infer([t for t in inputs if t["name"] != "amount"])["error"]
    assert bad["status"] == "StatusCode.INVALID_ARGUMENT" and "amount" in bad["message"], bad
    after = Metrics.scrape(fraud_workers.url)  # counted like HTTP, the status as the HTTP code it stands for
    for code, outcome in (("200", "success"), ("400", "client_error")):
        lab = {"model_name": FRAUD, "protocol": "grpc", "code": code, "outcome": outcome}
        grew = after.value("conveyor_requests_total", **lab) - (
            before.value("conveyor_requests_total", **lab) or 0
        )
        assert grew == 1, (code, grew)


# ---------------------------------------------------------------- drift


def test_drift_stays_low_in_distribution_and_rises_for_shifted_inputs(
    fraud_server: ServerProcess, live_frame: Any
) -> None:
    url = f"{fraud_server.url}/v1/models/{FRAUD}:predict"
    labels = {"model_name": FRAUD, "model_version": "v1", "method": "psi"}
    calm = live_frame.iloc[200:600]  # 400 rows: fills the whole window
    for start in range(0, 400, 50):
        assert post_json(url, {"instances": rows_of(calm.iloc[start : start + 50])})[0] == 200
    m = Metrics.scrape(fraud_server.url)
    assert m.value("conveyor_drift_window_rows", model_name=FRAUD, model_version="v1") == 400
    per_feature = {lab["feature"]: v for lab, v in m.find("conveyor_feature_drift", **labels)}
    assert set(per_feature) == set(FRAUD_FEATURES)
    calm_score = m.value("conveyor_drift_score", **labels)
    assert calm_score is not None and calm_score < 0.1, per_feature  # 0.1 = "no significant shift" for PSI

    shifted = live_frame.iloc[600:1000].copy()
    shifted["amount"] = shifted["amount"] * 25  # prices in another currency
    shifted["distance_km"] = shifted["distance_km"] + 300
    for start in range(0, 400, 50):
        assert post_json(url, {"instances": rows_of(shifted.iloc[start : start + 50])})[0] == 200
    m = Metrics.scrape(fraud_server.url)
    per_feature = {lab["feature"]: v for lab, v in m.find("conveyor_feature_drift", **labels)}
    assert per_feature["amount"] > 1.0 and per_feature["distance_km"] > 1.0
    assert per_feature["merchant"] < 0.1 and per_feature["hour"] < 0.1  # untouched features stay calm
    assert m.value("conveyor_drift_score", **labels) >= per_feature["amount"] > calm_score


# ---------------------------------------------------------------- feedback


def test_feedback_moves_the_online_accuracy_gauge(fraud_server: ServerProcess, live_frame: Any) -> None:
    url = fraud_server.url
    labels = {"model_name": FRAUD, "model_version": "v1"}
    answers = []
    for start in range(0, 40, 4):
        status, body = post_json(
            f"{url}/v1/models/{FRAUD}:predict", {"instances": rows_of(live_frame.iloc[start : start + 4])}
        )
        assert status == 200
        answers.append((body["id"], [p["label"] for p in body["predictions"]]))

    # The truth agrees with the model on the first five requests...
    status, body = post_json(
        f"{url}/v2/models/{FRAUD}/feedback", {"feedback": [{"id": i, "labels": p} for i, p in answers[:5]]}
    )
    assert status == 200, body
    assert body["online_accuracy"] == 1.0
    assert Metrics.scrape(url).value("conveyor_online_accuracy", **labels) == 1.0

    # ...and disagrees on the other five, one request at a time (the V1 path works too).
    flip = {"0": "1", "1": "0"}
    for rid, predicted in answers[5:]:
        status, body = post_json(
            f"{url}/v1/models/{FRAUD}/feedback", {"id": rid, "labels": [flip[p] for p in predicted]}
        )
        assert status == 200, body
    m = Metrics.scrape(url)
    assert m.value("conveyor_online_accuracy", **labels) == 0.5
    assert m.value("conveyor_feedback_total", result="correct", **labels) == 20
    assert m.value("conveyor_feedback_total", result="incorrect", **labels) == 20

    status, body = post_json(f"{url}/v2/models/{FRAUD}/feedback", {"id": "never-served", "label": "1"})
    assert status == 400 and "never-served" in json.dumps(body) and "never served" in json.dumps(body), body
    m = Metrics.scrape(url)
    assert m.value("conveyor_feedback_total", result="unknown_id", **labels) == 1
    assert m.value("conveyor_online_accuracy", **labels) == 0.5


def test_feedback_is_persisted_and_survives_a_restart(
    fraud_package: str, live_frame: Any, tmp_path: Path
) -> None:
    """Ground truth goes to the version's feedback dataset in registry storage: a new process finds it,
    with the inputs and the prediction beside each label."""
    from conveyor.runtime.package.registry import Registry

    root = fraud_package.rpartition("/fraud/")[0]
    store = Registry(root, "fraud")
    before = len(store.read_feedback(["v1"]))
    frame = live_frame.iloc[100:103]
    with ServerProcess(fraud_package, FRAUD, tmp_path) as server:
        status, body = post_json(f"{server.url}/v1/models/{FRAUD}:predict", {"instances": rows_of(frame)})
        assert status == 200
        rid, predicted = body["id"], [p["label"] for p in body["predictions"]]
        status, body = post_json(
            f"{server.url}/v1/models/{FRAUD}/feedback", {"id": rid, "labels": ["1", "0", "1"]}
        )
        assert status == 200, body
    with ServerProcess(fraud_package, FRAUD, tmp_path) as server:  # a new replica: the dataset is still there
        rows = [r for r in store.read_feedback(["v1"]) if r["id"] == rid]
        assert len(store.read_feedback(["v1"])) == before + 3
        assert [r["label"] for r in rows] == ["1", "0", "1"] and [r["prediction"] for r in rows] == predicted
        assert rows[0]["inputs"]["amount"] == pytest.approx(float(frame.iloc[0]["amount"]))
        assert rows[0]["inputs"]["merchant"] == frame.iloc[0]["merchant"]
        # It never served that id itself, but the first process's served-request log (flushed on its
        # shutdown) holds it: more ground truth for it is accepted here, with the served prediction.
        status, body = post_json(
            f"{server.url}/v1/models/{FRAUD}/feedback", {"id": rid, "labels": ["0", "0", "0"]}
        )
        assert status == 200, body
        rows = [r for r in store.read_feedback(["v1"]) if r["id"] == rid]
        assert [r["label"] for r in rows] == ["1", "0", "1", "0", "0", "0"] and [
            r["prediction"] for r in rows[3:]
        ] == predicted
        # An id nobody served: a 4xx naming it, and when a very recent one might still be in a buffer.
        status, body = post_json(
            f"{server.url}/v1/models/{FRAUD}/feedback", {"id": "nobody-served-this", "label": "1"}
        )
        assert status == 400 and "nobody-served-this" in json.dumps(body) and "flushed" in json.dumps(body), (
            body
        )


# ---------------------------------------------------------------- bad input


def _valid_row() -> dict[str, Any]:
    return {"amount": 42.5, "merchant": "grocery", "hour": 13, "foreign": False, "card_age_days": 400,
            "distance_km": 3.2, "txn_last_hour": 0}  # fmt: skip


def _with(**changes: Any) -> dict[str, Any]:
    row = _valid_row()
    for k, v in changes.items():
        if v is _DROP:
            row.pop(k)
        else:
            row[k] = v
    return row


_DROP = object()


def _v2_json(
    overrides: dict[str, dict[str, Any]] | None = None, drop: str | None = None, **extra: Any
) -> dict[str, Any]:
    types = {"amount": "FP32", "merchant": "BYTES", "hour": "INT64", "foreign": "BOOL",
             "card_age_days": "INT64", "distance_km": "FP32", "txn_last_hour": "INT64"}  # fmt: skip
    inputs = []
    for name, value in _valid_row().items():
        if name == drop:
            continue
        inp = {"name": name, "datatype": types[name], "shape": [1], "data": [value]}
        inp.update((overrides or {}).get(name, {}))
        inputs.append(inp)
    return {"inputs": inputs, **extra}


V1 = f"/v1/models/{FRAUD}:predict"
V2 = f"/v2/models/{FRAUD}/infer"
FEEDBACK = f"/v2/models/{FRAUD}/feedback"
JSON = {"content-type": "application/json"}

# (case, path, body (object -> JSON, bytes as is), extra headers, expected status, words the message must hold)
BAD_PAYLOADS: list[tuple[str, str, Any, dict[str, str], int, list[str]]] = [
    ("v1 missing feature", V1, {"instances": [_with(amount=_DROP)]}, {}, 400, ["amount", "missing"]),
    ("v1 wrong type", V1, {"instances": [_with(amount="lots")]}, {}, 400, ["amount", "lots"]),
    ("v1 null where not nullable", V1, {"instances": [_with(hour=None)]}, {}, 400, ["hour", "null"]),
    ("v1 NaN where not nullable", V1, {"instances": [_with(amount="NaN")]}, {}, 400, ["amount", "null"]),
    ("v1 bool feature not a bool", V1, {"instances": [_with(foreign="maybe")]}, {}, 400, ["foreign"]),
    ("v1 nested value", V1, {"instances": [_with(amount=[1, 2])]}, {}, 400, ["amount", "single value"]),
    ("v1 wrong row length", V1, {"instances": [[1.0, "grocery", 3]]}, {}, 400, ["3 values", "7 features"]),
    ("v1 instances not a list", V1, {"instances": {"amount": 1}}, {}, 400, ["instances", "list"]),
    ("v1 no instances", V1, {"rows": [_valid_row()]}, {}, 400, ["instances"]),
    ("v1 empty instances", V1, {"instances": []}, {}, 400, ["no rows"]),
    ("v1 body not an object", V1, [1, 2, 3], {}, 400, ["json object"]),
    ("v1 not JSON", V1, b"{not json", {}, 400, ["request format", "char 1"]),
    ("v1 too many rows", V1, {"instances": [[1, "a", 1, True, 1, 1, 1]] * (MAX_ROWS + 1)}, {}, 400, [str(MAX_ROWS + 1), "rows"]),
    ("v2 missing input", V2, _v2_json(drop="hour"), {}, 400, ["hour", "missing"]),
    ("v2 misnamed input", V2, _v2_json({"hour": {"name": "hours"}}), {}, 400, ["hour", "missing"]),
    ("v2 data does not fit shape", V2, _v2_json({"amount": {"shape": [2]}}), {}, 400, ["amount", "shape"]),
    ("v2 rows differ", V2, _v2_json({"hour": {"shape": [2], "data": [1, 2]}}), {}, 400, ["hour", "rows"]),
    ("v2 2-d feature", V2, _v2_json({"amount": {"shape": [1, 2], "data": [1.0, 2.0]}}), {}, 400, ["amount", "shape"]),
    ("v2 text for a float", V2, _v2_json({"amount": {"datatype": "BYTES", "data": ["x"]}}), {}, 400, ["amount", "numeric"]),
    ("v2 number for a string", V2, _v2_json({"merchant": {"datatype": "FP32", "data": [1.0]}}), {}, 400, ["merchant", "bytes"]),
    ("v2 unknown datatype", V2, _v2_json({"amount": {"datatype": "FP99"}}), {}, 400, ["fp99"]),
    ("v2 no inputs", V2, {"id": "x"}, {}, 422, ["inputs"]),
    ("v2 unknown output", V2, _v2_json(outputs=[{"name": "score"}]), {}, 400, ["score"]),
    ("v2 binary without header length", V2, b"\x00\x01", {"content-type": "application/octet-stream"}, 400, ["inference-header-content-length"]),
    ("v2 binary bad header length", V2, b"{}", {"content-type": "application/octet-stream", "inference-header-content-length": "ten"}, 400, ["ten"]),
    ("v2 binary header json without inputs", V2, b'{"id": "a"}', {"content-type": "application/octet-stream", "inference-header-content-length": "11"}, 400, ["inputs"]),
    ("feedback label not a class", FEEDBACK, {"id": "a", "label": "maybe"}, {}, 400, ["maybe", "classes"]),
    ("feedback without id", FEEDBACK, {"label": "1"}, {}, 400, ["id"]),
    ("feedback not JSON", FEEDBACK, b"[[", {}, 400, ["json"]),
]  # fmt: skip


def test_an_unknown_field_is_ignored_and_counted_and_an_imputed_one_may_be_left_out(
    fraud_server: ServerProcess,
) -> None:
    """An upstream producer adding a field breaks nothing; a field the fitted transforms impute is optional."""
    row = _with(colour="red")
    got, raw, _ = http(
        "POST",
        fraud_server.url + V1,
        json.dumps({"instances": [row, _with(distance_km=_DROP)]}).encode(),
        JSON,
    )
    assert got == 200, raw
    assert len(json.loads(raw)["predictions"]) == 2
    v2 = _v2_json()
    v2["inputs"].append({"name": "colour", "datatype": "BYTES", "shape": [1], "data": ["red"]})
    got, raw, _ = http("POST", fraud_server.url + V2, json.dumps(v2).encode(), JSON)
    assert got == 200, raw
    got, raw, _ = http("POST", fraud_server.url + V2, json.dumps(_v2_json(drop="distance_km")).encode(), JSON)
    assert got == 200, raw
    _, text, _ = http("GET", fraud_server.url + "/metrics")
    counted = [
        line
        for line in text.decode().splitlines()
        if line.startswith("conveyor_ignored_inputs_total{") and 'field="colour"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 2, counted


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_PAYLOADS],
)
def test_bad_payloads_get_a_4xx_naming_the_problem(
    fraud_server: ServerProcess, path: str, body: Any, headers: dict[str, str], status: int, words: list[str]
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, raw, _ = http("POST", fraud_server.url + path, data, {**JSON, **headers})
    message = raw.decode(errors="replace").lower()
    assert got == status, message[:500]
    for word in words:
        assert word.lower() in message, f"{word!r} not in {message[:500]}"
    assert fraud_server.alive()


def test_nan_in_a_binary_tensor_and_oversized_bodies_are_refused(fraud_server: ServerProcess) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=f"127.0.0.1:{fraud_server.port}")
    try:
        inputs = []
        for name, value in _valid_row().items():
            dt = {"merchant": "BYTES", "foreign": "BOOL", "amount": "FP32", "distance_km": "FP32"}.get(
                name, "INT64"
            )
            arr = np.array([value], dtype=object if dt == "BYTES" else triton.triton_to_np_dtype(dt))
            if name == "amount":
                arr[0] = np.nan
            inp = triton.InferInput(name, [1], dt)
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        with pytest.raises(InferenceServerException) as err:
            client.infer(FRAUD, inputs)
        assert err.value.status() == "400" and "amount" in err.value.message()
    finally:
        client.close()

    # A declared length over the limit is refused before the body is read.
    conn = httpclient.HTTPConnection("127.0.0.1", fraud_server.port, timeout=30)
    conn.putrequest("POST", V1)
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(MAX_BODY + 1))
    conn.endheaders(b"{")
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 413 and str(MAX_BODY + 1) in body and str(MAX_BODY) in body
    conn.close()

    # No content-length: the limit is enforced while the body streams in.
    conn = httpclient.HTTPConnection("127.0.0.1", fraud_server.port, timeout=30)
    chunks = (b" " * 65536 for _ in range(MAX_BODY // 65536 + 2))
    conn.request("POST", V1, body=chunks, headers=JSON, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and b"exceeds" in resp.read()
    conn.close()
    assert fraud_server.alive()


def test_no_client_input_produced_a_server_error(fraud_server: ServerProcess) -> None:
    """The whole bad-payload table again, counted by the server's own metrics: each inference request a
    client error (feedback is not an inference request), none (nor anything earlier in this module) a
    server error."""
    before = Metrics.scrape(fraud_server.url).value("conveyor_requests_total", model_name=FRAUD, outcome="client_error")
    for _, path, body, headers, _, _ in BAD_PAYLOADS:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        http("POST", fraud_server.url + path, data, {**JSON, **headers})
    m = Metrics.scrape(fraud_server.url)
    counted = m.value("conveyor_requests_total", model_name=FRAUD, outcome="client_error")
    inferences = sum(1 for case in BAD_PAYLOADS if case[1] != FEEDBACK)
    assert counted == (before or 0) + inferences, (before, counted)
    assert m.value("conveyor_requests_total", model_name=FRAUD, outcome="server_error") is None
    status, _, _ = http("GET", f"{fraud_server.url}/v2/models/{FRAUD}/ready")
    assert status == 200


# ---------------------------------------------------------------- images


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(5)
    idx = rng.choice(len(bunch.images), n, replace=False)
    return bunch.images[idx].astype(np.float32), bunch.target[idx]


def _png(pixels16: np.ndarray) -> bytes:
    """An 8x8 digit (pixels 0..16) as the PNG a client would upload."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(pixels16 * 255 / 16).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_image_model_over_v1_b64_and_v2_bytes(digits_server: ServerProcess, digits_package: str) -> None:
    import torch
    import tritonclient.http as triton
    from kserve import InferInput, InferRequest

    from conveyor.runtime.package.registry import open_package

    images, truth = _digits(20)
    pngs = [_png(im) for im in images]
    pkg = open_package(digits_package)
    with torch.inference_mode():
        expected = pkg.load_model()(torch.from_numpy(pkg.transforms.apply(images[:, None]))).argmax(1).numpy()
    expected = [pkg.classes[i] for i in expected]

    v1 = kserve_infer(
        digits_server.url, "v1",
        {"instances": [{"image": {"b64": base64.b64encode(p).decode()}} for p in pngs]}, DIGITS,
    )  # fmt: skip
    v1_labels = [p["label"] for p in v1["predictions"]]
    assert (
        sum(a == b for a, b in zip(v1_labels, expected, strict=True)) >= 19
    )  # PNG rounding may flip a borderline one
    assert sum(a == str(t) for a, t in zip(v1_labels, truth, strict=True)) >= 16

    b64_input = InferInput("image", [len(pngs)], "BYTES", data=[base64.b64encode(p).decode() for p in pngs])
    v2 = kserve_infer(
        digits_server.url, "v2", InferRequest(model_name=DIGITS, infer_inputs=[b64_input]), DIGITS
    )
    assert [v.decode() if isinstance(v, bytes) else v for v in v2.outputs[0].as_numpy().tolist()] == v1_labels

    client = triton.InferenceServerClient(url=f"127.0.0.1:{digits_server.port}")
    try:
        assert client.get_model_metadata(DIGITS)["inputs"] == [
            {"name": "image", "datatype": "BYTES", "shape": [-1]}
        ]
        raw = triton.InferInput("image", [len(pngs)], "BYTES")
        raw.set_data_from_numpy(np.array(pngs, dtype=object), binary_data=True)  # raw PNG bytes
        result = client.infer(DIGITS, [raw])
        assert [v.decode() for v in result.as_numpy("label").tolist()] == v1_labels
        pixels = triton.InferInput("image", [len(images), 1, 8, 8], "FP32")  # raw pixels, no codec
        pixels.set_data_from_numpy(images[:, None].astype(np.float32))
        exact = client.infer(DIGITS, [pixels])
        assert [v.decode() for v in exact.as_numpy("label").tolist()] == expected
    finally:
        client.close()

    url = f"{digits_server.url}/v1/models/{DIGITS}:predict"
    status, body = post_json(url, {"instances": [{"image": {"b64": "%%%not base64"}}]})
    assert status == 400 and "base64" in body["error"]
    status, body = post_json(url, {"instances": [{"image": {"b64": base64.b64encode(b"hello").decode()}}]})
    assert status == 400 and "not a decodable image" in body["error"]
    status, body = post_json(url, {"instances": [{"picture": 1}]})
    assert status == 400 and "image" in body["error"]


def test_image_drift_follows_the_input_statistics(digits_server: ServerProcess) -> None:
    url = f"{digits_server.url}/v1/models/{DIGITS}:predict"
    labels = {"model_name": DIGITS, "model_version": "v1", "method": "psi"}
    images, _ = _digits(200)
    for start in range(0, 200, 25):
        batch = [{"image": {"b64": base64.b64encode(_png(im)).decode()}} for im in images[start : start + 25]]
        assert post_json(url, {"instances": batch})[0] == 200
    m = Metrics.scrape(digits_server.url)
    calm = {lab["feature"]: v for lab, v in m.find("conveyor_feature_drift", **labels)}
    assert set(calm) == {"mean", "std", "brightness"}
    assert max(calm.values()) < 0.2, calm

    for start in range(0, 200, 25):  # inverted: white background, dark strokes
        batch = [
            {"image": {"b64": base64.b64encode(_png(16 - im)).decode()}} for im in images[start : start + 25]
        ]
        assert post_json(url, {"instances": batch})[0] == 200
    m = Metrics.scrape(digits_server.url)
    shifted = {lab["feature"]: v for lab, v in m.find("conveyor_feature_drift", **labels)}
    assert shifted["brightness"] > 1.0 and shifted["mean"] > 1.0
    assert m.value("conveyor_drift_score", **labels) > 1.0


# ---------------------------------------------------------------- start-up failures


def _serve(model_dir: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.runtime.serve", "--model-dir", model_dir, "--name", "x",
         "--http-port", "1", "--host", "127.0.0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_explain_attributes_each_answer_to_the_input_features(
    fraud_server: ServerProcess, live_frame: Any
) -> None:
    rows = rows_of(live_frame.head(5))
    status, explained = post_json(f"{fraud_server.url}/v1/models/{FRAUD}:explain", {"instances": rows})
    assert status == 200, explained
    _, predicted = post_json(f"{fraud_server.url}/v1/models/{FRAUD}:predict", {"instances": rows})
    assert [e["answer"] for e in explained["explanations"]] == [p["label"] for p in predicted["predictions"]]
    for e in explained["explanations"]:
        # The input's feature names: merchant's one-hot columns are summed back onto merchant.
        assert list(e["attributions"]) == FRAUD_FEATURES
    assert max(abs(v) for e in explained["explanations"] for v in e["attributions"].values()) > 1e-3
    assert explained["method"] == "integrated-gradients" and explained["model_version"] == "v1"
    # The server says how it runs the model: the package's ONNX on onnxruntime (this CPU's fastest).
    status, raw, _ = http("GET", f"{fraud_server.url}/v2/models/{FRAUD}")
    assert status == 200 and json.loads(raw)["platform"] == "onnxruntime"
    scraped = Metrics.scrape(fraud_server.url)
    assert scraped.value("conveyor_model_info", model_name=FRAUD, backend="onnxruntime") == 1

    too_many = rows_of(live_frame.head(EXPLAIN_MAX + 1))
    status, body = post_json(f"{fraud_server.url}/v1/models/{FRAUD}:explain", {"instances": too_many})
    assert status == 400 and f"at most {EXPLAIN_MAX}" in str(body) and "maxInstances" in str(body)


def test_explain_gives_an_image_a_saliency_map_of_its_shape(digits_server: ServerProcess) -> None:
    images, _ = _digits(3)
    body = {"instances": [{"image": {"b64": base64.b64encode(_png(im)).decode()}} for im in images]}
    status, explained = post_json(f"{digits_server.url}/v1/models/{DIGITS}:explain", body)
    assert status == 200, explained
    for e in explained["explanations"]:
        saliency = np.array(e["saliency"])
        assert saliency.shape == (8, 8) and (saliency >= 0).all() and saliency.sum() > 0


def test_a_missing_or_corrupt_package_fails_at_start_naming_path_and_reason(
    fraud_package: str, tmp_path: Path
) -> None:
    missing = tmp_path / "reg" / "fraud" / "v9"
    proc = _serve(str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "package.json" in proc.stderr

    corrupt = tmp_path / "reg2" / "fraud" / "v1"
    shutil.copytree(fraud_package, corrupt)
    weights = corrupt / "model.pt2"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = _serve(str(corrupt))
    assert proc.returncode == 2
    assert str(corrupt) in proc.stderr and "model.pt2" in proc.stderr and "corrupt" in proc.stderr
