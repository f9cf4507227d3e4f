"""Shutdown of the delivery task while the database is down: the shielded recording of a send
that happened is bounded -- ``pipeline.shutdown_grace_s`` once ``stopping`` is set, one
statement's time once the task is cancelled -- and a send it could not record is loud (an
ERROR naming the idempotency key) and counted (``DeliveryStats.unrecorded``).

The database goes away for real: as the receiver answers, the outbox is given a pool whose
server does not exist (its socket directory is missing), so every connection attempt fails at
once. The receiver is a real HTTP server on 127.0.0.1. The clock is Trio's MockClock, jumping
only after 0.1 s of real idleness, so that it never jumps over a real socket or database wait
(as ``autojump_threshold=0`` would) but does jump over every retry pause and deadline.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from asgi import read_request
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from loguru import logger
from test_delivery import add_row, conversation, make_config, row_state

from pipeline.config import Config
from pipeline.db import Pool, open_pool
from pipeline.delivery import DeliveryStats, Notifier, run_delivery
from pipeline.outbox import OutboxStore

GRACE_S = 2.0
QUERY_TIMEOUT_S = 0.5  # < GRACE_S: after a cancel, recording gets this much


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.1)


@attrs.define
class Receiver:
    """Answers 200 to every request, calling ``on_request`` first (e.g. to take the database
    away just as the send is about to return)."""

    on_request: Callable[[], None] = lambda: None
    hits: int = 0
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await read_request(scope, receive, send) is None:
            return
        self.hits += 1
        self.on_request()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


async def _serve(app: Receiver, task_status: trio.TaskStatus[list[str]]) -> None:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    await hypercorn_serve(app, config, shutdown_trigger=trio.sleep_forever,  # type: ignore
                          task_status=task_status)


@pytest.fixture
def errors() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="ERROR",
                      format="{message}")
    yield lines
    logger.remove(sink)


def config(url: str, unavailable_retry_s: float = 120.0) -> Config:
    cfg = make_config(url, timeout_s=5.0, poll_interval_s=2.0)
    return attrs.evolve(cfg, pipeline=attrs.evolve(cfg.pipeline, shutdown_grace_s=GRACE_S),
                        database=attrs.evolve(cfg.database,
                                              unavailable_retry_s=unavailable_retry_s))


@attrs.define
class Scene:
    """One claimed row, a receiver that takes the database away as it answers, and the
    delivery task; ``stopping`` and ``scope`` stop it gracefully or at once."""

    outbox: OutboxStore
    dead: Pool
    receiver: Receiver
    stopping: trio.Event = attrs.Factory(trio.Event)
    sent: trio.Event = attrs.Factory(trio.Event)
    stats: DeliveryStats = attrs.Factory(DeliveryStats)

    def database_down(self) -> None:
        self.outbox.pool = self.dead
        self.sent.set()


@pytest.fixture
async def scene(pool: Pool, conninfo: str, tmp_path: Path) -> Any:
    add_row(conninfo, "t1:reply", conversation(conninfo, "A"), "A")
    async with open_pool(f"host={tmp_path / 'gone'} port=5432 user=postgres", 1) as dead, \
            trio.open_nursery() as nursery:
        receiver = Receiver()
        [receiver.url] = await nursery.start(_serve, receiver)
        scene = Scene(OutboxStore(pool, QUERY_TIMEOUT_S), dead, receiver)
        receiver.on_request = scene.database_down
        yield scene
        nursery.cancel_scope.cancel()


async def delivery(scene: Scene, unavailable_retry_s: float = 120.0, *,
                   task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await run_delivery(config(scene.receiver.url, unavailable_retry_s), scene.outbox,
                           wake=Notifier(),
                           stopping=scene.stopping, stats=scene.stats, rng=random.Random(1))


def unrecorded_error(errors: list[str]) -> None:
    errors = [e for e in errors if "t1:reply" in e]  # not the failed claims meanwhile
    assert len(errors) == 1, errors
    assert re.match(r"^t1:reply was sent \(delivered\) but not recorded: .*; the row stays "
                    r"pending and is sent again when its lease ends$", errors[0])


async def test_stopping_bounds_the_recording_by_the_grace(
    scene: Scene, conninfo: str, errors: list[str], clock: trio.testing.MockClock,
) -> None:
    scene.receiver.on_request = lambda: (scene.database_down(), scene.stopping.set())
    async with trio.open_nursery() as nursery:
        await nursery.start(delivery, scene)
        await scene.stopping.wait()
        stopped = trio.current_time()
    assert trio.current_time() - stopped == pytest.approx(GRACE_S)  # not the 120 s retry budget
    assert (scene.receiver.hits, scene.stats.delivered, scene.stats.unrecorded) == (1, 0, 1)
    unrecorded_error(errors)
    assert row_state(conninfo, "t1:reply") == ("pending", 0, False, None)


async def test_a_cancel_bounds_the_recording_by_one_statement(
    scene: Scene, conninfo: str, errors: list[str], clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        task = await nursery.start(delivery, scene)
        await scene.sent.wait()
        await trio.sleep(1.0)  # recording is retrying while the database is down
        cancelled = trio.current_time()
        task.cancel()  # the second SIGTERM
    assert trio.current_time() - cancelled == pytest.approx(QUERY_TIMEOUT_S)
    assert (scene.receiver.hits, scene.stats.delivered, scene.stats.unrecorded) == (1, 0, 1)
    unrecorded_error(errors)
    assert row_state(conninfo, "t1:reply") == ("pending", 0, False, None)


async def test_a_cancel_during_the_grace_cuts_it_to_one_statement(
    scene: Scene, conninfo: str, errors: list[str], clock: trio.testing.MockClock,
) -> None:
    scene.receiver.on_request = lambda: (scene.database_down(), scene.stopping.set())
    async with trio.open_nursery() as nursery:
        task = await nursery.start(delivery, scene)
        await scene.stopping.wait()
        await trio.sleep(GRACE_S / 4)  # the grace is running
        cancelled = trio.current_time()
        task.cancel()  # the second SIGTERM
    assert trio.current_time() - cancelled == pytest.approx(QUERY_TIMEOUT_S)
    assert (scene.stats.delivered, scene.stats.unrecorded) == (0, 1)
    unrecorded_error(errors)


async def test_an_outage_without_shutdown_is_waited_out(
    scene: Scene, pool: Pool, conninfo: str, errors: list[str],
    clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(delivery, scene)
        await scene.sent.wait()
        await trio.sleep(10.0)  # an outage longer than the grace, shorter than unavailable_retry_s
        scene.outbox.pool = pool  # the database is back
        while scene.stats.delivered == 0:  # noqa: ASYNC110 -- the task's own progress
            await trio.sleep(1.0)
        scene.stopping.set()
    assert (scene.receiver.hits, scene.stats.delivered, scene.stats.unrecorded) == (1, 1, 0)
    assert [e for e in errors if "t1:reply" in e] == []
    assert row_state(conninfo, "t1:reply") == ("delivered", 1, True, None)


async def test_recording_that_runs_out_of_retries_is_loud_and_counted(
    scene: Scene, conninfo: str, errors: list[str], monkeypatch: pytest.MonkeyPatch,
    clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(delivery, scene, 3.0)  # [database] unavailable_retry_s
        await scene.sent.wait()
        while scene.stats.unrecorded == 0:  # noqa: ASYNC110 -- the task's own progress
            await trio.sleep(1.0)
        scene.stopping.set()
    assert (scene.receiver.hits, scene.stats.delivered, scene.stats.unrecorded) == (1, 0, 1)
    unrecorded_error(errors)
    assert row_state(conninfo, "t1:reply") == ("pending", 0, False, None)

