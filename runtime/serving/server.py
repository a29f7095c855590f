"""``python -m conveyor.runtime.serve --model-dir URI --name NAME [--http-port P]``: the predictor process.

KServe's ``ModelServer`` hosts a ``PackagePredictor`` (V1 ``/v1/models/NAME:predict``, V2
``/v2/models/NAME/infer``, metadata ``/v2/models/NAME``, readiness, ``/metrics``). This module adds what
KServe lacks, on the same FastAPI app before the server starts:

- ``POST /v1/models/NAME/feedback`` and ``POST /v2/models/NAME/feedback``: ground truth by request id
  (``{"id": ..., "label": ...}``, or ``{"feedback": [...]}`` for several);
- an ASGI middleware that counts inference requests by outcome and status code (including those KServe
  rejects before they reach the model), times them, refuses bodies over ``--max-body-bytes`` with 413,
  and turns an exception raised while KServe decodes a malformed body into a 400 naming the problem, so
  nothing a client sends yields a 500.

A missing or corrupt package makes the process exit non-zero at start, with the path and the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from struct import error as struct_error
from typing import Any

# At module level: FastAPI resolves the handler's (string) annotations in this module's namespace.
from fastapi import Request

log = logging.getLogger("conveyor.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class _BodyTooLarge(Exception):
    pass


def _json_response(status: int, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(payload).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body}


class ServingMiddleware:
    """Request accounting, body size limit and malformed-input safety net for the inference routes."""

    def __init__(self, app: Any, *, predictor: Any, max_body_bytes: int, shadow: Any = None) -> None:
        self.app = app
        self.predictor = predictor
        self.shadow = shadow  # a conveyor.runtime.serving.shadow.ShadowMirror, or None
        self.max_body_bytes = max_body_bytes
        name = re.escape(predictor.name)
        self._routes = [
            (re.compile(rf"^/v1/models/{name}:predict$"), "v1"),
            (re.compile(rf"^/v2/models/{name}(/versions/[^/]+)?/infer$"), "v2"),
        ]

    def _protocol(self, path: str) -> str | None:
        for pattern, protocol in self._routes:
            if pattern.match(path):
                return protocol
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from conveyor.runtime.serving.predictor import REQUEST_STATE, request_arrived, request_submitted

        protocol = self._protocol(scope.get("path", ""))
        started = time.perf_counter()
        status: dict[str, Any] = {"code": None}
        limit = self.max_body_bytes

        # Shadow traffic: a sampled request's body and answer are copied, then queued once answered.
        mirror = self.shadow if protocol is not None and self.shadow is not None and self.shadow.sample() else None
        copied: tuple[list[bytes], list[bytes]] = ([], [])

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif mirror is not None and message["type"] == "http.response.body":
                copied[1].append(message.get("body", b""))
            await send(message)

        async def reply(code: int, error: str) -> None:
            start, body = _json_response(code, {"error": error})
            await send_wrapper(start)
            await send_wrapper(body)

        declared = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > limit:
            await reply(
                413,
                f"request body is {declared} bytes; this server accepts at most {limit} (--max-body-bytes)",
            )
            self._account(protocol, status["code"], started)
            return

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
                if mirror is not None:
                    copied[0].append(message.get("body", b""))
            return message

        state: dict[str, Any] = {"reached_model": False}
        token = REQUEST_STATE.set(state)
        if protocol is not None:
            request_arrived(self.predictor.batcher, state)
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            if status["code"] is None:
                await reply(
                    413,
                    f"request body exceeds {limit} bytes, the most this server accepts (--max-body-bytes)",
                )
        except Exception as e:
            # Raised before the model saw the request: KServe could not decode what the client sent.
            if status["code"] is None and protocol is not None and not state["reached_model"]:
                log.info("malformed %s request: %s: %s", protocol, type(e).__name__, e)
                await reply(400, f"malformed {protocol} request: {type(e).__name__}: {e}")
            else:
                raise
        finally:
            request_submitted(self.predictor.batcher, state)  # rejected before reaching the batcher
            REQUEST_STATE.reset(token)
            self._account(protocol, status["code"], started)
            if mirror is not None and status["code"] == 200:
                headers = dict(scope.get("headers", []))
                content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
                if b"inference-header-content-length" not in headers:  # JSON bodies only
                    mirror.offer(scope["path"], content_type, b"".join(copied[0]), b"".join(copied[1]))

    def _account(self, protocol: str | None, code: int | None, started: float) -> None:
        metrics = self.predictor.metrics
        if protocol is None or metrics is None:
            return
        metrics.observe_request(protocol, code or 500, time.perf_counter() - started)


def add_feedback_routes(app: Any, predictor: Any) -> None:
    from fastapi.responses import ORJSONResponse
    from kserve.errors import InvalidInput

    async def feedback(request: Request) -> ORJSONResponse:
        body = await request.body()
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"feedback body is not valid JSON ({e})") from e
        if isinstance(payload, dict) and "feedback" in payload:
            items = payload["feedback"]
            if not isinstance(items, list):
                raise InvalidInput('"feedback" must be a list of {"id", "label"} objects')
        elif isinstance(payload, dict):
            items = [payload]
        elif isinstance(payload, list):
            items = payload
        else:
            raise InvalidInput('feedback must be {"id": ..., "label": ...} or {"feedback": [...]}')
        if not predictor.ready:
            from kserve.errors import ModelNotReady

            raise ModelNotReady(predictor.name)
        # The feedback dataset is written to registry storage: blocking I/O, off the event loop.
        return ORJSONResponse(await asyncio.to_thread(predictor.record_feedback, items))

    for prefix in ("/v1", "/v2"):
        app.add_api_route(
            f"{prefix}/models/{predictor.name}/feedback", feedback, methods=["POST"], response_model=None
        )


def feedback_store(feedback_uri: str | None, model_dir: str) -> Any:
    """The Registry whose feedback dataset this predictor appends to (None: in memory only)."""
    from conveyor.runtime.package.registry import Registry

    if feedback_uri == "none":
        return None
    if not feedback_uri:
        m = re.match(r"^(?P<root>.+)/(?P<model>[^/]+)/v[1-9][0-9]*/?$", model_dir)
        if m is None:  # e.g. KServe's /mnt/models: the operator passes CONVEYOR_FEEDBACK_URI
            return None
        return Registry(m["root"], m["model"])
    root, _, model = feedback_uri.rstrip("/").rpartition("/")
    return Registry(root, model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conveyor.runtime.serve",
        description="Serve a conveyor model package with KServe's model server.",
    )
    p.add_argument("--model-dir", required=True, help="URI of the model version (<registry>/<model>/v<N>)")
    p.add_argument("--name", required=True, help="model name on the endpoints (/v1/models/NAME:predict)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (tests use 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=0, help="KServe's gRPC V2 server port; 0 = off")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per forward pass at most")
    p.add_argument(
        "--max-latency-ms", type=float, default=5.0, help="longest a row waits for its batch to fill"
    )
    p.add_argument("--no-batching", action="store_true", help="one forward pass per request")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--drift-method", choices=["psi", "ks"], default="psi")
    p.add_argument("--drift-window", type=int, default=1000, help="live rows kept for drift scores")
    p.add_argument("--drift-min-samples", type=int, default=200, help="rows needed before drift is reported")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--max-rows", type=int, default=4096, help="rows per request at most")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    p.add_argument(
        "--feedback-uri",
        default=os.environ.get("CONVEYOR_FEEDBACK_URI"),
        help="<registry>/<model> whose feedback dataset ground truth is appended to (default: "
        "$CONVEYOR_FEEDBACK_URI, else derived from --model-dir when it is <registry>/<model>/v<N>; "
        "'none' keeps feedback in memory)",
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.max_batch_size < 1:
        problems.append(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_latency_ms < 0:
        problems.append(f"--max-latency-ms must be >= 0, got {args.max_latency_ms}")
    if not 0 < args.http_port < 65536:
        problems.append(f"--http-port must be 1..65535, got {args.http_port}")
    if args.max_body_bytes < 1024:
        problems.append(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", args.name):
        problems.append(f"--name {args.name!r} must be letters, digits, '.', '_' or '-'")
    if problems:
        raise SystemExit("; ".join(problems))


def decode_binary_request(body: bytes, header: str | None, model_name: str) -> Any:
    """A V2 request in the binary tensor extension (JSON header, then raw tensor bytes) as an InferRequest.

    KServe's own decoder turns BYTES tensors into UTF-8 text, which fails (500) for raw image bytes, and
    it answers a header without ``inputs`` with a KeyError; this one keeps BYTES elements as bytes and
    names what is wrong with a malformed request (InvalidInput, 400).
    """
    import numpy as np
    import orjson
    from kserve import InferInput, InferRequest
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import RequestedOutput, deserialize_bytes_tensor
    from kserve.utils.numpy_codec import to_np_dtype

    hdr = "inference-header-content-length"
    if header is None:
        raise InvalidInput(f"a binary V2 request needs the {hdr!r} header (the length of its JSON part)")
    try:
        json_length = int(header)
    except ValueError as e:
        raise InvalidInput(f"{hdr} must be a whole number of bytes, got {header!r}") from e
    if not 0 < json_length <= len(body):
        raise InvalidInput(f"{hdr} is {json_length}, the body is {len(body)} bytes")
    try:
        request = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"the JSON part of the binary V2 request is not valid JSON ({e})") from e
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidInput('the JSON part of a V2 request must be an object with an "inputs" list')
    offset = json_length
    inputs = []
    for i, spec in enumerate(request["inputs"]):
        if not isinstance(spec, dict):
            raise InvalidInput(f"inputs[{i}] must be an object with name, shape and datatype")
        missing = [k for k in ("name", "shape", "datatype") if k not in spec]
        if missing:
            raise InvalidInput(f"inputs[{i}] lacks {missing}")
        name, shape, datatype = spec["name"], spec["shape"], spec["datatype"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInput(f"input {name!r}: shape must be a list of sizes, got {shape!r}")
        dtype = to_np_dtype(datatype)
        if dtype is None:
            raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size")
        if "data" in spec:
            inputs.append(InferInput(name, shape, datatype, data=spec["data"], parameters=params))
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidInput(f"input {name!r}: binary_data_size {size!r} does not fit the body")
        chunk = body[offset : offset + size]
        offset += size
        try:
            if datatype == "BYTES":
                data = deserialize_bytes_tensor(chunk).reshape(shape)
            else:
                data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        except (ValueError, struct_error) as e:
            raise InvalidInput(
                f"input {name!r}: {size} bytes of {datatype} do not make shape {shape} ({e})"
            ) from e
        params = {k: v for k, v in params.items() if k != "binary_data_size"}
        inputs.append(InferInput(name, shape, datatype, data=data, parameters=params))
    outputs = request.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
            raise InvalidInput('"outputs" must be a list of {"name": ...} objects')
        requested = [RequestedOutput(o["name"], o.get("parameters")) for o in outputs]
    parameters = request.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=request.get("id"),
        parameters=parameters,
        request_outputs=requested,
    )


def _conveyor_dataplane(models: Any) -> Any:
    from kserve.protocol.dataplane import DataPlane

    class ConveyorDataPlane(DataPlane):
        """KServe's data plane with the served package version in the V2 model metadata, and a binary
        V2 decoder that keeps raw BYTES (images) as bytes."""

        async def model_metadata(self, model_name: str) -> dict[str, Any]:
            metadata = await super().model_metadata(model_name)
            version = getattr(self.get_model_from_registry(model_name), "version", None)
            if version:
                metadata["versions"] = [version]
            return metadata

        def decode_inference_request(self, body: Any, headers: dict[str, str], model_name: str) -> Any:
            if isinstance(body, bytes):
                return decode_binary_request(body, headers.get("inference-header-content-length"), model_name)
            return super().decode_inference_request(body, headers, model_name)

    return ConveyorDataPlane(model_registry=models)


def model_server_class() -> type:
    import kserve

    class ConveyorModelServer(kserve.ModelServer):
        """KServe's ModelServer, listening on ``bind_host`` (KServe always binds 0.0.0.0)."""

        def __init__(self, *, bind_host: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.bind_host = bind_host
            self.dataplane = _conveyor_dataplane(self.registered_models)

        def setup_event_loop(self) -> None:
            # Called by start() after the REST server is built and before it serves: the one point
            # where its uvicorn config can still be changed.
            if self._rest_server is not None:
                self._rest_server.config.host = self.bind_host
            super().setup_event_loop()

    return ConveyorModelServer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    import prometheus_client

    prometheus_client.disable_created_metrics()  # *_created series only clutter dashboards
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    # KServe's module parses sys.argv on import (parse_known_args); our flags use dashes, theirs
    # underscores, so they do not collide.
    from kserve.model_server import app

    from conveyor.runtime.package.registry import PackageError
    from conveyor.runtime.serving.predictor import PackagePredictor

    predictor = PackagePredictor(
        args.name,
        args.model_dir,
        max_batch_size=args.max_batch_size,
        max_latency_ms=args.max_latency_ms,
        batching=not args.no_batching,
        device=args.device,
        drift_method=args.drift_method,
        drift_window=args.drift_window,
        drift_min_samples=args.drift_min_samples,
        max_rows_per_request=args.max_rows,
        feedback_store=feedback_store(args.feedback_uri, args.model_dir),
    )
    try:
        predictor.load()
    except PackageError as e:
        print(f"conveyor serve: cannot load model package: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. --device cuda without a GPU
        print(f"conveyor serve: {e}", file=sys.stderr)
        return 2

    server_cls = model_server_class()
    add_feedback_routes(app, predictor)
    from conveyor.runtime.serving.shadow import ShadowMirror

    app.add_middleware(ServingMiddleware, predictor=predictor, max_body_bytes=args.max_body_bytes,
                       shadow=ShadowMirror.from_env(predictor.name, predictor.version))
    server = server_cls(
        bind_host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port or 8081,
        enable_grpc=bool(args.grpc_port),
        workers=1,  # the batcher and the drift window live in this process
        enable_latency_logging=False,
    )
    if not args.access_log:
        # A log line per request (uvicorn's access log, KServe's timing trace) costs throughput.
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([predictor])
    return 0


if __name__ == "__main__":
    sys.exit(main())
