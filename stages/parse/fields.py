"""Fields both formats carry in their own places: unix times, locations, instance ids,
labelling ids, and the content of a message."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping

import attrs

from stages.parse.shape import Node, ShapeError, describe

DIGITS = re.compile(r"[0-9]+")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime can hold


def from_unix(seconds: int, node: Node) -> dt.datetime:
    if not 0 <= seconds <= _MAX_UNIX:
        raise node.bad("a unix time in seconds")
    return _EPOCH + dt.timedelta(seconds=seconds)


def from_digits(digits: str, node: Node) -> dt.datetime:
    if len(digits) > 12:  # also keeps int() away from its digit limit
        raise node.bad("a unix time in seconds")
    return from_unix(int(digits), node)


def lookup(directory: Mapping[str, str], node: Node) -> str:
    """The configured instance of the id at ``node``; an unknown id is a shape problem."""
    key = node.text()
    instance = directory.get(key)
    if instance is None:
        raise ShapeError(f"unknown instance: {node.name} {describe(key)} is not configured",
                         node.where)
    return instance


def opt_id(node: Node) -> str | None:
    """An id used only to label an Ignored record: taken if usable, never an error."""
    return node.value if isinstance(node.value, str) and node.value else None


@attrs.frozen
class Content:
    kind: str
    text: str
    media_id: str | None = None
    reply_to: str | None = None


def place(node: Node, lat_key: str, long_key: str) -> str:
    """A location as text: its name and address if any, else ``"lat,long"``."""
    latitude = node.get(lat_key).number()
    longitude = node.get(long_key).number()
    label = [part for part in (node.get("name").opt_string(), node.get("address").opt_string())
             if part]
    return ", ".join(label) if label else f"{latitude},{longitude}"
