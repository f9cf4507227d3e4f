"""Escalation: pure rules over the loaded context decide reply, escalate or hold.

Order of the rules (the common ground of Chatwoot, Rasa, Intercom and Zendesk, see
shared/research): a conversation already with a human is held (the user's messages are
stored, the AI stays silent); an instance with escalation switched off always replies; an
explicit request for a human, then a keyword, hands over; otherwise the assistant replies --
and when that answer would be the Nth failed one in a row (a fallback, or below
``min_confidence``), :func:`after_answer` hands over instead of sending it (Rasa's two-stage
fallback, generalised: a turn the assistant can answer is answered). An escalation outside
business hours is still an escalation (the conversation waits for a human) but is flagged
``out_of_hours`` so that the user is told when someone will be back instead of being
promised an agent "shortly". Failed answers before the conversation's last resolved
escalation do not count (the context load leaves them out).

Time is the turn's last ``received_at``, never the wall clock, so a replay decides exactly as
the live run did.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import attrs

from stages.records import Decision, Reply, Turn, TurnContext
from stages.textmatch import Matcher, words

__all__ = ["WEEKDAYS", "BusinessHours", "Escalation", "EscalationRules", "after_answer",
           "decide", "fallback_streak"]

#: ``datetime.weekday()`` order, as the config spells the days
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _known_days(_inst: object, _attr: attrs.Attribute[frozenset[str]],
                days: frozenset[str]) -> None:
    unknown = sorted(days - set(WEEKDAYS))
    if unknown:
        raise ValueError(f"days must be among {', '.join(WEEKDAYS)}, not {unknown!r}")


def _zone(hours: BusinessHours) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(hours.timezone)


@attrs.frozen
class BusinessHours:
    """When humans are there: ``open <= local time < close`` on ``days`` in ``timezone``.

    Disabled means always open: escalations never carry ``out_of_hours``.
    """

    enabled: bool = False
    timezone: str = "UTC"
    days: frozenset[str] = attrs.field(default=frozenset(WEEKDAYS[:5]), validator=_known_days)
    open: dt.time = dt.time(9, 0)
    close: dt.time = dt.time(18, 0)
    _tz: zoneinfo.ZoneInfo = attrs.field(init=False, eq=False, repr=False,
                                         default=attrs.Factory(_zone, takes_self=True))

    def __attrs_post_init__(self) -> None:
        if self.close <= self.open:
            raise ValueError(f"close must be after open ({self.open}), not {self.close}")

    def is_open(self, at: dt.datetime) -> bool:
        """Whether humans are there at the aware instant ``at``."""
        if not self.enabled:
            return True
        local = at.astimezone(self._tz)
        return (WEEKDAYS[local.weekday()] in self.days
                and self.open <= local.time().replace(tzinfo=None) < self.close)


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, not {value!r}")


def _compile_keywords(rules: EscalationRules) -> Matcher:
    return Matcher.of(rules.keywords)


def _compile_requests(rules: EscalationRules) -> Matcher:
    return Matcher.of(rules.request_phrases)


@attrs.frozen
class EscalationRules:
    """One instance's escalation settings; keywords and phrases are compiled once here,
    not per turn (``ValueError`` if one has no letters or digits and so could never match).

    ``max_failed_answers`` is the threshold: that many failed answers in a row escalate;
    an answer below ``min_confidence`` counts as failed.
    """

    keywords: tuple[str, ...]
    max_failed_answers: int = attrs.field(validator=_positive)
    request_phrases: tuple[str, ...] = ()
    enabled: bool = True
    hours: BusinessHours = attrs.field(factory=BusinessHours)
    min_confidence: float = 0.0
    _keywords: Matcher = attrs.field(init=False, eq=False, repr=False,
                                     default=attrs.Factory(_compile_keywords, takes_self=True))
    _requests: Matcher = attrs.field(init=False, eq=False, repr=False,
                                     default=attrs.Factory(_compile_requests, takes_self=True))

    def asks_for_human(self, text: str) -> str | None:
        """Why ``text`` asks for a human (an explicit request before a keyword), or None."""
        folded = words(text)
        if (request := self._requests.first(folded)) is not None:
            return f"explicit request: {request.text}"
        if (keyword := self._keywords.first(folded)) is not None:
            return f"keyword: {keyword.text}"
        return None


def fallback_streak(recent_fallbacks: tuple[bool, ...]) -> int:
    """How many of the latest answers (newest first) were fallbacks, without a break."""
    streak = 0
    for fallback in recent_fallbacks:
        if not fallback:
            break
        streak += 1
    return streak


def _reason(turn: Turn, ctx: TurnContext, rules: EscalationRules) -> str | None:
    return rules.asks_for_human(turn.text)


def after_answer(turn: Turn, ctx: TurnContext, reply: Reply,
                 rules: EscalationRules) -> Decision | None:
    """Hand over instead of sending ``reply`` when it would be the Nth failed answer in a
    row (``ctx.recent_fallbacks`` holds the earlier ones, newest first); None: send it."""
    failed = reply.fallback or reply.confidence < rules.min_confidence
    if not rules.enabled or not failed:
        return None
    streak = fallback_streak(ctx.recent_fallbacks) + 1
    if streak < rules.max_failed_answers:
        return None
    at = turn.messages[-1].received_at
    return Decision("escalate", f"{streak} failed answers in a row",
                    out_of_hours=not rules.hours.is_open(at))


def decide(turn: Turn, ctx: TurnContext, rules: EscalationRules) -> Decision:
    """Reply, escalate or hold ``turn``, in the order of the module docstring."""
    if ctx.escalated:
        return Decision("hold", "conversation is with a human")
    if not rules.enabled:
        return Decision("reply")
    reason = _reason(turn, ctx, rules)
    if reason is None:
        return Decision("reply")
    at = turn.messages[-1].received_at
    return Decision("escalate", reason, out_of_hours=not rules.hours.is_open(at))


@attrs.define
class Escalation:
    """The stage: per-instance rules, applied to the loaded context."""

    rules: dict[str, EscalationRules]

    async def __call__(self, turn: Turn) -> list[Turn]:
        assert turn.context is not None, "escalation runs after the context stage"
        return [attrs.evolve(turn, decision=decide(turn, turn.context, self.rules[turn.instance]))]
