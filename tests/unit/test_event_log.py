"""Every event the operator posts is in its log too: a Warning as a warning, with the object and reason."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from conveyor.operator.controller.events import EventPoster


class Sink:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.posted.append((type_, reason, message))


def test_posted_events_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    obj = {"kind": "ModelDeployment", "metadata": {"namespace": "ml", "name": "fraud"}}

    async def post() -> list[tuple[str, str, str]]:
        sink = Sink()
        poster = EventPoster(sink)
        poster.post(
            obj, [("Normal", "CanaryStarted", "v2 at 25%"), ("Warning", "RolledBack", "error rate 9%")]
        )
        await poster.drain()
        return sink.posted

    with caplog.at_level(logging.INFO, logger="conveyor.operator.events"):
        posted = asyncio.run(post())
    assert [r[1] for r in posted] == ["CanaryStarted", "RolledBack"]
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "conveyor.operator.events"]
    assert logged == [
        (logging.INFO, "ml/fraud ModelDeployment CanaryStarted: v2 at 25%"),
        (logging.WARNING, "ml/fraud ModelDeployment RolledBack: error rate 9%"),
    ]
