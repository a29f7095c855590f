"""``architecture: auto`` picks the model by the data (training.run.resolve_architecture): trees for a
table with a rare class, the MLP for other tables, the CNN for images; anything else is kept as given. It
is the default: a pipeline that names no architecture gets it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml

from conveyor.runtime.spec import RunConfig
from conveyor.runtime.training.prepare import PreparedData
from conveyor.runtime.training.run import resolve_architecture


def _prepared(kind: str, y: np.ndarray, classes: list[str] | None) -> PreparedData:
    x = np.zeros((len(y), 3), dtype=np.float32)
    return PreparedData(
        kind,
        "classification" if classes else "regression",
        classes,
        None,
        {},
        {},  # type: ignore[arg-type]
        x,
        y,
        x[:2],
        y[:2],
        "sha",
        None,
    )  # type: ignore[arg-type]


def test_auto_resolves_by_the_data() -> None:
    rare = np.array([0] * 95 + [1] * 5)
    balanced = np.array([0, 1, 2] * 30)
    assert resolve_architecture("auto", _prepared("tabular", rare, ["0", "1"])) == "xgboost"
    assert resolve_architecture("auto", _prepared("tabular", balanced, ["a", "b", "c"])) == "mlp"
    assert resolve_architecture("auto", _prepared("tabular", rare.astype(np.float32), None)) == "mlp"
    assert resolve_architecture("auto", _prepared("image", balanced, ["a", "b", "c"])) == "cnn"
    # Ten even classes (digits: ~10% each) are not rare; one at an eighth of the others' count is.
    digits = [str(i) for i in range(10)]
    assert resolve_architecture("auto", _prepared("tabular", np.repeat(np.arange(10), 30), digits)) == "mlp"
    skewed = np.concatenate([np.repeat(np.arange(9), 40), np.full(5, 9)])
    assert resolve_architecture("auto", _prepared("tabular", skewed, digits)) == "xgboost"
    # A class the training split lacks altogether counts as rare.
    assert (
        resolve_architecture("auto", _prepared("tabular", np.array([0, 1] * 40), ["0", "1", "2"]))
        == "xgboost"
    )
    assert resolve_architecture("mlp", _prepared("tabular", rare, ["0", "1"])) == "mlp"


def test_auto_is_the_default_of_the_spec_and_both_crd_copies() -> None:
    config = RunConfig.model_validate(
        {
            "pipeline": "p",
            "run": 1,
            "data": {"source": {"uri": "builtin://fraud"}, "label": "label"},
            "registry": {"uri": "/tmp/r", "modelName": "m"},
        }
    )
    assert config.training.model.architecture == "auto"
    root = Path(__file__).resolve().parents[2]
    for path in (
        root / "crds" / "mlpipeline.yaml",
        root / "charts" / "conveyor" / "crds" / "mlpipeline.yaml",
    ):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        arch = spec["properties"]["training"]["properties"]["model"]["properties"]["architecture"]
        assert arch["default"] == "auto", path


def test_spec_and_crd_admit_auto() -> None:
    config = RunConfig.model_validate(
        {
            "pipeline": "p",
            "run": 1,
            "data": {"source": {"uri": "builtin://fraud"}, "label": "label"},
            "training": {"model": {"architecture": "auto"}},
            "registry": {"uri": "/tmp/r", "modelName": "m"},
        }
    )
    assert config.training.model.architecture == "auto"
    assert RunConfig.model_validate({**config.to_api()}).training.model.architecture == "auto"
    # The MLPipeline CRD (what the apiserver admits) takes it too.
    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "mlpipeline.yaml").read_text())
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            arch = node.get("architecture")
            if isinstance(arch, dict) and "pattern" in arch:
                found.append(arch)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(crd)
    assert found and all(re.fullmatch(a["pattern"], "auto") and "auto" in a["description"] for a in found)
