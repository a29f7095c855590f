"""The operator's machinery without a cluster: work queue, merge patches, conditions, argument parsing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable

import pytest

from conveyor.operator import conditions as c
from conveyor.operator.__main__ import parse_args
from conveyor.operator.kube import merge_patch, object_path
from conveyor.operator.workqueue import Requeue, WorkQueue


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
