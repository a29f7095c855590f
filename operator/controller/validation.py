"""Specs that the CRD schema let through, checked once more by the operator before anything is built.

The schema and its CEL rules catch almost everything at admission. What they cannot see (names a
downstream controller would refuse, rules that depend on the operator's configuration or on a live
child) is checked by each kind's `validate_*` functions, which return a message naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

SpecT = TypeVar("SpecT", bound=BaseModel)


class InvalidSpecError(ValueError):
    """A spec that passed the CRD schema but cannot be acted on; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_spec(model: type[SpecT], spec: dict[str, Any]) -> tuple[SpecT | None, str | None]:
    """The typed spec, or (None, a message naming each bad field)."""
    try:
        return model.model_validate(spec), None
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"spec.{loc}: {err['msg']}")
        return None, "; ".join(problems)


def validate_registry(open_registry: Callable[[str, str], Any], uri: str, name: str, field: str) -> str | None:
    """Whether this install can open the registry (s3:// needs the s3 extra); a message naming `field`."""
    try:
        open_registry(uri, name)
    except (ValueError, ImportError) as e:
        return f"{field}: cannot open {uri}: {e}"
    return None
