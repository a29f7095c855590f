from __future__ import annotations
"""conveyor operator: kopf handlers, pure builders, rollout state machine."""
