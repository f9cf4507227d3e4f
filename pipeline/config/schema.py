"""The schema: every section of the TOML file as a frozen attrs class.

A field's annotation gives its type (``Literal`` lists the choices) and its :func:`setting`
the default, bounds, secrecy, environment override and one-line doc. The walker, the checks
and the reference all read these classes; nothing else describes a key.
"""

# setting() returns an attrs.field(), which ruff cannot tell from a mutable default:
# ruff: noqa: RUF009

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, Literal

import attrs

from pipeline.config.spec import setting

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

_URL = ("http://", "https://")


def _section(cls: Callable[[], Any], doc: str) -> Any:
    return setting(attrs.Factory(cls), doc)


@attrs.frozen
class PipelineConfig:
    """``[pipeline]``: bounds of the whole pipeline."""

    max_active_conversations: int = setting(64, "conversations processed at once", ge=1)
    channel_capacity: int = setting(16, "bound of the channels between stages (before "
                                    "intake: intake_batch)", ge=1)
    intake_batch: int = setting(256, "most events a replay's intake stores in one statement "
                                "(also the bound of the channel before it)", ge=1)
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
    unavailable_retry_s: float = setting(
        120.0, "while the database is unavailable, work waits this long (retrying with "
        "backoff, 0.1 s growing to 5 s) before a turn is given back or a send's outcome is "
        "left unrecorded", gt=0)


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
    attempts: int = setting(3, "tries of a failing endpoint (timeout, connection error, 429, "
                            "5xx; 0.2 s doubling pauses) before the fallback answer",
                            when=_OPENAI, ge=1)
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

