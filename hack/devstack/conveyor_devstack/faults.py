"""Planted faults for tests and the demo: a predictor that fails a share of requests, or answers slowly.

A development-only mechanism, never in ``conveyor.runtime``. The local executor starts every predictor
through this module when it is given a faults file (``--faults FILE``)::

    {"<namespace>/<inferenceservice>/<version>": {"errorRate": 0.3, "delayMs": 200}}

``python -m conveyor_devstack.faults SERVE-ARGS...`` runs the real predictor
(``conveyor.runtime.serving.server.main``, KServe's model server) with one extra ASGI middleware placed
INSIDE the serving middleware, so the predictor's own metrics (``conveyor_requests_total`` by code,
``conveyor_request_duration_seconds``), the ones Prometheus scrapes, count the planted 5xx and include the
planted delay, exactly as they would a real regression. gRPC ``ModelInfer`` calls (``--grpc-port``) get the
same fault: the lean servicer (``conveyor.runtime.serving.grpc_infer``) is handed the predictor behind
``FaultyPredictor``, which it calls inside its own accounting, so a planted failure is an UNAVAILABLE
status that ``conveyor_requests_total{protocol="grpc"}`` counts as code 503 (as the HTTP routes count
theirs) and the planted delay is in ``conveyor_request_duration_seconds``. The file is read again whenever
it changes, so a fault can be planted or lifted while the predictor runs; only inference is affected
(readiness, metadata, the other RPCs and /metrics stay healthy, as with a model that regressed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

ENV_FILE = "CONVEYOR_DEVSTACK_FAULTS"
ENV_KEY = "CONVEYOR_DEVSTACK_FAULT_KEY"
INFERENCE_PATH = re.compile(r"^/v1/models/[^/]+:predict$|^/v2/models/[^/]+(/versions/[^/]+)?/infer$")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def fault_key(namespace: str, inference_service: str, version: str) -> str:
    return f"{namespace}/{inference_service}/{version}"


def plant(path: Path, key: str, *, error_rate: float = 0.0, delay_ms: float = 0.0) -> None:
    """Plant (or, with both zero, lift) the fault of ``key`` in the faults file, atomically."""
    try:
        faults = json.loads(path.read_text())
    except (OSError, ValueError):
        faults = {}
    if error_rate or delay_ms:
        faults[key] = {"errorRate": error_rate, "delayMs": delay_ms}
    else:
        faults.pop(key, None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(faults, indent=1))
    os.replace(tmp, path)


class _FaultsFile:
    """The fault planted for one key, re-read when the file's mtime changes."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self._stamp: float | None = None
        self.fault: dict[str, float] = {}

    def current(self) -> dict[str, float]:
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            self._stamp, self.fault = None, {}
            return self.fault
        if stamp != self._stamp:
            try:
                self.fault = dict(json.loads(self.path.read_text()).get(self.key) or {})
            except (OSError, ValueError):
                return self.fault  # half-written by an editor: keep the last good one
            self._stamp = stamp
        return self.fault

    def draw(self) -> tuple[float, bool]:
        """For one request: the planted delay in seconds, and whether it fails."""
        fault = self.current()
        delay = float(fault.get("delayMs") or 0) / 1000
        return max(delay, 0.0), random.random() < float(fault.get("errorRate") or 0)

    def message(self) -> str:
        return f"planted fault ({self.key}): the predictor failed"


class FaultMiddleware:
    """Delays, then fails a share of, the inference requests of this predictor (see the module doc)."""

    def __init__(self, app: Any, *, faults_file: Path, key: str) -> None:
        self.app = app
        self.faults = _FaultsFile(faults_file, key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not INFERENCE_PATH.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        delay, fail = self.faults.draw()
        if delay:
            await asyncio.sleep(delay)
        if fail:
            # Drain the body, as a server that failed while handling it would have read it.
            while (await receive()).get("more_body"):
                pass
            body = json.dumps({"error": self.faults.message()}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class FaultyPredictor:
    """The predictor as the lean gRPC servicer sees it: each call (a ModelInfer of the served model, inside
    the servicer's accounting) waits the planted delay, then fails with UNAVAILABLE for the planted share;
    every attribute (name, ready, batcher, metrics) is the predictor's own."""

    def __init__(self, predictor: Any, faults: _FaultsFile) -> None:
        self._predictor = predictor
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # KServe's exception-to-status mapping aborts with a GrpcException's own status and details.
        from grpc_interceptor.exceptions import Unavailable

        delay, fail = self._faults.draw()
        if delay:
            await asyncio.sleep(delay)
        if fail:
            raise Unavailable(self._faults.message())
        return await self._predictor(*args, **kwargs)


def _plant_in_grpc(faults_file: Path, key: str) -> None:
    """Hand the lean gRPC servicer the predictor behind FaultyPredictor. The model server builds that
    servicer when its gRPC server starts (``ConveyorModelServer._serve_grpc`` imports ``inference_servicer``
    from ``grpc_infer`` then), in every worker this process forks."""
    from conveyor.runtime.serving import grpc_infer

    lean = grpc_infer.inference_servicer

    def servicer(data_plane: Any, repository: Any, predictor: Any) -> Any:
        return lean(data_plane, repository, FaultyPredictor(predictor, _FaultsFile(faults_file, key)))

    grpc_infer.inference_servicer = servicer


def main(argv: list[str] | None = None) -> int:
    # KServe's module parses sys.argv on import; the serve flags are passed through untouched.
    from kserve.model_server import app

    from conveyor.runtime.serving import server

    path, key = os.environ.get(ENV_FILE), os.environ.get(ENV_KEY)
    if path and key:
        # Added before server.main adds the ServingMiddleware: Starlette puts later middleware outside,
        # so the serving middleware sees (and counts) what this one answers.
        app.add_middleware(FaultMiddleware, faults_file=Path(path), key=key)
        # The V1 fast path answers in front of KServe's app, where this middleware would never see it.
        server.V1_FAST_PATH = False
        _plant_in_grpc(Path(path), key)
    return server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
