"""``pipeline replay``: push recorded logs through the whole pipeline and summarise.

Events are read in ``received_at`` order across the files (:func:`merge_logs`); a bad line
is reported with file and line and counted as ``invalid``. The replay runs against a fresh
database by default, so the same log gives the same outcomes on every run. Not built yet:
the virtual clock (``--clock``) -- turns are formed from the recorded times, and nothing
else in the pipeline depends on the clock so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import attrs

from pipeline.config import Config
from pipeline.database import DEFAULT_DBNAME, fresh_dbname, open_store
from pipeline.engine import Inlets, Pipeline
from pipeline.metrics import Metrics
from pipeline.recorded_log import LogError, merge_logs
from pipeline.records import Invalid, RawEvent
from stages.outcomes import OutcomeSink


@attrs.frozen
class ReplayResult:
    events: int
    elapsed_s: float
    sink: OutcomeSink
    metrics: Metrics
    database: str
    round_trips: int


def _as_event(item: RawEvent | LogError) -> RawEvent | Invalid:
    if isinstance(item, LogError):
        return Invalid(item.reason, origin=f"{item.path}:{item.line}")
    return item


async def replay(cfg: Config, logs: Sequence[Path], *, out: TextIO | None = None,
                 fresh: bool = True, keep_db: bool = False,
                 on_pipeline: Callable[[Pipeline], None] | None = None) -> ReplayResult:
    """Replay ``logs`` and return what happened."""
    sink = OutcomeSink(out)
    count = 0

    async def source(inlets: Inlets) -> None:
        nonlocal count
        for item in merge_logs(logs):
            if inlets.stopping.is_set():
                return
            count += 1
            await inlets.raw.send(_as_event(item))

    dbname = fresh_dbname() if fresh and not cfg.database.dsn else DEFAULT_DBNAME
    async with open_store(cfg.database, dbname=dbname, fresh=fresh,
                          keep=keep_db or not fresh) as store:
        pipeline = Pipeline(cfg, store, sink)
        if on_pipeline is not None:
            on_pipeline(pipeline)
        start = time.perf_counter()
        await pipeline.run(source)
        elapsed = time.perf_counter() - start
        return ReplayResult(count, elapsed, sink, pipeline.metrics,
                            dbname if not cfg.database.dsn else "(dsn)", store.round_trips)


def summary(result: ReplayResult, *, kept: bool) -> str:
    """The text printed at the end of a replay."""
    sink = result.sink
    lines = [f"replayed {result.events} events in {result.elapsed_s:.2f} s "
             f"({result.events / max(result.elapsed_s, 1e-9):,.0f} events/s); "
             f"{sink.total} outcomes; {result.round_trips} database round trips",
             "actions: " + ", ".join(f"{a}={n}" for a, n in sorted(sink.actions.items()))]
    instances = sorted({i for i, _ in sink.per_instance})
    for inst in instances:
        counts = {a: n for (i, a), n in sink.per_instance.items() if i == inst}
        lines.append(f"  {inst}: " + ", ".join(f"{a}={n}" for a, n in sorted(counts.items())))
    if sink.escalations:
        lines.append("escalations:")
        lines += [f"  {n} x {reason}" for reason, n in sink.escalations.most_common()]
    if sink.invalid:
        lines.append("invalid:")
        lines += [f"  {line}" for line in sink.invalid]
    failed = result.metrics.counters["failed turns"]
    if failed:
        lines.append(f"failed: {failed} turns could not be processed (see the log); "
                     "their messages stay pending in the inbox")
    lines.append(f"database: {result.database}" + (" (kept)" if kept else " (dropped)"))
    return "\n".join(lines)
