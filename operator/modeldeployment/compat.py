"""May a candidate version take traffic from the stable one? Its input schema must accept what the
stable version's clients send.

Compared feature by feature (`schema.json`'s `features`):
- an input the stable version takes and the candidate lacks (removed) refuses the hand-off: the
  candidate was trained without it, and clients that rely on it are owed an explanation, not a surprise;
- an input whose type changed (retyped) refuses it, except int -> float (every int is a float);
- an input the candidate adds is allowed when optional (nullable: the fitted transforms impute it),
  refused when required (clients do not send it yet);
- a different kind of input (tabular vs image) refuses it.

`check` (observe side) reads both schemas, blocking reads in a thread; `problems` is pure. The plan
holds back a refused candidate (the stable version keeps all traffic) with `Compatible=False`
naming the fields.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.events import Event
from conveyor.runtime.package.registry import PackageError

COMPATIBLE = "Compatible"
_WIDENING = {("int", "float")}

# schema.json of a committed version never changes: read once per package.
_schemas: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class Compatibility:
    """The candidate's input schema against the stable version's (problems empty: compatible)."""

    stable: str
    candidate: str
    problems: tuple[str, ...] = ()
    error: str | None = None  # a schema could not be read


def problems(stable: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """Pure: why clients of `stable` would break on `candidate` (empty: they would not)."""
    if stable.get("kind", "tabular") != candidate.get("kind", "tabular"):
        return [f"input kind changed from {stable.get('kind')} to {candidate.get('kind')}"]
    old = {f["name"]: f for f in stable.get("features") or []}
    new = {f["name"]: f for f in candidate.get("features") or []}
    out = []
    for name, f in old.items():
        if name not in new:
            out.append(f"input {name} was removed")
            continue
        before, after = f.get("type", "float"), new[name].get("type", "float")
        if before != after and (before, after) not in _WIDENING:
            out.append(f"input {name} changed type from {before} to {after}")
    for name, f in new.items():
        if name not in old and not f.get("nullable", False):
            out.append(f"input {name} is new and required (clients do not send it yet)")
    return out


async def check(registry: Any, stable: str | None, candidate: str | None) -> Compatibility | None:
    """Observe side: both schemas compared, when a candidate other than the stable version is wanted."""
    if not stable or not candidate or stable == candidate:
        return None
    try:
        old, new = await asyncio.to_thread(_read, registry, stable), await asyncio.to_thread(_read, registry, candidate)
    except (PackageError, OSError) as e:
        return Compatibility(stable, candidate, error=str(e)[:500])
    return Compatibility(stable, candidate, tuple(problems(old, new)))


def _read(registry: Any, version: str) -> dict[str, Any]:
    uri = registry.package_uri(version)
    if uri not in _schemas:
        _schemas[uri] = registry.read_json(version, "schema.json")
    return _schemas[uri]


def hold_back(
    conds: list[dict[str, Any]], events: list[Event], wanted: str | None, verdict: Compatibility | None, put: Any
) -> str | None:
    """Plan side, pure: the candidate the rollout may take (None: hold it back), Compatible set."""
    if verdict is None or verdict.candidate != wanted:
        if wanted is not None and c.get_condition(conds, COMPATIBLE) is not None:
            put(COMPATIBLE, c.TRUE, "SchemaCompatible", f"{wanted} accepts what the stable version's clients send.")
        return wanted
    if verdict.error is not None:
        put(COMPATIBLE, c.UNKNOWN, "SchemaUnreadable", f"cannot compare {verdict.candidate} with {verdict.stable}: {verdict.error}")
        return None
    if verdict.problems:
        message = f"{verdict.candidate} is not rolled out: against the stable {verdict.stable}, " + "; ".join(verdict.problems)
        if put(COMPATIBLE, c.FALSE, "SchemaIncompatible", message):
            events.append(("Warning", "SchemaIncompatible", message))
        return None
    put(COMPATIBLE, c.TRUE, "SchemaCompatible", f"{verdict.candidate} accepts what {verdict.stable}'s clients send.")
    return wanted
