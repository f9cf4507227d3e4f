"""Where the database is: the server and its migrated template, fresh databases cloned from
it, and the route to it -- on its socket, or through the latency proxy."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import attrs
import trio

from pipeline.bench.settings import BenchError, Settings
from pipeline.database import create_database, drop_database
from pipeline.db import open_pool
from pipeline.migrate import migrate
from pipeline.pgcluster import SERVER_USER, Cluster

#: the latency proxy: a script of the source checkout (run and tested as one), not packaged
PROXY_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "latency_proxy.py"


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
        proxy = latency_proxy()
        target = proxy.Target(unix_path=str(server.socket_path))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve_proxy, "127.0.0.1", 0, target,
                                       settings.delay_ms)
            yield Route(server, port)
            nursery.cancel_scope.cancel()
    else:
        async with _proxy_process(server, settings.delay_ms) as (port, pid):
            yield Route(server, port, pid)


@asynccontextmanager
async def _proxy_process(server: Server, delay_ms: float) -> AsyncIterator[tuple[int, int]]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(proxy_script()), "--listen", "127.0.0.1:0",
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


def proxy_script() -> Path:
    if not PROXY_SCRIPT.exists():
        raise BenchError(f"{PROXY_SCRIPT} not found: the latency proxy runs from a source "
                         "checkout (--delay-ms 0 needs none)")
    return PROXY_SCRIPT


def latency_proxy() -> ModuleType:
    """The proxy's module, for ``--proxy loop``: imported from the checkout under its own
    name, once (tests/test_latency_proxy.py imports it the same way)."""
    if (loaded := sys.modules.get("latency_proxy")) is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("latency_proxy", proxy_script())
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def run_dbname(cell: str, rep: int) -> str:
    return f"bench_{os.getpid()}_{cell}_{rep}"


async def prepare_server(cluster: Cluster, template: str = "bench_template") -> Server:
    """Create and migrate the template database every run is cloned from."""
    server = Server(cluster.socket_dir, template)
    await create_database(server.conninfo("postgres"), template, drop_first=True)
    async with open_pool(server.conninfo(template), 1) as pool:
        await migrate(pool)
    return server
