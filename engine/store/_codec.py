"""JSON and datetime rules shared by every store backend.

JSON is stored compactly (no spaces, UTF-8 kept as is) and must be strict JSON:
no NaN/Infinity and nothing ``json`` cannot encode natively. Datetimes must be
timezone-aware; they are stored and returned in UTC.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from engine.errors import StoreError

if TYPE_CHECKING:
    from engine.store.base import TurnWrite

__all__ = ["dumps", "find_json_problem", "json_problem_error", "loads", "utc"]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

#: Compact, strict JSON encoder: ``dumps(value) -> str``.
dumps = _encoder.encode
#: JSON decoder: ``loads(text) -> value``.
loads = json.loads


def utc(value: datetime, field: str) -> datetime:
    """``value`` in UTC; naive datetimes are refused because their zone is unknown."""
    tz = value.tzinfo
    if tz is UTC:
        return value
    if tz is None or tz.utcoffset(value) is None:
        raise StoreError(
            f"{field}: datetime {value.isoformat()} is naive; "
            "pass a timezone-aware datetime (e.g. datetime.now(UTC))"
        )
    return value.astimezone(UTC)


def _fields(write: TurnWrite) -> Iterator[tuple[str, Any]]:
    conv = write.conversation
    for name in ("entities", "results", "counters"):
        value = getattr(conv, name)
        if isinstance(value, dict):
            for key, item in value.items():
                yield f"conversation.{name}[{key!r}]", item
        yield f"conversation.{name}", value
    for i, message in enumerate(write.messages):
        yield f"messages[{i}].data", message.data
    for i, change in enumerate(write.entity_changes):
        yield f"entity_changes[{i}] ({change.name}).value", change.value
        yield f"entity_changes[{i}] ({change.name}).previous", change.previous


def find_json_problem(write: TurnWrite) -> tuple[str, Exception] | None:
    """The first field of ``write`` that is not strict JSON, with the encoder's error."""
    for field, value in _fields(write):
        try:
            dumps(value)
        except (TypeError, ValueError) as error:
            return field, error
    return None


def json_problem_error(field: str, error: Exception) -> StoreError:
    """The error raised when ``field`` holds a value that cannot be stored as JSON."""
    return StoreError(
        f"{field} cannot be stored as JSON: {error}; "
        "store only str, int, float (finite), bool, None, lists and dicts with str keys "
        "(money as a decimal string, datetimes as ISO-8601 strings)"
    )
