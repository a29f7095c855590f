"""The one status write of a reconcile: a merge patch of what changed, guarded by the resourceVersion read.

A 409 means someone changed the object since we read it. The writer reads it again into the cache. If its
status is still the one this reconcile read (someone changed the spec or metadata: a new version applied
while the reconcile was rolling the last one out), the status is written on the fresh copy: it records what
this reconcile did to the children, which it has done already (the InferenceService now serves the version
this status names), with the generation it observed; the spec change is reconciled next (its watch event
queues it). Otherwise (the status changed too) nothing is written over a change not seen: the queue
reconciles anew (`Requeue`).
"""

from __future__ import annotations

from typing import Any

from conveyor.operator.controller.cache import ObjectCache
from conveyor.operator.controller.client import Client, Conflict, object_path
from conveyor.operator.controller.workqueue import Requeue


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning `old` into `new` (None: nothing to change)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = merge_patch(old[key], value)
            if sub is not None:
                patch[key] = sub
        elif old[key] != value:
            patch[key] = value
    return patch or None


async def write_status(client: Client, cache: ObjectCache, obj: dict[str, Any], status: dict[str, Any]) -> bool:
    """Write `status` if it differs from the object's; True when a write happened."""
    patch = merge_patch(obj.get("status") or {}, status)
    if patch is None:
        return False
    try:
        updated = await client.patch_status(obj, patch)
    except Conflict:
        fresh = await client.get(object_path(obj), resource=obj["kind"])
        if fresh is None:
            raise Requeue(0.05) from None
        cache.remember(fresh)
        if (fresh.get("status") or {}) != (obj.get("status") or {}):
            raise Requeue(0.05) from None
        try:
            updated = await client.patch_status(fresh, patch)
        except Conflict:
            raise Requeue(0.05) from None
    cache.remember(updated)
    return True
