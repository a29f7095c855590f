"""Helpers for the serving tests and benchmark: real packages from the training runtime, a real server.

``train_package`` runs the training entrypoint (``python -m conveyor.runtime.train``, the command the
RayJob runs) on a built-in data set and returns the registered package's URI. ``ServerProcess`` starts
``python -m conveyor.runtime.serve`` on a free 127.0.0.1 port and waits until the model is ready.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

FRAUD_TRANSFORMS = [
    {"type": "impute", "columns": ["distance_km"], "strategy": "median"},
    {"type": "standardize", "columns": ["amount", "hour", "card_age_days", "distance_km", "txn_last_hour"]},
    {"type": "oneHot", "columns": ["merchant"]},
]
FRAUD_FEATURES = ["amount", "merchant", "hour", "foreign", "card_age_days", "distance_km", "txn_last_hour"]


def fraud_config(registry: str, *, rows: int = 3000, epochs: int = 3) -> dict[str, Any]:
    """A small tabular run: seeded synthetic card transactions (``builtin://fraud``), an MLP."""
    return {
        "pipeline": "fraud",
        "namespace": "test",
        "run": 1,
        "data": {
            "source": {"uri": f"builtin://fraud?rows={rows}&seed=7&fraudRate=0.1", "format": "builtin"},
            "label": "label",
        },
        "features": {"transforms": FRAUD_TRANSFORMS},
        "training": {
            "model": {"architecture": "mlp", "hiddenLayers": [32, 16]},
            "hyperparameters": {"epochs": epochs, "batchSize": 128, "learningRate": 0.01},
        },
        "registry": {"uri": registry, "modelName": "fraud"},
    }


def digits_config(registry: str, *, epochs: int = 3) -> dict[str, Any]:
    """A small image run: scikit-learn's 8x8 digits (``builtin://digits``), a small CNN."""
    return {
        "pipeline": "digits",
        "namespace": "test",
        "run": 1,
        "data": {
            "source": {"uri": "builtin://digits", "format": "builtin"},
            "label": "label",
            # Pixels run 0..16 (16 = full ink): declaring it makes 16 the scale, so an uploaded 0..255
            # PNG maps onto the same range the model was trained on.
            "contract": {"columns": [{"name": "image", "type": "image", "min": 0, "max": 16}]},
        },
        "training": {
            "model": {"architecture": "cnn"},
            "hyperparameters": {"epochs": epochs, "batchSize": 64, "learningRate": 0.005},
        },
        "registry": {"uri": registry, "modelName": "digits"},
    }


def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    # Two shared cores: keep torch/BLAS from oversubscribing them.
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def train_package(config: dict[str, Any], workdir: Path, *, timeout: float = 600) -> str:
    """Run the training entrypoint on ``config``; the registered package URI."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{config['pipeline']}-run.json"
    result = workdir / f"{config['pipeline']}-result.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.runtime.train", "--config", str(cfg), "--result", str(result)],
        cwd=ROOT,
        env=_env(threads=2),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())["packageUri"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes, dict[str, str]]:
    """One plain HTTP exchange; any status (4xx/5xx too) comes back as (status, body, headers)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def post_json(url: str, payload: Any, timeout: float = 30) -> tuple[int, Any]:
    status, body, _ = http(
        "POST", url, json.dumps(payload).encode(), {"content-type": "application/json"}, timeout
    )
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


class ServerProcess:
    """``python -m conveyor.runtime.serve`` as a child process on a free loopback port."""

    def __init__(self, model_dir: str, name: str, logdir: Path, *extra: str, threads: int = 1) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"serve-{name}-{self.port}.log"
        self.args = [
            sys.executable, "-m", "conveyor.runtime.serve",
            "--model-dir", model_dir, "--name", name,
            "--http-port", str(self.port), "--host", "127.0.0.1",
            "--torch-threads", str(threads), *extra,
        ]  # fmt: skip
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=_env(self.threads), stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _, _ = http("GET", f"{self.url}/v2/models/{self.name}/ready", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Metrics:
    """A parsed /metrics scrape (prometheus_client's text parser)."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]

    @classmethod
    def scrape(cls, url: str) -> Metrics:
        status, body, _ = http("GET", f"{url}/metrics")
        assert status == 200, body[:500]
        return cls(body.decode())

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (lab, v)
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == str(x) for k, x in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the matching samples; None when there is none."""
        found = self.find(name, **labels)
        return sum(v for _, v in found) if found else None


def rows_of(frame: Any, columns: Iterable[str] = FRAUD_FEATURES) -> list[dict[str, Any]]:
    """JSON-ready rows of a data frame (NaN -> null, numpy scalars -> Python)."""
    out = []
    for rec in frame[list(columns)].to_dict(orient="records"):
        row = {}
        for k, v in rec.items():
            v = v.item() if hasattr(v, "item") else v
            row[k] = None if isinstance(v, float) and v != v else v
        out.append(row)
    return out
