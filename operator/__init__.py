"""conveyor operator: kopf handlers, pure builders, reconcile planners (import as conveyor.operator)."""
