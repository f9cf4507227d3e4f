"""Walking parsed TOML against the schema: types, ranges, choices, unknown keys, locations.

One generic walker builds the schema classes from the parsed data and collects *every*
problem with where it sits (``[responders.faq] rules[2].match``), so that ``check-config``
explains a whole file at once instead of stopping at the first mistake.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import sys
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

import attrs
from attrs import AttrsInstance

from pipeline.config.env import overriding
from pipeline.config.spec import SPEC, Spec, expected, hints

_A = TypeVar("_A", bound=AttrsInstance)
_BAD: Any = object()  # "nothing to set": the key is absent or its value was rejected


@attrs.frozen
class Loc:
    """Where a value sits, as a TOML header and a key inside it: ``[responders.faq] rules[2]``."""

    table: str = ""
    key: str = ""

    def __str__(self) -> str:
        return f"{self.table} {self.key}".strip()

    def child(self, name: str) -> Loc:
        return Loc(self.table, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> Loc:
        if not self.table:
            return Loc(f"[[{self.key}]][{index}]")
        return Loc(self.table, f"{self.key}[{index}]")

    def enter(self) -> Loc:
        """The location of the table found here: a header of its own, or inline."""
        if not self.key:
            return self
        if not self.table:
            return Loc(f"[{self.key}]")
        if "[" in self.key or self.table.startswith("[["):
            return self
        return Loc(f"{self.table[:-1]}.{self.key}]")


@attrs.define
class Walker:
    """Builds schema classes from parsed TOML, noting each problem as ``source: where what``.

    ``name`` is the enclosing table's name (``[responders.<name>]``, an instance's ``name``),
    which environment overrides are named after.
    """

    source: str
    env: Mapping[str, str]
    problems: list[str] = attrs.Factory(list)

    def problem(self, loc: Loc, text: str) -> None:
        where = f"{loc} " if str(loc) else ""
        self.problems.append(f"{self.source}: {where}{text}")

    def table(self, cls: type[_A], data: object, loc: Loc, base: _A | None, name: str) -> _A:
        """Build ``cls`` from ``data``, on top of ``base`` when given (a default entry)."""
        if not isinstance(data, Mapping):
            self.problem(loc, f"must be a table, not {_show(data)}")
            return base if base is not None else cls()
        here = loc.enter()
        fields = {a.name: a for a in attrs.fields(cls) if a.init}
        if "name" in fields and isinstance(data.get("name"), str) and data["name"]:
            name = data["name"]  # an array entry's env overrides are named after it
        for key in data:
            if key not in fields:
                self.problem(here, f"unknown key {str(key)!r}{hint(str(key), fields)}")
        defaults = base if base is not None else cls()
        given: dict[str, Any] = {}
        for a in fields.values():
            spec: Spec = a.metadata[SPEC]
            sibling = spec.when[0] if spec.when else a.name  # _BAD: given but rejected
            current = given.get(sibling, _BAD if sibling in data else getattr(defaults, sibling))
            value = self.key(hints(cls)[a.name], spec, a.name, data, here, current,
                             getattr(defaults, a.name), name)
            if value is not _BAD:
                given[a.name] = value
        if base is None:
            return cls(**given)
        evolved: _A = attrs.evolve(typing.cast(Any, base), **given)
        return evolved

    def key(self, tp: Any, spec: Spec, key: str, data: Mapping[Any, Any], here: Loc,
            current: Any, default: Any, name: str) -> Any:
        """Convert one key; ``current`` is the value of the sibling that ``spec.when`` names."""
        at = here.child(key)
        if (var := overriding(self.env, spec, name)) is not None:
            return self.env[var]
        applies = spec.when is None or current is _BAD or current == spec.when[1]
        if key not in data:
            if typing.get_origin(tp) is dict or attrs.has(tp):  # so that env overrides apply
                return self.convert(tp, {}, at, spec, default, name)
            if spec.required and applies and current is not _BAD:
                when = f" when {spec.when[0]} = {spec.when[1]!r}" if spec.when else ""
                self.problem(at, f"is required{when}")
            return _BAD
        if not applies and spec.when is not None:
            self.problem(at, f"applies only when {spec.when[0]} = {spec.when[1]!r}, "
                             f"not {current!r}")
            return _BAD
        return self.convert(tp, data[key], at, spec, default, name)

    def convert(self, tp: Any, value: object, loc: Loc, spec: Spec, default: Any,
                name: str) -> Any:
        origin = typing.get_origin(tp)
        if origin is dict:
            return self.tables(tp, value, loc, default)
        if origin is tuple:
            return self.array(tp, value, loc, spec, name)
        if origin is None and attrs.has(tp):
            return self.table(tp, value, loc, None, name)
        return self.scalar(tp, value, loc, spec)

    def tables(self, tp: Any, value: object, loc: Loc, default: Mapping[str, Any]) -> Any:
        key_type, item = typing.get_args(tp)
        allowed = typing.get_args(key_type) if typing.get_origin(key_type) is Literal else None
        if not isinstance(value, Mapping):
            self.problem(loc, f"must be a table, not {_show(value)}")
            return _BAD
        here, result = loc.enter(), dict(default)
        entries = {str(k): v for k, v in value.items()}
        for key in entries:
            if allowed is not None and key not in allowed:
                self.problem(here, f"unknown key {key!r}{hint(key, allowed)}")
        for key in [*default, *(k for k in entries if k not in default)]:
            if allowed is None or key in allowed:
                result[key] = self.table(item, entries.get(key, {}), here.child(key),
                                         default.get(key), key)
        return result

    def array(self, tp: Any, value: object, loc: Loc, spec: Spec, name: str) -> Any:
        if not isinstance(value, list | tuple):
            self.problem(loc, f"must be {expected(tp, spec)}, not {_show(value)}")
            return _BAD
        item = typing.get_args(tp)[0]
        converted = [self.convert(item, v, loc.item(i), spec, None, name)
                     for i, v in enumerate(value)]
        return tuple(v for v in converted if v is not _BAD)

    def scalar(self, tp: Any, value: object, loc: Loc, spec: Spec) -> Any:
        if typing.get_origin(tp) is Literal:
            return self.choice(tp, value, loc, spec)
        shown = _kind(value) if spec.secret else _show(value)  # never echo a secret
        if not _is(tp, value):
            self.problem(loc, f"must be {expected(tp, spec)}, not {shown}")
            return _BAD
        converted: Any = float(typing.cast(float, value)) if tp is float else value
        broken = _violated(converted, spec) if tp in (int, float) else _string_rule(value, spec)
        if broken:
            self.problem(loc, f"must be {broken}, not {shown}")
            return _BAD
        return converted

    def choice(self, tp: Any, value: object, loc: Loc, spec: Spec) -> Any:
        choices: tuple[str, ...] = typing.get_args(tp)
        if isinstance(value, str):
            for choice in choices:
                if value == choice or (spec.casefold and value.casefold() == choice.casefold()):
                    return choice
        close = hint(value, choices) if isinstance(value, str) else ""
        self.problem(loc, f"must be {expected(tp, spec)}, not {_show(value)}{close}")
        return _BAD


def _is(tp: Any, value: object) -> bool:
    if tp is bool or isinstance(value, bool):  # a TOML bool is a Python int: keep them apart
        return tp is bool and isinstance(value, bool)
    if tp is float and isinstance(value, int):
        return abs(value) <= sys.float_info.max
    if tp is float:
        return isinstance(value, float) and math.isfinite(value)
    return isinstance(value, tp)


def _violated(value: float, spec: Spec) -> str | None:
    noun = "an integer" if isinstance(value, int) else "a number"
    if spec.ge is not None and not value >= spec.ge:
        return f"{noun} >= {spec.ge}"
    if spec.gt is not None and not value > spec.gt:
        return f"{noun} > {spec.gt}"
    if spec.le is not None and not value <= spec.le:
        return f"{noun} <= {spec.le}"
    return None


def _string_rule(value: Any, spec: Spec) -> str | None:
    if spec.nonempty and not value:
        return "a non-empty string"
    if value and spec.prefixes and not value.startswith(spec.prefixes):
        return "a url starting with " + " or ".join(spec.prefixes)
    return None


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, int) and value.bit_length() > 200:  # repr() refuses huge ints
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object) -> str:
    """What a secret's wrong value is, without the value."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    if isinstance(value, dt.date | dt.time):
        return "a date or time"
    return next((name for tp, name in names.items() if type(value) is tp), "a value")


def hint(word: str, known: Iterable[str]) -> str:
    """A did-you-mean suffix for a message: the known word closest to ``word``, if any."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

