"""Cron schedules (UTC, via croniter), for both kinds that run on one: MLPipeline and BatchPrediction."""

from __future__ import annotations

from datetime import datetime

from croniter import croniter


def cron_firing(schedule: str | None, since: datetime, now: datetime) -> tuple[datetime | None, datetime | None]:
    """(the latest firing after `since` and at or before `now`, or None; the next firing). Missed firings
    collapse into the latest one. (None, None) without a schedule or for one croniter refuses (the CRD
    checks the shape only; croniter has the final word)."""
    if not schedule or not croniter.is_valid(schedule):
        return None, None
    prev_fire = croniter(schedule, now).get_prev(datetime)
    next_fire = croniter(schedule, now).get_next(datetime)
    return (prev_fire if prev_fire > since else None), next_fire
