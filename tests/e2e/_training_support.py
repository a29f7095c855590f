"""Shared by the training tests and benchmark: a local Ray capped for this shared machine, waiting; and
stopping a Ray head (conveyor_devstack.rayhead) that the test process started."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One transaction in the fraud sample's schema (conveyor.runtime.training.data.fraud_frame), as a client sends it.
ROW = {
    "amount": 24.5,
    "merchant": "grocery",
    "hour": 14,
    "foreign": False,
    "card_age_days": 900,
    "distance_km": 2.1,
    "txn_last_hour": 0,
}


def start_local_ray(num_cpus: int = 2) -> str:
    """A local Ray capped at ``num_cpus`` (the machine is shared); returns its GCS address so that a
    subprocess run can join it through RAY_ADDRESS, as a RayJob entrypoint does."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    return ray.get_runtime_context().gcs_address


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_with_logs(what: str, timeout: float, probe: Callable[[], Any], logs: list[Path]) -> Any:
    """``wait_for`` polling every second, whose failure carries the tails of ``logs`` (the operator's and
    the executor's), so a timed-out end-to-end test says what its processes did."""
    try:
        return wait_for(probe, timeout=timeout, what=what, interval=1)
    except AssertionError as e:
        tails = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists()
        )
        raise AssertionError(f"{e}\n{tails}") from None


def get_object(kubectl: Callable[..., Any], namespace: str, resource: str) -> dict[str, Any]:
    """``kubectl get`` of one object as a dict; {} while it does not exist."""
    proc = kubectl("get", resource, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def wait_ready(
    kubectl: Callable[..., Any], namespace: str, resource: str, timeout: float, logs: list[Path]
) -> dict:
    """The object once its status has condition Ready=True."""

    def ready() -> dict[str, Any] | None:
        obj = get_object(kubectl, namespace, resource)
        conditions = obj.get("status", {}).get("conditions", [])
        return obj if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None

    return wait_with_logs(f"{resource} to be Ready", timeout, ready, logs)


def stop_ray_head(state: Path, timeout: float = 20) -> None:
    """``conveyor_devstack.rayhead.down`` for a head that this process started with ``rayhead.up``: its
    ``ray start`` process is this process's child, and a child that exited stays a zombie (still in its
    process group) until it is reaped, so ``down`` would wait out its whole SIGTERM grace (20 s) and
    then its SIGKILL one (5 s) for nothing. Reaping it first lets ``down`` find the group gone."""
    import os
    import signal

    from conveyor_devstack import rayhead

    pid_file = state / "rayhead.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.1)
        except (ProcessLookupError, ChildProcessError):
            pass  # gone already, or not this process's child: down() waits for it as before
    rayhead.down(state)


def operator_command(namespace: str) -> list[str]:
    """The operator watching `namespace`, its metrics and liveness on free ports."""
    return [sys.executable, "-m", "conveyor.operator", "--namespace", namespace,
            "--metrics-port", "0", "--liveness-port", "0"]  # fmt: skip


def executor_command(kubeconfig: str, namespace: str, state_dir: Path) -> list[str]:
    """The local executor (the stand-in for KubeRay's and KServe's controllers) watching `namespace`."""
    return [sys.executable, "-m", "conveyor_devstack.executor", "--kubeconfig", kubeconfig,
            "--namespace", namespace, "--state-dir", str(state_dir)]  # fmt: skip
