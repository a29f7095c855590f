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


def _predictor_of(registry: Registry, version: str) -> object:
    """The feedback route's code of a predictor of ``version`` (its model is never needed by it): the
    state load() gives it, set directly."""
    from conveyor.runtime.serving.metrics import FeedbackTracker
    from conveyor.runtime.serving.predictor import PackagePredictor

    p = PackagePredictor("fraud", f"{registry.uri}/fraud/{version}", with_metrics=False, feedback_store=registry)
    p.version, p.task, p.classes, p.kind = version, "classification", ["0", "1"], "tabular"
    p.feedback = FeedbackTracker(task="classification")
    p.served_log = ServedLog(registry, version, flush_interval=60)
    return p


def test_feedback_for_another_versions_request_is_recorded_for_that_version(tmp_path: Path) -> None:
    """A canary's route sends feedback to either version's predictors: v1's takes a label for what v2 answered."""
    import pytest
    from kserve.errors import InvalidInput

    registry = Registry(f"file://{tmp_path}", "fraud")
    v1, v2 = _predictor_of(registry, "v1"), _predictor_of(registry, "v2")
    try:
        v2._observe({"amount": [1.0, 2.0]}, ["1", "0"], "served-by-v2")
        v1._observe({"amount": [3.0]}, ["0"], "served-by-v1")
        v2.served_log.flush()
        v1.served_log.flush()
        answer = v1.record_feedback([{"id": "served-by-v2", "labels": ["1", "1"]}, {"id": "served-by-v1", "label": "0"}])
        assert answer["results"] == [
            {"id": "served-by-v2", "status": "recorded", "rows": 2, "model_version": "v2"},
            {"id": "served-by-v1", "status": "recorded", "rows": 1},
        ]
        assert answer["online_accuracy"] == 1.0  # v1's own window holds v1's answer only
        by_v2 = registry.read_feedback(["v2"])
        assert [(r["label"], r["prediction"], r["inputs"]) for r in by_v2] == [
            ("1", "1", {"amount": 1.0}), ("1", "0", {"amount": 2.0})
        ]
        assert [r["id"] for r in registry.read_feedback(["v1"])] == ["served-by-v1"]
        with pytest.raises(InvalidInput, match="nobody.*flushed"):
            v1.record_feedback([{"id": "nobody", "label": "1"}])
    finally:
        v1.served_log.close()
        v2.served_log.close()


def test_parts_are_kept_by_hour_and_listed_newest_hours_first(tmp_path: Path) -> None:
    registry = Registry(f"file://{tmp_path}", "fraud")
    newest = registry.append_served("v1", "w", [{"id": "now", "predictions": ["1"], "inputs": None}])
    hour = Path(newest).parent
    assert len(hour.name) == 10 and hour.parent.name == "v1"  # <model>/.served/v1/<yyyymmddhh>/part-*
    older = hour.parent / "2020010100" / "part-00000000000000000001-w.jsonl"
    older.parent.mkdir()
    older.write_text('{"id": "old", "predictions": ["0"], "inputs": null}\n')
    assert [Path(p).name for p in registry.served_parts("v1")] == [older.name, Path(newest).name]
    assert registry.served_parts("v1", newest=1) == [newest]  # the older hour is not even listed
    reader = ServedLog(registry, "v1", write=False)
    assert reader.lookup("old") is not None and reader.lookup("now") is not None
