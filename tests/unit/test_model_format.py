"""The package's model format (torch.export + ONNX, formatVersion 3; TorchScript packages still load),
the predictor's backend choice, and explanations (runtime/serving/explain.py) on a tiny model trained
here in-process: a real fit, a real export, a real registry, captum's integrated gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conveyor.runtime.package import registry as registry_mod
from conveyor.runtime.package.features import FeatureSchema, fit_transforms
from conveyor.runtime.package.registry import FORMAT_VERSION, Registry, open_package
from conveyor.runtime.serving.explain import Explainer, ExplainLimits
from conveyor.runtime.serving.model import BACKEND_ENV, ScoringModel
from conveyor.runtime.training.export import export_model
from conveyor.runtime.training.models import MLP, export_torchscript

FEATURES = [
    FeatureSchema("signal", "float"),
    FeatureSchema("noise", "float"),
    FeatureSchema("constant", "float"),
    FeatureSchema("colour", "string"),
]
TRANSFORMS = [
    {"type": "standardize", "columns": ["signal", "noise", "constant"]},
    {"type": "oneHot", "columns": ["colour"]},
]


def _frame(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    colour = rng.choice(["red", "green", "blue"], size=n)
    # The label follows signal (and a little the colour); noise is independent; constant never varies.
    label = (signal + 0.5 * (colour == "red") > 0.25).astype(int)
    return {
        "signal": signal,
        "noise": rng.normal(size=n),
        "constant": np.full(n, 3.0),
        "colour": colour.astype(object),
        "label": label,
    }


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """A fitted transform and an MLP trained on it (well under a second of CPU)."""
    data = _frame(1500, 0)
    columns = {k: v for k, v in data.items() if k != "label"}
    fitted = fit_transforms(columns, FEATURES, TRANSFORMS)
    x = torch.from_numpy(fitted.apply(columns))
    y = torch.from_numpy(data["label"])
    torch.manual_seed(0)
    model = MLP(x.shape[1], [16], 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {"model": model.eval(), "transforms": fitted, "columns": columns}


def _register(registry: Registry, trained: dict[str, Any], files: dict[str, bytes], kind: str) -> str:
    fitted = trained["transforms"]

    def write(area: Any) -> dict[str, Any]:
        for name, data in files.items():
            area.write_bytes(name, data)
        area.write_json("transforms.json", fitted.to_json())
        area.write_json("schema.json", {"kind": "tabular", "task": "classification", "classes": ["0", "1"]})
        for name in ("profile.json", "metrics.json", "lineage.json"):
            area.write_json(name, {})
        return {"task": "classification", "architecture": "mlp", "modelKind": kind}

    return registry.package_uri(registry.register(write))


@pytest.fixture(scope="module")
def exported_uri(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    exported = export_model(trained["model"], trained["transforms"].input_shape)
    assert exported.model_kind == "torch-export" and set(exported.files) == {"model.pt2", "model.onnx"}
    return _register(Registry(str(tmp_path_factory.mktemp("reg")), "tiny"), trained, exported.files, "torch-export")


def test_new_packages_hold_torch_export_and_onnx_and_every_backend_agrees(
    trained: dict[str, Any], exported_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = open_package(exported_uri)
    assert pkg.manifest["formatVersion"] == FORMAT_VERSION == 3
    assert pkg.model_kind == "torch-export" and pkg.has_onnx
    rows = {k: v[:40] for k, v in _frame(40, 5).items() if k != "label"}
    with torch.no_grad():
        reference = torch.softmax(trained["model"](torch.from_numpy(trained["transforms"].apply(rows))), 1).numpy()
    auto = ScoringModel(pkg)
    assert auto.backend == "onnxruntime"  # the CPU rule: onnxruntime where the package has model.onnx
    monkeypatch.setenv(BACKEND_ENV, "torch-export")
    torch_backend = ScoringModel(pkg)
    assert torch_backend.backend == "torch-export"
    for scorer in (auto, torch_backend):
        for n in (1, 7, 40):  # the batch dimension is dynamic in both artifacts
            out = scorer.forward(scorer.transform({k: v[:n] for k, v in rows.items()}))
            assert out.shape == (n, 2) and np.allclose(out, reference[:n], atol=1e-5)
    monkeypatch.setenv(BACKEND_ENV, "torchscript")
    with pytest.raises(ValueError, match="holds torch-export"):
        ScoringModel(pkg)


def test_a_torchscript_package_written_the_old_way_still_loads(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The format before version 3: formatVersion 2, modelKind torchscript, a traced model.pt.
    monkeypatch.setattr(registry_mod, "FORMAT_VERSION", 2)
    files = {"model.pt": export_torchscript(trained["model"], trained["transforms"].input_shape)}
    uri = _register(Registry(str(tmp_path), "old"), trained, files, "torchscript")
    monkeypatch.undo()
    pkg = open_package(uri)
    assert pkg.manifest["formatVersion"] == 2 and pkg.model_kind == "torchscript"
    scorer = ScoringModel(pkg)
    assert scorer.backend == "torchscript"
    x = scorer.transform(trained["columns"])[:20]
    with torch.no_grad():
        expected = torch.softmax(trained["model"](torch.from_numpy(x)), 1).numpy()
    assert np.allclose(scorer.forward(x), expected, atol=1e-5)
    explained = Explainer(scorer, ExplainLimits(steps=8)).explain(x[:2], scorer.answers(scorer.forward(x[:2])))
    assert set(explained[0]["attributions"]) == {"signal", "noise", "constant", "colour"}


def test_a_model_torch_export_cannot_take_is_packaged_as_torchscript() -> None:
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # Python control flow on a value: torch.export refuses it, tracing records one path
                return self.linear(x)
            return -self.linear(x)

    exported = export_model(DataDependent(), [3])
    assert exported.model_kind == "torchscript" and set(exported.files) == {"model.pt"}
    assert "torchExport" in exported.notes


def test_integrated_gradients_give_an_unusable_feature_no_attribution(exported_uri: str) -> None:
    scorer = ScoringModel.open(exported_uri)
    rows = {k: v for k, v in _frame(12, 9).items() if k != "label"}
    x = scorer.transform(rows)
    explained = Explainer(scorer, ExplainLimits(max_instances=16, steps=32)).explain(
        x, scorer.answers(scorer.forward(x))
    )
    assert len(explained) == 12
    constant = np.array([e["attributions"]["constant"] for e in explained])
    signal = np.array([e["attributions"]["signal"] for e in explained])
    # The constant column (standardized to 0 in every row) cannot move the output; signal decides it.
    assert np.abs(constant).max() < 1e-6
    assert np.abs(signal).mean() > 0.1
    assert np.abs(signal).mean() > 5 * np.abs([e["attributions"]["noise"] for e in explained]).mean()
    # Completeness: the attributions account for the output's change from the baseline (to within the
    # error of 32 integration steps).
    for e in explained:
        assert abs(e["convergenceDelta"]) < 0.1 * sum(abs(v) for v in e["attributions"].values()) + 0.01


def test_xgboost_explanations_are_the_boosters_contributions(trained: dict[str, Any], tmp_path: Path) -> None:
    import xgboost

    from conveyor.runtime.package.booster import BoosterModel, objective_for

    data = _frame(1500, 0)
    x = trained["transforms"].apply({k: v for k, v in data.items() if k != "label"})
    params = {**objective_for("classification", 2), "max_depth": 3}
    booster = BoosterModel(
        xgboost.train(params, xgboost.DMatrix(x, label=data["label"]), num_boost_round=20), "classification", 2
    )
    uri = _register(Registry(str(tmp_path), "trees"), trained, {"model.ubj": booster.to_bytes()}, "xgboost")
    scorer = ScoringModel.open(uri)
    assert scorer.backend == "xgboost"
    answers = scorer.answers(scorer.forward(x[:10]))
    explained = Explainer(scorer).explain(x[:10], answers)
    margin = np.asarray(booster.booster.predict(xgboost.DMatrix(x[:10]), output_margin=True))
    for e, m, a in zip(explained, margin, answers, strict=True):
        assert e["attributions"]["constant"] == 0.0  # a tree never splits on a constant column
        # Contributions plus the bias are the margin (log-odds of class 1), signed toward the answer.
        assert sum(e["attributions"].values()) + e["bias"] == pytest.approx(m if a == "1" else -m, abs=1e-4)
    signal = np.mean([abs(e["attributions"]["signal"]) for e in explained])
    assert signal > np.mean([abs(e["attributions"]["noise"]) for e in explained])


def test_explain_is_off_unless_the_deployment_turns_it_on(exported_uri: str) -> None:
    import asyncio

    from fastapi import HTTPException
    from kserve.errors import InvalidInput
    from kserve.model import InferenceVerb

    from conveyor.runtime.serving.predictor import PackagePredictor

    rows = [{"signal": 1.0, "noise": 0.0, "constant": 3.0, "colour": "red"}] * 3

    async def ask(limits: ExplainLimits | None) -> Any:
        predictor = PackagePredictor("tiny", exported_uri, with_metrics=False, batching=False, explain=limits)
        predictor.load()
        try:
            return (await predictor({"instances": rows}, headers={}, verb=InferenceVerb.EXPLAIN))[0]
        finally:
            await predictor.close()

    with pytest.raises(HTTPException) as off:
        asyncio.run(ask(None))
    assert off.value.status_code == 404 and "spec.predictor.explain.enabled is false" in off.value.detail
    with pytest.raises(InvalidInput, match="at most 2 per call"):
        asyncio.run(ask(ExplainLimits(max_instances=2, steps=8)))
    answer = asyncio.run(ask(ExplainLimits(max_instances=3, steps=8)))
    assert [e["answer"] for e in answer["explanations"]] == ["1", "1", "1"]
