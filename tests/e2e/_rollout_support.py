"""The rollout stack of the e2e tests and the bench: the operator with ``--prometheus-url``, the local
executor (KServe's stand-in, with its router, file_sd targets and planted faults) and a real Prometheus,
on the real local kube-apiserver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from _operator_support import Cluster, OperatorProcess, wait_until  # noqa: E402
from _training_support import ROW  # noqa: E402, F401 - the rollout tests' request row

from conveyor.runtime.package.registry import Registry  # noqa: E402

MDEP = "modeldeployments"
NAME = "fraud"
RATE = 10  # requests a second: 2/s reach a 20% canary, enough for minRequests in a 10s window


@dataclass
class Stack:
    cluster: Cluster
    operator: OperatorProcess
    prometheus: Any
    faults_file: Path
    registry: str
    workdir: Path

    @property
    def logs(self) -> list[Path]:
        return [self.workdir / "executor.log", *sorted(self.workdir.glob("executor/predictors/*.log"))]

    def deployment(self) -> dict[str, Any]:
        return self.cluster.get(MDEP, NAME)

    def status(self) -> dict[str, Any]:
        return self.cluster.status(MDEP, NAME)

    def isvc(self) -> dict[str, Any]:
        return self.cluster.isvc(NAME)

    def wait(self, what: str, pred: Any, timeout: float = 90) -> dict[str, Any]:
        try:
            return wait_until(what, self.status, pred, timeout=timeout)
        except AssertionError as e:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in self.logs if p.exists())
            raise AssertionError(f"{e}\n{tails}\n--- operator\n{self.operator.logs()[-3000:]}") from None


@contextmanager
def rollout_stack(kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any, registry: str,
                  tmp_path: Path) -> Iterator[Stack]:
    """The operator and the executor watching ``namespace``, over ``prometheus``; stopped on exit."""
    faults_file = tmp_path / "faults.json"
    log = tmp_path / "executor.log"
    executor = subprocess.Popen(
        [sys.executable, "-m", "conveyor_devstack.executor", "--kubeconfig", kubeconfig, "--namespace", namespace,
         "--state-dir", str(tmp_path / "executor"), "--prometheus-targets", str(prometheus.targets_dir),
         "--faults", str(faults_file)],
        cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    operator = OperatorProcess(kubeconfig, namespace, "--prometheus-url", prometheus.url).start()
    prometheus.add_target("operator", f"127.0.0.1:{operator.metrics_port}", {"namespace": namespace})
    try:
        yield Stack(Cluster(kube_api, namespace), operator, prometheus, faults_file, registry,
                    tmp_path)
    finally:
        operator.stop()
        executor.terminate()
        try:
            executor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            executor.kill()


def rollout_spec(stack: Stack, mode: str, *, interval: str = "5s", **analysis: Any) -> dict[str, Any]:
    return {
        "model": {"registryUri": stack.registry, "name": NAME, "version": "v1"},
        "rollout": {"strategy": "canary", "mode": mode, "steps": [20, 50], "interval": interval,
                    "analysis": {"window": "10s", "minSuccessRate": 0.9, "failureLimit": 0, "minRequests": 5,
                                 # Prometheus takes ~5 s to scrape a new predictor: a first step may
                                 # see too few requests, and wait another interval.
                                 "inconclusiveLimit": 10,
                                 **analysis}},
        # Standard mode scales with a Kubernetes HPA, on CPU only (the CRD refuses anything else).
        **({"autoscaling": {"metric": "cpu", "target": 80}} if mode == "Standard" else {}),
    }


def serving_v1(stack: Stack, mode: str, **spec_over: Any) -> str:
    """Create the deployment at v1; wait until it serves; the InferenceService's URL (the router)."""
    stack.cluster.create(MDEP, NAME, {**rollout_spec(stack, mode), **spec_over})
    status = stack.wait("v1 Ready", lambda s: s.get("stableVersion") == "v1" and s.get("url") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", [])), timeout=120)
    return f"{status['url']}/v1/models/{NAME}:predict"


def canary_weight(isvc: dict[str, Any], mode: str) -> int | None:
    """The canary weight as KServe reads it from the InferenceService's spec (None: no canary)."""
    if mode == "Knative":
        return isvc["spec"]["predictor"].get("canaryTrafficPercent")
    canary = isvc["spec"].get("canary") or []
    return canary[0]["trafficPercent"] if canary else None


def served_weight(isvc: dict[str, Any], mode: str) -> int:
    """The canary's share of the traffic actually served, as the InferenceService's status reports it."""
    status = isvc.get("status") or {}
    if mode == "Knative":
        entries = ((status.get("components") or {}).get("predictor") or {}).get("traffic") or []
        return sum(e["percent"] for e in entries if e.get("latestRevision") and len(entries) > 1)
    return sum(c.get("trafficPercent", 0) for c in status.get("canaryStatuses") or [])


def stable_in_isvc(isvc: dict[str, Any], mode: str) -> str:
    """The version the InferenceService's main predictor serves once no canary is left."""
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0].get("env", [])}
    uri = env.get("STORAGE_URI") or ""
    return uri.rstrip("/").rsplit("/", 1)[-1]


OWN_FIELDS = ("files", "sizes", "version", "model", "formatVersion")


def republish(package_dir: Path, registry_uri: str, model: str) -> str:
    """Commit the files of ``package_dir`` again as the model's next version, through the registry."""
    manifest = json.loads((package_dir / "package.json").read_text())

    def writer(area: Any) -> dict[str, Any]:
        for name in manifest["files"]:
            area.write_bytes(name, (package_dir / name).read_bytes())
        return {k: v for k, v in manifest.items() if k not in OWN_FIELDS}

    return Registry(registry_uri, model).register(writer)
