"""Benchmark: the training driver's peak memory and throughput as the number of rows grows, for the
streaming data path against the in-memory one (``runtime.training.prepare``'s two paths).

A generated tabular set (``make_classification``-style: 20 float features, 5% positives, seeded) is
written as Parquet in many files (``--files``), and the real run (``python -m conveyor.runtime.train``:
Ray Data ingest, validation, split, transforms, Ray Train with one worker, evaluation, registration)
trains on it for one epoch, in a fresh process per size and path (``CONVEYOR_DATA_PATH``) so each
driver's peak RSS (VmHWM of the driver process alone; Ray's workers are separate processes) is its own.
Reported per case: driver peak RSS, training samples/s (timed inside the worker), the run's wall time.

Baselines, in the same run: for memory, the streaming path at the smallest size (goal: driver RSS
within 20% at every larger size: it must not grow with the rows); for throughput, the in-memory path
(today's: the table collected into the driver) at the same size (goal: streaming samples/s >= 0.9 of
it). The in-memory path runs only up to ``--memory-max-rows`` (it needs GBs of driver memory past that).

Run: ``python tests/bench/bench_training_scale.py --rows 1000000,10000000``. Writes
tests/bench/results/training-scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def _loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def measure(
    rows: int, files: int, tmp: Path, path: str = "streaming", timeout: float = 3600
) -> dict[str, Any]:
    data = tmp / f"data-{rows}"
    if not data.exists():
        write_parquet(data, rows, files)
    run_json, result_json = tmp / f"run-{rows}-{path}.json", tmp / f"result-{rows}-{path}.json"
    run_json.write_text(json.dumps(_config(data, tmp / "registry", f"scale-{rows}-{path}")))
    # A local Ray of its own, whatever this shell points at.
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PYTHONUNBUFFERED": "1",
        "CONVEYOR_DATA_PATH": path,
    }
    load_start = _loadavg()
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, str(run_json), str(result_json)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            "rows": rows,
            "path": path,
            "error": f"did not finish within {timeout:.0f} s",
            "loadavgStart": load_start,
        }
    wall = time.perf_counter() - started
    load = {"loadavgStart": load_start, "loadavgEnd": _loadavg()}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DRIVER_PEAK_KB")), None)
    result = json.loads(result_json.read_text()) if result_json.exists() else {}
    if line is None or proc.returncode != 0 or line.split()[-1] != "0" or "packageUri" not in result:
        message = result.get("message") or (proc.stderr or proc.stdout)[-2000:]
        return {"rows": rows, "path": path, "error": message, **load}
    peak_kb = int(line.split()[1])
    from conveyor.runtime.package.registry import open_package

    metrics = open_package(result["packageUri"]).metrics
    history = metrics["history"]
    return {
        "rows": rows,
        "path": path,
        "files": files,
        "driverPeakRssMiB": round(peak_kb / 1024, 1),
        "samplesPerSecond": round(history[-1]["samplesPerSecond"], 1),
        "trainSamples": metrics["trainSamples"],
        "wallSeconds": round(wall, 1),
        "rocAuc": metrics.get("rocAuc"),
        **load,
    }


def run_benchmark(
    rows: list[int],
    files: int,
    out: Path = RESULTS,
    memory_max_rows: int = 1_000_000,
    note: str = "",
    paths: tuple[str, ...] = ("memory", "streaming"),
    append: bool = False,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Measure every size on each of ``paths`` (memory only up to ``memory_max_rows``); ``append`` adds the
    cases to those already in ``out`` (a case Ray could not start for, measured again)."""
    cases: list[dict[str, Any]] = []
    if append and out.exists():
        cases = [c for c in json.loads(out.read_text())["cases"] if "error" not in c]
    with tempfile.TemporaryDirectory() as d:
        for n in rows:
            for path in [p for p in paths if p == "streaming" or n <= memory_max_rows]:
                for _attempt in range(2):  # a loaded machine can fail Ray's own start-up: once more
                    case = measure(n, files, Path(d), path, timeout)
                    if "timed out during startup" not in case.get("error", ""):
                        break
                print(json.dumps(case), flush=True)
                cases.append(case)
                _write(cases, out, note)  # what was measured so far survives an interrupted run
            shutil.rmtree(Path(d) / f"data-{n}", ignore_errors=True)
    return _write(cases, out, note)


def _write(cases: list[dict[str, Any]], out: Path, note: str) -> dict[str, Any]:
    cases.sort(key=lambda c: (c["rows"], c["path"]))
    ok = [c for c in cases if "error" not in c]
    streamed = [c for c in ok if c["path"] == "streaming"]
    base = streamed[0] if streamed else None
    for c in streamed[1:]:
        c["driverRssVsSmallestStreamed"] = round(c["driverPeakRssMiB"] / base["driverPeakRssMiB"], 3)  # type: ignore[index]
    for c in streamed:
        mem = next((m for m in ok if m["path"] == "memory" and m["rows"] == c["rows"]), None)
        if mem is not None:
            c["samplesPerSecondVsInMemory"] = round(c["samplesPerSecond"] / mem["samplesPerSecond"], 3)
            c["driverRssVsInMemory"] = round(c["driverPeakRssMiB"] / mem["driverPeakRssMiB"], 3)
    doc = {
        "benchmark": "training-scale",
        "paths": {
            "memory": "in memory (the table collected into the driver: today's path, small sets)",
            "streaming": "streaming (hash split, streamed fit, workers read their shards)",
        },
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "baseline": "memory: the smallest streamed size; samples/s: the in-memory path at the same size; same run",
        "goals": "driverRssVsSmallestStreamed <= 1.2; samplesPerSecondVsInMemory >= 0.9",
        "note": note,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return doc


@pytest.mark.bench
def test_bench_training_scale() -> None:
    doc = run_benchmark([1_000_000, 10_000_000], files=64)
    # A benchmark records figures; it only checks that every size trained and was measured.
    assert all("error" not in c and c["driverPeakRssMiB"] > 0 for c in doc["cases"]), doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--memory-max-rows", type=int, default=1_000_000)
    parser.add_argument("--note", default="", help="e.g. the machine's load while it ran")
    parser.add_argument("--paths", default="memory,streaming")
    parser.add_argument("--append", action="store_true", help="add to the cases already in --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one case may take")
    args = parser.parse_args()
    run_benchmark(
        [int(r) for r in args.rows.split(",")],
        args.files,
        args.out,
        args.memory_max_rows,
        args.note,
        tuple(args.paths.split(",")),
        args.append,
        args.timeout,
    )
