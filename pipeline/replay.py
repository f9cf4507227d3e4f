"""``pipeline replay``: push recorded logs through the whole pipeline and summarise.

Events are read in ``received_at`` order across the files (:func:`merge_logs`: each file put
back in order within ``[replay] reorder_window_s``, a line further out reported) and go
through the same claim path as ``pipeline run``. Time inside a replay (``--clock``):

``event`` (default)  event time, as stream processors have it: "now" is the latest
                     ``received_at`` stored (a watermark; the end of input closes every
                     burst). Events are handed over as fast as the pipeline takes them and
                     turns of different conversations run at once, as live. Burst windows,
                     dedupe windows, business hours and escalation streaks are decided on
                     recorded times only, so the same log and config give a byte-identical
                     outcomes file on any machine, under any load. Database and HTTP work
                     run on the real clock with their configured timeouts, exactly as live:
                     a responder answering in 0.2 s gives its answer, one that never answers
                     gives the fallback after its ``timeout_s``. They take no event time.
``real``             the recorded pace, on the wall clock (bursts close by that clock)
``Nx``               N times the recorded pace (``10x``)

Replays never send: the dry transport is forced unless ``send`` (``--send``) asks for the
configured targets. A bad line is reported with file and line and counted as ``invalid``.
The replay runs against a fresh database by default.
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
from pipeline.metrics import Histogram, Metrics
from pipeline.progress import Progress
from pipeline.recorded_log import LogError, merge_logs
from pipeline.report import ReportCollector
from stages.outcomes import OutcomeSink
from stages.records import Invalid, Outcome, RawEvent


@attrs.frozen
class ClockChoice:
    """``--clock``: event time, or the real clock at ``speed`` times the recorded pace."""

    event: bool
    speed: float = 1.0


def parse_clock(text: str) -> ClockChoice:
    """``event`` (``virtual`` is its old name), ``real`` or ``Nx`` (``10x``, ``0.5x``)."""
    if text in ("event", "virtual"):
        return ClockChoice(True)
    if text == "real":
        return ClockChoice(False)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)x", text)
    if match and float(match.group(1)) > 0:
        return ClockChoice(False, float(match.group(1)))
    raise ValueError(f"--clock must be event, real or a speed like 10x, not {text!r}")


def send_targets(cfg: Config) -> list[str]:
    """Where a run with ``cfg`` sends: each number's channel and customer webhooks."""
    targets = []
    for instance in cfg.instances:
        channel = instance.channel(cfg.dispatch)
        if channel.transport != "dry":
            targets.append(f"{channel.transport} replies of {instance.name} to "
                           f"{channel.base_url}")
            if instance.webhook_url:
                targets.append(f"events of {instance.name} to {instance.webhook_url}")
    return targets


def dry(cfg: Config) -> Config:
    """``cfg`` with the dry transport everywhere: replies and events are recorded only."""
    return attrs.evolve(cfg, dispatch=attrs.evolve(cfg.dispatch, transport="dry"),
                        instances=tuple(attrs.evolve(i, transport="dry")
                                        for i in cfg.instances))


@attrs.frozen
class ReplayResult:
    events: int
    elapsed_s: float
    virtual_s: float  # recorded time the replay covered
    sink: OutcomeSink
    metrics: Metrics
    database: str
    round_trips: int
    #: the targets a production config names that this replay did not send to
    not_sent_to: tuple[str, ...] = ()
    #: real milliseconds from an event entering the pipeline (taken by the channel before
    #: intake) to each of its user messages' outcome line
    message_ms: Histogram = attrs.Factory(Histogram)


#: events whose entry time is kept for ``ReplayResult.message_ms`` (older ones are dropped)
_TIMED_EVENTS = 100_000


def _as_event(item: RawEvent | LogError) -> RawEvent | Invalid:
    if isinstance(item, LogError):
        return Invalid(item.reason, origin=f"{item.path}:{item.line}", at=item.at)
    return item


@attrs.define
class RecordedPace:
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
                 on_pipeline: Callable[[Pipeline], None] | None = None,
                 send: bool = False) -> ReplayResult:
    """Replay ``logs`` and return what happened (see the module docstring).

    ``report`` collects the charts' data; its times are in recorded seconds. Without
    ``send`` the configured targets are not sent to (the dry transport is used)."""
    choice = clock or ClockChoice(True)
    not_sent_to: tuple[str, ...] = () if send else tuple(send_targets(cfg))
    if not_sent_to:
        cfg = dry(cfg)
    sink = OutcomeSink(out)
    count = 0
    window = dt.timedelta(seconds=cfg.replay.reorder_window_s)
    first, items = _first_time(merge_logs(logs, window))
    timeline = RecordedPace(first or dt.datetime.now(dt.UTC), trio.current_time(), choice.speed)
    last = timeline.base
    if report is not None:
        report.start, report.started_at = 0.0, timeline.base

        def observe(outcome: Outcome, at: float) -> None:
            if choice.event:  # the chart's time axis is recorded time
                offset = ((outcome.at or last) - timeline.base).total_seconds()
            else:
                offset = (at - timeline.t0) * choice.speed
            report.record(outcome, offset)

        sink.observers.append(observe)

    message_ms = Histogram()
    entered: dict[str, float] = {}  # event origin -> when the pipeline took it

    def timed(outcome: Outcome, at: float) -> None:
        if outcome.action not in ("ignored", "invalid") and outcome.origin in entered:
            message_ms.record((at - entered[outcome.origin]) * 1000)

    sink.observers.append(timed)

    async def source(inlets: Inlets) -> None:
        nonlocal count, last
        timeline.t0 = trio.current_time()
        for item in items:
            if inlets.stopping.is_set():
                return
            if isinstance(item, RawEvent):
                if not choice.event:
                    await trio.sleep_until(timeline.due(item.received_at))
                last = max(last, item.received_at)
            count += 1
            await inlets.raw.send(_as_event(item))
            if isinstance(item, RawEvent):
                entered[item.origin] = trio.current_time()
                if len(entered) > _TIMED_EVENTS:  # bounded: the oldest are long answered
                    del entered[next(iter(entered))]
            if progress is not None:
                progress.update(count)

    dbname = fresh_dbname() if fresh and not cfg.database.dsn else DEFAULT_DBNAME
    async with open_store(cfg.database, dbname=dbname, fresh=fresh,
                          keep=keep_db or not fresh) as store:
        if choice.event:  # the Pipeline's own event time (a Watermark); stages take none
            pipeline = Pipeline(cfg, store, sink, Metrics(item_clock=lambda: 0.0))
        else:
            pipeline = Pipeline(cfg, store, sink, clock=WorkClock(timeline.now, timeline.due))
        if on_pipeline is not None:
            on_pipeline(pipeline)
        start, clock_start = time.perf_counter(), trio.current_time()
        await pipeline.run(source)
        sink.flush()
        recorded = ((last - timeline.base).total_seconds() if choice.event
                    else (trio.current_time() - clock_start) * choice.speed)
        return ReplayResult(count, time.perf_counter() - start, recorded, sink,
                            pipeline.metrics, dbname if not cfg.database.dsn else "(dsn)",
                            store.round_trips, not_sent_to, message_ms)


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
    if result.not_sent_to:
        lines.append("not sent (the dry transport; --send sends): "
                     + "; ".join(result.not_sent_to))
    lines.append(f"database: {result.database}" + (" (kept)" if kept else " (dropped)"))
    return "\n".join(lines)
