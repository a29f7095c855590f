"""Benchmark: the training driver's peak memory and throughput as the number of rows grows.

A generated tabular set (``make_classification``-style: 20 float features, 5% positives, seeded) is
written as Parquet in many files (``--files``), and the real run (``python -m conveyor.runtime.train``:
Ray Data ingest, validation, split, transforms, Ray Train with one worker, evaluation, registration)
trains on it for one epoch, in a fresh process per size so each driver's peak RSS (VmHWM of the driver
process alone; Ray's workers are separate processes) is its own. Reported per size: driver peak RSS,
training samples/s (timed inside the worker), the run's wall time and its data-preparation share.

The baseline is the smallest size in the same run: the goal of a streaming data path is a driver RSS
within 20% between sizes (it must not grow with the rows) and samples/s at 1M at least 0.9 of today's.
Today's path collects the table into the driver (``prepare_data``), so its RSS grows with the rows.

Run: ``python tests/bench/bench_training_scale.py --rows 250000,1000000`` (10M rows needs several GB in
today's driver). Writes tests/bench/results/training-scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results" / "training-scale.json"
FEATURES = 20

# Runs the training entrypoint in this process, then reports this process's own peak RSS.
_DRIVER = """
import json, sys
from conveyor.runtime.training.run import main
rc = main(["--config", sys.argv[1], "--result", sys.argv[2]])
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("DRIVER_PEAK_KB", int(hwm.split()[1]), "RC", rc, flush=True)
"""


def write_parquet(folder: Path, rows: int, files: int, seed: int = 42) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=FEATURES)
    per_file = -(-rows // files)
    for i in range(files):
        n = min(per_file, rows - i * per_file)
        if n <= 0:
            break
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        logit = x @ weights - 4.0  # about 5% positives
        y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        table = pa.table({**{f"f{j}": x[:, j] for j in range(FEATURES)}, "label": y})
        pq.write_table(table, folder / f"part-{i:04d}.parquet")


def _config(data: Path, registry: Path, name: str) -> dict[str, Any]:
    return {
        "pipeline": name,
        "run": 1,
        "data": {"source": {"uri": str(data), "format": "parquet"}, "label": "label"},
        "training": {
            "model": {"architecture": "mlp", "hiddenLayers": [64, 32]},
            "hyperparameters": {"epochs": 1, "batchSize": 1024, "learningRate": 0.001},
        },
        "evaluation": {"metric": "rocAuc", "threshold": 0},
        "registry": {"uri": str(registry), "modelName": name},
    }


def measure(rows: int, files: int, tmp: Path) -> dict[str, Any]:
    data = tmp / f"data-{rows}"
    write_parquet(data, rows, files)
    run_json, result_json = tmp / f"run-{rows}.json", tmp / f"result-{rows}.json"
    run_json.write_text(json.dumps(_config(data, tmp / "registry", f"scale-{rows}")))
    # A local Ray of its own, whatever this shell points at.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(run_json), str(result_json)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - started
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DRIVER_PEAK_KB")), None)
    if line is None or proc.returncode != 0:
        return {"rows": rows, "error": (proc.stderr or proc.stdout)[-2000:]}
    peak_kb = int(line.split()[1])
    result = json.loads(result_json.read_text())
    from conveyor.runtime.package.registry import open_package

    metrics = open_package(result["packageUri"]).metrics
    history = metrics["history"]
    return {
        "rows": rows,
        "files": files,
        "driverPeakRssMiB": round(peak_kb / 1024, 1),
        "samplesPerSecond": round(history[-1]["samplesPerSecond"], 1),
        "trainSamples": metrics["trainSamples"],
        "wallSeconds": round(wall, 1),
        "rocAuc": metrics.get("rocAuc"),
    }


def run_benchmark(rows: list[int], files: int, out: Path = RESULTS) -> dict[str, Any]:
    cases = []
    with tempfile.TemporaryDirectory() as d:
        for n in rows:
            case = measure(n, files, Path(d))
            print(json.dumps(case), flush=True)
            cases.append(case)
    ok = [c for c in cases if "error" not in c]
    base = ok[0] if ok else None
    for c in ok[1:]:
        c["driverRssVsBaseline"] = round(c["driverPeakRssMiB"] / base["driverPeakRssMiB"], 3)  # type: ignore[index]
        c["samplesPerSecondVsBaseline"] = round(c["samplesPerSecond"] / base["samplesPerSecond"], 3)  # type: ignore[index]
    doc = {
        "benchmark": "training-scale",
        "path": "in-memory (prepare_data collects the table into the driver)",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "baseline": "the smallest size, same run",
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return doc


@pytest.mark.bench
def test_bench_training_scale() -> None:
    doc = run_benchmark([250_000, 1_000_000], files=16)
    # A benchmark records figures; it only checks that every size trained and was measured.
    assert all("error" not in c and c["driverPeakRssMiB"] > 0 for c in doc["cases"]), doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="250000,1000000")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run_benchmark([int(r) for r in args.rows.split(",")], args.files, args.out)
