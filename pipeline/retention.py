"""Retention: finished rows are deleted once they are old, so the tables stop growing.

The rule (ages from ``[retention]``, 0 days = kept forever): a *processed* inbox row goes
``inbox_days`` after it was processed, a *delivered* outbox row ``outbox_days`` after its
delivery, a dead letter and a *dead* outbox row ``dead_letters_days`` after they were
written. Nothing else is ever deleted: pending inbox and outbox rows are work, and
conversations, messages (the history), AI interactions and escalations (open ones are
work, resolved ones decide the failed-answer streak) are what a turn is decided on. No
table references the three that are swept, so deleting from them breaks no foreign key.

Each statement deletes at most ``batch_rows`` of the oldest such rows (through the partial
indexes of migration 0005, so pending rows are never read), in one round trip under
``query_timeout_s``; a pass repeats it with a short pause until a batch comes back short,
then waits ``interval_s``. Rows are taken ``FOR UPDATE SKIP LOCKED``, so every process may
run passes at once without waiting for each other. A pass that fails is logged and tried
again at the next interval: retention is housekeeping and never stops the pipeline.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

import attrs
import trio
from loguru import logger

from pipeline.config import RetentionConfig
from pipeline.db import DatabaseError
from pipeline.store import Statements

Kind = Literal["inbox", "outbox", "dead outbox", "dead letters"]


@attrs.frozen
class Sweep:
    """One kind of finished row and how long it is kept."""

    kind: Kind
    keep: dt.timedelta


def sweeps(cfg: RetentionConfig) -> tuple[Sweep, ...]:
    """What a pass deletes: each kind of finished row that has an age (0 days: kept)."""
    days: dict[Kind, int] = {
        "inbox": cfg.inbox_days, "outbox": cfg.outbox_days,
        "dead outbox": cfg.dead_letters_days, "dead letters": cfg.dead_letters_days,
    }
    return tuple(Sweep(kind, dt.timedelta(days=n)) for kind, n in days.items() if n > 0)


class RetentionStore(Statements):
    """The delete statements (one statement a call, see :class:`Statements`)."""

    async def delete(self, sweep: Sweep, rows: int, now: dt.datetime | None = None) -> int:
        """Delete up to ``rows`` of the oldest rows of ``sweep`` older than its age at
        ``now`` (None: the database's clock); return how many went."""
        match sweep.kind:  # constants only: SQL is never built at run time (test_security)
            case "inbox":
                sql = _DELETE_INBOX
            case "outbox":
                sql = _DELETE_OUTBOX
            case "dead outbox":
                sql = _DELETE_DEAD_OUTBOX
            case "dead letters":
                sql = _DELETE_DEAD_LETTERS
        found = await self._all(sql, {"rows": rows, "keep": sweep.keep, "now": now})
        return int(found[0][0])


async def run_pass(store: RetentionStore, cfg: RetentionConfig,
                   now: dt.datetime | None = None) -> dict[Kind, int]:
    """One pass: every sweep, batch after batch until one comes back short, with
    ``batch_pause_ms`` between batches; return the rows deleted per kind."""
    deleted: dict[Kind, int] = {}
    for sweep in sweeps(cfg):
        deleted[sweep.kind] = 0
        while True:
            n = await store.delete(sweep, cfg.batch_rows, now)
            deleted[sweep.kind] += n
            if n < cfg.batch_rows:
                break
            await trio.sleep(cfg.batch_pause_ms / 1000)
    return deleted


async def run_retention(cfg: RetentionConfig, store: RetentionStore, *,
                        stopping: trio.Event | None = None,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a pass at once and then every ``cfg.interval_s``, until ``stopping`` is set (a
    pass in progress is cancelled: each batch is one statement, so it is all or nothing).
    A failing pass is a warning; the next one comes an interval later."""
    log = logger.bind(stage="retention")
    if not sweeps(cfg):  # every kind is kept forever
        task_status.started()
        return
    async with trio.open_nursery() as nursery:
        if stopping is not None:
            nursery.start_soon(_cancel_when_set, stopping, nursery.cancel_scope)
        task_status.started()
        while True:
            try:
                deleted = await run_pass(store, cfg)
            except DatabaseError as exc:
                log.warning("retention pass failed ({}); next try in {} s", exc, cfg.interval_s)
            else:
                gone = ", ".join(f"{kind} {n}" for kind, n in deleted.items() if n)
                log.log("INFO" if gone else "DEBUG", "retention deleted old rows: {}",
                        gone or "none")
            await trio.sleep(cfg.interval_s)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# the oldest `finished` rows of `table` by `at` past their age, at most `rows` of them,
# skipping those another process is deleting; each reads only the partial index of its kind
# (migration 0005), and the rows themselves by id
_DELETE = """
WITH doomed AS (
    SELECT id FROM {table}
    WHERE {finished} AND {at} < coalesce(%(now)s::timestamptz, now()) - %(keep)s::interval
    ORDER BY {at} LIMIT %(rows)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {table} WHERE id = ANY (ARRAY(SELECT id FROM doomed)) RETURNING 1
)
SELECT count(*) FROM gone"""

_DELETE_INBOX = _DELETE.format(table="inbox", finished="status = 'processed'",
                               at="processed_at")
_DELETE_OUTBOX = _DELETE.format(table="outbox", finished="status = 'delivered'",
                                at="delivered_at")
_DELETE_DEAD_OUTBOX = _DELETE.format(table="outbox", finished="status = 'dead'",
                                     at="created_at")
_DELETE_DEAD_LETTERS = _DELETE.format(table="dead_letters", finished="true", at="created_at")
