"""Fixtures shared by the operator's integration tests: the cluster as the tests see it (playing KubeRay
and KServe by patching child status) and the operator running for real as a subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _operator_support import Cluster, OperatorProcess


@pytest.fixture
def cluster(kube_api: Any, namespace: str) -> Cluster:
    return Cluster(kube_api, namespace)


@pytest.fixture
def operator(kubeconfig: str, namespace: str) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, namespace).start()
    try:
        yield op
    finally:
        op.stop()
        print(op.logs())  # shown by pytest when the test failed


@pytest.fixture
def registry(tmp_path: Path) -> str:
    """An empty file:// registry (a test module may override it with one holding versions)."""
    return f"file://{tmp_path}/registry"
