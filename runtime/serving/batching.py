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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

RunBatch = Callable[[np.ndarray], Any]


@dataclass
class _Pending:
    inputs: np.ndarray
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


class DynamicBatcher:
    """Batches ``submit`` calls made on one event loop into calls of ``run_batch(inputs [B, ...])``.

    ``run_batch`` returns an array (or tuple/dict of arrays) whose first axis matches its input's;
    ``on_batch(rows, requests)`` is told the size of every batch run (for the batch size histogram).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 32,
        max_latency_ms: float = 5.0,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {max_batch_size}")
        if max_latency_ms < 0:
            raise ValueError(f"max batch latency must be >= 0 ms, got {max_latency_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.on_batch = on_batch
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

    async def submit(self, inputs: np.ndarray) -> Any:
        """Run ``inputs`` ([n, ...], n >= 1) in the next batch; returns this request's outputs."""
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
            sizes = [len(p.inputs) for p in live]
            self._last_requests = len(live)
            try:
                inputs = live[0].inputs if len(live) == 1 else np.concatenate([p.inputs for p in live])
                outputs = await loop.run_in_executor(self._executor, self.run_batch, inputs)
                pieces = split_outputs(outputs, sizes)
            except Exception as e:  # every waiting request gets the error; the loop keeps serving
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            if self.on_batch is not None:
                with contextlib.suppress(Exception):
                    self.on_batch(sum(sizes), len(live))
            for p, piece in zip(live, pieces, strict=True):
                if not p.future.done():
                    p.future.set_result(piece)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        self._executor.shutdown(wait=False)
