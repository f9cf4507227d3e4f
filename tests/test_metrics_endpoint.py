"""``GET /metrics`` (Prometheus text format), ``/healthz`` and ``/readyz`` of a real
``pipeline run`` process, after it answered a few webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from scaleout_helpers import make_nodes, scaleout_config, stop_all
from test_faults import APP_SECRET, until

from pipeline.cli import sample_log
from pipeline.pgcluster import Cluster


def cloud_bodies(n: int) -> list[dict[str, object]]:
    bodies = []
    for line in sample_log().read_text("utf-8").splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("format") == "cloud-api" and '"text"' in line and "messages" in line:
            bodies.append(record["body"])
    return bodies[:n]


async def test_metrics_and_readiness_of_a_running_process(cluster: Cluster, dbname: str,
                                                          tmp_path: Path) -> None:
    config = scaleout_config(tmp_path, cluster.conninfo(dbname), lease_s=30, poll_ms=50)
    (node,) = make_nodes(config, tmp_path, 1)
    url = await node.start()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}
            bodies = cloud_bodies(4)
            for body in bodies:
                raw = json.dumps(body).encode()
                digest = hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
                answer = await client.post("/webhook/cloud-api", content=raw, headers={
                    "content-type": "application/json",
                    "x-hub-signature-256": f"sha256={digest}"})
                assert answer.status_code == 200

            await until(lambda: len(node.outcomes.read_text().splitlines()) >= len(bodies),
                        30, "the bodies' outcomes")
            response = await client.get("/metrics")
    finally:
        assert await stop_all([node]) == [0]
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("pipeline_messages", "pipeline_turn_seconds", "pipeline_stage_seconds",
                 "pipeline_stage_queue_depth", "pipeline_db_pool_in_use",
                 "pipeline_outbox_rows", "pipeline_dead_letters", "pipeline_claims",
                 "pipeline_leases_lost", "pipeline_database_up", "pipeline_commit_batches",
                 "pipeline_inbox_write_batches"):
        assert name in families, name
    # group commit: at least one batch each, never more batches than bodies or turns
    for name in ("pipeline_commit_batches", "pipeline_inbox_write_batches"):
        assert 1 <= families[name].samples[0].value <= len(bodies), name
    messages = {(s.labels["instance"], s.labels["action"]): s.value
                for s in families["pipeline_messages"].samples if s.name.endswith("_total")}
    assert sum(v for (inst, _), v in messages.items() if inst == "demo") >= len(bodies)
    buckets = [s for s in families["pipeline_turn_seconds"].samples
               if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets} >= {"60.0", "600.0", "+Inf"}
    assert families["pipeline_database_up"].samples[0].value == 1
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert labels <= {"instance", "action", "stage", "status", "le"}, labels
    for body in bodies:  # no sender or text in any label value
        sender = body["entry"][0]["changes"][0]["value"]["messages"][0]["from"]  # type: ignore[index]
        assert sender not in response.text


async def test_readiness_names_what_is_missing() -> None:
    from pipeline.db import DatabaseUnavailable
    from pipeline.migrate import available
    from pipeline.prometheus import problems

    all_versions = [m.version for m in available()]

    async def ok() -> None:
        pass

    async def down() -> None:
        raise DatabaseUnavailable("database connection failed: refused")

    async def versions(*found: str) -> list[str]:
        return list(found)

    assert await problems(ok, lambda: versions(*all_versions), lambda: False) == []
    assert await problems(down, lambda: versions(*all_versions), lambda: False) == [
        "database: database connection failed: refused"]
    last = available()[-1]
    assert await problems(ok, lambda: versions(*all_versions[:-1]), lambda: False) == [
        f"migrations not applied: {last.name}"]
    assert await problems(ok, lambda: versions(*all_versions), lambda: True) == [
        "shutting down"]
