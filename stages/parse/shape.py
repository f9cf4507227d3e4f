"""Walk the JSON shape of a body, so that a problem names the field, the value and its path.

A :class:`Node` is a value together with where it sits in the body (``entry[0].changes``);
its readers return the value if it has the expected shape and otherwise raise a
:class:`ShapeError` that says so, e.g. ``id must be a non-empty string, not 42``.
"""

from __future__ import annotations

import math
from typing import Any

MAX_ID_CHARS = 256


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING = _Missing()


class ShapeError(Exception):
    """A shape problem at one place in a body; never leaves this package (see
    :func:`stages.parse.results.guarded`)."""

    def __init__(self, reason: str, where: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where


def describe(value: Any) -> str:
    """The found value, short and JSON-flavoured, for a reason."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Node:
    """A value inside a body together with its path, so that errors can say where."""

    __slots__ = ("value", "where")

    def __init__(self, value: Any, where: str) -> None:
        self.value = value
        self.where = where

    @property
    def name(self) -> str:
        return self.where.rsplit(".", 1)[-1] or "body"

    @property
    def present(self) -> bool:
        return self.value is not _MISSING and self.value is not None

    def bad(self, expected: str) -> ShapeError:
        return ShapeError(f"{self.name} must be {expected}, not {describe(self.value)}",
                          self.where)

    def get(self, key: str) -> Node:
        if not isinstance(self.value, dict):
            raise self.bad("an object")
        return Node(self.value.get(key, _MISSING), f"{self.where}.{key}" if self.where else key)

    def items(self) -> list[Node]:
        if not isinstance(self.value, list):
            raise self.bad("a list")
        return [Node(item, f"{self.where}[{i}]") for i, item in enumerate(self.value)]

    def opt_items(self) -> list[Node]:
        return self.items() if self.present else []

    def text(self) -> str:
        """A non-empty string of at most 256 characters: ids, senders, types (they are
        indexed, and PostgreSQL limits an index row to about 2.7 kB)."""
        if isinstance(self.value, str) and 0 < len(self.value) <= MAX_ID_CHARS:
            return self.value
        if isinstance(self.value, str) and self.value:
            raise ShapeError(f"{self.name} must be at most {MAX_ID_CHARS} characters, not "
                             f"{len(self.value)}", self.where)
        raise self.bad("a non-empty string")

    def string(self) -> str:
        if isinstance(self.value, str):
            return self.value
        raise self.bad("a string")

    def opt_string(self) -> str | None:
        return self.string() if self.present else None

    def boolean(self) -> bool:
        if isinstance(self.value, bool):
            return self.value
        raise self.bad("true or false")

    def number(self) -> int | float:
        value = self.value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise self.bad("a number")

    def require_object(self) -> None:
        if not isinstance(self.value, dict):
            raise self.bad("an object")
