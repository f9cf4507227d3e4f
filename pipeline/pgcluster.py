"""The embedded private PostgreSQL: a cluster of our own, made with the installed binaries.

With no DSN configured the pipeline keeps its state in a cluster under ``database.data_dir``:
created with ``initdb`` (trust authentication, Unix socket inside the data directory, no TCP
unless a port is configured), started with ``pg_ctl``, reused across runs. PostgreSQL refuses
to run as root, so when we are root the server runs as the ``postgres`` user.

**Where it lives.** The server must reach its data directory, and the socket's path must fit
a Unix socket address. When ``postgres`` cannot traverse the configured path (a checkout in
``/root``, mode 700) or the path is too long, the cluster is made in a folder of our own
named after the configured path (``/var/lib/pipeline/pg-<hash>/pgdata`` as root), and the
configured path becomes a symlink to it: nobody's folders change permissions, and later runs
and ``pipeline db`` find the cluster through the link.

**Who uses it.** Any number of processes may use one cluster. Each holds a shared ``flock``
on ``<data_dir>.run/users.lock`` while it does. Leaving, a process that can then take that
lock exclusively is the last user: it stops the cluster if a user started it (the marker
``auto-started`` says so; ``pipeline db start`` removes it, and a cluster started by anyone
else never had it) while holding the lock. A process arriving meanwhile waits for its shared
lock, then starts the cluster again. The kernel drops a dead process's locks, so a crash
never leaves a user behind.

Everything here is synchronous (a few subprocess calls at start and stop); Trio code calls it
through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

SERVER_USER = "postgres"
SOCKET_PORT = 5432
SOCKET_PATH_MAX = 107  # bytes in a Unix socket address (sun_path is 108 with the final NUL)
HOMES = Path("/var/lib/pipeline"), Path("/var/tmp")  # of moved clusters: as root, otherwise
INSTALL_HINT = (
    "install the PostgreSQL server (Debian: apt-get install postgresql), "
    "set PIPELINE_PG_BINDIR to the folder holding initdb and pg_ctl, "
    "or set database.dsn to use a running server"
)


class ClusterError(Exception):
    """The embedded cluster could not be found, created, started or stopped (one line)."""


def find_bindir(debian: Path = Path("/usr/lib/postgresql"), path: str | None = None) -> Path:
    """Folder of ``initdb``/``pg_ctl``: $PIPELINE_PG_BINDIR, Debian's newest, or PATH."""
    candidates: list[Path] = []
    if env := os.environ.get("PIPELINE_PG_BINDIR"):
        candidates.append(Path(env))
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates.extend(p / "bin" for p in reversed(versions))
    if found := shutil.which("pg_ctl", path=path):
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise ClusterError(f"postgresql server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


def _optional_absolute(path: str | os.PathLike[str] | None) -> Path | None:
    return None if path is None else _absolute(path)


@attrs.frozen
class Cluster:
    """One private cluster. ``durable=False`` turns fsync off: for throwaway test clusters.

    ``pointer``: the configured location, made a symlink to ``data_dir`` (see the module's
    docstring); :meth:`configured` decides both.
    """

    data_dir: Path = attrs.field(converter=_absolute)
    tcp_port: int = 0
    durable: bool = True
    bindir: Path = attrs.field(factory=find_bindir)
    pointer: Path | None = attrs.field(default=None, converter=_optional_absolute)

    @classmethod
    def configured(cls, path: str | os.PathLike[str], *, tcp_port: int = 0) -> Cluster:
        """The cluster configured at ``path``: there if the server can use it, else moved."""
        data_dir, pointer = place(path, tcp_port or SOCKET_PORT)
        return cls(data_dir, tcp_port=tcp_port, pointer=pointer)

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def run_dir(self) -> Path:
        """Beside the data directory (which belongs to the server user): who uses it."""
        return self.data_dir.with_name(self.data_dir.name + ".run")

    @property
    def users_lock(self) -> Path:
        return self.run_dir / "users.lock"

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` on this cluster's socket."""
        return f"host={self.socket_dir} port={self._port} user={SERVER_USER} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """The same as a URL, for tools that prefer one (``psql "$(pipeline db url)"``)."""
        host = str(self.socket_dir).replace("/", "%2F")
        return f"postgresql://{SERVER_USER}@{host}:{self._port}/{dbname}"

    @property
    def _port(self) -> int:
        return self.tcp_port or SOCKET_PORT

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def ensure_initialized(self) -> bool:
        """Create the cluster unless it exists; True when it was created now."""
        self._prepare()
        if self.initialized:
            return False
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _hand_to_server_user(self.data_dir)
        except OSError as exc:
            raise ClusterError(f"cannot create {self.data_dir}: {_reason(exc)}") from exc
        self._run("initdb", "-D", str(self.data_dir), "-U", SERVER_USER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-instructions")
        self._write_settings()
        return True

    def _prepare(self) -> None:
        """For a moved cluster: the link at the configured place, and the cluster's home."""
        if self.pointer is not None:
            _point(self.pointer, self.data_dir)
            for folder in (self.data_dir.parent.parent, self.data_dir.parent):
                _own_folder(folder)

    def _write_settings(self) -> None:
        listen = "'127.0.0.1'" if self.tcp_port else "''"
        lines = [
            "# written by the pipeline (pipeline/pgcluster.py)",
            f"listen_addresses = {listen}",
            f"port = {self._port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 300",
            "shared_buffers = 128MB",
        ]
        if not self.durable:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def status(self) -> str:
        """``running``, ``stopped`` or ``absent`` (no cluster in the data directory)."""
        if not self.initialized:
            return "absent"
        done = self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False)
        return "running" if done.returncode == 0 else "stopped"

    def start(self) -> bool:
        """Create if needed and start unless running; True when this call started it.

        Alone, for a cluster of one's own (tests); processes that share one use
        :meth:`attach` and :meth:`keep_running`."""
        self.ensure_initialized()
        if self.status() == "running":
            return False
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                  "-w", "-t", "60", "-s")
        return True

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server if it runs; True when this call stopped it (whoever uses it)."""
        if self.status() != "running":
            return False
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "-s")
        return True

    # --- sharing: see the module's docstring --------------------------------------------------

    def attach(self) -> Use:
        """Become a user of the cluster, starting it if needed; blocks while another process
        stops it. Call :meth:`Use.detach` when done (a process that dies is detached)."""
        self._prepare()
        users = self._open_lock("users.lock")
        try:
            fcntl.flock(users, fcntl.LOCK_SH)
            started = self._start_shared(auto=True)
        except BaseException:
            os.close(users)
            raise
        return Use(self, users, started)

    def keep_running(self) -> bool:
        """Start the cluster unless it runs, and keep it running when its users leave
        (``pipeline db start``). True when this call started it."""
        self._prepare()
        users = self._open_lock("users.lock")
        try:
            fcntl.flock(users, fcntl.LOCK_SH)
            return self._start_shared(auto=False)
        finally:
            os.close(users)

    def stop_unused(self, mode: str = "fast") -> bool:
        """Stop the server unless a process uses it (``pipeline db stop``); True when this
        call stopped it. Raises :class:`ClusterError` when it is in use."""
        if not self.initialized:
            return False
        users = self._open_lock("users.lock")
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClusterError(f"the embedded cluster in {self.data_dir} is in use by "
                                   "another process: not stopped") from None
            self._auto_marker.unlink(missing_ok=True)
            return self.stop(mode)
        finally:
            os.close(users)

    @property
    def _auto_marker(self) -> Path:
        return self.run_dir / "auto-started"

    def _start_shared(self, *, auto: bool) -> bool:
        """Start under the start lock (one starter at a time); ``auto``: a user starts it,
        so the last user stops it."""
        lock = self._open_lock("start.lock")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not auto:
                self._auto_marker.unlink(missing_ok=True)
            elif self.status() != "running":  # marked first: a crash cannot leave it unmarked
                self._auto_marker.touch()
            return self.start()
        finally:
            os.close(lock)

    def _open_lock(self, name: str) -> int:
        path = self.run_dir / name
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ClusterError(f"cannot create {path}: {_reason(exc)}") from exc

    # --- the binaries -------------------------------------------------------------------------

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            cmd, capture_output=True, text=True, check=False, **_as_server_user())
        if check and done.returncode != 0:
            detail = _one_line(done.stderr or done.stdout) or f"exit code {done.returncode}"
            hint = self._log_hint() if tool == "pg_ctl" else ""
            raise ClusterError(f"{tool} failed for {self.data_dir}: {detail}{hint}")
        return done

    def _log_hint(self) -> str:
        """The server log's last complaint, for a one-line error."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            return ""
        worst = [line for line in lines if re.search(r"\b(FATAL|PANIC|ERROR):", line)]
        last = (worst or lines or [""])[-1].strip()
        return f" ({self.log_file}: {last})" if last else ""


@attrs.define
class Use:
    """This process's use of a shared cluster (from :meth:`Cluster.attach`)."""

    cluster: Cluster
    _lock: int
    started: bool  # this attach started the server

    def detach(self) -> bool:
        """Stop using the cluster; the last user stops one that a user started. True when
        this call stopped it."""
        lock, self._lock = self._lock, -1
        if lock < 0:
            return False
        try:
            fcntl.flock(lock, fcntl.LOCK_UN)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # someone else uses it
            marker = self.cluster._auto_marker
            if not marker.exists():
                return False  # started on purpose (pipeline db start) or by someone else
            stopped = self.cluster.stop()
            marker.unlink(missing_ok=True)
            return stopped
        finally:
            os.close(lock)


# --- throwaway clusters -------------------------------------------------------------------------

@contextmanager
def throwaway_cluster(prefix: str, *, durable: bool = False,
                      settings: Iterable[str] = ()) -> Iterator[Cluster]:
    """A started cluster of its own in a new temporary folder, for tests, benchmarks and
    scripts: stopped and removed afterwards, even on an error or Ctrl-C.

    Its data directory is ``<folder>/data``; files kept beside it (``data_dir.parent``) go
    with it. fsync is off unless ``durable``; ``settings`` are more ``postgresql.conf`` lines,
    in place before the first start."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        root.chmod(0o755)  # as root the server runs as `postgres`: it must get in
        cluster = Cluster(root / "data", durable=durable)
        try:
            if extra := list(settings):
                cluster.ensure_initialized()
                with open(cluster.data_dir / "postgresql.conf", "a") as conf:
                    conf.write("".join(f"{line}\n" for line in extra))
            cluster.start()
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- where a cluster lives ----------------------------------------------------------------------

def place(configured: str | os.PathLike[str], port: int = SOCKET_PORT) -> tuple[Path, Path | None]:
    """The data directory of the cluster configured at ``configured``, and -- when it had to
    move -- the configured path, to be (or stay) a link to it; None when it lives where
    configured or where a link of the user's own leads."""
    path = _absolute(configured)
    elsewhere = moved_data_dir(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        return target, (path if target == elsewhere else None)
    if (path / "PG_VERSION").exists() or (_socket_fits(path, port) and _server_reaches(path)):
        return path, None
    if not _socket_fits(elsewhere, port):
        raise ClusterError(f"the socket path under {elsewhere} would be too long for a Unix "
                           f"socket (over {SOCKET_PATH_MAX} bytes)")
    return elsewhere, path


def moved_data_dir(configured: Path) -> Path:
    """Where the cluster configured at ``configured`` goes when it cannot live there: a short
    path, the same for every run from the same place (a hash of the configured path)."""
    real = Path(os.path.realpath(configured.parent)) / configured.name
    key = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    if os.geteuid() == 0:
        return HOMES[0] / f"pg-{key}" / "pgdata"
    return HOMES[1] / f"pipeline-{os.geteuid()}" / f"pg-{key}" / "pgdata"


def _socket_fits(data_dir: Path, port: int) -> bool:
    return len(os.fsencode(data_dir / f".s.PGSQL.{port}")) <= SOCKET_PATH_MAX


def _server_reaches(path: Path) -> bool:
    """Whether the server user can traverse to ``path`` (or its deepest existing ancestor:
    what we create below it is ours, with the usual permissions). Asked of the system as that
    user, so ACLs and the like count."""
    if os.geteuid() != 0:
        return True  # the server runs as we do
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    done = subprocess.run(["test", "-x", str(existing)], check=False,  # type: ignore[call-overload]
                          capture_output=True, **_as_server_user())
    return bool(done.returncode == 0)


def _own_folder(folder: Path) -> None:
    """Make ``folder`` (mode 711) unless it exists, and make sure nobody else controls it:
    it is in a world-writable place like /var/tmp."""
    try:
        folder.mkdir(mode=0o711, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise ClusterError(f"cannot create {folder}: {_reason(exc)}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ClusterError(f"{folder} is not a folder of this user's that only it can change: "
                           "refusing to keep the embedded cluster there")


def _point(pointer: Path, target: Path) -> None:
    """Make ``pointer`` a symlink to ``target`` (replacing the empty folder that a failed
    start from an unreachable place left)."""
    if pointer.is_symlink():
        return
    try:
        if pointer.is_dir():
            pointer.rmdir()
        if not pointer.parent.exists():
            pointer.parent.mkdir(parents=True)
        pointer.symlink_to(target, target_is_directory=True)
    except FileExistsError:
        if not pointer.is_symlink():  # else another process made it meanwhile
            raise ClusterError(f"cannot create {pointer}: something else is there") from None
    except OSError as exc:
        raise ClusterError(f"cannot create {pointer} (a link to the cluster in {target}): "
                           f"{_reason(exc)}") from exc


# --- the server user ----------------------------------------------------------------------------

def _as_server_user() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ClusterError(
            f"running as root, but there is no '{SERVER_USER}' user to run the server as: "
            f"{INSTALL_HINT}"
        ) from None
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": entry.pw_dir, "LC_ALL": "C"}
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "env": env,
            "cwd": "/"}


def _hand_to_server_user(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        return  # _run reports it
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    folder.chmod(0o700)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def valid_dbname(name: str) -> str:
    """Database names we create are plain identifiers; refuse anything else."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ClusterError(f"database name must be a lower-case identifier, not {name!r}")
    return name
