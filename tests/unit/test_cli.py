"""`kubectl conveyor`: what each command writes, and the status a person reads. The commands run
against the real kube-apiserver in tests/integration/test_rollout_control.py."""

from __future__ import annotations

from datetime import UTC, datetime

from conveyor.operator.cli import patches, render_status

NOW = datetime(2026, 12, 1, 12, 0, 0, 123000, tzinfo=UTC)
ACTION = "conveyor.dev/rollout-action"


def test_actions_are_annotations_with_a_fresh_token() -> None:
    assert patches("promote", NOW, paused=False) == [
        {"metadata": {"annotations": {ACTION: "promote@2026-12-01T12:00:00.123000Z"}}}
    ]
    assert patches("abort", NOW, paused=False)[0]["metadata"]["annotations"][ACTION].startswith("abort@")
    assert patches("pause", NOW, paused=False) == [{"spec": {"rollout": {"paused": True}}}]
    # resume clears the spec's pause when set, and leaves a pause the operator took either way.
    assert patches("resume", NOW, paused=True)[0] == {"spec": {"rollout": {"paused": False}}}
    assert [list(p) for p in patches("resume", NOW, paused=False)] == [["metadata"]]


def test_status_shows_the_rollout_and_every_check() -> None:
    obj = {
        "metadata": {"name": "fraud", "namespace": "ml"},
        "spec": {"rollout": {"steps": [10, 50, 100]}},
        "status": {
            "rolloutPhase": "Progressing", "stableVersion": "v1", "canaryVersion": "v2", "canaryWeight": 50,
            "rolloutStep": 1, "nextAnalysisTime": "2026-12-01T12:01:00Z",
            "analyses": [{"time": "2026-12-01T12:00:00Z", "version": "v2", "weight": 10, "verdict": "Passed",
                          "message": "every check passed",
                          "checks": [{"name": "successRate", "verdict": "Passed", "candidate": 0.995,
                                      "stable": 1.0, "threshold": ">= 0.99"}]}],
            "rejectedVersions": [{"version": "v0", "check": "latencyP99", "value": 812.5, "time": "t", "message": "slow"}],
        },
    }
    text = render_status(obj)
    assert "v2 at 50% (step 2 of 3" in text and "2026-12-01T12:01:00Z" in text
    assert "successRate" in text and "0.995" in text and ">= 0.99" in text
    assert "Rejected:    v0" in text and "812.5" in text
