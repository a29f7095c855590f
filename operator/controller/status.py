"""The one status write of a reconcile: a merge patch of what changed, guarded by the resourceVersion read.

A 409 means someone changed the object since we read it: the writer reads it again into the cache and
asks the queue to reconcile anew (`Requeue`), rather than writing over a change it has not seen.
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
        if fresh is not None:
            cache.remember(fresh)
        raise Requeue(0.05) from None
    cache.remember(updated)
    return True
