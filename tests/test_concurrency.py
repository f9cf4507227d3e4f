"""The structured-concurrency toolkit, on the autojump clock: exact virtual times."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from pipeline.concurrency import (
    Backoff,
    retry,
    settle,
)


def after(seconds: float, value: object = None, error: Exception | None = None):  # type: ignore
    async def op() -> object:
        await trio.sleep(seconds)
        if error is not None:
            raise error
        return value
    return op


async def test_settle_uses_defaults_and_says_why(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    got = await settle(
        {"history": after(1, "h"), "webhook": after(1, error=OSError("down")),
         "slow": after(5, "late")},
        {"history": "", "webhook": None, "slow": "default"},
        timeouts={"slow": 0.5},
    )
    assert got.values == {"history": "h", "webhook": None, "slow": "default"}
    assert tuple(f.name for f in got.failures) == ("webhook", "slow")
    assert [f.reason for f in got.failures] == ["OSError: down", "timeout after 0.5 s"]
    assert trio.current_time() - start == 1


async def test_settle_does_not_swallow_undeclared_errors() -> None:
    with pytest.raises(ExceptionGroup) as info:
        await settle({"x": after(0, error=KeyError("k"))}, {"x": 0}, catch=(OSError,))
    assert info.group_contains(KeyError)


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
