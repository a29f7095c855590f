"""A real, local Prometheus (Debian's ``prometheus`` binary) for the tests, the demo and the bench.

    python -m conveyor_devstack.prometheus up|down|status|env [--state-dir DIR]

(``hack/prometheus.sh`` calls this with ``~/.cache/conveyor/prometheus``.) In tests::

    prom = Prometheus.start(tmp_path / "prometheus")
    prom.add_target("predictor-v2", "127.0.0.1:8123", {"namespace": "ns"})
    prom.query('sum(conveyor_requests_total{namespace="ns"})')
    prom.stop()

It scrapes every target listed in ``<state>/targets/*.json`` (file-based service discovery, the
Prometheus format ``[{"targets": [...], "labels": {...}}]``), once a second: targets come and go by
writing and removing those files, atomically, so Prometheus never reads half a file. The local executor
writes one per predictor it runs. A development stand-in, never shipped in an image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Short intervals: a rollout test judges a step over a window of seconds, not minutes.
SCRAPE_INTERVAL = "1s"
JOB = "conveyor"


class PrometheusError(RuntimeError):
    """Prometheus could not be started, reached or queried."""


def binary() -> str:
    """The prometheus binary (``$CONVEYOR_PROMETHEUS_BIN`` or the one on PATH), or PrometheusError."""
    found = os.environ.get("CONVEYOR_PROMETHEUS_BIN") or shutil.which("prometheus")
    if not found:
        raise PrometheusError("no prometheus binary: run hack/install-deps.sh (Debian package 'prometheus')")
    return found


def config_text(targets_dir: Path, scrape_interval: str = SCRAPE_INTERVAL) -> str:
    """The pinned configuration: one job over the file_sd targets directory."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                   "scrape_timeout": scrape_interval},
        "scrape_configs": [{
            "job_name": JOB,
            # Keep the targets' own labels (model_name, model_version) as they are exported.
            "honor_labels": True,
            "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": scrape_interval}],
        }],
    }
    return json.dumps(config, indent=2)  # JSON is YAML


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_runs_prometheus(pid: int) -> bool:
    """A recorded pid only counts while it still runs prometheus (pids get reused)."""
    try:
        return b"prometheus" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def write_targets(targets_dir: Path, name: str, addresses: list[str], labels: dict[str, str]) -> Path:
    """Write (or replace) one file_sd target file atomically; returns its path."""
    targets_dir.mkdir(parents=True, exist_ok=True)
    path = targets_dir / f"{name}.json"
    tmp = targets_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps([{"targets": addresses, "labels": labels}]))
    os.replace(tmp, path)
    return path


def remove_targets(targets_dir: Path, name: str) -> None:
    (targets_dir / f"{name}.json").unlink(missing_ok=True)


@dataclass
class Prometheus:
    """One Prometheus process over ``state_dir`` (config, targets/, data/, prometheus.log, pid, port)."""

    state_dir: Path
    port: int
    pid: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets_dir(self) -> Path:
        return self.state_dir / "targets"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "prometheus.log"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, state_dir: Path, *, port: int | None = None, scrape_interval: str = SCRAPE_INTERVAL,
              timeout: float = 60) -> Prometheus:
        """Start Prometheus on ``port`` (default: a free loopback port) and wait until /-/ready."""
        exe = binary()
        state_dir = Path(state_dir)
        (state_dir / "targets").mkdir(parents=True, exist_ok=True)
        config = state_dir / "prometheus.yml"
        config.write_text(config_text(state_dir / "targets", scrape_interval))
        port = port or _free_port()
        log = (state_dir / "prometheus.log").open("ab")
        proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={state_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d",
             "--web.enable-lifecycle", "--log.level=warn"],
            cwd=state_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        (state_dir / "pid").write_text(str(proc.pid))
        (state_dir / "port").write_text(str(port))
        prom = cls(state_dir, port, proc.pid, proc)
        try:
            prom.wait_ready(timeout)
        except PrometheusError:
            prom.stop()
            raise
        return prom

    @classmethod
    def attach(cls, state_dir: Path) -> Prometheus | None:
        """The Prometheus a previous ``start`` left running over ``state_dir``, or None."""
        try:
            pid = int((Path(state_dir) / "pid").read_text())
            port = int((Path(state_dir) / "port").read_text())
        except (OSError, ValueError):
            return None
        return cls(Path(state_dir), port, pid) if _pid_runs_prometheus(pid) else None

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _pid_runs_prometheus(self.pid)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.running():
                raise PrometheusError(f"prometheus exited; log {self.log_path}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready after {timeout:.0f}s; log:\n{self._log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20) -> None:
        """Stop this Prometheus (only if the recorded pid still runs prometheus)."""
        if self.running():
            os.killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.1)  # running() reaps our own child
            if self.running():
                os.killpg(self.pid, signal.SIGKILL)
                if self.proc is not None:
                    self.proc.wait(timeout=5)
        (self.state_dir / "pid").unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ targets

    def add_target(self, name: str, address: str, labels: dict[str, str] | None = None) -> Path:
        return write_targets(self.targets_dir, name, [address], labels or {})

    def remove_target(self, name: str) -> None:
        remove_targets(self.targets_dir, name)

    def active_targets(self) -> list[dict[str, Any]]:
        return self._api("targets", {"state": "active"})["activeTargets"]

    def wait_for_target(self, address: str, *, timeout: float = 30) -> dict[str, Any]:
        """Wait until ``address`` has been scraped successfully (health "up"); returns the target."""
        deadline = time.monotonic() + timeout
        while True:
            for target in self.active_targets():
                if target["scrapeUrl"].split("/")[2] == address and target["health"] == "up":
                    return target
            if time.monotonic() > deadline:
                raise PrometheusError(f"target {address} not up after {timeout:.0f}s")
            time.sleep(0.25)

    # ------------------------------------------------------------------ queries

    def _api(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            payload = json.loads(e.read() or b"{}")
        except OSError as e:
            raise PrometheusError(f"{url}: {e}") from e
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (each item: ``metric`` labels and ``value`` [t, "v"])."""
        data = self._api("query", {"query": promql})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, or None when it has no result (or NaN)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series; expected one")
        number = float(result[0]["value"][1])
        return None if math.isnan(number) else number


# ---------------------------------------------------------------------- command line


def _default_state() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conveyor" / "prometheus"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor_devstack.prometheus",
                                     description="A local Prometheus scraping file_sd targets.")
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=_default_state())
    args = parser.parse_args(argv)
    state: Path = args.state_dir
    running = Prometheus.attach(state)
    if args.command == "up":
        if running is None:
            try:
                running = Prometheus.start(state)
            except PrometheusError as e:
                print(f"prometheus: {e}", file=sys.stderr)
                return 1
            running.proc = None  # detached: it outlives this command (its own session)
        print(running.url)
        return 0
    if args.command == "down":
        if running is not None:
            running.stop()
            print(f"prometheus: stopped pid {running.pid}", file=sys.stderr)
        return 0
    if args.command == "env":
        if running is None:
            print("prometheus: not running (hack/prometheus.sh up)", file=sys.stderr)
            return 1
        print(f"export CONVEYOR_PROMETHEUS_URL={running.url}")
        print(f"export CONVEYOR_PROMETHEUS_TARGETS={running.targets_dir}")
        return 0
    # status
    if running is None or not running.ready():
        print(f"prometheus: not running (state {state})")
        return 1
    targets = running.active_targets()
    print(f"prometheus: pid {running.pid}, {running.url}, ready; {len(targets)} target(s) in {running.targets_dir}")
    for t in targets:
        print(f"  {t['scrapeUrl']}  {t['health']}  {json.dumps(t['labels'], sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
