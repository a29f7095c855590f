"""Static checks on our CRDs, so `kubectl explain` teaches the whole API and the Python models agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.runtime import spec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))


def _walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.fixture(params=CRD_FILES, ids=[p.stem for p in CRD_FILES])
def crd(request) -> dict[str, Any]:
    return yaml.safe_load(request.param.read_text())


def test_crds_exist() -> None:
    assert {p.stem for p in CRD_FILES} == {"batchprediction", "mlpipeline", "modeldeployment"}


def test_every_field_is_described(crd) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    undocumented = [
        path
        for path, node in _walk(schema, crd["spec"]["names"]["kind"])
        if not node.get("description") and not path.endswith(".metadata")
        and not path.endswith("{}") and not path.endswith("[]")
    ]
    assert undocumented == []


def test_every_spec_value_is_bounded(crd) -> None:
    """No string, list or map a user writes is unbounded: admission refuses sizes beyond reason (and the
    apiserver can cost-check CEL rules over bounded values)."""
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    unbounded = [
        path
        for path, node in _walk(spec, "spec")
        if (node.get("type") == "string" and "maxLength" not in node and "enum" not in node)
        or (node.get("type") == "array" and "maxItems" not in node)
        or (node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node)
    ]
    assert unbounded == [], "give these a maxLength / maxItems / maxProperties"


def test_api_conventions(crd) -> None:
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == spec.GROUP
    assert "ml" in names["categories"] and names["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == spec.VERSION and version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert "observedGeneration" in status
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["properties"]) >= {
        "type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"
    }
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert "Age" in columns


def _model_fields(model: type[spec._Model]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize(
    ("crd_file", "model"),
    [
        ("mlpipeline.yaml", spec.MLPipelineSpec),
        ("modeldeployment.yaml", spec.ModelDeploymentSpec),
        ("batchprediction.yaml", spec.BatchPredictionSpec),
    ],
)
def test_python_models_mirror_the_crd(crd_file: str, model: type[spec._Model]) -> None:
    """Every field the CRD accepts is known to the typed model the operator and runtime read, and back."""
    crd = yaml.safe_load((ROOT / "crds" / crd_file).read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def compare(schema: dict[str, Any], py: type[spec._Model], path: str) -> list[str]:
        crd_fields = set(schema.get("properties", {}))
        problems = [f"{path}.{f}: in the CRD only" for f in crd_fields - _model_fields(py)]
        problems += [f"{path}.{f}: in the model only" for f in _model_fields(py) - crd_fields]
        for name, field in py.model_fields.items():
            alias = field.alias or name
            sub = schema.get("properties", {}).get(alias)
            if sub is None:
                continue
            inner = sub.get("items", sub) if sub.get("type") == "array" else sub
            for candidate in _submodels(field.annotation):
                if inner.get("properties"):
                    problems += compare(inner, candidate, f"{path}.{alias}")
        return problems

    assert compare(root, model, "spec") == []


def _submodels(annotation: Any) -> list[type[spec._Model]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, spec._Model):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _submodels(arg)]


def test_samples_parse_into_the_typed_models() -> None:
    for path in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            model = {
                "MLPipeline": spec.MLPipelineSpec,
                "ModelDeployment": spec.ModelDeploymentSpec,
                "BatchPrediction": spec.BatchPredictionSpec,
            }[doc["kind"]]
            parsed = model.model_validate(doc["spec"])
            assert parsed.to_api()
