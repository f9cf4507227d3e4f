"""``pipeline replay``: push recorded logs through the whole pipeline and summarise.

Events are read in ``received_at`` order across the files (:func:`merge_logs`) and handed
over at their recorded time on the replay's clock:

``virtual`` (default)  :class:`pipeline.vclock.VirtualClock`: recorded time, jumping ahead
                       whenever the pipeline is quiescent -- burst windows, timeouts,
                       retries happen as they did live, as fast as the machine allows
``real``               the recorded pace
``Nx``                 N times the recorded pace (``10x``)

A bad line is reported with file and line and counted as ``invalid``. The replay runs
against a fresh database by default. With the virtual clock the same log and config give a
byte-identical outcomes file: outcome lines carry virtual-time stage timings and are
written in a canonical order (see :mod:`stages.outcomes`).
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import attrs
import trio

from pipeline.claims import WorkClock
from pipeline.config import Config
from pipeline.database import DEFAULT_DBNAME, fresh_dbname, open_store
from pipeline.engine import Inlets, Pipeline
from pipeline.metrics import Metrics
from pipeline.progress import Progress
from pipeline.recorded_log import LogError, merge_logs
from pipeline.records import Invalid, RawEvent
from pipeline.report import ReportCollector
from pipeline.vclock import VirtualClock
from stages.outcomes import OutcomeSink


@attrs.frozen
class ClockChoice:
    """``--clock``: virtual, or the real clock at ``speed`` times the recorded pace."""

    virtual: bool
    speed: float = 1.0

    def make(self) -> trio.abc.Clock | None:
        """The clock to give ``trio.run`` (None: Trio's own)."""
        return VirtualClock() if self.virtual else None


def parse_clock(text: str) -> ClockChoice:
    """``virtual``, ``real`` or ``Nx`` (e.g. ``10x``, ``0.5x``)."""
    if text == "virtual":
        return ClockChoice(True)
    if text == "real":
        return ClockChoice(False)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)x", text)
    if match and float(match.group(1)) > 0:
        return ClockChoice(False, float(match.group(1)))
    raise ValueError(f"--clock must be virtual, real or a speed like 10x, not {text!r}")


@attrs.frozen
class ReplayResult:
    events: int
    elapsed_s: float
    virtual_s: float
    sink: OutcomeSink
    metrics: Metrics
    database: str
    round_trips: int


def _as_event(item: RawEvent | LogError) -> RawEvent | Invalid:
    if isinstance(item, LogError):
        return Invalid(item.reason, origin=f"{item.path}:{item.line}")
    return item


@attrs.define
class Timeline:
    """Maps recorded time to the replay clock: ``t0`` on the clock is ``base`` in the log."""

    base: dt.datetime
    t0: float
    speed: float

    def due(self, at: dt.datetime) -> float:
        return self.t0 + (at - self.base).total_seconds() / self.speed

    def now(self) -> dt.datetime:
        """The recorded-time "now" (the live burst buffer's wall clock, replayed)."""
        return self.base + dt.timedelta(seconds=(trio.current_time() - self.t0) * self.speed)


def _first_time(items: Iterator[RawEvent | LogError]
                ) -> tuple[dt.datetime | None, Iterator[RawEvent | LogError]]:
    head = list(itertools.islice(items, 1))
    while head and isinstance(head[0], LogError):  # errors carry no time: look further
        more = list(itertools.islice(items, 1))
        if not more:
            break
        head.extend(more)
        if isinstance(more[0], RawEvent):
            break
    first = next((i.received_at for i in head if isinstance(i, RawEvent)), None)
    return first, itertools.chain(head, items)


async def replay(cfg: Config, logs: Sequence[Path], *, out: TextIO | None = None,
                 fresh: bool = True, keep_db: bool = False, clock: ClockChoice | None = None,
                 report: ReportCollector | None = None, progress: Progress | None = None,
                 on_pipeline: Callable[[Pipeline], None] | None = None) -> ReplayResult:
    """Replay ``logs`` (under the clock ``trio.run`` was given) and return what happened.

    ``report`` collects the charts' data; its times are in recorded seconds."""
    speed = (clock or ClockChoice(True)).speed
    sink = OutcomeSink(out)
    count = 0
    first, items = _first_time(merge_logs(logs))
    timeline = Timeline(first or dt.datetime.now(dt.UTC), trio.current_time(), speed)
    if report is not None:
        report.start, report.started_at = 0.0, timeline.base
        sink.observers.append(
            lambda outcome, at: report.record(outcome, (at - timeline.t0) * speed))

    async def source(inlets: Inlets) -> None:
        nonlocal count
        timeline.t0 = trio.current_time()
        sink.t0 = timeline.t0
        for item in items:
            if inlets.stopping.is_set():
                return
            if isinstance(item, RawEvent):
                await trio.sleep_until(timeline.due(item.received_at))
            count += 1
            await inlets.raw.send(_as_event(item))
            if progress is not None:
                progress.update(count)

    dbname = fresh_dbname() if fresh and not cfg.database.dsn else DEFAULT_DBNAME
    async with open_store(cfg.database, dbname=dbname, fresh=fresh,
                          keep=keep_db or not fresh) as store:
        pipeline = Pipeline(cfg, store, sink, clock=WorkClock(timeline.now, timeline.due))
        if on_pipeline is not None:
            on_pipeline(pipeline)
        start, virtual_start = time.perf_counter(), trio.current_time()
        await pipeline.run(source)
        sink.flush()
        return ReplayResult(count, time.perf_counter() - start,
                            (trio.current_time() - virtual_start) * speed, sink, pipeline.metrics,
                            dbname if not cfg.database.dsn else "(dsn)", store.round_trips)


def summary(result: ReplayResult, *, kept: bool) -> str:
    """The text printed at the end of a replay."""
    sink = result.sink
    lines = [f"replayed {result.events} events in {result.elapsed_s:.2f} s "
             f"({result.events / max(result.elapsed_s, 1e-9):,.0f} events/s; "
             f"{result.virtual_s:,.1f} s of recorded time); "
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
        more = sink.actions["invalid"] - len(sink.invalid)
        lines.append("invalid:" + (f" (the first {len(sink.invalid)} of "
                                   f"{sink.actions['invalid']})" if more else ""))
        lines += [f"  {line}" for line in sink.invalid]
    failed = result.metrics.counters["failed turns"]
    if failed:
        lines.append(f"failed: {failed} turns could not be processed (see the log); "
                     "their messages stay pending in the inbox")
    lines.append(f"database: {result.database}" + (" (kept)" if kept else " (dropped)"))
    return "\n".join(lines)
