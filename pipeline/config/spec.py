"""What one key accepts: the :class:`Spec` each schema field carries, and its wording.

The schema (``schema.py``), the walker (``walk.py``) and the reference (``reference.py``) all
read the same specs, so that a key's checks, its error messages and its documented type can
never disagree.
"""

from __future__ import annotations

import functools
import typing
from typing import Any, Literal

import attrs

SPEC = "pipeline.config.spec"  # the metadata key of a field's Spec
HIDDEN = "***"  # what a set secret is shown as


@attrs.frozen
class Spec:
    """What one key accepts, beyond the type its annotation gives.

    ``when = (sibling, value)``: the key applies only when the sibling key has that value
    (and ``required`` then means required in that case). ``env`` names the environment
    variable that overrides the key; ``{name}`` stands for the enclosing table's name.
    """

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    nonempty: bool = False  # a string (or every string of an array) must not be empty
    required: bool = False
    when: tuple[str, str] | None = None
    casefold: bool = False  # choices match in any case; the canonical choice is stored
    prefixes: tuple[str, ...] = ()  # a non-empty string must start with one of these
    secret: bool = False
    env: str | None = None


def setting(default: Any, doc: str, **rules: Any) -> Any:
    """One config key: an attrs field with its default and its :class:`Spec`."""
    return attrs.field(default=default, metadata={SPEC: Spec(doc, **rules)})


@functools.cache
def hints(cls: Any) -> dict[str, Any]:
    """The resolved annotations of a schema class (its modules use postponed annotations)."""
    return typing.get_type_hints(cls)


def expected(tp: Any, spec: Spec) -> str:
    """What a key of type ``tp`` accepts, in words: for error messages and the reference."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args)) + (" (any case)" if spec.casefold else "")
    if origin is tuple:
        return "an array of " + ("tables" if attrs.has(args[0]) else "strings")
    if origin is dict or attrs.has(tp):
        return "a table"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a non-empty string" if spec.nonempty else "a string"
    noun = "an integer" if tp is int else "a number"
    if spec.ge is not None and spec.le is not None:
        return f"{noun} between {spec.ge} and {spec.le}"
    bounds = [f"{op} {bound}" for op, bound in ((">=", spec.ge), (">", spec.gt), ("<=", spec.le))
              if bound is not None]
    return " ".join([noun, " and ".join(bounds)]).rstrip()
