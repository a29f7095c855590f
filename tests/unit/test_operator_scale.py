"""What keeps the operator cheap with thousands of objects: events posted by several posters at once,
and one shared read of a namespace's Warning events for all the runs that look for why they are stuck."""

from __future__ import annotations

import asyncio
from typing import Any

from _fake_api import FakeApi

from conveyor.operator.controller.events import EventPoster
from conveyor.operator.controller.manager import Operator


class CountingApi(FakeApi):
    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list(self, path: str, **kw: Any) -> list[dict[str, Any]]:
        self.lists += 1
        return await super().list(path, **kw)


def event(name: str, type_: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": "ml"}, "type": type_}


def test_stalled_runs_share_one_read_of_the_namespace_warnings() -> None:
    async def main() -> None:
        api = CountingApi()
        api.put(event("a", "Warning"))
        api.put(event("b", "Normal"))
        op = Operator(client=api)
        try:
            reads = await asyncio.gather(*(op.warning_events("ml") for _ in range(50)))
            assert api.lists == 1  # fifty stalled runs, one LIST
            assert all([e["metadata"]["name"] for e in r] == ["a"] for r in reads)  # Warnings only
            await op.warning_events("ml", max_age=0.0)  # once it is older than max_age: read again
            assert api.lists == 2
        finally:
            await op.stop()

    asyncio.run(main())


def test_events_are_posted_by_several_posters_at_once() -> None:
    class Sink:
        def __init__(self) -> None:
            self.in_flight = self.most = self.posted = 0

        async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= 1
            self.posted += 1

    async def main() -> None:
        sink = Sink()
        poster = EventPoster(sink, concurrency=4)
        obj = {"metadata": {"name": "p", "namespace": "ml"}}
        for i in range(40):
            poster.post(obj, [("Normal", "RunStarted", f"run {i}")])
        await poster.drain(timeout=10)
        assert sink.posted == 40 and sink.most == 4  # never one at a time behind a burst, never more than 4

    asyncio.run(main())
