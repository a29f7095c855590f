"""Status conditions of MLPipeline and ModelDeployment, per the Kubernetes API conventions.

Each condition has a type (what it says), a status (True/False/Unknown), a CamelCase reason, a message
for people, the generation it was computed from and the time its status last changed. Every type an
object carries is set to Unknown on first sight, so `kubectl get -o yaml` always shows the full set.

MLPipeline (about the latest run):
- `Accepted`: the spec can be acted on. False (reason InvalidSpec...) stops all work until the spec
  changes; the message names the field.
- `DataValidated`: the run's data met the data contract (known once the run ends; False when training
  failed on the contract).
- `Trained`: the run's RayJob finished successfully (False: it failed; Unknown: it runs).
- `Registered`: the run committed a model version to the registry.
- `Evaluated`: that version passed the evaluation gate (False: reason BelowThreshold or
  DidNotBeatDeployed).
- `Succeeded`: the whole run succeeded: trained, registered and passed the gate.

ModelDeployment:
- `Accepted`: as above.
- `Ready`: the InferenceService is ready and serves what the spec asks for.
- `Progressing`: a change is being rolled out (new InferenceService, a canary, a version change).
- `Degraded`: something is wrong that will not fix itself (a model that fails to load, a version
  missing from the registry, an InferenceService reporting a failure).
- `Drifted`: live inputs drifted from the training profile (set by the monitoring loop; Unknown here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

TRUE = "True"
FALSE = "False"
UNKNOWN = "Unknown"

ACCEPTED = "Accepted"

# MLPipeline
DATA_VALIDATED = "DataValidated"
TRAINED = "Trained"
REGISTERED = "Registered"
EVALUATED = "Evaluated"
SUCCEEDED = "Succeeded"
PIPELINE_CONDITIONS = (ACCEPTED, DATA_VALIDATED, TRAINED, REGISTERED, EVALUATED, SUCCEEDED)

# ModelDeployment
READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
DRIFTED = "Drifted"
DEPLOYMENT_CONDITIONS = (ACCEPTED, READY, PROGRESSING, DEGRADED, DRIFTED)


def get_condition(conditions: Iterable[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for c in conditions or ():
        if c.get("type") == type_:
            return c
    return None


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: str,
) -> bool:
    """Set one condition in place; keeps lastTransitionTime unless the status changes.

    Returns True when the status changed (a transition worth an Event).
    """
    if status not in (TRUE, FALSE, UNKNOWN):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    new: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message}
    if generation is not None:
        new["observedGeneration"] = generation
    for i, old in enumerate(conditions):
        if old.get("type") == type_:
            changed = old.get("status") != status
            new["lastTransitionTime"] = now if changed or not old.get("lastTransitionTime") else old["lastTransitionTime"]
            conditions[i] = new
            return changed
    new["lastTransitionTime"] = now
    conditions.append(new)
    return True


def ensure_conditions(
    conditions: list[dict[str, Any]], types: Iterable[str], *, generation: int | None, now: str
) -> None:
    """Every type present: missing ones start as Unknown (API conventions: set on first sight)."""
    for type_ in types:
        if get_condition(conditions, type_) is None:
            set_condition(conditions, type_, UNKNOWN, "Initializing", "Not yet observed.", generation=generation, now=now)
