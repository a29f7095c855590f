"""Fixtures of the e2e tier shared by several files: real model packages of two versions."""

from __future__ import annotations

import pytest
from _serving_support import fraud_config, train_package


@pytest.fixture(scope="session")
def fraud_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """(registry URI, [v1 URI, v2 URI]): two small real fraud packages, trained once per session."""
    registry = tmp_path_factory.mktemp("versions-registry")
    uris = []
    for run in (1, 2):
        config = fraud_config(str(registry), rows=1000, epochs=1)
        config["run"] = run
        uris.append(train_package(config, registry.parent / "versions-train"))
    return f"file://{registry}", uris
