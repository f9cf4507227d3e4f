"""Replay speed: the faithful (event-time) replay of the bundled day against the same log
pushed as fast as the pipeline accepts it, side by side in one run (issue 12).

* **Faithful**: ``pipeline replay`` (``--clock event``, the default): every decision on the
  recorded times, the outcomes the same in every run.
* **Pushed**: ``--clock 100000x``: the log paced at 100,000 times its recorded speed on the
  wall clock, i.e. as fast as the pipeline takes it, with bursts closed by the wall clock
  (so they split: more, smaller turns). The baseline the faithful replay is measured
  against.
* **Server**: a throwaway embedded PostgreSQL, *fsync on* by default (``--fsync off``), each
  run on a fresh database cloned from a migrated template. Between the pipeline and the
  server, ``scripts/latency_proxy.py`` adds ``--delay-ms`` one way (default 1; 0 = the Unix
  socket directly).
* **Rates**: user messages (every outcome but ``ignored`` and ``invalid``) per second of the
  run (from the first event handed over to the last outcome; database set-up excluded).
  The modes alternate, ``--repeat`` times each (default 5), medians reported; the
  faithful runs' outcome files are compared byte for byte.
* **Per message** (p50 / p99): real time from an event entering the pipeline to each of its
  user messages' outcome (for the faithful replay this includes waiting, in event time, for
  the burst window to close -- i.e. for later lines to be read); the baseline's, from a
  message entering its 100 in flight to its end.

Run (about a minute on 2 cores)::

    .venv/bin/python scripts/bench_replay.py
    .venv/bin/python scripts/bench_replay.py --delay-ms 0 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from loguru import logger

from pipeline.bench import (
    Server,
    ServerCpu,
    fresh_database,
    measure_rtt,
    prepare_server,
    routed,
)
from pipeline.cli import bundled_day
from pipeline.config import load_config
from pipeline.pgcluster import SERVER_USER, Cluster, throwaway_cluster
from pipeline.replay import ClockChoice, ReplayResult, replay

MODES = {"faithful": ClockChoice(True), "pushed": ClockChoice(False, 100000.0)}


@attrs.frozen
class Route:
    """What ``bench.routed`` needs to know."""

    delay_ms: float
    proxy: str = "process"


@attrs.frozen
class Run:
    mode: str
    messages: int
    seconds: float
    turns: int
    round_trips: int
    digest: str
    cpu_ms_per_msg: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu_ms_per_msg: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


SERVER_CPU: ServerCpu | None = None


async def one_run(server: Server, conninfo_of: object, mode: str, log: Path, n: int) -> Run:
    async with fresh_database(server, f"replay_{os.getpid()}_{mode}_{n}") as name:
        cfg = load_config(None)
        dsn = conninfo_of(name)  # type: ignore[operator]
        cfg = attrs.evolve(cfg, database=attrs.evolve(cfg.database, dsn=dsn))
        out = io.StringIO()
        assert SERVER_CPU is not None
        server_before = await SERVER_CPU.settled()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        result: ReplayResult = await replay(cfg, [log], out=out, clock=MODES[mode],
                                            fresh=False)
        after = resource.getrusage(resource.RUSAGE_SELF)
        server_s = await SERVER_CPU.settled() - server_before
    actions = result.sink.actions
    messages = sum(v for k, v in actions.items() if k not in ("ignored", "invalid"))
    turns = actions["replied"] + actions["escalated"] + actions["held"]
    cpu_s = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return Run(mode, messages, result.elapsed_s, turns, result.round_trips,
               hashlib.sha256(out.getvalue().encode()).hexdigest()[:12],
               cpu_s * 1000 / max(messages, 1), result.message_ms.percentile(50),
               result.message_ms.percentile(99),
               server_cpu_ms_per_msg=server_s * 1000 / max(messages, 1))


async def baseline_run(server: Server, route: Any, log: Path, n: int) -> Run:
    """scripts/bench_baseline.py (asyncio + asyncpg) as its own process, on a fresh database
    reached the same way."""
    async with fresh_database(server, f"replay_{os.getpid()}_baseline_{n}") as name:
        if route.proxy_port is None:
            dsn = (f"postgresql://{SERVER_USER}@/{name}?host={server.socket_dir}"
                   f"&port={server.port}")
        else:
            dsn = (f"postgresql://{SERVER_USER}@127.0.0.1:{route.proxy_port}/{name}"
                   "?sslmode=disable")
        assert SERVER_CPU is not None
        server_before = await SERVER_CPU.settled()
        proc = await trio.run_process(
            [sys.executable, str(Path(__file__).with_name("bench_baseline.py")), "--dsn", dsn,
             "--log", str(log)], capture_stdout=True, capture_stderr=True, check=False)
        server_s = await SERVER_CPU.settled() - server_before
    if proc.returncode != 0:
        raise SystemExit(f"the baseline failed: {proc.stderr.decode()[-2000:]}")
    r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return Run("baseline", r["messages"], r["seconds"], r["messages"], r["round_trips"], "-",
               r["cpu_ms_per_msg"], r["p50_ms"], r["p99_ms"],
               server_s * 1000 / max(r["messages"], 1))


async def bench(args: argparse.Namespace, pg: Cluster) -> list[Run]:
    global SERVER_CPU
    server = await prepare_server(pg)
    SERVER_CPU = ServerCpu(pg.data_dir)
    runs: list[Run] = []
    async with routed(Route(args.delay_ms), server) as route:  # type: ignore[arg-type]
        rtt = await measure_rtt(route)
        print(f"round trip (SELECT 1): {rtt:.2f} ms; fsync {args.fsync}", file=sys.stderr)
        for n in range(args.repeat):
            order = list(MODES) if n % 2 == 0 else list(reversed(MODES))
            if args.baseline:
                order.insert(n % 3, "baseline")
            for mode in order:
                run = (await baseline_run(server, route, args.log, n) if mode == "baseline"
                       else await one_run(server, route.conninfo, mode, args.log, n))
                print(f"  {mode:9} {run.messages} msgs in {run.seconds:.2f} s = "
                      f"{run.rate:,.0f} msgs/s, {run.turns} turns, outcomes {run.digest}",
                      file=sys.stderr)
                runs.append(run)
    return runs


LABELS = {"faithful": "faithful (`--clock event`)", "pushed": "pushed (`--clock 100000x`)",
          "baseline": "baseline (asyncio + asyncpg, scripts/bench_baseline.py)"}


def report(runs: list[Run], args: argparse.Namespace) -> str:
    modes = [m for m in LABELS if any(r.mode == m for r in runs)]
    rates = {m: statistics.median(r.rate for r in runs if r.mode == m) for m in modes}
    lines = [f"bundled day ({args.log.name}), {args.delay_ms:g} ms one way, fsync "
             f"{args.fsync}, {args.repeat} runs each (median):", "",
             "| replay | msgs/s | turns | round trips / msg | client CPU ms / msg | "
             "server CPU ms / msg | p50 / p99 ms per msg | distinct outcome files |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in modes:
        mine = [r for r in runs if r.mode == mode]
        latency = (f"{statistics.median(r.p50_ms or 0 for r in mine):.1f} / "
                   f"{statistics.median(r.p99_ms or 0 for r in mine):.1f}"
                   if mine[0].p50_ms is not None else "-")
        lines.append(f"| {LABELS[mode]} | {rates[mode]:,.0f} | {mine[0].turns} | "
                     f"{statistics.median(r.round_trips / r.messages for r in mine):.2f} | "
                     f"{statistics.median(r.cpu_ms_per_msg for r in mine):.2f} | "
                     f"{statistics.median(r.server_cpu_ms_per_msg for r in mine):.2f} | "
                     f"{latency} | "
                     f"{len({r.digest for r in mine}) if mode != 'baseline' else '-'} |")
    ratio = rates["faithful"] / rates["pushed"]
    lines += ["", f"faithful / pushed: {ratio:.2f} (target >= 0.90: "
              f"{'met' if ratio >= 0.9 else 'NOT met'}); faithful outcomes identical in all "
              f"{args.repeat} runs: {len({r.digest for r in runs if r.mode == 'faithful'}) == 1}"]
    if "baseline" in rates:
        lines.append(f"faithful / baseline: {rates['faithful'] / rates['baseline']:.2f}; "
                     f"pushed / baseline: {rates['pushed'] / rates['baseline']:.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, default=1.0, help="one-way latency (0: no proxy)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each mode")
    p.add_argument("--fsync", choices=("on", "off"), default="on")
    p.add_argument("--log", type=Path, default=bundled_day(), help="the log to replay")
    p.add_argument("--baseline", action="store_true",
                   help="also run the asyncio + asyncpg port (scripts/bench_baseline.py)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.delay_ms < 0:
        p.error("--repeat must be >= 1 and --delay-ms >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    with throwaway_cluster("pipeline-bench-", durable=args.fsync == "on") as pg:
        runs = trio.run(bench, args, pg)
    print(report(runs, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
