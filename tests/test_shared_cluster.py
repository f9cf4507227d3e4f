"""Several processes on one embedded cluster: none stops it under another.

Real processes, because the point is what happens between them: each user holds a shared
lock for as long as it uses the cluster, and the last one out stops a cluster that a user
started (not one that ``pipeline db start`` or someone else started). Ordering comes from
pipes (a child says ``ready``/``ok`` and waits for a command), never from sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.pgcluster import Cluster

REPO = Path(__file__).resolve().parent.parent

#: a pipeline user of the cluster: opens the store, says "ready", then obeys stdin:
#: "query" runs a query on its pooled connections and says "ok", "exit" leaves
CHILD = """
import sys, trio
from pipeline.config import DatabaseConfig
from pipeline.database import open_store

async def main() -> None:
    async with open_store(DatabaseConfig(data_dir=sys.argv[1], pool_size=2)) as store:
        print("ready", flush=True)
        while (line := await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "query":
            await store.ping()
            print("ok", flush=True)

trio.run(main)
"""


class User:
    """One child process using the cluster."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(data_dir)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})

    def said(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def query(self) -> str:
        self.tell("query")
        return self.said()

    def exit(self) -> int:
        self.tell("exit")
        return self.wait()

    def wait(self) -> int:
        code = self.proc.wait(timeout=120)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdout.close()
        self.proc.stdin.close()
        return code

    def errors(self) -> str:
        return self.log.read_text()


@pytest.fixture
def place() -> Iterator[Path]:
    """A data directory the server user can reach; whatever runs there is stopped after."""
    root = Path(tempfile.mkdtemp(prefix="pipeline-share-"))
    root.chmod(0o755)
    data_dir = root / "pgdata"
    try:
        yield data_dir
    finally:
        if (data_dir / "PG_VERSION").exists():
            Cluster(data_dir).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def config_for(data_dir: Path) -> str:
    path = data_dir.parent / "pipeline.toml"
    path.write_text(f'[database]\ndata_dir = "{data_dir}"\n[[instances]]\nname = "a"\n')
    return str(path)


def test_the_first_to_exit_leaves_the_cluster_to_the_other(place: Path) -> None:
    first = User(place, place.parent / "first.log")
    assert first.said() == "ready", first.errors()  # it started the cluster
    second = User(place, place.parent / "second.log")
    assert second.said() == "ready", second.errors()
    assert first.exit() == 0, first.errors()
    assert Cluster(place).status() == "running"
    assert second.query() == "ok", second.errors()  # its pooled connections still work
    assert second.exit() == 0, second.errors()
    assert Cluster(place).status() == "stopped"  # the last one out stopped it


def test_the_last_to_exit_stops_it_whoever_started_it(place: Path) -> None:
    first = User(place, place.parent / "first.log")
    assert first.said() == "ready", first.errors()
    second = User(place, place.parent / "second.log")
    assert second.said() == "ready", second.errors()
    assert second.exit() == 0, second.errors()
    assert first.query() == "ok", first.errors()
    assert first.exit() == 0, first.errors()
    assert Cluster(place).status() == "stopped"


def test_users_arriving_together_make_and_start_it_once(place: Path) -> None:
    users = [User(place, place.parent / f"user{n}.log") for n in range(3)]
    for user in users:  # all launched before any is ready: initdb and start race
        assert user.said() == "ready", user.errors()
    assert sum("embedded postgresql started" in u.errors() for u in users) == 1
    for user in users:
        assert user.query() == "ok", user.errors()
        assert user.exit() == 0, user.errors()
    assert Cluster(place).status() == "stopped"


def test_a_killed_user_leaves_no_stale_claim(place: Path) -> None:
    crashed = User(place, place.parent / "crashed.log")
    assert crashed.said() == "ready", crashed.errors()
    crashed.proc.send_signal(signal.SIGKILL)
    assert crashed.wait() == -signal.SIGKILL
    assert Cluster(place).status() == "running"  # nobody stopped it ...
    later = User(place, place.parent / "later.log")
    assert later.said() == "ready", later.errors()
    assert later.query() == "ok", later.errors()
    assert later.exit() == 0, later.errors()
    assert Cluster(place).status() == "stopped"  # ... until the last live user left


def test_db_start_keeps_it_running_and_db_stop_waits_for_the_users(place: Path) -> None:
    config = config_for(place)
    started = run_cli("db", "start", "--config", config)
    assert started.returncode == 0 and started.stdout.startswith("started"), started.stderr
    user = User(place, place.parent / "user.log")
    assert user.said() == "ready", user.errors()
    refused = run_cli("db", "stop", "--config", config)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "in use by another process" in refused.stderr
    assert user.query() == "ok", user.errors()
    assert user.exit() == 0, user.errors()
    assert Cluster(place).status() == "running"  # started on purpose: stays up
    stopped = run_cli("db", "stop", "--config", config)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped"), stopped.stderr
    assert Cluster(place).status() == "stopped"


def test_a_cluster_started_by_hand_is_left_running(place: Path) -> None:
    Cluster(place).start()  # e.g. pg_ctl by hand, or a test fixture
    user = User(place, place.parent / "user.log")
    assert user.said() == "ready", user.errors()
    assert user.exit() == 0, user.errors()
    assert Cluster(place).status() == "running"


def test_a_user_waits_while_the_last_one_stops_it(place: Path) -> None:
    """A process arriving while the cluster is being stopped waits, then starts it again."""
    import fcntl

    first = User(place, place.parent / "first.log")
    assert first.said() == "ready", first.errors()
    cluster = Cluster(place)
    lock = os.open(cluster.users_lock, os.O_RDWR)
    try:
        assert first.exit() == 0, first.errors()  # it stopped the cluster
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the last user does while stopping it
        waiting = User(place, place.parent / "waiting.log")
        wait_until_blocked_on_lock(waiting.proc.pid)
    finally:
        os.close(lock)
    assert waiting.said() == "ready", waiting.errors()
    assert waiting.query() == "ok", waiting.errors()
    assert waiting.exit() == 0, waiting.errors()
    assert cluster.status() == "stopped"


def wait_until_blocked_on_lock(pid: int) -> None:
    """Poll /proc/locks until ``pid`` waits for a flock (a condition, not a guessed delay)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never waited for the users' lock")
