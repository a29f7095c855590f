"""The dynamic batcher: concurrent requests share forward passes and each gets its own answer."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from conveyor.runtime.serving.batching import DynamicBatcher, split_outputs


class Recorder:
    """A stand-in forward pass: doubles its input and remembers the batch sizes it saw."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("forward pass failed")
        return x * 2


def _rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 3), value, dtype=np.float32)


def test_concurrent_requests_share_a_forward_pass_and_get_their_own_rows() -> None:
    forward = Recorder()
    seen: list[tuple[int, int]] = []

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(
            forward, max_batch_size=64, max_latency_ms=50, on_batch=lambda r, q: seen.append((r, q))
        )
        try:
            return await asyncio.gather(*(batcher.submit(_rows(i, 1 + i % 3)) for i in range(20)))
        finally:
            await batcher.close()

    answers = asyncio.run(main())
    for i, out in enumerate(answers):
        assert out.shape == (1 + i % 3, 3)
        assert np.all(out == 2 * i)  # request i got its own rows back, not a neighbour's
    assert sum(forward.sizes) == sum(1 + i % 3 for i in range(20))
    assert len(forward.sizes) == 1  # all arrived before the first batch closed
    assert seen == [(sum(1 + i % 3 for i in range(20)), 20)]
    assert all(name.startswith("batcher") for name in forward.threads)  # off the event loop


def test_batches_never_exceed_the_maximum_and_requests_are_not_split() -> None:
    forward = Recorder()

    async def main() -> None:
        batcher = DynamicBatcher(forward, max_batch_size=8, max_latency_ms=20)
        try:
            outs = await asyncio.gather(*(batcher.submit(_rows(i, 3)) for i in range(10)))
            big = await batcher.submit(_rows(99, 20))  # larger than the maximum: runs alone
        finally:
            await batcher.close()
        assert all(o.shape == (3, 3) for o in outs)
        assert big.shape == (20, 3) and np.all(big == 198)

    asyncio.run(main())
    assert forward.sizes[:-1] and all(s <= 8 and s % 3 == 0 for s in forward.sizes[:-1])
    assert forward.sizes[-1] == 20


def test_a_lone_request_is_answered_after_the_wait_without_company() -> None:
    forward = Recorder()

    async def main() -> np.ndarray:
        batcher = DynamicBatcher(forward, max_batch_size=32, max_latency_ms=30)
        try:
            return await asyncio.wait_for(batcher.submit(_rows(5)), timeout=10)
        finally:
            await batcher.close()

    assert np.all(asyncio.run(main()) == 10)
    assert forward.sizes == [1]


def test_a_failing_pass_fails_its_requests_only_and_the_batcher_keeps_serving() -> None:
    forward = Recorder(fail_on=-1.0)

    async def main() -> None:
        batcher = DynamicBatcher(forward, max_batch_size=4, max_latency_ms=20)
        try:
            results = await asyncio.gather(
                batcher.submit(_rows(-1)), batcher.submit(_rows(1)), return_exceptions=True
            )
            # They shared a pass that failed; rerun one by one, only the bad request fails.
            assert isinstance(results[0], RuntimeError)
            assert np.all(results[1] == 2)
            assert forward.sizes == [2, 1, 1]
            after = await batcher.submit(_rows(3))
            assert np.all(after == 6)
        finally:
            await batcher.close()

    asyncio.run(main())


def test_a_cancelled_request_is_skipped() -> None:
    forward = Recorder()

    async def main() -> None:
        batcher = DynamicBatcher(forward, max_batch_size=4, max_latency_ms=50)
        try:
            gone = asyncio.ensure_future(batcher.submit(_rows(7)))
            stays = asyncio.ensure_future(batcher.submit(_rows(8)))
            await asyncio.sleep(0)  # both queued
            gone.cancel()
            assert np.all(await stays == 16)
        finally:
            await batcher.close()

    asyncio.run(main())
    assert forward.sizes == [1]


def test_split_outputs_handles_tuples_and_dicts() -> None:
    a = np.arange(6)
    assert [p.tolist() for p in split_outputs(a, [1, 2, 3])] == [[0], [1, 2], [3, 4, 5]]
    t = split_outputs((a, a * 10), [4, 2])
    assert t[1][1].tolist() == [40, 50]
    d = split_outputs({"p": a}, [5, 1])
    assert d[1]["p"].tolist() == [5]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DynamicBatcher(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match=">= 0"):
        DynamicBatcher(Recorder(), max_latency_ms=-1)


def test_with_nothing_on_its_way_a_batch_runs_without_waiting_and_otherwise_waits_for_it() -> None:
    forward = Recorder()

    async def main() -> None:
        batcher = DynamicBatcher(forward, max_batch_size=8, max_latency_ms=60_000)
        batcher.arriving = 0  # the server says no other request is being read
        try:
            # Would take a minute if the batcher waited for company.
            assert np.all(await asyncio.wait_for(batcher.submit(_rows(1)), timeout=10) == 2)
            batcher.arriving = 1  # one more request is being parsed: worth waiting for
            first = asyncio.ensure_future(batcher.submit(_rows(2)))
            await asyncio.sleep(0.05)
            assert not first.done()
            batcher.arriving = 0
            second = await asyncio.wait_for(batcher.submit(_rows(3)), timeout=10)
            assert np.all(await first == 4) and np.all(second == 6)
        finally:
            await batcher.close()

    asyncio.run(main())
    assert forward.sizes == [1, 2]  # the second batch held both requests
