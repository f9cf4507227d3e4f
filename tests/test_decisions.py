"""The decisions the stages and the webhook make, table by table, with no database and no
event loop: the effects of a turn and the rows its commit closes, the context's failure
policy, what an event's parts become at intake, redeliveries within a batch, the outcome
order, and the webhook's credentials rule. (Turn formation and text dedupe:
tests/test_turns.py; escalation before and after the answer: tests/test_escalation.py;
delivery's classification: tests/test_delivery.py.)"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from typing import Any

import attrs
import pytest

from pipeline.config import WebhookConfig
from pipeline.webhook import UNREAD, credentials_problem
from stages.context import context_of, required_failure
from stages.dedupe import batch_ids, stored
from stages.dispatch import Messages, effects, outcomes, turn_commit
from stages.intake import finished, sort_parts
from stages.outcomes import canonical_key
from stages.parse import BodyError
from stages.records import (
    Claim,
    Closed,
    Decision,
    Ignored,
    InboundMessage,
    Invalid,
    Outcome,
    Receipt,
    Reply,
    Turn,
    TurnContext,
)

AT = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
MESSAGES = Messages("an agent will answer", "we are closed now")


def msg(message_id: str, seconds: float = 0.0, text: str = "oi") -> InboundMessage:
    at = AT + dt.timedelta(seconds=seconds)
    return InboundMessage(instance="demo", message_id=message_id, sender="5511", kind="text",
                          text=text, sent_at=at, received_at=at, format="cloud-api")


def decided(verdict: str, *, out_of_hours: bool = False, webhook: str = "",
            ids: tuple[str, ...] = ("m1",), closed: tuple[Closed, ...] = ()) -> Turn:
    messages = tuple(msg(i, n) for n, i in enumerate(ids))
    return Turn("t1", "demo", "5511", messages,
                context=TurnContext(7, webhook_url=webhook),
                decision=Decision(verdict, None if verdict == "reply" else "why",  # type: ignore[arg-type]
                                  out_of_hours=out_of_hours),
                reply=Reply("the answer", 0.9, False, "rules") if verdict == "reply" else None,
                claim=Claim(7, 42, tuple(range(1, len(ids) + 1)), closed))


# --- the effects of a turn ----------------------------------------------------------------

@pytest.mark.parametrize(("verdict", "out_of_hours", "webhook", "action", "text", "outbox"), [
    ("reply", False, "", "replied", "the answer", [("t1:reply", "reply")]),
    ("escalate", False, "", "escalated", "an agent will answer", [("t1:handover", "handover")]),
    ("escalate", True, "", "escalated", "we are closed now", [("t1:handover", "handover")]),
    ("hold", False, "", "held", None, []),
    ("reply", False, "http://hook", "replied", "the answer",
     [("t1:reply", "reply"), ("t1:webhook", "webhook")]),
    ("escalate", False, "http://hook", "escalated", "an agent will answer",
     [("t1:handover", "handover"), ("t1:webhook", "webhook"), ("t1:escalation", "webhook")]),
    ("hold", False, "http://hook", "held", None, [("t1:webhook", "webhook")]),
])
def test_effects(verdict: str, out_of_hours: bool, webhook: str, action: str,
                 text: str | None, outbox: list[tuple[str, str]]) -> None:
    fx = effects(decided(verdict, out_of_hours=out_of_hours, webhook=webhook), MESSAGES, False)
    assert (fx.action, fx.reply_text) == (action, text)
    assert [(key, kind) for key, kind, _, _ in fx.outbox] == outbox
    for _, kind, target, payload in fx.outbox:
        if kind == "webhook":
            assert target == webhook and payload["action"] == action
        else:
            assert target == "5511" and payload == {"to": "5511", "text": text}


@pytest.mark.parametrize(("ids", "closed", "rows"), [
    (("m1",), (), [(1, "replied"), ]),
    (("m1", "m2", "m3"), (), [(1, "merged"), (2, "merged"), (3, "replied")]),
    (("m1", "m2"), (Closed(9, msg("m9"), "duplicate", "repeated text"),),
     [(1, "merged"), (2, "replied"), (9, "duplicate")]),
])
def test_the_last_message_carries_the_action(ids: tuple[str, ...], closed: tuple[Closed, ...],
                                             rows: list[tuple[int, str]]) -> None:
    turn = decided("reply", ids=ids, closed=closed)
    fx = effects(turn, MESSAGES, True)
    commit = turn_commit(turn, fx, dt.timedelta(seconds=1), None)
    assert [(row, action) for row, action, _, _ in commit.rows] == rows
    assert {key for _, _, _, key in commit.rows} == {"t1"}
    lines = outcomes(turn, fx)
    assert [(o.message_id, o.action) for o in lines] == [
        (m, a) for m, (_, a) in zip([*ids, *(c.message.message_id for c in closed)], rows,
                                    strict=True)]
    assert [o.reply for o in lines].count("the answer") == 1


# --- the context's failure policy ---------------------------------------------------------

POLICIES: dict[str, Any] = {"history": "default", "webhook": "default", "escalation": "required",
                            "interactions": "default"}


@pytest.mark.parametrize(("failures", "fails"), [
    ([], None),
    ([("history", "timeout")], None),
    ([("history", "timeout"), ("interactions", "gone")], None),
    ([("escalation", "timeout")], ("escalation", "required load escalation failed: timeout")),
    ([("history", "x"), ("escalation", "y")], ("escalation", "required load escalation failed: y")),
])
def test_which_failed_load_fails_the_turn(failures: list[tuple[str, str]],
                                          fails: tuple[str, str] | None) -> None:
    assert required_failure(failures, POLICIES) == fails


def test_a_degraded_context_says_which_loads_defaulted() -> None:
    values = {"history": "", "webhook": "", "escalation": True, "interactions": (True,)}
    ctx = context_of(3, values, (("history", "timeout"),))
    assert ctx == TurnContext(3, history="", webhook_url="", escalated=True,
                              recent_fallbacks=(True,), degraded=(("history", "timeout"),))


# --- intake --------------------------------------------------------------------------------

RECEIPT = Receipt("demo", "wamid.1", "read")


@pytest.mark.parametrize(("parts", "messages", "receipts", "ended"), [
    ([msg("m1"), msg("m2")], 2, 0, 0),
    ([Ignored("receipt: read", "cloud-api", receipt=RECEIPT), msg("m1")], 1, 1, 1),
    ([Ignored("own message (fromMe)", "evolution")], 0, 0, 1),
    ([Invalid("bad json")], 0, 0, 1),
])
def test_what_an_events_parts_become(parts: list[Any], messages: int, receipts: int,
                                     ended: int) -> None:
    done = sort_parts(parts)
    assert (len(done.messages), len(done.receipts), len(done.ended)) == (messages, receipts,
                                                                          ended)


@pytest.mark.parametrize(("item", "action", "reason"), [
    (Ignored("receipt: read", "cloud-api", "demo", "wamid.1", receipt=RECEIPT), "ignored",
     "receipt: read"),
    (Invalid("not json", origin="day.jsonl:7", where="entry[0]"), "invalid",
     "not json (at entry[0])"),
    (Invalid("not json", origin="day.jsonl:7", where="day.jsonl:7"), "invalid", "not json"),
])
def test_the_outcome_of_what_ends_at_intake(item: Any, action: str, reason: str) -> None:
    line = finished(item, AT)
    assert (line.action, line.reason, line.at) == (action, reason, AT)


@pytest.mark.parametrize(("ids", "inserted", "redelivered"), [
    (["a", "b"], {"a", "b"}, [False, False]),
    (["a", "a", "b"], {"a", "b"}, [False, True, False]),  # the same id twice in one batch
    (["a", "b"], {"b"}, [True, False]),  # "a" was in the inbox already
    (["a", "a"], set(), [True, True]),
])
def test_redeliveries_within_a_batch(ids: list[str], inserted: set[str],
                                     redelivered: list[bool]) -> None:
    messages = [msg(i) for i in ids]
    found = batch_ids(messages)
    assert [m.message_id for m in found.fresh(messages)] == sorted(set(ids), key=ids.index)
    assert sum(found.repeats.values()) == len(ids) - len(set(ids))
    written = stored(messages, found, {("demo", i) for i in inserted})
    assert [s.redelivered for s in written] == redelivered


# --- outcome order --------------------------------------------------------------------------

def test_outcomes_sort_by_recorded_time_then_place() -> None:
    lines = [
        Outcome("replied", "b", "demo", "2", origin="x.jsonl:9", at=AT),
        Outcome("replied", "a", "demo", "1", origin="x.jsonl:10", at=AT),
        Outcome("merged", "c", "demo", "1", origin="x.jsonl:2", at=AT),
        Outcome("invalid", None, None, None, origin="x.jsonl:1", at=None),
        Outcome("replied", "d", "demo", "1", origin="x.jsonl:3",
                at=AT - dt.timedelta(seconds=1)),
    ]
    ordered = sorted(lines, key=canonical_key)
    assert [o.message_id for o in ordered] == [None, "d", "c", "a", "b"]


# --- the webhook's credentials --------------------------------------------------------------

SECRET, KEY = "app-secret", "evo-key"
CFG = WebhookConfig(app_secret=SECRET, evolution_apikey=KEY)
RAW = b'{"x": 1}'
SIGNED = {"x-hub-signature-256": "sha256=" + hmac.new(SECRET.encode(), RAW,
                                                      hashlib.sha256).hexdigest()}


@pytest.mark.parametrize(("fmt", "cfg", "headers", "body", "refused"), [
    ("cloud-api", CFG, SIGNED, UNREAD, None),
    ("cloud-api", CFG, {}, UNREAD, "x-hub-signature-256 does not match the body"),
    ("cloud-api", CFG, {"x-hub-signature-256": "sha256=00"}, UNREAD,
     "x-hub-signature-256 does not match the body"),
    ("cloud-api", CFG, {}, {"x": 1}, None),  # checked before the body was read
    ("cloud-api", WebhookConfig(), {}, UNREAD, None),  # no secret: not checked
    ("evolution", CFG, {"apikey": KEY}, UNREAD, None),
    ("evolution", CFG, {"apikey": "wrong"}, UNREAD, "apikey is missing or wrong"),
    ("evolution", CFG, {}, UNREAD, None),  # the body's own field decides
    ("evolution", CFG, {}, {"apikey": KEY}, None),
    ("evolution", CFG, {}, {"apikey": "wrong"}, "apikey is missing or wrong"),
    ("evolution", CFG, {}, {}, "apikey is missing or wrong"),
    ("evolution", CFG, {}, BodyError("not json"), "apikey is missing or wrong"),
    ("evolution", CFG, {"apikey": KEY}, BodyError("not json"), None),  # then a dead letter
    ("evolution", WebhookConfig(), {}, {}, None),
])
def test_credentials(fmt: Any, cfg: WebhookConfig, headers: dict[str, str], body: object,
                     refused: str | None) -> None:
    assert credentials_problem(fmt, cfg, headers, RAW, body) == refused


def test_records_stay_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        decided("reply").turn_id = "x"  # type: ignore[misc]
