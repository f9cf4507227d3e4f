"""How fast is a webhook acknowledged? p50/p99 of the 200 at moderate load.

Starts ``pipeline run`` as its own process on a throwaway embedded PostgreSQL (fsync on, as
in production), then posts signed Cloud API bodies -- each a new message id, spread over
many senders -- from this process over HTTP on 127.0.0.1, at a few fixed concurrencies.
A 200 means the message is in the inbox, so the figure includes the inbox write. The server
is stopped with SIGTERM at the end and must drain and exit 0.

    .venv/bin/python scripts/bench_webhook.py [--requests 2000] [--rates 50,200,400]

Latency rows are open loop (requests leave on a fixed schedule, latency counted from the
scheduled time); throughput rows are closed loop (N requests in flight at all times).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

SECRET = "bench-secret"


def body(n: int) -> bytes:
    message = {"from": f"55119{n % 500:08d}", "id": f"wamid.bench{n}",
               "timestamp": str(1_700_000_000 + n), "type": "text",
               "text": {"body": f"what is the price of item {n}?"}}
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550000000", "phone_number_id": "bench"},
             "contacts": [{"profile": {"name": "Bench"}, "wa_id": message["from"]}],
             "messages": [message]}
    return json.dumps({"object": "whatsapp_business_account",
                       "entry": [{"id": "1", "changes": [{"field": "messages",
                                                          "value": value}]}]}).encode()


def signature(raw: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()


def start_server(root: Path) -> tuple[subprocess.Popen[str], str]:
    config = root / "bench.toml"
    config.write_text(f"""
[pipeline]
shutdown_grace_s = 30.0
[database]
data_dir = "{root / 'data'}"
[metrics]
summary = false
[webhook]
port = 0
app_secret = "{SECRET}"
[[instances]]
name = "bench"
phone_number_id = "bench"
""")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--log-level", "WARNING", "run",
                             "--config", str(config)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split()[-1]


async def paced(url: str, first: int, count: int, rate: float) -> tuple[list[float], float]:
    """Open loop: request n leaves at start + n / rate whatever the answers do, so the
    latency is what a sender at that rate sees (no coordinated omission)."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def one(n: int, due: float) -> None:
            raw = body(n)
            r = await client.post(f"{url}/webhook/cloud-api", content=raw, headers={
                "x-hub-signature-256": signature(raw), "content-type": "application/json"})
            latencies.append((trio.current_time() - due) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"request {n}: {r.status_code} {r.text}")

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                due = start + i / rate
                await trio.sleep_until(due)
                nursery.start_soon(one, first + i, due)
        return latencies, trio.current_time() - start


async def load(url: str, first: int, count: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    todo = iter(range(first, first + count))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def worker() -> None:
            for n in todo:
                raw = body(n)
                start = time.perf_counter()
                r = await client.post(f"{url}/webhook/cloud-api", content=raw, headers={
                    "x-hub-signature-256": signature(raw), "content-type": "application/json"})
                latencies.append((time.perf_counter() - start) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"request {n}: {r.status_code} {r.text}")

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return latencies, time.perf_counter() - start


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency")
    parser.add_argument("--rates", default="50,200,400",
                        help="open-loop rates (requests/s) for the latency rows")
    parser.add_argument("--concurrency", default="1,10",
                        help="closed-loop concurrencies for the throughput rows")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    root.chmod(0o755)
    proc, url = start_server(root)
    rows = []
    try:
        trio.run(load, url, 0, 200, 4)  # warm-up
        first = 1000
        for rate in (float(x) for x in args.rates.split(",")):
            lat, elapsed = trio.run(paced, url, first, args.requests, rate)
            first += args.requests
            rows.append((f"open loop, {rate:.0f}/s", len(lat) / elapsed, statistics.median(lat),
                         pct(lat, 95), pct(lat, 99), max(lat)))
        for c in (int(x) for x in args.concurrency.split(",")):
            lat, elapsed = trio.run(load, url, first, args.requests, c)
            first += args.requests
            rows.append((f"closed loop, {c} at a time", len(lat) / elapsed,
                         statistics.median(lat), pct(lat, 95), pct(lat, 99), max(lat)))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        Path(root / "data").exists() and subprocess.run(
            [sys.executable, "-m", "pipeline", "db", "stop", "--config", str(root / "bench.toml")],
            capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
    print(f"webhook acknowledgement (200 = stored in the inbox), {args.requests} signed Cloud "
          f"API bodies per row, server `pipeline run` in its own process, client here; "
          f"{os.cpu_count()} CPUs")
    print("| load | requests/s | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for c, rps, p50, p95, p99, top in rows:
        print(f"| {c} | {rps:,.0f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {top:.1f} |")
    print(f"server exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
