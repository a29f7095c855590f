"""Shared by the training tests and benchmark: a local Ray capped for this shared machine, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


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
