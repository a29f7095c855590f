"""The local executor: a stand-in for the KubeRay and KServe controllers on a machine with no kubelet.

    python -m conveyor_devstack.executor --kubeconfig PATH [--namespace NS] [--state-dir DIR]
        [--prometheus-targets DIR] [--faults FILE]

A development stand-in (``conveyor-devstack``, under ``hack/devstack``): never shipped in the images.

It is a FAKE of those two controllers, and only of them; what it runs is real:
- a RayJob (ray.io/v1) that appears is executed by running its entrypoint's program,
  `python -m conveyor.runtime.train --config run.json` (an MLPipeline's run) or
  `python -m conveyor.runtime.batch --config run.json` (a BatchPrediction's run), as a local process (local Ray, real torch), with
  the run's ConfigMap written to a file; the RayJob's `status` is then patched the way KubeRay reports it
  (`jobDeploymentStatus` Initializing/Running/Complete/Failed, `jobStatus` RUNNING/SUCCEEDED/FAILED,
  start and end times, the failure message);
- an InferenceService (serving.kserve.io/v1beta1) is served by starting, for each model version its
  predictors name (`STORAGE_URI` of the predictor and of `canary[]`), KServe's real model server
  (`python -m conveyor.runtime.serve`) on a free 127.0.0.1 port, and its `status` is patched as KServe
  reports it (`url`, `Ready` and `PredictorReady` conditions, `components.predictor.traffic`, and in
  Standard mode `canaryStatuses`); a predictor container with a port named `h2c` (grpc-v2) also serves
  gRPC (`--grpc-port`), and `components.predictor.grpcUrl` is the router's gRPC port. Versions no
  InferenceService names any more are stopped;
- the InferenceService's `url` is its traffic router (`conveyor_devstack.router`, one fixed port per
  InferenceService), which sends each request to the stable or the canary predictor, ready ones only, as
  the cluster would: Knative mode by the spec's `canaryTrafficPercent`; Standard mode as a Gateway API
  gateway by the weights of the HTTPRoute naming its predictor Services (the operator's), else as KServe
  v0.20.0's own route, all to the stable predictor; gRPC calls likewise, on the router's gRPC port;
- with `--prometheus-targets DIR` (hack/prometheus.sh's file_sd directory) every Ready predictor is
  listed there for the local Prometheus to scrape, labelled `namespace` and `inferenceservice` (its own
  series carry `model_name` and `model_version`); with `--faults FILE` predictors start through
  `conveyor_devstack.faults`, which plants 5xx answers or delays per version for tests and the demo.

Pods, Services, scheduling, Knative revisions and KServe's storage initializer are not imitated: the
predictor reads the registry URI directly. The executor polls (once a second): it is a development tool,
not a controller to copy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conveyor_devstack import faults
from conveyor_devstack.podenv import container_env
from conveyor_devstack.prometheus import remove_targets, write_targets
from conveyor_devstack.router import Backend, RouterHost, route_weights

log = logging.getLogger("conveyor.local-executor")

RAY = ("ray.io", "v1", "rayjobs")
KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
GATEWAY = ("gateway.networking.k8s.io", "v1", "httproutes")
FIELD_MANAGER = "conveyor-local-executor"
# Why a run failed, as the training runtime prints it last; the rest of stderr stays in the log file.
MESSAGE_TAIL = 1500
RUNTIME_ENTRYPOINTS = frozenset({"conveyor.runtime.train", "conveyor.runtime.batch"})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TrainingProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class PredictorProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ready: bool = False
    scraped: bool = False
    env_digest: str = (
        ""  # the container env it started with: a change rolls it (a new pod, as a kubelet would)
    )
    grpc_port: int | None = None  # its gRPC port, when the container serves gRPC (an h2c port)


@dataclass
class Executor:
    custom: Any  # kubernetes.client.CustomObjectsApi
    core: Any  # kubernetes.client.CoreV1Api
    state_dir: Path
    namespace: str | None = None
    python: str = sys.executable
    targets_dir: Path | None = None  # file_sd targets for Prometheus, one file per predictor
    faults: Path | None = None  # planted faults (conveyor_devstack.faults)
    trainings: dict[str, TrainingProcess] = field(default_factory=dict)
    predictors: dict[tuple[str, str, str], PredictorProcess] = field(default_factory=dict)
    # A predictor whose env changed: its replacement, which takes over once Ready (a rolling update).
    successors: dict[tuple[str, str, str], PredictorProcess] = field(default_factory=dict)
    retiring: list[tuple[float, subprocess.Popen[bytes]]] = field(default_factory=list)
    # The versions each router sends traffic to: kept until a version of the new spec is Ready (a rolling
    # update keeps the old pods, Knative the old revision, until then).
    serving: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    routers: RouterHost = field(default_factory=RouterHost)

    # ------------------------------------------------------------------ plumbing

    def _list(self, group: str, version: str, plural: str) -> list[dict[str, Any]]:
        if self.namespace:
            return self.custom.list_namespaced_custom_object(group, version, self.namespace, plural)["items"]
        return self.custom.list_cluster_custom_object(group, version, plural)["items"]

    def _patch_status(self, gvr: tuple[str, str, str], obj: dict[str, Any], status: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            gvr[0], gvr[1], meta["namespace"], gvr[2], meta["name"], {"status": status}
        )

    # ------------------------------------------------------------------ KubeRay's part

    def _run_config(self, rayjob: dict[str, Any]) -> str:
        volumes = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("volumes", [])
        for volume in volumes:
            if "configMap" in volume:
                cm = self.core.read_namespaced_config_map(
                    volume["configMap"]["name"], rayjob["metadata"]["namespace"]
                )
                for value in (cm.data or {}).values():
                    return value
        raise ValueError("the RayJob mounts no ConfigMap holding run.json")

    def sync_rayjobs(self) -> None:
        for rayjob in self._list(*RAY):
            uid = rayjob["metadata"]["uid"]
            status = rayjob.get("status") or {}
            if uid in self.trainings:
                self._follow_training(rayjob, self.trainings[uid])
            elif not status.get("jobDeploymentStatus") and not rayjob["spec"].get("suspend"):
                self._start_training(rayjob)
            elif status.get("jobDeploymentStatus") in ("Initializing", "Running"):
                # Started by an executor that is gone: its process is lost, as a Ray head's would be.
                self._patch_status(
                    RAY,
                    rayjob,
                    {
                        "jobStatus": "FAILED",
                        "jobDeploymentStatus": "Failed",
                        "endTime": _now(),
                        "reason": "AppFailed",
                        "message": "the local executor restarted while this job ran",
                    },
                )

    def _submission_failed(self, rayjob: dict[str, Any], message: str) -> None:
        """The job never started: failed at submission, as KubeRay reports it."""
        now = _now()
        self._patch_status(
            RAY,
            rayjob,
            {
                "jobStatus": "FAILED",
                "jobDeploymentStatus": "Failed",
                "startTime": now,
                "endTime": now,
                "reason": "SubmissionFailed",
                "message": message,
            },
        )

    def _start_training(self, rayjob: dict[str, Any]) -> None:
        meta = rayjob["metadata"]
        workdir = self.state_dir / "rayjobs" / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            module = _entrypoint_module(rayjob["spec"].get("entrypoint", ""))
            (workdir / "run.json").write_text(self._run_config(rayjob))
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's failure
            if getattr(exc, "status", None) == 404 and "configmaps" in str(getattr(exc, "body", "")):
                # The run's ConfigMap is owned by the RayJob, so it is written just after it: a kubelet keeps
                # the head pod in ContainerCreating until the volume's ConfigMap exists; so do we (next sync).
                return
            self._submission_failed(rayjob, str(exc))
            return
        log_path = workdir / "job.log"
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        try:  # the entrypoint runs on the head: its container's env and envFrom, resolved as a kubelet would
            pod_env = container_env(self.core, head, meta["namespace"], f"{meta['name']}-head")
        except Exception as exc:  # noqa: BLE001 - a pod that cannot start fails the job's start
            self._submission_failed(rayjob, f"head pod: {exc}")
            return
        # cwd is the job's own folder, as in a Ray head pod: never the repository root.
        proc = subprocess.Popen(
            [
                self.python,
                "-m",
                module,
                "--config",
                str(workdir / "run.json"),
                *_entrypoint_flags(rayjob["spec"].get("entrypoint", "")),
            ],
            cwd=workdir,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **pod_env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.trainings[meta["uid"]] = TrainingProcess(proc, log_path)
        log.info(
            "started RayJob %s/%s as pid %d (log %s)", meta["namespace"], meta["name"], proc.pid, log_path
        )
        self._patch_status(
            RAY,
            rayjob,
            {
                "jobDeploymentStatus": "Running",
                "jobStatus": "RUNNING",
                "startTime": _now(),
                "jobId": f"{meta['name']}-local",
                "rayClusterName": f"{meta['name']}-local",
            },
        )

    def _follow_training(self, rayjob: dict[str, Any], training: TrainingProcess) -> None:
        code = training.proc.poll()
        if code is None:
            return
        meta = rayjob["metadata"]
        del self.trainings[meta["uid"]]
        if code == 0:
            status = {
                "jobStatus": "SUCCEEDED",
                "jobDeploymentStatus": "Complete",
                "endTime": _now(),
                "succeeded": 1,
            }
        else:
            tail = training.log_path.read_text(errors="replace")[-MESSAGE_TAIL:]
            status = {
                "jobStatus": "FAILED",
                "jobDeploymentStatus": "Failed",
                "endTime": _now(),
                "failed": 1,
                "reason": "AppFailed",
                "message": f"exit code {code}: {tail.strip()}",
            }
        log.info("RayJob %s/%s finished: %s", meta["namespace"], meta["name"], status["jobStatus"])
        self._patch_status(RAY, rayjob, status)

    # ------------------------------------------------------------------ KServe's part

    @staticmethod
    def _versions(isvc: dict[str, Any]) -> list[tuple[str, str, int]]:
        """(version, storage URI, traffic percent) of each predictor the InferenceService names."""

        def of(predictor: dict[str, Any]) -> tuple[str, str]:
            env = {
                e["name"]: e.get("value", "")
                for c in predictor.get("containers", [])
                for e in c.get("env", [])
            }
            uri = env.get("STORAGE_URI") or (predictor.get("model") or {}).get("storageUri", "")
            return env.get("CONVEYOR_MODEL_VERSION") or uri.rstrip("/").rsplit("/", 1)[-1], uri

        spec = isvc["spec"]
        predictor = spec["predictor"]
        annotations = isvc["metadata"].get("annotations") or {}
        if spec.get("canary"):  # Standard mode: the stable predictor and every canary[] entry
            canaries = [(*of(c["predictor"]), int(c.get("trafficPercent", 0))) for c in spec["canary"]]
            return [(*of(predictor), 100 - sum(w for _, _, w in canaries)), *canaries]
        version, uri = of(predictor)
        weight = predictor.get("canaryTrafficPercent")
        stable = annotations.get("conveyor.dev/stable-version")
        if weight is None or stable in (None, version):
            return [(version, uri, 100)]
        # Knative: the previous revision (the stable version) keeps the rest of the traffic.
        stable_uri = uri.rstrip("/").rsplit("/", 1)[0] + "/" + stable
        return [(stable, stable_uri, 100 - int(weight)), (version, uri, int(weight))]

    def _ensure_predictor(self, isvc: dict[str, Any], version: str, uri: str) -> PredictorProcess:
        meta = isvc["metadata"]
        key = (meta["namespace"], meta["name"], version)
        running = self.predictors.get(key)
        container = self._container(isvc, version)
        if container is None:
            if running is not None and running.proc.poll() is None:
                return running  # Knative's previous revision: not in the spec any more, never changed
            container = (isvc["spec"]["predictor"].get("containers") or [{}])[0]
        # env and envFrom (Secrets, ConfigMaps) as a kubelet resolves them; a missing Secret raises and
        # the sync retries, as a pod waits in CreateContainerConfigError.
        env = container_env(self.core, container, meta["namespace"], f"{meta['name']}-predictor-{version}")
        digest = json.dumps(sorted(env.items()))
        if running is not None and running.proc.poll() is None:
            if running.env_digest == digest:
                if (stale := self.successors.pop(key, None)) is not None:
                    self._stop(stale.proc)
                return running
            # The pod template changed: start the new one beside the old, which serves until it is Ready.
            successor = self.successors.get(key)
            if successor is None or successor.proc.poll() is not None or successor.env_digest != digest:
                if successor is not None:
                    self._stop(successor.proc)
                self.successors[key] = self._start_predictor(meta, key, version, uri, env, digest, container)
            elif self._ready(key, successor, scrape=False):
                self.retiring.append((time.monotonic(), running.proc))
                self.predictors[key] = self.successors.pop(key)
                self._ready(key, self.predictors[key])
                log.info("rolled predictor %s/%s %s to its new env", *key)
            return self.predictors[key]
        self.predictors[key] = self._start_predictor(meta, key, version, uri, env, digest, container)
        return self.predictors[key]

    @staticmethod
    def _container(isvc: dict[str, Any], version: str) -> dict[str, Any] | None:
        """The container of the predictor (or canary entry) that serves `version`; None when the spec
        names it only as Knative's previous revision."""
        spec = isvc["spec"]
        for predictor in [spec["predictor"], *(c.get("predictor") or {} for c in spec.get("canary") or [])]:
            for c in predictor.get("containers") or []:
                if any(
                    e.get("name") == "CONVEYOR_MODEL_VERSION" and e.get("value") == version
                    for e in c.get("env", [])
                ):
                    return c
        return None

    def _start_predictor(
        self,
        meta: dict[str, Any],
        key: tuple[str, str, str],
        version: str,
        uri: str,
        env: dict[str, str],
        digest: str,
        container: dict[str, Any],
    ) -> PredictorProcess:
        port = _free_port()
        # A port named h2c is the one KServe and Knative speak HTTP/2 (gRPC) to (the operator's grpc-v2).
        grpc_port = (
            _free_port() if any(p.get("name") == "h2c" for p in container.get("ports") or []) else None
        )
        log_path = self.state_dir / "predictors" / f"{meta['namespace']}-{meta['name']}-{version}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        module = "conveyor.runtime.serve"
        if self.faults is not None:  # the same server, with the planted-fault middleware inside
            module = "conveyor_devstack.faults"
            env |= {faults.ENV_FILE: str(self.faults), faults.ENV_KEY: faults.fault_key(*key)}
        proc = subprocess.Popen(
            [
                self.python,
                "-m",
                module,
                "--model-dir",
                uri,
                "--name",
                meta["name"],
                "--http-port",
                str(port),
                "--host",
                "127.0.0.1",
                *(["--grpc-port", str(grpc_port)] if grpc_port else []),
            ],
            cwd=log_path.parent,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        log.info("serving %s/%s %s on 127.0.0.1:%d (pid %d, log %s)", *key, port, proc.pid, log_path)
        return PredictorProcess(proc, port, log_path, env_digest=digest, grpc_port=grpc_port)

    def _ready(self, key: tuple[str, str, str], predictor: PredictorProcess, scrape: bool = True) -> bool:
        if predictor.ready and not scrape:
            return True
        if predictor.ready and predictor.scraped:
            return True
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{predictor.port}/v2/models/{key[1]}/ready", timeout=1
            ) as r:
                predictor.ready = r.status == 200
        except OSError:
            predictor.ready = False
        if predictor.ready and scrape:
            predictor.scraped = True
        if predictor.ready and scrape and self.targets_dir is not None:
            # Scraped from Ready on, as a pod joins its ServiceMonitor/PodMonitor once it runs.
            write_targets(
                self.targets_dir,
                _target_name(key),
                [f"127.0.0.1:{predictor.port}"],
                {"namespace": key[0], "inferenceservice": key[1], "component": "predictor"},
            )
        return predictor.ready

    @staticmethod
    def _effective(versions: list[tuple[str, str, int]], ready: dict[str, int]) -> dict[str, int]:
        """The split actually served: the spec's weights once every version is Ready; until then the
        Ready ones carry all the traffic (Knative routes only to ready revisions; a Service without
        ready endpoints gets none)."""
        if len(ready) == len(versions):
            return {v: p for v, _, p in versions}
        return {v: (100 if i == 0 else 0) for i, v in enumerate(ready)}

    def _routes(self) -> dict[str, list[dict[str, Any]]]:
        """The HTTPRoutes by namespace; none where the cluster serves no Gateway API."""
        try:
            items = self._list(*GATEWAY)
        except Exception as e:  # noqa: BLE001 - kubernetes' ApiException: 404 when the CRD is not installed
            if getattr(e, "status", None) == 404:
                return {}
            raise
        out: dict[str, list[dict[str, Any]]] = {}
        for route in items:
            out.setdefault(route["metadata"]["namespace"], []).append(route)
        return out

    @staticmethod
    def _gateway_split(
        isvc: dict[str, Any], versions: list[tuple[str, str, int]], routes: list[dict[str, Any]]
    ) -> dict[str, int] | None:
        """Standard mode: what the gateway sends each version (see the module docstring); None in Knative mode."""
        mode = (isvc["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode")
        if mode not in ("Standard", "RawDeployment"):
            return None
        spec, name = isvc["spec"], isvc["metadata"]["name"]
        predictors = [spec["predictor"], *(c.get("predictor") or {} for c in spec.get("canary") or [])]
        services = {
            f"{name}-{p['name']}-predictor": v
            for p, (v, _, _) in zip(predictors, versions, strict=True)
            if p.get("name")
        }
        return route_weights(routes, services) or {versions[0][0]: 100}

    def _serve(self, isvc: dict[str, Any], routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Start the predictors of every version, route to the ready ones; the status KServe would write."""
        meta = isvc["metadata"]
        versions = self._versions(isvc)
        ready: dict[str, int] = {}  # version -> port, Ready ones in spec order
        grpc_ports: dict[str, int] = {}  # version -> gRPC port, of the Ready ones that serve gRPC
        failure = None
        for version, uri, _ in versions:
            key = (meta["namespace"], meta["name"], version)
            predictor = self._ensure_predictor(isvc, version, uri)
            if predictor.proc.poll() is not None:
                failure = predictor.log_path.read_text(errors="replace")[-MESSAGE_TAIL:].strip()
            elif self._ready(key, predictor):
                ready[version] = predictor.port
                if predictor.grpc_port:
                    grpc_ports[version] = predictor.grpc_port
        weights = self._effective(versions, ready)
        gateway = self._gateway_split(isvc, versions, routes or [])
        sent = weights if gateway is None else {v: gateway.get(v, 0) for v in ready}
        router = self.routers.ensure((meta["namespace"], meta["name"]), meta["name"])
        if ready or not self.serving.get((meta["namespace"], meta["name"])):
            self.serving[(meta["namespace"], meta["name"])] = set(ready)
            self.routers.set_backends(
                (meta["namespace"], meta["name"]),
                [
                    Backend(
                        v,
                        f"http://127.0.0.1:{port}",
                        sent[v],
                        f"127.0.0.1:{grpc_ports[v]}" if v in grpc_ports else None,
                    )
                    for v, port in ready.items()
                ],
            )
        latest = versions[-1][0]
        traffic = [
            {
                "revisionName": f"{meta['name']}-predictor-{v}",
                "tag": v,
                "percent": weights[v],
                "latestRevision": v == latest,
                "url": f"http://127.0.0.1:{port}",
            }
            for v, port in ready.items()
        ]
        all_ready = len(ready) == len(versions)
        reason = None if all_ready else ("PredictorFailed" if failure else "PredictorNotReady")
        conditions = [
            {
                "type": t,
                "status": "True" if all_ready else "False",
                "lastTransitionTime": _now(),
                **({"reason": reason, "message": failure or "the model server is loading"} if reason else {}),
            }
            for t in ("PredictorReady", "IngressReady", "Ready")
        ]
        predictor_status: dict[str, Any] = {
            "traffic": traffic,
            "url": router.url,
            "latestReadyRevision": traffic[-1]["revisionName"] if traffic else None,
        }
        if router.grpc_url:  # KServe's gRPC address of the predictor: the router's gRPC port here
            predictor_status["grpcUrl"] = router.grpc_url
        status: dict[str, Any] = {
            "url": router.url,
            "address": {"url": router.url},
            "observedGeneration": meta.get("generation"),
            "conditions": conditions,
            "components": {"predictor": predictor_status},
        }
        canaries = isvc["spec"].get("canary") or []
        if canaries:  # Standard mode, as KServe v0.20 reports its canary entries
            status["canaryStatuses"] = [
                {
                    "name": c["predictor"].get("name") or f"{meta['name']}-canary",
                    "ready": v in ready,
                    "trafficPercent": weights.get(v, 0),
                }
                for c, (v, _, _) in zip(canaries, versions[1:], strict=True)
            ]
        elif len(versions) == 1 and all_ready:
            predictor_status["latestRolledoutRevision"] = traffic[0]["revisionName"]
        return status

    def sync_inference_services(self) -> None:
        wanted: set[tuple[str, str, str]] = set()
        services: set[tuple[str, str]] = set()
        routes = self._routes()
        for isvc in self._list(*KSERVE):
            meta = isvc["metadata"]
            services.add((meta["namespace"], meta["name"]))
            wanted.update((meta["namespace"], meta["name"], v) for v, _, _ in self._versions(isvc))
            status = self._serve(isvc, routes.get(meta["namespace"], []))
            old = isvc.get("status") or {}
            if _comparable(old) != _comparable(status):
                self._patch_status(KSERVE, isvc, status)
        for key in [k for k in self.successors if k not in wanted]:
            self._stop(self.successors.pop(key).proc)
        now = time.monotonic()
        for since, proc in [r for r in self.retiring if now - r[0] > 2]:  # in-flight requests finished
            self.retiring.remove((since, proc))
            self._stop(proc)
        for key in [k for k in self.serving if k not in services]:
            del self.serving[key]
        for key in list(self.predictors):
            if key not in wanted and key[2] not in self.serving.get(key[:2], ()):
                self._stop(self.predictors.pop(key).proc)
                if self.targets_dir is not None:
                    remove_targets(self.targets_dir, _target_name(key))
                log.info("stopped predictor %s/%s %s", *key)
        for key in [k for k in self.routers.routers if k not in services]:
            self.routers.remove(key)

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def shutdown(self) -> None:
        self.routers.shutdown()
        for proc in [*(p.proc for p in self.successors.values()), *(proc for _, proc in self.retiring)]:
            self._stop(proc)
        for key, p in self.predictors.items():
            self._stop(p.proc)
            if self.targets_dir is not None:
                remove_targets(self.targets_dir, _target_name(key))
        for t in self.trainings.values():
            self._stop(t.proc)

    def run_forever(self, interval: float = 1.0) -> None:
        while True:
            for sync in (self.sync_rayjobs, self.sync_inference_services):
                try:
                    sync()
                except Exception:  # noqa: BLE001 - a fake controller keeps going, like the real ones
                    log.exception("%s failed; retrying", sync.__name__)
            time.sleep(interval)


def _entrypoint_module(entrypoint: str) -> str:
    """The runtime module the RayJob's entrypoint runs (`python -m conveyor.runtime.train|batch`)."""
    args = shlex.split(entrypoint)
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else ""
    if module not in RUNTIME_ENTRYPOINTS:
        raise ValueError(
            f"entrypoint {entrypoint!r}: the local executor runs {sorted(RUNTIME_ENTRYPOINTS)} only"
        )
    return module


def _entrypoint_flags(entrypoint: str) -> list[str]:
    """The flags the RayJob's entrypoint passes after its run config (the config is written locally)."""
    args = shlex.split(entrypoint)
    return args[args.index("--config") + 2 :] if "--config" in args else []


def _target_name(key: tuple[str, str, str]) -> str:
    return "predictor_" + "_".join(key)


def _comparable(status: dict[str, Any]) -> str:
    """The status without timestamps, so an unchanged state is not written again."""
    stripped = json.loads(json.dumps(status))
    for c in stripped.get("conditions", []):
        c.pop("lastTransitionTime", None)
    return json.dumps(stripped, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conveyor_devstack.executor", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")
    parser.add_argument(
        "--state-dir", default=None, help="job folders and logs (default: a temporary folder)"
    )
    parser.add_argument(
        "--prometheus-targets",
        default=os.environ.get("CONVEYOR_PROMETHEUS_TARGETS"),
        help="file_sd directory of the local Prometheus: one targets file per running predictor "
        "(default $CONVEYOR_PROMETHEUS_TARGETS, as hack/prometheus.sh env exports)",
    )
    parser.add_argument(
        "--faults",
        default=None,
        help="planted-faults JSON file (see conveyor_devstack.faults); re-read when it changes",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from kubernetes import client, config

    api = config.new_client_from_config(config_file=args.kubeconfig)
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="conveyor-local-executor-"))
    executor = Executor(
        client.CustomObjectsApi(api),
        client.CoreV1Api(api),
        state,
        args.namespace,
        targets_dir=Path(args.prometheus_targets) if args.prometheus_targets else None,
        faults=Path(args.faults) if args.faults else None,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info(
        "local executor (a stand-in for the KubeRay and KServe controllers) watching %s; state in %s",
        args.namespace or "all namespaces",
        state,
    )
    try:
        executor.run_forever()
    finally:
        executor.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
