"""An in-memory stand-in for the Kubernetes API client (controller.client.Client), for reconcile unit tests.

It keeps objects by (plural, namespace, name) and plays the parts of the apiserver the reconcilers rely
on: server-side apply creates or replaces what the manifest sets and bumps resourceVersion and (for a
spec change) generation; a status patch carrying a resourceVersion that is not the current one is a 409
(`Conflict`), as is a create of an object that exists; LIST filters by one `label=value` selector
(and one top-level `field=value`, an Event's type). Every write is recorded in `writes`, so a test
can assert what a reconcile wrote and that a repeated one writes nothing. The integration tests run the
same reconcilers against the real kube-apiserver.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Mapping
from typing import Any

from conveyor.operator.controller.client import PLURALS, Conflict

StoreKey = tuple[str, str, str]  # (plural, namespace, name)


def _apply_merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _apply_merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class FakeApi:
    def __init__(self) -> None:
        self.objects: dict[StoreKey, dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []  # (verb, kind, name)
        self.events: list[tuple[str, str, str]] = []  # (type, reason, message)
        self._rv = itertools.count(100)

    # ---------------------------------------------------------------- helpers for tests

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a user or another controller would (not counted as our write)."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[self._key_of(obj)] = obj
        return copy.deepcopy(obj)

    def edit(self, obj: dict[str, Any], **metadata: Any) -> dict[str, Any]:
        """Someone else changes the object's metadata (bumps resourceVersion)."""
        stored = self.objects[self._key_of(obj)]
        stored["metadata"].update(metadata)
        stored["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(stored)

    def find(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        for (_plural, ns, n), obj in self.objects.items():
            if obj["kind"] == kind and ns == namespace and n == name:
                return copy.deepcopy(obj)
        return None

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self.objects.values() if o["kind"] == kind]

    # ---------------------------------------------------------------- the Client protocol

    async def get(self, path: str, *, resource: str = "") -> dict[str, Any] | None:
        plural, namespace, name = self._parse(path)
        obj = self.objects.get((plural, namespace, name or ""))
        return copy.deepcopy(obj) if obj is not None else None

    async def list(
        self,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource: str = "",
    ) -> list[dict[str, Any]]:
        plural, namespace, _ = self._parse(path)
        label, _, value = (label_selector or "").partition("=")
        field, _, wanted = (field_selector or "").partition("=")  # a top-level field only (an Event's type)
        return [
            copy.deepcopy(obj)
            for (p, ns, _), obj in self.objects.items()
            if p == plural
            and ns == namespace
            and (not label or (obj["metadata"].get("labels") or {}).get(label) == value)
            and (not field or obj.get(field) == wanted)
        ]

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        key = self._key_of(manifest)
        self.writes.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        old = self.objects.get(key)
        new = copy.deepcopy(manifest)
        meta = new["metadata"]
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["generation"] = 1
        else:
            meta["uid"] = old["metadata"]["uid"]
            changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
                k: v for k, v in old.items() if k not in ("metadata", "status")
            }
            meta["generation"] = old["metadata"]["generation"] + (1 if changed else 0)
            if "status" in old:
                new["status"] = old["status"]
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[key] = new
        return copy.deepcopy(new)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self._key_of(manifest) in self.objects:
            raise Conflict(409, f"{manifest['kind']} {manifest['metadata']['name']} already exists")
        created = await self.apply(manifest)
        self.writes[-1] = ("create", *self.writes[-1][1:])
        return created

    async def patch_status(self, obj: Mapping[str, Any], status_patch: dict[str, Any]) -> dict[str, Any]:
        key = self._key_of(obj)
        stored = self.objects[key]
        if stored["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise Conflict(
                409, "the object has been modified; please apply your changes to the latest version"
            )
        self.writes.append(("status", obj["kind"], obj["metadata"]["name"]))
        status = stored.setdefault("status", {})
        _apply_merge(status, status_patch)
        stored["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(stored)

    async def delete(self, obj: Mapping[str, Any]) -> None:
        self.writes.append(("delete", obj["kind"], obj["metadata"]["name"]))
        self.objects.pop(self._key_of(obj), None)

    async def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    async def close(self) -> None:
        pass

    # ---------------------------------------------------------------- paths

    @staticmethod
    def _key_of(obj: Mapping[str, Any]) -> StoreKey:
        meta = obj["metadata"]
        return (PLURALS[(obj["apiVersion"], obj["kind"])], meta.get("namespace", ""), meta["name"])

    @staticmethod
    def _parse(path: str) -> tuple[str, str, str | None]:
        parts = path.strip("/").split("/")
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        if rest[0] != "namespaces":
            raise ValueError(f"the fake knows namespaced paths only: {path}")
        return rest[2], rest[1], rest[3] if len(rest) > 3 else None
