"""Events for transitions, posted by one background task: best-effort, so a reconcile never waits on
them and a burst (200 new objects) does not crowd out the writes that matter."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

Event = tuple[str, str, str]  # (type Normal|Warning, CamelCase reason, message)


class EventSink(Protocol):
    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


class EventPoster:
    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._queue: asyncio.Queue[tuple[dict[str, Any], Event]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def post(self, obj: dict[str, Any], events: list[Event]) -> None:
        for event in events:
            self._queue.put_nowait((obj, event))
        if events and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="events")

    async def _run(self) -> None:
        while True:
            obj, (type_, reason, message) = await self._queue.get()
            try:
                await self._sink.event(obj, type_, reason, message)
            finally:
                self._queue.task_done()

    async def drain(self, timeout: float = 5.0) -> None:
        """Let the queued events out (bounded), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=timeout)
        self._task.cancel()
