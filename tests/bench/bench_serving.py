"""Benchmark: the served model's throughput and latency against the limits it can approach, in one run.

1. in-process: the package's TorchScript forward pass (plus softmax, as served) called directly on
   transformed inputs, at batch sizes 1..256; the best is the limit serving can approach;
2. served: ``python -m conveyor.runtime.serve`` (KServe ModelServer + dynamic batching), closed-loop
   clients at concurrency 1, 8 and 32, each request one PNG image as KServe's image example sends it
   (V1 ``{"instances": [{"image": {"b64": ...}}]}``): decoded, transformed, batched, answered;
3. unbatched: a plain ``kserve.Model`` of the same package (``_plain_kserve_model.py``), one forward pass
   per request, same requests.

The model is a real package from the training runtime: ResNet-18 trained for one epoch on the built-in
digits rendered as ``--image-size`` pixel PNGs (an image folder), so the forward pass, not HTTP, is the
work being served (``--image-size 8`` serves the raw 8x8 digits, where per-request overhead dominates).
Both servers and the in-process pass use the same device and torch thread count; the load generator
runs in separate processes (aiohttp).

Run: ``make bench`` (pytest -m bench) or ``python tests/bench/bench_serving.py [--package URI]
[--image-size N] [--device cpu|cuda] [--threads N] [--duration S] [--client-procs N]``.
Writes tests/bench/results/serving.json. Target: served throughput at concurrency 32 >= 0.7 of the
in-process limit and well above the unbatched baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
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

from _serving_support import ServerProcess, http, train_package  # noqa: E402

RESULTS = HERE / "results" / "serving.json"
CONCURRENCY = (1, 8, 32)
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
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


def in_process(package: str, device: str, threads: int, seconds: float, pngs: list[bytes]) -> dict[str, Any]:
    import torch

    from conveyor.runtime.package.registry import open_package

    torch.set_num_threads(threads)
    pkg = open_package(package)
    module = pkg.load_model(device)
    raw = decoded(pngs)
    if pkg.transforms.scale != 255.0:  # the raw 8x8 digits package works in 0..16
        raw = raw * np.float32(pkg.transforms.scale / 255.0)
    x_all = pkg.transforms.apply(
        np.concatenate([raw] * (max(BATCH_SIZES) // len(raw) + 1))[: max(BATCH_SIZES)]
    )
    by_batch = {}
    for bs in BATCH_SIZES:
        x = torch.from_numpy(x_all[:bs])

        def step(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                torch.softmax(module(x.to(device)), dim=1).cpu()

        for _ in range(3):
            step()
        rows, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            rows += bs
        by_batch[bs] = rows / (time.perf_counter() - start)
    best = max(by_batch, key=by_batch.__getitem__)
    return {"rows_per_s_by_batch": {str(k): round(v, 1) for k, v in by_batch.items()},
            "best_batch": best, "best_rows_per_s": round(by_batch[best], 1)}  # fmt: skip


# ---------------------------------------------------------------- load generator


def _client_proc(url: str, concurrency: int, seconds: float, bodies: list[bytes], queue: Any) -> None:
    import aiohttp

    async def worker(
        session: aiohttp.ClientSession, k: int, stop: float, lat: list[float], err: list[int]
    ) -> None:
        i = k
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    err.append(resp.status)
                    continue
            lat.append(time.perf_counter() - t0)

    async def run() -> tuple[list[float], list[int], float]:
        lat: list[float] = []
        err: list[int] = []
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as session:
            # warm-up, not measured
            await asyncio.gather(
                *(worker(session, k, time.perf_counter() + 1.0, [], []) for k in range(concurrency))
            )
            start = time.perf_counter()
            await asyncio.gather(*(worker(session, k, start + seconds, lat, err) for k in range(concurrency)))
            return lat, err, time.perf_counter() - start

    queue.put(asyncio.run(run()))


def load(url: str, concurrency: int, seconds: float, bodies: list[bytes], procs: int) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` requests in flight, spread over ``procs`` client processes."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_client_proc, args=(url, c, seconds, bodies, queue)) for c in shares]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
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
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


def v1_bodies(pngs: list[bytes]) -> list[bytes]:
    return [
        json.dumps({"instances": [{"image": {"b64": base64.b64encode(p).decode()}}]}).encode() for p in pngs
    ]


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


class PlainServer(ServerProcess):
    """The unbatched baseline, started and stopped like the conveyor server."""

    def __init__(self, model_dir: str, logdir: Path, device: str, threads: int) -> None:
        super().__init__(model_dir, NAME, logdir, threads=threads)
        self.args = [sys.executable, str(HERE / "_plain_kserve_model.py"), "--model-dir", model_dir,
                     "--name", NAME, "--http-port", str(self.port), "--device", device,
                     "--torch-threads", str(threads)]  # fmt: skip


# ---------------------------------------------------------------- the run


def run_benchmark(
    *,
    package: str | None,
    image_size: int,
    device: str,
    threads: int,
    seconds: float,
    client_procs: int,
    workdir: Path,
) -> dict[str, Any]:
    if package is None:
        images = None if image_size == 8 else write_image_folder(workdir / f"digits{image_size}", image_size)
        package = train_package(resnet_config(str(workdir / "registry"), images), workdir / "train")
    pngs, _ = digit_pngs(image_size, 64)
    bodies = v1_bodies(pngs)
    result: dict[str, Any] = {
        "model": {"package": package, "architecture": "resnet18", "input": [1, image_size, image_size]},
        "device": device,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "seconds_per_point": seconds,
        "request": 'V1 {"instances": [{"image": {"b64": PNG}}]}, one image per request',
    }
    result["in_process"] = in_process(package, device, threads, min(seconds, 3.0), pngs)
    limit = result["in_process"]["best_rows_per_s"]

    served = []
    batching = ["--max-batch-size", "32", "--max-latency-ms", "2", "--device", device]
    with ServerProcess(package, NAME, workdir, *batching, threads=threads) as server:
        url = f"{server.url}/v1/models/{NAME}:predict"
        for c in CONCURRENCY:
            rows0, passes0 = batch_stats(server.url)
            point = load(url, c, seconds, bodies, client_procs)
            rows1, passes1 = batch_stats(server.url)
            point["mean_batch_rows"] = round((rows1 - rows0) / max(passes1 - passes0, 1), 2)
            served.append(point)
    result["served_batched"] = served

    with PlainServer(package, workdir, device, threads) as plain:
        url = f"{plain.url}/v1/models/{NAME}:predict"
        result["plain_kserve_unbatched"] = [load(url, c, seconds, bodies, client_procs) for c in CONCURRENCY]

    at32 = next(p for p in served if p["concurrency"] == 32)
    plain32 = next(p for p in result["plain_kserve_unbatched"] if p["concurrency"] == 32)
    result["at_concurrency_32"] = {
        "served_over_in_process": round(at32["throughput_rps"] / limit, 3),
        "served_over_unbatched": round(at32["throughput_rps"] / max(plain32["throughput_rps"], 1e-9), 2),
        "target": "served >= 0.7 x in-process and well above unbatched",
        "target_met": at32["throughput_rps"] >= 0.7 * limit and at32["throughput_rps"] > 1.5 * plain32["throughput_rps"],
    }  # fmt: skip
    return result


def write(result: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


@pytest.mark.bench
@pytest.mark.slow
def test_bench_serving(tmp_path: Path) -> None:
    result = run_benchmark(
        package=None, device="cpu", threads=1, seconds=8.0, client_procs=1, workdir=tmp_path
    )
    write(result)
    print(json.dumps(result, indent=2))
    assert all(p["errors"] == 0 for p in result["served_batched"] + result["plain_kserve_unbatched"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", help="a package URI to serve (default: train one with the training runtime)")
    p.add_argument("--image-size", type=int, default=64, help="digits rendered at this size (8: raw digits)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in each server")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per load point")
    p.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_benchmark(
            package=args.package, image_size=args.image_size, device=args.device, threads=args.threads, seconds=args.duration,
            client_procs=args.client_procs, workdir=Path(tmp),
        )  # fmt: skip
    write(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
