"""The V2 gRPC service of a predictor, with ``ModelInfer`` for the served model answered lean.

KServe's gRPC servicer turns each ``ModelInferRequest`` into an ``InferRequest`` (lists of contents,
parameter maps), looks the model up in the data plane, and turns the answer back (``InferOutput`` objects,
lists, then raw bytes again); two interceptors then wrap every call in new handlers (the request
accounting and KServe's exception-to-status mapping). Here ``ModelInfer`` for the served model reads
``raw_input_contents`` (or the typed ``contents``) straight into numpy, hands the request to the
predictor (``PackagePredictor.__call__``: the same decode, the same batcher, drift window, feedback
memory and metrics as the HTTP routes), and writes the answer's tensors as ``raw_output_contents``
(typed ``contents`` when the request sent typed contents, as KServe answers). It counts and times the
call itself (``requests_total{protocol="grpc"}``, the status as the HTTP code it stands for), and maps
exceptions to statuses with KServe's own ``ExceptionToStatusInterceptor`` (``InvalidInput`` ->
INVALID_ARGUMENT with its message, ``ModelNotReady`` -> UNAVAILABLE, ...). A request for another
model name and every other RPC (ServerLive, ModelMetadata, ...) take KServe's servicer unchanged, its
exceptions mapped by the same interceptor.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from kserve.constants.constants import GRPC_CONTENT_DATATYPE_MAPPINGS
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.utils.numpy_codec import to_np_dtype

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# gRPC status -> the HTTP code it stands for (as grpc-gateway maps them), so requests_total's code label
# (and the rollout analysis' success rate, code!~"5..") reads the same for both transports.
GRPC_AS_HTTP = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}  # fmt: skip


def bytes_elements(raw: bytes) -> np.ndarray:
    """A BYTES tensor's raw contents (each element: 4-byte little-endian length, then the bytes) as an
    object array of bytes; ValueError when the lengths do not fit."""
    items = []
    offset, end = 0, len(raw)
    view = memoryview(raw)
    while offset < end:
        if offset + 4 > end:
            raise ValueError(f"{end - offset} stray byte(s) after element {len(items)}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > end:
            raise ValueError(f"element {len(items)} claims {size} bytes, {end - offset} remain")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def bytes_contents(values: Sequence[Any]) -> bytes:
    """Elements (str or bytes) as a BYTES tensor's raw contents."""
    parts = []
    for v in values:
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


class GrpcTensor:
    """One input tensor of a ModelInferRequest, read into numpy when the predictor asks (``as_numpy``,
    as KServe's ``InferInput``): in the decode pool for requests the predictor decodes there."""

    __slots__ = ("_contents", "_raw", "datatype", "name", "shape")

    def __init__(self, tensor: Any, raw: bytes | None) -> None:
        self.name: str = tensor.name
        self.datatype: str = tensor.datatype
        self.shape = list(tensor.shape)
        self._raw = raw
        self._contents = tensor.contents if raw is None else None

    def as_numpy(self) -> np.ndarray:
        dtype = to_np_dtype(self.datatype)
        if dtype is None:
            raise InvalidInput(f"input {self.name!r}: unknown datatype {self.datatype!r}")
        if self._raw is not None:
            if self.datatype == "BYTES":
                arr = bytes_elements(self._raw)
            else:
                arr = np.frombuffer(self._raw, dtype=dtype)
        else:
            field = GRPC_CONTENT_DATATYPE_MAPPINGS.get(self.datatype)
            if field is None:  # FP16 has no typed contents
                raise InvalidInput(
                    f"input {self.name!r}: {self.datatype} data must come in raw_input_contents"
                )
            values = getattr(self._contents, field)
            if self.datatype == "BYTES":
                arr = np.empty(len(values), dtype=np.object_)
                arr[:] = list(values)
            else:
                arr = np.array(values, dtype=dtype)
        return arr.reshape(self.shape)


class GrpcCall:
    """A ModelInferRequest as the predictor decodes it: what it reads of KServe's ``InferRequest``
    (``id``, ``inputs``), and the answer written as the request asked (``response``)."""

    __slots__ = ("id", "inputs", "raw", "requested")

    def __init__(self, request: Any) -> None:
        raw = request.raw_input_contents
        self.raw = len(raw) > 0
        self.id: str | None = request.id or None
        self.inputs = [GrpcTensor(t, raw[i] if self.raw else None) for i, t in enumerate(request.inputs)]
        self.requested = [o.name for o in request.outputs]

    def response(
        self, model_name: str, model_version: str, request_id: str, outputs: list[tuple[str, str, np.ndarray]]
    ) -> Any:
        """The ModelInferResponse of ``outputs`` (name, V2 datatype, array); InvalidInput for a requested
        output the model does not have (the words of the HTTP route)."""
        known = {name for name, _, _ in outputs}
        for name in self.requested:
            if name not in known:
                raise InvalidInput(f"output {name!r} does not exist; this model has {sorted(known)}")
        if self.requested:
            outputs = [o for o in outputs if o[0] in self.requested]
        response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
        for name, datatype, arr in outputs:
            tensor = response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
            if self.raw:
                if datatype == "BYTES":
                    response.raw_output_contents.append(bytes_contents(arr.reshape(-1).tolist()))
                else:
                    response.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
            else:
                values = arr.reshape(-1).tolist()
                if datatype == "BYTES":
                    values = [v if isinstance(v, bytes) else str(v).encode() for v in values]
                getattr(tensor.contents, GRPC_CONTENT_DATATYPE_MAPPINGS[datatype]).extend(values)
        return response


def inference_servicer(data_plane: Any, repository: Any, predictor: Any) -> Any:
    """KServe's ``InferenceServicer`` with ``ModelInfer`` for ``predictor``'s model answered lean, and
    every ModelInfer call counted and timed (module doc)."""
    import grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.utils.utils import to_headers

    from conveyor.runtime.serving.predictor import REQUEST_STATE, request_arrived, request_submitted

    errors = ExceptionToStatusInterceptor()

    class LeanInferenceServicer(InferenceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
            started = time.perf_counter()
            state: dict[str, Any] = {"reached_model": False}
            token = REQUEST_STATE.set(state)
            # On its way to the batcher, as the HTTP routes count theirs: the batcher waits for it.
            request_arrived(predictor.batcher, state)
            status = "UNKNOWN"
            try:
                if request.model_name != predictor.name:
                    response = await super().ModelInfer(request, context)
                else:
                    self.validate_grpc_request(request)
                    if not predictor.ready:
                        raise ModelNotReady(predictor.name)
                    response, _ = await predictor(GrpcCall(request), to_headers(context))
                status = "OK"
                return response
            except asyncio.CancelledError:  # the client went away
                status = "CANCELLED"
                raise
            except Exception as e:
                try:  # KServe's mapping: aborts the call with the status and message it picks
                    await errors.handle_exception(e, request, context, MODEL_INFER)
                finally:
                    code = context.code()
                    status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            finally:
                request_submitted(predictor.batcher, state)
                REQUEST_STATE.reset(token)
                if predictor.metrics is not None:
                    predictor.metrics.observe_request(
                        "grpc", GRPC_AS_HTTP.get(status, 500), time.perf_counter() - started
                    )

    return LeanInferenceServicer(data_plane, repository)


def other_rpcs_interceptor() -> Any:
    """KServe's exception-to-status mapping for every RPC but ModelInfer (which maps its own): the
    interceptor wraps each call it sees in new handlers, a cost ModelInfer need not pay."""
    from grpc import aio
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor

    class OtherRpcs(aio.ServerInterceptor):
        def __init__(self) -> None:
            self.inner = ExceptionToStatusInterceptor()

        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method == MODEL_INFER:
                return await continuation(details)
            return await self.inner.intercept_service(continuation, details)

    return OtherRpcs()
