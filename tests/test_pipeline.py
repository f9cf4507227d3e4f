"""The whole message path on the real embedded database: the bundled sample, idempotency,
graceful shutdown and cancellation in the middle of a database write."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import trio
from conftest import sql

from pipeline.cli import sample_log
from pipeline.config import Config, parse_config
from pipeline.engine import Inlets, Pipeline
from pipeline.recorded_log import LogError, merge_logs
from pipeline.shutdown import Shutdown
from pipeline.store import Store
from stages.outcomes import OutcomeSink
from stages.records import Invalid, Outcome, RawEvent

RULES = [{"match": "price", "reply": "Prices start at 10."},
         {"match": "preço", "reply": "Os preços começam em 10."},
         {"match": "hours", "reply": "We open 9-18."}]


def _config_data(**pipeline: Any) -> dict[str, Any]:
    return {
        "pipeline": {"channel_capacity": 4, "max_active_conversations": 8, **pipeline},
        "responders": {"rules": {"kind": "rules", "rules": RULES}},
        "instances": [
            {"name": "demo", "phone_number_id": "1122334455667"},
            {"name": "loja", "evolution_instance": "loja"},
        ],
    }


#: what the bundled sample (107 lines, 108 outcomes) replays to on these rules, every run
SAMPLE_ACTIONS = {"replied": 34, "escalated": 14, "held": 30, "merged": 9, "duplicate": 5,
                  "ignored": 14, "invalid": 2}


def make_config(**pipeline: Any) -> Config:
    return parse_config(_config_data(**pipeline), "test")


def log_source(path: Path) -> Any:
    async def source(inlets: Inlets) -> None:
        for item in merge_logs([path]):
            if inlets.stopping.is_set():
                return
            if isinstance(item, LogError):
                await inlets.raw.send(Invalid(item.reason, where=f"{item.path}:{item.line}"))
            else:
                await inlets.raw.send(item)
    return source


@attrs.frozen
class SampleRun:
    sink: OutcomeSink
    lines: list[dict[str, Any]]  # the outcome lines written, without timings and ids


async def run_sample(store: Store, cfg: Config | None = None) -> SampleRun:
    sink = OutcomeSink(out=io.StringIO())
    await Pipeline(cfg or make_config(), store, sink).run(log_source(sample_log()))
    assert isinstance(sink.out, io.StringIO)
    lines = [json.loads(line) for line in sink.out.getvalue().splitlines()]
    for line in lines:
        line.pop("timings_ms")
        line.pop("conversation_id")
    return SampleRun(sink, lines)


async def test_sample_log_end_to_end(store: Store, conninfo: str) -> None:
    sink = (await run_sample(store)).sink
    assert sink.actions == SAMPLE_ACTIONS
    # nothing accepted is left behind, and every stored message got exactly one outcome
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'pending'") == [(0,)]
    inbox = sql(conninfo, "SELECT count(*) FROM inbox")[0][0]
    redelivered = sql(conninfo, "SELECT coalesce(sum(redeliveries), 0) FROM inbox")[0][0]
    ignored_stored = sql(conninfo, "SELECT count(*) FROM inbox WHERE action = 'ignored'")[0][0]
    finished_at_intake = sink.actions["invalid"] + sink.actions["ignored"] - ignored_stored
    assert sink.total == inbox + redelivered + finished_at_intake  # type: ignore[operator]
    # one stored user message per message that reached a turn
    turned = sql(conninfo, "SELECT count(*) FROM inbox WHERE action IN "
                 "('replied', 'escalated', 'held', 'merged')")
    assert sql(conninfo, "SELECT count(*) FROM messages WHERE role = 'user'") == turned
    # one AI interaction per replied turn, one outbox row per reply or hand-over
    assert sql(conninfo, "SELECT count(*) FROM ai_interactions") == [(sink.actions["replied"],)]
    outbox = sql(conninfo, "SELECT kind, count(*) FROM outbox GROUP BY kind")
    assert dict(outbox) == {k: v for k, v in {"reply": sink.actions["replied"],
                                              "handover": sink.actions["escalated"]}.items() if v}
    assert sql(conninfo, "SELECT count(*) FROM dead_letters")[0][0] == sink.actions["invalid"]


async def test_replaying_twice_writes_nothing_twice(store: Store, conninfo: str) -> None:
    first = (await run_sample(store)).sink
    reactions = sql(conninfo, "SELECT count(*) FROM inbox WHERE action = 'ignored'")[0][0]
    counts = sql(conninfo, "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM outbox),"
                 " (SELECT count(*) FROM ai_interactions)")
    second = (await run_sample(store)).sink
    assert second.total == first.total
    stored = first.total - first.actions["invalid"] - first.actions["ignored"] + reactions
    assert second.actions["duplicate"] == stored  # every message is now a redelivery
    assert sql(conninfo, "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM outbox),"
               " (SELECT count(*) FROM ai_interactions)") == counts


async def test_same_log_same_outcomes(cluster: Any, store: Store) -> None:
    first = await run_sample(store, make_config(max_active_conversations=1))
    sql(store.pool.conninfo, "TRUNCATE inbox, messages, ai_interactions, escalations, outbox, "
        "dead_letters, conversations CASCADE")
    second = await run_sample(store, make_config(max_active_conversations=16))
    first_lines = sorted(json.dumps(x, sort_keys=True) for x in first.lines)
    second_lines = sorted(json.dumps(x, sort_keys=True) for x in second.lines)
    diff = set(first_lines) ^ set(second_lines)
    assert sorted(diff) == []
    assert first.sink.actions == second.sink.actions
    assert first.sink.escalations == second.sink.escalations


async def test_graceful_shutdown_drains_what_was_accepted(store: Store, conninfo: str) -> None:
    events = [e for e in merge_logs([sample_log()]) if isinstance(e, RawEvent)]
    shutdown = Shutdown(grace_s=30)
    fed = 0
    half = trio.Event()

    async def endless(inlets: Inlets) -> None:
        nonlocal fed
        for event in events:
            if inlets.stopping.is_set():
                return
            await inlets.raw.send(event)
            fed += 1
            if fed == len(events) // 2:
                half.set()
        await inlets.stopping.wait()  # a live source: only a shutdown ends it

    sink = OutcomeSink()
    pipeline = Pipeline(make_config(), store, sink)
    shutdown.on_stop(pipeline.stop_sources)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_in, shutdown.scope, pipeline, endless)
        await half.wait()
        shutdown.request()
    assert not shutdown.expired
    assert sink.total > 0
    # what was accepted and not yet turned stays in the inbox, owned by nobody: the next
    # process (here: a run without sources) does it, and nothing is done twice
    assert sql(conninfo, "SELECT count(*) FROM conversations WHERE lease_owner IS NOT NULL"
               " OR lease_until IS NOT NULL") == [(0,)]
    rest = OutcomeSink()
    await Pipeline(make_config(), store, rest).run()
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'pending'") == [(0,)]
    per_message = sql(conninfo, "SELECT message_id, count(*) FROM inbox GROUP BY 1")
    assert all(n == 1 for _, n in per_message)
    answered = sql(conninfo, "SELECT count(DISTINCT turn_id) FROM inbox WHERE action IN "
                   "('replied', 'escalated')")
    assert answered == sql(conninfo, "SELECT count(*) FROM outbox")


async def _run_in(scope: trio.CancelScope, pipeline: Pipeline, source: Any) -> None:
    with scope:
        await pipeline.run(source)


async def test_cancel_during_a_database_write_leaves_no_partial_rows(
    store: Store, conninfo: str,
) -> None:
    # every turn commit now takes 0.3 s on the server: cancel while commits are in flight
    sql(conninfo, """
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
        CREATE TRIGGER slow_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION slow();
    """)
    sink = OutcomeSink()
    reported: list[Outcome] = []
    sink.observers.append(lambda outcome, _at: reported.append(outcome))
    with trio.move_on_after(1.0) as scope:
        await Pipeline(make_config(), store, sink).run(log_source(sample_log()))
    assert scope.cancelled_caught
    assert store.pool.stats.in_use == 0
    # each turn's effects are all there or not at all
    torn = sql(conninfo, """
        SELECT count(*) FROM ai_interactions a
        WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.idempotency_key = a.turn_id || ':reply')
           OR NOT EXISTS (SELECT 1 FROM inbox i WHERE i.turn_id = a.turn_id)""")
    assert torn == [(0,)]
    replied_rows = sql(conninfo, "SELECT count(*) FROM inbox WHERE action = 'replied'")
    assert replied_rows == sql(conninfo, "SELECT count(*) FROM ai_interactions")
    # what was not finished is still pending, so the next start picks it up
    pending = set(sql(conninfo, "SELECT instance, message_id FROM inbox"
                          " WHERE status = 'pending'"))
    assert pending
    # nothing reported for cancelled turns: an outcome of a turn is reported only once the
    # turn committed, so no message still pending has one, and each one reported is stored
    turns = [o for o in reported if o.turn_id is not None]
    assert turns, "no turn finished before the cancel: the check below would be empty"
    done = Counter(o.action for o in turns if (o.instance, o.message_id) in pending)
    assert not done
    stored = {(i, m): (a, t) for i, m, a, t in sql(
        conninfo, "SELECT instance, message_id, action, turn_id FROM inbox"
                  " WHERE status = 'processed'")}
    assert [o for o in turns if stored.get((o.instance, o.message_id)) != (o.action, o.turn_id)
            ] == []


SLOW_COMMITS = """
    CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep(%s); RETURN NEW; END $$;
    CREATE TRIGGER slow_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION slow();
"""


async def _shutdown_while_committing(store: Store, conninfo: str, *, grace_s: float,
                                     signals: int) -> tuple[Shutdown, OutcomeSink]:
    sql(conninfo, SLOW_COMMITS % 0.5)
    shutdown = Shutdown(grace_s=grace_s)
    sink = OutcomeSink()
    pipeline = Pipeline(make_config(), store, sink)
    shutdown.on_stop(pipeline.stop_sources)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_in, shutdown.scope, pipeline, log_source(sample_log()))
        dispatch = pipeline.metrics.stage("dispatch")
        with trio.fail_after(60):  # until a (slow) commit is in flight, not just any statement
            while dispatch.received <= dispatch.sent:  # noqa: ASYNC110
                await trio.sleep(0.01)
        for _ in range(signals):
            shutdown.request()
    return shutdown, sink


def _no_torn_turns(conninfo: str) -> None:
    torn = sql(conninfo, """
        SELECT count(*) FROM inbox i WHERE i.action IN ('replied', 'escalated')
        AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.idempotency_key LIKE i.turn_id || ':%%')""")
    assert torn == [(0,)]


async def test_grace_expiry_cancels_the_rest_cleanly(store: Store, conninfo: str) -> None:
    start = trio.current_time()
    shutdown, _ = await _shutdown_while_committing(store, conninfo, grace_s=0.3, signals=1)
    assert shutdown.expired
    assert trio.current_time() - start < 5  # did not wait for the whole log
    assert store.pool.stats.in_use == 0
    _no_torn_turns(conninfo)
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'pending'")[0][0] > 0  # type: ignore[operator]


async def test_second_signal_stops_at_once(store: Store, conninfo: str) -> None:
    start = trio.current_time()
    shutdown, _ = await _shutdown_while_committing(store, conninfo, grace_s=60, signals=2)
    assert shutdown.expired
    assert trio.current_time() - start < 5  # not the 60 s grace
    assert store.pool.stats.in_use == 0
    _no_torn_turns(conninfo)


async def test_a_real_sigint_starts_the_graceful_shutdown() -> None:
    import os
    import signal

    from pipeline.shutdown import watch_signals

    shutdown = Shutdown(grace_s=5)
    stopped = trio.Event()
    shutdown.on_stop(stopped.set)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals, shutdown)
        os.kill(os.getpid(), signal.SIGINT)
        with trio.fail_after(5):
            await stopped.wait()
        nursery.cancel_scope.cancel()
    assert shutdown.requests == 1


class HangingStore(Store):
    """The real store, except that one sender's context load never returns."""

    def __init__(self, store: Store, sender: str) -> None:
        super().__init__(store.pool, store.query_timeout_s)
        self.sender = sender
        self.release = trio.Event()

    async def load_context(self, turn: Any, *args: Any) -> Any:
        if turn.sender == self.sender:
            await self.release.wait()
        return await super().load_context(turn, *args)


async def test_a_hanging_context_load_does_not_stall_a_hundred_conversations(
    store: Store, conninfo: str,
) -> None:
    hanging = HangingStore(store, "sender-slow")
    base = next(e for e in merge_logs([sample_log()]) if isinstance(e, RawEvent)
                and e.format == "cloud-api")
    events = []
    for n, sender in enumerate(["sender-slow"] + [f"sender-{k}" for k in range(100)]):
        body = json.loads(json.dumps(base.body))
        message = body["entry"][0]["changes"][0]["value"]["messages"][0]
        message["from"], message["id"] = sender, f"wamid.hol{n}"
        events.append(RawEvent(base.received_at, "cloud-api", body))
    sink = OutcomeSink()
    # mode single: the context has its own statement (in mode claimed the claim loads it)
    cfg = parse_config({**_config_data(max_active_conversations=8), "context": {"mode": "single"}},
                       "test")
    pipeline = Pipeline(cfg, hanging, sink)

    async def source(inlets: Inlets) -> None:
        for event in events:
            await inlets.raw.send(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run, source)
        with trio.fail_after(30):
            while sink.total < 100:  # noqa: ASYNC110
                await trio.sleep(0.01)
        done = sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'processed'")
        assert done == [(100,)]
        assert sql(conninfo, "SELECT sender FROM inbox WHERE status = 'pending'") == [
            ("sender-slow",)]
        hanging.release.set()
    assert sink.total == 101
