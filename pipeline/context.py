"""Loading a turn's context from the store, in the configured mode: the I/O edge of
:mod:`stages.context` (which says what the modes are, and holds the pure rules: the safe
defaults, which failure fails the turn, and the context built from what was loaded).

No turn ever holds a pooled connection while it waits for another one: each query borrows
one connection and gives it back. ``single`` and ``batched`` run all loads in one statement,
so when that statement fails the turn is redone load by load (``parallel``) to apply each
load's policy exactly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio
from loguru import logger

from pipeline.concurrency import Failure, Settled, settle
from pipeline.config import ContextConfig, LoadConfig
from pipeline.db import DatabaseError, DatabaseUnavailable
from pipeline.instances import InstanceCache
from pipeline.metrics import Metrics
from stages.context import DEFAULTS, Policy, context_of, required_failure
from stages.records import Turn, TurnContext


class ContextFailed(Exception):
    """A required load failed; the turn cannot go on."""


class ContextUnavailable(ContextFailed, DatabaseUnavailable):
    """A required load failed because the database is unavailable or slow: worth a retry."""


def _failed(message: str, cause: BaseException | None) -> ContextFailed:
    unavailable = isinstance(cause, (DatabaseUnavailable, trio.TooSlowError))
    return (ContextUnavailable if unavailable else ContextFailed)(message)


def _seconds(load: LoadConfig) -> float:
    return load.timeout_ms / 1000


class ContextQueries(Protocol):
    """The statements a context load uses (:class:`pipeline.store.Store` has them; a test
    puts faults in between by implementing this)."""

    async def load_context(self, turn: Turn, history_chars: int, recent_interactions: int,
                           min_confidence: float = 0.0,
                           timeout: float | None = None) -> TurnContext: ...

    async def load_contexts(self, turns: Sequence[Turn], history_chars: int,
                            recent_interactions: int, min_confidence: float = 0.0,
                            timeout: float | None = None) -> list[TurnContext]: ...

    async def upsert_conversation(self, turn: Turn, timeout: float | None = None) -> int: ...

    async def load_history(self, conversation_id: int, turn_id: str, chars: int,
                           timeout: float | None = None) -> str: ...

    async def load_webhook(self, instance: str, timeout: float | None = None) -> str: ...

    async def load_escalated(self, conversation_id: int,
                             timeout: float | None = None) -> bool: ...

    async def load_fallbacks(self, conversation_id: int, turn_id: str, n: int,
                             min_confidence: float = 0.0,
                             timeout: float | None = None) -> tuple[bool, ...]: ...

    async def store_user_messages(self, conversation_id: int, turn: Turn,
                                  timeout: float | None = None) -> None: ...


@attrs.define
class ContextLoader:
    """Loads a turn's context in the configured mode (the stage calls :meth:`load`)."""

    store: ContextQueries
    cfg: ContextConfig
    instances: InstanceCache
    min_confidence: float = 0.0  # an answer below it counts as failed ([escalation])
    metrics: Metrics | None = None
    batcher: ContextBatcher | None = None

    async def load(self, turn: Turn) -> TurnContext:
        if self.instances.get(turn.instance) is None:  # the cache: no round trip
            raise ContextFailed(f"instance {turn.instance!r} is not in the instances table")
        mode = self.cfg.mode
        if mode == "claimed" and turn.context is not None:
            return turn.context  # the claim loaded it, in its own statement
        if mode == "sequential":
            return await self.by_load(turn, together=False)
        if mode == "parallel":
            return await self.by_load(turn, together=True)
        try:
            if mode == "batched":
                assert self.batcher is not None, "mode batched needs a running ContextBatcher"
                return await self.batcher.load(turn)
            return await self.store.load_context(turn, self.cfg.history_chars,
                                                 self.cfg.recent_interactions,
                                                 self.min_confidence,
                                                 self._statement_timeout())
        except DatabaseError as exc:
            logger.bind(stage="context").warning(
                "one-statement context load of {} failed ({}); loading query by query",
                turn.turn_id, exc)
            return await self.by_load(turn, together=True)

    def _statement_timeout(self) -> float:
        loads = self.cfg.loads
        return max(_seconds(load) for load in loads.values())

    async def by_load(self, turn: Turn, *, together: bool) -> TurnContext:
        """The loads as separate queries, one after another or fanned out."""
        loads = self.cfg.loads
        conv_id = await self._required(
            "conversation", lambda: self.store.upsert_conversation(
                turn, _seconds(loads["conversation"])))
        ops = self._reads(turn, conv_id)
        timeouts = {name: _seconds(loads[name]) for name in ops}  # type: ignore[index]
        store_messages = self.store.store_user_messages
        if together:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store_messages, conv_id, turn)
                settled = await settle(ops, DEFAULTS, timeouts=timeouts,
                                       catch=(DatabaseError,), metrics=self.metrics)
        else:
            await store_messages(conv_id, turn)
            values: dict[str, Any] = {}
            failures: list[Failure] = []
            for name, op in ops.items():
                one = await settle({name: op}, DEFAULTS, timeouts=timeouts,
                                   catch=(DatabaseError,), metrics=self.metrics)
                values.update(one.values)
                failures.extend(one.failures)
            settled = Settled(values, tuple(failures))
        policies: dict[str, Policy] = {name: load.policy for name, load in loads.items()}
        failed = required_failure([(f.name, f.reason) for f in settled.failures], policies)
        if failed is not None:
            cause = next(f.error for f in settled.failures if f.name == failed[0])
            raise _failed(failed[1], cause)
        return context_of(conv_id, settled.values,
                          tuple((f.name, f.reason) for f in settled.failures))

    def _reads(self, turn: Turn, conv_id: int) -> dict[str, Callable[[], Awaitable[Any]]]:
        s, cfg = self.store, self.cfg
        return {
            "history": lambda: s.load_history(conv_id, turn.turn_id, cfg.history_chars),
            "webhook": lambda: s.load_webhook(turn.instance),
            "escalation": lambda: s.load_escalated(conv_id),
            "interactions": lambda: s.load_fallbacks(conv_id, turn.turn_id,
                                                     cfg.recent_interactions,
                                                     self.min_confidence),
        }

    async def _required(self, name: str, op: Callable[[], Awaitable[int]]) -> int:
        try:
            return await op()
        except DatabaseError as exc:
            if self.cfg.loads[name].policy == "required":  # type: ignore[index]
                raise _failed(f"required load {name} failed: {exc}", exc) from exc
            raise _failed(f"load {name} failed and has no safe default: {exc}", exc) from exc


@attrs.define
class ContextBatcher:
    """Mode ``batched``: turns submitted together share one statement.

    A batch is sent when it holds ``batch_size`` turns or ``batch_delay_ms`` after its first
    one; at most ``concurrency`` batches are in flight. A batch never holds two turns of one
    conversation (a conversation has one turn in flight at a time).
    """

    store: ContextQueries
    cfg: ContextConfig
    concurrency: int
    min_confidence: float = 0.0
    batch_sizes: list[int] = attrs.field(factory=list)
    _send: trio.MemorySendChannel[Any] = attrs.field(init=False)
    _recv: trio.MemoryReceiveChannel[Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Any](self.cfg.batch_size)

    async def load(self, turn: Turn) -> TurnContext:
        reply_send, reply_recv = trio.open_memory_channel[Any](1)
        await self._send.send((turn, reply_send))
        result = await reply_recv.receive()
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, TurnContext)
        return result

    def close(self) -> None:
        self._send.close()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve batches until :meth:`close` (then the queue drains and this returns).

        A batch leaves as soon as one of ``concurrency`` slots is free: at low load a turn
        waits for nobody (one round trip), and turns that arrive while every slot is busy
        form the next batch by themselves. ``batch_delay_ms`` > 0 additionally waits that
        long for a batch to fill."""
        slots = trio.Semaphore(self.concurrency)
        delay = self.cfg.batch_delay_ms / 1000
        async with trio.open_nursery() as nursery:
            task_status.started()
            async with self._recv:
                async for first in self._recv:
                    await slots.acquire()  # meanwhile, the next batch gathers in the channel
                    batch = [first, *self._waiting()]
                    if delay > 0 and len(batch) < self.cfg.batch_size:
                        with trio.move_on_after(delay):
                            await self._fill(batch)
                    nursery.start_soon(self._serve, batch, slots)

    def _waiting(self) -> list[Any]:
        """What is queued already, up to a full batch (after the first)."""
        more: list[Any] = []
        while len(more) < self.cfg.batch_size - 1:
            try:
                more.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return more

    async def _fill(self, batch: list[Any]) -> None:
        while len(batch) < self.cfg.batch_size:
            try:
                batch.append(await self._recv.receive())
            except trio.EndOfChannel:
                return

    async def _serve(self, batch: list[tuple[Turn, Any]], slots: trio.Semaphore) -> None:
        try:
            self.batch_sizes.append(len(batch))
            timeout = max(load.timeout_ms for load in self.cfg.loads.values()) / 1000
            try:
                contexts: list[Any] = await self.store.load_contexts(
                    [turn for turn, _ in batch], self.cfg.history_chars,
                    self.cfg.recent_interactions, self.min_confidence, timeout)
            except DatabaseError as exc:
                contexts = [exc] * len(batch)
            for (_, reply), ctx in zip(batch, contexts, strict=True):
                reply.send_nowait(ctx)
        finally:
            slots.release()
