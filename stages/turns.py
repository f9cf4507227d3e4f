"""Turns: which of a conversation's pending inbox rows are answered together, and when.

Pure logic over the rows' recorded times (``received_at``), never a process's memory, so it
does not matter which process received which message (a burst posted half to one process
and half to another is one turn) and a replay forms the same turns however fast it runs.

The burst rule: a message joins the turn of the message before it when it arrived within
``window`` of it; the turn closes ``window`` after its last message or ``max_wait`` after
its first, whichever comes first, or when it holds ``max_messages``. Before the rule, each
row is classified: a reaction asks for no answer (``ignored``), and a text the sender
already sent within ``text_window`` is a ``duplicate`` (:mod:`stages.dedupe`); neither
joins a turn. :func:`plan_head` decides the head of a conversation's queue: the rows closed
without a turn and the turn, once it is closed at ``now``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

import attrs

from stages.dedupe import NOTHING_TO_ANSWER, TextMemory
from stages.records import Closed, InboundMessage

_FOREVER = dt.timedelta(days=36500)


def turn_id(messages: Sequence[InboundMessage]) -> str:
    """Stable id of the turn made of ``messages`` (same rows → same id; a turn of one message
    keeps the id that message always had)."""
    first = messages[0]
    seed = "\0".join([first.instance, first.sender, *(m.message_id for m in messages)])
    return "t_" + hashlib.blake2b(seed.encode(), digest_size=10).hexdigest()


@attrs.frozen
class BurstRules:
    """``[intake.buffer]`` and ``[dedupe]`` as the claim needs them."""

    window: dt.timedelta
    max_messages: int
    max_wait: dt.timedelta | None = None  # None: no limit
    text_window: dt.timedelta = dt.timedelta(0)

    @property
    def limit(self) -> int:
        """Most messages of one turn (a window of 0 means no buffering: one each)."""
        return 1 if self.window <= dt.timedelta(0) else self.max_messages

    @property
    def wait(self) -> dt.timedelta:
        return self.max_wait if self.max_wait is not None else _FOREVER

    @property
    def first_due(self) -> dt.timedelta:
        """The earliest a turn can close after its first message (nothing joins it)."""
        return max(dt.timedelta(0), min(self.window, self.wait))


@attrs.frozen
class PendingRow:
    """One pending inbox row of a claimed conversation."""

    row_id: int
    message: InboundMessage


@attrs.frozen
class Head:
    """What :func:`plan_head` decided. ``turn`` empty: no turn (only ``closed`` rows).
    ``ready`` False: the turn is still open at ``now``; look again at ``deadline``."""

    closed: tuple[Closed, ...]
    turn: tuple[PendingRow, ...]
    ready: bool
    deadline: dt.datetime | None = None


def plan_head(rows: Sequence[PendingRow], recent: Sequence[tuple[dt.datetime, str]],
              rules: BurstRules, now: dt.datetime) -> Head:
    """Decide the head of a conversation's queue.

    ``rows``: its pending rows, oldest first. ``recent``: (time, text) of the messages it
    already answered within the text window. A turn is ``ready`` when a later row arrived
    after it closed, when it is full, or when ``now`` is past its deadline (strictly: a
    message received exactly at the deadline still joins).
    """
    memory = TextMemory(rules.text_window)
    for at, text in recent:
        memory.remember(at, text)
    closed: list[Closed] = []
    turn: list[PendingRow] = []
    deadline: dt.datetime | None = None
    for row in rows:
        msg = row.message
        if turn and (msg.received_at > _deadline(turn, rules) or len(turn) >= rules.limit):
            return Head(tuple(closed), tuple(turn), True, _deadline(turn, rules))
        if msg.kind in NOTHING_TO_ANSWER:
            closed.append(Closed(row.row_id, msg, "ignored", f"{msg.kind}: nothing to answer"))
        elif memory.is_repeat(msg.received_at, msg.text):
            closed.append(Closed(row.row_id, msg, "duplicate", "repeated text"))
        else:
            memory.remember(msg.received_at, msg.text)
            turn.append(row)
    if not turn:
        return Head(tuple(closed), (), True)
    deadline = _deadline(turn, rules)
    ready = len(turn) >= rules.limit or now > deadline
    return Head(tuple(closed), tuple(turn), ready, deadline)


def _deadline(turn: Sequence[PendingRow], rules: BurstRules) -> dt.datetime:
    first, last = turn[0].message.received_at, turn[-1].message.received_at
    return min(last + rules.window, first + rules.wait) if rules.limit > 1 else first
