"""The schema and a configuration as text for people: the key reference and a redacted dump.

``reference_rows()`` generates config/README.md's reference table (a test keeps the two
equal), so the documentation cannot drift from the schema; ``redacted()`` shows a loaded
configuration without its secrets.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from typing import Any

import attrs

from pipeline.config.schema import Config
from pipeline.config.spec import HIDDEN, SPEC, expected, hints


@attrs.frozen
class Setting:
    """One documented key: a row of config/README.md's reference table."""

    table: str  # "[database]", "[context.loads.<load>]", "[[instances]]"
    key: str  # "pool_size", "rules[].match"
    type: str
    default: str  # as TOML
    doc: str
    secret: bool
    env: str | None


def reference() -> list[Setting]:
    """Every key of the schema with its type, default and meaning, in file order."""
    return list(_describe(Config, "", ""))


def reference_rows() -> list[str]:
    """The Markdown rows of config/README.md's reference table (a test keeps them equal)."""
    rows = []
    for r in reference():
        doc = "; ".join([r.doc, *(["**secret**"] if r.secret else []),
                         *([f"env `{r.env}`"] if r.env else [])])
        rows.append(f"| `{r.table}` | `{r.key}` | {r.type} | `{r.default}` | {doc} |")
    return rows


def _describe(cls: Any, table: str, prefix: str) -> Iterator[Setting]:
    defaults = cls()
    for a in attrs.fields(cls):
        spec, tp = a.metadata.get(SPEC), hints(cls)[a.name]
        args = typing.get_args(tp)
        if spec is None:
            continue
        if attrs.has(tp):
            yield from _describe(tp, f"[{table[1:-1]}.{a.name}]" if table else f"[{a.name}]", "")
        elif typing.get_origin(tp) is dict:
            inner = f"{table[1:-1]}.{a.name}" if table else a.name
            yield from _describe(args[1], f"[{inner}.<{a.name.removesuffix('s')}>]", "")
        elif typing.get_origin(tp) is tuple and attrs.has(args[0]) and not table:
            yield from _describe(args[0], f"[[{a.name}]]", "")
        else:
            yield Setting(table, prefix + a.name, expected(tp, spec),
                          _toml(getattr(defaults, a.name)), spec.doc, spec.secret, spec.env)
            if typing.get_origin(tp) is tuple and attrs.has(args[0]):
                yield from _describe(args[0], table, f"{a.name}[].")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def redacted(cfg: Config) -> dict[str, Any]:
    """The configuration as plain dicts and lists, every set secret replaced by ``"***"``.

    An empty secret stays ``""`` (it reveals nothing and tells that the check is off).
    """
    plain: dict[str, Any] = _plain(cfg)
    return plain


def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        return {a.name: HIDDEN if a.metadata[SPEC].secret and getattr(value, a.name)
                else _plain(getattr(value, a.name)) for a in attrs.fields(type(value)) if a.init}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
