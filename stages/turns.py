"""Burst buffer: messages of one sender that arrive close together become one Turn.

Pure logic over record times (``received_at``), not the clock. A sender's message joins the
sender's open turn when it arrives within ``window`` of the previous one; the turn closes
``window`` after its last message or ``max_wait`` after its first, whichever comes first, or
when it holds ``max_messages``. Time moves on with the messages themselves (a message of
anyone at time T closes every turn due before T), with :meth:`BurstBuffer.expire` and with
:meth:`BurstBuffer.flush` at the end. Driven by the
recorded times, the same log always forms the same turns; a live source also calls
``expire(now)`` when :attr:`BurstBuffer.next_deadline` passes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

import attrs
import trio

from pipeline.metrics import StageMetrics
from pipeline.records import InboundMessage, Stored, Turn

_NEVER = dt.datetime.max.replace(tzinfo=dt.UTC)


def turn_id(first: InboundMessage) -> str:
    """Stable id of the turn that starts with ``first`` (same log → same ids)."""
    seed = f"{first.instance}\0{first.sender}\0{first.message_id}".encode()
    return "t_" + hashlib.blake2b(seed, digest_size=10).hexdigest()


@attrs.define
class _Open:
    messages: list[InboundMessage]
    deadline: dt.datetime
    latest: dt.datetime  # first message + max_wait: the deadline never moves past it


@attrs.define
class BurstBuffer:
    window: dt.timedelta
    max_messages: int
    max_wait: dt.timedelta | None = None  # None: no limit
    _open: dict[tuple[str, str], _Open] = attrs.field(factory=dict, init=False)

    @property
    def next_deadline(self) -> dt.datetime | None:
        return min((o.deadline for o in self._open.values()), default=None)

    def __len__(self) -> int:
        return len(self._open)

    def add(self, msg: InboundMessage) -> list[Turn]:
        """Take ``msg``; return the turns that are complete by its arrival."""
        closed = self.expire(msg.received_at, inclusive=False)
        key = msg.conversation_key
        current = self._open.get(key)
        if current is not None and len(current.messages) >= self.max_messages:
            closed.append(self._close(key))
            current = None
        if current is None:
            latest = msg.received_at + self.max_wait if self.max_wait is not None else _NEVER
            current = self._open[key] = _Open([], msg.received_at, latest)
        current.messages.append(msg)
        current.deadline = min(max(current.deadline, msg.received_at + self.window),
                               current.latest)
        if self.window <= dt.timedelta(0) or len(current.messages) >= self.max_messages:
            closed.append(self._close(key))
        return closed

    def expire(self, now: dt.datetime, *, inclusive: bool = True) -> list[Turn]:
        """Close the turns whose window has passed at ``now`` (earliest deadline first)."""
        due = sorted(
            (o.deadline, key) for key, o in self._open.items()
            if o.deadline < now or (inclusive and o.deadline == now)
        )
        return [self._close(key) for _, key in due]

    def flush(self) -> list[Turn]:
        """Close everything (the source has ended)."""
        due = sorted((o.deadline, key) for key, o in self._open.items())
        return [self._close(key) for _, key in due]

    def _close(self, key: tuple[str, str]) -> Turn:
        messages = tuple(self._open.pop(key).messages)
        return Turn(turn_id=turn_id(messages[0]), instance=key[0], sender=key[1],
                    messages=messages)


Clock = Callable[[], dt.datetime]


async def assemble_turns(
    recv: trio.MemoryReceiveChannel[Stored], send: trio.MemorySendChannel[Turn],
    buffer: BurstBuffer, stats: StageMetrics, *, wall_clock: Clock | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The stage: feed the burst buffer in arrival order and send the turns it closes.

    With ``wall_clock`` (a live source) open turns also close when their window passes on
    that clock; without it (a replay) only the recorded times move the buffer on, so the
    same log forms the same turns however fast it is read.
    """
    with send, recv:
        task_status.started()
        while True:
            try:
                item = await _next(recv, buffer, wall_clock)
            except trio.EndOfChannel:
                break
            if item is None:
                assert wall_clock is not None
                closed = buffer.expire(wall_clock())
            else:
                stats.received += 1
                stats.queued(recv.statistics().current_buffer_used)
                closed = buffer.add(item.message)
            now = wall_clock() if wall_clock is not None else None
            for turn in closed:
                await send.send(_buffered(turn, now))
                stats.sent += 1
        now = wall_clock() if wall_clock is not None else None
        for turn in buffer.flush():
            await send.send(_buffered(turn, now))
            stats.sent += 1


def _buffered(turn: Turn, now: dt.datetime | None) -> Turn:
    """Record how long the turn waited in the buffer (from its first message to closing)."""
    closed_at = now if now is not None else turn.messages[-1].received_at
    waited = (closed_at - turn.messages[0].received_at).total_seconds() * 1000
    return turn.timed("buffer", max(0.0, waited))


async def _next(recv: trio.MemoryReceiveChannel[Stored], buffer: BurstBuffer,
                wall_clock: Clock | None) -> Stored | None:
    deadline = buffer.next_deadline
    if wall_clock is None or deadline is None:
        return await recv.receive()
    wait_s = (deadline - wall_clock()).total_seconds()
    with trio.move_on_after(max(wait_s, 0.0)):
        return await recv.receive()
    return None
