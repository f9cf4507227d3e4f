"""The head of a conversation's queue (pure): the burst rule, repeated texts, reactions,
and when a turn is ready -- table-driven, no database, no event loop."""

from __future__ import annotations

import datetime as dt

import pytest

from stages.dedupe import TextMemory
from stages.records import InboundMessage
from stages.turns import BurstRules, PendingRow, plan_head, turn_id

T0 = dt.datetime(2025, 8, 31, 10, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def msg(seconds: float, text: str | None = None, kind: str = "text") -> InboundMessage:
    return InboundMessage(instance="acme", message_id=f"m@{seconds}", sender="a", kind=kind,
                          text=f"text {seconds}" if text is None else text,
                          sent_at=at(seconds), received_at=at(seconds), format="cloud-api")


def rows(*items: float | tuple[float, str] | tuple[float, str, str]) -> list[PendingRow]:
    out = []
    for n, item in enumerate(items):
        spec = item if isinstance(item, tuple) else (item,)
        out.append(PendingRow(n, msg(*spec)))  # type: ignore[arg-type]
    return out


def rules(window_s: float = 1.5, max_messages: int = 10, max_wait_s: float | None = None,
          text_s: float = 30) -> BurstRules:
    return BurstRules(dt.timedelta(seconds=window_s), max_messages,
                      dt.timedelta(seconds=max_wait_s) if max_wait_s is not None else None,
                      dt.timedelta(seconds=text_s))


def turn_of(head: object) -> list[float]:
    return [(r.message.received_at - T0).total_seconds() for r in head.turn]  # type: ignore[attr-defined]


# (pending rows, rules, now, turn, ready, deadline in seconds or None)
BURSTS = [
    # messages within the window of the previous one fold into one turn
    ((0, 1.0, 2.5), rules(), 4.1, [0, 1.0, 2.5], True, 4.0),
    # still open at its deadline: a message received exactly then would still join
    ((0, 1.0, 2.5), rules(), 4.0, [0, 1.0, 2.5], False, 4.0),
    # a gap longer than the window: the turn closed before the next row
    ((0, 1.6), rules(), 1.6, [0], True, 1.5),
    # exactly the window still joins
    ((0, 1.5), rules(), 1.5, [0, 1.5], False, 3.0),
    # max_wait caps a turn that keeps growing
    ((0, 0.9, 1.8, 2.7, 3.6), rules(window_s=1.0, max_wait_s=2.5), 3.6, [0, 0.9, 1.8], True,
     2.5),
    # max_messages closes it, whatever the time
    ((0, 0.1, 0.2), rules(max_messages=2), 0.1, [0, 0.1], True, 1.6),
    # a window of 0: one message per turn
    ((0, 0), rules(window_s=0), 0, [0], True, 0),
]


@pytest.mark.parametrize(("pending", "rule", "now", "turn", "ready", "deadline"), BURSTS)
def test_the_burst_rule(pending: tuple[float, ...], rule: BurstRules, now: float,
                        turn: list[float], ready: bool, deadline: float) -> None:
    head = plan_head(rows(*pending), (), rule, at(now))
    assert (turn_of(head), head.ready, head.deadline) == (turn, ready, at(deadline))
    assert head.closed == ()


def test_repeated_texts_and_reactions_close_without_joining() -> None:
    head = plan_head(rows((0, "Hello  There"), (1, "hello there"), (1.2, "👍", "reaction"),
                          (2.8, "price?")), (), rules(), at(10))
    assert turn_of(head) == [0]  # the repeat and the reaction did not extend the turn
    assert [(c.row_id, c.action, c.reason) for c in head.closed] == [
        (1, "duplicate", "repeated text"), (2, "ignored", "reaction: nothing to answer")]


def test_a_repeat_of_an_answered_message_is_a_duplicate_but_not_of_itself() -> None:
    recent = [(at(-10), "hello")]
    head = plan_head(rows((0, "hello"), (40, "hello")), recent, rules(), at(50))
    assert [c.row_id for c in head.closed] == [0]  # said 10 s before: a repeat
    assert turn_of(head) == [40]  # 40 s after the first time: news again
    # the same row claimed again (its turn failed): never a duplicate of itself
    assert plan_head(rows((0, "new")), [], rules(), at(50)).closed == ()


def test_only_repeats_close_at_once_with_no_turn() -> None:
    head = plan_head(rows((0, "hi"), (1, "hi", "reaction")), [(at(-1), "hi")], rules(), at(1))
    assert head.turn == () and head.ready and len(head.closed) == 2


def test_rows_after_the_turn_stay_pending() -> None:
    head = plan_head(rows(0, (5, "hi")), (), rules(), at(6))
    assert turn_of(head) == [0] and head.closed == ()


@pytest.mark.parametrize(("first", "second", "repeat"), [
    ("Hello  There", "hello there", True),  # case and spaces do not matter
    ("", "", False),                        # media without text are never repeats
])
def test_text_memory(first: str, second: str, repeat: bool) -> None:
    memory = TextMemory(dt.timedelta(seconds=30))
    memory.remember(at(0), first)
    assert memory.is_repeat(at(10), second) is repeat
    assert not memory.is_repeat(at(40.1), second)  # the window has passed
    assert not TextMemory(dt.timedelta(0)).is_repeat(at(0), first)  # off


def test_turn_ids_cover_every_message() -> None:
    one, two = msg(0), msg(1)
    assert turn_id([one]) != turn_id([one, two]) != turn_id([two])
    assert turn_id([one, two]) == turn_id([one, two])
