"""Cross-key checks: what one key's type and bounds cannot say alone.

They run on the walked :class:`Config` (so every value already has its type) and report at
the walker's locations: instance names unique, responders that exist, a base_url wherever a
transport needs one, business hours that parse, a DSN libpq accepts.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping

import attrs

from pipeline.config.env import overriding
from pipeline.config.schema import BusinessHoursConfig, Config, DatabaseConfig, InstanceConfig
from pipeline.config.spec import HIDDEN, SPEC
from pipeline.config.walk import Loc, hint


def cross_checks(cfg: Config, env: Mapping[str, str]) -> Iterator[tuple[Loc, str]]:
    """Every cross-key problem of ``cfg``; ``env`` tells which values came from variables."""
    yield from _hours_checks(cfg.escalation.business_hours)
    yield from _phrase_checks(cfg)
    yield from _threshold_checks(cfg)
    yield from _instance_checks(cfg)
    yield from _dispatch_checks(cfg)
    yield from _dsn_checks(cfg.database.dsn, env)


def dsn_problem(dsn: str) -> str | None:
    """Why ``dsn`` is not a libpq connection string (URL or key=value), or None when it is.

    libpq quotes pieces of the string in its reasons; any that may hold the password are
    masked as ``***``.
    """
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except Error as exc:
        reason = (str(exc).strip().splitlines() or ["unreadable"])[0]
        secrets = sorted(_password_pieces(dsn), key=len, reverse=True)

        def mask(quoted: re.Match[str]) -> str:
            text = quoted[1]
            for secret in secrets:
                text = text.replace(secret, HIDDEN)
            return f'"{text}"'

        return re.sub(r'"([^"]*)"', mask, reason)
    return None


def _password_pieces(dsn: str) -> set[str]:
    """What may be the password in a DSN that does not parse: the URL's, or the key=value
    form's up to the next ``key=`` (and each word of it, as libpq may quote just one)."""
    pieces: set[str] = set()
    if url := re.match(r"[A-Za-z][\w+.-]*://[^@/?#]*?:([^@/?#]*)@", dsn):
        pieces.add(url[1])
    if kv := re.search(r"\bpassword\s*=\s*(.*?)(?=\s+\w+\s*=|\s*$)", dsn, re.S):
        value = kv[1].strip("'")
        pieces |= {value, *value.split()}
    return {p for p in pieces if p}


def _duplicates(instances: Iterable[InstanceConfig], attr: str) -> Iterator[tuple[int, int, str]]:
    seen: dict[str, int] = {}
    for i, instance in enumerate(instances):
        value = getattr(instance, attr)
        if value in seen:
            yield i, seen[value], value
        elif value:
            seen[value] = i


def _hours_checks(hours: BusinessHoursConfig) -> Iterator[tuple[Loc, str]]:
    loc = "[escalation.business_hours]"
    try:
        zoneinfo.ZoneInfo(hours.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        yield Loc(loc, "timezone"), f"must be an IANA time zone such as 'UTC' or " \
            f"'America/Sao_Paulo', not {hours.timezone!r}"
    times = {}
    for key in ("open", "close"):
        value = getattr(hours, key)
        if re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            times[key] = value
        else:
            yield Loc(loc, key), f"must be a time as HH:MM (00:00 to 23:59), not {value!r}"
    if len(times) == 2 and times["close"] <= times["open"]:
        yield Loc(loc, "close"), f"must be after open ({times['open']}), not {times['close']!r}"


def _phrase_checks(cfg: Config) -> Iterator[tuple[Loc, str]]:
    """Keywords, request phrases and rule matches must contain a word to match."""
    from stages.textmatch import words

    def bad(texts: Iterable[str]) -> list[str]:
        return [t for t in texts if t and not words(t.rstrip("*"))]

    for key in ("keywords", "request_phrases"):
        for text in bad(getattr(cfg.escalation, key)):
            yield (Loc("[escalation]", key),
                   f"entries must contain a letter or digit to match, not {text!r}")
    for i, inst in enumerate(cfg.instances):
        for text in bad(inst.escalation_keywords):
            yield (Loc(f"[[instances]][{i}]", "escalation_keywords"),
                   f"entries must contain a letter or digit to match, not {text!r}")
    for name, responder in cfg.responders.items():
        for n, rule in enumerate(responder.rules):
            if bad([rule.match]):
                yield (Loc(f"[responders.{name}]", f"rules[{n}].match"),
                       f"must contain a letter or digit to match, not {rule.match!r}")


def _threshold_checks(cfg: Config) -> Iterator[tuple[Loc, str]]:
    threshold = cfg.escalation.max_failed_answers
    if threshold > cfg.context.recent_interactions:
        yield (Loc("[escalation]", "max_failed_answers"),
               f"must be <= [context] recent_interactions ({cfg.context.recent_interactions}): "
               f"only that many past answers are loaded, so {threshold} in a row is never seen")


def _instance_checks(cfg: Config) -> Iterator[tuple[Loc, str]]:
    if not cfg.instances:
        yield Loc("[[instances]]"), "is missing: at least one instance is needed"
    renamed: set[int] = set()  # an instance whose evolution_instance repeats a duplicate name
    for attr in ("name", "phone_number_id", "evolution_instance"):
        for i, first, value in _duplicates(cfg.instances, attr):
            if attr == "name":
                renamed.add(i)
            if attr != "evolution_instance" or i not in renamed or value != cfg.instances[i].name:
                yield (Loc(f"[[instances]][{i}]", attr),
                       f"{value!r} is already used by [[instances]][{first}]")
    for i, instance in enumerate(cfg.instances):
        if instance.responder not in cfg.responders:
            yield (Loc(f"[[instances]][{i}]", "responder"),
                   f"must name a responder of [responders], not {instance.responder!r}"
                   + hint(instance.responder, cfg.responders))


def _dispatch_checks(cfg: Config) -> Iterator[tuple[Loc, str]]:
    dispatch = cfg.dispatch
    inherited = not cfg.instances
    for i, instance in enumerate(cfg.instances):
        channel = instance.channel(dispatch)
        if channel.transport == "dry" or channel.base_url:
            continue
        if instance.transport:
            yield (Loc(f"[[instances]][{i}]", "base_url"),
                   f"is required when transport = {channel.transport!r} (here or in [dispatch])")
        else:
            inherited = True
    if inherited and dispatch.transport != "dry" and not dispatch.base_url:
        yield Loc("[dispatch]", "base_url"), f"is required when transport = {dispatch.transport!r}"
    if dispatch.backoff_max_s < dispatch.backoff_initial_s:
        initial, most = dispatch.backoff_initial_s, dispatch.backoff_max_s
        yield (Loc("[dispatch]", "backoff_max_s"),
               f"must be >= backoff_initial_s ({initial!r}), not {most!r}")


def _dsn_checks(dsn: str, env: Mapping[str, str]) -> Iterator[tuple[Loc, str]]:
    if reason := dsn_problem(dsn):
        var = overriding(env, attrs.fields(DatabaseConfig).dsn.metadata[SPEC], "")
        given = f" (from {var})" if var else ""
        yield Loc("[database]", f"dsn{given}"), f"is not a valid connection string: {reason}"
