"""scripts/latency_proxy.py: bytes pass unchanged and in order both ways, end of stream is
passed on, and the added round trip is about twice the delay.

The round-trip test is the one place in the suite that measures the real clock: real time
is what the proxy is for. Its bounds are loose on purpose (a busy CI machine adds
scheduling delay, never removes any).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


proxy = load_script("latency_proxy")


async def echo(stream: trio.SocketStream) -> None:
    """Send back everything, then close when the client half-closes."""
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def start_tcp_echo(nursery: trio.Nursery) -> Any:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), echo, 0)
    return proxy.Target("127.0.0.1", listeners[0].socket.getsockname()[1])


async def start_unix_echo(nursery: trio.Nursery, folder: str) -> Any:
    path = os.path.join(folder, "echo.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    await nursery.start(trio.serve_listeners, echo, [trio.SocketListener(sock)])
    return proxy.Target(unix_path=path)


async def start_proxy(nursery: trio.Nursery, target: Any, delay_ms: float,
                      **kwargs: Any) -> tuple[int, Any]:
    stats = proxy.ProxyStats()
    port = await nursery.start(
        lambda task_status: proxy.serve_proxy("127.0.0.1", 0, target, delay_ms, stats=stats,
                                              task_status=task_status, **kwargs))
    return port, stats


async def exchange(port: int, chunks: list[bytes]) -> bytes:
    """Send ``chunks`` one send each while reading everything back until end of stream."""
    received = bytearray()
    stream = await trio.open_tcp_stream("127.0.0.1", port)

    async def send_all() -> None:
        for chunk in chunks:
            await stream.send_all(chunk)
        await stream.send_eof()

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        while data := await stream.receive_some(65536):
            received += data
    return bytes(received)


def random_chunks(seed: int, count: int, largest: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, largest)) for _ in range(count)]


@pytest.mark.parametrize("delay_ms", [0.0, 1.0])
async def test_bytes_pass_unchanged_both_ways(delay_ms: float) -> None:
    chunks = random_chunks(7, 200, 20_000)
    async with trio.open_nursery() as nursery:
        port, stats = await start_proxy(nursery, await start_tcp_echo(nursery), delay_ms)
        assert await exchange(port, chunks) == b"".join(chunks)
        nursery.cancel_scope.cancel()
    total = sum(map(len, chunks))
    assert (stats.bytes_up, stats.bytes_down) == (total, total)
    assert stats.connections == 1


async def test_order_kept_under_many_chunks_and_a_full_queue() -> None:
    """Thousands of small sends through a queue of 2 chunks: backpressure, never reordering."""
    chunks = [f"{i:06d}\n".encode() for i in range(5000)]
    with tempfile.TemporaryDirectory() as folder:
        async with trio.open_nursery() as nursery:
            target = await start_unix_echo(nursery, folder)
            port, _ = await start_proxy(nursery, target, 2.0, queue_chunks=2)
            echoed = await exchange(port, chunks)
            nursery.cancel_scope.cancel()
    assert echoed.splitlines() == [c.rstrip() for c in chunks]


async def test_end_of_stream_and_resets_end_only_their_connection() -> None:
    async with trio.open_nursery() as nursery:
        port, stats = await start_proxy(nursery, await start_tcp_echo(nursery), 1.0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"abc")
        await stream.aclose()  # gone without waiting for the echo
        assert await exchange(port, [b"still ", b"serving"]) == b"still serving"
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert stats.open == 0  # both connections are fully closed on the proxy's side
        nursery.cancel_scope.cancel()
    assert stats.connections == 2


async def round_trip_ms(port: int, times: int = 25) -> float:
    """Median time of a one-byte ping-pong on one connection."""
    samples = []
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for _ in range(times):
            start = time.perf_counter()
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
            samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


@pytest.mark.parametrize(("delay_ms", "slack_ms"), [(1.0, 8.0), (10.0, 15.0)])
async def test_added_round_trip_is_about_twice_the_delay(delay_ms: float,
                                                         slack_ms: float) -> None:
    async with trio.open_nursery() as nursery:
        target = await start_tcp_echo(nursery)
        direct = await round_trip_ms(target.port)
        port, _ = await start_proxy(nursery, target, delay_ms)
        proxied = await round_trip_ms(port)
        nursery.cancel_scope.cancel()
    added = proxied - direct
    assert 2 * delay_ms * 0.95 <= added <= 2 * delay_ms + slack_ms, (direct, proxied)


async def run_cli(*args: str, then: Callable[[int], Awaitable[None]]) -> int:
    """Start the proxy program, hand its printed port to ``then``, stop it with SIGTERM."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(SCRIPTS / "latency_proxy.py"), *args], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        assert line.strip().isdigit(), line
        await then(int(line))
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            return await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_cli_prints_its_port_and_stops_cleanly() -> None:
    async with trio.open_nursery() as nursery:
        target = await start_tcp_echo(nursery)

        async def check(port: int) -> None:
            assert await exchange(port, [b"hello ", b"proxy"]) == b"hello proxy"

        code = await run_cli("--listen", "127.0.0.1:0", "--target", str(target),
                             "--delay-ms", "1", then=check)
        nursery.cancel_scope.cancel()
    assert code == 0


def test_cli_explains_bad_addresses() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "latency_proxy.py"),
                           "--listen", "localhost", "--target-unix", "/nowhere"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == ("latency_proxy.py: --listen must be host:port with a port "
                                   "0..65535, not 'localhost'")
