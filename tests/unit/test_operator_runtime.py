"""The operator's machinery without a cluster: work queue, merge patches, conditions, argument parsing."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Hashable

import pytest

from conveyor.operator.__main__ import parse_args
from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.client import object_path
from conveyor.operator.controller.status import merge_patch
from conveyor.operator.controller.workqueue import Requeue, WorkQueue


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_queue_deduplicates_and_serialises_keys() -> None:
    calls: Counter[Hashable] = Counter()
    in_flight: set[Hashable] = set()
    overlap = []

    async def reconcile(key: Hashable) -> None:
        if key in in_flight:
            overlap.append(key)
        in_flight.add(key)
        calls[key] += 1
        await asyncio.sleep(0.05)
        in_flight.discard(key)

    async def main() -> None:
        q = WorkQueue("t", reconcile, workers=4)
        for _ in range(20):
            q.add("a")
        q.add("b")
        q.start()
        await asyncio.sleep(0.01)
        q.add("a")  # while "a" is in flight: redone once after
        q.add("a")
        assert await q.drain(5)
        await q.stop()

    run(main())
    assert overlap == []
    assert calls == {"a": 2, "b": 1}


def test_queue_backs_off_failures_without_a_hot_loop() -> None:
    attempts: list[float] = []

    async def reconcile(key: Hashable) -> None:
        attempts.append(asyncio.get_running_loop().time())
        raise RuntimeError("apiserver says no")

    async def main() -> None:
        q = WorkQueue("t", reconcile, workers=2, backoff_base=0.1, backoff_cap=0.4)
        q.add("k")
        q.start()
        await asyncio.sleep(1.2)
        await q.stop()

    run(main())
    # 0, ~0.1, ~0.3, ~0.7, ~1.1: a handful, not thousands.
    assert 3 <= len(attempts) <= 7
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert all(g >= 0.07 for g in gaps)


def test_queue_requeue_after_and_conflict() -> None:
    seen: list[str] = []

    async def reconcile(key: Hashable) -> float | None:
        seen.append(str(key))
        if key == "cron" and seen.count("cron") == 1:
            return 0.1
        if key == "conflict" and seen.count("conflict") == 1:
            raise Requeue(0.0)
        return None

    async def main() -> None:
        q = WorkQueue("t", reconcile, workers=1)
        q.add("cron")
        q.add("conflict")
        q.start()
        await asyncio.sleep(0.4)
        await q.stop()

    run(main())
    assert seen.count("cron") == 2 and seen.count("conflict") == 2


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, None),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"x": {"y": 1, "z": 2}}, {"x": {"y": 1, "z": 3}}, {"x": {"z": 3}}),
        ({"l": [1, 2]}, {"l": [1, 2, 3]}, {"l": [1, 2, 3]}),
        ({}, {"phase": "Running"}, {"phase": "Running"}),
        ({"m": {"accuracy": 1}}, {"m": {"accuracy": 1.0}}, None),  # the apiserver turns 1.0 into 1
    ],
)
def test_merge_patch(old: dict, new: dict, patch: dict | None) -> None:
    assert merge_patch(old, new) == patch


def test_object_paths() -> None:
    assert object_path({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "n"}}) == (
        "/api/v1/namespaces/n/configmaps/a"
    )
    assert object_path({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "p-1", "namespace": "n"}}) == (
        "/apis/ray.io/v1/namespaces/n/rayjobs/p-1"
    )


def test_condition_transition_time_moves_only_on_status_change() -> None:
    conds: list[dict] = []
    assert c.set_condition(conds, "Ready", "False", "A", "m", generation=1, now="t1")
    assert not c.set_condition(conds, "Ready", "False", "B", "m2", generation=2, now="t2")
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["reason"] == "B" and conds[0]["observedGeneration"] == 2
    assert c.set_condition(conds, "Ready", "True", "C", "m3", generation=2, now="t3")
    assert conds[0]["lastTransitionTime"] == "t3"
    with pytest.raises(ValueError, match="True, False or Unknown"):
        c.set_condition(conds, "Ready", "yes", "C", "m", generation=2, now="t4")


@pytest.mark.parametrize(
    ("argv", "namespaces"),
    [([], []), (["-n", "a", "--namespace", "b"], ["a", "b"]), (["-A"], [])],
)
def test_scope_flags(argv: list[str], namespaces: list[str]) -> None:
    assert parse_args(argv).namespace == namespaces


def test_scope_flags_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "a"])


# ---------------------------------------------------------------- the API client against a real HTTP server


AUTH_SEEN: list[str] = []


def serve_script(script: list[tuple[int, dict, dict]]):  # noqa: ANN201
    """An aiohttp server on 127.0.0.1 answering requests from a script of (status, headers, body)."""
    from aiohttp import web

    seen: list[tuple[str, str, str, str]] = []
    auth: list[str] = AUTH_SEEN
    auth.clear()

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs, request.headers.get("Content-Type", ""), await request.text()))
        auth.append(request.headers.get("Authorization", ""))
        status, headers, body = script.pop(0) if script else (200, {}, {})
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app, seen


async def with_client(script, fn):  # noqa: ANN001, ANN201
    import kopf
    from aiohttp import web

    from conveyor.operator.controller.client import ApiClient

    app, seen = serve_script(script)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    kube = ApiClient(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"), field_manager="test", backoff_base=0.01)
    try:
        return await fn(kube), seen
    finally:
        await kube.close()
        await runner.cleanup()


def test_client_retries_transient_errors_then_succeeds() -> None:
    script = [(503, {}, {"message": "etcd leader changed"}), (429, {"Retry-After": "0"}, {}), (200, {}, {"ok": 1})]
    result, seen = run(with_client(script, lambda k: k.request("GET", "/api/v1/namespaces")))
    assert result == {"ok": 1} and len(seen) == 3


def test_client_reads_credentials_again_after_401() -> None:
    import kopf

    async def call(k):  # noqa: ANN001, ANN202
        k.relogin = lambda: kopf.ConnectionInfo(server=k.server, token="rotated")
        return await k.request("GET", "/api")

    result, seen = run(with_client([(401, {}, {"message": "token expired"}), (200, {}, {"ok": 2})], call))
    assert result == {"ok": 2} and len(seen) == 2
    assert AUTH_SEEN == ["", "Bearer rotated"]


def test_client_does_not_retry_client_errors() -> None:
    from conveyor.operator.controller.client import ApiError, Conflict

    async def bad(k):  # noqa: ANN001, ANN202
        with pytest.raises(Conflict):
            await k.patch_status(
                {"apiVersion": "conveyor.dev/v1alpha1", "kind": "MLPipeline", "metadata": {"name": "p", "namespace": "n", "resourceVersion": "7"}},
                {"phase": "Running"},
            )
        with pytest.raises(ApiError, match="HTTP 422"):
            await k.request("POST", "/x")
        assert await k.get("/missing") is None

    _, seen = run(with_client([(409, {}, {"message": "conflict"}), (422, {}, {"message": "bad"}), (404, {}, {})], bad))
    assert len(seen) == 3
    method, path, ctype, body = seen[0]
    assert (method, ctype) == ("PATCH", "application/merge-patch+json")
    assert path == "/apis/conveyor.dev/v1alpha1/namespaces/n/mlpipelines/p/status?fieldManager=test"
    assert json.loads(body) == {"metadata": {"resourceVersion": "7"}, "status": {"phase": "Running"}}


def test_apply_is_server_side_apply_under_one_field_manager() -> None:
    manifest = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "p-1", "namespace": "n"}, "spec": {}}
    _, seen = run(with_client([(201, {}, manifest)], lambda k: k.apply(manifest)))
    method, path, ctype, _ = seen[0]
    assert method == "PATCH" and ctype == "application/apply-patch+yaml"
    assert path == "/apis/ray.io/v1/namespaces/n/rayjobs/p-1?fieldManager=test&force=true"


def test_spec_errors_name_the_field() -> None:
    from conveyor.operator.controller.validation import parse_spec as _parse
    from conveyor.runtime.spec import MLPipelineSpec, ModelDeploymentSpec

    spec, message = _parse(MLPipelineSpec, {"data": {"source": {"uri": "x"}}, "registry": {"uri": "file:///r"}, "training": {"numWorkers": "many"}})
    assert spec is None and message is not None
    assert "spec.registry.modelName" in message and "spec.training.numWorkers" in message
    spec, message = _parse(ModelDeploymentSpec, {"model": {"registryUri": "file:///r", "name": "m"}})
    assert spec is not None and message is None
