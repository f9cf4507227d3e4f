"""The full-pipeline benchmark: the four context modes side by side, behind a latency proxy,
against the database's own limit (issue 7).

What it does, and why each part is there:

* **Server.** A throwaway embedded PostgreSQL (``pipeline.pgcluster``, *fsync off*: nothing
  here must survive, and the disk is not what is measured) in a temporary directory, removed
  at the end even on error or Ctrl-C. Each run gets a fresh database cloned from a migrated
  template, so every run starts from the same state and runs are comparable.
* **Latency.** Between the pipeline and PostgreSQL sits ``scripts/latency_proxy.py``,
  ``--delay-ms`` one way (default 1; 0 = no proxy, the Unix socket directly), so a round trip
  costs what it would against a database on another machine. By default the proxy runs as
  its own process: in this process it would take CPU and event-loop turns from the pipeline
  it measures (``--proxy loop`` runs it here anyway). ``rtt_ms`` is the measured median of
  ``SELECT 1`` through the same path.
* **Workload.** ``--conversations`` x ``--messages`` Cloud API bodies from ``--seed``: bursts
  (a sender's messages 100-500 ms apart fold into one turn), redeliveries (the same message
  id again, 1-20 s later), a share of escalation requests, and texts the rules responder
  answers or does not. ``received_at`` spreads the workload in time; the source pushes as
  fast as the pipeline accepts. The whole pipeline runs in this process: intake -> inbox ->
  claimer -> context -> ... -> dispatch (transport ``dry``).
* **Recorded time.** Turns are decided on ``received_at``, not on the wall clock (which is
  long past the workload's times): a finite run's default clock,
  :class:`pipeline.claims.Watermark`, is the newest ``received_at`` the inbox is complete up
  to (intake writes in arrival order), and past every deadline once the input has ended. A
  claim therefore forms exactly the turns the burst rule makes of the whole workload,
  whatever the timing, as the burst buffer did before the database owned the work.
* **Modes.** ``sequential``, ``parallel``, ``single``, ``batched``, ``claimed`` --
  interleaved, the order rotated on each of ``--repeat`` repetitions, medians reported.
* **Ceiling.** The SQL a turn needs in mode ``single`` with no stages around it: the inbox
  rows are written beforehand (untimed, as intake would), then the real
  :class:`pipeline.claims.Claimer` claims due conversations (``Store.claim``, one statement
  for as many conversations as are due and fit under ``max_active_conversations``) and
  ``--ceiling-tasks`` tasks take the claimed turns, each ``Store.load_context`` then
  ``Store.commit_claim`` (the fenced commit that closes the inbox rows and ends the lease).
  Each turn pays its share of a claim, a context load and a commit: the database's own limit
  on this machine, in messages/s, so each mode can be read as a fraction of it.
* **Round trips.** Every statement the store sends (claims, context loads, commits, intake
  writes, releases); ``claims / msg`` is the claims' share of them.
* **Claim to commit.** From the claim that took a conversation's turn (its statement
  returned) to the commit that ended it: the time a turn holds its conversation. (The
  conversation gate, whose wait this bench used to subtract from the context stage, is gone:
  the claim hands out one turn per conversation, so the context stage's time is the load.)
* **End to end.** ``e2e`` runs from the moment the message's turn could first be formed (the
  event that closed it -- by passing its deadline in recorded time, or filling it -- entered
  the pipeline; its own entry for a duplicate) to its outcome: the burst window itself is a
  wait by design and is left out. ``e2e_with_burst`` counts from the message's own entry.

Run (a couple of minutes on 2 cores)::

    cd /work/main && .venv/bin/python scripts/bench.py
    .venv/bin/python scripts/bench.py --delay-ms 0 --json /tmp/bench.json
    .venv/bin/python scripts/bench.py --conversations 2000 --modes single,batched --repeat 1
    .venv/bin/python scripts/bench.py --soak --modes single --repeat 1

Progress goes to stderr, the Markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio

from pipeline.claims import Claimer, WorkClock
from pipeline.config import Config, ConfigError, parse_config
from pipeline.database import create_database, drop_database
from pipeline.db import DatabaseError, Pool, open_pool
from pipeline.engine import Inlets, Pipeline, burst_rules, instance_rows
from pipeline.logs import setup_logging
from pipeline.metrics import Histogram, Metrics
from pipeline.migrate import migrate
from pipeline.pgcluster import SERVER_USER, Cluster, ClusterError
from pipeline.store import ClaimBatch, ClaimCommit, ClaimRequest, Committed, Store
from stages.dispatch import Messages, effects, turn_commit
from stages.outcomes import OutcomeSink
from stages.records import Claim, Decision, InboundMessage, Outcome, RawEvent, Reply, Turn
from stages.turns import BurstRules

sys.path.insert(0, str(Path(__file__).resolve().parent))  # latency_proxy.py lives here
import latency_proxy

MODES = ("sequential", "parallel", "single", "batched", "claimed")
INSTANCE, PHONE_ID = "bench", "15550001111"
EPOCH = dt.datetime(2025, 9, 1, 9, 0, tzinfo=dt.UTC)
RTT_SAMPLES = 200
SAMPLE_EVERY_S = 0.1
LOUD_EVENTS = 5000  # longer runs report their progress (and RSS) at every tenth
STAGES = ("intake", "context", "escalation", "respond", "dispatch")
#: past every deadline of the workload: the recorded time once all of it is in the inbox
AFTER_ALL = dt.timedelta(days=1)
RULES = [
    {"match": "price", "reply": "Our prices are at https://example.com/prices."},
    {"match": "opening hours", "reply": "We are open Monday to Friday, 9:00 to 18:00."},
    {"match": "deliver", "reply": "We deliver within 5 km, every day until 22:00."},
]
#: (share of messages, text): the rules answer the first three, the last is a fallback
TEXTS = [
    (0.35, "what is the price of item {c}-{k}?"),
    (0.20, "what are your opening hours on day {k}? ({c})"),
    (0.17, "do you deliver to street {c}, number {k}?"),
    (1.00, "hmm, something about my order {c}-{k}"),
]
ESCALATION_TEXT = "I want to talk to a human about order {c}-{k}"


class BenchError(Exception):
    """The benchmark cannot run as asked; the message says why."""


# --- settings ---------------------------------------------------------------------------------

def _share(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise BenchError(f"--{attribute.name.replace('_', '-')} must be within 0..1, "
                         f"not {value!r}")


def _at_least_one(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise BenchError(f"--{attribute.name.replace('_', '-')} must be >= 1, not {value!r}")


@attrs.frozen
class Workload:
    """What is pushed through the pipeline: the same for every mode and repetition."""

    conversations: int = attrs.field(default=200, validator=_at_least_one)
    messages: int = attrs.field(default=5, validator=_at_least_one)
    seed: int = 7
    burst_share: float = attrs.field(default=0.3, validator=_share)
    redelivery_share: float = attrs.field(default=0.05, validator=_share)
    escalation_share: float = attrs.field(default=0.03, validator=_share)
    spread_s: float = 5.0  # conversations start within this many seconds of each other


def _modes(value: Iterable[str]) -> tuple[str, ...]:
    modes = tuple(value)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise BenchError(f"--modes must be a comma-separated list of {', '.join(MODES)}, "
                         f"not {','.join(modes)!r}")
    return modes


@attrs.frozen
class Settings:
    """One benchmark run. ``max_active = 0`` lets every conversation be active at once."""

    workload: Workload = attrs.Factory(Workload)
    delay_ms: float = 1.0
    repeat: int = attrs.field(default=3, validator=_at_least_one)
    modes: tuple[str, ...] = attrs.field(default=MODES, converter=_modes)
    pool_size: int = attrs.field(default=10, validator=_at_least_one)
    max_active: int = 0
    channel_capacity: int = attrs.field(default=16, validator=_at_least_one)
    ceiling_tasks: int = attrs.field(default=40, validator=_at_least_one)
    proxy: str = attrs.field(default="process",
                             validator=attrs.validators.in_(("process", "loop")))
    soak: bool = False

    @property
    def active(self) -> int:
        return self.max_active or self.workload.conversations

    @property
    def run_workload(self) -> Workload:
        """The pipeline's workload: ``--soak`` makes every conversation 10x longer."""
        w = self.workload
        return attrs.evolve(w, messages=w.messages * 10) if self.soak else w


def bench_config(settings: Settings, mode: str) -> Config:
    """The pipeline's config for one run: the defaults, plus the bench's bounds and rules."""
    return parse_config({
        "pipeline": {"max_active_conversations": settings.active,
                     "channel_capacity": settings.channel_capacity},
        "database": {"pool_size": settings.pool_size},
        "context": {"mode": mode},
        "metrics": {"summary": False},
        "dispatch": {"transport": "dry"},
        "responders": {"rules": {"kind": "rules", "rules": RULES}},
        "instances": [{"name": INSTANCE, "phone_number_id": PHONE_ID}],
    }, "scripts/bench.py")


# --- the workload -----------------------------------------------------------------------------

@attrs.frozen
class BenchEvent:
    """One webhook body of the workload, and the message intake will parse from it (built
    directly, so the harness does not spend the pipeline's CPU parsing it a second time)."""

    event: RawEvent
    message: InboundMessage
    redelivery: bool
    escalates: bool


@attrs.frozen
class _Draws:
    """The random choices of one message, drawn in a fixed order from its own seed, so the
    workload does not depend on the order in which messages are generated."""

    gap_us: int
    text: str
    escalates: bool
    redelivered_after_us: int | None


def _draws(w: Workload, c: int, k: int) -> _Draws:
    rng = random.Random(f"{w.seed}/{c}/{k}")
    burst = rng.random() < w.burst_share
    gap_ms = rng.uniform(100, 500) if burst else rng.uniform(2000, 8000)
    roll, again, after_ms = rng.random(), rng.random(), rng.uniform(1000, 20000)
    escalates = roll < w.escalation_share
    text = ESCALATION_TEXT
    if not escalates:
        roll = (roll - w.escalation_share) / (1 - w.escalation_share)
        text = next(t for share, t in _cumulative(TEXTS) if roll < share)
    return _Draws(int(gap_ms * 1000), text.format(c=c, k=k), escalates,
                  int(after_ms * 1000) if again < w.redelivery_share else None)


def _cumulative(texts: list[tuple[float, str]]) -> Iterator[tuple[float, str]]:
    total = 0.0
    for share, text in texts:
        total += share
        yield min(total, 1.0), text


def generate(w: Workload) -> Iterator[BenchEvent]:
    """The workload in ``received_at`` order, made lazily: a soak run never holds it whole."""
    heap = [(int(random.Random(f"{w.seed}/{c}/start").uniform(0, w.spread_s) * 1e6), c, 0,
             False) for c in range(w.conversations)]
    heapq.heapify(heap)
    while heap:
        at_us, c, k, redelivery = heapq.heappop(heap)
        draws = _draws(w, c, k)
        if not redelivery:
            if k + 1 < w.messages:
                heapq.heappush(heap, (at_us + draws.gap_us, c, k + 1, False))
            if draws.redelivered_after_us is not None:
                heapq.heappush(heap, (at_us + draws.redelivered_after_us, c, k, True))
        yield _event(c, k, at_us, redelivery, draws)


def _event(c: int, k: int, at_us: int, redelivery: bool, draws: _Draws) -> BenchEvent:
    sender, message_id = f"55110{c:07d}", f"wamid.bench.{c}.{k}"
    received = EPOCH + dt.timedelta(microseconds=at_us)
    origin = f"bench:{c}.{k}" + ("r" if redelivery else "")
    message = {"from": sender, "id": message_id, "timestamp": str(int(received.timestamp())),
               "type": "text", "text": {"body": draws.text}}
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_ID},
             "contacts": [{"profile": {"name": f"Customer {c}"}, "wa_id": sender}],
             "messages": [message]}
    body = {"object": "whatsapp_business_account",
            "entry": [{"id": "bench", "changes": [{"field": "messages", "value": value}]}]}
    event = RawEvent(received, "cloud-api", body, origin=origin)
    inbound = InboundMessage(INSTANCE, message_id, sender, "text", draws.text,
                             received.replace(microsecond=0), received, "cloud-api",
                             sender_name=f"Customer {c}", origin=origin)
    return BenchEvent(event, inbound, redelivery, draws.escalates)


# --- recorded time, turns, end-to-end timing --------------------------------------------------

class BenchStore(Store):
    """The pipeline's store, also counting claim statements and timing each claimed turn
    from its claim to its commit."""

    def __init__(self, pool: Pool, query_timeout_s: float) -> None:
        super().__init__(pool, query_timeout_s)
        self.claims = 0
        self.claimed_at: dict[int, float] = {}  # token -> when its claim returned
        self.claim_to_commit = Histogram()

    async def claim(self, req: ClaimRequest) -> ClaimBatch:
        batch = await super().claim(req)
        self.claims += 1
        now = time.perf_counter()
        for claimed in batch.claims:
            self.claimed_at[claimed.token] = now
        return batch

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        done = await super().commit_claim(commit)
        start = self.claimed_at.pop(commit.claim.token, None)
        if start is not None:
            self.claim_to_commit.record((time.perf_counter() - start) * 1000)
        return done

    async def release(self, claim: Claim, due: dt.datetime, *, error: str | None = None,
                      failed: bool = False) -> bool:
        self.claimed_at.pop(claim.token, None)
        return await super().release(claim, due, error=error, failed=failed)


@attrs.define
class TurnMirror:
    """The burst rule of :func:`stages.turns.plan_head` over the workload's fresh messages
    in arrival order: which arrival closes each turn. A turn closes when a message received
    after its deadline arrives -- of any sender: the recorded clock has passed it -- or when
    it is full; :meth:`flush` closes the rest (the clock jumps past every deadline). The
    workload has no reactions and no repeated texts, so every fresh message joins a turn."""

    rules: BurstRules
    open: dict[str, list[InboundMessage]] = attrs.Factory(dict)
    deadlines: list[tuple[dt.datetime, int, str]] = attrs.Factory(list)
    seq: int = 0

    def add(self, msg: InboundMessage) -> list[list[InboundMessage]]:
        closed = self.expire(msg.received_at)
        turn = self.open.setdefault(msg.sender, [])
        turn.append(msg)
        if len(turn) >= self.rules.limit:
            closed.append(self.open.pop(msg.sender))
        else:
            self.seq += 1
            heapq.heappush(self.deadlines, (self._deadline(turn), self.seq, msg.sender))
        return closed

    def expire(self, now: dt.datetime) -> list[list[InboundMessage]]:
        """The turns whose deadline is before ``now`` (strictly, as the claim decides)."""
        closed = []
        while self.deadlines and self.deadlines[0][0] < now:
            deadline, _, sender = heapq.heappop(self.deadlines)
            turn = self.open.get(sender)
            if turn is not None and self._deadline(turn) == deadline:
                closed.append(self.open.pop(sender))
        return closed

    def flush(self) -> list[list[InboundMessage]]:
        closed, self.open, self.deadlines = list(self.open.values()), {}, []
        return closed

    def _deadline(self, turn: list[InboundMessage]) -> dt.datetime:
        first, last = turn[0].received_at, turn[-1].received_at
        return min(last + self.rules.window, first + self.rules.wait) \
            if self.rules.limit > 1 else first


@attrs.define
class Tracker:
    """When each message entered the pipeline and when its turn could first be formed.

    A :class:`TurnMirror` (the claim's burst rule, the same config, fed the same fresh
    messages in the same order) says which event closes each turn; redeliveries never join a
    turn (intake finishes them), so they do not move it here either. Entries are dropped when
    the outcome arrives: memory follows the messages in flight.
    """

    mirror: TurnMirror
    entered_at: dict[str, float] = attrs.Factory(dict)
    ready_at: dict[str, float] = attrs.Factory(dict)
    events: int = 0
    unmatched: int = 0
    degraded: int = 0
    turns: int = 0
    source_ended_at: float = 0.0
    e2e: Histogram = attrs.Factory(Histogram)
    e2e_with_burst: Histogram = attrs.Factory(Histogram)
    service: Histogram = attrs.Factory(Histogram)

    def entered(self, item: BenchEvent, now: float) -> None:
        self.events += 1
        self.entered_at[item.event.origin] = now
        if item.redelivery:
            self.ready_at[item.event.origin] = now
        else:
            self._ready(self.mirror.add(item.message), now)

    def source_ended(self, now: float) -> None:
        self.source_ended_at = now
        self._ready(self.mirror.flush(), now)

    def _ready(self, turns: list[list[InboundMessage]], now: float) -> None:
        for turn in turns:
            self.turns += 1
            for msg in turn:
                self.ready_at[msg.origin] = now

    def finished(self, outcome: Outcome, now: float) -> None:
        ready, entered = self.ready_at.pop(outcome.origin, None), \
            self.entered_at.pop(outcome.origin, None)
        if ready is None or entered is None:
            self.unmatched += 1
            return
        self.e2e.record((now - ready) * 1000)
        self.e2e_with_burst.record((now - entered) * 1000)
        stages = [ms for stage, ms in outcome.timings_ms if stage != "buffer"]
        if stages:  # the burst wait ("buffer") is in recorded time, not the service's
            self.service.record(sum(stages))
        self.degraded += bool(outcome.degraded)


def wake_if_idle(claimer: Claimer | None) -> None:
    """Work around pipeline/claims.py: in a finite run (no polling) the claimer sleeps with
    nothing due until something wakes it, and the commit of the last turn in flight does
    not (``finished(claim, None)`` wakes only at a full ``max_active``), so the run never
    ends. Called once a turn's outcomes are out: the claimer then looks, finds nothing and
    returns."""
    if claimer is not None and not claimer.in_flight:
        claimer.wake.notify()


@attrs.define
class TimedSink(OutcomeSink):
    """The outcome sink, also stopping each message's end-to-end clock."""

    tracker: Tracker | None = None
    pipeline: Pipeline | None = None

    def record(self, outcome: Outcome, at: float | None = None) -> None:
        super().record(outcome, at)
        if self.tracker is not None:
            self.tracker.finished(outcome, time.perf_counter())
        if self.pipeline is not None:
            wake_if_idle(self.pipeline.claimer)


def make_source(events: Iterable[BenchEvent], tracker: Tracker) -> Callable[[Inlets], Any]:
    """A source that pushes the workload as fast as the pipeline accepts it."""
    async def source(inlets: Inlets) -> None:
        for item in events:
            await inlets.raw.send(item.event)
            tracker.entered(item, time.perf_counter())
        tracker.source_ended(time.perf_counter())
    return source


# --- where the database is --------------------------------------------------------------------

@attrs.frozen
class Server:
    """A local PostgreSQL the bench may create databases in, and the migrated template
    every run's database is cloned from."""

    socket_dir: Path
    template: str
    port: int = 5432

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    def conninfo(self, dbname: str) -> str:
        return f"host={self.socket_dir} port={self.port} user={SERVER_USER} dbname={dbname}"


@attrs.frozen
class Route:
    """How the pipeline reaches the server: on its socket, or through the proxy's port."""

    server: Server
    proxy_port: int | None = None
    proxy_pid: int | None = None  # when the proxy is a process of its own

    def conninfo(self, dbname: str) -> str:
        if self.proxy_port is None:
            return self.server.conninfo(dbname)
        return (f"host=127.0.0.1 port={self.proxy_port} user={SERVER_USER} dbname={dbname}"
                " sslmode=disable gssencmode=disable")


@asynccontextmanager
async def routed(settings: Settings, server: Server) -> AsyncIterator[Route]:
    """The route for ``settings.delay_ms``, with the proxy running while the block runs."""
    if settings.delay_ms == 0:
        yield Route(server)
    elif settings.proxy == "loop":
        target = latency_proxy.Target(unix_path=str(server.socket_path))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(latency_proxy.serve_proxy, "127.0.0.1", 0, target,
                                       settings.delay_ms)
            yield Route(server, port)
            nursery.cancel_scope.cancel()
    else:
        async with _proxy_process(server, settings.delay_ms) as (port, pid):
            yield Route(server, port, pid)


@asynccontextmanager
async def _proxy_process(server: Server, delay_ms: float) -> AsyncIterator[tuple[int, int]]:
    script = Path(latency_proxy.__file__)
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), "--listen", "127.0.0.1:0",
         "--target-unix", str(server.socket_path), "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.move_on_after(30):
            while not line.endswith(b"\n") and (chunk := await proc.stdout.receive_some(1)):
                line += chunk
        if not line.strip().isdigit():
            raise BenchError(f"the latency proxy did not start (it printed {line!r})")
        yield int(line), proc.pid
    finally:
        proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()


@asynccontextmanager
async def fresh_database(server: Server, name: str) -> AsyncIterator[str]:
    """A database cloned from the migrated template, dropped afterwards."""
    admin = server.conninfo("postgres")
    await create_database(admin, name, template=server.template, drop_first=True)
    try:
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await drop_database(admin, name)


def _dbname(cell: str, rep: int) -> str:
    return f"bench_{os.getpid()}_{cell}_{rep}"


# --- measurements -----------------------------------------------------------------------------

async def measure_rtt(route: Route, samples: int = RTT_SAMPLES) -> float:
    """Median ``SELECT 1`` (pool checkout included, as for every store call) on one
    connection: what one round trip costs on this route."""
    async with open_pool(route.conninfo("postgres"), 1) as pool:
        store = Store(pool, 5.0)
        await store.ping()  # connect outside the measurement
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            await store.ping()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@attrs.frozen
class CpuMeter:
    """CPU time of the three parties -- this process (the pipeline), the proxy process and
    the server's processes -- so a result says who was busy: on 2 cores they all compete."""

    route: Route

    def sample(self) -> dict[str, dict[int, float]]:
        groups = {"pipeline": [psutil.Process()], "proxy": self._proxy(),
                  "server": self._server()}
        return {name: {p.pid: cpu for p in procs if (cpu := _cpu_s(p)) is not None}
                for name, procs in groups.items()}

    def _proxy(self) -> list[psutil.Process]:
        pid = self.route.proxy_pid
        return [psutil.Process(pid)] if pid is not None and psutil.pid_exists(pid) else []

    def _server(self) -> list[psutil.Process]:
        try:
            pid = int((self.route.server.socket_dir / "postmaster.pid").read_text().split()[0])
            main = psutil.Process(pid)
            return [main, *main.children()]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []


def _cpu_s(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None  # gone, or not ours to look at
    return float(times.user + times.system)


def cpu_ms_per_msg(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]],
                   messages: int) -> dict[str, float]:
    """CPU ms per message of each party between two samples (a process that started in
    between counts from zero; one that ended in between is lost -- pooled connections live
    through a run)."""
    return {name: sum(cpu - before[name].get(pid, 0.0) for pid, cpu in procs.items())
            * 1000 / messages for name, procs in after.items()}


async def warm_up(pool: Pool) -> None:
    """Open every connection of the pool before the clock starts, as a pipeline that has
    been running a while has them (connecting through the proxy costs several round trips
    and a server process each), then forget the warm-up in the pool's counters."""
    size, holding, everyone = pool.stats.size, [0], trio.Event()

    async def hold() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            holding[0] += 1
            if holding[0] == size:
                everyone.set()
            await everyone.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(size):
            nursery.start_soon(hold)
    pool.stats.peak_in_use = pool.stats.acquires = 0


@attrs.define
class Monitor:
    """Samples RSS and busy conversations while a run goes; notes RSS at every tenth of
    the events (printed with ``--soak``, to show whether memory stays flat)."""

    total_events: int
    loud: bool = False
    peak_rss_mb: float = 0.0
    peak_active: int = 0
    timeline: list[dict[str, float]] = attrs.Factory(list)

    async def run(self, metrics: Metrics, tracker: Tracker,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        process, start = psutil.Process(), time.perf_counter()
        task_status.started()
        while True:
            rss = process.memory_info().rss / 2**20
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            context = metrics.stages.get("context")
            self.peak_active = max(self.peak_active, context.active if context else 0)
            self._mark(tracker.events, time.perf_counter() - start, rss)
            await trio.sleep(SAMPLE_EVERY_S)

    def _mark(self, events: int, elapsed: float, rss: float) -> None:
        tenth = len(self.timeline) + 1
        if events < self.total_events * tenth / 10:
            return
        self.timeline.append({"events": events, "elapsed_s": round(elapsed, 2),
                              "rss_mb": round(rss, 1)})
        if self.loud:
            log(f"    {tenth * 10:3d} % of the events pushed after {elapsed:6.1f} s: "
                f"rss {rss:6.1f} MB")


async def run_mode(settings: Settings, route: Route, mode: str, rep: int,
                   events: Iterable[BenchEvent], total_events: int) -> dict[str, Any]:
    """One mode on a fresh database: the whole pipeline, the workload, the figures."""
    cfg = bench_config(settings, mode)
    async with fresh_database(route.server, _dbname(mode, rep)) as name, \
            open_pool(route.conninfo(name), settings.pool_size) as pool:
        await warm_up(pool)
        store = BenchStore(pool, cfg.database.query_timeout_s)
        tracker = Tracker(TurnMirror(burst_rules(cfg)))
        sink, metrics = TimedSink(tracker=tracker), Metrics()
        monitor = Monitor(total_events, loud=settings.soak or total_events >= LOUD_EVENTS)
        # a finite run decides turns on the workload's recorded time (pipeline.claims.Watermark)
        pipeline = Pipeline(cfg, store, sink, metrics, poll_s=None, finite=True)
        sink.pipeline = pipeline
        meter = CpuMeter(route)
        cpu_before, start = meter.sample(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run, metrics, tracker)
            await pipeline.run(make_source(events, tracker))
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        figures = _mode_figures(tracker, sink, metrics, monitor, pipeline, elapsed, store,
                                pending=await _pending(store))
        figures["cpu_ms_per_msg"] = cpu_ms_per_msg(cpu_before, meter.sample(), total_events)
        # intake no longer waits for the turn stages: the rest of the run drains the inbox
        figures["source_done_s"] = tracker.source_ended_at - start
        return figures


async def _pending(store: Store) -> int:
    """Inbox rows left unprocessed: each is a message the run failed to finish (checked on
    the side, so it does not count as one of the run's round trips)."""
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM inbox WHERE status = 'pending'")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _mode_figures(tracker: Tracker, sink: OutcomeSink, metrics: Metrics, monitor: Monitor,
                  pipeline: Pipeline, elapsed: float, store: BenchStore,
                  pending: int) -> dict[str, Any]:
    stages = {name: _percentiles(metrics.stages[name].latency)
              for name in STAGES if name in metrics.stages}
    stage_errors = sum(s.errors for s in metrics.stages.values())
    missing = tracker.events - sink.total
    batcher = pipeline.loader.batcher if pipeline.loader else None
    pool = store.pool.stats
    return {
        "msgs_per_s": tracker.events / elapsed,
        "context_p50_ms": stages.get("context", {}).get("p50_ms", 0.0),
        "claim_to_commit_p50_ms": store.claim_to_commit.percentile(50),
        "claim_to_commit_p99_ms": store.claim_to_commit.percentile(99),
        "e2e_p50_ms": tracker.e2e.percentile(50), "e2e_p95_ms": tracker.e2e.percentile(95),
        "e2e_p99_ms": tracker.e2e.percentile(99),
        "e2e_with_burst_p50_ms": tracker.e2e_with_burst.percentile(50),
        "e2e_with_burst_p99_ms": tracker.e2e_with_burst.percentile(99),
        "service_p50_ms": tracker.service.percentile(50),
        "service_p99_ms": tracker.service.percentile(99),
        "round_trips_per_msg": store.round_trips / tracker.events,
        "claims_per_msg": store.claims / tracker.events,
        "peak_connections": pool.peak_in_use, "pool_size": pool.size,
        "peak_rss_mb": monitor.peak_rss_mb,
        "errors": stage_errors + missing + tracker.unmatched + pending,
        "failed_turns": metrics.counters["failed turns"], "stage_errors": stage_errors,
        "missing_outcomes": missing, "unmatched_outcomes": tracker.unmatched,
        "pending_in_inbox": pending, "degraded_turns": tracker.degraded,
        "messages": tracker.events, "outcomes": sink.total, "elapsed_s": elapsed,
        "round_trips": store.round_trips, "claims": store.claims, "turns": tracker.turns,
        "failed_claims": metrics.counters["claims lost"],
        "peak_active_conversations": monitor.peak_active,
        "mean_batch": statistics.fmean(batcher.batch_sizes) if batcher and
        batcher.batch_sizes else None,
        "stages": stages, "actions": dict(sorted(sink.actions.items())),
        "rss_timeline": monitor.timeline, "rss_growth_mb": _growth(monitor.timeline),
    }


def _growth(timeline: list[dict[str, float]]) -> float:
    """RSS growth from the first fifth of a run (warmed up) to its end."""
    if len(timeline) < 3:
        return 0.0
    return round(timeline[-1]["rss_mb"] - timeline[1]["rss_mb"], 1)


def _percentiles(h: Histogram) -> dict[str, float]:
    return {"count": h.count, "p50_ms": h.percentile(50), "p95_ms": h.percentile(95),
            "p99_ms": h.percentile(99)}


# --- the ceiling ------------------------------------------------------------------------------

@attrs.frozen
class CeilingPlan:
    """The workload's inbox rows, which of them ask for a human, and how many turns the
    burst rule makes of them (the ceiling checks that it committed exactly these)."""

    inbox: tuple[InboundMessage, ...]
    escalating: frozenset[str]
    turns: int
    messages: int


def plan_ceiling(settings: Settings, events: Iterable[BenchEvent]) -> CeilingPlan:
    mirror = TurnMirror(burst_rules(bench_config(settings, "single")))
    inbox: list[InboundMessage] = []
    escalating: set[str] = set()
    count = turns = 0
    for item in events:
        count += 1
        if item.redelivery:
            continue
        inbox.append(item.message)
        escalating.update([item.message.message_id] if item.escalates else [])
        turns += len(mirror.add(item.message))
    turns += len(mirror.flush())
    return CeilingPlan(tuple(inbox), frozenset(escalating), turns, count)


async def run_ceiling(settings: Settings, route: Route, plan: CeilingPlan,
                      rep: int) -> dict[str, Any]:
    """The turns' SQL with no stages around it: messages/s the database allows."""
    cfg = bench_config(settings, "single")
    rules = burst_rules(cfg)
    async with fresh_database(route.server, _dbname("ceiling", rep)) as name, \
            open_pool(route.conninfo(name), settings.pool_size) as pool:
        await warm_up(pool)
        store = BenchStore(pool, cfg.database.query_timeout_s)
        await store.seed_instances(instance_rows(cfg))
        for i in range(0, len(plan.inbox), 500):  # untimed: intake's part
            await store.store_inbound(plan.inbox[i:i + 500], rules.first_due)
        after_all = plan.inbox[-1].received_at + AFTER_ALL  # every turn is closed
        before, meter = store.round_trips, CpuMeter(route)
        turns_send, turns_recv = trio.open_memory_channel[Turn](settings.channel_capacity)
        done_send, done_recv = trio.open_memory_channel[Outcome](settings.channel_capacity)
        ended = trio.Event()
        ended.set()  # the inbox holds everything: the claimer returns when it is done
        claimer = Claimer(store, rules, turns_send, done_send,
                          WorkClock(lambda: after_all, lambda _t: trio.current_time()),
                          settings.active, cfg.pipeline.lease_s, None, trio.Event(), ended,
                          renew=False)
        committed: list[Turn] = []
        cpu_before, start = meter.sample(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, done_recv)
            for _ in range(settings.ceiling_tasks):
                nursery.start_soon(_ceiling_task, store, cfg, claimer, turns_recv,
                                   plan.escalating, committed)
            await claimer.run()
        elapsed = time.perf_counter() - start
        cpu = cpu_ms_per_msg(cpu_before, meter.sample(), plan.messages)
        if len(committed) != plan.turns:
            raise BenchError(f"the ceiling committed {len(committed)} turns, not the "
                             f"{plan.turns} of the workload")
        return {"msgs_per_s": plan.messages / elapsed, "turns_per_s": plan.turns / elapsed,
                "cpu_ms_per_msg": cpu, "turns": plan.turns, "messages": plan.messages,
                "elapsed_s": elapsed, "round_trips": store.round_trips - before,
                "claims": store.claims,
                "round_trips_per_msg": (store.round_trips - before) / plan.messages,
                "claim_to_commit_p50_ms": store.claim_to_commit.percentile(50),
                "claim_to_commit_p99_ms": store.claim_to_commit.percentile(99),
                "peak_connections": pool.stats.peak_in_use}


async def _drain(recv: trio.MemoryReceiveChannel[Outcome]) -> None:
    async for _ in recv:
        pass


async def _ceiling_task(store: Store, cfg: Config, claimer: Claimer,
                        turns: trio.MemoryReceiveChannel[Turn], escalating: frozenset[str],
                        committed: list[Turn]) -> None:
    """Claimed turns, one after the other: load the context, decide (as the rules would),
    commit; tell the claimer, as dispatch does."""
    messages = Messages(cfg.escalation.handover_message, cfg.escalation.out_of_hours_message)
    first_due = burst_rules(cfg).first_due
    async for turn in turns:
        assert turn.claim is not None
        ctx = await store.load_context(turn, cfg.context.history_chars,
                                       cfg.context.recent_interactions)
        escalates = any(m.message_id in escalating for m in turn.messages)
        decision = Decision("escalate", "explicit request") if escalates else Decision("reply")
        reply = None if escalates else Reply(RULES[0]["reply"], 0.9, False, "rules")
        decided = attrs.evolve(turn, context=ctx, decision=decision, reply=reply)
        commit = turn_commit(decided, effects(decided, messages, delivered=True), first_due,
                             claimer.clock.now())
        done = await store.commit_claim(commit)
        claimer.finished(turn.claim, done.next_due)
        committed.append(turn)
        wake_if_idle(claimer)


# --- the whole benchmark ----------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_at_once(events: Iterable[BenchEvent]) -> int:
    """The most conversations open at one instant of the workload (between their first and
    last message by ``received_at``): how many it sustains concurrently, in its own time."""
    spans: dict[str, list[dt.datetime]] = {}
    for item in events:
        at = item.event.received_at
        spans.setdefault(item.message.sender, [at, at])[1] = at
    edges = sorted([(first, 1) for first, _ in spans.values()]
                   + [(last, -1) for _, last in spans.values()], key=lambda e: (e[0], -e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _workload_events(settings: Settings) -> tuple[Iterable[BenchEvent], int]:
    """The pipeline's events: made once and reused, or (soak) regenerated on each pass so
    the harness's own memory stays flat."""
    w = settings.run_workload
    if settings.soak:
        total = sum(1 for _ in generate(w))
        return _Regenerating(w), total
    events = list(generate(w))
    return events, len(events)


@attrs.frozen
class _Regenerating:
    workload: Workload

    def __iter__(self) -> Iterator[BenchEvent]:
        return generate(self.workload)


async def run_bench(settings: Settings, server: Server) -> dict[str, Any]:
    """Every cell of every repetition, interleaved; returns the JSON report."""
    load_at_start = os.getloadavg()
    events, total = _workload_events(settings)
    plan = plan_ceiling(settings, generate(settings.workload))
    open_convs = open_at_once(generate(settings.run_workload))
    log(f"workload: {total} events, {settings.run_workload.conversations} conversations "
        f"({open_convs} open at once), ceiling plan: {plan.turns} turns")
    cells = [*settings.modes, "ceiling"]
    runs: dict[str, list[dict[str, Any]]] = {cell: [] for cell in cells}
    rtts: list[float] = []
    async with routed(settings, server) as route:
        for rep in range(settings.repeat):
            rtts.append(await measure_rtt(route))
            log(f"[{rep + 1}/{settings.repeat}] rtt (SELECT 1, median) {rtts[-1]:.2f} ms")
            for cell in cells[rep % len(cells):] + cells[:rep % len(cells)]:
                if cell == "ceiling":
                    result = await run_ceiling(settings, route, plan, rep)
                else:
                    result = await run_mode(settings, route, cell, rep, events, total)
                runs[cell].append(result)
                log(_progress(rep, settings.repeat, cell, result))
    result = summarize(settings, rtts, runs, load_at_start)
    result["settings"]["conversations_open_at_once"] = open_convs
    return result


def _progress(rep: int, repeat: int, cell: str, r: dict[str, Any]) -> str:
    line = (f"[{rep + 1}/{repeat}] {cell:<10} {r['messages']:>7} msgs in {r['elapsed_s']:6.2f} s"
            f" = {r['msgs_per_s']:8,.0f} msgs/s")
    if cell != "ceiling":
        line += (f", context p50 {r['context_p50_ms']:6.2f} ms, e2e p99 {r['e2e_p99_ms']:7.1f} ms"
                 f", errors {r['errors']}")
    return line


def _median(values: list[Any]) -> Any:
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    if all(isinstance(v, dict) for v in values) and values:
        return {k: _median([v[k] for v in values]) for k in values[0]
                if all(k in v for v in values)}
    return values[0]  # lists, None, strings: the first repetition's


def summarize(settings: Settings, rtts: list[float], runs: dict[str, list[dict[str, Any]]],
              load_at_start: tuple[float, ...] = ()) -> dict[str, Any]:
    """Medians over the repetitions, in the JSON shape of issue 7 (plus extras)."""
    ceiling = _median(runs.pop("ceiling"))
    rtt = statistics.median(rtts)
    modes = {}
    for mode, results in runs.items():
        figures = _median(results)
        figures["errors"] = max(r["errors"] for r in results)  # the worst, not the median
        figures["msgs_per_s_runs"] = [round(r["msgs_per_s"], 1) for r in results]
        figures["ceiling_fraction"] = figures["msgs_per_s"] / ceiling["msgs_per_s"]
        figures["context_p50_rtt"] = figures["context_p50_ms"] / rtt
        modes[mode] = figures
    w = settings.run_workload
    return {
        "delay_ms": float(settings.delay_ms), "rtt_ms": rtt,
        "ceiling_msgs_per_s": ceiling["msgs_per_s"], "modes": modes,
        "ceiling": ceiling, "rtt_ms_runs": rtts, "targets": targets(modes, ceiling, rtt),
        "settings": {**attrs.asdict(w), "delay_ms": settings.delay_ms,
                     "repeat": settings.repeat, "pool_size": settings.pool_size,
                     "max_active_conversations": settings.active,
                     "channel_capacity": settings.channel_capacity,
                     "ceiling_tasks": settings.ceiling_tasks, "proxy": settings.proxy,
                     "soak": settings.soak},
        "server": {"kind": "embedded", "durable": False, "fsync": "off"},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_at_start": load_at_start},
    }


def targets(modes: dict[str, Any], ceiling: dict[str, Any], rtt: float) -> dict[str, Any]:
    """The issue's targets, as numbers (judged for the modes that ran)."""
    out: dict[str, Any] = {}
    for mode in ("single", "batched"):
        if mode in modes:
            out[f"{mode}_context_p50_over_rtt"] = modes[mode]["context_p50_ms"] / rtt
    best = max(modes, key=lambda m: modes[m]["msgs_per_s"])
    out["best_mode"] = best
    for other in ("sequential", "parallel"):
        if other in modes:
            out[f"best_over_{other}"] = modes[best]["msgs_per_s"] / modes[other]["msgs_per_s"]
    out["best_ceiling_fraction"] = modes[best]["msgs_per_s"] / ceiling["msgs_per_s"]
    out["errors"] = sum(m["errors"] for m in modes.values())
    out["peak_connections_within_pool"] = all(
        m["peak_connections"] <= m["pool_size"] for m in modes.values())
    return out


# --- the report -------------------------------------------------------------------------------

def report(result: dict[str, Any]) -> str:
    """The Markdown printed at the end: a header, the modes, the stages, the targets."""
    return "\n\n".join([_header(result), _modes_table(result), _stages_table(result),
                        _load_lines(result), _targets_lines(result)]) + "\n"


def _load_lines(result: dict[str, Any]) -> str:
    s, modes = result["settings"], result["modes"]
    busy = ", ".join(f"{mode} {m['peak_active_conversations']}" for mode, m in modes.items())
    growth = ", ".join(f"{mode} {m['rss_growth_mb']:+.1f} MB" for mode, m in modes.items())
    return (f"conversations open at once (by received_at): {s['conversations_open_at_once']}; "
            f"busy in the context stage at once (peak): {busy}\n"
            f"RSS from a fifth of the run to its end: {growth}")


def _header(result: dict[str, Any]) -> str:
    s, c = result["settings"], result["ceiling"]
    proxy = (f"latency proxy {s['delay_ms']:g} ms each way ({s['proxy']})" if s["delay_ms"]
             else "no proxy (Unix socket)")
    first = next(iter(result["modes"].values()))
    return "\n".join([
        f"**{s['conversations']} conversations x {s['messages']} messages** (seed {s['seed']}, "
        f"{first['messages']} events incl. redeliveries; bursts {s['burst_share']:.0%}, "
        f"redeliveries {s['redelivery_share']:.0%}, escalations {s['escalation_share']:.0%})"
        + (" -- soak" if s["soak"] else ""),
        f"server: throwaway embedded PostgreSQL, fsync off (durable=False) | {proxy} | "
        f"rtt (SELECT 1, median) {result['rtt_ms']:.2f} ms | pool {s['pool_size']} | "
        f"max active conversations {s['max_active_conversations']} | medians of "
        f"{s['repeat']} interleaved repetitions | {result['machine']['cpus']} cpus, load "
        "average at start " + " ".join(f"{x:.2f}" for x in
                                       result["machine"]["load_average_at_start"]),
        f"ceiling ({c['messages']} messages: claim + load_context + commit_claim per turn, "
        f"{s['ceiling_tasks']} tasks, no pipeline): {c['msgs_per_s']:,.0f} msgs/s "
        f"({c['turns_per_s']:,.0f} turns/s; {c['round_trips_per_msg']:.2f} round trips/msg, "
        f"claims {c['claims'] / c['messages']:.2f}/msg; claim to commit p50 / p99 "
        f"{c['claim_to_commit_p50_ms']:.1f} / {c['claim_to_commit_p99_ms']:.1f} ms); "
        f"CPU ms/msg client / proxy / server {_cpu(c)}",
    ])


def _cpu(figures: dict[str, Any]) -> str:
    cpu = figures["cpu_ms_per_msg"]
    return " / ".join(f"{cpu.get(k, 0.0):.2f}" for k in ("pipeline", "proxy", "server"))


def _modes_table(result: dict[str, Any]) -> str:
    rows = ["| mode | msgs/s | of ceiling | e2e p50 ms | e2e p99 ms "
            "| context p50 ms | context p50 / rtt | claim to commit p50 / p99 ms "
            "| round trips / msg (claims) | peak conns / pool | peak RSS MB | errors "
            "| CPU ms/msg pipeline / proxy / server |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for mode, m in result["modes"].items():
        rows.append(
            f"| {mode} | {m['msgs_per_s']:,.0f} | {m['ceiling_fraction']:.0%} "
            f"| {m['e2e_p50_ms']:.1f} | {m['e2e_p99_ms']:.1f} "
            f"| {m['context_p50_ms']:.2f} | {m['context_p50_rtt']:.2f} "
            f"| {m['claim_to_commit_p50_ms']:.1f} / {m['claim_to_commit_p99_ms']:.1f} "
            f"| {m['round_trips_per_msg']:.2f} ({m['claims_per_msg']:.2f}) "
            f"| {m['peak_connections']} / {m['pool_size']} | {m['peak_rss_mb']:.0f} "
            f"| {m['errors']} | {_cpu(m)} |")
    return "\n".join(rows)


def _stages_table(result: dict[str, Any]) -> str:
    rows = ["per stage, p50 / p95 / p99 ms:", "",
            "| mode | " + " | ".join(STAGES) + " |", "|---|" + "--:|" * len(STAGES)]
    for mode, m in result["modes"].items():
        cells = [" / ".join(f"{m['stages'][s][p]:.2f}" for p in ("p50_ms", "p95_ms", "p99_ms"))
                 if s in m["stages"] else "-" for s in STAGES]
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _targets_lines(result: dict[str, Any]) -> str:
    t, lines = result["targets"], []
    for mode in ("single", "batched"):
        if f"{mode}_context_p50_over_rtt" in t:
            lines.append(f"- {mode}: context p50 = {t[f'{mode}_context_p50_over_rtt']:.2f} x rtt "
                         "(target <= 1.3 at --delay-ms 1)")
    for other in ("sequential", "parallel"):
        if f"best_over_{other}" in t:
            lines.append(f"- best mode ({t['best_mode']}) = {t[f'best_over_{other}']:.1f} x "
                         f"{other} in msgs/s")
    lines.append(f"- best mode reaches {t['best_ceiling_fraction']:.0%} of the ceiling "
                 "(target >= 50 % at --delay-ms 0)")
    actions = Counter(next(iter(result["modes"].values()))["actions"])
    lines.append(f"- errors {t['errors']}; peak connections within the pool: "
                 f"{'yes' if t['peak_connections_within_pool'] else 'NO'}; outcomes: "
                 + ", ".join(f"{a} {n}" for a, n in sorted(actions.items())))
    return "\n".join(lines)


# --- the throwaway server ---------------------------------------------------------------------

@contextmanager
def throwaway_cluster(durable: bool = False) -> Iterator[Cluster]:
    """An embedded cluster in a temporary directory (fsync off unless ``durable``), stopped
    and removed after."""
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    root.chmod(0o755)  # as root the server runs as `postgres`: it must get in
    cluster = Cluster(root / "data", durable=durable)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)


async def prepare_server(cluster: Cluster, template: str = "bench_template") -> Server:
    """Create and migrate the template database every run is cloned from."""
    server = Server(cluster.socket_dir, template)
    await create_database(server.conninfo("postgres"), template, drop_first=True)
    async with open_pool(server.conninfo(template), 1) as pool:
        await migrate(pool)
    return server


async def _bench_on_cluster(settings: Settings, cluster: Cluster) -> dict[str, Any]:
    return await run_bench(settings, await prepare_server(cluster))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--messages", type=int, default=5, help="messages per conversation")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--delay-ms", type=float, default=1.0,
                   help="proxy delay, one way; 0 = no proxy (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated context modes")
    p.add_argument("--pool-size", type=int, default=10)
    p.add_argument("--max-active", type=int, default=0,
                   help="pipeline.max_active_conversations; 0 = one per conversation")
    p.add_argument("--channel-capacity", type=int, default=16)
    p.add_argument("--ceiling-tasks", type=int, default=40)
    p.add_argument("--burst-share", type=float, default=0.3)
    p.add_argument("--redelivery-share", type=float, default=0.05)
    p.add_argument("--escalation-share", type=float, default=0.03)
    p.add_argument("--proxy", choices=("process", "loop"), default="process",
                   help="run the proxy as its own process (default) or in this event loop")
    p.add_argument("--soak", action="store_true",
                   help="conversations 10x longer; RSS at every tenth of the run")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.delay_ms < 0:
        raise BenchError(f"--delay-ms must be >= 0, not {args.delay_ms!r}")
    if args.max_active < 0:
        raise BenchError(f"--max-active must be >= 0, not {args.max_active!r}")
    workload = Workload(args.conversations, args.messages, args.seed, args.burst_share,
                        args.redelivery_share, args.escalation_share)
    return Settings(workload, args.delay_ms, args.repeat, args.modes.split(","),
                    args.pool_size, args.max_active, args.channel_capacity,
                    args.ceiling_tasks, args.proxy, args.soak)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        bench_config(settings, "single")  # a bad bound is reported before anything starts
    except (BenchError, ConfigError) as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 2
    setup_logging("WARNING")
    try:
        with throwaway_cluster() as cluster:
            log(f"embedded postgresql (fsync off) in {cluster.data_dir}")
            result = trio.run(_bench_on_cluster, settings, cluster)
    except (ClusterError, DatabaseError, BenchError) as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.py: interrupted; the throwaway cluster was removed", file=sys.stderr)
        return 130
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
