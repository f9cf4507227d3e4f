"""The structured-concurrency toolkit, on the autojump clock: exact virtual times."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from pipeline.concurrency import (
    Backoff,
    all_or_nothing,
    batches,
    map_bounded,
    retry,
    settle,
)
from pipeline.metrics import Metrics


def after(seconds: float, value: object = None, error: Exception | None = None):  # type: ignore
    async def op() -> object:
        await trio.sleep(seconds)
        if error is not None:
            raise error
        return value
    return op


async def test_all_or_nothing_runs_together(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    start = trio.current_time()
    got = await all_or_nothing({"a": after(1, "A"), "b": after(2, "B")}, metrics=metrics)
    assert got == {"a": "A", "b": "B"}
    assert trio.current_time() - start == 2  # together, not 3
    assert metrics.operation("a").count == 1 and metrics.operation("b").count == 1


async def test_all_or_nothing_cancels_siblings_on_first_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished = []

    async def slow() -> None:
        await trio.sleep(10)
        finished.append("slow")

    start = trio.current_time()
    with pytest.raises(ExceptionGroup) as info:
        await all_or_nothing({"bad": after(1, error=ValueError("no")), "slow": slow})
    assert info.group_contains(ValueError, match=r"^no$")
    assert trio.current_time() - start == 1 and finished == []


async def test_settle_uses_defaults_and_says_why(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    got = await settle(
        {"history": after(1, "h"), "webhook": after(1, error=OSError("down")),
         "slow": after(5, "late")},
        {"history": "", "webhook": None, "slow": "default"},
        timeouts={"slow": 0.5},
    )
    assert got.values == {"history": "h", "webhook": None, "slow": "default"}
    assert got.degraded == ("webhook", "slow")
    assert [f.reason for f in got.failures] == ["OSError: down", "timeout after 0.5 s"]
    assert trio.current_time() - start == 1


async def test_settle_does_not_swallow_undeclared_errors() -> None:
    with pytest.raises(ExceptionGroup) as info:
        await settle({"x": after(0, error=KeyError("k"))}, {"x": 0}, catch=(OSError,))
    assert info.group_contains(KeyError)


async def test_map_bounded_keeps_input_order_and_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = peak = 0

    async def work(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(10 - n)
        running -= 1
        return n * n

    assert await map_bounded(work, list(range(10)), limit=3) == [n * n for n in range(10)]
    assert peak == 3


async def test_batches_by_size_and_by_delay(autojump_clock: trio.testing.MockClock) -> None:
    send, recv = trio.open_memory_channel[int](10)
    got: list[tuple[float, list[int]]] = []
    start = trio.current_time()

    async def feed() -> None:
        async with send:
            for n in range(5):
                await send.send(n)
            await trio.sleep(1)
            await send.send(5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        async for batch in batches(recv, max_size=3, max_delay=0.25):
            got.append((trio.current_time() - start, batch))
    assert got == [(0, [0, 1, 2]), (0.25, [3, 4]), (1, [5])]  # the close ends the last one early


async def test_retry_backs_off_exponentially_then_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []
    start = trio.current_time()

    async def flaky() -> str:
        calls.append(trio.current_time() - start)
        if len(calls) < 4:
            raise ConnectionError("refused")
        return "ok"

    policy = Backoff(attempts=5, initial_s=1, max_s=3, jitter=False)
    assert await retry(flaky, retry_on=(ConnectionError,), policy=policy) == "ok"
    assert calls == [0, 1, 3, 6]  # pauses 1, 2, then capped at 3


async def test_retry_gives_up_on_budget_and_ignores_undeclared_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def down() -> None:
        raise ConnectionError("refused")

    start = trio.current_time()
    with pytest.raises(ConnectionError):
        await retry(down, retry_on=(ConnectionError,),
                    policy=Backoff(attempts=10, initial_s=1, jitter=False, deadline_s=4))
    assert trio.current_time() - start == 3  # 1 + 2; the next pause (4) would pass the deadline

    async def wrong() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        await retry(wrong, retry_on=(ConnectionError,), policy=Backoff())


def test_jitter_stays_under_the_ceiling() -> None:
    rng = random.Random(1)
    policy = Backoff(initial_s=1, max_s=8)
    assert all(0 <= policy.pause(a, rng) <= min(8, 2 ** (a - 1)) for a in range(1, 10))
