"""The served-request log against a real file:// registry: what one process served, another finds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from conveyor.runtime.package.registry import Registry
from conveyor.runtime.serving.served_log import ServedLog


def test_a_request_served_by_one_process_is_found_by_another(tmp_path: Path) -> None:
    registry = Registry(f"file://{tmp_path}", "fraud")
    serving = ServedLog(registry, "v1", flush_interval=60)  # flushed by hand below, or on close
    other = ServedLog(registry, "v1", flush_interval=60)
    try:
        serving.record("r1", ["1", "0"], [{"amount": np.float32(3.5), "merchant": "grocery"}, {"amount": 1.0, "merchant": None}])
        assert other.lookup("r1") is None  # buffered, not flushed yet
        assert serving.flush() == 1
        found = other.lookup("r1")
        assert found is not None and found.predictions == ["1", "0"]
        assert found.inputs == [{"amount": 3.5, "merchant": "grocery"}, {"amount": 1.0, "merchant": None}]
        assert other.lookup("never-served") is None
        assert ServedLog(registry, "v2", flush_interval=60).lookup("r1") is None  # another version's log
        serving.record("r2", [0.25], None)
    finally:
        serving.close()  # shutdown writes what is still buffered
        other.close()
    assert other.lookup("r2") is not None
    parts = registry.served_parts("v1")
    assert len(parts) == 2 and all(p.rsplit("/", 1)[-1].startswith("part-") for p in parts)


def test_the_background_thread_flushes_on_its_interval_and_when_the_buffer_fills(tmp_path: Path) -> None:
    registry = Registry(f"file://{tmp_path}", "fraud")
    log = ServedLog(registry, "v1", flush_interval=0.2, max_buffered=5)
    try:
        log.record("a", ["1"], None)
        deadline = time.monotonic() + 10
        while not registry.served_parts("v1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(registry.served_parts("v1")) == 1
    finally:
        log.close()
    slow = ServedLog(registry, "v1", flush_interval=3600, max_buffered=5)
    try:
        for i in range(5):
            slow.record(f"b{i}", ["0"], None)
        deadline = time.monotonic() + 10
        while len(registry.served_parts("v1")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(registry.served_parts("v1")) == 2  # the full buffer woke the writer, an hour early
    finally:
        slow.close()


def test_the_index_is_bounded_to_the_newest_parts(tmp_path: Path) -> None:
    registry = Registry(f"file://{tmp_path}", "fraud")
    for i in range(6):
        registry.append_served("v1", "w", [{"id": f"r{i}", "predictions": ["1"], "inputs": None}])
    reader = ServedLog(registry, "v1", flush_interval=60, max_parts=3)
    try:
        assert reader.lookup("r5") is not None and reader.lookup("r3") is not None
        assert reader.lookup("r0") is None  # older than the newest three parts: too old
        registry.append_served("v1", "w", [{"id": "r6", "predictions": ["0"], "inputs": None}])
        assert reader.lookup("r6") is not None  # a new part is read on a miss
        assert len(reader._index) <= 3
    finally:
        reader.close()
