"""Decode and check a webhook request body before any parser walks it.

A body that passes is plain, bounded JSON that PostgreSQL can store as it is: valid UTF-8,
no NaN or infinity, no NUL or lone surrogate, nesting no deeper than the configured limit.
Webhook bodies and the bodies of recorded logs get the same checks.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any


class BodyError(Exception):
    """A request body that is not JSON we are willing to walk; the server answers 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _walk(obj: Any, limit: int) -> str | None:
    """The first problem of a decoded body: ``depth``, ``text`` (a NUL or a lone surrogate,
    which PostgreSQL cannot store) or ``number`` (an infinite float such as ``1e400``)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        elif isinstance(value, str):
            if _UNSTORABLE.search(value):
                return "text"
            continue
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "number"
            continue
        else:
            continue
        if level + 1 > limit:
            return "depth"
        stack.extend((child, level + 1) for child in children)
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_body(raw: bytes, max_depth: int) -> Any:
    """Decode a webhook request body, raising :class:`BodyError` with a short reason.

    Strict JSON only (no NaN/Infinity), valid UTF-8 only, nesting bounded by ``max_depth``,
    so that what reaches the parsers and the inbox is plain, bounded JSON.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not valid utf-8 at byte {exc.start}") from exc
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise BodyError(f"body is nested deeper than {max_depth} levels") from exc
    except json.JSONDecodeError as exc:
        message = exc.msg.lower().removesuffix(" at")  # some messages end in "at" already
        where = f"{message} at line {exc.lineno} column {exc.colno}"
        raise BodyError(f"body is not valid json: {where}") from exc
    except ValueError as exc:
        raise BodyError(f"body is not valid json: {str(exc).lower()}") from exc
    check_body(body, max_depth)
    return body


def check_body(body: Any, max_depth: int) -> None:
    """Raise :class:`BodyError` if a decoded body cannot be stored as it is: nested deeper
    than ``max_depth``, holding a NUL or a lone surrogate, or an infinite number. Webhook
    bodies and the bodies of recorded logs get the same checks."""
    problem = _walk(body, max_depth)
    if problem == "depth":
        raise BodyError(f"body is nested deeper than {max_depth} levels")
    if problem == "text":
        raise BodyError("body holds a NUL character or a lone surrogate (\\u0000, "
                        "\\ud800-\\udfff), which cannot be stored")
    if problem == "number":
        raise BodyError("body holds a number too large for a float (e.g. 1e400)")
