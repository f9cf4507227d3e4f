"""The records a part of a body becomes when it is not a message: ``Ignored`` for what the
pipeline skips, ``Invalid`` for a shape problem, so that one bad part spares the rest."""

from __future__ import annotations

from collections.abc import Callable

from stages.parse.shape import ShapeError
from stages.records import Ignored, Invalid, Parsed, RawEvent


def ignored(
    event: RawEvent, reason: str, instance: str | None = None, message_id: str | None = None
) -> Ignored:
    return Ignored(
        reason=reason, format=event.format, instance=instance,
        message_id=message_id, origin=event.origin,
    )


def guarded(event: RawEvent, parse: Callable[[], Parsed | list[Parsed]]) -> list[Parsed]:
    """Run one part of a body; a shape problem in it becomes one ``Invalid`` for that part."""
    try:
        result = parse()
    except ShapeError as bad:
        invalid = Invalid(reason=bad.reason, where=bad.where, format=event.format,
                          origin=event.origin)
        return [invalid]
    return result if isinstance(result, list) else [result]
