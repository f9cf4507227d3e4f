"""The stage runners: per-conversation order, no head-of-line blocking across conversations,
bounded state, backpressure and draining. Time is Trio's autojump clock: no real sleeps."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import partial
from typing import Any

import attrs
import trio
import trio.testing

from pipeline.metrics import Metrics
from pipeline.runtime import keyed_path, keyed_stage, sequential_stage


@attrs.frozen
class Item:
    key: str
    seq: int


async def _collect(recv: trio.MemoryReceiveChannel[Any], into: list[Any]) -> None:
    async with recv:
        async for item in recv:
            into.append(item)


async def test_keyed_stage_keeps_order_per_key_and_overlaps_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(3)
    delays = {f"k{k}": [rng.uniform(0, 0.05) for _ in range(20)] for k in range(30)}
    active = 0
    peak = 0

    async def handler(item: Item) -> list[Item]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(delays[item.key][item.seq])
        active -= 1
        return [item]

    m = Metrics()
    in_send, in_recv = trio.open_memory_channel[Any](4)
    out_send, out_recv = trio.open_memory_channel[Any](4)
    seen: list[Item] = []
    items = [Item(f"k{k}", s) for s in range(20) for k in range(30)]
    rng.shuffle(items)
    items.sort(key=lambda i: i.seq)  # per key in order, keys interleaved
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, out_recv, seen)
        await nursery.start(partial(keyed_stage, max_active=8, lane_capacity=4),
                            handler, in_recv, out_send, m.stage("s"))
        async with in_send:
            for item in items:
                await in_send.send(item)
    per_key: dict[str, list[int]] = defaultdict(list)
    for item in seen:
        per_key[item.key].append(item.seq)
    assert len(seen) == 600
    assert all(seqs == list(range(20)) for seqs in per_key.values())
    assert 1 < peak <= 8  # concurrent across keys, never more than max_active
    assert m.stage("s").active == 0  # every lane released when idle


async def test_one_hanging_conversation_does_not_stall_a_hundred_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def handler(item: Item) -> list[Item]:
        if item.key == "slow":
            await release.wait()
        await trio.sleep(0.01)
        return [item]

    in_send, in_recv = trio.open_memory_channel[Any](2)
    out_send, out_recv = trio.open_memory_channel[Any](2)
    seen: list[Item] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, out_recv, seen)
        await nursery.start(partial(keyed_stage, max_active=4, lane_capacity=2),
                            handler, in_recv, out_send, Metrics().stage("s"))
        async with in_send:
            await in_send.send(Item("slow", 0))
            for k in range(100):
                await in_send.send(Item(f"fast{k}", 0))
            with trio.fail_after(5):  # virtual seconds: 100 items x 0.01 s over 3 free slots
                while len(seen) < 100:  # noqa: ASYNC110 - polling in virtual time
                    await trio.sleep(0.01)
            assert all(i.key != "slow" for i in seen)
            release.set()
    assert seen[-1] == Item("slow", 0)


async def test_state_returns_to_zero_after_100_000_distinct_senders() -> None:
    async def handler(item: Item) -> list[Item]:
        await trio.lowlevel.checkpoint()
        return [item]

    stats = Metrics().stage("s")
    peak_active = 0
    in_send, in_recv = trio.open_memory_channel[Any](16)
    out_send, out_recv = trio.open_memory_channel[Any](16)
    count = 0

    async def drain() -> None:
        nonlocal count, peak_active
        async with out_recv:
            async for _ in out_recv:
                count += 1
                peak_active = max(peak_active, stats.active)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await nursery.start(partial(keyed_stage, max_active=64, lane_capacity=4),
                            handler, in_recv, out_send, stats)
        async with in_send:
            for n in range(100_000):
                await in_send.send(Item(f"sender{n}", 0))
    assert count == 100_000
    assert peak_active <= 64
    assert stats.active == 0


async def test_slow_consumer_slows_the_source_and_queues_stay_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    capacity = 3
    m = Metrics()
    sent_at: list[float] = []

    async def fast(item: Item) -> list[Item]:
        return [item]

    async def slow_dispatch(item: Item) -> list[Item]:
        await trio.sleep(1.0)
        return [item]

    a_send, a_recv = trio.open_memory_channel[Any](capacity)
    b_send, b_recv = trio.open_memory_channel[Any](capacity)
    c_send, c_recv = trio.open_memory_channel[Any](capacity)
    seen: list[Item] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, c_recv, seen)
        await nursery.start(sequential_stage, fast, a_recv, b_send, m.stage("a"))
        await nursery.start(partial(keyed_stage, max_active=1, lane_capacity=capacity),
                            slow_dispatch, b_recv, c_send, m.stage("b"))
        async with a_send:
            for n in range(40):
                await a_send.send(Item("one", n))
                sent_at.append(trio.current_time())
    assert [i.seq for i in seen] == list(range(40))
    assert all(s.queue_peak <= capacity for s in m.stages.values())
    # the source could only run ahead by what the channels and the lane hold, then it
    # went at the consumer's pace: one item per second
    assert sent_at[-1] - sent_at[0] >= 40 - 4 * capacity - 2
    assert sent_at[-1] - sent_at[-2] == 1.0


async def test_handler_errors_are_counted_and_do_not_stop_the_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handler(item: Item) -> list[Item]:
        if item.seq == 1:
            raise ValueError("boom")
        return [item]

    stats = Metrics().stage("s")
    in_send, in_recv = trio.open_memory_channel[Any](4)
    out_send, out_recv = trio.open_memory_channel[Any](4)
    seen: list[Item] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, out_recv, seen)
        await nursery.start(partial(keyed_stage, max_active=2, lane_capacity=2),
                            handler, in_recv, out_send, stats)
        async with in_send:
            for n in range(3):
                await in_send.send(Item("k", n))
    assert [i.seq for i in seen] == [0, 2]
    assert (stats.errors, stats.dropped) == (1, 1)


async def test_a_keyed_path_runs_its_stages_in_order_per_key_and_counts_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three stages in one set of lanes: per key, every item passes the stages in order and
    the items in arrival order; keys overlap; a stage that drops an item (its error) stops
    it there; each stage has its own counters."""
    rng = random.Random(5)
    trail: dict[str, list[tuple[str, int]]] = defaultdict(list)
    busy: set[str] = set()
    peak = 0

    def stage(name: str) -> Any:
        async def handler(item: Item) -> list[Item]:
            nonlocal peak
            trail[item.key].append((name, item.seq))
            busy.add(item.key)
            peak = max(peak, len(busy))
            await trio.sleep(rng.uniform(0, 0.02))
            busy.discard(item.key)
            if name == "b" and item.seq == 3:
                raise ValueError("item 3 fails in b")
            return [item]
        return handler

    async def dropped(item: Item, exc: Exception) -> list[Any]:
        return []

    m = Metrics()
    in_send, in_recv = trio.open_memory_channel[Any](4)
    out_send, out_recv = trio.open_memory_channel[Any](4)
    seen: list[Item] = []
    items = [Item(f"k{k}", s) for s in range(6) for k in range(10)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, out_recv, seen)
        await nursery.start(partial(
            keyed_path, [(stage(n), m.stage(n)) for n in "abc"], in_recv, out_send,
            max_active=4, lane_capacity=2, on_error=dropped))
        async with in_send:
            for item in items:
                await in_send.send(item)
    for key, steps in trail.items():
        expected = [(n, s) for s in range(6) for n in ("abc" if s != 3 else "ab")]
        assert steps == expected, key
    assert [i.seq for i in seen if i.key == "k0"] == [0, 1, 2, 4, 5]
    a, b, c = (m.stages[n] for n in "abc")
    assert (a.received, a.sent, b.received, b.sent, b.errors, c.received, c.sent) == (
        60, 60, 60, 50, 10, 50, 50)
    assert peak == 4  # keys overlap, up to max_active
    assert a.active == 0  # the lanes are gone once drained
