"""Specs that the CRD schema let through, checked once more by the operator before anything is built.

The schema and its CEL rules catch almost everything at admission. What they cannot see (names a
downstream controller would refuse, rules that depend on the operator's configuration or on a live
child) is checked by each kind's `validate_*` functions, which return a message naming the field.
"""

from __future__ import annotations

import weakref
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


def validate_registry(
    open_registry: Callable[[str, str], Any], uri: str, name: str, field: str
) -> str | None:
    """Whether this operator can open the registry (s3:// needs the s3 extra) and read it (credentials,
    endpoint, permissions); a message naming `field` and the reason. It does blocking I/O: call it off
    the event loop."""
    try:
        registry = open_registry(uri, name)
    except (ValueError, ImportError) as e:
        return f"{field}: cannot open {uri}: {e}"
    return _probe(registry, uri, field)


# Registries this process has read once: later reconciles skip the probe (a registry that stops being
# readable then fails the read that needs it, and that read's caller reports it).
_readable: weakref.WeakSet[Any] = weakref.WeakSet()


def known_readable(registry: Any) -> bool:
    """Whether this process has read the registry once (validate_registry would answer None, no I/O)."""
    return registry in _readable


def _probe(registry: Any, uri: str, field: str) -> str | None:
    """One listing of the model's folder, the cheapest read every later one depends on."""
    fs, path = getattr(registry, "fs", None), getattr(registry, "model_path", None)
    if fs is None or path is None or registry in _readable:
        return None
    try:
        fs.ls(path, detail=False)
    except FileNotFoundError:
        pass  # nothing registered yet: the storage answered, so it can be read
    except Exception as e:  # noqa: BLE001 - any failure to read (denied, no credentials, unreachable) is the reason
        reason = str(e).strip() or type(e).__name__
        return f"{field}: the operator cannot read {uri} ({type(e).__name__}: {reason}); give it the storage credentials (see the README's install section)"
    _readable.add(registry)
    return None
