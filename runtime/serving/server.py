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

Several processes (``--workers N``, 0: one per CPU this process may use): a supervisor forks N workers
before anything heavy is imported; each loads the package and runs its own ModelServer (event loop,
batcher, drift window) on the same port, bound with SO_REUSEPORT so the kernel spreads connections over
them (KServe's own ``--workers`` spawns copies that re-import the app and lose these routes and the
middleware, and its metrics split per process: kserve/kserve#2979). Metrics stay whole through
prometheus_client's multiprocess mode (``metrics.exposition``). A worker that dies is restarted; one
that cannot load the package stops them all (exit 2). gRPC (``--grpc-port``) is KServe's V2 gRPC server
in every worker on the same port (gRPC binds with SO_REUSEPORT itself), with ``ModelInfer`` of the
served model answered without KServe's per-call conversions (``grpc_infer``).

A missing or corrupt package makes the process exit non-zero at start, with the path and the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
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
        mirror = (
            self.shadow if protocol is not None and self.shadow is not None and self.shadow.sample() else None
        )
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
            await reply(413, _declared_too_large(declared, limit))
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
                await reply(413, _read_too_large(limit))
        except Exception as e:
            # Raised before the model saw the request: KServe could not decode what the client sent.
            if status["code"] is None and protocol is not None and not state["reached_model"]:
                log.info("malformed %s request: %s: %s", protocol, type(e).__name__, e)
                await reply(400, _malformed(protocol, e))
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


_JSON_TYPES = (b"application/json", b"application/cloudevents+json", b"application/ld+json")


# The 4xx bodies both inference paths (ServingMiddleware, V1FastPath) answer with, word for word.
def _declared_too_large(declared: int, limit: int) -> str:
    return f"request body is {declared} bytes; this server accepts at most {limit} (--max-body-bytes)"


def _read_too_large(limit: int) -> str:
    return f"request body exceeds {limit} bytes, the most this server accepts (--max-body-bytes)"


def _malformed(protocol: str, e: Exception) -> str:
    return f"malformed {protocol} request: {type(e).__name__}: {e}"


# V1 predictions are answered in front of FastAPI (V1FastPath) unless this is False: development
# middleware that must see every inference request inside KServe's app turns it off
# (conveyor_devstack.faults plants 5xx answers there, where ServingMiddleware counts them).
V1_FAST_PATH = True


class V1FastPath:
    """The ASGI app uvicorn runs: ``POST /v1/models/NAME:predict`` with a JSON body is answered here,
    everything else goes to KServe's FastAPI app (with ``ServingMiddleware`` inside it).

    Profiled at concurrency 32 on one core (py-spy), FastAPI's and Starlette's layers in front of the model
    (routing, exception and telemetry middlewares, KServe's timing middleware, the Request object, the
    dataplane) took about half of the event loop's time per one-row request. This path does what they did
    for the V1 route and nothing else: read the body (413 over ``--max-body-bytes``), parse it with
    orjson (400 ``Unrecognized request format`` as KServe's decoder says), 503 while the model is not
    ready, run the model through KServe's ``Model.__call__`` (pre/predict/postprocess and KServe's
    latency histograms), answer with orjson and the ``x-request-id`` header; InvalidInput is a 400 and
    any other exception a 500 with KServe's bodies. Requests are counted, timed and mirrored (shadow)
    as ``ServingMiddleware`` does. A CloudEvent or a non-JSON content type takes KServe's route.
    """

    def __init__(self, app: Any, *, predictor: Any, max_body_bytes: int, shadow: Any = None) -> None:
        self.app = app
        self.predictor = predictor
        self.max_body_bytes = max_body_bytes
        self.shadow = shadow
        self.path = f"/v1/models/{predictor.name}:predict"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-type":
                if value.split(b";", 1)[0].strip().lower() not in _JSON_TYPES:
                    await self.app(scope, receive, send)
                    return
            elif key == b"content-length":
                with contextlib.suppress(ValueError):
                    declared = int(value)
            elif key.startswith(b"ce-"):  # a binary CloudEvent: KServe's decoder
                await self.app(scope, receive, send)
                return
        await self._predict(scope, receive, send, declared)

    async def _predict(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        import orjson
        from kserve.errors import InvalidInput, ModelNotReady

        from conveyor.runtime.serving.predictor import REQUEST_STATE, request_arrived, request_submitted

        predictor = self.predictor
        started = time.perf_counter()
        limit = self.max_body_bytes
        mirror = self.shadow if self.shadow is not None and self.shadow.sample() else None
        state: dict[str, Any] = {"reached_model": False}
        token = REQUEST_STATE.set(state)
        request_arrived(predictor.batcher, state)
        code, payload, extra, body = 500, None, None, b""
        try:
            if declared is not None and declared > limit:
                code, payload = 413, {"error": _declared_too_large(declared, limit)}
            else:
                body = await _read_body(receive, limit)
                if body is None:
                    code, payload = 413, {"error": _read_too_large(limit)}
            if payload is None:
                try:
                    request = orjson.loads(body)
                except orjson.JSONDecodeError as e:
                    raise InvalidInput(f"Unrecognized request format: {e}") from e
                if not predictor.ready:
                    raise ModelNotReady(predictor.name)
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                response, extra = await predictor(request, headers)
                code, payload = 200, response
        except InvalidInput as e:
            code, payload = 400, {"error": str(e)}
        except ModelNotReady as e:
            code, payload = 503, {"error": str(e)}
        except Exception as e:
            if not state["reached_model"]:
                code, payload = 400, {"error": _malformed("v1", e)}
            else:
                log.error("inference failed: %s: %s", type(e).__name__, e, exc_info=e)
                code, payload = 500, {"error": f"{type(e).__name__} : {e}"}
        finally:
            request_submitted(predictor.batcher, state)  # rejected before reaching the batcher
            REQUEST_STATE.reset(token)
        out = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        headers_out = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        for k, v in (extra or {}).items():
            if k.lower() not in ("content-length", "content-type"):
                headers_out.append((k.encode("latin-1"), str(v).encode("latin-1")))
        try:
            await send({"type": "http.response.start", "status": code, "headers": headers_out})
            await send({"type": "http.response.body", "body": out})
        finally:
            if predictor.metrics is not None:
                predictor.metrics.observe_request("v1", code, time.perf_counter() - started)
        if mirror is not None and code == 200:
            content_type = dict(scope["headers"]).get(b"content-type", b"application/json").decode("latin-1")
            mirror.offer(scope["path"], content_type, body, out)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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


def add_metrics_route(app: Any, predictor: Any) -> None:
    """``/metrics`` of a multi-process server: the sum over its processes (routes added before KServe's
    own ``/metrics``, which would show only this process, take precedence)."""
    from fastapi.responses import Response

    from conveyor.runtime.serving.metrics import exposition

    async def metrics(request: Request) -> Response:
        extra = predictor.metrics.drift_collector if predictor.metrics is not None else None
        body, content_type = await asyncio.to_thread(exposition, request.headers.get("accept"), extra)
        return Response(content=body, headers={"content-type": content_type})

    app.add_api_route("/metrics", metrics, methods=["GET"], response_model=None)


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
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the port (0: one per CPU available); metrics are summed over them",
    )
    p.add_argument(
        "--decode-on-loop",
        action="store_true",
        help="decode requests on the event loop (the old behaviour; for benchmarks only)",
    )
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
    p.add_argument("--explain", action="store_true", help="answer POST /v1/models/NAME:explain (off: 404)")
    p.add_argument(
        "--explain-max-instances", type=int, default=16, help="instances per :explain call at most"
    )
    p.add_argument("--explain-steps", type=int, default=32, help="integrated-gradients steps per explanation")
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
    if args.explain and not 1 <= args.explain_max_instances <= 1024:
        problems.append(f"--explain-max-instances must be 1..1024, got {args.explain_max_instances}")
    if args.explain and not 2 <= args.explain_steps <= 512:
        problems.append(f"--explain-steps must be 2..512, got {args.explain_steps}")
    if args.max_batch_size < 1:
        problems.append(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_latency_ms < 0:
        problems.append(f"--max-latency-ms must be >= 0, got {args.max_latency_ms}")
    if not 0 < args.http_port < 65536:
        problems.append(f"--http-port must be 1..65535, got {args.http_port}")
    if args.workers < 0 or args.workers > 256:
        problems.append(f"--workers must be 0 (one per CPU) to 256, got {args.workers}")
    if args.grpc_port and not 0 < args.grpc_port < 65536:
        problems.append(f"--grpc-port must be 1..65535 (or 0: off), got {args.grpc_port}")
    if args.grpc_port and args.grpc_port == args.http_port:
        problems.append(f"--grpc-port and --http-port must differ, both are {args.http_port}")
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
            model = self.get_model_from_registry(model_name)
            version = getattr(model, "version", None)
            if version:
                metadata["versions"] = [version]
            # The V2 metadata's platform: how the forward pass runs (onnxruntime, torch-export, ...).
            backend = getattr(getattr(model, "model", None), "backend", None)
            if backend:
                metadata["platform"] = backend
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

        def __init__(self, *, bind_host: str, reuse_port: bool = False, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.bind_host = bind_host
            self.reuse_port = reuse_port
            self.grpc_predictor: Any = None  # whose ModelInfer the lean servicer answers, set before start()
            self.front: Any = None  # an ASGI app in front of KServe's (V1FastPath), set before start()
            self.grpc_log_calls = False  # KServe's LoggingInterceptor: a log line per gRPC call
            self.dataplane = _conveyor_dataplane(self.registered_models)

        def setup_event_loop(self) -> None:
            # Called by start() after the REST server is built and before it serves: the one point
            # where its uvicorn config can still be changed.
            if self._rest_server is not None:
                self._rest_server.config.host = self.bind_host
                if self.front is not None:  # uvicorn loads config.app when it starts serving
                    self._rest_server.config.app = self.front
                if self.reuse_port:
                    # servers[0] is the REST server's start(), not yet awaited: it would bind without
                    # SO_REUSEPORT; serve the same app on a shared-port socket instead.
                    self.servers[0].close()
                    self.servers[0] = self._serve_on_shared_port()
            if self._grpc_server is not None and self.grpc_predictor is not None:
                self.servers[-1].close()  # KServe's gRPC start(), not yet awaited: ours is lean
                self.servers[-1] = self._serve_grpc()
            super().setup_event_loop()

        async def _serve_grpc(self) -> None:
            """KServe's GRPCServer.start with our servicer (runtime/serving/grpc_infer.py): ModelInfer of the
            served model answered lean, counted and timed; the other RPCs KServe's."""
            from concurrent import futures

            from grpc import aio
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
            from kserve.protocol.grpc.interceptors import LoggingInterceptor

            from conveyor.runtime.serving.grpc_infer import inference_servicer, other_rpcs_interceptor

            g = self._grpc_server
            server = aio.server(
                futures.ThreadPoolExecutor(max_workers=self.max_threads),
                interceptors=(
                    *([LoggingInterceptor()] if self.grpc_log_calls else []),
                    other_rpcs_interceptor(),
                ),
                options=[
                    ("grpc.max_send_message_length", g._kwargs.get("grpc_max_send_message_length")),
                    ("grpc.max_receive_message_length", g._kwargs.get("grpc_max_receive_message_length")),
                ],
            )
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                inference_servicer(g._data_plane, g._model_repository_extension, self.grpc_predictor), server
            )
            server.add_insecure_port(f"[::]:{g._port}")
            g._server = server  # KServe's stop() stops it
            await server.start()
            await server.wait_for_termination()

        async def _serve_on_shared_port(self) -> None:
            rest = self._rest_server
            sock = shared_port_socket(self.bind_host, rest.config.port)
            rest.create_application()
            await rest._server.serve(sockets=[sock])

    return ConveyorModelServer


def shared_port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket on (host, port) with SO_REUSEPORT: every worker binds its own and the kernel spreads
    connections over them. The supervisor's (not listening) one keeps other programs off the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without
    # it a response written in two parts (headers, body) waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def supervise(args: argparse.Namespace, workers: int) -> int:
    """Fork ``workers`` server processes on one port and keep them running; the exit code.

    Nothing here may import prometheus_client (or what imports it) before PROMETHEUS_MULTIPROC_DIR is set:
    it picks its value class on import."""
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="conveyor-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.makedirs(metrics_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(metrics_dir, "*.db")):  # a previous run's counts are not ours
        os.remove(stale)
    # Set before the first import of prometheus_client (here and in every worker): multiprocess values.
    from prometheus_client import multiprocess

    if not args.torch_threads:  # N processes x all cores each would oversubscribe the CPUs
        args.torch_threads = max(1, available_cpus() // workers)
    try:
        reserved = shared_port_socket(args.host, args.http_port, listen=False)
    except OSError as e:
        print(f"conveyor serve: cannot bind {args.host}:{args.http_port}: {e}", file=sys.stderr)
        return 2
    stopping = False
    children: dict[int, int] = {}  # pid -> slot
    started: list[float] = []

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            reserved.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = serve(args, reuse_port=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot
        started.append(time.monotonic())

    def stop(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("starting %d server processes on port %d (metrics in %s)", workers, args.http_port, metrics_dir)
    for slot in range(workers):
        spawn(slot)
    code = 0
    while children:
        pid, status = os.wait()
        slot = children.pop(pid, None)
        if slot is None:
            continue
        multiprocess.mark_process_dead(pid, metrics_dir)  # its live gauges go; its counts stay in the sum
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        recent = [t for t in started if time.monotonic() - t < 60]
        if exit_code == 2 or len(recent) > 2 * workers + 3:
            # The package cannot load (or workers crash as fast as they start): restarting will not help.
            print(f"conveyor serve: worker {pid} exited with {exit_code}; stopping", file=sys.stderr)
            code = exit_code or 1
            stop(signal.SIGTERM, None)
            continue
        log.warning("worker %d exited with %s; starting another", pid, exit_code)
        spawn(slot)
    reserved.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    workers = args.workers or available_cpus()
    if workers > 1:
        return supervise(args, workers)
    return serve(args)


def serve(args: argparse.Namespace, *, reuse_port: bool = False) -> int:
    """One server process (a worker of ``supervise`` when ``reuse_port``)."""
    import prometheus_client

    prometheus_client.disable_created_metrics()  # *_created series only clutter dashboards
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    # KServe's module parses sys.argv on import (parse_known_args); our flags use dashes, theirs
    # underscores, so they do not collide.
    from kserve.model_server import app

    from conveyor.runtime.package.registry import PackageError
    from conveyor.runtime.serving.explain import ExplainLimits
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
        decode_on_loop=args.decode_on_loop,
        feedback_store=feedback_store(args.feedback_uri, args.model_dir),
        explain=ExplainLimits(args.explain_max_instances, args.explain_steps) if args.explain else None,
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
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        add_metrics_route(app, predictor)
    from conveyor.runtime.serving.shadow import ShadowMirror

    shadow = ShadowMirror.from_env(predictor.name, predictor.version)
    app.add_middleware(
        ServingMiddleware, predictor=predictor, max_body_bytes=args.max_body_bytes, shadow=shadow
    )
    server = server_cls(
        bind_host=args.host,
        reuse_port=reuse_port,
        http_port=args.http_port,
        grpc_port=args.grpc_port or 8081,
        enable_grpc=bool(args.grpc_port),
        workers=1,  # the batcher and the drift window live in this process
        enable_latency_logging=False,
    )
    if V1_FAST_PATH:
        server.front = V1FastPath(app, predictor=predictor, max_body_bytes=args.max_body_bytes, shadow=shadow)
    if args.grpc_port:
        server.grpc_predictor = predictor
        server.grpc_log_calls = args.access_log
    if not args.access_log:
        # A log line per request (uvicorn's access log, KServe's timing trace) costs throughput.
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([predictor])
    return 0


if __name__ == "__main__":
    sys.exit(main())
