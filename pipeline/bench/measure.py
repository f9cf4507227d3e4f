"""What a run is measured with besides the pipeline's own metrics: the round trip of the
route, the CPU of each party, and the process's memory while it runs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import attrs
import psutil  # type: ignore[import-untyped]
import trio

from pipeline.bench.report import log
from pipeline.bench.server import Route
from pipeline.bench.tracking import Tracker
from pipeline.db import Pool, open_pool
from pipeline.metrics import Metrics
from pipeline.store import Store

RTT_SAMPLES = 200
SAMPLE_EVERY_S = 0.1


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


class ServerCpu:
    """CPU seconds a PostgreSQL server spent: its postmaster, the live children (backends,
    WAL writer, checkpointer...) and the children it reaped (backends of closed connections:
    a run's pool is gone when it is read)."""

    def __init__(self, data_dir: Path) -> None:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        self.postmaster = psutil.Process(pid)

    def seconds(self) -> float:
        t = self.postmaster.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in self.postmaster.children():
            total += _cpu_s(child) or 0.0  # one that exited meanwhile counts as reaped
        return total

    async def settled(self) -> float:
        """:meth:`seconds` once the backends of a run that just ended have exited."""
        await trio.sleep(0.3)
        return self.seconds()


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
