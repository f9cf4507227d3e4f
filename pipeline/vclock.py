"""The virtual clock of replays: recorded time, as fast as the machine allows.

Trio's ``MockClock`` with autojump moves time on whenever every task is blocked -- including
tasks blocked on a database socket or an HTTP request, so a query timeout of 500 virtual ms
would fire while PostgreSQL is still answering. :class:`VirtualClock` only jumps when the
pipeline is quiescent: the I/O layer wraps every outstanding operation in :func:`io_held`,
and while anything is held the clock stands still (and Trio blocks on I/O normally). When
nothing is held and every task waits, time jumps to the next deadline: the next recorded
event, burst window, retry or timeout.

Consequences worth knowing: I/O takes no virtual time (a 2 s query is instantaneous in a
replay), so timeouts never fire because the machine is slow, and outcomes do not depend on
the machine's speed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

#: how long Trio may block on I/O while an operation is held (it wakes on the I/O anyway)
_BLOCK_S = 86400.0


class VirtualClock(trio.abc.Clock):
    """Time that moves only when the pipeline is quiescent, straight to the next deadline.

    Trio asks the clock how long it may sleep only when no task is runnable; if nothing is
    held then, the clock jumps to the next deadline and answers "zero". (Trio's own
    ``MockClock`` cannot be extended: it is final.)
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self.holds = 0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if deadline <= self._now:
            return 0.0
        if self.holds == 0 and deadline != math.inf:
            self._now = deadline
            return 0.0
        return _BLOCK_S

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1


@contextmanager
def io_held() -> Iterator[None]:
    """Mark an outstanding I/O operation: virtual time stands still until it is done."""
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, VirtualClock):
        yield
        return
    clock.hold()
    try:
        yield
    finally:
        clock.release()
