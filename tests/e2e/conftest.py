"""Fixtures of the e2e tier shared by several files: real model packages of two versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from _rollout_support import republish
from _serving_support import fraud_config, train_package


@pytest.fixture(scope="session")
def fraud_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """(registry URI, [v1 URI, v2 URI]) of a small real fraud model: v1 from a real training run, v2 the
    same trained package committed again as the next version through the registry (a second training
    run would add minutes on two shared cores; the rollout tests tell the versions apart by what each
    predictor reports and by the faults planted in one of them, not by their weights)."""
    registry = tmp_path_factory.mktemp("versions-registry")
    config = fraud_config(str(registry), rows=1000, epochs=1)
    try:
        v1 = train_package(config, registry.parent / "versions-train")
    except RuntimeError:
        # Ray's node start times out when the shared cores are saturated; once more, then fail.
        v1 = train_package(config, registry.parent / "versions-train")
    v2 = republish(Path(v1), f"file://{registry}", "fraud")
    assert v2 == "v2", v2
    return f"file://{registry}", [v1, str(registry / "fraud" / v2)]
