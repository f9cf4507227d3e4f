"""How stages are run: welded by bounded channels, ordered per conversation, stopped safely.

Four kinds of stage runner:

* :func:`sequential_stage` -- one task, items in arrival order, one at a time.
* :func:`batch_stage` -- one task, in arrival order, handing the handler every item already
  waiting at once (intake: a batch of events is one inbox statement).
* :func:`keyed_stage` -- per-conversation lanes: items with the same key are handled one at a
  time in arrival order, different keys concurrently, at most ``max_active`` keys at once.
  A lane exists only while its conversation has work: when its queue is empty the lane task
  ends and its state is released, so memory follows the number of *busy* conversations,
  not the number ever seen.
* :func:`keyed_path` -- the turn stages (context, escalation, respond, dispatch) in one
  set of such lanes: a turn goes through all of them in its conversation's lane, with no
  hand-off between them (each still counted and timed as its own stage).

All close their output when their input is exhausted and every item is out, so the end of
a finite source drains the whole pipeline. A full output channel blocks the stage, which
stops reading its input: backpressure reaches back to the source. A slow conversation only
fills its own lane (``lane_capacity`` items); the others keep flowing until it is full.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import trio
from loguru import logger

from pipeline.metrics import StageMetrics

Handler = Callable[[Any], Awaitable[Sequence[Any]]]
ErrorHandler = Callable[[Any, Exception], Awaitable[Sequence[Any]]]


def _timed(out: Any, stage: str, ms: float) -> Any:
    timed = getattr(out, "timed", None)
    return timed(stage, ms) if timed is not None else out


async def _handle(item: Any, handler: Handler, on_error: ErrorHandler | None,
                  stats: StageMetrics) -> Sequence[Any]:
    """Run one item; real time goes to the stage's histogram, the metrics' item clock (Trio's,
    or event time in a replay: the same on every run) to the item's own ``timings_ms``."""
    clock = stats.clock or trio.current_time
    start, clock_start = time.perf_counter(), clock()
    try:
        outputs = await handler(item)
    except Exception as exc:
        stats.errors += 1
        stats.dropped += 1
        if on_error is None:
            logger.bind(stage=stats.name).opt(exception=exc).error(
                "stage {} failed on an item and dropped it", stats.name)
            return ()
        return await on_error(item, exc)
    stats.latency.record((time.perf_counter() - start) * 1000)
    ms = (clock() - clock_start) * 1000
    return [_timed(out, stats.name, ms) for out in outputs]


async def _emit(outputs: Sequence[Any], send: trio.MemorySendChannel[Any],
                stats: StageMetrics) -> None:
    for out in outputs:
        await send.send(out)
        stats.sent += 1


async def sequential_stage(
    handler: Handler, recv: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any],
    stats: StageMetrics, *, on_error: ErrorHandler | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handle items one at a time, in order; close ``send`` when ``recv`` is exhausted."""
    with send, recv:
        task_status.started()
        async for item in recv:
            stats.received += 1
            stats.queued(recv.statistics().current_buffer_used)
            await _emit(await _handle(item, handler, on_error, stats), send, stats)


async def batch_stage(
    handler: Handler, recv: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any],
    stats: StageMetrics, *, max_batch: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Like :func:`sequential_stage`, but hand the handler every item already waiting
    (up to ``max_batch``) at once, so one round trip can serve many items in order."""
    with send, recv:
        task_status.started()
        async for first in recv:
            stats.queued(recv.statistics().current_buffer_used + 1)
            batch = [first]
            while len(batch) < max_batch:
                try:
                    batch.append(recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            stats.received += len(batch)
            await _emit(await _handle(batch, handler, None, stats), send, stats)


async def keyed_stage(
    handler: Handler, recv: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any],
    stats: StageMetrics, *, max_active: int, lane_capacity: int,
    on_error: ErrorHandler | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Per-key ordered, cross-key concurrent handling (see the module docstring)."""
    async def process(item: Any) -> Sequence[Any]:
        return await _handle(item, handler, on_error, stats)

    await _keyed(process, recv, send, stats, stats, max_active=max_active,
                 lane_capacity=lane_capacity, task_status=task_status)


async def keyed_path(
    stages: Sequence[tuple[Handler, StageMetrics]], recv: trio.MemoryReceiveChannel[Any],
    send: trio.MemorySendChannel[Any], *, max_active: int, lane_capacity: int,
    on_error: ErrorHandler | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Several keyed stages in one set of lanes: an item goes through every stage's handler,
    in order, inside its conversation's lane -- the same order and concurrency as a chain of
    :func:`keyed_stage`, without a channel hand-off and a lane task per stage. Each stage
    keeps its own counters, latency and item timings; the first one the queue figures."""
    if not stages:
        raise ValueError("a path needs at least one stage")
    last = len(stages) - 1

    async def process(item: Any) -> Sequence[Any]:
        items: Sequence[Any] = (item,)
        for index, (handler, stats) in enumerate(stages):
            out: list[Any] = []
            for one in items:
                if index:
                    stats.received += 1
                done = await _handle(one, handler, on_error, stats)
                if index < last:
                    stats.sent += len(done)
                out.extend(done)
            items = out
        return items

    await _keyed(process, recv, send, stages[0][1], stages[-1][1], max_active=max_active,
                 lane_capacity=lane_capacity, task_status=task_status)


async def _keyed(
    process: Callable[[Any], Awaitable[Sequence[Any]]], recv: trio.MemoryReceiveChannel[Any],
    send: trio.MemorySendChannel[Any], into: StageMetrics, out_of: StageMetrics, *,
    max_active: int, lane_capacity: int, task_status: trio.TaskStatus[None],
) -> None:
    """The lanes: ``into`` counts what comes in (and the queue), ``out_of`` what goes out."""
    if lane_capacity < 1:
        raise ValueError("lane_capacity must be >= 1 (a lane must buffer the item it starts with)")
    lanes: dict[Hashable, trio.MemorySendChannel[Any]] = {}
    slots = trio.CapacityLimiter(max_active)

    async def run_lane(key: Hashable, lane: trio.MemoryReceiveChannel[Any], token: object) -> None:
        try:
            with lane:
                while True:
                    item = lane.receive_nowait()
                    await _emit(await process(item), send, out_of)
                    if lane.statistics().current_buffer_used == 0:
                        del lanes[key]  # no await since the check: nothing can slip in
                        into.active = len(lanes)
                        return
        finally:
            slots.release_on_behalf_of(token)

    with send, recv:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for item in recv:
                into.received += 1
                into.queued(recv.statistics().current_buffer_used)
                key = item.key
                lane = lanes.get(key)
                if lane is not None:
                    await lane.send(item)
                    continue
                token = object()
                await slots.acquire_on_behalf_of(token)
                lane_send, lane_recv = trio.open_memory_channel[Any](lane_capacity)
                lane_send.send_nowait(item)  # before the lane starts: it never starts empty
                lanes[key] = lane_send
                into.active = len(lanes)
                nursery.start_soon(run_lane, key, lane_recv, token, name=f"lane {key}")
