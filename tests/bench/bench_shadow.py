"""Benchmark: what 100% shadow mirroring costs the stable predictor's callers (goal: p99 within 10%).

Measured in one run, on this machine: three real predictor processes (``python -m conveyor.runtime.serve``)
serve the same small fraud package, started together and loaded in alternating rounds so that they see
the same machine: the baseline (no mirror), one mirroring every request (``CONVEYOR_SHADOW_PERCENT=100``)
to a fourth, live predictor serving the same package as the shadow, and one mirroring every request to a
shadow that is down (a closed port). Each round sends an open-loop load (``RATE`` requests a second for
``ROUND_S`` seconds, each request in its own worker) and records what the callers saw: latency
percentiles and errors, and the predictor process's CPU time per request (load-independent: what a
mirrored copy costs the stable predictor). After the rounds the mirroring predictor's own counters say how many copies the
shadow got, agreed on, or dropped.

Run: ``make bench`` (pytest -m bench), or ``python tests/bench/bench_shadow.py``; writes
tests/bench/results/shadow.json.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from _serving_support import ServerProcess, fraud_config, train_package  # noqa: E402
from _traffic import Load  # noqa: E402

RESULTS = ROOT / "tests" / "bench" / "results" / "shadow.json"
NAME = "fraud"
ROW = {"amount": 24.5, "merchant": "grocery", "hour": 14, "foreign": False, "card_age_days": 900,
       "distance_km": 2.1, "txn_last_hour": 0}
RATE = 40
ROUND_S = 8.0
ROUNDS = 3


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))] if s else float("nan")


def process_cpu(server: ServerProcess) -> float:
    assert server.proc is not None
    t = psutil.Process(server.proc.pid).cpu_times()
    return t.user + t.system


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shadow_counts(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("conveyor_shadow_requests_total{"):
                result = line.split('result="', 1)[1].split('"', 1)[0]
                out[result] = out.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class MirroringServer(ServerProcess):
    """A predictor started with the shadow env (the operator sets the same on the stable container)."""

    def __init__(self, package: str, logdir: Path, shadow_url: str) -> None:
        super().__init__(package, NAME, logdir)
        self.shadow_env = {"CONVEYOR_SHADOW_URL": shadow_url, "CONVEYOR_SHADOW_MODEL": NAME,
                           "CONVEYOR_SHADOW_VERSION": "shadow", "CONVEYOR_SHADOW_PERCENT": "100",
                           "CONVEYOR_SHADOW_TIMEOUT_MS": "2000"}

    def start(self, timeout: float = 120) -> ServerProcess:
        saved = {k: os.environ.get(k) for k in self.shadow_env}
        os.environ.update(self.shadow_env)
        try:
            return super().start(timeout)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run_benchmark(workdir: Path, package: str | None = None) -> dict[str, Any]:
    if package is None:
        package = train_package(fraud_config(str(workdir / "registry"), rows=1000, epochs=1), workdir / "train")
    body = {"instances": [ROW]}
    shadow = ServerProcess(package, NAME, workdir).start()
    servers = {
        "baseline": ServerProcess(package, NAME, workdir),
        "mirror_100_live_shadow": MirroringServer(package, workdir, shadow.url),
        "mirror_100_shadow_down": MirroringServer(package, workdir, f"http://127.0.0.1:{closed_port()}"),
    }
    latencies: dict[str, list[float]] = {k: [] for k in servers}
    errors = dict.fromkeys(servers, 0)
    cpu = dict.fromkeys(servers, 0.0)  # the predictor process's CPU seconds during its rounds
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():  # warm-up: first requests load lazy paths
            Load(f"{s.url}/v1/models/{NAME}:predict", body, rate=RATE, duration=2).start().wait()
        for _ in range(ROUNDS):
            for name, s in servers.items():
                before = process_cpu(s)
                load = Load(f"{s.url}/v1/models/{NAME}:predict", body, rate=RATE, duration=ROUND_S).start().wait()
                cpu[name] += process_cpu(s) - before
                latencies[name] += [a.latency for a in load.answers if a.status == 200]
                errors[name] += sum(a.status != 200 for a in load.answers)
        counts = {name: shadow_counts(s.url) for name, s in servers.items() if name != "baseline"}
    finally:
        for s in [*servers.values(), shadow]:
            s.stop()
    points = {name: {"requests": len(v) + errors[name], "errors": errors[name],
                     "p50_ms": round(percentile(v, 50) * 1000, 2), "p99_ms": round(percentile(v, 99) * 1000, 2),
                     "cpu_ms_per_request": round(cpu[name] * 1000 / max(1, len(v) + errors[name]), 3)}
              for name, v in latencies.items()}
    base = points["baseline"]["p99_ms"]
    for name in counts:
        points[name]["shadow_results"] = counts[name]
        points[name]["p99_over_baseline"] = round(points[name]["p99_ms"] / base, 3)
    live = points["mirror_100_live_shadow"]
    return {
        "package": package, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load": f"open loop, {RATE} requests/s, {ROUNDS} alternating rounds of {ROUND_S}s per predictor",
        "request": 'V1 {"instances": [one fraud row]}',
        "points": points,
        "goal": "p99 with 100% mirroring within 10% of the baseline",
        "goal_met": live["p99_over_baseline"] <= 1.10,
    }


@pytest.mark.bench
@pytest.mark.slow
def test_bench_shadow(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert all(p["errors"] == 0 for p in result["points"].values())
    live = result["points"]["mirror_100_live_shadow"]["shadow_results"]
    assert live.get("agree", 0) > 0 and not live.get("disagree")


if __name__ == "__main__":
    import tempfile

    out = run_benchmark(Path(tempfile.mkdtemp(prefix="bench-shadow-")), sys.argv[1] if len(sys.argv) > 1 else None)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
