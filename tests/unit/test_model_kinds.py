"""Model kinds beyond the built-in torch models: the user's own (architecture custom) and gradient-boosted
trees (modelKind xgboost in the package format), loaded as the predictor and batch scoring load them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.runtime.package.booster import BoosterModel, objective_for
from conveyor.runtime.package.registry import (
    FORMAT_VERSION,
    PackageError,
    Registry,
    open_package,
    required_files,
)
from conveyor.runtime.training.models import build_model, export_torchscript


def test_custom_architecture_builds_the_named_module_and_exports() -> None:
    schema = {"kind": "tabular", "features": [{"name": "a", "type": "float"}], "task": "classification"}
    model = build_model(
        "custom",
        input_shape=[12],
        outputs=3,
        module="conveyor.runtime.training.custom_example:residual_mlp",
        schema=schema,
    )
    import torch

    assert model(torch.zeros(5, 12)).shape == (5, 3)
    assert export_torchscript(model, [12])  # every packaged model must trace


@pytest.mark.parametrize(
    ("module", "words"),
    [
        (None, "must name package.module:function"),
        ("no_such_package.models:build", "cannot be imported"),
        ("conveyor.runtime.training.custom_example:missing", "cannot be imported"),
        ("builtins:dict", "returned dict, not a torch.nn.Module"),
    ],
)
def test_custom_architecture_errors_name_the_field(module: str | None, words: str) -> None:
    with pytest.raises(ValueError, match="training.model.module") as e:
        build_model("custom", input_shape=[4], outputs=2, module=module, schema={})
    assert words in str(e.value)


def _booster(task: str, classes: int) -> BoosterModel:
    import xgboost

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32) if task == "classification" else x[:, 0] * 2
    if classes > 2:
        y = np.digitize(x[:, 0], [-0.5, 0.5]).astype(np.float32)
    params = {**objective_for(task, classes), "max_depth": 2}
    return BoosterModel(xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=5), task, classes)


def _register(registry: Registry, booster: BoosterModel, classes: list[str] | None) -> str:
    def write(area: Any) -> dict[str, Any]:
        area.write_bytes("model.ubj", booster.to_bytes())
        area.write_json("transforms.json", {"kind": "tabular", "features": [], "steps": [], "outputColumns": []})
        area.write_json("schema.json", {"kind": "tabular", **({"classes": classes} if classes else {})})
        for name in ("profile.json", "metrics.json", "lineage.json"):
            area.write_json(name, {})
        return {"task": "classification" if classes else "regression", "modelKind": "xgboost"}

    return registry.register(write)


@pytest.mark.parametrize(("task", "classes"), [("classification", 2), ("classification", 3), ("regression", 0)])
def test_xgboost_package_round_trips_through_the_registry(tmp_path: Path, task: str, classes: int) -> None:
    booster = _booster(task, classes)
    registry = Registry(str(tmp_path), "trees")
    names = [str(i) for i in range(classes)] if classes else None
    version = _register(registry, booster, names)
    pkg_manifest = (tmp_path / "trees" / version / "package.json").read_text()
    assert '"modelKind": "xgboost"' in pkg_manifest and f'"formatVersion": {FORMAT_VERSION}' in pkg_manifest
    x = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32)
    loaded = open_package(registry.package_uri(version)).load_model()
    out = loaded.predict(x)
    assert np.allclose(out, booster.predict(x))
    if task == "classification":
        assert out.shape == (7, classes) and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
        assert np.allclose(np.exp(loaded.logits(x)), out, atol=1e-6)
    else:
        assert out.shape == (7,)


def test_a_package_must_hold_its_kinds_model_file(tmp_path: Path) -> None:
    assert required_files("xgboost")[0] == "model.ubj" and required_files()[0] == "model.pt"

    def write(area: Any) -> dict[str, Any]:
        area.write_bytes("model.pt", b"torch weights, but the manifest says xgboost")
        for name in ("transforms.json", "schema.json", "profile.json", "metrics.json", "lineage.json"):
            area.write_json(name, {})
        return {"modelKind": "xgboost"}

    with pytest.raises(PackageError, match=r"missing \['model.ubj'\]"):
        Registry(str(tmp_path), "m").register(write)
    with pytest.raises(PackageError, match="modelKind 'onnx'"):
        required_files("onnx")
