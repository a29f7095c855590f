"""The operator's object cache: the newest copy wins. resourceVersions are ordered when they are decimal
integers (KEP-5504; every etcd-backed apiserver), else compared only for equality (opaque: letters here)."""

from __future__ import annotations

from typing import Any

from conveyor.operator.controller.cache import ObjectCache


def obj(rv: str, uid: str = "u1", **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ml", "uid": uid, "resourceVersion": rv, **meta}}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_watch_event_older_than_our_write_is_ignored_until_the_echo() -> None:
    cache = ObjectCache(clock=Clock())
    cache.observe({"type": "ADDED", "object": obj("a")})
    cache.remember(obj("c"))  # our write's response
    cache.observe({"type": "MODIFIED", "object": obj("b")})  # older: the watch has not caught up
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "c"
    cache.observe({"type": "MODIFIED", "object": obj("c")})  # the echo
    cache.observe({"type": "MODIFIED", "object": obj("d")})  # then anything newer
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "d"


def test_a_response_the_watch_already_delivered_does_not_replace_newer_events() -> None:
    cache = ObjectCache(clock=Clock())
    cache.observe({"type": "MODIFIED", "object": obj("c")})
    cache.observe({"type": "MODIFIED", "object": obj("d")})
    cache.remember(obj("c"))  # a slow response for a change the watch already showed
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "d"


def test_an_echo_that_never_comes_is_waited_for_only_so_long() -> None:
    clock = Clock()
    cache = ObjectCache(clock=clock, echo_timeout=30)
    cache.remember(obj("c"))
    clock.now = 31  # e.g. a relist after the watch expired skipped it
    cache.observe({"type": "MODIFIED", "object": obj("e")})
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "e"


def test_an_event_newer_than_our_write_is_taken_though_the_echo_never_came() -> None:
    """The operator wrote 10; the watch, relisting or catching up, shows 12 (a change by someone else)
    before, or instead of, 10: 12 is taken at once. This was the flake in the canary test: the test's
    status patch came after the operator's write, the ISVC watch relisted after both (its list had met
    'storage is (re)initializing'), and the cache held the copy without status for its 30 s."""
    cache = ObjectCache(clock=Clock())
    cache.observe({"type": None, "object": obj("7")})
    cache.remember(obj("10"))
    cache.observe({"type": "MODIFIED", "object": obj("9")})  # older than our write: ignored
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "10"
    cache.observe({"type": None, "object": obj("12")})  # a relist after our write and another
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "12"
    cache.observe({"type": "MODIFIED", "object": obj("10")})  # a late echo of ours changes nothing
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "12"
    cache.remember(obj("11"))  # a slow response: older than what the cache holds
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "12"
    cache.remember(obj("13"))
    cache.observe({"type": "MODIFIED", "object": obj("14")})  # no echo awaited: ordered versions
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "14"
    assert int("9") < int("10") and "9" > "10"  # ordered as numbers, not as strings


def test_an_object_we_just_created_takes_a_newer_event_though_its_echo_never_came() -> None:
    cache = ObjectCache(clock=Clock())
    cache.remember(obj("10"))  # the create's response; the cache held nothing of it
    cache.observe({"type": "MODIFIED", "object": obj("12")})  # KServe's status write, ours coalesced away
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "12"
    cache.observe({"type": "ADDED", "object": obj("10")})  # the late echo
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "12"


def test_with_opaque_versions_a_listed_copy_is_taken_without_the_echo() -> None:
    cache = ObjectCache(clock=Clock())
    cache.remember(obj("c"))
    cache.observe({"type": None, "object": obj("e")})  # a relist: no echo of c will come
    assert cache.get(("ml", "p"))["metadata"]["resourceVersion"] == "e"


def test_a_recreated_object_replaces_the_old_one_at_once() -> None:
    cache = ObjectCache(clock=Clock())
    cache.remember(obj("c", uid="u1"))
    cache.observe({"type": "ADDED", "object": obj("x", uid="u2")})
    assert cache.get(("ml", "p"))["metadata"]["uid"] == "u2"
    cache.observe({"type": "DELETED", "object": obj("y", uid="u2")})
    assert cache.get(("ml", "p")) is None


def test_managed_fields_are_not_kept() -> None:
    cache = ObjectCache(clock=Clock())
    cache.observe({"type": "ADDED", "object": obj("a", managedFields=[{"manager": "kubectl"}])})
    assert "managedFields" not in cache.get(("ml", "p"))["metadata"]


def test_the_cache_iterates_over_its_keys() -> None:
    """The resync walks every cached key (it once raised TypeError and stopped resyncing for good)."""
    cache = ObjectCache(clock=Clock())
    cache.observe({"type": "ADDED", "object": obj("a")})
    cache.observe(
        {
            "type": "ADDED",
            "object": {"metadata": {"name": "q", "namespace": "ml", "uid": "u2", "resourceVersion": "b"}},
        }
    )
    assert sorted(cache) == [("ml", "p"), ("ml", "q")]


def test_a_projection_keeps_only_the_spec_fields_read() -> None:
    from conveyor.operator.controller.cache import keep_spec_fields

    cache = ObjectCache(clock=Clock(), project=keep_spec_fields("suspend"))
    rayjob = obj("a", managedFields=[{"manager": "x"}], labels={"conveyor.dev/run": "1"})
    rayjob.update(
        spec={"suspend": True, "rayClusterSpec": {"headGroupSpec": {}}}, status={"jobStatus": "RUNNING"}
    )
    cache.observe({"type": "ADDED", "object": rayjob})
    kept = cache.get(("ml", "p"))
    assert kept["spec"] == {"suspend": True} and kept["status"] == {"jobStatus": "RUNNING"}
    assert kept["metadata"]["labels"] == {"conveyor.dev/run": "1"} and "managedFields" not in kept["metadata"]
