"""Benchmark: which backend runs a package's forward pass fastest (the rule ScoringModel applies).

For the fraud MLP (hidden 32, 16, on the fraud transforms) and ResNet-18 on 1x64x64 images, built and
exported here with the training runtime's own builders and exporter (speed does not depend on weights), the
package's forward pass (``ScoringModel.forward``: the model plus its softmax, what serving and batch
scoring call) in-process, at several batch sizes, for every backend the package format offers:

- ``onnxruntime`` on the package's ``model.onnx`` (format 3);
- ``torch-export``: the ``torch.export`` program's module (format 3);
- ``torchscript``: the same weights traced as a format-2 package: the baseline, what packages held before.

Each (model, backend, batch) is timed for ~``SECONDS`` of repeated calls after a warm-up: rows/s and the
median call latency. On a CUDA machine the torch backends also run on the GPU. The ``choice`` section
records, per model and batch, the measured fastest backend and what ``choose_backend`` picks.

Run: ``pytest -m bench tests/bench/bench_model_format.py`` or ``python tests/bench/bench_model_format.py``;
writes tests/bench/results/model_format.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from _serving_support import FRAUD_TRANSFORMS  # noqa: E402

RESULTS = ROOT / "tests" / "bench" / "results" / "model_format.json"
SECONDS = float(os.environ.get("BENCH_SECONDS", "1.5"))
# torch's and onnxruntime's intra-op threads: 1 (one server process per core, serve --workers) and all cores.
THREADS = (1, os.cpu_count() or 1)
BATCHES = {"fraud-mlp": (1, 8, 32, 128, 512), "resnet18-64x64": (1, 8, 32)}


def _fraud_package(registry: str) -> tuple[str, str]:
    """The fraud MLP as the samples train it (hidden 32, 16) on the fraud transforms: the transforms
    fitted on the built-in transactions, the weights untrained (speed does not depend on them)."""
    from conveyor.runtime.package.features import FeatureSchema, fit_transforms
    from conveyor.runtime.training.data import fraud_frame
    from conveyor.runtime.training.models import build_model

    frame = fraud_frame(rows=3000, seed=7, fraud_rate=0.1)
    types = {"amount": "float", "merchant": "string", "hour": "int", "foreign": "bool",
             "card_age_days": "int", "distance_km": "float", "txn_last_hour": "int"}  # fmt: skip
    features = [FeatureSchema(n, t, nullable=n == "distance_km") for n, t in types.items()]
    transforms = fit_transforms(frame[list(types)], features, FRAUD_TRANSFORMS)
    model = build_model("mlp", input_shape=transforms.input_shape, outputs=2, hidden_layers=(32, 16))
    return _register(registry, "fraud", model, transforms, ["0", "1"], "mlp")


def _resnet_package(registry: str) -> tuple[str, str]:
    from conveyor.runtime.package.features import fit_image_transforms
    from conveyor.runtime.training.models import build_model

    model = build_model("resnet18", input_shape=[1, 64, 64], outputs=10)
    transforms = fit_image_transforms(np.random.default_rng(0).uniform(0, 16, (16, 1, 64, 64)), scale=16)
    return _register(registry, "resnet18", model, transforms, [str(i) for i in range(10)], "resnet18")


def _register(
    registry: str, name: str, model: Any, transforms: Any, classes: list[str], arch: str
) -> tuple[str, str]:
    """The format-3 package (model.pt2 + model.onnx) and the same weights as a format-2 TorchScript one."""
    import functools

    import torch

    from conveyor.runtime.package import registry as registry_mod
    from conveyor.runtime.package.registry import Registry
    from conveyor.runtime.training.export import export_model
    from conveyor.runtime.training.models import export_torchscript

    torch.manual_seed(0)
    exported = export_model(model, transforms.input_shape)
    # The baseline: the same weights as the format before (2) held them, a traced TorchScript model.pt.
    traced = export_torchscript(model, transforms.input_shape)

    def write(area: Any, files: dict[str, bytes], model_kind: str) -> dict[str, Any]:
        for f, data in files.items():
            area.write_bytes(f, data)
        area.write_json("transforms.json", transforms.to_json())
        area.write_json("schema.json", {"kind": transforms.kind, "task": "classification", "classes": classes})
        for f in ("profile.json", "metrics.json", "lineage.json"):
            area.write_json(f, {})
        return {"task": "classification", "architecture": arch, "modelKind": model_kind}

    reg = Registry(registry, name)
    uri = reg.package_uri(reg.register(functools.partial(write, files=exported.files, model_kind="torch-export")))
    before = registry_mod.FORMAT_VERSION
    registry_mod.FORMAT_VERSION = 2
    try:
        old = Registry(registry, name + "-torchscript")
        return uri, old.package_uri(
            old.register(functools.partial(write, files={"model.pt": traced}, model_kind="torchscript"))
        )
    finally:
        registry_mod.FORMAT_VERSION = before


def _time(scorer: Any, x: np.ndarray) -> dict[str, float]:
    for _ in range(3):
        scorer.forward(x)
    calls: list[float] = []
    deadline = time.perf_counter() + SECONDS
    while time.perf_counter() < deadline or len(calls) < 5:
        t = time.perf_counter()
        scorer.forward(x)
        calls.append(time.perf_counter() - t)
    total = sum(calls)
    return {
        "rowsPerSecond": round(len(calls) * len(x) / total, 1),
        "p50Ms": round(1000 * float(np.median(calls)), 3),
        "calls": len(calls),
    }


def _inputs(scorer: Any, batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    return rng.normal(size=(batch, *scorer.package.transforms.input_shape)).astype(np.float32)


def run_bench() -> dict[str, Any]:
    import onnxruntime
    import torch

    from conveyor.runtime.package.registry import open_package
    from conveyor.runtime.serving.model import ScoringModel, choose_backend

    work = Path(tempfile.mkdtemp(prefix="bench-format-"))
    registry = str(work / "registry")
    packages = {
        "fraud-mlp": _fraud_package(registry),
        "resnet18-64x64": _resnet_package(registry),
    }
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    results: dict[str, Any] = {}
    choice: dict[str, Any] = {}
    for model_name, (uri, old) in packages.items():
        per_backend: dict[str, Any] = {}
        for threads in THREADS:
            torch.set_num_threads(threads)
            for device in devices:
                for backend, package_uri in (("onnxruntime", uri), ("torch-export", uri), ("torchscript", old)):
                    if backend == "onnxruntime" and device != "cpu":
                        continue
                    scorer = ScoringModel.open(package_uri, device, backend)
                    key = f"{backend}@{device}/threads={threads}"
                    per_backend[key] = {str(b): _time(scorer, _inputs(scorer, b)) for b in BATCHES[model_name]}
                    print(model_name, key, per_backend[key], flush=True)
        results[model_name] = per_backend
        pkg = open_package(uri)
        choice[model_name] = {}
        for device, threads in ((d, t) for d in devices for t in THREADS):
            picked = choose_backend(pkg, device)
            where = f"@{device}/threads={threads}"
            for b in BATCHES[model_name]:
                timed = {k[: -len(where)]: v[str(b)]["rowsPerSecond"] for k, v in per_backend.items() if k.endswith(where)}
                best = max(timed, key=lambda k: timed[k])
                choice[model_name][f"{device} threads={threads} batch {b}"] = {
                    "fastest": best,
                    "picked": picked,
                    "pickedVsFastest": round(timed[picked] / timed[best], 3),
                    "pickedVsTorchscriptBaseline": round(timed[picked] / timed["torchscript"], 3),
                }
    return {
        "benchmark": "model_format",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadAverage1m": round(os.getloadavg()[0], 2),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": list(THREADS),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "method": f"ScoringModel.forward in-process, {SECONDS}s of repeated calls per point after 3 warm-up "
        "calls; torch and onnxruntime given the same intra-op threads",
        "results": results,
        "choice": choice,
    }


@pytest.mark.bench
def test_model_format_backends() -> None:
    report = run_bench()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for model_name, points in report["choice"].items():
        for point, c in points.items():
            print(model_name, point, c)


if __name__ == "__main__":
    test_model_format_backends()
    print(RESULTS.read_text())
