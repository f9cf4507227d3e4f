"""The burst buffer and the text dedupe: exact turns, on recorded times and on a virtual
clock (the live path)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import trio
import trio.testing

from pipeline.metrics import Metrics
from pipeline.records import InboundMessage, Stored, Turn
from stages.dedupe import TextDeduper
from stages.turns import BurstBuffer, assemble_turns, turn_id

T0 = dt.datetime(2025, 8, 31, 10, 0, tzinfo=dt.UTC)


def msg(sender: str, seconds: float, text: str = "hi", mid: str | None = None) -> InboundMessage:
    at = T0 + dt.timedelta(seconds=seconds)
    return InboundMessage(instance="acme", message_id=mid or f"{sender}@{seconds}",
                          sender=sender, kind="text", text=text, sent_at=at, received_at=at,
                          format="cloud-api")


def ids(turns: list[Turn]) -> list[list[str]]:
    return [[m.message_id for m in t.messages] for t in turns]


def buffer(window_s: float = 1.5, max_messages: int = 10,
           max_wait_s: float | None = None) -> BurstBuffer:
    wait = dt.timedelta(seconds=max_wait_s) if max_wait_s is not None else None
    return BurstBuffer(dt.timedelta(seconds=window_s), max_messages, wait)


def test_close_messages_fold_into_one_turn() -> None:
    b = buffer()
    closed = [*b.add(msg("a", 0)), *b.add(msg("a", 1.0)), *b.add(msg("a", 2.5))]
    assert closed == []  # each within 1.5 s of the previous one
    closed = b.add(msg("b", 4.1))  # time moves on: a's turn (due at 4.0) closes
    assert ids(closed) == [["a@0", "a@1.0", "a@2.5"]]
    assert closed[0].text == "hi\nhi\nhi"
    assert closed[0].turn_id == turn_id(msg("a", 0))
    assert ids(b.flush()) == [["b@4.1"]]


def test_a_gap_longer_than_the_window_starts_a_new_turn() -> None:
    b = buffer()
    b.add(msg("a", 0))
    assert ids(b.add(msg("a", 1.6))) == [["a@0"]]
    assert ids(b.flush()) == [["a@1.6"]]


def test_exactly_the_window_still_joins() -> None:
    b = buffer()
    b.add(msg("a", 0))
    assert b.add(msg("a", 1.5)) == []
    assert ids(b.flush()) == [["a@0", "a@1.5"]]


def test_max_wait_caps_a_turn_that_keeps_growing() -> None:
    b = buffer(window_s=1.0, max_wait_s=2.5)
    closed = []
    for s in (0, 0.9, 1.8, 2.7, 3.6):
        closed += b.add(msg("a", s))
    closed += b.flush()
    assert ids(closed) == [["a@0", "a@0.9", "a@1.8"], ["a@2.7", "a@3.6"]]


def test_max_messages_closes_a_turn() -> None:
    b = buffer(max_messages=2)
    closed = []
    for s in (0, 0.1, 0.2):
        closed += b.add(msg("a", s))
    assert ids(closed) == [["a@0", "a@0.1"]]


def test_window_zero_means_one_message_per_turn() -> None:
    b = buffer(window_s=0)
    assert ids(b.add(msg("a", 0))) == [["a@0"]]
    assert len(b) == 0


def test_senders_do_not_mix_and_close_in_deadline_order() -> None:
    b = buffer()
    b.add(msg("b", 0.5))
    b.add(msg("a", 0))
    b.add(msg("a", 1.0))
    assert ids(b.expire(T0 + dt.timedelta(seconds=3))) == [["b@0.5"], ["a@0", "a@1.0"]]


def test_repeated_text_within_the_window_is_a_duplicate() -> None:
    d = TextDeduper(dt.timedelta(seconds=30))
    assert not d.is_repeat(msg("a", 0, "Hello  There"))
    assert d.is_repeat(msg("a", 10, "hello there"))  # case and spaces do not matter
    assert not d.is_repeat(msg("b", 10, "hello there"))  # another sender
    assert not d.is_repeat(msg("a", 40.1, "hello there"))  # the window has passed
    assert not d.is_repeat(msg("a", 41, ""))  # media without text are never repeats
    assert not d.is_repeat(msg("a", 42, ""))


def test_text_dedupe_memory_is_bounded_by_the_window() -> None:
    d = TextDeduper(dt.timedelta(seconds=1))
    for n in range(10_000):
        d.is_repeat(msg(f"s{n}", n * 0.01, f"text {n}"))
    assert len(d) <= 101


def test_text_dedupe_off() -> None:
    d = TextDeduper(dt.timedelta(0))
    assert not d.is_repeat(msg("a", 0)) and not d.is_repeat(msg("a", 0))


async def test_live_turns_close_on_the_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Live: no later message comes, so the window must pass on (virtual) Trio time."""
    base = trio.current_time()

    def now() -> dt.datetime:
        return T0 + dt.timedelta(seconds=trio.current_time() - base)

    send, recv = trio.open_memory_channel[Any](10)
    out_send, out_recv = trio.open_memory_channel[Any](10)
    got: list[tuple[float, list[str]]] = []

    async def collect() -> None:
        async with out_recv:
            async for turn in out_recv:
                got.append((trio.current_time() - base, [m.message_id for m in turn.messages]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        await nursery.start(lambda task_status: assemble_turns(
            recv, out_send, buffer(window_s=1.5, max_wait_s=4), Metrics().stage("turns"),
            wall_clock=now, task_status=task_status))
        async with send:
            for s in (0, 1, 2, 3, 10):
                await trio.sleep_until(base + s)
                await send.send(Stored(msg("a", s), redelivered=False))
            await trio.sleep(2)
    assert got == [(4, ["a@0", "a@1", "a@2", "a@3"]),  # max_wait after the first
                   (11.5, ["a@10"])]                    # window after the last
