"""Dynamic batching: concurrent requests are gathered into one forward pass and answered individually.

A request (one or more rows) waits until the batch holds ``max_batch_size`` rows or ``max_latency_ms``
has passed since the first row of the batch arrived, whichever comes first. While a forward pass runs
(in a worker thread, so the event loop keeps accepting requests) new requests queue up; the next batch
is formed from them at once, so under load batches fill without waiting and under light load a lone
request waits at most ``max_latency_ms``. A request larger than ``max_batch_size`` runs as its own batch
(requests are never split, so every answer comes from one pass).

The server tells the batcher how many requests are on their way (received, not yet submitted:
``arriving``). When none is and the previous batch answered a single request, traffic is serial and
waiting cannot fill the batch, so it runs at once: a lone client pays no batching delay. Under
concurrency (previous batch shared) the wait stays, since the next requests are typically still on the
wire, not yet visible to the server.

A forward pass runs in the batcher's worker thread, so the loop keeps reading requests meanwhile. A model
whose passes take less than ``inline_below_ms`` (a small MLP: tens of microseconds) runs on the loop
instead: the hand-off to the thread and back (a future, a wake-up of the loop) would cost more than the
pass. The choice follows the last pass's duration, so a slow pass (a large batch) moves back to the
thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

RunBatch = Callable[[np.ndarray], Any]


@dataclass
class _Pending:
    inputs: Any
    future: asyncio.Future[Any]


def split_outputs(outputs: Any, sizes: list[int]) -> list[Any]:
    """Cut a batch's outputs (an array, or a tuple/dict of arrays, first axis = rows) back into requests."""
    bounds = np.cumsum([0, *sizes])
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if isinstance(outputs, tuple):
            pieces.append(tuple(o[lo:hi] for o in outputs))
        elif isinstance(outputs, dict):
            pieces.append({k: v[lo:hi] for k, v in outputs.items()})
        else:
            pieces.append(outputs[lo:hi])
    return pieces


def _concatenate(inputs: list[np.ndarray]) -> np.ndarray:
    return inputs[0] if len(inputs) == 1 else np.concatenate(inputs)


class DynamicBatcher:
    """Batches ``submit`` calls made on one event loop into calls of ``run_batch(inputs [B, ...])``.

    ``run_batch`` returns an array (or tuple/dict of arrays) whose first axis matches its input's; a batch
    that fails is rerun request by request, so each gets its own answer or error;
    ``on_batch(rows, requests)`` is told the size of every batch run (for the batch size histogram).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 32,
        max_latency_ms: float = 5.0,
        on_batch: Callable[[int, int], None] | None = None,
        inline_below_ms: float = 1.0,
        combine: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {max_batch_size}")
        if max_latency_ms < 0:
            raise ValueError(f"max batch latency must be >= 0 ms, got {max_latency_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.on_batch = on_batch
        self.inline_below_s = inline_below_ms / 1000.0
        # Requests' inputs -> one batch input, in the pass (default: np.concatenate of arrays).
        self.combine = combine or _concatenate
        self._last_pass_s = float("inf")  # the first pass runs in the thread
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._carry: _Pending | None = None
        # Requests the server is still reading/parsing (module docstring); None: not tracked, always wait.
        self.arriving: int | None = None
        self._last_requests = 0
        # One thread: forward passes run one at a time, in arrival order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")

    def _ensure_started(self) -> asyncio.Queue[_Pending]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # Started lazily on the loop that serves requests (uvicorn's), not the one that built us.
            self._loop = loop
            self._queue = asyncio.Queue()
            self._carry = None
            self._task = loop.create_task(self._run(), name="dynamic-batcher")
        assert self._queue is not None
        return self._queue

    async def submit(self, inputs: Any) -> Any:
        """Run ``inputs`` ([n, ...], n >= 1; anything with a length that ``combine`` takes) in the next
        batch; returns this request's outputs."""
        if len(inputs) == 0:
            raise ValueError("a request must hold at least one row")
        queue = self._ensure_started()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Pending(inputs, future))
        return await future

    async def _next_batch(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        first = self._carry if self._carry is not None else await queue.get()
        self._carry = None
        batch, rows = [first], len(first.inputs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_latency_s
        while rows < self.max_batch_size:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or (self.arriving == 0 and self._last_requests <= 1):
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + len(item.inputs) > self.max_batch_size:
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            rows += len(item.inputs)
        return batch

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(queue)
            live = [p for p in batch if not p.future.done()]  # a client that went away is skipped
            if not live:
                continue
            self._last_requests = len(live)
            try:
                outputs = await self._pass(loop, [p.inputs for p in live])
            except Exception as e:
                if len(live) == 1:
                    live[0].future.set_exception(e)
                    continue
                # One request's bad input must not fail its neighbours: each runs alone, and gets its own
                # answer or error.
                for p in live:
                    try:
                        self._answer([p], await self._pass(loop, [p.inputs]))
                    except Exception as e1:  # the loop keeps serving
                        if not p.future.done():
                            p.future.set_exception(e1)
                continue
            self._answer(live, outputs)

    async def _pass(self, loop: asyncio.AbstractEventLoop, inputs: list[Any]) -> Any:
        """One forward pass over ``inputs`` (combined in the pass): on the loop when passes are cheap."""
        if self._last_pass_s < self.inline_below_s:
            return self._timed(inputs)
        return await loop.run_in_executor(self._executor, self._timed, inputs)

    def _answer(self, live: list[_Pending], outputs: Any) -> None:
        sizes = [len(p.inputs) for p in live]
        pieces = split_outputs(outputs, sizes)
        if self.on_batch is not None:
            with contextlib.suppress(Exception):
                self.on_batch(sum(sizes), len(live))
        for p, piece in zip(live, pieces, strict=True):
            if not p.future.done():
                p.future.set_result(piece)

    def _timed(self, inputs: list[Any]) -> Any:
        """``run_batch`` on the combined inputs, its duration kept (timed where it runs, without the
        wait for the loop)."""
        t0 = time.perf_counter()
        try:
            return self.run_batch(self.combine(inputs))
        finally:
            self._last_pass_s = time.perf_counter() - t0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        self._executor.shutdown(wait=False)
