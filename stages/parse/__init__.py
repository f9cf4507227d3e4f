"""Parse webhook bodies of the two WhatsApp formats into records.

Pure code, in the sans-I/O manner of h11: a ``RawEvent`` goes in, a list of ``Parsed``
records comes out. A webhook body is untrusted input and may batch several messages and
receipts, so :func:`parse_event` never raises on it: each shape problem becomes an
``Invalid`` naming the field, the value found and where it sits in the body, and the rest
of the body is still parsed. The result always holds at least one record, so every event
has an outcome.

The webhook server decodes request bytes with :func:`decode_body`, which bounds nesting
before any parser walks the body.

Modules: ``body`` (decoding and checking a body), ``shape`` (walking it with paths in
errors), ``fields`` and ``results`` (what both formats share), ``cloud`` and ``evolution``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs

from stages.parse.body import BodyError, check_body, decode_body
from stages.parse.cloud import parse_cloud
from stages.parse.evolution import parse_evolution
from stages.parse.results import guarded, ignored
from stages.parse.shape import describe
from stages.records import Invalid, Parsed, RawEvent

__all__ = [
    "BodyError",
    "InstanceDirectory",
    "check_body",
    "decode_body",
    "parse_event",
]


def _names_ok(_inst: object, attribute: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    for key, name in value.items():
        if not (isinstance(name, str) and name):
            raise ValueError(f"{attribute.name}[{key!r}] must be a non-empty name, not {name!r}")


@attrs.frozen
class InstanceDirectory:
    """Which configured instance a body belongs to, by the id each format carries.

    Built once from the config; a body whose id is not here is ``Invalid`` (a webhook
    pointed at the wrong pipeline must not create conversations).
    """

    by_phone_number_id: Mapping[str, str] = attrs.field(factory=dict, validator=_names_ok)
    by_evolution_name: Mapping[str, str] = attrs.field(factory=dict, validator=_names_ok)


def parse_event(event: RawEvent, instances: InstanceDirectory) -> list[Parsed]:
    """Turn one webhook body into records: user messages, ignored events, invalid parts.

    Never raises on bad input and always returns at least one record, so that every event
    gets an outcome; results keep the order of the body.
    """
    if event.format == "cloud-api":
        parse = functools.partial(parse_cloud, event, instances.by_phone_number_id)
    elif event.format == "evolution":
        parse = functools.partial(parse_evolution, event, instances.by_evolution_name)
    else:
        reason = f"format must be 'cloud-api' or 'evolution', not {describe(event.format)}"
        return [Invalid(reason=reason, format=None, origin=event.origin)]
    results = guarded(event, parse)
    return results or [ignored(event, "no messages or statuses")]
