"""Benchmark: the operator fanning 1,000 ModelDeployments and 1,000 MLPipelines out at once.

Measured in one run, on the real local kube-apiserver:
1. baseline: a plain client (the official Python client, 8 threads) creates the same 1,000
   InferenceServices and 1,000 RayJobs directly: the limit the operator can approach;
2. the operator (`python -m conveyor.operator`, its own process) with the 1,000 ModelDeployments and
   1,000 MLPipelines applied at once by the same kind of client: from each apply until its child exists
   (seen by watches started beforehand), p50/p99, until all exist, and the operator's API writes;
3. 60 s of idle with everything present: API writes by the operator (its own request counter, every
   non-GET request) and, as cross-checks, the apiserver's apiserver_request_total for our resources and
   its audit log (the operator's writes by verb, resource and object; the events posted, by reason);
4. the operator's resident memory (VmRSS, and the peak VmHWM) after it settled.
The `goals` block compares them with issue 15's targets: write rate >= 0.5 of the plain client's create
rate; last object applied to last child existing <= 2x the plain client's whole create time; p99;
idle writes 0; RSS < 150 MiB.

Run: `make bench` (pytest -m bench), or `python tests/bench/bench_operator.py [--count N] [--pipelines N] [--idle S]`
with KUBECONFIG pointing at the local control plane (`hack/local-cluster.sh up` prints it).
Writes tests/bench/results/operator.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from _operator_support import OperatorProcess, train, wait_for  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

RESULTS = ROOT / "tests" / "bench" / "results" / "operator.json"
THREADS = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(percentile(latencies, 0.5), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
        "mean_s": round(statistics.fmean(latencies), 3),
        "all_exist_s": round(max(latencies), 3),
        "per_second": round(len(latencies) / max(latencies), 1),
    }


class ChildWatch:
    """Records when each object of one kind in a namespace is first seen (ADDED)."""

    def __init__(self, api: client.ApiClient, namespace: str, group: str, version: str, plural: str) -> None:
        self.seen: dict[str, float] = {}
        self._api = client.CustomObjectsApi(api)
        self._args = (group, version, namespace, plural)
        self._watch = watch.Watch()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        listed = self._api.list_namespaced_custom_object(*self._args)
        self._ready.set()
        for ev in self._watch.stream(
            self._api.list_namespaced_custom_object,
            *self._args,
            resource_version=listed["metadata"]["resourceVersion"],
            timeout_seconds=900,
        ):
            self.seen.setdefault(ev["object"]["metadata"]["name"], time.monotonic())

    def stop(self) -> None:
        self._watch.stop()


def isvc_body(name: str, uri: str) -> dict[str, Any]:
    """What a user would write by hand for the same predictor (no operator)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "Knative"}},
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "ghcr.io/conveyor-ml/conveyor-runtime:0.1.0",
                        "command": ["python", "-m", "conveyor.runtime.serve"],
                        "args": ["--model-dir", "/mnt/models", "--name", name],
                        "env": [{"name": "STORAGE_URI", "value": uri}],
                    }
                ],
            }
        },
    }


def apiserver_writes(api: client.ApiClient) -> dict[str, float]:
    """apiserver_request_total for our kinds and their children, non-GET verbs, by verb/resource."""
    text = api.call_api(
        "/metrics", "GET", auth_settings=["BearerToken"], response_type="str", _preload_content=False
    )[0].data.decode()
    out: dict[str, float] = {}
    samples = (
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "apiserver_request_total"
    )
    for sample in samples:
        fields = sample.labels
        if fields.get("verb") in ("GET", "LIST", "WATCH", "CONNECT"):
            continue
        if fields.get("resource") not in ("modeldeployments", "inferenceservices", "events"):
            continue
        key = f"{fields['verb']} {fields['resource']}{'/' + fields['subresource'] if fields.get('subresource') else ''}"
        out[key] = out.get(key, 0.0) + sample.value
    return out


def audited_operator_writes(kubeconfig: str, namespace: str, since: str, until: str) -> dict[str, int]:
    """From the apiserver's audit log (hack/local-cluster.sh logs every write at Metadata level): the
    operator's writes (its User-Agent) in `namespace` received in [since, until), by verb, resource and
    object ("patch mlpipelines/status p0001"); events by verb only (their names are generated)."""
    log = Path(kubeconfig).parent / "logs" / "audit.log"
    out: dict[str, int] = {}
    if not log.exists():
        return out
    with log.open() as f:
        for line in f:
            if '"conveyor-operator/' not in line or namespace not in line:
                continue
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            when = event.get("requestReceivedTimestamp") or ""
            if (
                ref.get("namespace") != namespace
                or event.get("stage") != "ResponseComplete"
                or not since <= when < until
            ):
                continue
            resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            key = f"{event['verb']} {resource}" + ("" if resource == "events" else f" {ref.get('name', '')}")
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def events_posted(core: client.CoreV1Api, namespace: str, since: str, until: str) -> dict[str, int]:
    """Events the operator posted in `namespace` in [since, until), by involved kind and reason."""
    out: dict[str, int] = {}
    for e in core.list_namespaced_event(namespace).items:
        stamp = e.first_timestamp or e.event_time
        when = stamp.strftime("%Y-%m-%dT%H:%M:%S") if stamp else ""
        if (e.reporting_component or "") != "conveyor-operator" or not since[:19] <= when < until[:19]:
            continue
        key = f"{e.involved_object.kind} {e.reason}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1e6):06d}Z"


def proc_memory(pid: int) -> dict[str, float]:
    mem = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = round(int(rest.split()[0]) / 1024, 1)
    return {"rss_mib": mem.get("VmRSS", 0.0), "peak_rss_mib": mem.get("VmHWM", 0.0)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rayjob_body(name: str, registry: str) -> dict[str, Any]:
    """The RayJob the operator builds for run 1 of a pipeline, as a plain client would create it itself."""
    from conveyor.operator.mlpipeline.build import build_rayjob
    from conveyor.runtime.spec import MLPipelineSpec

    pipeline = {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "MLPipeline",
        "metadata": {"name": name, "namespace": "x", "uid": "u", "generation": 1},
        "spec": pipeline_spec(registry),
    }
    body = build_rayjob(pipeline, MLPipelineSpec.model_validate(pipeline["spec"]), 1)
    body["metadata"] = {
        "name": f"{name}-1",
        "labels": body["metadata"]["labels"],
    }  # no owner: nothing to collect it
    return body


def pipeline_spec(registry: str) -> dict[str, Any]:
    return {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": registry, "modelName": "fraud"},
        "evaluation": {"metric": "accuracy", "threshold": 0.9},
    }


def create_all(fn: Any, items: list[Any]) -> dict[Any, float]:
    """Create every item with the client's threads; when each create returned."""
    done: dict[Any, float] = {}

    def one(item: Any) -> None:
        fn(item)
        done[item] = time.monotonic()

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, items))
    return done


def run_benchmark(
    kubeconfig: str,
    count: int = 200,
    idle: float = 60.0,
    registry_dir: Path | None = None,
    operator_args: tuple[str, ...] = (),
    pipelines: int = 0,
) -> dict[str, Any]:
    """`count` ModelDeployments and `pipelines` MLPipelines at once, against a plain client creating the
    same InferenceServices and RayJobs itself."""
    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    api = config.new_client_from_config(config_file=kubeconfig)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    tag = uuid.uuid4().hex[:6]
    ns_direct, ns_op = f"bench-direct-{tag}", f"bench-op-{tag}"
    for ns in (ns_direct, ns_op):
        core.create_namespace({"metadata": {"name": ns}})
    registry_dir = registry_dir or Path(f"/tmp/conveyor-bench-{tag}")
    registry = f"file://{registry_dir}"
    version = train(registry, "fraud", pipeline="bench", namespace=ns_op, run=1, accuracy=0.9)
    uri = f"{registry}/fraud/{version}"
    md_names = [f"m{i:04d}" for i in range(count)]
    mlp_names = [f"p{i:04d}" for i in range(pipelines)]
    work = [("md", n) for n in md_names] + [("mlp", n) for n in mlp_names]
    op: OperatorProcess | None = None
    try:
        # 1. Baseline: the plain client creates the children itself.
        isvcs = ChildWatch(api, ns_direct, "serving.kserve.io", "v1beta1", "inferenceservices")
        rayjobs = ChildWatch(api, ns_direct, "ray.io", "v1", "rayjobs")
        t0 = time.monotonic()
        create_all(
            lambda w: custom.create_namespaced_custom_object(
                *(
                    ("serving.kserve.io", "v1beta1", ns_direct, "inferenceservices", isvc_body(w[1], uri))
                    if w[0] == "md"
                    else ("ray.io", "v1", ns_direct, "rayjobs", rayjob_body(w[1], registry))
                )
            ),
            work,
        )
        wait_for(
            "all direct children seen", lambda: len(isvcs.seen) + len(rayjobs.seen) == len(work), timeout=600
        )
        direct_seen = {**isvcs.seen, **{n.removesuffix("-1"): t for n, t in rayjobs.seen.items()}}
        for w in (isvcs, rayjobs):
            w.stop()
        direct = summary([direct_seen[n] - t0 for _, n in work])

        # 2. The operator: the ModelDeployments and MLPipelines applied at once.
        op = OperatorProcess(kubeconfig, ns_op, *operator_args).start()
        cpu_before, writes_before = cpu_seconds(op.proc.pid), op.writes()  # type: ignore[union-attr]
        isvcs = ChildWatch(api, ns_op, "serving.kserve.io", "v1beta1", "inferenceservices")
        rayjobs = ChildWatch(api, ns_op, "ray.io", "v1", "rayjobs")
        md_spec = {"model": {"registryUri": registry, "name": "fraud", "version": version}}
        t0 = time.monotonic()
        applied = create_all(
            lambda w: custom.create_namespaced_custom_object(
                "conveyor.dev",
                "v1alpha1",
                ns_op,
                *(
                    (
                        "modeldeployments",
                        {
                            "apiVersion": "conveyor.dev/v1alpha1",
                            "kind": "ModelDeployment",
                            "metadata": {"name": w[1]},
                            "spec": md_spec,
                        },
                    )
                    if w[0] == "md"
                    else (
                        "mlpipelines",
                        {
                            "apiVersion": "conveyor.dev/v1alpha1",
                            "kind": "MLPipeline",
                            "metadata": {"name": w[1]},
                            "spec": pipeline_spec(registry),
                        },
                    )
                ),
            ),
            work,
        )
        applied_s = time.monotonic() - t0
        wait_for(
            "all operator children seen",
            lambda: len(isvcs.seen) + len(rayjobs.seen) == len(work),
            timeout=900,
            interval=0.5,
        )
        seen = {**isvcs.seen, **{n.removesuffix("-1"): t for n, t in rayjobs.seen.items()}}
        for w in (isvcs, rayjobs):
            w.stop()
        operator = summary([seen[n] - t0 for _, n in work])
        per_object = summary([seen[n] - applied[w] for w in work for n in [w[1]]])
        per_kind = {
            kind: summary([seen[w[1]] - applied[w] for w in work if w[0] == kind])
            for kind in ("md", "mlp")
            if any(w[0] == kind for w in work)
        }

        def settled() -> bool:
            mds = custom.list_namespaced_custom_object("conveyor.dev", "v1alpha1", ns_op, "modeldeployments")[
                "items"
            ]
            mlps = custom.list_namespaced_custom_object("conveyor.dev", "v1alpha1", ns_op, "mlpipelines")[
                "items"
            ]
            return (
                all((i.get("status") or {}).get("stableVersion") == version for i in mds)
                and len(mds) == count
                and all((i.get("status") or {}).get("lastRun") == 1 for i in mlps)
                and len(mlps) == pipelines
            )

        wait_for("every object's status written", settled, timeout=600, interval=1)
        burst_s = max(seen.values()) - t0
        burst_writes = op.writes() - writes_before
        fanout_cpu = cpu_seconds(op.proc.pid) - cpu_before  # type: ignore[union-attr]
        time.sleep(5)  # let the last watch events of our own writes come back and be reconciled

        # 3. Idle.
        op_before, api_before, idle_from = op.writes(), apiserver_writes(api), utc_now()
        time.sleep(idle)
        op_after, api_after, idle_until = op.writes(), apiserver_writes(api), utc_now()
        time.sleep(1)  # the audit log's last lines
        idle_audited = audited_operator_writes(kubeconfig, ns_op, idle_from, idle_until)
        idle_events = events_posted(core, ns_op, idle_from, idle_until)
        api_delta = {k: api_after.get(k, 0) - api_before.get(k, 0) for k in set(api_after) | set(api_before)}
        memory = proc_memory(op.proc.pid)  # type: ignore[union-attr]
        reconciles = op.metric("conveyor_reconcile_total")
        api_latency = {
            verb: round(
                1000
                * op.metric("conveyor_api_request_duration_seconds_sum", verb=verb)
                / max(1.0, op.metric("conveyor_api_request_duration_seconds_count", verb=verb)),
                1,
            )
            for verb in ("GET", "PATCH", "POST")
        }
        direct_rate = len(work) / direct["all_exist_s"]
        operator_write_rate = burst_writes / burst_s
        last_applied_to_last_child = operator["all_exist_s"] - applied_s
        result = {
            "benchmark": "operator fan-out: ModelDeployment -> InferenceService, MLPipeline -> RayJob",
            "modeldeployments": count,
            "mlpipelines": pipelines,
            "client_threads": THREADS,
            "direct_create": direct,
            "operator": {
                **operator,
                "apply_all_s": round(applied_s, 3),
                "apply_to_child_exists_per_object": per_object,
                "apply_to_child_exists_by_kind": {
                    {"md": "ModelDeployment->InferenceService", "mlp": "MLPipeline->RayJob"}[k]: v
                    for k, v in per_kind.items()
                },
                "api_writes_during_burst": burst_writes,
                "cpu_seconds_until_settled": round(fanout_cpu, 2),
                "args": list(operator_args),
            },
            "operator_vs_direct_all_exist": round(operator["all_exist_s"] / direct["all_exist_s"], 2),
            "goals": {
                "write_rate_vs_direct_create_rate": {
                    "value": round(operator_write_rate / direct_rate, 2),
                    "goal": ">= 0.5",
                },
                "last_applied_to_last_child_vs_direct_create_time": {
                    "value": round(last_applied_to_last_child / direct["all_exist_s"], 2),
                    "goal": "<= 2",
                },
                "p99_apply_to_child_exists_s": per_object["p99_s"],
                "idle_api_writes": {"value": op_after - op_before, "goal": "0"},
                "rss_mib": {"value": memory["rss_mib"], "goal": "< 150"},
            },
            "idle": {
                "seconds": idle,
                "operator_api_writes": op_after - op_before,
                "apiserver_writes_on_our_resources": {k: v for k, v in sorted(api_delta.items()) if v},
                "operator_writes_audited": dict(list(idle_audited.items())[:20]),
                "operator_writes_audited_total": sum(idle_audited.values()),
                "events_posted_by_kind_reason": idle_events,
                "note": "apiserver figures count every client on the shared local cluster; the operator's own counter counts only its requests",
            },
            "operator_memory": memory,
            "operator_reconciles_total": reconciles,
            "operator_mean_api_latency_ms_by_verb": api_latency,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                # Shared by other work: the ratios against the baseline measured in the same run are what count.
                "loadavg_at_start": loadavg_start,
                "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
            },
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if op is not None:
            op.stop()
        for ns, plural, group, ver in (
            (ns_op, "modeldeployments", "conveyor.dev", "v1alpha1"),
            (ns_op, "mlpipelines", "conveyor.dev", "v1alpha1"),
            (ns_op, "inferenceservices", "serving.kserve.io", "v1beta1"),
            (ns_op, "rayjobs", "ray.io", "v1"),
            (ns_direct, "inferenceservices", "serving.kserve.io", "v1beta1"),
            (ns_direct, "rayjobs", "ray.io", "v1"),
        ):
            with contextlib.suppress(client.ApiException):
                custom.delete_collection_namespaced_custom_object(group, ver, ns, plural)
        for ns in (ns_direct, ns_op):
            with contextlib.suppress(client.ApiException):
                core.delete_namespace(ns)
        api.close()


@pytest.mark.bench
@pytest.mark.cluster
def test_bench_operator(kubeconfig: str, tmp_path: Path) -> None:
    count = int(os.environ.get("CONVEYOR_BENCH_OBJECTS", "1000"))
    result = run_benchmark(kubeconfig, count=count, pipelines=count, registry_dir=tmp_path / "registry")
    print(json.dumps(result, indent=2))
    assert (result["modeldeployments"], result["mlpipelines"]) == (count, count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=1000, help="ModelDeployments")
    p.add_argument("--pipelines", type=int, default=1000, help="MLPipelines")
    p.add_argument("--idle", type=float, default=60.0)
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--operator-arg", action="append", default=[], help="extra operator flag (repeatable)")
    args = p.parse_args()
    kubeconfig = (
        args.kubeconfig
        or subprocess.run(
            [str(ROOT / "hack" / "local-cluster.sh"), "up"], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    print(
        json.dumps(
            run_benchmark(
                kubeconfig,
                args.count,
                args.idle,
                operator_args=tuple(args.operator_arg),
                pipelines=args.pipelines,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
