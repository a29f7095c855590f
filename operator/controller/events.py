"""Events for transitions, posted in the background: best-effort, so a reconcile never waits on them.

A few posters work the queue at once (`concurrency`): one alone, at one round trip per event, fell
minutes behind a burst of 2,000 new objects and was still posting their events long after every status
had settled, as if the operator kept writing while idle. Posting order across objects is not kept (each
event carries its own timestamp)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

log = logging.getLogger("conveyor.operator.events")

Event = tuple[str, str, str]  # (type Normal|Warning, CamelCase reason, message)


class EventSink(Protocol):
    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


class EventPoster:
    def __init__(self, sink: EventSink, concurrency: int = 8) -> None:
        self._sink = sink
        self._queue: asyncio.Queue[tuple[dict[str, Any], Event]] = asyncio.Queue()
        self._concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []

    def post(self, obj: dict[str, Any], events: list[Event]) -> None:
        for event in events:
            self._queue.put_nowait((obj, event))
            _log(obj, event)
        if not events:
            return
        self._tasks = [t for t in self._tasks if not t.done()]
        while len(self._tasks) < min(self._concurrency, self._queue.qsize() + len(self._tasks)):
            self._tasks.append(asyncio.create_task(self._run(), name=f"events-{len(self._tasks)}"))

    async def _run(self) -> None:
        while True:
            obj, (type_, reason, message) = await self._queue.get()
            try:
                await self._sink.event(obj, type_, reason, message)
            finally:
                self._queue.task_done()

    async def drain(self, timeout: float = 5.0) -> None:
        """Let the queued events out (bounded), then stop."""
        if not self._tasks:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=timeout)
        for task in self._tasks:
            task.cancel()


def _log(obj: dict[str, Any], event: Event) -> None:
    """Each transition in the operator's log too (a Warning as a warning): events expire after an hour and
    are posted best-effort, the log is what a person reads after the fact."""
    type_, reason, message = event
    meta = obj.get("metadata") or {}
    log.log(
        logging.WARNING if type_ == "Warning" else logging.INFO,
        "%s/%s %s %s: %s",
        meta.get("namespace", ""),
        meta.get("name", ""),
        obj.get("kind", ""),
        reason,
        message,
    )
