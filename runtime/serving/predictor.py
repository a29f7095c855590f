"""The KServe model that serves one registry version, in KServe's three steps: ``preprocess`` decodes a
V1 body or a V2 request and applies the fitted transforms (``DecodedRequest``); ``predict`` batches the
rows into a forward pass and observes the answers (drift window, feedback, metrics); ``postprocess``
writes the V1 or V2 response.

Both protocols are decoded:

- V1 ``{"instances": [...]}``: tabular rows as ``{feature: value}`` objects (or lists in schema order);
  images as ``{"image": {"b64": ...}}`` (KServe's image example), ``{"b64": ...}``, or raw pixels
  ``{"image": [[...]]}``. Answer: ``{"predictions": [{"label", "probabilities"} | {"value"}], "id",
  "model_name", "model_version"}``.
- V2 (Open Inference Protocol): one input tensor per feature (shape ``[B]``), named and typed as the model
  metadata says; images as a BYTES tensor ``[B]`` of encoded images (base64 text in JSON, raw bytes in
  the binary extension) or numeric raw pixels ``[B, C, H, W]``. Outputs ``label`` (BYTES) and
  ``probabilities`` (FP32 ``[B, K]``), or ``value`` (FP32) for regression; ``id`` and ``model_version``.

Every response carries a request id (the client's ``id`` / ``x-request-id`` if given, else a new one);
ground truth for it can be posted to the feedback endpoint. Anything wrong with the input raises
``InvalidInput`` (HTTP 400) with a message naming the field and the problem.

Decoding (base64, image decode and resize, V2 tensors to columns, the fitted transforms) runs in a small
thread pool, not on the event loop: the loop only moves bytes, so a large image being decoded does not
delay other requests' reads and answers (Pillow, numpy and torch release the GIL while they work). A
tabular request of a few rows (``SMALL_ROWS``) is the exception: decoding it on the loop takes tens of
microseconds, less than the hand-off to the pool and back, which profiling at concurrency 32 showed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextvars
import io
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput

from conveyor.runtime.package.drift import DriftMonitor
from conveyor.runtime.package.registry import ModelPackage
from conveyor.runtime.serving.batching import DynamicBatcher
from conveyor.runtime.serving.grpc_infer import GrpcCall
from conveyor.runtime.serving.metrics import FeedbackTracker, ServingMetrics
from conveyor.runtime.serving.model import ScoringModel
from conveyor.runtime.serving.served_log import ServedLog, flush_interval_from_env

# A tabular request of at most this many rows is decoded on the event loop (PackagePredictor._small).
SMALL_ROWS = 16

# How many other versions' served-request logs feedback for an id this version never served looks in.
OTHER_VERSIONS = 4

if TYPE_CHECKING:
    from conveyor.runtime.serving.explain import Explainer, ExplainLimits

log = logging.getLogger("conveyor.predictor")

# Set by the serving middleware for each request; the model marks it once a request reaches it, so an
# exception raised earlier (while KServe decodes the body) is known to be the client's malformed input.
REQUEST_STATE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "conveyor_request_state", default=None
)

_V2_NUMERIC = {
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
}
_V2_TYPE_OF = {"float": "FP32", "int": "INT64", "bool": "BOOL", "string": "BYTES"}


def _mark_reached() -> None:
    state = REQUEST_STATE.get()
    if state is not None:
        state["reached_model"] = True


def request_arrived(batcher: DynamicBatcher | None, state: dict[str, Any]) -> None:
    """Count an inference request the server started reading as on its way to the batcher."""
    if batcher is not None and batcher.arriving is not None:
        batcher.arriving += 1
        state["arriving"] = True


def request_submitted(batcher: DynamicBatcher | None, state: dict[str, Any] | None) -> None:
    """The request reached the batcher (or failed on the way): no longer on its way."""
    if batcher is not None and state is not None and state.pop("arriving", False):
        batcher.arriving = max(0, (batcher.arriving or 0) - 1)


@dataclass(frozen=True)
class TabularInput:
    """A tabular request's rows before the fitted transforms, which run once per batch in the forward
    pass (``PackagePredictor.model_input``): per request they cost more than the rest of its decoding."""

    data: Any  # rows ([{feature: value}], V1) or columns ({feature: array or list}, V2)
    rows: int

    def __len__(self) -> int:
        return self.rows


@dataclass(frozen=True)
class DecodedRequest:
    """A request as ``preprocess`` leaves it for ``predict``."""

    x: np.ndarray | TabularInput  # the model's input (images: transformed), or tabular rows to transform
    columns: dict[str, Any]  # the raw feature values (or image statistics) the drift window observes
    rows: int
    request_id: str
    # The V2 request (its requested outputs, binary flag): KServe's InferRequest (HTTP) or a GrpcCall
    # (gRPC ModelInfer, runtime/serving/grpc_infer.py); None for V1.
    v2: InferRequest | GrpcCall | None


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` hands ``postprocess``: probabilities [B, K] or values [B], and each row's answer."""

    request: DecodedRequest
    out: np.ndarray
    answers: list[Any]


class PackagePredictor(Model):
    """Serves the model package at ``model_dir`` under ``name``."""

    def __init__(
        self,
        name: str,
        model_dir: str,
        *,
        max_batch_size: int = 32,
        max_latency_ms: float = 5.0,
        batching: bool = True,
        device: str | None = None,
        drift_method: str = "psi",
        drift_window: int = 1000,
        drift_min_samples: int = 200,
        max_rows_per_request: int = 4096,
        with_metrics: bool = True,
        feedback_store: Any = None,
        explain: ExplainLimits | None = None,
        decode_on_loop: bool = False,
        decode_threads: int = 2,
    ) -> None:
        """``feedback_store``: the registry (``Registry`` of this model) whose feedback dataset ground
        truth is appended to; None keeps feedback in memory only (counters and the online gauge)."""
        super().__init__(name, return_response_headers=True)
        self.model_dir = model_dir
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.batching = batching
        self.requested_device = device
        self.drift_method = drift_method
        self.drift_window = drift_window
        self.drift_min_samples = drift_min_samples
        self.max_rows_per_request = max_rows_per_request
        self.decode_on_loop = decode_on_loop
        self.decode_threads = decode_threads
        self._decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.with_metrics = with_metrics
        self.package: ModelPackage | None = None
        self.metrics: ServingMetrics | None = None
        self.drift: DriftMonitor | None = None
        self.feedback: FeedbackTracker | None = None
        self.feedback_store = feedback_store
        # What this process served, in registry storage: feedback to any replica or process finds it.
        self.served_log: ServedLog | None = None
        self._other_logs: dict[str, ServedLog] = {}  # readers of other versions' logs (a canary's split)
        # :explain is on when limits are given (serve --explain); one thread computes explanations.
        self.explain_limits = explain
        self.explainer: Explainer | None = None
        self.batcher: DynamicBatcher | None = None
        self._kserve_timers: tuple[Any, Any, Any] | None = None
        self.version = ""
        self.device = "cpu"
        # A binary package's decision threshold for its positive class (schema.json), else argmax.
        self.threshold: float | None = None

    # ------------------------------------------------------------ loading

    def load(self) -> bool:
        """Open and verify the package, load the weights, run one warm-up pass. Raises PackageError
        (naming the path and the reason) for a missing or corrupt package; ready only after this."""
        # Decode, transform, forward and decide are ScoringModel's, shared with the batch job.
        self.model = ScoringModel.open(self.model_dir, self.requested_device)
        pkg = self.package = self.model.package
        self.version = self.model.version
        self.kind = self.model.kind
        self.task = self.model.task
        self.classes = self.model.classes
        self.threshold = self.model.threshold
        self.device = self.model.device
        if self.kind == "image":
            # Built once: per-request construction of torchvision transforms costs more than the decode.
            from torchvision.transforms import v2 as T

            self._resize = T.Resize((pkg.transforms.height, pkg.transforms.width), antialias=True)
        self.drift = DriftMonitor(
            pkg.profile,
            classes=self.classes,
            window=self.drift_window,
            min_samples=self.drift_min_samples,
            method=self.drift_method,
        )
        self.feedback = FeedbackTracker(task=self.task)
        if self.feedback_store is not None and self.served_log is None:
            self.served_log = ServedLog(
                self.feedback_store, self.version, flush_interval=flush_interval_from_env()
            )
        if self.with_metrics:
            self.metrics = ServingMetrics(
                self.name,
                self.version,
                task=self.task,
                architecture=str(pkg.manifest.get("architecture", "unknown")),
                backend=self.model.backend,
                drift=self.drift,
                profile=pkg.profile,
            )
        if not self.decode_on_loop:
            self._decode_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.decode_threads, thread_name_prefix="conveyor-decode"
            )
        if self.batching:
            self.batcher = DynamicBatcher(
                self._forward,
                combine=self.model_input,
                max_batch_size=self.max_batch_size,
                max_latency_ms=self.max_latency_ms,
                on_batch=self.metrics.observe_batch if self.metrics else None,
            )
            self.batcher.arriving = 0  # the serving middleware counts requests on their way
        if self.explain_limits is not None:
            from conveyor.runtime.serving.explain import Explainer

            self.explainer = Explainer(self.model, self.explain_limits)
        self.ready = True
        log.info(
            "loaded model %s version %s from %s on %s, backend %s (batching %s)",
            self.name,
            self.version,
            self.model_dir,
            self.device,
            self.model.backend,
            f"max {self.max_batch_size} rows / {self.max_latency_ms} ms" if self.batching else "off",
        )
        return self.ready

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """One forward pass: probabilities [B, K] (classification) or values [B] (regression)."""
        return self.model.forward(x)

    def model_input(self, parts: list[np.ndarray | TabularInput]) -> np.ndarray:
        """Requests' inputs as one model input [B, ...]: tabular rows joined and transformed at once
        (InvalidInput names what the transforms reject), image tensors concatenated."""
        if not isinstance(parts[0], TabularInput):
            return parts[0] if len(parts) == 1 else np.concatenate(parts)  # type: ignore[arg-type]
        datas = [p.data for p in parts]  # type: ignore[union-attr]
        if len(datas) == 1:
            return self._transform(datas[0])
        if all(isinstance(d, list) for d in datas):
            return self._transform([row for d in datas for row in d])
        if all(isinstance(d, dict) for d in datas) and all(d.keys() == datas[0].keys() for d in datas):
            merged: dict[str, Any] = {}
            for name in datas[0]:
                cols = [d[name] for d in datas]
                if all(isinstance(c, np.ndarray) for c in cols):
                    merged[name] = np.concatenate(cols)
                else:
                    merged[name] = [v for c in cols for v in (c.tolist() if isinstance(c, np.ndarray) else c)]
            return self._transform(merged)
        return np.concatenate([self._transform(d) for d in datas])  # V1 and V2 requests in one batch

    # ------------------------------------------------------------ metadata

    def get_input_types(self) -> list[dict[str, Any]]:
        t = self.package.transforms if self.package else None
        if t is None:
            return []
        if t.kind == "image":
            return [{"name": t.image_field, "datatype": "BYTES", "shape": [-1]}]
        return [{"name": f.name, "datatype": _V2_TYPE_OF[f.type], "shape": [-1]} for f in t.features]

    def get_output_types(self) -> list[dict[str, Any]]:
        if self.task == "regression":
            return [{"name": "value", "datatype": "FP32", "shape": [-1]}]
        return [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes or [])]},
        ]

    # ------------------------------------------------------------ inference

    def validate(self, payload: Any) -> Any:
        # KServe validates what preprocess returns, here the decoded request: its checks of the raw body
        # run at the start of preprocess instead.
        return payload

    async def preprocess(
        self, payload: dict[str, Any] | InferRequest | GrpcCall, headers: dict[str, str] | None = None
    ) -> DecodedRequest:
        """Decode the V1 body or V2 request into model input; InvalidInput (400) names what is wrong."""
        if not isinstance(payload, GrpcCall):
            payload = super().validate(payload)
        _mark_reached()
        headers = headers or {}
        if self._decode_pool is None or self._small(payload):
            return self._decode(payload, headers)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decode_pool, self._decode, payload, headers)

    async def __call__(
        self, body: Any, headers: dict[str, str] | None = None, verb: Any = None
    ) -> tuple[Any, dict[str, str]]:
        """KServe's ``Model.__call__`` for predictions (preprocess, predict, postprocess, each timed in
        KServe's ``request_*_seconds`` histograms) with the histogram children looked up once, not per
        request; explanations take KServe's own."""
        from kserve.model import InferenceVerb

        if verb not in (None, InferenceVerb.PREDICT):
            return await super().__call__(body, headers, verb)
        if self._kserve_timers is None:
            from kserve.metrics import POST_HIST_TIME, PRE_HIST_TIME, PREDICT_HIST_TIME, get_labels

            labels = get_labels(self.name)
            self._kserve_timers = tuple(
                h.labels(**labels) for h in (PRE_HIST_TIME, PREDICT_HIST_TIME, POST_HIST_TIME)
            )
        pre, pred, post = self._kserve_timers
        response_headers: dict[str, str] = {}
        t0 = time.perf_counter()
        payload = await self.preprocess(body, headers)
        t1 = time.perf_counter()
        pre.observe(t1 - t0)
        prediction = await self.predict(payload, headers, response_headers)
        t2 = time.perf_counter()
        pred.observe(t2 - t1)
        response = await self.postprocess(prediction, headers, response_headers)
        post.observe(time.perf_counter() - t2)
        return response, response_headers

    def _small(self, payload: dict[str, Any] | InferRequest | GrpcCall) -> bool:
        """A tabular request of at most SMALL_ROWS rows: decoded on the event loop, where it costs tens of
        microseconds, less than handing it to the decode pool and back (profiled at concurrency 32)."""
        if self.kind == "image":
            return False
        if isinstance(payload, InferRequest | GrpcCall):
            return all(math.prod(inp.shape) <= SMALL_ROWS for inp in payload.inputs)
        instances = payload.get("instances") if isinstance(payload, Mapping) else None
        return isinstance(instances, list) and len(instances) <= SMALL_ROWS

    def _decode(
        self, payload: dict[str, Any] | InferRequest | GrpcCall, headers: dict[str, str]
    ) -> DecodedRequest:
        if isinstance(payload, InferRequest | GrpcCall):
            request_id = payload.id or headers.get("x-request-id") or uuid.uuid4().hex
            x, columns, n = self._parse_v2(payload)
            return DecodedRequest(x, columns, n, request_id, payload)
        body_id = payload.get("id") if isinstance(payload, Mapping) else None
        request_id = str(body_id or headers.get("x-request-id") or uuid.uuid4().hex)
        x, columns, n = self._parse_v1(payload)
        return DecodedRequest(x, columns, n, request_id, None)

    async def predict(
        self,
        payload: DecodedRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Prediction:
        if self.batcher is not None:
            request_submitted(self.batcher, REQUEST_STATE.get())
            out = await self.batcher.submit(payload.x)
        else:
            out = self._forward(self.model_input([payload.x]))
            if self.metrics:
                self.metrics.observe_batch(payload.rows, 1)

        answers = self.model.answers(out)
        self._observe(payload.columns, answers, payload.request_id)
        if response_headers is not None:
            response_headers["x-request-id"] = payload.request_id
        return Prediction(payload, out, answers)

    async def explain(self, payload: DecodedRequest, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """``POST /v1/models/NAME:explain``: each instance's answer with its per-feature attributions
        (tabular) or saliency map (image), runtime/serving/explain.py; computed off the event loop."""
        if self.explainer is None:
            from fastapi import HTTPException

            raise HTTPException(
                404,
                f"explanations are off for model {self.name}: the ModelDeployment's "
                "spec.predictor.explain.enabled is false (serve --explain turns them on)",
            )
        from conveyor.runtime.serving.explain import explain_response

        return await explain_response(self, payload)

    async def postprocess(
        self,
        result: Prediction | dict[str, Any],
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        if isinstance(result, dict):  # an explanation (explain), already the response
            return result
        request, out, answers = result.request, result.out, result.answers
        if isinstance(request.v2, GrpcCall):
            return request.v2.response(
                self.name, self.version, request.request_id, self._v2_outputs(out, answers)
            )
        if request.v2 is not None:
            return self._v2_response(request.v2, request.request_id, out, answers)
        if self.task == "classification":
            classes = self.classes or []
            predictions = [
                {"label": lab, "probabilities": {c: float(p) for c, p in zip(classes, row, strict=True)}}
                for lab, row in zip(answers, out.tolist(), strict=True)
            ]
        else:
            predictions = [{"value": v} for v in answers]
        return {
            "predictions": predictions,
            "id": request.request_id,
            "model_name": self.name,
            "model_version": self.version,
        }

    def _observe(self, columns: dict[str, Any], answers: list[Any], request_id: str) -> None:
        if self.drift is not None:
            self.drift.observe(columns, answers)
        if self.feedback is not None:
            rows = None
            if (
                self.feedback_store is not None and self.kind != "image"
            ):  # tabular rows: the next run can train on them
                rows = [{k: v[i] for k, v in columns.items()} for i in range(len(answers))]
            self.feedback.remember(request_id, answers, rows)
            if self.served_log is not None:
                self.served_log.record(request_id, list(answers), rows)
        if self.metrics is not None:
            self.metrics.observe_predictions(answers)
            self.metrics.observe_bins(columns, answers)

    def _v2_outputs(self, out: np.ndarray, answers: list[Any]) -> list[tuple[str, str, np.ndarray]]:
        """The V2 outputs (name, datatype, array) of a prediction, as get_output_types lists them."""
        if self.task == "classification":
            return [
                ("label", "BYTES", np.array(answers, dtype=np.object_)),
                ("probabilities", "FP32", out.astype(np.float32, copy=False)),
            ]
        return [("value", "FP32", out.astype(np.float32, copy=False))]

    def _v2_response(
        self, request: InferRequest, request_id: str, out: np.ndarray, answers: list[Any]
    ) -> InferResponse:
        n = len(answers)
        if self.task == "classification":
            label = InferOutput("label", [n], "BYTES")
            label.set_data_from_numpy(np.array(answers, dtype=np.object_), binary_data=False)
            probs = InferOutput("probabilities", list(out.shape), "FP32")
            probs.set_data_from_numpy(out.astype(np.float32), binary_data=False)
            outputs = [label, probs]
        else:
            value = InferOutput("value", [n], "FP32")
            value.set_data_from_numpy(out.astype(np.float32), binary_data=False)
            outputs = [value]
        known = {o.name for o in outputs}
        for requested in request.request_outputs or []:
            if requested.name not in known:
                raise InvalidInput(
                    f"output {requested.name!r} does not exist; this model has {sorted(known)}"
                )
        return InferResponse(
            response_id=request_id,
            model_name=self.name,
            infer_outputs=outputs,
            model_version=self.version,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    # ------------------------------------------------------------ V1 parsing

    def _check_rows(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("the request holds no rows; send at least one instance")
        if n > self.max_rows_per_request:
            raise InvalidInput(
                f"the request holds {n} rows; the limit is {self.max_rows_per_request} per request"
            )

    def _parse_v1(self, body: Any) -> tuple[np.ndarray, dict[str, Any], int]:
        if isinstance(body, bytes | str):
            # KServe passes the body through undecoded when the content-type is not JSON (curl's default
            # form type, text/plain); JSON is the only V1 body there is, so read it as such.
            try:
                body = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise InvalidInput(f"the V1 body is not valid JSON ({e})") from e
        if not isinstance(body, Mapping):
            raise InvalidInput(
                'a V1 request body must be a JSON object {"instances": [...]}; got ' + type(body).__name__
            )
        if "instances" not in body:
            raise InvalidInput(f'the V1 body needs "instances" (a list of rows); it has {sorted(body)}')
        instances = body["instances"]
        if not isinstance(instances, list):
            raise InvalidInput(f'"instances" must be a list of rows, got {type(instances).__name__}')
        self._check_rows(len(instances))
        if self.kind == "image":
            return self._images_from_v1(instances)
        features = self.package.transforms.features  # type: ignore[union-attr]
        names = [f.name for f in features]
        rows: list[Mapping[str, Any]] = []
        for i, inst in enumerate(instances):
            if isinstance(inst, Mapping):
                rows.append(inst)
            elif isinstance(inst, list):
                if len(inst) != len(names):
                    raise InvalidInput(
                        f"instances[{i}] has {len(inst)} values; the model takes {len(names)} features {names}"
                    )
                rows.append(dict(zip(names, inst, strict=True)))
            else:
                raise InvalidInput(
                    f"instances[{i}] must be an object {{feature: value}} or a list in feature order, "
                    f"got {type(inst).__name__}"
                )
        rows = self._conform(rows, names)
        for i, row in enumerate(rows):
            for k, v in row.items():
                if isinstance(v, list | dict):
                    raise InvalidInput(f"instances[{i}].{k} must be a single value, got a {type(v).__name__}")
        columns = {name: [row.get(name) for row in rows] for name in names}
        return TabularInput(rows, len(rows)), self._for_drift(columns), len(rows)

    def _optional_inputs(self) -> list[str]:
        """Inputs a request may leave out: nullable ones the fitted transforms impute."""
        transforms = self.package.transforms  # type: ignore[union-attr]
        imputed = {s.column for s in transforms.steps if s.type == "impute"}
        return [f.name for f in transforms.features if f.nullable and f.name in imputed]

    def _conform(self, rows: list[Mapping[str, Any]], names: list[str]) -> list[Mapping[str, Any]]:
        """Rows as the model takes them: a field it does not know is dropped and counted (an upstream
        producer adding a field must break nothing); a missing input the transforms impute is null."""
        known, optional = set(names), self._optional_inputs()
        ignored: dict[str, int] = {}
        out: list[Mapping[str, Any]] = []
        for row in rows:
            extra = [k for k in row if k not in known]
            missing = [k for k in optional if k not in row]
            if not extra and not missing:
                out.append(row)
                continue
            for k in extra:
                ignored[str(k)] = ignored.get(str(k), 0) + 1
            out.append({**{k: v for k, v in row.items() if k in known}, **dict.fromkeys(missing)})
        if ignored and self.metrics is not None:
            self.metrics.observe_ignored(ignored)
        return out

    def _for_drift(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Bool features are profiled as categories "true"/"false": a 1/0 (V2 BOOL arrives as numbers,
        V1 clients may send 1/0) must count as the same category."""
        for f in self.package.transforms.features:  # type: ignore[union-attr]
            if f.type == "bool" and f.name in columns:
                columns[f.name] = [
                    bool(v) if isinstance(v, int | float) and v in (0, 1) else v for v in columns[f.name]
                ]
        return columns

    def _transform(self, data: Any) -> np.ndarray:
        try:
            return self.model.transform(data)
        except ValueError as e:
            raise InvalidInput(str(e)) from e

    # ------------------------------------------------------------ V2 parsing

    def _parse_v2(self, request: InferRequest | GrpcCall) -> tuple[np.ndarray, dict[str, Any], int]:
        if not request.inputs:
            raise InvalidInput('the V2 request has no "inputs"')
        arrays: dict[str, np.ndarray] = {}
        for inp in request.inputs:
            if inp.name in arrays:
                raise InvalidInput(f"input {inp.name!r} is given twice")
            if inp.datatype not in _V2_NUMERIC and inp.datatype != "BYTES":
                raise InvalidInput(
                    f"input {inp.name!r}: unknown datatype {inp.datatype!r}; V2 datatypes are BOOL, INT8..INT64, "
                    "UINT8..UINT64, FP16, FP32, FP64 and BYTES"
                )
            try:
                arr = inp.as_numpy()
            except InvalidInput:
                raise
            except (ValueError, TypeError) as e:
                raise InvalidInput(
                    f"input {inp.name!r}: data does not fit datatype {inp.datatype} and shape {inp.shape} ({e})"
                ) from e
            arrays[inp.name] = arr
        if self.kind == "image":
            return self._images_from_v2(request, arrays)

        features = self.package.transforms.features  # type: ignore[union-attr]
        known = {f.name: f for f in features}
        datatypes = {inp.name: inp.datatype for inp in request.inputs}
        unknown = [name for name in arrays if name not in known]
        if unknown and self.metrics is not None:  # ignored and counted, as in V1
            self.metrics.observe_ignored({name: len(arrays[name]) for name in unknown})
        arrays = {k: v for k, v in arrays.items() if k in known}
        rows = next((len(a) for a in arrays.values()), 0)
        for name in self._optional_inputs():
            if name not in arrays and rows:  # imputed by the fitted transforms
                string = known[name].type == "string"
                arrays[name] = np.array([None] * rows, dtype=object) if string else np.full(rows, np.nan)
                datatypes[name] = "BYTES" if string else "FP64"
        missing = [f.name for f in features if f.name not in arrays]
        if missing:
            raise InvalidInput(f"input(s) {missing} missing; see GET /v2/models/{self.name} for the inputs")
        columns: dict[str, Any] = {}
        n: int | None = None
        for f in features:
            arr = arrays[f.name]
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise InvalidInput(
                    f"input {f.name!r} must have shape [B] (one value per row), got {list(arr.shape)}"
                )
            if n is None:
                n = len(arr)
            elif len(arr) != n:
                raise InvalidInput(
                    f"input {f.name!r} has {len(arr)} rows, {features[0].name!r} has {n}; all inputs need the same"
                )
            dt = datatypes[f.name]
            if f.type == "string":
                if dt != "BYTES":
                    raise InvalidInput(f"input {f.name!r} is a string feature: send datatype BYTES, got {dt}")
                columns[f.name] = [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in arr.tolist()
                ]
            else:
                if dt not in _V2_NUMERIC:
                    raise InvalidInput(
                        f"input {f.name!r} is a {f.type} feature: send a numeric datatype (e.g. "
                        f"{_V2_TYPE_OF[f.type]}), got {dt}"
                    )
                columns[f.name] = arr.astype(np.float64) if arr.dtype != np.float64 else arr
        assert n is not None
        self._check_rows(n)
        return (
            TabularInput(dict(columns), n),
            self._for_drift(
                {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in columns.items()}
            ),
            n,
        )

    # ------------------------------------------------------------ images

    def _decode_image(self, data: bytes, where: str) -> np.ndarray:
        """Encoded image bytes -> raw pixels [C, H, W] on the training scale (0..scale); an image of
        another size is resized with torchvision's Resize (antialiased) to the training size."""
        from PIL import Image, UnidentifiedImageError

        t = self.package.transforms  # type: ignore[union-attr]
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise InvalidInput(f"{where}: not a decodable image ({e})") from e
        img = img.convert("L" if t.channels == 1 else "RGB")
        pixels = np.asarray(img, dtype=np.uint8)  # [H, W] or [H, W, C], 0..255
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if pixels.shape[1:] != (t.height, t.width):
            import torch

            pixels = self._resize(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()
        return pixels.astype(np.float32) * np.float32(t.scale / 255.0)

    def _b64(self, text: Any, where: str) -> bytes:
        if not isinstance(text, str):
            raise InvalidInput(f"{where}: b64 must be a base64 string, got {type(text).__name__}")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidInput(f"{where}: not valid base64 ({e})") from e

    def _images_from_v1(self, instances: list[Any]) -> tuple[np.ndarray, dict[str, Any], int]:
        t = self.package.transforms  # type: ignore[union-attr]
        field = t.image_field
        raw = []
        for i, inst in enumerate(instances):
            where = f"instances[{i}]"
            value = inst.get(field, inst) if isinstance(inst, Mapping) else inst
            if isinstance(value, Mapping) and "b64" in value:
                raw.append(self._decode_image(self._b64(value["b64"], f"{where}.{field}.b64"), where))
            elif isinstance(value, list):
                raw.append(self._raw_pixels(value, where))
            else:
                raise InvalidInput(
                    f'{where} must be {{"{field}": {{"b64": "<base64 image>"}}}} or {{"{field}": [pixels]}}'
                )
        return self._images(np.stack(raw))

    def _raw_pixels(self, value: Any, where: str) -> np.ndarray:
        t = self.package.transforms  # type: ignore[union-attr]
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"{where}: pixels must be numbers ({e})") from e
        shape = (t.channels, t.height, t.width)
        if arr.shape == (t.height, t.width) and t.channels == 1:
            arr = arr[None]
        elif arr.shape == (t.height, t.width, t.channels) and arr.shape != shape:
            arr = arr.transpose(2, 0, 1)
        elif arr.ndim == 1 and arr.size == math.prod(shape):
            arr = arr.reshape(shape)
        if arr.shape != shape:
            raise InvalidInput(f"{where}: pixels must have shape {list(shape)}, got {list(arr.shape)}")
        return arr

    def _images_from_v2(
        self, request: InferRequest | GrpcCall, arrays: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, Any], int]:
        t = self.package.transforms  # type: ignore[union-attr]
        if len(arrays) != 1:
            raise InvalidInput(f"an image model takes one input, {t.image_field!r}; got {sorted(arrays)}")
        name, arr = next(iter(arrays.items()))
        datatype = request.inputs[0].datatype
        if datatype == "BYTES":
            items = arr.reshape(-1).tolist()
            self._check_rows(len(items))
            raw = []
            for i, item in enumerate(items):
                where = f"input {name!r}[{i}]"
                if isinstance(item, bytes):
                    # Raw image bytes (binary extension) or base64 text sent as bytes.
                    data = (
                        item if _looks_like_image(item) else self._b64(item.decode("ascii", "replace"), where)
                    )
                else:
                    data = self._b64(item, where)
                raw.append(self._decode_image(data, where))
            return self._images(np.stack(raw))
        if datatype not in _V2_NUMERIC:
            raise InvalidInput(
                f"input {name!r}: send BYTES (encoded images) or numeric raw pixels, got {datatype}"
            )
        if arr.ndim < 2:
            raise InvalidInput(f"input {name!r}: raw pixels need shape [B, C, H, W], got {list(arr.shape)}")
        self._check_rows(len(arr))
        t = self.package.transforms  # type: ignore[union-attr]
        if arr.shape[1:] == (t.channels, t.height, t.width):
            return self._images(arr.astype(np.float32, copy=False))
        return self._images(
            np.stack([self._raw_pixels(a, f"input {name!r}[{i}]") for i, a in enumerate(arr)])
        )

    def _images(self, raw: np.ndarray) -> tuple[np.ndarray, dict[str, Any], int]:
        from conveyor.runtime.package.profile import image_stats

        t = self.package.transforms  # type: ignore[union-attr]
        if not np.isfinite(raw).all():
            raise InvalidInput(f"feature {t.image_field!r}: pixels must be finite numbers")
        x = self._transform(raw)
        stats = image_stats(raw, scale=t.scale)
        return x, {k: v.tolist() for k, v in stats.items()}, len(raw)

    # ------------------------------------------------------------ feedback

    def record_feedback(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Score ground truth for earlier requests: each item ``{"id": request id, "label": truth}`` (or
        ``"labels": [...]`` for a request of several rows; ``"value"``/``"values"`` for regression)."""
        assert self.feedback is not None
        results = []
        checked: list[tuple[str, list[Any], list[Any] | None]] = []
        for i, item in enumerate(items):
            where = f"feedback[{i}]"
            if not isinstance(item, Mapping):
                raise InvalidInput(f"{where} must be an object with id and label(s)")
            rid = item.get("id")
            if not isinstance(rid, str) or not rid:
                raise InvalidInput(f'{where}.id must be the request id a prediction response carried ("id")')
            single, many = ("value", "values") if self.task == "regression" else ("label", "labels")
            if many in item:
                truths = item[many]
                if not isinstance(truths, list):
                    raise InvalidInput(f"{where}.{many} must be a list")
            elif single in item:
                truths = [item[single]]
            else:
                raise InvalidInput(f"{where} needs {single!r} (or {many!r} for a request of several rows)")
            for t in truths:
                if isinstance(t, list | dict) or t is None:
                    raise InvalidInput(f"{where}.{single}: {t!r} is not a single value")
                if self.task == "regression" and not _is_number(t):
                    raise InvalidInput(f"{where}.{single}: {t!r} is not a number")
                if self.task == "classification" and str(t) not in (self.classes or []):
                    raise InvalidInput(f"{where}.{single}: {t!r} is not one of the classes {self.classes}")
            predicted, version, inputs = self.feedback.predictions(rid), self.version, None
            if predicted is None and self.served_log is not None:
                # Served by another replica or process (or before a restart): its log in storage knows.
                served = self.served_log.lookup(rid)
                if served is not None:
                    self.feedback.remember(rid, served.predictions, served.inputs)
                    predicted = served.predictions
                else:  # or by a predictor of another version behind the same route (a canary's share)
                    version, served = self._served_by_another_version(rid)
                    if served is not None:
                        predicted, inputs = served.predictions, served.inputs
            if predicted is not None and len(predicted) != len(truths):
                raise InvalidInput(
                    f"{where}: request {rid!r} had {len(predicted)} row(s); feedback gives {len(truths)} label(s)"
                )
            checked.append((rid, truths, predicted, version, inputs))
        unknown = [c[0] for c in checked if c[2] is None]
        if unknown:
            if self.metrics:
                self.metrics.observe_feedback(
                    "unknown_id", sum(len(c[1]) for c in checked if c[2] is None), None
                )
            if self.served_log is not None:
                where = (
                    f"by any predictor of {self.name} (neither this process's memory, nor the served-request log "
                    f"{self.served_log.uri}, nor those of its other versions hold them, or they are too old); a request "
                    f"answered within the last {self.served_log.flush_interval:g}s may not be flushed to the "
                    "log yet: retry after that"
                )
            else:
                where = "by this predictor (or are too old)"
            raise InvalidInput(f"request id(s) {unknown[:5]} were never served {where}; nothing was recorded")
        self._persist(checked)  # before counting: what the counters show, the dataset holds
        for rid, truths, predicted, version, _ in checked:
            if version == self.version:
                scores = self.feedback.score(rid, truths)
                online = self.feedback.online_value()
            else:  # counted for the version that answered; this version's online window is not its
                scores = self.feedback.compare(truths, predicted)
                online = None
            if self.metrics:
                if self.task == "regression":
                    self.metrics.observe_feedback("scored", len(scores), online, version=version)
                else:
                    correct = int(sum(scores))
                    if correct:
                        self.metrics.observe_feedback("correct", correct, online, version=version)
                    if len(scores) - correct:
                        self.metrics.observe_feedback(
                            "incorrect", len(scores) - correct, online, version=version
                        )
            results.append(
                {
                    "id": rid,
                    "status": "recorded",
                    "rows": len(scores),
                    **({"model_version": version} if version != self.version else {}),
                }
            )
        online = self.feedback.online_value()
        key = "online_mae" if self.task == "regression" else "online_accuracy"
        return {"results": results, key: online, "model_name": self.name, "model_version": self.version}

    def _served_by_another_version(self, rid: str) -> tuple[str, Any]:
        """(version, the request) from the served-request log of another version of this model (the newest
        OTHER_VERSIONS that logged anything), or (this version, None)."""
        assert self.feedback_store is not None
        others = [v for v in self.feedback_store.served_versions() if v != self.version][-OTHER_VERSIONS:]
        for version in reversed(others):
            reader = self._other_logs.get(version)
            if reader is None:
                reader = self._other_logs[version] = ServedLog(self.feedback_store, version, write=False)
            served = reader.lookup(rid)
            if served is not None:
                return version, served
        return self.version, None

    def _persist(self, checked: list[tuple[str, list[Any], list[Any] | None, str, Any]]) -> None:
        """One part of each answering version's feedback dataset: each labelled row with its inputs and
        prediction."""
        if self.feedback_store is None or self.feedback is None:
            return
        now = time.time()
        rows: dict[str, list[dict[str, Any]]] = {}
        for rid, truths, predicted, version, inputs in checked:
            inputs = (self.feedback.inputs(rid) if version == self.version else inputs) or [
                {} for _ in truths
            ]
            for i, truth in enumerate(truths):
                rows.setdefault(version, []).append(
                    {
                        "id": rid,
                        "row": i,
                        "inputs": inputs[i],
                        "prediction": (predicted or [None] * len(truths))[i],
                        "label": truth,
                        "time": now,
                    }
                )
        for version, part in rows.items():
            self.feedback_store.append_feedback(version, part)

    def stop(self) -> None:
        """KServe's shutdown (SIGTERM): what the served-request log still buffers is written first."""
        if self.served_log is not None:
            self.served_log.close()
        super().stop()

    async def close(self) -> None:
        if self.served_log is not None:
            await asyncio.to_thread(self.served_log.close)
        if self.batcher is not None:
            await self.batcher.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"P5", b"P6")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC)
