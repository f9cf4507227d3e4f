"""The configuration: one TOML file, parsed once at start into frozen records.

Every section is an attrs class. Its annotations give the type of each key (``Literal`` lists
the choices) and each field carries a :class:`Spec` in its metadata: bounds, string rules,
secrecy, an environment override and a one-line doc. One generic walker turns the parsed TOML
into these classes and collects *every* problem with its key path, so that ``check-config``
explains a whole file at once; a few cross-field checks run on the result. Stages receive
these records and never read files or the environment themselves (STYLE.md, rule 12).
"""

# setting() returns an attrs.field(), which ruff cannot tell from a mutable default:
# ruff: noqa: RUF009

from __future__ import annotations

import datetime as dt
import difflib
import functools
import json
import math
import os
import re
import sys
import tomllib
import typing
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
from attrs import AttrsInstance

__all__ = [
    "LOADS", "Config", "ConfigError", "ContextConfig", "DatabaseConfig", "DedupeConfig",
    "DispatchConfig", "EscalationConfig", "InstanceConfig", "IntakeConfig", "LoadConfig",
    "LoggingConfig", "MetricsConfig", "PipelineConfig", "ResponderConfig", "RuleConfig",
    "Setting", "WebhookConfig", "dsn_problem", "load_config", "parse_config", "redacted",
    "reference",
]

LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["console", "json"]
ContextMode = Literal["sequential", "parallel", "single", "batched", "claimed"]
LoadName = Literal["conversation", "history", "webhook", "escalation", "interactions"]
LoadPolicy = Literal["required", "default"]
ResponderKind = Literal["rules", "openai"]
Transport = Literal["dry", "evolution", "cloud-api"]
InstanceTransport = Literal["", "dry", "evolution", "cloud-api"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
LOADS: tuple[LoadName, ...] = typing.get_args(LoadName)

_SPEC = "pipeline.config.spec"
_URL = ("http://", "https://")
_HIDDEN = "***"
_BAD: Any = object()  # "nothing to set": the key is absent or its value was rejected


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists all of them, one line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


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
    return attrs.field(default=default, metadata={_SPEC: Spec(doc, **rules)})


def _section(cls: Callable[[], Any], doc: str) -> Any:
    return setting(attrs.Factory(cls), doc)


@attrs.frozen
class PipelineConfig:
    """``[pipeline]``: bounds of the whole pipeline."""

    max_active_conversations: int = setting(64, "conversations processed at once", ge=1)
    channel_capacity: int = setting(16, "bound of every channel between stages", ge=1)
    shutdown_grace_s: float = setting(10.0, "time in-flight turns get on SIGINT/SIGTERM", ge=0)
    roles: tuple[Literal["webhook", "turns", "delivery"], ...] = setting(
        ("webhook", "turns", "delivery"), "what `pipeline run` does: serve the webhooks, "
        "process turns, deliver the outbox (any of them; `--roles` overrides)")
    lease_s: float = setting(30.0, "a claimed conversation's lease: renewed every third of it "
                             "while its turn runs; a dead process's turns are redone after it",
                             gt=0)
    poll_interval_ms: float = setting(200.0, "how often `pipeline run` looks for due work "
                                      "written by other processes", gt=0)


@attrs.frozen
class DatabaseConfig:
    """``[database]``: the store; no DSN means the embedded private PostgreSQL."""

    dsn: str = setting("", "PostgreSQL DSN; empty = embedded private PostgreSQL",
                       secret=True, env="PIPELINE_DATABASE_DSN")
    data_dir: str = setting(".pipeline/pgdata", "embedded cluster directory (relative to the "
                            "current directory)", nonempty=True)
    tcp_port: int = setting(0, "embedded cluster TCP port; 0 = Unix socket only", ge=0, le=65535)
    pool_size: int = setting(10, "database connections", ge=1, le=1000)
    connect_timeout_s: float = setting(5.0, "time to connect", gt=0)
    query_timeout_s: float = setting(5.0, "time one query may take", gt=0)
    migrate_on_start: bool = setting(True, "apply pending migrations at start")


@attrs.frozen
class LoggingConfig:
    """``[logging]``: loguru sink level and format."""

    level: LogLevel = setting("INFO", "lowest level logged (any case)", casefold=True)
    format: LogFormat = setting("console", "console (human) or json (one object a line)")


@attrs.frozen
class MetricsConfig:
    """``[metrics]``: what is reported about a run."""

    summary: bool = setting(True, "print the per-stage summary table at the end of a run/replay")


@attrs.frozen
class ReplayConfig:
    """``[replay]``: reading recorded logs (``pipeline replay``)."""

    reorder_window_s: float = setting(
        600.0, "lines out of received_at order by up to this much are put back in place; "
        "a line further out is reported and not replayed (`--reorder-window` overrides)", gt=0)


@attrs.frozen
class RetentionConfig:
    """``[retention]``: how long finished rows are kept; ``pipeline run`` deletes older ones
    (``pipeline/retention.py``). Pending work and conversations are never deleted."""

    inbox_days: int = setting(
        30, "processed inbox rows are deleted this many days after they were processed; "
        "0 = kept forever (a redelivered message id older than this is answered again)", ge=0)
    outbox_days: int = setting(30, "delivered outbox rows are deleted this many days after "
                               "delivery; 0 = kept forever", ge=0)
    dead_letters_days: int = setting(90, "dead letters (and dead outbox rows) are deleted this "
                                     "many days after they were written; 0 = kept forever", ge=0)
    interval_s: float = setting(3600.0, "time between two retention passes", gt=0)
    batch_rows: int = setting(1000, "rows deleted per statement", ge=1)
    batch_pause_ms: float = setting(100.0, "pause between two batches, so a large backlog never "
                                    "hogs the database", ge=0)


@attrs.frozen
class WebhookConfig:
    """``[webhook]``: the live webhook source of ``pipeline run``."""

    enabled: bool = setting(True, "serve the live webhook source in `pipeline run`")
    host: str = setting("127.0.0.1", "address to listen on", nonempty=True)
    port: int = setting(8080, "port to listen on; 0 = any free port", ge=0, le=65535)
    max_body_bytes: int = setting(1048576, "largest accepted request body", ge=1)
    max_json_depth: int = setting(32, "deepest accepted JSON nesting", ge=1)
    app_secret: str = setting("", "Meta app secret for X-Hub-Signature-256; empty = not "
                              "checked (warned)", secret=True, env="PIPELINE_WEBHOOK_APP_SECRET")
    verify_token: str = setting("", "Meta GET verification token", secret=True,
                                env="PIPELINE_WEBHOOK_VERIFY_TOKEN")
    evolution_apikey: str = setting("", "expected `apikey` header of Evolution webhooks; "
                                    "empty = not checked", secret=True,
                                    env="PIPELINE_EVOLUTION_APIKEY")
    resolve_token: str = setting("", "bearer token of the escalation-resolve endpoint",
                                 secret=True, env="PIPELINE_RESOLVE_TOKEN")
    record_dir: str = setting("", "record live intake to daily JSONL logs here; empty = off")


@attrs.frozen
class ConsoleConfig:
    """``[console]``: the agents' web page at ``/console`` on the webhook server
    (``pipeline/console/``): open escalations, conversations, replies, notes, hand-back."""

    token: str = setting("", "what agents sign in with (and `Authorization: Bearer` for "
                         "scripts); \"\" = the console is off", secret=True,
                         env="PIPELINE_CONSOLE_TOKEN")
    allow_remote: bool = setting(False, "answer clients that are not on this machine "
                                 "(loopback only by default; put TLS in front first)")
    session_hours: float = setting(12.0, "how long a sign-in lasts", gt=0)
    refresh_s: float = setting(5.0, "how often the queue and an open conversation refresh "
                               "themselves", gt=0)
    history_limit: int = setting(200, "latest entries shown of a conversation", ge=1)
    hold_on_phone_reply: bool = setting(True, "a message sent from the business phone itself "
                                        "(not by the pipeline) hands its conversation to "
                                        "humans: the assistant stays silent until resolved")


@attrs.frozen
class BufferConfig:
    """``[intake.buffer]``: the burst buffer that folds close messages into one turn."""

    window_ms: int = setting(1500, "a message within this time of the sender's previous one "
                             "joins its turn; 0 = no buffering", ge=0)
    max_wait_ms: int = setting(5000, "a turn closes at the latest this long after its first "
                               "message; 0 = no limit", ge=0)
    max_messages: int = setting(10, "most messages in one turn", ge=1)


@attrs.frozen
class IntakeConfig:
    """``[intake]``: what happens between a webhook or log line and the stages."""

    buffer: BufferConfig = _section(BufferConfig, "the burst buffer")


@attrs.frozen
class DedupeConfig:
    """``[dedupe]``: duplicate detection beyond redelivered message ids."""

    content_window_s: float = setting(30.0, "same text from the same sender within this window "
                                      "is a duplicate; 0 = off", ge=0)


@attrs.frozen
class LoadConfig:
    """``[context.loads.<load>]``: timeout and failure policy of one context query."""

    timeout_ms: float = setting(500.0, "time the query may take", gt=0)
    policy: LoadPolicy = setting("default", "on failure: fail the turn (required) or carry on "
                                 "with a safe default; conversation and escalation default "
                                 "to required")


def _default_loads() -> dict[LoadName, LoadConfig]:
    required = LoadConfig(policy="required")
    return {name: required if name in ("conversation", "escalation") else LoadConfig()
            for name in LOADS}


@attrs.frozen
class ContextConfig:
    """``[context]``: how the context of a turn is loaded."""

    mode: ContextMode = setting("claimed", "how the loads run: sequential, parallel, single "
                                "(one round trip), batched, or claimed (loaded by the "
                                "claim's statement: no round trip of its own)")
    history_chars: int = setting(800, "most characters of history loaded", ge=0)
    recent_interactions: int = setting(5, "AI interactions loaded", ge=0)
    batch_size: int = setting(64, "largest batch (batched mode)", ge=1)
    batch_delay_ms: float = setting(0.0, "extra wait to fill a batch (batched mode); 0 = a "
                                    "batch leaves as soon as a connection is free, with the "
                                    "turns that queued meanwhile", ge=0)
    instance_cache_ttl_s: float = setting(30.0, "instance settings are cached this long", gt=0)
    loads: dict[LoadName, LoadConfig] = setting(attrs.Factory(_default_loads),
                                                "per-query timeout and failure policy")


_KEYWORDS = ("human", "agent", "atendente", "humano", "pessoa", "falar com alguem", "manager",
             "gerente")


@attrs.frozen
class BusinessHoursConfig:
    """``[escalation.business_hours]``: when humans are there to take a conversation over."""

    enabled: bool = setting(False, "outside these hours an escalation answers with "
                            "out_of_hours_message instead of handing over")
    timezone: str = setting("UTC", "IANA time zone of the hours below", nonempty=True)
    days: tuple[Weekday, ...] = setting(("mon", "tue", "wed", "thu", "fri"), "open days")
    open: str = setting("09:00", "opening time, HH:MM", nonempty=True)
    close: str = setting("18:00", "closing time, HH:MM (after open)", nonempty=True)


_REQUESTS = ("talk to a human", "speak to a human", "talk to a person", "real person",
             "falar com um atendente", "falar com atendente", "falar com uma pessoa",
             "hablar con un agente", "hablar con una persona", "hablar con un humano",
             "التحدث مع موظف", "أريد التحدث مع شخص", "خدمة العملاء")


@attrs.frozen
class EscalationConfig:
    """``[escalation]``: when a turn goes to a human (instances may refine)."""

    keywords: tuple[str, ...] = setting(_KEYWORDS, "a message containing one of these words "
                                        "(any case, accents or script) asks for a human",
                                        nonempty=True)
    request_phrases: tuple[str, ...] = setting(_REQUESTS, "explicit requests for a human, "
                                               "matched like keywords", nonempty=True)
    max_failed_answers: int = setting(3, "a turn whose answer would be the Nth failed one "
                                      "in a row is handed over instead (the escalation "
                                      "threshold)", ge=1)
    min_confidence: float = setting(0.5, "an answer below this confidence counts as failed",
                                    ge=0, le=1)
    handover_message: str = setting("A human agent will continue this conversation shortly.",
                                    "sent to the user when the turn is escalated")
    out_of_hours_message: str = setting(
        "Our team is not available right now; we will get back to you in business hours.",
        "sent instead of the hand-over outside business hours")
    business_hours: BusinessHoursConfig = _section(BusinessHoursConfig, "business hours")


@attrs.frozen
class RuleConfig:
    """One entry of a rules responder's ``rules``."""

    match: str = setting("", "a word or phrase of the message (any case, accents or script); "
                         "a trailing * matches a word's start", required=True, nonempty=True)
    reply: str = setting("", "the answer", required=True)
    confidence: float = setting(0.9, "confidence recorded for this answer", ge=0, le=1)


_RULES = ("kind", "rules")
_OPENAI = ("kind", "openai")


@attrs.frozen
class ResponderConfig:
    """``[responders.<name>]``: a rules responder or an OpenAI-compatible one."""

    kind: ResponderKind = setting("rules", "rules (from this file) or openai (chat endpoint)")
    fallback: str = setting("Sorry, I did not understand. Could you rephrase?",
                            "answer when no rule matches or the endpoint fails")
    rules: tuple[RuleConfig, ...] = setting((), "first matching rule answers", when=_RULES)
    url: str = setting("", "OpenAI-compatible chat completions URL", when=_OPENAI,
                       required=True, nonempty=True, prefixes=_URL)
    model: str = setting("", "model name", when=_OPENAI, required=True, nonempty=True)
    api_key: str = setting("", "bearer token of the endpoint", when=_OPENAI, secret=True,
                           env="PIPELINE_RESPONDER_{name}_API_KEY")
    timeout_s: float = setting(10.0, "time one completion may take", when=_OPENAI, gt=0)
    system_prompt: str = setting("You are a helpful assistant.", "system message", when=_OPENAI)


@attrs.frozen
class DispatchConfig:
    """``[dispatch]``: how replies and events are delivered."""

    transport: Transport = setting("dry", "dry (record only), evolution or cloud-api")
    base_url: str = setting("", "Evolution API or Cloud API base URL (required unless dry)",
                            prefixes=_URL)
    api_key: str = setting("", "Evolution apikey / Cloud API bearer token", secret=True)
    max_attempts: int = setting(10, "sends before a dead letter (the defaults retry for "
                                "about 25 minutes, like Evolution's own webhooks)", ge=1)
    backoff_initial_s: float = setting(5.0, "first pause between attempts", gt=0)
    backoff_max_s: float = setting(300.0, "longest pause (>= backoff_initial_s; hours are "
                                   "fine)", gt=0)
    timeout_s: float = setting(10.0, "time one send may take", gt=0)
    reconcile_s: float = setting(30.0, "a send whose outcome is unknown (its process died, "
                                 "its answer was lost) waits this long for the channel's "
                                 "echo before it is sent again", ge=0)
    per_number_per_s: float = setting(80.0, "sends per second per business number, in one "
                                      "process (WhatsApp's default throughput)", gt=0)
    per_recipient_gap_s: float = setting(1.0, "least time between two sends to the same "
                                         "user (WhatsApp refuses bursts: 131056)", ge=0)
    concurrency: int = setting(16, "deliveries in flight at once (one per conversation)", ge=1)
    poll_interval_s: float = setting(1.0, "how often the outbox is checked for rows due "
                                     "(new rows wake the delivery task at once)", gt=0)


def _name_of(instance: InstanceConfig) -> str:
    return instance.name


@attrs.frozen
class InstanceConfig:
    """``[[instances]]``: one business number, as named in webhooks."""

    name: str = setting("", "unique name of the business number", required=True, nonempty=True)
    phone_number_id: str = setting("", "Cloud API metadata.phone_number_id (unique if set)")
    evolution_instance: str = setting(attrs.Factory(_name_of, takes_self=True),
                                      "Evolution `instance` field (default: the name; unique)")
    responder: str = setting("rules", "a responder of [responders]", nonempty=True)
    webhook_url: str = setting("", "customer webhook target; empty = none", prefixes=_URL)
    webhook_secret: str = setting("", "HMAC key of the customer webhook", secret=True)
    escalation_enabled: bool = setting(True, "false: this instance never hands over")
    escalation_keywords: tuple[str, ...] = setting((), "added to [escalation] keywords",
                                                   nonempty=True)
    max_failed_answers: int = setting(0, "0 = the [escalation] value", ge=0)
    transport: InstanceTransport = setting(
        "", "how this number's replies are sent: dry, evolution or cloud-api; "
        "\"\" = [dispatch] transport")
    base_url: str = setting("", "its Evolution API / Cloud API base URL; \"\" = [dispatch] "
                            "base_url", prefixes=_URL)
    api_key: str = setting("", "its Evolution apikey / Cloud API bearer token; \"\" = "
                           "[dispatch] api_key", secret=True,
                           env="PIPELINE_INSTANCE_{name}_API_KEY")
    template: str = setting("", "Cloud API: the approved template sent instead of a reply "
                            "due more than 24 h after the user's last message; \"\" = such a "
                            "reply is refused (a dead letter saying why)")
    template_language: str = setting("en_US", "the template's language code", nonempty=True)

    def channel(self, dispatch: DispatchConfig) -> Channel:
        """How this number's replies go out: its own settings, else ``[dispatch]``'s."""
        return Channel(self.transport or dispatch.transport,
                       self.base_url or dispatch.base_url, self.api_key or dispatch.api_key)


@attrs.frozen
class Channel:
    """One number's way out: ``transport`` with its ``base_url`` and ``api_key``."""

    transport: Transport
    base_url: str
    api_key: str = attrs.field(repr=False)


def _index(attr: str) -> Callable[[Config], dict[str, str]]:
    def index(cfg: Config) -> dict[str, str]:
        return {getattr(i, attr): i.name for i in cfg.instances if getattr(i, attr)}
    return index


@attrs.frozen
class Config:
    """The whole configuration. Build it with :func:`load_config` or :func:`parse_config`."""

    pipeline: PipelineConfig = _section(PipelineConfig, "bounds of the whole pipeline")
    database: DatabaseConfig = _section(DatabaseConfig, "PostgreSQL")
    logging: LoggingConfig = _section(LoggingConfig, "logs")
    metrics: MetricsConfig = _section(MetricsConfig, "metrics")
    webhook: WebhookConfig = _section(WebhookConfig, "the live webhook source")
    console: ConsoleConfig = _section(ConsoleConfig, "the agents' web console")
    replay: ReplayConfig = _section(ReplayConfig, "reading recorded logs")
    retention: RetentionConfig = _section(RetentionConfig, "deleting old finished rows")
    intake: IntakeConfig = _section(IntakeConfig, "burst buffer and inbox")
    dedupe: DedupeConfig = _section(DedupeConfig, "duplicate detection")
    context: ContextConfig = _section(ContextConfig, "context loading")
    escalation: EscalationConfig = _section(EscalationConfig, "escalation defaults")
    responders: dict[str, ResponderConfig] = setting(
        attrs.Factory(lambda: {"rules": ResponderConfig()}), "named responders")
    dispatch: DispatchConfig = _section(DispatchConfig, "delivery of replies and events")
    instances: tuple[InstanceConfig, ...] = setting((), "the business numbers served")
    #: Cloud API ``phone_number_id`` -> instance name
    instance_by_phone_number_id: dict[str, str] = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(_index("phone_number_id"),
                                                                takes_self=True))
    #: Evolution ``instance`` -> instance name
    instance_by_evolution_name: dict[str, str] = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(_index("evolution_instance"),
                                                                takes_self=True))

    def instance(self, name: str) -> InstanceConfig:
        """The instance called ``name``; ``KeyError`` if there is none."""
        for candidate in self.instances:
            if candidate.name == name:
                return candidate
        raise KeyError(name)


# --- the walker -------------------------------------------------------------------------------

_A = TypeVar("_A", bound=AttrsInstance)


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@attrs.frozen
class _Loc:
    """Where a value sits, as a TOML header and a key inside it: ``[responders.faq] rules[2]``."""

    table: str = ""
    key: str = ""

    def __str__(self) -> str:
        return f"{self.table} {self.key}".strip()

    def child(self, name: str) -> _Loc:
        return _Loc(self.table, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> _Loc:
        if not self.table:
            return _Loc(f"[[{self.key}]][{index}]")
        return _Loc(self.table, f"{self.key}[{index}]")

    def enter(self) -> _Loc:
        """The location of the table found here: a header of its own, or inline."""
        if not self.key:
            return self
        if not self.table:
            return _Loc(f"[{self.key}]")
        if "[" in self.key or self.table.startswith("[["):
            return self
        return _Loc(f"{self.table[:-1]}.{self.key}]")


@attrs.define
class _Walker:
    source: str
    env: Mapping[str, str]
    problems: list[str] = attrs.Factory(list)

    def problem(self, loc: _Loc, text: str) -> None:
        where = f"{loc} " if str(loc) else ""
        self.problems.append(f"{self.source}: {where}{text}")

    def table(self, cls: type[_A], data: object, loc: _Loc, base: _A | None, name: str) -> _A:
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
                self.problem(here, f"unknown key {str(key)!r}{_hint(str(key), fields)}")
        defaults = base if base is not None else cls()
        given: dict[str, Any] = {}
        for a in fields.values():
            spec: Spec = a.metadata[_SPEC]
            sibling = spec.when[0] if spec.when else a.name  # _BAD: given but rejected
            current = given.get(sibling, _BAD if sibling in data else getattr(defaults, sibling))
            value = self.key(_hints(cls)[a.name], spec, a.name, data, here, current,
                             getattr(defaults, a.name), name)
            if value is not _BAD:
                given[a.name] = value
        if base is None:
            return cls(**given)
        evolved: _A = attrs.evolve(typing.cast(Any, base), **given)
        return evolved

    def key(self, tp: Any, spec: Spec, key: str, data: Mapping[Any, Any], here: _Loc,
            current: Any, default: Any, name: str) -> Any:
        """Convert one key; ``current`` is the value of the sibling that ``spec.when`` names."""
        at = here.child(key)
        if spec.env is not None:
            var = spec.env.format(name=name.upper().replace("-", "_"))
            if var in self.env:
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

    def convert(self, tp: Any, value: object, loc: _Loc, spec: Spec, default: Any,
                name: str) -> Any:
        origin = typing.get_origin(tp)
        if origin is dict:
            return self.tables(tp, value, loc, default)
        if origin is tuple:
            return self.array(tp, value, loc, spec, name)
        if origin is None and attrs.has(tp):
            return self.table(tp, value, loc, None, name)
        return self.scalar(tp, value, loc, spec)

    def tables(self, tp: Any, value: object, loc: _Loc, default: Mapping[str, Any]) -> Any:
        key_type, item = typing.get_args(tp)
        allowed = typing.get_args(key_type) if typing.get_origin(key_type) is Literal else None
        if not isinstance(value, Mapping):
            self.problem(loc, f"must be a table, not {_show(value)}")
            return _BAD
        here, result = loc.enter(), dict(default)
        entries = {str(k): v for k, v in value.items()}
        for key in entries:
            if allowed is not None and key not in allowed:
                self.problem(here, f"unknown key {key!r}{_hint(key, allowed)}")
        for key in [*default, *(k for k in entries if k not in default)]:
            if allowed is None or key in allowed:
                result[key] = self.table(item, entries.get(key, {}), here.child(key),
                                         default.get(key), key)
        return result

    def array(self, tp: Any, value: object, loc: _Loc, spec: Spec, name: str) -> Any:
        if not isinstance(value, list | tuple):
            self.problem(loc, f"must be {_expected(tp, spec)}, not {_show(value)}")
            return _BAD
        item = typing.get_args(tp)[0]
        converted = [self.convert(item, v, loc.item(i), spec, None, name)
                     for i, v in enumerate(value)]
        return tuple(v for v in converted if v is not _BAD)

    def scalar(self, tp: Any, value: object, loc: _Loc, spec: Spec) -> Any:
        if typing.get_origin(tp) is Literal:
            return self.choice(tp, value, loc, spec)
        shown = _kind(value) if spec.secret else _show(value)  # never echo a secret
        if not _is(tp, value):
            self.problem(loc, f"must be {_expected(tp, spec)}, not {shown}")
            return _BAD
        converted: Any = float(typing.cast(float, value)) if tp is float else value
        broken = _violated(converted, spec) if tp in (int, float) else _string_rule(value, spec)
        if broken:
            self.problem(loc, f"must be {broken}, not {shown}")
            return _BAD
        return converted

    def choice(self, tp: Any, value: object, loc: _Loc, spec: Spec) -> Any:
        choices: tuple[str, ...] = typing.get_args(tp)
        if isinstance(value, str):
            for choice in choices:
                if value == choice or (spec.casefold and value.casefold() == choice.casefold()):
                    return choice
        hint = _hint(value, choices) if isinstance(value, str) else ""
        self.problem(loc, f"must be {_expected(tp, spec)}, not {_show(value)}{hint}")
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


def _expected(tp: Any, spec: Spec) -> str:
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


def _hint(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _duplicates(instances: Iterable[InstanceConfig], attr: str) -> Iterator[tuple[int, int, str]]:
    seen: dict[str, int] = {}
    for i, instance in enumerate(instances):
        value = getattr(instance, attr)
        if value in seen:
            yield i, seen[value], value
        elif value:
            seen[value] = i


def _hours_checks(hours: BusinessHoursConfig) -> Iterator[tuple[_Loc, str]]:
    loc = "[escalation.business_hours]"
    try:
        zoneinfo.ZoneInfo(hours.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        yield _Loc(loc, "timezone"), f"must be an IANA time zone such as 'UTC' or " \
            f"'America/Sao_Paulo', not {hours.timezone!r}"
    times = {}
    for key in ("open", "close"):
        value = getattr(hours, key)
        if re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            times[key] = value
        else:
            yield _Loc(loc, key), f"must be a time as HH:MM (00:00 to 23:59), not {value!r}"
    if len(times) == 2 and times["close"] <= times["open"]:
        yield _Loc(loc, "close"), f"must be after open ({times['open']}), not {times['close']!r}"


def _phrase_checks(cfg: Config) -> Iterator[tuple[_Loc, str]]:
    """Keywords, request phrases and rule matches must contain a word to match."""
    from stages.textmatch import words

    def bad(texts: Iterable[str]) -> list[str]:
        return [t for t in texts if t and not words(t.rstrip("*"))]

    for key in ("keywords", "request_phrases"):
        for text in bad(getattr(cfg.escalation, key)):
            yield (_Loc("[escalation]", key),
                   f"entries must contain a letter or digit to match, not {text!r}")
    for i, inst in enumerate(cfg.instances):
        for text in bad(inst.escalation_keywords):
            yield (_Loc(f"[[instances]][{i}]", "escalation_keywords"),
                   f"entries must contain a letter or digit to match, not {text!r}")
    for name, responder in cfg.responders.items():
        for n, rule in enumerate(responder.rules):
            if bad([rule.match]):
                yield (_Loc(f"[responders.{name}]", f"rules[{n}].match"),
                       f"must contain a letter or digit to match, not {rule.match!r}")


def _cross_checks(cfg: Config) -> Iterator[tuple[_Loc, str]]:
    yield from _hours_checks(cfg.escalation.business_hours)
    yield from _phrase_checks(cfg)
    threshold = cfg.escalation.max_failed_answers
    if threshold > cfg.context.recent_interactions:
        yield (_Loc("[escalation]", "max_failed_answers"),
               f"must be <= [context] recent_interactions ({cfg.context.recent_interactions}): "
               f"only that many past answers are loaded, so {threshold} in a row is never seen")
    if not cfg.instances:
        yield _Loc("[[instances]]"), "is missing: at least one instance is needed"
    renamed: set[int] = set()  # an instance whose evolution_instance repeats a duplicate name
    for attr in ("name", "phone_number_id", "evolution_instance"):
        for i, first, value in _duplicates(cfg.instances, attr):
            if attr == "name":
                renamed.add(i)
            if attr != "evolution_instance" or i not in renamed or value != cfg.instances[i].name:
                yield (_Loc(f"[[instances]][{i}]", attr),
                       f"{value!r} is already used by [[instances]][{first}]")
    for i, instance in enumerate(cfg.instances):
        if instance.responder not in cfg.responders:
            yield (_Loc(f"[[instances]][{i}]", "responder"),
                   f"must name a responder of [responders], not {instance.responder!r}"
                   + _hint(instance.responder, cfg.responders))
    dispatch = cfg.dispatch
    inherited = not cfg.instances
    for i, instance in enumerate(cfg.instances):
        channel = instance.channel(dispatch)
        if channel.transport == "dry" or channel.base_url:
            continue
        if instance.transport:
            yield (_Loc(f"[[instances]][{i}]", "base_url"),
                   f"is required when transport = {channel.transport!r} (here or in [dispatch])")
        else:
            inherited = True
    if inherited and dispatch.transport != "dry" and not dispatch.base_url:
        yield _Loc("[dispatch]", "base_url"), f"is required when transport = {dispatch.transport!r}"
    if dispatch.backoff_max_s < dispatch.backoff_initial_s:
        initial, most = dispatch.backoff_initial_s, dispatch.backoff_max_s
        yield (_Loc("[dispatch]", "backoff_max_s"),
               f"must be >= backoff_initial_s ({initial!r}), not {most!r}")


# --- the public functions ---------------------------------------------------------------------

def embedded_default() -> Path:
    """The config used when none is given: the commented example shipped with the package
    (``config/pipeline.toml`` is a link to it), so the example always runs as-is."""
    return Path(str(resources.files("pipeline") / "data" / "default.toml"))


def parse_config(data: Mapping[str, Any], source: str,
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate parsed TOML ``data`` (named ``source`` in messages) into a :class:`Config`.

    Environment overrides come from ``env`` (``os.environ`` when None). Raises
    :class:`ConfigError` listing every problem found, not only the first.
    """
    walker = _Walker(source, os.environ if env is None else env)
    cfg = walker.table(Config, data, _Loc(), None, "")
    for loc, text in _cross_checks(cfg):
        walker.problem(loc, text)
    if reason := dsn_problem(cfg.database.dsn):
        var = attrs.fields(DatabaseConfig).dsn.metadata[_SPEC].env
        given = f" (from {var})" if var in walker.env else ""
        walker.problem(_Loc("[database]", f"dsn{given}"),
                       f"is not a valid connection string: {reason}")
    if walker.problems:
        raise ConfigError(walker.problems)
    return cfg


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
                text = text.replace(secret, _HIDDEN)
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


def load_config(path: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path``; None means the embedded default.

    Every problem (unreadable file, TOML syntax with its line and column, bad keys and
    values) is raised as one :class:`ConfigError`.
    """
    source = os.fspath(embedded_default() if path is None else path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError([f"{source}: cannot read the file: {reason}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not utf-8 text (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        raise ConfigError([f"{source}: invalid toml: {message[:1].lower()}{message[1:]}"]) \
            from exc
    except RecursionError as exc:
        raise ConfigError([f"{source}: invalid toml: tables or arrays nested too deep"]) from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError([f"{source}: invalid toml: {str(exc).lower()}"]) from exc
    return parse_config(data, source, env)


def redacted(cfg: Config) -> dict[str, Any]:
    """The configuration as plain dicts and lists, every set secret replaced by ``"***"``.

    An empty secret stays ``""`` (it reveals nothing and tells that the check is off).
    """
    plain: dict[str, Any] = _plain(cfg)
    return plain


def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        return {a.name: _HIDDEN if a.metadata[_SPEC].secret and getattr(value, a.name)
                else _plain(getattr(value, a.name)) for a in attrs.fields(type(value)) if a.init}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@attrs.frozen
class Setting:
    """One documented key, e.g. for ``check-config --explain`` and config/README.md."""

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
        spec, tp = a.metadata.get(_SPEC), _hints(cls)[a.name]
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
            yield Setting(table, prefix + a.name, _expected(tp, spec),
                          _toml(getattr(defaults, a.name)), spec.doc, spec.secret, spec.env)
            if typing.get_origin(tp) is tuple and attrs.has(args[0]):
                yield from _describe(args[0], table, f"{a.name}[].")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
