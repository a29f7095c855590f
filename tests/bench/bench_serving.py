"""Benchmark: the served model against the limit it can approach and the peers a user would pick instead.

For a tabular model (the fraud MLP) and an image model (ResNet-18 on 64x64 PNG digits), at concurrency 1,
8, 32 and 64 (closed loop), requests/s and p50/p99 of:

(a) in-process: the package's forward pass (``ScoringModel.forward``: the backend the predictor picks,
    e.g. onnxruntime, plus softmax) called directly on transformed inputs at batch sizes 1..256, on the
    server's cores with 1 torch thread and with all of them; the best is the limit;
(b) plain ``kserve.Model`` of the same package and backend (``_plain_kserve_model.py``): one forward pass
    per request;
(c) Ray Serve with ``@serve.batch`` on the same package and backend (``_ray_serve_model.py``, one replica
    per server core);
(d) conveyor (``python -m conveyor.runtime.serve``) with 1 process and with N (one per server core, at
    least 2), over HTTP (V1 JSON, the same bodies as (b) and (c)) and over gRPC (V2 tensors,
    ``tritonclient.grpc.aio``).

Each request is one row (a transaction as JSON; one PNG as KServe's image example sends it). Servers and
load generator are pinned apart with ``taskset``/``sched_setaffinity``: on this 2-core machine every
server (and its children, Ray's processes included) runs on cpu 1 and the generator (this process and
its client processes) on cpu 0; the in-process limit is measured on the server's core too. Each point
still records the generator's own CPU use (``client_cpu_cores``). For the image model it also measures
the event loop's lag while large images decode (``loop_lag``): health-probe latency with decoding on the
loop (the old way) and off it.

Run: ``make bench`` (pytest -m bench) or ``python tests/bench/bench_serving.py [--fraud-package URI]
[--image-package URI] [--duration S]``. Writes tests/bench/results/serving.json. Goal at concurrency 32:
conveyor >= 0.8 x the in-process limit and ahead of Ray Serve.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from _serving_support import (  # noqa: E402
    FRAUD_FEATURES,
    Metrics,
    ServerProcess,
    fraud_config,
    free_port,
    http,
    rows_of,
    train_package,
)

RESULTS = HERE / "results" / "serving.json"
CONCURRENCY = (1, 8, 32, 64)


def _split_cpus() -> tuple[set[int], set[int]]:
    """(server cpus, load generator cpus): the first cpu for the generator, the rest for the servers
    (on one cpu, both share it)."""
    # The first process's cpus, handed to its children (they start pinned to the generator's).
    known = os.environ.setdefault("CONVEYOR_BENCH_CPUS", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    cpus = sorted(int(c) for c in known.split(","))
    return (set(cpus[1:]), {cpus[0]}) if len(cpus) > 1 else (set(cpus), set(cpus))


SERVER_CPUS, CLIENT_CPUS = _split_cpus()


def pinned(args: list[str]) -> list[str]:
    """A server command line run on the server's cpus (its children inherit them)."""
    return ["taskset", "-c", ",".join(map(str, sorted(SERVER_CPUS))), *args]


BATCH_SIZES = (1, 8, 32, 64, 128, 256)
BATCH_ROWS = 64  # rows per request of the batching client (tabular)
NAME = "digits"


def resnet_config(registry: str, image_dir: Path | None) -> dict[str, Any]:
    """ResNet-18, one epoch: on ``image_dir`` (an image folder) or, without one, the raw 8x8 digits."""
    if image_dir is None:
        data: dict[str, Any] = {
            "source": {"uri": "builtin://digits", "format": "builtin"},
            "label": "label",
            "contract": {"columns": [{"name": "image", "type": "image", "min": 0, "max": 16}]},
        }
    else:
        data = {"source": {"uri": str(image_dir), "format": "imagefolder"}, "label": "label"}
    return {
        "pipeline": "digits-resnet",
        "namespace": "bench",
        "run": 1,
        "data": data,
        "training": {
            "model": {"architecture": "resnet18"},
            "hyperparameters": {"epochs": 1, "batchSize": 64, "learningRate": 0.002},
        },
        "registry": {"uri": registry, "modelName": "digits-resnet18"},
    }


def digit_pngs(size: int, n: int | None = None) -> tuple[list[bytes], np.ndarray]:
    """The built-in digits as ``size`` x ``size`` grey PNGs (0..255) and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    count = len(bunch.images) if n is None else n
    pngs = []
    for i in range(count):
        im = Image.fromarray(
            np.round(bunch.images[i % len(bunch.images)] * 255 / 16).astype(np.uint8), mode="L"
        )
        if size != 8:
            im = im.resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, bunch.target[np.arange(count) % len(bunch.images)]


def write_image_folder(root: Path, size: int) -> Path:
    pngs, labels = digit_pngs(size)
    for i, (png, label) in enumerate(zip(pngs, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(png)
    return root


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q))]


def decoded(pngs: list[bytes]) -> np.ndarray:
    """PNGs as raw pixels [n, 1, H, W] (0..255), what the server decodes them to."""
    from PIL import Image

    return np.stack(
        [np.asarray(Image.open(io.BytesIO(p)).convert("L"), dtype=np.float32)[None] for p in pngs]
    )


# ---------------------------------------------------------------- in-process limit


def in_process(package: str, threads: int, seconds: float, x_all: np.ndarray) -> dict[str, Any]:
    """The forward pass (plus softmax) on already transformed rows, per batch size, with the backend the
    predictor picks (ScoringModel)."""
    import torch

    from conveyor.runtime.serving.model import ScoringModel

    torch.set_num_threads(threads)
    model = ScoringModel.open(package, "cpu")
    x_all = np.concatenate([x_all] * (max(BATCH_SIZES) // len(x_all) + 1))[: max(BATCH_SIZES)]
    by_batch = {}
    for bs in BATCH_SIZES:
        x = np.ascontiguousarray(x_all[:bs], dtype=np.float32)

        def step(x: np.ndarray = x) -> None:
            model.forward(x)

        for _ in range(3):
            step()
        rows, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            rows += bs
        by_batch[bs] = rows / (time.perf_counter() - start)
    best = max(by_batch, key=by_batch.__getitem__)
    return {"torch_threads": threads, "backend": model.backend, "cpus": sorted(os.sched_getaffinity(0)),
            "rows_per_s_by_batch": {str(k): round(v, 1) for k, v in by_batch.items()},
            "best_batch": best, "best_rows_per_s": round(by_batch[best], 1)}  # fmt: skip


def _in_process_proc(package: str, threads: int, seconds: float, x_all: np.ndarray, queue: Any) -> None:
    os.sched_setaffinity(0, SERVER_CPUS)  # the server's core(s), where the served model runs
    queue.put(in_process(package, threads, seconds, x_all))


def in_process_isolated(package: str, threads: int, seconds: float, x_all: np.ndarray) -> dict[str, Any]:
    """``in_process`` in a fresh process on the server's cores (torch's thread count is set once per
    process)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_in_process_proc, args=(package, threads, seconds, x_all, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join(timeout=30)
    return result


# ---------------------------------------------------------------- load generator


def _client_proc(target: dict[str, Any], concurrency: int, seconds: float, queue: Any) -> None:
    """Closed-loop clients: HTTP POSTs of JSON bodies (aiohttp) or gRPC V2 calls (tritonclient.grpc.aio)."""
    os.sched_setaffinity(0, CLIENT_CPUS)

    async def run() -> tuple[list[float], list[str], float, float]:
        lat: list[float] = []
        err: list[str] = []
        if target["kind"] == "http":
            import aiohttp

            bodies = target["bodies"]
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

            async def call(i: int) -> str | None:
                async with session.post(target["url"], data=bodies[i % len(bodies)],
                                        headers={"content-type": "application/json"}) as resp:  # fmt: skip
                    await resp.read()
                    return None if resp.status == 200 else str(resp.status)

            async def close() -> None:
                await session.close()
        else:
            import tritonclient.grpc.aio as tgrpc

            client = tgrpc.InferenceServerClient(target["url"])
            requests = []
            for tensors in target["requests"]:
                inputs = []
                for name, datatype, arr in tensors:
                    t = tgrpc.InferInput(name, list(arr.shape), datatype)
                    t.set_data_from_numpy(arr)
                    inputs.append(t)
                requests.append(inputs)

            async def call(i: int) -> str | None:
                try:
                    await client.infer(target["model"], requests[i % len(requests)])
                    return None
                except tgrpc.InferenceServerException as e:
                    return str(e.status())

            async def close() -> None:
                await client.close()

        async def worker(k: int, stop: float, record: bool) -> None:
            i = k
            while time.perf_counter() < stop:
                i += concurrency
                t0 = time.perf_counter()
                problem = await call(i)
                if not record:
                    continue
                if problem:
                    err.append(problem)
                else:
                    lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(k, time.perf_counter() + 1.0, False) for k in range(concurrency)))
        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(k, start + seconds, True) for k in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
        await close()
        return lat, err, elapsed, cpu

    queue.put(asyncio.run(run()))


def load(target: dict[str, Any], concurrency: int, seconds: float, procs: int = 1) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` requests in flight, spread over ``procs`` client processes."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_client_proc, args=(target, c, seconds, queue)) for c in shares]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 180) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    latencies = [x for r in results for x in r[0]]
    errors = [x for r in results for x in r[1]]
    elapsed = max(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "client_cpu_cores": round(sum(r[3] for r in results) / elapsed, 2),
    }


def sweep(target: dict[str, Any], seconds: float, url: str | None = None) -> list[dict[str, Any]]:
    points = []
    for c in CONCURRENCY:
        before = batch_stats(url) if url else None
        point = load(target, c, seconds, procs=1 if c < 32 else 2)
        if before is not None:
            rows1, passes1 = batch_stats(url)
            point["mean_batch_rows"] = round((rows1 - before[0]) / max(passes1 - before[1], 1), 2)
        points.append(point)
    return points


def batch_stats(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, body, _ = http("GET", f"{url}/metrics")
    total = count = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == "conveyor_batch_size_sum":
                total += s.value
            elif s.name == "conveyor_batch_size_count":
                count += s.value
    return total, count


# ---------------------------------------------------------------- the servers


class PlainServer(ServerProcess):
    """The unbatched baseline, started and stopped like the conveyor server."""

    def __init__(self, model_dir: str, name: str, logdir: Path) -> None:
        super().__init__(model_dir, name, logdir, threads=1)
        self.args = pinned([sys.executable, str(HERE / "_plain_kserve_model.py"), "--model-dir", model_dir,
                            "--name", name, "--http-port", str(self.port), "--torch-threads", "1"])  # fmt: skip


class ConveyorServer(ServerProcess):
    """``python -m conveyor.runtime.serve`` on the server's cpus."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.args = pinned(self.args)


class RayServeServer:
    """Ray Serve with @serve.batch, one replica per core (each with 1 torch thread)."""

    def __init__(self, model_dir: str, logdir: Path, replicas: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"ray-serve-{self.port}.log"
        self.args = pinned([sys.executable, str(HERE / "_ray_serve_model.py"), "--model-dir", model_dir,
                            "--http-port", str(self.port), "--replicas", str(replicas)])  # fmt: skip

    def __enter__(self) -> RayServeServer:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        env = dict(os.environ, OMP_NUM_THREADS="1", RAY_SERVE_LOG_TO_STDERR="0")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while b"READY" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray Serve did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


# ---------------------------------------------------------------- the two models


def fraud_workload(package: str) -> dict[str, Any]:
    from conveyor.runtime.package.registry import open_package
    from conveyor.runtime.training.data import fraud_frame

    frame = fraud_frame(rows=256, seed=11, fraud_rate=0.1)
    rows = rows_of(frame)
    types = {"amount": ("FP32", np.float32), "merchant": ("BYTES", np.object_), "hour": ("INT64", np.int64),
             "foreign": ("BOOL", np.bool_), "card_age_days": ("INT64", np.int64),
             "distance_km": ("FP32", np.float32), "txn_last_hour": ("INT64", np.int64)}  # fmt: skip

    def tensors_of(chunk: list[dict[str, Any]]) -> list[tuple[str, str, np.ndarray]]:
        tensors = []
        for name in FRAUD_FEATURES:
            datatype, dtype = types[name]
            if datatype == "BYTES":
                arr = np.array([str(r[name]).encode() for r in chunk], dtype=object)
            else:
                arr = np.array([np.nan if r[name] is None else r[name] for r in chunk], dtype=dtype)
            tensors.append((name, datatype, arr))
        return tensors

    chunks = [rows[i : i + BATCH_ROWS] for i in range(0, len(rows), BATCH_ROWS)]
    return {
        "name": "fraud",
        "model": {"architecture": "mlp", "input": "7 features (a transaction)"},
        "request": 'V1 {"instances": [{feature: value}]} over HTTP; V2 one tensor per feature over gRPC; one row',
        "bodies": [json.dumps({"instances": [r]}).encode() for r in rows[:64]],
        "grpc": [tensors_of([r]) for r in rows[:64]],
        "x": open_package(package).transforms.apply(frame[FRAUD_FEATURES]),
        # A batching client: BATCH_ROWS rows per request (the same rows), HTTP and gRPC.
        "batched": {
            "rows_per_request": BATCH_ROWS,
            "bodies": [json.dumps({"instances": c}).encode() for c in chunks],
            "grpc": [tensors_of(c) for c in chunks],
        },
    }


def image_workload(package: str) -> dict[str, Any]:
    from conveyor.runtime.package.registry import open_package

    pngs, _ = digit_pngs(64, 64)
    t = open_package(package).transforms
    return {
        "name": "digits",
        "model": {"architecture": "resnet18", "input": [1, 64, 64]},
        "request": 'V1 {"instances": [{"image": {"b64": PNG}}]} over HTTP; V2 BYTES [1] (the PNG) over gRPC',
        "bodies": [
            json.dumps({"instances": [{"image": {"b64": base64.b64encode(p).decode()}}]}).encode()
            for p in pngs
        ],
        "grpc": [[("image", "BYTES", np.array([p], dtype=object))] for p in pngs],
        "x": t.apply(decoded(pngs) * np.float32(t.scale / 255.0)),
        "pngs": pngs,
    }


def loop_lag(package: str, workdir: Path, seconds: float) -> dict[str, Any]:
    """Health-probe latency while 4 clients send 1024x1024 PNGs, with decoding on and off the event loop."""
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (1024, 1024), dtype=np.uint8), mode="L").save(buf, format="PNG")
    body = json.dumps({"instances": [{"image": {"b64": base64.b64encode(buf.getvalue()).decode()}}]}).encode()
    out = {
        "large_image": "1024x1024 noise PNG, resized to 64x64 by the server",
        "probe": "GET /v2/health/live",
    }
    for mode, extra in (("decode_on_loop", ["--decode-on-loop"]), ("decode_off_loop", [])):
        with ConveyorServer(package, "digits", workdir, "--max-body-bytes", str(32 << 20), *extra) as server:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            target = {"kind": "http", "url": f"{server.url}/v1/models/digits:predict", "bodies": [body]}
            loader = ctx.Process(target=_client_proc, args=(target, 4, seconds, queue))
            loader.start()
            time.sleep(1.5)  # the loader's warm-up second
            probes = []
            stop = time.monotonic() + seconds - 1
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                http("GET", f"{server.url}/v2/health/live")
                probes.append(time.perf_counter() - t0)
                time.sleep(0.02)
            lat, _, elapsed, _ = queue.get(timeout=seconds + 120)
            loader.join(timeout=30)
            out[mode] = {"probe_p50_ms": round(percentile(probes, 0.5) * 1000, 2),
                         "probe_p99_ms": round(percentile(probes, 0.99) * 1000, 2),
                         "probe_max_ms": round(max(probes) * 1000, 2), "probes": len(probes),
                         "large_images_per_s": round(len(lat) / elapsed, 1)}  # fmt: skip
    return out


# ---------------------------------------------------------------- the run


def bench_model(
    workload: dict[str, Any], package: str, workdir: Path, seconds: float, cores: int
) -> dict[str, Any]:
    name = workload["name"]
    result: dict[str, Any] = {"package": package, **workload["model"], "request": workload["request"]}
    limits = [in_process_isolated(package, t, min(seconds, 3.0), workload["x"]) for t in sorted({1, cores})]
    result["in_process"] = limits
    result["backend"] = limits[0]["backend"]  # every system below runs the same (ScoringModel's choice)
    limit = max(p["best_rows_per_s"] for p in limits)
    http_target = {"kind": "http", "bodies": workload["bodies"]}
    systems: dict[str, list[dict[str, Any]]] = {}
    with PlainServer(package, name, workdir) as plain:
        systems["plain_kserve"] = sweep(
            {**http_target, "url": f"{plain.url}/v1/models/{name}:predict"}, seconds
        )
    with RayServeServer(package, workdir, cores) as ray_serve:
        systems["ray_serve_batch"] = sweep({**http_target, "url": f"{ray_serve.url}/predict"}, seconds)
    for procs in (1, max(2, cores)):
        grpc_port = free_port()
        args = [
            "--workers",
            str(procs),
            "--grpc-port",
            str(grpc_port),
            "--max-batch-size",
            "32",
            "--max-latency-ms",
            "2",
        ]
        with ConveyorServer(package, name, workdir, *args, threads=1) as server:
            deadline = time.monotonic() + 120
            while Metrics.scrape(server.url).value("conveyor_server_processes", model_name=name) != procs:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.5)
            url = f"{server.url}/v1/models/{name}:predict"
            systems[f"conveyor_http_{procs}proc"] = sweep({**http_target, "url": url}, seconds, server.url)
            grpc_target = {
                "kind": "grpc",
                "url": f"127.0.0.1:{grpc_port}",
                "model": name,
                "requests": workload["grpc"],
            }
            systems[f"conveyor_grpc_{procs}proc"] = sweep(grpc_target, seconds, server.url)
            if procs == 1 and "batched" in workload:
                result["batching_client"] = batching_client(
                    workload["batched"], server.url, url, {**grpc_target}, seconds, limit
                )
    result["systems"] = systems

    def at32(system: str) -> float:
        return next(p["throughput_rps"] for p in systems[system] if p["concurrency"] == 32)

    best = max((s for s in systems if s.startswith("conveyor")), key=at32)
    result["at_concurrency_32"] = {
        "in_process_limit_rows_per_s": limit,
        "best_conveyor": best,
        "conveyor_over_in_process": round(at32(best) / limit, 3),
        "conveyor_over_ray_serve": round(at32(best) / max(at32("ray_serve_batch"), 1e-9), 2),
        "conveyor_over_plain_kserve": round(at32(best) / max(at32("plain_kserve"), 1e-9), 2),
        "each_over_in_process": {s: round(at32(s) / limit, 3) for s in systems},
        "goal": "conveyor >= 0.8 x in-process limit and ahead of Ray Serve",
        "goal_met": at32(best) >= 0.8 * limit and at32(best) > at32("ray_serve_batch"),
    }
    return result


def batching_client(
    batched: dict[str, Any],
    server_url: str,
    url: str,
    grpc_target: dict[str, Any],
    seconds: float,
    limit: float,
) -> dict[str, Any]:
    """The 1-process conveyor server (same flags) sent ``rows_per_request`` rows per request: rows/s
    against the in-process limit, for the client that batches itself."""
    n = batched["rows_per_request"]
    out: dict[str, Any] = {"rows_per_request": n, "in_process_limit_rows_per_s": limit}
    for proto, target in (
        ("http", {"kind": "http", "bodies": batched["bodies"], "url": url}),
        ("grpc", {**grpc_target, "requests": batched["grpc"]}),
    ):
        points = []
        for c in (1, 8, 32):
            before = batch_stats(server_url)
            point = load(target, c, seconds, procs=1 if c < 32 else 2)
            rows1, passes1 = batch_stats(server_url)
            point["mean_batch_rows"] = round((rows1 - before[0]) / max(passes1 - before[1], 1), 2)
            point["rows_per_s"] = round(point["throughput_rps"] * n, 1)
            point["over_in_process"] = round(point["rows_per_s"] / limit, 4)
            points.append(point)
        out[f"conveyor_{proto}_1proc"] = points
    return out


def run_benchmark(
    *,
    fraud_package: str | None,
    image_package: str | None,
    seconds: float,
    workdir: Path,
    only: str | None = None,
) -> dict[str, Any]:
    if fraud_package is None and only != "image":
        fraud_package = train_package(fraud_config(str(workdir / "registry")), workdir / "train-fraud")
    if image_package is None and only != "tabular":
        images = write_image_folder(workdir / "digits64", 64)
        image_package = train_package(
            resnet_config(str(workdir / "registry"), images), workdir / "train-resnet"
        )
    os.sched_setaffinity(0, CLIENT_CPUS)  # this process drives the load; servers get SERVER_CPUS
    cores = len(SERVER_CPUS)
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "loadavg_at_start": os.getloadavg(),
        },  # fmt: skip
        "device": "cpu",
        "seconds_per_point": seconds,
        "pinning": {
            "server_cpus": sorted(SERVER_CPUS),
            "load_generator_cpus": sorted(CLIENT_CPUS),
            "how": "servers started under taskset (children, Ray's included, inherit it); the "
            "in-process limit measured in a process pinned to the server cpus",
        },  # fmt: skip
        "load_generator": "aiohttp / tritonclient.grpc.aio closed-loop clients in 1-2 processes on the "
        "load generator cpus; client_cpu_cores is the generator's own CPU use",
        "servers": "1 torch (and onnxruntime) thread per server process; batching max 32 rows / 2 ms "
        "(conveyor, Ray Serve); every system runs the model with the backend the predictor picks",
    }
    if only != "image":
        result["tabular"] = bench_model(fraud_workload(fraud_package), fraud_package, workdir, seconds, cores)
    if only != "tabular":
        result["image"] = bench_model(image_workload(image_package), image_package, workdir, seconds, cores)
        result["image"]["loop_lag"] = loop_lag(image_package, workdir, seconds)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    return result


def write(result: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


@pytest.mark.bench
@pytest.mark.slow
def test_bench_serving(tmp_path: Path) -> None:
    result = run_benchmark(fraud_package=None, image_package=None, seconds=5.0, workdir=tmp_path)
    write(result)
    print(json.dumps(result, indent=2))
    for model in ("tabular", "image"):  # every request answered
        for system, points in result[model]["systems"].items():
            assert all(p["errors"] == 0 for p in points), (model, system)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fraud-package", help="the tabular package to serve (default: train one)")
    p.add_argument("--image-package", help="the image package to serve (default: train ResNet-18 on 64x64)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load point")
    p.add_argument("--only", choices=["tabular", "image"], help="one model only")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_benchmark(fraud_package=args.fraud_package, image_package=args.image_package,
                               seconds=args.duration, workdir=Path(tmp), only=args.only)  # fmt: skip
    write(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
