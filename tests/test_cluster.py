"""The embedded cluster helpers that need no server of their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.logs import dsn_password
from pipeline.pgcluster import Cluster, ClusterError, find_bindir, valid_dbname


def test_missing_binaries_say_what_to_install(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_PG_BINDIR", raising=False)
    with pytest.raises(ClusterError, match=r"^postgresql server binaries \(initdb, pg_ctl\) "
                       r"not found: install the PostgreSQL server \(Debian: apt-get install "
                       r"postgresql\)"):
        find_bindir(debian=tmp_path / "none", path=str(tmp_path))


def test_bindir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("initdb", "pg_ctl"):
        (tmp_path / tool).touch()
    monkeypatch.setenv("PIPELINE_PG_BINDIR", str(tmp_path))
    assert find_bindir(debian=tmp_path / "none", path="") == tmp_path


def test_conninfo_uses_the_private_socket(cluster: Cluster) -> None:
    assert cluster.conninfo("x") == f"host={cluster.data_dir} port=5432 user=postgres dbname=x"
    assert re.fullmatch(r"postgresql://postgres@%2F.*:5432/x", cluster.url("x"))
    assert cluster.status() == "running"


def test_no_tcp_listener_unless_configured(cluster: Cluster) -> None:
    conf = (cluster.data_dir / "postgresql.conf").read_text()
    assert "listen_addresses = ''" in conf


def test_database_names_are_checked() -> None:
    assert valid_dbname("replay_1") == "replay_1"
    with pytest.raises(ClusterError, match=r"^database name must be a lower-case identifier"):
        valid_dbname("x; DROP DATABASE y")


def test_dsn_password_is_found_for_masking() -> None:
    assert dsn_password("postgresql://u:pa55word@h/db") == "pa55word"
    assert dsn_password("host=h password=xyz dbname=d") == "xyz"
    assert dsn_password("") == ""
