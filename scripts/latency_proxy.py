"""A TCP proxy that delays every chunk by a fixed time, one way, in both directions.

Why: on one machine a PostgreSQL round trip costs a fraction of a millisecond, so a design
that needs six of them per turn looks as fast as one that needs one. Put this proxy between
the pipeline and the database and each round trip costs ``2 x delay`` more, as against a
database across a network -- the cost that the context modes exist to avoid.

How: each connection gets two one-way pipes. A pipe's reader stamps every chunk it receives
with ``due = now + delay`` and puts it in a bounded queue; one writer per pipe drains the
queue in order, sleeping until each chunk is due. One writer per direction means chunks are
never reordered; the bound (``queue_chunks``) means a slow receiver slows the sender instead
of filling memory. End of stream is passed on as a half-close once the queued bytes are out;
a reset on either side closes both.

The target is a TCP address or a Unix socket (the embedded cluster listens on
``<data_dir>/.s.PGSQL.5432``). Run on its own::

    .venv/bin/python scripts/latency_proxy.py --listen 127.0.0.1:0 \\
        --target-unix /path/to/data/.s.PGSQL.5432 --delay-ms 1

It prints the bound port on the first line of stdout and serves until SIGINT or SIGTERM.
Importable: ``port = await nursery.start(serve_proxy, "127.0.0.1", 0, target, 1.0)``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
from collections.abc import Sequence

import attrs
import trio

CHUNK_BYTES = 65536
QUEUE_CHUNKS = 64  # per direction: the backpressure bound (at most 4 MiB queued each way)

Chunk = tuple[float, bytes]  # (due time on the Trio clock, bytes)

#: what a peer that goes away abruptly raises; it ends that connection, never the proxy
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ProxyError(Exception):
    """The proxy was given something it cannot use (bad address, bad delay)."""


@attrs.frozen
class Target:
    """Where the proxy forwards to: ``host``/``port`` over TCP, or a Unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    def __attrs_post_init__(self) -> None:
        if bool(self.unix_path) == bool(self.host):
            raise ProxyError("target must be either a unix socket path or a tcp host:port, "
                             f"not {self!r}")

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"

    async def connect(self) -> trio.SocketStream:
        if self.unix_path:
            return await trio.open_unix_socket(self.unix_path)
        return await trio.open_tcp_stream(self.host, self.port)


@attrs.define
class ProxyStats:
    """What a benchmark may want to know about the proxy: traffic, and how late it was.

    ``max_late_ms`` is the worst time a chunk went out after it was due: when it grows, the
    proxy itself (not the delay) is adding latency and the measurement is off.
    """

    connections: int = 0
    open: int = 0
    resets: int = 0
    chunks: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    max_late_ms: float = 0.0


async def serve_proxy(listen_host: str, listen_port: int, target: Target, delay_ms: float, *,
                      stats: ProxyStats | None = None, queue_chunks: int = QUEUE_CHUNKS,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on ``listen_host:listen_port`` (0 = any free port) and forward each
    to ``target`` with ``delay_ms`` added one way in each direction. ``started()`` gets the
    bound port once the listener accepts connections; serves until cancelled."""
    if not delay_ms >= 0:
        raise ProxyError(f"delay_ms must be >= 0, not {delay_ms!r}")
    if queue_chunks < 1:
        raise ProxyError(f"queue_chunks must be >= 1, not {queue_chunks!r}")
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
    port = int(listeners[0].socket.getsockname()[1])
    handler = functools.partial(_proxy_connection, target=target, delay_s=delay_ms / 1000,
                                stats=stats or ProxyStats(), queue_chunks=queue_chunks)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(port)


async def _proxy_connection(client: trio.SocketStream, *, target: Target, delay_s: float,
                            stats: ProxyStats, queue_chunks: int) -> None:
    """One client: connect to the target and run both pipes until both have ended."""
    stats.connections += 1
    stats.open += 1
    try:
        async with client:
            server = await target.connect()
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, server, delay_s, stats, "up", queue_chunks)
                nursery.start_soon(_pipe, server, client, delay_s, stats, "down", queue_chunks)
    except* _GONE:
        stats.resets += 1  # a peer went away: the other side is closed by the async withs
    finally:
        stats.open -= 1


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, delay_s: float,
                stats: ProxyStats, direction: str, queue_chunks: int) -> None:
    """Bytes from ``source`` to ``sink``, each chunk ``delay_s`` after it was read, in order."""
    send, recv = trio.open_memory_channel[Chunk](queue_chunks)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_chunks, source, send, delay_s, stats, direction)
        nursery.start_soon(_write_chunks, recv, sink, stats)


async def _read_chunks(source: trio.SocketStream, send: trio.MemorySendChannel[Chunk],
                       delay_s: float, stats: ProxyStats, direction: str) -> None:
    with send:
        while data := await source.receive_some(CHUNK_BYTES):
            if direction == "up":
                stats.bytes_up += len(data)
            else:
                stats.bytes_down += len(data)
            await send.send((trio.current_time() + delay_s, data))


async def _write_chunks(recv: trio.MemoryReceiveChannel[Chunk],
                        sink: trio.SocketStream, stats: ProxyStats) -> None:
    with recv:
        async for due, data in recv:
            await trio.sleep_until(due)
            late_ms = (trio.current_time() - due) * 1000
            stats.max_late_ms = max(stats.max_late_ms, late_ms)
            stats.chunks += 1
            await sink.send_all(data)
    # the source ended: pass the half-close on so the other side sees end of stream too (a
    # peer that has already closed completely cannot take it, and needs nothing more)
    with contextlib.suppress(*_GONE):
        await sink.send_eof()


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``"127.0.0.1:5432"`` -> ``("127.0.0.1", 5432)``, or a clear error naming ``what``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ProxyError(f"{what} must be host:port with a port 0..65535, not {text!r}")
    return host, int(port)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="address to listen on, host:port (port 0 = any free port)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", help="forward to this tcp host:port")
    target.add_argument("--target-unix", help="forward to this unix socket path")
    parser.add_argument("--delay-ms", type=float, default=1.0,
                        help="delay added to each chunk, one way, in each direction")
    return parser.parse_args(argv)


async def _serve_until_signal(host: str, port: int, target: Target, delay_ms: float) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_proxy, host, port, target, delay_ms)
            print(bound, flush=True)
            print(f"latency proxy: {host}:{bound} -> {target}, {delay_ms:g} ms each way",
                  file=sys.stderr, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        host, port = parse_hostport(args.listen, "--listen")
        if args.target_unix:
            target = Target(unix_path=args.target_unix)
        else:
            target = Target(*parse_hostport(args.target, "--target"))
        trio.run(_serve_until_signal, host, port, target, args.delay_ms)
    except ProxyError as exc:
        print(f"latency_proxy.py: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"latency_proxy.py: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
