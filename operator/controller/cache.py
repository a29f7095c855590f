"""The operator's view of one kind: the newest copy of each object, fed by the watch and by our own writes.

A write's response can beat the watch, so the cache must not let a watch event older than a copy we wrote
or read ourselves replace it; and it must never hold back an event newer than that copy. The watch does
not always echo our write: a relist (after a watch expired, or while the apiserver's watch cache for a
kind was still initializing and the list was retried) delivers only the state at list time, and a newer
change by someone else may follow our write before the watch catches up.

resourceVersions of one kind are ordered as decimal integers (KEP-5504, stable in Kubernetes 1.35; every
etcd-backed apiserver has always issued them so): an event older than our copy is ignored, an event as new
or newer replaces it. A resourceVersion that is not a decimal integer (some aggregated API servers) is
compared only for equality: after our write the cache waits for the watch to echo it, taking a listed copy
at once, and gives up waiting after `echo_timeout` seconds.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

Key = tuple[str, str]  # (namespace, name)


# Metadata no reconcile reads, and often the larger part of an object's bytes (kept in memory for every
# object of every kind watched): the field managers' records, and the copy of the whole object kubectl
# apply leaves in an annotation.
_UNREAD_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


def _trimmed(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without metadata.managedFields and kubectl's last-applied annotation."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if "managedFields" not in meta and _UNREAD_ANNOTATION not in annotations:
        return obj
    meta = {k: v for k, v in meta.items() if k != "managedFields"}
    if _UNREAD_ANNOTATION in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != _UNREAD_ANNOTATION}
    return {**obj, "metadata": meta}


def _compact(value: Any) -> Any:
    """A copy sharing its strings: every key, and every value of up to 64 characters, interned. Objects of
    one kind repeat the same keys and most short values (condition types, reasons, labels, images), and
    each watch event's JSON arrives as fresh strings: at 1,000 MLPipelines, RayJobs, ModelDeployments and
    InferenceServices, half of what the caches held was duplicate strings (26 -> 13 MiB measured)."""
    if isinstance(value, dict):
        return {sys.intern(k): _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= 64:
        return sys.intern(value)
    return value


def keep_spec_fields(*fields: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A projection for a kind whose reconcilers read only these fields of its spec (and its metadata and
    status whole): a RayJob's spec is its whole Ray cluster's pod templates, ~15 kB in memory each, of
    which the operator reads `suspend` alone (it never re-applies a RayJob, it only creates it)."""

    def project(obj: dict[str, Any]) -> dict[str, Any]:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return obj
        return {**obj, "spec": {k: spec[k] for k in fields if k in spec}}

    return project


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


class ObjectCache:
    def __init__(
        self,
        *,
        echo_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        project: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        # What is kept of each object: the object less unread metadata and less what `project` drops, its
        # strings shared with the other objects'.
        self._keep = (
            (lambda obj: _compact(_trimmed(obj)))
            if project is None
            else (lambda obj: _compact(project(_trimmed(obj))))
        )
        self._objects: dict[Key, dict[str, Any]] = {}
        self._awaiting: dict[Key, tuple[str, float]] = {}  # our copy's resourceVersion, since when
        self._seen: dict[Key, deque[str]] = {}  # opaque resourceVersions the watch delivered lately
        self._echo_timeout = echo_timeout
        self._clock = clock

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._objects.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[Key]:
        """The keys held now (a copy: the watch may change the cache while the caller iterates)."""
        return iter(list(self._objects))

    def keys(self) -> list[Key]:
        return list(self._objects)

    def items(self) -> Iterator[tuple[Key, dict[str, Any]]]:
        return iter(list(self._objects.items()))

    def values(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._objects.values()))

    def in_namespace(
        self, namespace: str, *, label: str | None = None, value: str | None = None
    ) -> list[dict[str, Any]]:
        """The objects of a namespace, optionally only those whose `label` equals `value`."""
        return [
            obj
            for (ns, _), obj in self._objects.items()
            if ns == namespace
            and (label is None or (obj["metadata"].get("labels") or {}).get(label) == value)
        ]

    def observe(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """A watch event: store its object (or drop it when DELETED); returns the object."""
        obj = event.get("object")
        if not obj or "metadata" not in obj:
            return None
        key = key_of(obj)
        if event.get("type") == "DELETED":
            self._objects.pop(key, None)
            self._awaiting.pop(key, None)
            self._seen.pop(key, None)
            return obj
        rv = obj["metadata"].get("resourceVersion", "")
        current = self._objects.get(key)
        same_object = current is not None and current["metadata"].get("uid") == obj["metadata"].get("uid")
        if same_object and _older(rv, current["metadata"].get("resourceVersion", "")):
            return obj  # older than the copy we hold (our write's response): the watch has not caught up
        if not rv.isdecimal():  # only opaque versions are looked up there (remember)
            self._seen.setdefault(key, deque(maxlen=16)).append(rv)
        awaiting = self._awaiting.get(key)
        if awaiting is not None:
            want, since = awaiting
            echo_pending = rv != want and event.get("type") is not None  # a relist may never echo it
            if echo_pending and same_object and self._clock() - since < self._echo_timeout:
                return obj  # opaque versions: the events before our write's echo are older than our copy
            del self._awaiting[key]
        self._objects[key] = self._keep(obj)
        return obj

    def remember(self, obj: dict[str, Any]) -> None:
        """A copy we wrote or read ourselves, newer than any watch event not yet delivered."""
        key = key_of(obj)
        rv = obj["metadata"].get("resourceVersion", "")
        current = self._objects.get(key)
        if current is not None and current["metadata"].get("uid") == obj["metadata"].get("uid"):
            order = _ordered(current["metadata"].get("resourceVersion", ""), rv)
            if order is not None:
                if order < 0:
                    self._objects[key] = self._keep(obj)
                return  # ordered versions: the newer copy is kept and no echo needs waiting for
        elif rv.isdecimal():
            self._objects[key] = self._keep(obj)  # new here (just created): ordered, no echo awaited
            return
        if rv in self._seen.get(key, ()):
            return  # the watch delivered it already; what the cache holds is as new or newer
        self._objects[key] = self._keep(obj)
        self._awaiting[key] = (rv, self._clock())


def _ordered(a: str, b: str) -> int | None:
    """-1, 0 or 1 as resourceVersion a is older than, the same as or newer than b; None when either is not a
    decimal integer (then they are opaque)."""
    if not (a.isdecimal() and b.isdecimal()):
        return None
    x, y = int(a), int(b)
    return (x > y) - (x < y)


def _older(a: str, b: str) -> bool:
    """a is known to be older than b."""
    return _ordered(a, b) == -1
