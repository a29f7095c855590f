"""Helpers for the operator's integration tests: run the operator for real, act as KubeRay and KServe.

The operator runs as its own process (`python -m conveyor.operator -n <ns>`) against the real local
kube-apiserver. KubeRay and KServe controllers cannot run here, so the tests play them (the only fake):
they patch the children's status the way those controllers would, and write the model package the
training job would have written, through the real registry code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client.parser import text_string_to_metric_families

from conveyor.runtime.package.registry import Registry

T = TypeVar("T")
GROUP, VERSION = "conveyor.dev", "v1alpha1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2) -> T:
    """Poll until fn returns something truthy; fail naming `what` (and the last value) on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except ApiException as e:
            if e.status != 404:
                raise
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def wait_until(what: str, fn: Callable[[], T], pred: Callable[[T], Any], timeout: float = 30.0) -> T:
    """Poll fn until pred(value) holds; return that value."""
    box: list[T] = []

    def probe() -> bool:
        value = fn()
        if pred(value):
            box.append(value)
            return True
        return False

    wait_for(what, probe, timeout=timeout)
    return box[0]


class OperatorProcess:
    """`python -m conveyor.operator` watching one namespace, with its metrics and liveness ports."""

    def __init__(self, kubeconfig: str, namespace: str, *extra: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.extra = extra
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="conveyor-operator-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "conveyor.operator",
                "--namespace", self.namespace,
                "--metrics-port", str(self.metrics_port),
                "--liveness-port", str(self.liveness_port),
                "--bind", "127.0.0.1",
                "--log-level", os.environ.get("CONVEYOR_TEST_OPERATOR_LOG_LEVEL", "INFO"),
                *self.extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_for("the operator's liveness endpoint", self.alive, timeout=60)
        return self

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """Scrape /metrics: {'name{labels}': value} (the operator's own Prometheus metrics)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            v for k, v in self.metrics().items()
            if (k == name or k.startswith(name + "{")) and all(w in k for w in want)
        )

    def writes(self) -> float:
        """API writes (anything but GET) the operator has made so far."""
        return sum(
            v
            for k, v in self.metrics().items()
            if k.startswith("conveyor_api_requests_total{") and 'verb="GET"' not in k
        )

    def settled_writes(self) -> float:
        """The write count once it has stopped moving for a second (events are posted in the background)."""
        last = [self.writes()]

        def quiet() -> bool:
            time.sleep(1.0)
            now = self.writes()
            was, last[0] = last[0], now
            return now == was

        wait_for("the operator's writes to stop", quiet, timeout=30, interval=0.0)
        return last[0]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]


class Cluster:
    """Thin helpers over the official client for our kinds and the children (typed as dicts)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    # ours
    def create(self, plural: str, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
        kind = {"mlpipelines": "MLPipeline", "modeldeployments": "ModelDeployment", "batchpredictions": "BatchPrediction"}[plural]
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": spec,
        }
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name, patch)

    def delete(self, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name, propagation_policy="Background")

    def status(self, plural: str, name: str) -> dict[str, Any]:
        return self.get(plural, name).get("status") or {}

    def condition(self, plural: str, name: str, type_: str) -> dict[str, Any] | None:
        for c in self.status(plural, name).get("conditions") or []:
            if c["type"] == type_:
                return c
        return None

    # children
    def rayjobs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object("ray.io", "v1", self.ns, "rayjobs")["items"]

    def rayjob(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("ray.io", "v1", self.ns, "rayjobs", name)

    def isvc(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("serving.kserve.io", "v1beta1", self.ns, "inferenceservices", name)

    def exists(self, fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason, e.message) for e in items]

    def event(
        self, name: str, type_: str, reason: str, *, says: str = "", timeout: float = 30.0
    ) -> tuple[str, str, str]:
        """Wait for an event of `name` with this type and reason (and `says` in its message) and return it:
        events are posted in the background, after the status that records the transition."""
        return wait_for(
            f"a {type_} {reason} event of {name}" + (f" saying {says!r}" if says else ""),
            lambda: next((e for e in self.events(name) if e[:2] == (type_, reason) and says in e[2]), None),
            timeout=timeout,
        )

    # playing KubeRay and KServe (the fakes)
    def kuberay_sets(self, rayjob: str, **status: Any) -> None:
        self.custom.patch_namespaced_custom_object_status("ray.io", "v1", self.ns, "rayjobs", rayjob, {"status": status})

    def kserve_sets(self, isvc: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            "serving.kserve.io", "v1beta1", self.ns, "inferenceservices", isvc, {"status": status}
        )


def train(
    registry_uri: str, model: str, *, pipeline: str, namespace: str, run: int, deployed: dict[str, Any] | None = None,
    **metrics: float,
) -> str:
    """Play the training job's last step: commit a package whose lineage names the run (`deployed`: the
    figures a run with mustBeatDeployed records for the deployed version on its own test split)."""

    def writer(area: Any) -> dict[str, Any]:
        area.write_bytes("model.pt", b"weights (not loaded by the operator)")
        for name in ("transforms.json", "schema.json", "profile.json"):
            area.write_json(name, {})
        extra = {"deployed": deployed} if deployed is not None else {}
        area.write_json("metrics.json", {**metrics, **extra, "confusionMatrix": [[1, 0], [0, 1]]})
        area.write_json("lineage.json", {"pipeline": pipeline, "namespace": namespace, "run": run})
        return {"task": "classification", "architecture": "mlp"}

    return Registry(registry_uri, model).register(writer)


def pipeline_spec(registry_uri: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        # Named: these tests are about the operator, and their timings were set with the MLP (the
        # default, auto, would train trees on this table's rare class).
        "training": {"model": {"architecture": "mlp"}, **over.pop("training", {})},
        "registry": {"uri": registry_uri, "modelName": "fraud"},
        "evaluation": {"metric": "accuracy", "threshold": 0.9},
    }
    spec.update(over)
    return spec


def deployment_spec(registry_uri: str, version: str = "latest", **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"registryUri": registry_uri, "name": "fraud", "version": version}}
    spec.update(over)
    return spec


GATEWAY_API = ("gateway.networking.k8s.io", "v1")  # group, version of HTTPRoute


def route(cluster: Cluster, name: str = "fraud-traffic") -> dict[str, Any] | None:
    """An HTTPRoute of the test's namespace (the operator's `<name>-traffic` by default), None if absent."""
    try:
        return cluster.custom.get_namespaced_custom_object(*GATEWAY_API, cluster.ns, "httproutes", name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def backends(r: dict[str, Any]) -> list[tuple[str, int]]:
    """A route's (Service, weight) pairs, in order."""
    return [(b["name"], b.get("weight", 1)) for rule in r["spec"]["rules"] for b in rule.get("backendRefs") or []]
