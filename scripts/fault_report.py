"""Run the fault-injection scenarios of tests/test_faults.py and print the reliability table.

    .venv/bin/python scripts/fault_report.py [--seeds 1 2 3] [--only crash outage deps sigterm lost]

Each scenario starts ``pipeline run`` as a subprocess on a throwaway embedded PostgreSQL
(fsync off; made here and removed at the end), breaks something for real and counts, from
the database, the messages acknowledged with a 200, lost (must be 0) and doubled (must be 0).
Prints a Markdown table; exit code 1 if anything was lost or doubled.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the scenarios live in the tests; tests/ is not a package: its modules (and their helpers,
# e.g. tests/asgi.py) import each other as top-level modules, as pytest's rootdir makes them
sys.path.insert(0, str(ROOT / "tests"))

import test_faults as faults  # noqa: E402
import test_send_crash  # noqa: E402

from pipeline.pgcluster import Cluster, throwaway_cluster  # noqa: E402

Row = tuple[str, Any, Any, Any, str]  # fault, acknowledged, lost, doubled, notes


def on_fresh_database(pg: Cluster, name: str, folder: Path, scenario: Callable[..., Any],
                      *args: Any) -> Any:
    """Run ``scenario(pg, db, folder, *args)`` on a fresh database, dropped after."""
    db = faults.fresh_database(pg, name)
    folder.mkdir()
    try:
        return trio.run(scenario, pg, db, folder, *args)
    finally:
        faults.drop_database(pg, db)


def per_seed(pg: Cluster, work: Path, seeds: list[int], name: str,
             scenario: Callable[..., Any]) -> Iterator[tuple[int, Any]]:
    """Run ``scenario(pg, db, folder, seed)`` for each seed, each on a fresh database."""
    for seed in seeds:
        yield seed, on_fresh_database(pg, name, work / f"{name}-{seed}", scenario, seed)


def crash_rows(pg: Cluster, work: Path, seeds: list[int]) -> list[Row]:
    rows: list[Row] = []
    for seed, r in per_seed(pg, work, seeds, "crash", faults.crash_scenario):
        t = r.tally
        rows.append((f"SIGKILL at random points, restart (seed {seed})",
                     t.acknowledged, t.lost, t.doubled,
                     f"{r.kills} kills while serving + {r.kills_at_start} during a start; "
                     f"{r.recovered} conversations of killed processes taken over at the "
                     f"{r.starts} starts; "
                     f"final SIGTERM: exit {r.exit_code}; {len(t.problems)} problems"))
    return rows


def send_crash_rows(pg: Cluster, work: Path, seeds: list[int]) -> list[Row]:
    """tests/test_send_crash.py: SIGKILLs while replies go to fakes of both channels that
    echo what they send."""
    rows: list[Row] = []
    for seed, r in per_seed(pg, work, seeds, "sendcrash", test_send_crash.send_crash_scenario):
        doubled = sum((r.sends - r.delivered).values())
        lost = sum((r.delivered - r.sends).values()) + sum(r.other_rows.values())
        rows.append((f"SIGKILL between send and record, replies to echoing Cloud API and "
                     f"Evolution fakes (seed {seed})", f"{sum(r.delivered.values())} replies",
                     lost, doubled,
                     f"{r.kills} kills; sends received {sum(r.sends.values())} = delivered "
                     f"rows {sum(r.delivered.values())}; {r.reconciled} sends in doubt "
                     f"recognised by their echo, {r.resent} sent again after no echo"))
    return rows


def outage_rows(work: Path) -> list[Row]:
    folder = work / "outage"
    folder.mkdir()
    r = trio.run(faults.outage_scenario, folder)
    t = r.tally
    doubled = f"{t.doubled + r.sent_twice}" + (f" ({r.sent_twice} replies sent twice)"
                                                if r.sent_twice else "")
    return [(f"PostgreSQL server stopped for {r.outage_s:.1f} s under load", t.acknowledged,
             t.lost, doubled,
             f"{r.answers_503} answers 503 (200 during the outage: {r.ok_during_outage}); "
             f"first 200 {r.recovered_s:.2f} s after the restart, same process: "
             f"{'yes' if r.same_process else 'NO'}; retries: claims {r.retries['claims']}, "
             f"context {r.retries['context']}, dispatch {r.retries['dispatch']}; failed turns "
             f"{r.failed_turns}; {r.replies_sent} sends for {r.replies_delivered} replies, "
             f"{r.unrecorded} sends not recorded")]


def lost_answer_rows(pg: Cluster, work: Path) -> list[Row]:
    r = on_fresh_database(pg, "lost", work / "lost", faults.lost_answer_scenario)
    stuck = not r.processed_in_run
    return [("database connection cut after the inbox write committed", 3,
             "0" + (" (1 stuck pending until the next start)" if stuck else ""), 0,
             f"client got {' then '.join(map(str, r.statuses))}; processed by the running "
             f"pipeline: {'no' if stuck else 'yes'}; after a restart: "
             f"{'yes' if r.processed_after_restart else 'NO'}")]


def _lat(values: list[float]) -> str:
    return f"max {max(values):.2f} s" if values else "none"


def deps_rows(pg: Cluster, work: Path) -> list[Row]:
    r = on_fresh_database(pg, "deps", work / "deps", faults.dependency_scenario)
    t = r.tally
    healthy = [s for name in faults.HEALTHY for s in r.latency_s.get(name, [])]
    dead = sum(len(v) for v in r.dead_reasons.values())
    affected = ", ".join(f"{name} {_lat(r.latency_s.get(name, []))}"
                         for name in ("down", "slow", "e500", "e429", "ai500", "aislow"))
    replies = sum(r.replies.values())
    return [("customer webhook down / slow / 500 / 429; responder 500 / timing out",
             t.acknowledged, t.lost, t.doubled,
             f"{replies} replies delivered; {dead} webhook rows dead-lettered with reason; "
             f"reply latency of healthy conversations {_lat(healthy)}; affected: {affected}; "
             f"fallback answers {sum(r.fallbacks.values())}")]


def sigterm_rows(pg: Cluster, work: Path) -> list[Row]:
    rows: list[Row] = []
    for label, kwargs in (("SIGTERM under load (grace 5 s)", {"grace_s": 5.0}),
                          ("SIGTERM with turns in flight (answers take 1.5 s, grace 1 s)",
                           {"grace_s": 1.0, "ai_delay_s": 1.5, "signal_after": 40})):
        r = on_fresh_database(pg, "term", work / f"term-{len(rows)}",
                              partial(faults.sigterm_scenario, **kwargs))
        t = r.tally
        rows.append((label, t.acknowledged, t.lost, t.doubled,
                     f"exit {r.exit_code} {r.drain_s:.2f} s after the signal; "
                     f"{r.tally_after_stop.pending} acknowledged messages pending at the stop, "
                     f"all processed after the restart (exit {r.restart_code})"))
    return rows


def fuzz_cases() -> int:
    """The examples tests/test_fuzz.py asks hypothesis for (the sum of its FUZZ_EXAMPLES)."""
    text = (Path(__file__).resolve().parent.parent / "tests" / "test_fuzz.py").read_text()
    block = text.split("FUZZ_EXAMPLES = {", 1)[1].split("}", 1)[0]
    return sum(int(n) for n in re.findall(r":\s*(\d+)", block))


def table(rows: list[Row]) -> str:
    lines = ["| fault injected | messages acknowledged | lost | doubled | fuzz cases | notes |",
             "|---|--:|--:|--:|--:|---|"]
    lines += [f"| {fault} | {ack} | {lost} | {doubled} | – | {notes} |"
              for fault, ack, lost, doubled, notes in rows]
    lines.append(f"| bad input (fuzzed webhook bodies, log lines, config files: "
                 f"tests/test_fuzz.py) | – | 0 | 0 | {fuzz_cases():,} | never a 5xx, a crash or a "
                 f"stuck request; every 400 has its dead letter |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="seeds of the SIGKILL scenario (default: 1 2 3)")
    kinds = ("crash", "sends", "outage", "deps", "sigterm", "lost")
    parser.add_argument("--only", nargs="+", choices=kinds, default=list(kinds))
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows: list[Row] = []
    with throwaway_cluster("pipeline-faults-") as pg:
        work = pg.data_dir.parent / "work"  # removed with the cluster
        work.mkdir()
        faults.make_template(pg)
        if "crash" in args.only:
            rows += crash_rows(pg, work, args.seeds)
        if "sends" in args.only:
            rows += send_crash_rows(pg, work, args.seeds)
        if "outage" in args.only:
            rows += outage_rows(work)
        if "deps" in args.only:
            rows += deps_rows(pg, work)
        if "sigterm" in args.only:
            rows += sigterm_rows(pg, work)
        if "lost" in args.only:
            rows += lost_answer_rows(pg, work)
    print(table(rows))
    print(f"\n{len(rows)} scenarios in {time.monotonic() - started:.0f} s")
    return 1 if any(str(row[2]) != "0" or str(row[3]) != "0" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
