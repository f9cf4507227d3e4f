"""The live path against the baseline: ``pipeline run`` fed the bundled day as webhooks over
HTTP (acknowledgements included), side by side with ``scripts/bench_baseline.py`` (issue 16).

* **Server**: one throwaway embedded PostgreSQL, fsync on; each run on a fresh database
  cloned from a migrated template.
* **Live**: ``pipeline run`` as its own process (webhook, turns and delivery roles; the
  ``dry`` transport), ``[intake.buffer] window_ms = 0`` (the baseline does not buffer
  bursts either: a message is a turn as soon as it is stored). ``--clients`` connections post
  the day's bodies in log order to ``/webhook/cloud-api`` or ``/webhook/evolution``; the run
  ends when every post is answered and no inbox row is pending. Client CPU is the
  ``pipeline run`` process's; server CPU the postmaster's, its children's and the backends it
  reaped.
* **Baseline**: ``scripts/bench_baseline.py`` on the same log, as its own process.
* **Rate**: user messages (inbox rows and their redeliveries, less ignored and invalid) per
  second, from the first post to the last row processed.

    .venv/bin/python scripts/bench_live.py [--repeat 3] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
import h11
import psutil
import psycopg
import trio

from pipeline.bench import ServerCpu, fresh_database, prepare_server
from pipeline.cli import bundled_day
from pipeline.config import embedded_default
from pipeline.pgcluster import SERVER_USER, throwaway_cluster
from pipeline.recorded_log import merge_logs
from stages.records import RawEvent

ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class Run:
    mode: str
    messages: int
    seconds: float
    client_cpu_ms: float  # per message
    server_cpu_ms: float  # per message
    ack_p50_ms: float | None = None
    ack_p99_ms: float | None = None
    load_cpu_ms: float | None = None  # per message, the posting process (live only)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def config_text(dsn: str) -> str:
    """The embedded default with the live bench's values in place."""
    values = {("database", "dsn"): json.dumps(dsn), ("webhook", "port"): "0",
              ("intake.buffer", "window_ms"): "0", ("metrics", "summary"): "false"}
    section, lines = "", []
    for line in embedded_default().read_text().splitlines():
        if header := re.match(r"^\[\[?([^\]]+)\]\]?", line):
            section = header.group(1)
        elif (key := re.match(r"^(\w+)\s*=", line)) and (section, key.group(1)) in values:
            line = f"{key.group(1)} = {values[section, key.group(1)]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def events(log: Path) -> list[RawEvent]:
    return [e for e in merge_logs([log]) if isinstance(e, RawEvent)]


async def live_run(server: Any, server_cpu: ServerCpu, log: list[RawEvent],
                   clients: int, n: int) -> Run:
    async with fresh_database(server, f"live_{n}") as name:
        conninfo = server.conninfo(name)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "live.toml"
            config.write_text(config_text(conninfo))
            proc = await trio.to_thread.run_sync(lambda: subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(config)], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                text=True))
            try:
                assert proc.stdout is not None
                first = await trio.to_thread.run_sync(proc.stdout.readline)
                found = re.match(r"^listening on (\S+)$", first.strip())
                if not found:
                    raise SystemExit(f"pipeline run did not start: {first!r}")
                return await _feed(found.group(1), conninfo, proc.pid, server_cpu, log,
                                   clients)
            finally:
                proc.send_signal(signal.SIGTERM)
                await trio.to_thread.run_sync(proc.wait, 60)


async def _feed(url: str, conninfo: str, pid: int, server_cpu: ServerCpu,
                log: list[RawEvent], clients: int) -> Run:
    pipeline, me = psutil.Process(pid), psutil.Process()
    where = urllib.parse.urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    acks: list[float] = []
    send, recv = trio.open_memory_channel[RawEvent](clients)

    async def client() -> None:
        async with await trio.open_tcp_stream(host, port) as stream:
            http = h11.Connection(h11.CLIENT)
            async for event in recv:
                body = json.dumps(event.body).encode()
                start = time.perf_counter()
                status = await _post(stream, http, f"/webhook/{event.format}", body)
                acks.append((time.perf_counter() - start) * 1000)
                if status not in (200, 400):
                    raise SystemExit(f"webhook answered {status}")

    cpu0, server0 = sum(pipeline.cpu_times()[:2]), server_cpu.seconds()
    load0 = sum(me.cpu_times()[:2])
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
        async with send:
            for event in log:
                await send.send(event)
    with psycopg.connect(conninfo, autocommit=True) as db:
        while db.execute("SELECT count(*) FROM inbox WHERE status = 'pending'"  # noqa: ASYNC110
                         ).fetchone() != (0,):  # another process's progress: polled
            await trio.sleep(0.01)
        seconds = time.perf_counter() - start
        cpu_s = sum(pipeline.cpu_times()[:2]) - cpu0
        server_s = server_cpu.seconds() - server0
        load_s = sum(me.cpu_times()[:2]) - load0
        (messages,) = db.execute(
            "SELECT count(*) + coalesce(sum(redeliveries), 0) FROM inbox"
            " WHERE action NOT IN ('ignored', 'invalid')").fetchone() or (0,)
    acks.sort()
    return Run("live", int(messages), seconds, cpu_s * 1000 / messages,
               server_s * 1000 / messages, statistics.median(acks),
               acks[int(len(acks) * 0.99) - 1], load_s * 1000 / messages)


async def _post(stream: trio.SocketStream, http: h11.Connection, target: str, body: bytes
                ) -> int:
    """One POST on a kept-alive connection (h11 directly: httpx's layers cost the posting
    process ~1.5 ms of CPU per request, and it shares the two cores with the pipeline)."""
    head = http.send(h11.Request(method="POST", target=target, headers=[
        ("host", "127.0.0.1"), ("content-type", "application/json"),
        ("content-length", str(len(body)))]))
    await stream.send_all((head or b"") + (http.send(h11.Data(data=body)) or b"")
                          + (http.send(h11.EndOfMessage()) or b""))
    status = 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            http.start_next_cycle()
            return status
        elif isinstance(event, h11.ConnectionClosed):
            raise SystemExit("the webhook server closed the connection")


async def baseline_run(server: Any, server_cpu: ServerCpu, log: Path, n: int) -> Run:
    async with fresh_database(server, f"live_baseline_{n}") as name:
        dsn = f"postgresql://{SERVER_USER}@/{name}?host={server.socket_dir}&port={server.port}"
        server0 = server_cpu.seconds()
        proc = await trio.run_process(
            [sys.executable, str(Path(__file__).with_name("bench_baseline.py")), "--dsn", dsn,
             "--log", str(log)], capture_stdout=True, capture_stderr=True, check=False)
        server_s = await server_cpu.settled() - server0
    if proc.returncode != 0:
        raise SystemExit(f"the baseline failed: {proc.stderr.decode()[-2000:]}")
    r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return Run("baseline", r["messages"], r["seconds"], r["cpu_ms_per_msg"],
               server_s * 1000 / r["messages"])


async def bench(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    log = events(args.log)
    with throwaway_cluster("bench-live-", durable=True) as pg:
        server = await prepare_server(pg)
        server_cpu = ServerCpu(pg.data_dir)
        for n in range(args.repeat):
            for mode in (("live", "baseline") if n % 2 == 0 else ("baseline", "live")):
                run = (await live_run(server, server_cpu, log, args.clients, n)
                       if mode == "live" else
                       await baseline_run(server, server_cpu, args.log, n))
                print(f"  {mode:8} {run.messages} msgs in {run.seconds:.2f} s = "
                      f"{run.rate:,.0f} msgs/s", file=sys.stderr)
                runs.append(run)
    return runs


def report(runs: list[Run], args: argparse.Namespace) -> str:
    lines = [f"bundled day ({args.log.name}), Unix socket, fsync on, {args.repeat} runs each "
             f"(median); live: {args.clients} HTTP clients", "",
             "| path | msgs/s | client CPU ms / msg | server CPU ms / msg | ack p50 / p99 ms "
             "| posting process CPU ms / msg |",
             "|---|---:|---:|---:|---:|---:|"]
    rates = {}
    for mode in ("live", "baseline"):
        mine = [r for r in runs if r.mode == mode]
        rates[mode] = statistics.median(r.rate for r in mine)
        acks = (f"{statistics.median(r.ack_p50_ms or 0 for r in mine):.1f} / "
                f"{statistics.median(r.ack_p99_ms or 0 for r in mine):.1f}"
                if mode == "live" else "-")
        load = (f"{statistics.median(r.load_cpu_ms or 0 for r in mine):.2f}"
                if mode == "live" else "-")
        label = ("`pipeline run` fed by webhooks" if mode == "live"
                 else "baseline (asyncio + asyncpg, no HTTP)")
        lines.append(f"| {label} | {rates[mode]:,.0f} | "
                     f"{statistics.median(r.client_cpu_ms for r in mine):.2f} | "
                     f"{statistics.median(r.server_cpu_ms for r in mine):.2f} | {acks} | {load} |")
    lines += ["", f"live / baseline: {rates['live'] / rates['baseline']:.2f} (target >= 2)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", type=int, default=10, help="HTTP connections posting at once")
    p.add_argument("--log", type=Path, default=bundled_day())
    args = p.parse_args(argv)
    print(report(trio.run(bench, args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
