"""scripts/bench_baseline.py (the asyncio + asyncpg port of issue 16) at the size of the
bundled sample, on a real database: every user message processed, about ten statements
each. No timing is asserted: the figures belong in the README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import sql

from pipeline.cli import sample_log
from pipeline.pgcluster import SERVER_USER, SOCKET_PORT, Cluster

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_baseline.py"


def test_the_baseline_processes_the_sample(cluster: Cluster, dbname: str, conninfo: str) -> None:
    dsn = f"postgresql://{SERVER_USER}@/{dbname}?host={cluster.socket_dir}&port={SOCKET_PORT}"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dsn", dsn, "--log",
                          str(sample_log())], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["messages"] == 93  # the sample's user messages, redeliveries included
    assert 5 < result["round_trips_per_msg"] < 15
    counts = dict(sql(conninfo, "SELECT status, count(*) FROM inbox GROUP BY status"))
    assert counts == {"processed": 89}  # each message once, none left pending
    # one turn per message, in order within a conversation: the same decisions every run
    actions = dict(sql(conninfo, "SELECT action, count(*) FROM inbox GROUP BY action"))
    assert actions == {"replied": 59, "escalated": 7, "held": 23}
