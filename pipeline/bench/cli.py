"""The command line of ``scripts/bench.py`` and ``pipeline bench``: options, a throwaway
cluster for the run, the report on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

import pipeline.bench
from pipeline.bench.report import log, report
from pipeline.bench.runs import run_bench
from pipeline.bench.server import prepare_server
from pipeline.bench.settings import MODES, BenchError, Settings, Workload, bench_config
from pipeline.config import ConfigError
from pipeline.db import DatabaseError
from pipeline.logs import setup_logging
from pipeline.pgcluster import Cluster, ClusterError, throwaway_cluster


async def _bench_on_cluster(settings: Settings, cluster: Cluster) -> dict[str, Any]:
    return await run_bench(settings, await prepare_server(cluster))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(pipeline.bench.__doc__ or "").splitlines()[0])
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
    """Run the benchmark as the options say; the exit code: 0 done, 1 failed, 2 bad options,
    130 interrupted (the throwaway cluster is removed in every case)."""
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        bench_config(settings, "single")  # a bad bound is reported before anything starts
    except (BenchError, ConfigError) as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 2
    setup_logging("WARNING")
    try:
        with throwaway_cluster("pipeline-bench-") as cluster:
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
