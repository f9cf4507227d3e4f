"""The README's main command from a checkout the server user cannot reach.

A clone in root's home (``/root`` is mode 700) is the usual case: the embedded server runs as
``postgres``, who cannot traverse the checkout's ancestors. The clone is a copy of this working
tree (tracked and untracked files, as they are now) under a fresh mode-700 directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.pgcluster import Cluster

REPO = Path(__file__).resolve().parent.parent


def copy_checkout(dest: Path) -> None:
    """The working tree's files (tracked, and untracked but not ignored) copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name, follow_symlinks=False)


def real_data_dir(checkout: Path) -> Path:
    return Path(os.path.realpath(checkout / ".pipeline" / "pgdata"))


@pytest.fixture
def private_checkout() -> Iterator[Path]:
    """A copy of the checkout under a mode-700 directory; its cluster is removed after."""
    if os.geteuid() != 0:
        pytest.skip("the server runs as another user only when we are root")
    parent = Path(tempfile.mkdtemp(prefix="pipeline-private-"))
    parent.chmod(0o700)
    checkout = parent / "checkout"
    copy_checkout(checkout)
    try:
        yield checkout
    finally:
        data_dir = real_data_dir(checkout)
        if (data_dir / "PG_VERSION").exists():
            Cluster(data_dir).stop("immediate")
        if not data_dir.is_relative_to(parent):
            shutil.rmtree(data_dir.parent, ignore_errors=True)  # the cluster's own folder
            with contextlib.suppress(OSError):
                data_dir.parent.parent.rmdir()  # /var/lib/pipeline, unless others live there
        shutil.rmtree(parent, ignore_errors=True)


def assert_replayed_the_sample(done: subprocess.CompletedProcess[str], checkout: Path) -> None:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr
    assert re.search(r"^replayed 107 events in .*; 108 outcomes; ", done.stdout, re.M), \
        done.stdout  # one body holds two messages
    data_dir = real_data_dir(checkout)
    assert (data_dir / "PG_VERSION").exists()
    assert Cluster(data_dir).status() == "stopped"  # started for the replay, stopped after
    assert (checkout.parent.stat().st_mode & 0o777) == 0o700  # the user's folder untouched


def test_replay_from_a_checkout_the_server_user_cannot_reach(private_checkout: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(private_checkout)}
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=private_checkout, env=env, capture_output=True, text=True,
                           check=True)
    assert where.stdout.startswith(str(private_checkout))  # the copy's code, not ours
    done = subprocess.run([sys.executable, "-m", "pipeline", "replay",
                           "pipeline/data/sample.jsonl"], cwd=private_checkout, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_replayed_the_sample(done, private_checkout)
    again = subprocess.run([sys.executable, "-m", "pipeline", "db", "status"],
                           cwd=private_checkout, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 3 and again.stdout.startswith("stopped "), again.stderr


@pytest.mark.slow
def test_run_sample_from_a_checkout_the_server_user_cannot_reach(
        private_checkout: Path) -> None:
    """The README's command as a user types it; it makes the copy's own .venv first."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(["scripts/run-sample", "pipeline/data/sample.jsonl"],
                          cwd=private_checkout, env=env, capture_output=True, text=True,
                          timeout=900)
    assert (private_checkout / ".venv" / "bin" / "pipeline").exists(), done.stderr
    assert_replayed_the_sample(done, private_checkout)
