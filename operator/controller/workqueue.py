"""A level-triggered work queue, as controller-runtime's: keys, not events.

Watch events only say "look at this object again". Each key sits in the queue at most once (the
earliest due time wins), is never reconciled by two workers at once (a key added while in flight is
redone right after), and a reconcile that raises is retried with capped exponential backoff, so a
persistent failure costs one attempt per backoff step, never a hot loop. A reconcile may ask to be
called again after N seconds (the cron schedule uses this).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from conveyor.operator.controller import metrics

log = logging.getLogger("conveyor.operator.workqueue")

K = TypeVar("K", bound=Hashable)


class Requeue(Exception):  # noqa: N818 - a signal, not an error
    """Reconcile again soon (after a 409: the object was re-read)."""

    def __init__(self, after: float = 0.0) -> None:
        super().__init__(f"requeue after {after}s")
        self.after = after


class WorkQueue(Generic[K]):
    """Keys of type K (for our kinds, (namespace, name)); `reconcile(key)` returns seconds until the next
    look, or None."""

    def __init__(
        self,
        kind: str,
        reconcile: Callable[[K], Awaitable[float | None]],
        *,
        workers: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 300.0,
    ) -> None:
        self.kind = kind
        self._reconcile = reconcile
        self._workers = workers
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._in_flight: set[K] = set()
        self._after_flight: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._due) + len(self._after_flight)

    def add(self, key: K, after: float = 0.0) -> None:
        due = time.monotonic() + max(0.0, after)
        if key in self._in_flight:
            self._after_flight[key] = min(due, self._after_flight.get(key, due))
            return
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        metrics.QUEUE_DEPTH.labels(self.kind).set(len(self))
        self._changed.set()

    def forget(self, key: K) -> None:
        """The object is gone: drop its backoff state (a queued entry finds nothing and returns)."""
        self._failures.pop(key, None)

    async def _next(self) -> K:
        while True:
            while self._heap:
                due, _, key = self._heap[0]
                if self._due.get(key) != due:  # superseded by an earlier add
                    heapq.heappop(self._heap)
                    continue
                wait = due - time.monotonic()
                if wait <= 0:
                    heapq.heappop(self._heap)
                    del self._due[key]
                    metrics.QUEUE_DEPTH.labels(self.kind).set(len(self))
                    return key
                break
            else:
                wait = None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait)

    async def _worker(self) -> None:
        while True:
            key = await self._next()
            if key in self._in_flight:  # another worker has it: redo after
                self._after_flight[key] = time.monotonic()
                continue
            self._in_flight.add(key)
            started = time.monotonic()
            result = "ok"
            try:
                after = await self._reconcile(key)
                self._failures.pop(key, None)
                if after is not None:
                    self._after_flight[key] = min(time.monotonic() + after, self._after_flight.get(key, float("inf")))
            except Requeue as r:
                result = "conflict"
                self._after_flight[key] = min(time.monotonic() + r.after, self._after_flight.get(key, float("inf")))
            except asyncio.CancelledError:
                raise
            except Exception:
                result = "error"
                n = self._failures[key] = self._failures.get(key, 0) + 1
                delay = min(self._backoff_cap, self._backoff_base * 2 ** (n - 1)) * (0.75 + random.random() / 2)
                log.exception("%s %s: reconcile failed (attempt %d), retrying in %.1fs", self.kind, key, n, delay)
                metrics.RECONCILE_ERRORS.labels(self.kind).inc()
                # Events seen during the failed attempt do not cut the backoff short; a later event
                # (say, the spec fixed) does.
                self._after_flight[key] = max(time.monotonic() + delay, self._after_flight.get(key, 0.0))
            finally:
                metrics.RECONCILES.labels(self.kind, result).inc()
                metrics.RECONCILE_DURATION.labels(self.kind).observe(time.monotonic() - started)
                self._in_flight.discard(key)
                if key in self._after_flight:
                    due = self._after_flight.pop(key)
                    self.add(key, due - time.monotonic())

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"{self.kind}-worker-{i}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def drain(self, timeout: float) -> bool:
        """For tests and shutdown: wait until nothing is queued or in flight (True) or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._due and not self._in_flight and not self._after_flight:
                return True
            await asyncio.sleep(0.05)
        return False
