"""Graceful shutdown: the first SIGINT/SIGTERM stops the sources and sets a deadline on the
work (``pipeline.shutdown_grace_s``); a second one cancels the work at once.

A deadline, not an immediate cancel (as hypercorn does): in-flight turns get the grace period
to finish; what is cancelled after it leaves no partial rows (every write is one statement)
and its messages stay pending in the inbox for the next start.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import attrs
import trio
from loguru import logger


@attrs.define
class Shutdown:
    grace_s: float
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    requests: int = 0
    _stoppers: list[Callable[[], None]] = attrs.field(factory=list)

    def on_stop(self, stopper: Callable[[], None]) -> None:
        """Call ``stopper`` (e.g. ``Pipeline.stop_sources``) when shutdown is requested."""
        self._stoppers.append(stopper)
        if self.requests:
            stopper()

    def request(self) -> None:
        self.requests += 1
        if self.requests == 1:
            logger.warning("shutting down: sources stopped, {} s for in-flight turns "
                           "(signal again to stop now)", self.grace_s)
            for stopper in self._stoppers:
                stopper()
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + self.grace_s)
        else:
            logger.warning("stopping now: in-flight turns are cancelled and stay in the inbox")
            self.scope.cancel()

    @property
    def expired(self) -> bool:
        return self.scope.cancelled_caught


async def watch_signals(shutdown: Shutdown,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Turn SIGINT/SIGTERM into :meth:`Shutdown.request` until cancelled."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            shutdown.request()
