"""The virtual clock: exact timer times, and no spurious timeouts while I/O is outstanding."""

from __future__ import annotations

import pytest
import trio

from pipeline.db import Pool
from pipeline.store import QueryTimeout, Store
from pipeline.vclock import VirtualClock, io_held


@pytest.fixture
def virtual_clock() -> VirtualClock:
    return VirtualClock()  # pytest-trio runs the test on a fixture that is a Clock


async def test_timers_fire_at_exact_virtual_times(virtual_clock: VirtualClock) -> None:
    start = trio.current_time()
    fired = []

    async def timer(after: float) -> None:
        await trio.sleep(after)
        fired.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for after in (3600, 0.25, 1.5):
            nursery.start_soon(timer, after)
    assert fired == [0.25, 1.5, 3600]


async def test_a_slow_query_does_not_time_out_under_the_virtual_clock(
    virtual_clock: VirtualClock, pool: Pool,
) -> None:
    store = Store(pool, query_timeout_s=0.1)  # 100 virtual ms
    start = trio.current_time()
    async with pool.connection() as conn:
        with trio.fail_after(0.1):
            await conn.execute("SELECT pg_sleep(0.5)")  # 500 real ms
    await store.ping()
    assert trio.current_time() == start  # I/O takes no virtual time
    await trio.sleep(2)  # but timers still run, instantly and exactly
    assert trio.current_time() - start == 2


async def test_time_stands_still_while_io_is_held(virtual_clock: VirtualClock) -> None:
    start = trio.current_time()
    woke: list[float] = []

    async def sleeper() -> None:
        await trio.sleep(10)
        woke.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        with io_held():
            # a real wait (think: a socket) while held: the sleeper must not wake
            await trio.to_thread.run_sync(lambda: __import__("time").sleep(0.2))
            assert woke == [] and trio.current_time() == start
    assert woke == [10]


async def test_a_real_timeout_still_fires_on_the_default_clock(pool: Pool) -> None:
    store = Store(pool, query_timeout_s=0.05)
    with pytest.raises(QueryTimeout, match=r"^database did not answer within 0\.05 s$"):
        await store._all("SELECT pg_sleep(1)")
