"""One registry version loaded for scoring: the fitted transforms, the model and its decision rule.

The online predictor (predictor.py, KServe) and the batch job (conveyor.runtime.scoring) both score
through this one class, so a row gets the same transform, the same forward pass and the same answer
wherever it is scored. It uses torch (or the package's booster) but not KServe.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from conveyor.runtime.package.decision import decide, decision_threshold
from conveyor.runtime.package.registry import ONNX_FILE, ModelPackage, PackageError, open_package

# How a package's forward pass runs: onnxruntime on the package's model.onnx, the torch module
# (torch.export's program or, for older packages, TorchScript), or the XGBoost booster.
BACKENDS = ("onnxruntime", "torch-export", "torchscript", "xgboost")
# CONVEYOR_MODEL_BACKEND overrides the choice (benchmarks, or a model onnxruntime gets wrong).
BACKEND_ENV = "CONVEYOR_MODEL_BACKEND"


def choose_backend(package: ModelPackage, device: str, requested: str | None = None) -> str:
    """The fastest backend this package has here, by the rule tests/bench/bench_model_format.py measured:
    on CPU onnxruntime beats the torch module at every batch size for both the fraud MLP and ResNet-18
    (docs/benchmarks/model_format-2cpu.json), so a package with model.onnx uses it when onnxruntime is
    installed; on CUDA the torch module (this image has onnxruntime's CPU build only)."""
    kind = package.model_kind
    native = kind if kind in ("xgboost", "torchscript") else "torch-export"
    requested = requested or os.environ.get(BACKEND_ENV) or None
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={requested!r} is not one of {list(BACKENDS)}")
        if requested == "onnxruntime" and not package.has_onnx:
            raise ValueError(f"{package.uri}: backend onnxruntime asked for, the package has no {ONNX_FILE}")
        if requested != "onnxruntime" and requested != native:
            raise ValueError(f"{package.uri}: backend {requested!r} asked for, the package holds {native}")
        return requested
    if package.has_onnx and device == "cpu" and _has_onnxruntime():
        return "onnxruntime"
    return native


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA device is available here")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class ScoringModel:
    """A package ready to score: ``transform`` (raw rows -> model input), ``forward`` (input ->
    probabilities [B, K] or values [B]) and ``answers`` (the package's decision rule)."""

    def __init__(self, package: ModelPackage, device: str | None = None, backend: str | None = None) -> None:
        import torch

        self.package = package
        self.version = package.version
        self.kind = package.transforms.kind
        self.task = package.task
        self.classes = [str(c) for c in package.classes] if package.classes is not None else None
        self.threshold = decision_threshold(package.schema)
        if self.task == "classification" and not self.classes:
            raise PackageError(f"{package.uri}: schema.json has no classes for a classification model")
        self.device = pick_device(device)
        self.module = package.load_model(self.device)
        self._torch = torch
        self._torch_module = package.model_kind != "xgboost"
        self.backend = choose_backend(package, self.device, backend)
        self._session = self._onnx_session() if self.backend == "onnxruntime" else None
        warm = np.zeros([1, *package.transforms.input_shape], dtype=np.float32)
        try:
            out = self.forward(warm)
        except Exception as e:  # a package whose weights do not take its own input layout
            raise PackageError(
                f"{package.uri}: the model does not accept input of shape {list(warm.shape)} ({e})"
            ) from e
        if self.task == "classification" and out.shape[1] != len(self.classes or []):
            raise PackageError(
                f"{package.uri}: the model outputs {out.shape[1]} logits, schema.json lists "
                f"{len(self.classes or [])} classes"
            )

    @classmethod
    def open(cls, uri: str, device: str | None = None, backend: str | None = None) -> ScoringModel:
        """Open and verify the package at ``uri``, load the weights, run one warm-up pass."""
        return cls(open_package(uri), device, backend)

    def _onnx_session(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # The same thread budget as torch (--torch-threads), so N server processes do not oversubscribe.
        options.intra_op_num_threads = self._torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            self.package.read_file(ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )
        self._onnx_input = session.get_inputs()[0].name
        return session

    def transform(self, data: Any) -> np.ndarray:
        """The fitted transforms on rows ({feature: value} dicts), columns ({feature: values}) or raw
        pixels; ValueError names the feature and the problem."""
        return self.package.transforms.apply(data)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """One forward pass: probabilities [B, K] (classification) or values [B] (regression)."""
        if not self._torch_module:
            return np.asarray(self.module.predict(x))
        if self._session is not None:
            logits = self._session.run(None, {self._onnx_input: np.ascontiguousarray(x, dtype=np.float32)})[0]
            if self.task == "classification":
                z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
                e = np.exp(z)
                return e / e.sum(axis=1, keepdims=True)
            return logits.astype(np.float32).reshape(logits.shape[0], -1)[:, 0]
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, non_blocking=True)
            out = self.module(t)
            if self.task == "classification":
                out = torch.softmax(out.float(), dim=1)
            else:
                out = out.float().reshape(out.shape[0], -1)[:, 0]
            return out.cpu().numpy()

    def answers(self, out: np.ndarray) -> list[Any]:
        """Each row's answer: its class label under the package's decision rule, or its value."""
        if self.task == "classification":
            classes = self.classes or []
            return [classes[i] for i in decide(out, self.threshold)]
        return [float(v) for v in out]
