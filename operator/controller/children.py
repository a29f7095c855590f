"""What every child manifest carries: ownership, our labels, and the digest that makes applies idempotent.

Children are written with server-side apply under one field manager. Each carries the digest of what
was applied (`conveyor.dev/applied-hash`), so a reconcile that changes nothing writes nothing, while a
field someone else edited, or one we stopped setting, is applied again (`needs_apply`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from conveyor.runtime.spec import API_VERSION, Toleration

FIELD_MANAGER = "conveyor-operator"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "conveyor"
ANNOTATION_APPLIED_HASH = "conveyor.dev/applied-hash"


def owner_reference(owner: dict[str, Any], *, controller: bool = True) -> dict[str, Any]:
    """An owner reference; the controller one blocks foreground deletion of its owner until collected
    (setting it needs `update` on the owner's `finalizers` subresource where the apiserver enforces it)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": controller,
    }


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Stable digest of what we apply (stored on the child, so an unchanged child is never re-applied)."""
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    meta = {k: v for k, v in manifest.get("metadata", {}).items() if k != "annotations"}
    annotations = {
        k: v for k, v in manifest.get("metadata", {}).get("annotations", {}).items() if k != ANNOTATION_APPLIED_HASH
    }
    blob = json.dumps({"body": body, "meta": meta, "annotations": annotations}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_digest(spec: dict[str, Any], ignored: tuple[str, ...]) -> str:
    """Stable digest of a spec without the `ignored` top-level fields (a change in the rest starts a run)."""
    relevant = {k: v for k, v in spec.items() if k not in ignored}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """Record the manifest's digest on it (the annotation `needs_apply` compares)."""
    manifest["metadata"].setdefault("annotations", {})[ANNOTATION_APPLIED_HASH] = manifest_hash(manifest)
    return manifest


def tolerations_to_api(items: list[Toleration]) -> list[dict[str, Any]]:
    return [t.to_api() for t in items]


def contains(live: Any, desired: Any) -> bool:
    """Whether `live` holds everything `desired` sets (extra fields from defaulting or others are fine)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(contains, live, desired))
    return live == desired


def needs_apply(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Apply only when the child is missing, our last apply differs (the hash annotation: catches
    fields we dropped), or someone changed a field we own."""
    if live is None:
        return True
    annotations = live.get("metadata", {}).get("annotations") or {}
    if annotations.get(ANNOTATION_APPLIED_HASH) != desired["metadata"]["annotations"][ANNOTATION_APPLIED_HASH]:
        return True
    meta = desired["metadata"]
    return not (
        contains(live.get("spec"), desired["spec"])
        and contains(live["metadata"].get("labels") or {}, meta.get("labels") or {})
        and contains(annotations, meta.get("annotations") or {})
    )
