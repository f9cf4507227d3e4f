"""scripts/bench.py at a tiny size: the workload is what it says, the JSON has its shape and
every message gets its outcome in every mode. No timing is asserted here: the figures
belong in the README, not in the test suite."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import TEMPLATE

from pipeline import bench
from pipeline.pgcluster import Cluster

ISSUE_KEYS = {"msgs_per_s", "context_p50_ms", "e2e_p99_ms", "round_trips_per_msg",
              "peak_connections", "pool_size", "peak_rss_mb", "errors"}


def test_workload_is_deterministic_with_bursts_redeliveries_and_escalations() -> None:
    w = bench.Workload(conversations=50, messages=6, seed=3)
    events = list(bench.generate(w))
    assert [e.event for e in events] == [e.event for e in bench.generate(w)]
    assert [e.event for e in events] != [e.event for e in bench.generate(
        bench.Workload(conversations=50, messages=6, seed=4))]
    fresh = [e for e in events if not e.redelivery]
    assert len(fresh) == 50 * 6
    times = [e.event.received_at for e in events]
    assert times == sorted(times)  # pushed in arrival order: the burst buffer relies on it
    ids = {e.message.message_id for e in fresh}
    assert all(e.message.message_id in ids for e in events if e.redelivery)
    assert 0 < len(events) - len(fresh) < 0.15 * len(fresh)
    assert 0 < sum(e.escalates for e in fresh) < 0.15 * len(fresh)
    plan = bench.plan_ceiling(bench.Settings(w), events)
    assert 0.5 * len(fresh) < plan.turns < len(fresh)  # bursts fold some messages together
    assert plan.messages == len(events) and len(plan.inbox) == len(fresh)


@pytest.mark.parametrize("delay_ms", [0.0, 1.0])
async def test_tiny_run_reports_every_mode_and_every_outcome(cluster: Cluster,
                                                             delay_ms: float) -> None:
    workload = bench.Workload(conversations=10, messages=2)
    settings = bench.Settings(workload, delay_ms=delay_ms, repeat=1, ceiling_tasks=4)
    result = await bench.run_bench(settings, bench.Server(cluster.socket_dir, TEMPLATE))
    json.loads(json.dumps(result))  # the --json file can be written and read back

    assert result["delay_ms"] == delay_ms
    assert result["rtt_ms"] > 0 and result["ceiling_msgs_per_s"] > 0
    assert list(result["modes"]) == list(bench.MODES)
    events = len(list(bench.generate(workload)))
    actions = set()
    for mode, figures in result["modes"].items():
        assert set(figures) >= ISSUE_KEYS, mode
        assert figures["messages"] == figures["outcomes"] == events, mode
        assert figures["errors"] == 0 and figures["pending_in_inbox"] == 0, mode
        assert 0 < figures["peak_connections"] <= figures["pool_size"] == 10, mode
        assert figures["round_trips_per_msg"] > 0 and figures["peak_rss_mb"] > 0, mode
        answered = sum(n for a, n in figures["actions"].items()
                       if a in ("replied", "escalated", "held"))
        assert answered == figures["turns"], mode  # the claims made the turns the bench expects
        assert figures["claims_per_msg"] > 0 and figures["claim_to_commit_p50_ms"] > 0, mode
        actions.add(tuple(sorted(figures["actions"].items())))
    assert len(actions) == 1  # every mode decided every message the same way
    assert sum(Counter(dict(actions.pop())).values()) == events

    table = bench.report(result)
    assert all(f"| {mode} |" in table for mode in bench.MODES)


def test_bad_arguments_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--modes", "single,fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        "bench.py: --modes must be a comma-separated list of sequential, parallel, single, "
        "batched, claimed, not 'single,fast'")
    assert bench.main(["--redelivery-share", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "bench.py: --redelivery-share must be within 0..1, not 2.0")
