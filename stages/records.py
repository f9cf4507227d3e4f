"""Frozen records that flow between the stages.

Stages exchange these and nothing else: they are immutable, validated on construction and
changed only with ``attrs.evolve``, so a record handed downstream can never be altered behind
the back of the stage that sent it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs

Format = Literal["cloud-api", "evolution"]
FORMATS: tuple[Format, ...] = ("cloud-api", "evolution")

#: what the pipeline finally did with one inbound message (DESIGN.md, "Outcomes")
Action = Literal["replied", "escalated", "held", "merged", "duplicate", "invalid", "ignored"]
ACTIONS: tuple[Action, ...] = (
    "replied", "escalated", "held", "merged", "duplicate", "invalid", "ignored",
)


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError(f"timestamp must carry a time zone, not {value!r}")
    return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    """The wall clock, in UTC: the live source's ``received_at`` and the burst buffer's now."""
    return dt.datetime.now(dt.UTC)


def _nonempty(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


@attrs.frozen
class RawEvent:
    """One webhook body as received, from a live request or a line of a recorded log.

    ``origin`` says where it came from (``"webhook"`` or ``"file.jsonl:12"``) so that every
    error about it can name the place.
    """

    received_at: dt.datetime = attrs.field(converter=_utc)
    format: Format
    body: Any
    headers: dict[str, str] = attrs.field(factory=dict)
    origin: str = "webhook"


@attrs.frozen
class InboundMessage:
    """One user message, normalised from either webhook format.

    ``sender`` is the key of the conversation inside the instance: the Cloud API ``wa_id`` or
    the Evolution ``remoteJid`` without its ``@s.whatsapp.net`` suffix (a ``@lid`` id is kept
    whole, since it carries no phone number). ``text`` is the text, caption, button title or a
    short description for kinds without text (``""`` when there is nothing to say).
    """

    instance: str = attrs.field(validator=_nonempty)
    message_id: str = attrs.field(validator=_nonempty)
    sender: str = attrs.field(validator=_nonempty)
    kind: str = attrs.field(validator=_nonempty)
    text: str
    sent_at: dt.datetime = attrs.field(converter=_utc)
    received_at: dt.datetime = attrs.field(converter=_utc)
    format: Format
    sender_name: str | None = None
    media_id: str | None = None
    reply_to: str | None = None
    origin: str = "webhook"

    @property
    def conversation_key(self) -> tuple[str, str]:
        """The key that orders work: turns of one (instance, sender) never overtake."""
        return (self.instance, self.sender)


ReceiptStatus = Literal["sent", "delivered", "read", "failed"]
#: a status never goes back: a late "sent" does not undo "read"
RECEIPT_RANK: dict[str, int] = {"sent": 1, "delivered": 2, "read": 3, "failed": 4}


@attrs.frozen
class Receipt:
    """What a channel says of a message the business sent: a status webhook (Cloud API
    ``statuses``, Evolution ``messages.update``) or Evolution's echo of its own send (a
    ``fromMe`` upsert or ``send.message``: ``number`` and ``text`` say what was sent).
    ``key`` is our idempotency key when the channel hands it back (the Cloud API's
    ``biz_opaque_callback_data``); ``error`` a failed status's code and title."""

    instance: str
    provider_id: str
    status: ReceiptStatus
    key: str | None = None
    error: str | None = None
    number: str | None = None
    text: str | None = None


@attrs.frozen
class Ignored:
    """A well-formed event that is not a user message (receipt, own send, presence...);
    ``receipt`` what it says of a message the business sent, if anything."""

    reason: str
    format: Format
    instance: str | None = None
    message_id: str | None = None
    origin: str = "webhook"
    receipt: Receipt | None = None


@attrs.frozen
class Invalid:
    """An event that could not be understood; becomes a dead letter with ``reason``.

    ``where`` is a path into the body (``entry[0].changes[0].value.messages[1].from``) or a
    file position, so that an operator can find the bad part.
    """

    reason: str
    where: str = ""
    format: str | None = None
    origin: str = "webhook"
    #: the recorded time it is placed at (a replay's outcomes are in time order)
    at: dt.datetime | None = attrs.field(default=None, eq=False)


Parsed = InboundMessage | Ignored | Invalid


@attrs.frozen
class Stored:
    """An inbound message after the inbox write: ``redelivered`` when its id was already
    there; ``pending`` when its inbox row is not processed yet."""

    message: InboundMessage
    redelivered: bool
    pending: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return self.message.conversation_key


@attrs.frozen
class TurnContext:
    """What the context stage loaded for a Turn; ``degraded`` names loads that used a default."""

    conversation_id: int
    history: str = ""
    webhook_url: str = ""
    escalated: bool = False
    recent_fallbacks: tuple[bool, ...] = ()
    degraded: tuple[tuple[str, str], ...] = ()  # (load, why) for loads that used a default


@attrs.frozen
class Decision:
    """The escalation stage's verdict: ``reply``, ``escalate`` or ``hold``, and why."""

    verdict: Literal["reply", "escalate", "hold"]
    reason: str | None = None
    out_of_hours: bool = False  # escalate, but tell the user when humans are back


@attrs.frozen
class Reply:
    """An answer of a responder; ``fallback`` when it did not understand."""

    text: str
    confidence: float
    fallback: bool
    responder: str


@attrs.frozen
class Closed:
    """An inbox row a claim closes without a turn: a repeated text, or a reaction."""

    row_id: int
    message: InboundMessage
    action: Literal["duplicate", "ignored"]
    reason: str


@attrs.frozen
class Claim:
    """A conversation's work taken from the database (see :mod:`pipeline.claims`).

    ``token`` is the lease's fencing token: the commit writes only while the conversation's
    lease still carries it. ``row_ids`` are the inbox rows of the turn, in order; ``closed``
    the rows closed along with it.
    """

    conversation_id: int
    token: int
    row_ids: tuple[int, ...]
    closed: tuple[Closed, ...] = ()
    attempts: int = 0  # failed attempts of this conversation's head turn so far


@attrs.frozen
class Turn:
    """Messages of one conversation that arrived close together, answered once.

    The later stages fill in ``context``, ``decision`` and ``reply`` with ``attrs.evolve``;
    ``timings_ms`` collects the time each stage spent on it.
    """

    turn_id: str
    instance: str
    sender: str
    messages: tuple[InboundMessage, ...]
    context: TurnContext | None = None
    decision: Decision | None = None
    reply: Reply | None = None
    timings_ms: tuple[tuple[str, float], ...] = ()
    claim: Claim | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.instance, self.sender)

    @property
    def text(self) -> str:
        """The turn's messages as one prompt, one line each."""
        return "\n".join(m.text for m in self.messages if m.text)

    def timed(self, stage: str, ms: float) -> Turn:
        return attrs.evolve(self, timings_ms=(*self.timings_ms, (stage, round(ms, 3))))


@attrs.frozen
class Outcome:
    """One line of the outcomes file: what happened to one inbound message."""

    action: Action
    message_id: str | None
    instance: str | None
    sender: str | None
    conversation_id: int | None = None
    turn_id: str | None = None
    reason: str | None = None
    reply: str | None = None
    origin: str = ""
    timings_ms: tuple[tuple[str, float], ...] = ()
    degraded: tuple[tuple[str, str], ...] = ()
    #: the recorded time of the message (of the event, for one that ended at intake): a
    #: replay writes its outcomes in this order; not part of the line
    at: dt.datetime | None = attrs.field(default=None, eq=False)
    #: a status webhook's status (``sent`` ... ``failed``), for the metrics; not in the line
    receipt: str | None = attrs.field(default=None, eq=False)

    def timed(self, stage: str, ms: float) -> Outcome:
        """The time a stage spent on the message's turn; a message that ended without a
        turn (a repeat, a reaction, an invalid event) has no stage timings: which stage
        closes it is a matter of timing, and a replay's outcomes must not depend on that."""
        if self.turn_id is None:
            return self
        return attrs.evolve(self, timings_ms=(*self.timings_ms, (stage, round(ms, 3))))

    def as_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id, "instance": self.instance, "sender": self.sender,
            "conversation_id": self.conversation_id, "turn_id": self.turn_id,
            "action": self.action, "reason": self.reason, "reply": self.reply,
            "timings_ms": dict(self.timings_ms),
            **({"degraded": dict(self.degraded)} if self.degraded else {}),
        }


# --- what a turn writes (the dispatch stage hands it to the store) ---------------------

@attrs.frozen
class TurnEffects:
    """Everything a finished Turn writes, committed with its claim in one statement."""

    turn: Turn
    action: Action
    reason: str | None
    reply_text: str | None
    outbox: tuple[tuple[str, str, str, dict[str, Any]], ...]  # (key, kind, target, payload)
    delivered: bool


@attrs.frozen
class ClaimCommit:
    """A claim's commit: the rows it closes (inbox id, action, reason, key) and the turn's
    effects, if it had a turn. ``next_due``: how long after its oldest remaining row the
    conversation is due again; ``now``: when rows exist that this commit cannot see yet."""

    claim: Claim
    instance: str
    rows: tuple[tuple[int, str, str | None, str], ...]
    effects: TurnEffects | None
    next_due: dt.timedelta
    now: dt.datetime | None  # None: the database's clock


@attrs.frozen
class Committed:
    written: bool
    next_due: dt.datetime | None
