"""Scale-out: 1, 2, 4 ``pipeline run --roles turns`` processes sharing one PostgreSQL.

Does throughput grow with processes when each statement costs a network round trip? The
database owns the work (:mod:`pipeline.claims`): every process claims due conversations under
leases, so processes add capacity without talking to each other.

What it does, and why each part is there:

* **Server.** A throwaway embedded PostgreSQL in a temporary directory with *fsync on*, as in
  production (every commit waits for its WAL flush), removed at the end even on error or
  Ctrl-C. ``pg_stat_statements`` is loaded: it counts every statement the workers send.
  Each run gets a fresh database cloned from a migrated template.
* **Latency.** ``scripts/latency_proxy.py`` as its own process on 127.0.0.1, ``--delay-ms``
  one way (default 5) between the workers and the server's Unix socket. The benchmark itself
  (loading, watching) talks to the socket directly, not through the proxy.
* **Workload.** ``--conversations`` x ``--messages`` from ``--seed``, made by
  ``pipeline.bench``'s generator (bursts, redeliveries, escalation requests). Intake's part
  is done here, before the clock starts: *after* the workers are up and idle, every message
  (redeliveries too) is written to the inbox with ``Store.store_inbound`` in **one** statement,
  so every process sees all of it at once and the turns are the same in every run (the
  recorded times are in the past: every turn is closed when it is claimed).
* **Workers.** K real processes, ``.venv/bin/python -m pipeline run --config X --roles
  turns`` with the proxy's DSN, ``[dispatch] transport = "dry"``, ``[webhook] enabled =
  false``, the default ``[pipeline] poll_interval_ms`` and ``lease_s``; ``--max-active``
  (default 16) and ``--pool-size`` (default 4) per process. Why so small: a process's
  capacity against a distant database is its connections over the round trip (4 / 10 ms
  x about 1.7 statements per message: some 200 messages/s), while all of them together are
  bounded by the CPU of the two cores they share with the proxy and the server (about
  2.5-3 ms of CPU per message). With 10 connections, one process alone nearly fills the
  machine and there is nothing left for a second one to add; the scale-out question is
  whether processes add capacity while each is latency-bound. ``max_active`` is four times
  the pool so that the connections stay busy while turns are in the stages without SQL or
  queue for the claim. Each writes its outcomes (``--out``) and is stopped with SIGTERM at
  the end; it must exit 0.
* **Figures.** Wall time from the load's commit until no inbox row is pending (polled every
  10 ms on the socket); user messages/s (fresh inbox rows); statements per user message
  from ``pg_stat_statements`` (reset just before the load; the load and the benchmark's own
  statements are left out), split into claims, context loads, commits, lease renewals and
  the rest, with the server's mean execution time of each; CPU of each worker, the proxy,
  the server and whatever else ran on the machine meanwhile (``psutil``, from the load to
  the end); ``SELECT 1`` through the proxy every 50 ms during the run (what a round trip
  costs under the load); and each turn's time in its stages (context to dispatch's commit,
  from the outcomes' ``timings_ms``) -- claim to commit minus the turn's waits in the
  channels between stages.
* **Checks.** Every inbox row processed, exactly the turns the burst rule makes of the
  workload (``pipeline.bench``'s mirror of it), one AI interaction per answered turn, one
  outbox row per reply or hand-over, and the processes' outcome counts summing to the rows
  (a turn done twice would be reported twice).

Run (about a minute on 2 cores)::

    .venv/bin/python scripts/bench_scaleout.py --json benchmarks/bench-scaleout.json \\
        | tee benchmarks/bench-scaleout.txt
    .venv/bin/python scripts/bench_scaleout.py --processes 1,2 --conversations 20 --delay-ms 1

Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio

from pipeline import bench
from pipeline.db import DatabaseError, open_pool
from pipeline.engine import instance_rows
from pipeline.logs import setup_logging
from pipeline.pgcluster import Cluster, ClusterError, throwaway_cluster
from pipeline.rules import burst_rules
from pipeline.store import Store

PENDING_POLL_S = 0.01
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
MONITOR = "/* scaleout monitor */ "  # the benchmark's own statements carry this
ANSWERED = ("replied", "escalated", "held")
#: pg_stat_statements text -> what the statement is (first match wins)
KINDS = (
    ("claim", "FOR UPDATE SKIP LOCKED"),
    ("commit", "WITH lease AS"),
    ("commit", "jsonb_to_recordset($1::jsonb) AS t("),  # several turns (group commit)
    ("renew", "SET lease_until = now() +"),
    ("release", "SET lease_owner = NULL"),
    ("context", "INSERT INTO messages"),
    ("load", "INSERT INTO inbox"),
)


class ScaleoutError(Exception):
    """The benchmark cannot run as asked, or a run went wrong; the message says why."""


@attrs.frozen
class Settings:
    workload: bench.Workload = attrs.Factory(lambda: bench.Workload(conversations=400))
    processes: tuple[int, ...] = (1, 2, 4)
    delay_ms: float = 5.0
    max_active: int = 16
    pool_size: int = 4
    mode: str = "claimed"
    repeat: int = 1


# --- the server -------------------------------------------------------------------------------

#: extra postgresql.conf lines: pg_stat_statements counts every statement the workers send
STATEMENT_STATS = ("shared_preload_libraries = 'pg_stat_statements'",
                   "pg_stat_statements.track = top")


async def prepare(cluster: Cluster) -> bench.Server:
    """The migrated template, with the extension every clone then has."""
    server = await bench.prepare_server(cluster, "scaleout_template")
    async with open_pool(server.conninfo(server.template), 1) as pool, \
            pool.connection() as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return server


async def _one(conninfo: str, sql: str) -> list[tuple[Any, ...]]:
    async with open_pool(conninfo, 1) as pool, pool.connection() as conn:
        cur = await conn.execute(MONITOR + sql)
        return await cur.fetchall() if cur.description else []


# --- the workers ------------------------------------------------------------------------------

def worker_config(settings: Settings, dsn: str, path: Path) -> Path:
    rules = ",\n    ".join(f"{{ match = {json.dumps(r['match'])}, "
                           f"reply = {json.dumps(r['reply'])} }}" for r in bench.RULES)
    path.write_text(f"""
[pipeline]
max_active_conversations = {settings.max_active}
shutdown_grace_s = 10.0
[database]
dsn = "{dsn}"
pool_size = {settings.pool_size}
migrate_on_start = false
[logging]
level = "WARNING"
[metrics]
summary = false
[webhook]
enabled = false
[context]
mode = "{settings.mode}"
[dispatch]
transport = "dry"
[responders.rules]
kind = "rules"
rules = [
    {rules}
]
[[instances]]
name = "{bench.INSTANCE}"
phone_number_id = "{bench.PHONE_ID}"
""")
    return path


@attrs.define
class Worker:
    index: int
    proc: trio.Process
    out: Path
    log: Path

    @property
    def pid(self) -> int:
        return int(self.proc.pid)


async def _line(proc: trio.Process, timeout: float) -> bytes:
    assert proc.stdout is not None
    line = b""
    with trio.move_on_after(timeout):
        while not line.endswith(b"\n") and (chunk := await proc.stdout.receive_some(1)):
            line += chunk
    return line


@asynccontextmanager
async def workers(settings: Settings, k: int, dsn: str, folder: Path
                  ) -> AsyncIterator[list[Worker]]:
    """K ``pipeline run --roles turns`` processes, each ready (claiming) when this yields;
    stopped with SIGTERM afterwards."""
    config = worker_config(settings, dsn, folder / "worker.toml")
    started: list[Worker] = []
    try:
        for i in range(k):
            out, log_path = folder / f"outcomes-{i}.jsonl", folder / f"worker-{i}.log"
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "pipeline", "run", "--config", str(config),
                     "--roles", "turns", "--out", str(out)],
                    stdout=subprocess.PIPE, stderr=log_fd)
            finally:
                os.close(log_fd)
            started.append(Worker(i, proc, out, log_path))
        for w in started:
            line = await _line(w.proc, READY_TIMEOUT_S)
            if not line.startswith(b"ready"):
                raise ScaleoutError(f"worker {w.index} did not start (it printed {line!r}; "
                                    f"log: {_tail(w.log)})")
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for w in started:
                if w.proc.returncode is None:
                    w.proc.send_signal(signal.SIGTERM)
            for w in started:
                with trio.move_on_after(STOP_TIMEOUT_S):
                    await w.proc.wait()
                if w.proc.returncode is None:
                    w.proc.kill()
                    await w.proc.wait()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(none)"


async def stopped(ws: list[Worker]) -> list[dict[str, int]]:
    """Stop the workers and return each one's outcome counts (its ``actions:`` line)."""
    for w in ws:
        w.proc.send_signal(signal.SIGTERM)
    counts = []
    for w in ws:
        with trio.fail_after(STOP_TIMEOUT_S):
            rest = b""
            assert w.proc.stdout is not None
            while chunk := await w.proc.stdout.receive_some(4096):
                rest += chunk
            await w.proc.wait()
        if w.proc.returncode != 0:
            raise ScaleoutError(f"worker {w.index} exited with {w.proc.returncode} "
                                f"(log: {_tail(w.log)})")
        line = next((x for x in rest.decode().splitlines() if x.startswith("actions:")), "")
        counts.append({a: int(n) for a, _, n in (p.strip().partition("=")
                                                for p in line[8:].split(",") if "=" in p)})
    return counts


# --- CPU --------------------------------------------------------------------------------------

def cpu_sample(pids: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name, group in pids.items():
        out[name] = {}
        for pid in group:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            out[name][pid] = float(t.user + t.system)
    return out


def server_pids(server: bench.Server) -> list[int]:
    try:
        pid = int((server.socket_dir / "postmaster.pid").read_text().split()[0])
        return [pid, *(c.pid for c in psutil.Process(pid).children())]
    except (OSError, ValueError, IndexError, psutil.Error):
        return []


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
             ) -> dict[str, float]:
    """CPU seconds of each group between two samples (new processes count from zero)."""
    return {name: sum(cpu - before.get(name, {}).get(pid, 0.0) for pid, cpu in procs.items())
            for name, procs in after.items()}


# --- one run ----------------------------------------------------------------------------------

@attrs.frozen
class Load:
    """The workload, made once: every message in arrival order, and what it must become."""

    messages: tuple[Any, ...]
    fresh: int
    turns: int


def make_load(settings: Settings) -> Load:
    events = list(bench.generate(settings.workload))
    plan = bench.plan_ceiling(bench.Settings(settings.workload), events)
    return Load(tuple(e.message for e in events), len(plan.inbox), plan.turns)


async def run_once(settings: Settings, server: bench.Server, route: bench.Route, k: int,
                   load: Load, rep: int, folder: Path) -> dict[str, Any]:
    """K workers on a fresh database: load the inbox, time until it is done, check it."""
    cfg = bench.bench_config(bench.Settings(settings.workload), settings.mode)
    name = f"scaleout_{os.getpid()}_{k}_{rep}"
    async with bench.fresh_database(server, name):
        direct = server.conninfo(name)
        async with open_pool(direct, 1) as pool:
            await Store(pool, 60.0).seed_instances(instance_rows(cfg))
        run_dir = folder / f"k{k}-r{rep}"
        run_dir.mkdir()
        async with workers(settings, k, route.conninfo(name), run_dir) as ws, \
                open_pool(direct, 1) as pool:
            await trio.sleep(0.5)  # their first (empty) claims and instance loads are done
            measured = await _measure(pool, server, route, name, ws, load,
                                      burst_rules(cfg).first_due)
            counts = await stopped(ws)
        checks = await verify(direct, load, counts)
    stage_ms = turn_stage_times([w.out for w in ws])
    return figures(k, load, measured, counts, checks, stage_ms)


async def _measure(pool: Any, server: bench.Server, route: bench.Route, name: str,
                   ws: list[Worker], load: Load, first_due: Any) -> dict[str, Any]:
    """Load the inbox and wait until it is done; the clock runs from the load's commit."""
    await _statement(pool, "SELECT pg_stat_statements_reset()")
    groups = {"workers": [w.pid for w in ws], "proxy": [route.proxy_pid or 0],
              "server": server_pids(server), "bench": [os.getpid()],
              **{f"w{w.index}": [w.pid] for w in ws}}
    cpu0, machine0 = cpu_sample(groups), psutil.cpu_times()
    rtts: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(_probe, route.conninfo(name), rtts)
        await Store(pool, 120.0).store_inbound(list(load.messages), first_due)
        start = time.perf_counter()
        polls, first_s = await _until_done(pool, start)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    groups["server"] = server_pids(server)
    cpu = cpu_used(cpu0, cpu_sample(groups))
    machine = _busy(psutil.cpu_times()) - _busy(machine0)
    cpu["others"] = max(0.0, machine - sum(cpu[g] for g in ("workers", "proxy", "server",
                                                            "bench")))
    return {"elapsed_s": elapsed, "first_commit_s": first_s, "pending_polls": polls,
            "cpu_s": cpu, "statements": await _statements(pool, name),
            "rtt_under_load_ms": {"p50": _pct(rtts, 50), "p99": _pct(rtts, 99),
                                  "samples": len(rtts)}}


def _busy(times: Any) -> float:
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


async def _probe(conninfo: str, rtts: list[float],
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """``SELECT 1`` through the proxy every 50 ms while the workers run: what a round trip
    costs under their load (the proxy and the server share the cores with them)."""
    async with open_pool(conninfo, 1) as pool:
        await _statement(pool, "SELECT 1")
        task_status.started()
        while True:
            begin = time.perf_counter()
            await _statement(pool, "SELECT 1")
            rtts.append((time.perf_counter() - begin) * 1000)
            await trio.sleep(0.05)


async def _statement(pool: Any, sql: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(MONITOR + sql)
        return await cur.fetchall() if cur.description else []


async def _until_done(pool: Any, start: float) -> tuple[int, float]:
    """Poll until no inbox row is pending; also return when the first row was processed
    (the workers find new work by polling: up to ``poll_interval_ms`` after the load)."""
    polls, first = 0, 0.0
    while True:
        polls += 1
        pending, processed = (await _statement(
            pool, "SELECT count(*) FILTER (WHERE status = 'pending'),"
                  " count(*) FILTER (WHERE status = 'processed') FROM inbox"))[0]
        if processed and not first:
            first = time.perf_counter() - start
        if pending == 0:
            return polls, first
        await trio.sleep(PENDING_POLL_S)


async def _statements(pool: Any, dbname: str) -> dict[str, dict[str, float]]:
    """Statements the workers ran since the reset, by kind (the benchmark's own left out):
    calls and the server's execution time."""
    rows = await _statement(pool, "SELECT s.query, s.calls, s.total_exec_time"
                                  " FROM pg_stat_statements s"
                                  " JOIN pg_database d ON d.oid = s.dbid"
                                  f" WHERE d.datname = '{dbname}'")
    kinds: dict[str, dict[str, float]] = {}
    for query, calls, exec_ms in rows:
        if MONITOR.strip() in query or "pg_stat_statements" in query:
            continue
        kind = next((k for k, marker in KINDS if marker in query), "other")
        entry = kinds.setdefault(kind, {"calls": 0, "exec_ms": 0.0})
        entry["calls"] += int(calls)
        entry["exec_ms"] += float(exec_ms)
    return kinds


async def verify(conninfo: str, load: Load, counts: list[dict[str, int]]) -> dict[str, Any]:
    """What the run left in the database, against what the workload must become."""
    answered = "('replied', 'escalated', 'held')"
    row = (await _one(conninfo, f"""SELECT
        (SELECT count(*) FROM inbox),
        (SELECT count(*) FROM inbox WHERE status = 'processed'),
        (SELECT count(DISTINCT turn_id) FROM inbox WHERE action IN {answered}),
        (SELECT count(*) FROM inbox WHERE action IN {answered}),
        (SELECT count(*) FROM inbox WHERE action IN ('replied', 'escalated')),
        (SELECT count(*) FROM ai_interactions),
        (SELECT count(*) FROM ai_interactions a WHERE NOT EXISTS (SELECT 1 FROM inbox i
            WHERE i.turn_id = a.turn_id AND i.action IN {answered})),
        (SELECT count(*) FROM outbox WHERE kind IN ('reply', 'handover')),
        (SELECT count(*) FROM conversations WHERE lease_owner IS NOT NULL OR pending <> 0)
    """))[0]
    (rows, processed, turns, answers, spoken, ai, ai_strays, outbox,
     unsettled) = map(int, row)
    reported = sum(sum(c.values()) for c in counts)
    return {
        "inbox_rows": rows, "processed": processed, "turns": turns,
        "expected_turns": load.turns, "ai_interactions": ai, "outbox_messages": outbox,
        "outcomes_reported": reported, "unsettled_conversations": unsettled,
        "ok": (rows == processed == load.fresh and turns == answers == load.turns
               and ai_strays == 0 and 0 < ai <= turns and outbox == spoken
               and reported == rows and unsettled == 0),
    }


def turn_stage_times(outs: Sequence[Path]) -> list[float]:
    """Each turn's time in its stages (context to dispatch), from the outcomes files."""
    times = []
    for out in outs:
        for line in out.read_text().splitlines():
            o = json.loads(line)
            if o["action"] in ANSWERED:
                times.append(sum(ms for stage, ms in o["timings_ms"].items()
                                 if stage != "buffer"))
    return times


def figures(k: int, load: Load, measured: dict[str, Any], counts: list[dict[str, int]],
            checks: dict[str, Any], stage_ms: list[float]) -> dict[str, Any]:
    msgs, elapsed, cpu = load.fresh, measured["elapsed_s"], measured["cpu_s"]
    statements = measured["statements"]
    worker = {kind: v for kind, v in statements.items() if kind != "load"}
    return {
        "processes": k, "messages": msgs, "turns": load.turns, **measured,
        "msgs_per_s": msgs / elapsed,
        "round_trips_per_msg": sum(v["calls"] for v in worker.values()) / msgs,
        "statements_per_msg": {kind: v["calls"] / msgs for kind, v in sorted(worker.items())},
        "server_exec_ms_per_statement": {kind: v["exec_ms"] / v["calls"]
                                         for kind, v in sorted(worker.items()) if v["calls"]},
        "cpu_ms_per_msg": {name: sec * 1000 / msgs for name, sec in cpu.items()},
        "cpu_share_of_core": {name: sec / elapsed for name, sec in cpu.items()},
        "stage_ms_p50": _pct(stage_ms, 50), "stage_ms_p99": _pct(stage_ms, 99),
        "outcomes_per_process": [sum(c.values()) for c in counts], "checks": checks,
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# --- the whole benchmark ----------------------------------------------------------------------

async def run_all(settings: Settings, cluster: Cluster) -> dict[str, Any]:
    server = await prepare(cluster)
    load = make_load(settings)
    bench.log(f"workload: {load.fresh} user messages ({len(load.messages)} events with "
              f"redeliveries), {settings.workload.conversations} conversations, "
              f"{load.turns} turns")
    route_settings = bench.Settings(settings.workload, delay_ms=settings.delay_ms)
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in settings.processes}
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        async with bench.routed(route_settings, server) as route:
            rtt = await bench.measure_rtt(route, 50)
            bench.log(f"rtt (SELECT 1 through the proxy, median) {rtt:.2f} ms")
            for rep in range(settings.repeat):
                for k in settings.processes:
                    result = await run_once(settings, server, route, k, load, rep, Path(tmp))
                    runs[k].append(result)
                    bench.log(f"[{rep + 1}/{settings.repeat}] {k} processes: "
                              f"{result['msgs_per_s']:,.0f} msgs/s in "
                              f"{result['elapsed_s']:.2f} s, "
                              f"{result['round_trips_per_msg']:.2f} statements/msg, "
                              f"checks {'ok' if result['checks']['ok'] else 'FAILED'}")
    return summarize(settings, rtt, runs, load_avg)


def summarize(settings: Settings, rtt: float, runs: dict[int, list[dict[str, Any]]],
              load_avg: tuple[float, ...]) -> dict[str, Any]:
    rows = {}
    for k, results in runs.items():
        best = sorted(results, key=lambda r: r["msgs_per_s"])[len(results) // 2]  # median run
        rows[k] = {**best, "msgs_per_s_runs": [round(r["msgs_per_s"], 1) for r in results],
                   "checks_ok": all(r["checks"]["ok"] for r in results)}
    base = rows[min(rows)]["msgs_per_s"]
    for row in rows.values():
        row["ratio"] = row["msgs_per_s"] / base
    w = settings.workload
    return {
        "delay_ms": settings.delay_ms, "rtt_ms": rtt, "processes": rows,
        "settings": {**attrs.asdict(w), "processes": list(settings.processes),
                     "delay_ms": settings.delay_ms, "repeat": settings.repeat,
                     "max_active_conversations": settings.max_active,
                     "pool_size": settings.pool_size, "context_mode": settings.mode,
                     "poll_interval_ms": 200.0, "lease_s": 30.0},
        "server": {"kind": "embedded", "durable": True, "fsync": "on",
                   "statements_counted_by": "pg_stat_statements (calls, top level)"},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_at_start": load_avg},
    }


def report(result: dict[str, Any]) -> str:
    s, runs = result["settings"], result["processes"]
    first = next(iter(runs.values()))
    head = (f"**{s['conversations']} conversations x {s['messages']} messages** (seed "
            f"{s['seed']}; {first['messages']} user messages, {first['turns']} turns) | "
            f"embedded PostgreSQL, fsync on | latency proxy {s['delay_ms']:g} ms each way, "
            f"rtt (SELECT 1, idle) {result['rtt_ms']:.2f} ms | per process: "
            f"max_active_conversations {s['max_active_conversations']}, pool_size "
            f"{s['pool_size']}, context mode {s['context_mode']}, poll "
            f"{s['poll_interval_ms']:g} ms | {result['machine']['cpus']} cpus, load average at "
            "start " + " ".join(f"{x:.2f}" for x in result["machine"]["load_average_at_start"]))
    rows = ["| processes | msgs/s | ratio to 1 | wall s (first commit) "
            "| round trips / msg: all (claim / context / commit / renew / other) "
            "| turn in stages p50 / p99 ms | rtt under load p50 / p99 ms "
            "| server ms / statement: claim / context / commit "
            "| CPU % of a core: each worker / proxy / server / others on the machine "
            "| CPU ms/msg: workers / proxy / server | outcomes per process | checks |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    rows += [_row(k, r) for k, r in runs.items()]
    most = max(runs)
    target = (f"- {most} processes = {runs[most]['ratio']:.2f} x one (target >= 3 at 4); "
              f"statements per user message {runs[most]['round_trips_per_msg']:.2f} at "
              f"{most} processes (target <= 1.5)")
    return "\n\n".join([head, "\n".join(rows), target]) + "\n"


def _row(k: int, r: dict[str, Any]) -> str:
    per, exe = r["statements_per_msg"], r["server_exec_ms_per_statement"]
    named = ("claim", "context", "commit", "renew")
    split = " / ".join(f"{per.get(kind, 0.0):.2f}" for kind in named)
    other = sum(v for kind, v in per.items() if kind not in named)
    share, ms, rtt = r["cpu_share_of_core"], r["cpu_ms_per_msg"], r["rtt_under_load_ms"]
    each = " ".join(f"{share[f'w{i}']:.0%}" for i in range(k))
    return (f"| {k} | {r['msgs_per_s']:,.0f} | {r['ratio']:.2f} "
            f"| {r['elapsed_s']:.2f} ({r['first_commit_s']:.2f}) "
            f"| {r['round_trips_per_msg']:.2f} ({split} / {other:.2f}) "
            f"| {r['stage_ms_p50']:.1f} / {r['stage_ms_p99']:.1f} "
            f"| {rtt['p50']:.1f} / {rtt['p99']:.1f} "
            f"| {' / '.join(f'{exe.get(kind, 0.0):.2f}' for kind in named[:3])} "
            f"| {each} / {share['proxy']:.0%} / {share['server']:.0%} / {share['others']:.0%} "
            f"| {ms['workers']:.2f} / {ms['proxy']:.2f} / {ms['server']:.2f} "
            f"| {', '.join(map(str, r['outcomes_per_process']))} "
            f"| {'ok' if r['checks_ok'] else 'FAILED'} |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--messages", type=int, default=5, help="messages per conversation")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--delay-ms", type=float, default=5.0, help="proxy delay, one way")
    p.add_argument("--max-active", type=int, default=16,
                   help="[pipeline] max_active_conversations of each process (default 16)")
    p.add_argument("--pool-size", type=int, default=4,
                   help="[database] pool_size of each process (default 4)")
    p.add_argument("--mode", default="claimed", choices=bench.MODES, help="[context] mode")
    p.add_argument("--repeat", type=int, default=1, help="runs per process count (median)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        processes = tuple(int(x) for x in args.processes.split(","))
    except ValueError:
        processes = ()
    if not processes or min(processes) < 1:
        raise ScaleoutError(f"--processes must be a comma-separated list of counts >= 1, "
                            f"not {args.processes!r}")
    if args.delay_ms <= 0:
        raise ScaleoutError(f"--delay-ms must be > 0 (the workers reach the server through "
                            f"the proxy), not {args.delay_ms!r}")
    for name in ("max_active", "pool_size", "repeat"):
        if getattr(args, name) < 1:
            raise ScaleoutError(f"--{name.replace('_', '-')} must be >= 1, not "
                                f"{getattr(args, name)!r}")
    try:
        workload = bench.Workload(args.conversations, args.messages, args.seed)
    except bench.BenchError as exc:
        raise ScaleoutError(str(exc)) from None
    return Settings(workload, processes, args.delay_ms, args.max_active, args.pool_size,
                    args.mode, args.repeat)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except ScaleoutError as exc:
        print(f"bench_scaleout.py: {exc}", file=sys.stderr)
        return 2
    setup_logging("WARNING")
    try:
        with throwaway_cluster("pipeline-scaleout-", durable=True,
                               settings=STATEMENT_STATS) as cluster:
            bench.log(f"embedded postgresql (fsync on) in {cluster.data_dir}")
            result = trio.run(run_all, settings, cluster)
    except (ClusterError, DatabaseError, ScaleoutError, bench.BenchError) as exc:
        print(f"bench_scaleout.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_scaleout.py: interrupted; the throwaway cluster was removed",
              file=sys.stderr)
        return 130
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        bench.log(f"results written to {args.json}")
    return 0 if all(r["checks_ok"] for r in result["processes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
