"""Several ``pipeline run`` processes on one database, fed and judged from the outside.

:class:`Node` is one process (``--roles``, ``--port``, its own outcomes file and logs);
:class:`Dealer` is the clients of a load balancer in front of them: each body goes to the
node it was dealt to and, when that one does not acknowledge it, to the next one, until a
200 (as Meta and Evolution retry); :func:`day_schedule` deals a generated day
(``scripts/gen_day.py``: bursts, repeats, receipts, echoes, reactions, redeliveries) over
the nodes, time compressed, with more redeliveries, each sent to another node than its
first delivery; :func:`judge` counts the effects where they landed -- rows in the database
and outcome lines in every node's file -- and says what is lost, doubled or out of order.
:class:`ChatModel` is a chat endpoint with chosen delays; :class:`DelayProxy` makes one
statement of one process slow (before the server sees it, or its answer).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import httpx
import trio
from asgi import read_request
from test_faults import (
    ROOT,
    TURN_ACTIONS,
    Key,
    Post,
    Server,
    ServerFailed,
    base_values,
    config_text,
    make_post,
    sql,
    tally,
    until,
)

from stages.parse import InstanceDirectory

REDELIVERED = "redelivered message id"  # the reason of a redelivery's own outcome line


# --- processes -----------------------------------------------------------------------------------


@attrs.define
class Node(Server):
    """``pipeline run --roles ROLES --port PORT`` in ``workdir`` (its outcomes and logs).
    ``port`` 0 picks a free port; after a start it is the port taken, so a restart gets
    the same one unless ``port`` is set to 0 again."""

    roles: str = "webhook,turns,delivery"
    port: int = 0
    name: str = "node"

    @property
    def serves_webhooks(self) -> bool:
        return "webhook" in self.roles.split(",")

    async def start(self, timeout_s: float = 60.0) -> str:
        if not self.serves_webhooks:
            return await self._start_quiet(timeout_s)
        url = await super().start(timeout_s)
        self.port = int(url.rsplit(":", 1)[1])
        return url

    async def _start_quiet(self, timeout_s: float) -> str:
        """A start without a webhook server: it says ``ready (ROLES)`` instead."""
        assert not self.alive, "already running"
        self.starts += 1
        stdout_path = self.stdout(self.starts)
        proc = self.proc = await trio.to_thread.run_sync(self._spawn, stdout_path)
        self.pids.append(proc.pid)

        def ready() -> bool:
            if proc.poll() is not None:
                raise ServerFailed(f"pipeline run exited with {proc.returncode} at start:\n"
                                   f"{self.tail()}")
            return stdout_path.read_text().startswith("ready (")

        await until(ready, timeout_s, f"{self.name} ready", every_s=0.02)
        return ""

    def _spawn(self, stdout_path: Path) -> subprocess.Popen[bytes]:
        with open(stdout_path, "wb") as out, open(self.stderr, "ab") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(self.config),
                 "--out", str(self.outcomes), "--roles", self.roles, "--port", str(self.port)],
                stdout=out, stderr=err, cwd=ROOT, stdin=subprocess.DEVNULL)

    @property
    def owner(self) -> str:
        """The lease owner this process writes into ``conversations`` (pipeline.claims)."""
        assert self.proc is not None
        return f"{socket.gethostname()}:{self.proc.pid}"


def make_nodes(config: Path, workdir: Path, count: int,
               roles: Sequence[str] = ()) -> list[Node]:
    """``count`` nodes p0, p1, ... in subfolders of ``workdir``, with ``roles[i]`` (default:
    all three roles)."""
    nodes = []
    for i in range(count):
        (workdir / f"p{i}").mkdir()
        nodes.append(Node(config, workdir / f"p{i}", name=f"p{i}",
                          roles=roles[i] if roles else "webhook,turns,delivery"))
    return nodes


async def start_all(nodes: Sequence[Node]) -> None:
    """Start the first node, then the others together. Not all at once: on a fresh
    database, processes that seed the ``instances`` table at the same moment can fail
    (test_scaleout: test_processes_starting_together_seed_the_instances_without_an_error),
    and that race is not what the scenarios are about."""
    await nodes[0].start()
    async with trio.open_nursery() as nursery:
        for node in nodes[1:]:
            nursery.start_soon(node.start)


async def stop_all(nodes: Sequence[Node], timeout_s: float = 60.0) -> list[int]:
    """SIGTERM every running node at once; their exit codes."""
    codes: dict[int, int] = {}

    async def stop(i: int, node: Node) -> None:
        codes[i], _ = await node.terminate(timeout_s)

    async with trio.open_nursery() as nursery:
        for i, node in enumerate(nodes):
            if node.alive:
                nursery.start_soon(stop, i, node)
    return [codes[i] for i in sorted(codes)]


def scaleout_config(workdir: Path, conninfo: str, *, lease_s: float, poll_ms: float,
                    text: str | None = None, name: str = "pipeline.toml",
                    **sections: dict[str, Any]) -> Path:
    """``workdir/name``: the example config with the scenario's values (see
    test_faults.base_values) and ``[pipeline] lease_s`` / ``poll_interval_ms``; or ``text``
    with those two put in place."""
    timing = {"lease_s": lease_s, "poll_interval_ms": poll_ms}
    if text is None:
        pipeline = {**sections.pop("pipeline", {}), **timing}
        text = config_text(base_values(conninfo, pipeline=pipeline, **sections))
    for key, value in timing.items():
        text, n = re.subn(rf"^{key} = \S+", f"{key} = {value!r}", text, count=1, flags=re.M)
        assert n == 1, key
    path = workdir / name
    path.write_text(text)
    return path


# --- the clients ---------------------------------------------------------------------------------


@attrs.frozen
class Planned:
    """One delivery of ``post`` at ``at_s`` seconds into the run, dealt to node ``node``."""

    at_s: float
    node: int
    post: Post
    redelivery: bool = False


@attrs.define
class Dealer:
    """Posts each body to its node until some node acknowledges it: after a connection
    error, a timeout or a 5xx it goes on to the next node (a load balancer's retry); a node
    that is down (``url`` None) is skipped. A 4xx is final."""

    nodes: Sequence[Node]
    pause_s: float = 0.05
    request_timeout_s: float = 15.0
    acked: set[Key] = attrs.Factory(set)
    acked_by: dict[bytes, set[int]] = attrs.Factory(lambda: defaultdict(set))  # body → nodes
    statuses: Counter[int] = attrs.Factory(Counter)
    in_flight: Counter[int] = attrs.Factory(Counter)  # node → requests awaiting an answer
    posts_done: int = 0
    rejected: int = 0

    async def deliver(self, http: httpx.AsyncClient, post: Post, node: int) -> int:
        tries = 0
        while True:
            index = (node + tries) % len(self.nodes)
            tries += 1
            url = self.nodes[index].url
            if url is None:
                if tries % len(self.nodes) == 0:  # every node is down: wait a little
                    await trio.sleep(self.pause_s)
                continue
            self.in_flight[index] += 1
            try:
                response = await http.post(url + post.path, content=post.raw,
                                           headers=post.headers, timeout=self.request_timeout_s)
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            finally:
                self.in_flight[index] -= 1
            self.statuses[status] += 1
            if status == 200:
                self.acked |= post.keys
                self.acked_by[post.raw].add(index)
                break
            if 400 <= status < 500:
                self.rejected += 1
                break
            await trio.sleep(self.pause_s)
        self.posts_done += 1
        return status

    async def play(self, schedule: Iterable[Planned]) -> None:
        """Each planned delivery at its time (relative to now), concurrently; returns when
        every one was acknowledged or rejected."""
        t0 = trio.current_time()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(trust_env=False, limits=limits) as http, \
                trio.open_nursery() as nursery:
            for item in sorted(schedule, key=lambda p: p.at_s):
                await trio.sleep_until(t0 + item.at_s)
                nursery.start_soon(self.deliver, http, item.post, item.node)

    @property
    def redelivered_elsewhere(self) -> int:
        """Bodies with messages that two or more different nodes acknowledged."""
        return sum(1 for body, nodes in self.acked_by.items() if len(nodes) > 1)


# --- a generated day -----------------------------------------------------------------------------


def gen_day() -> ModuleType:
    if "gen_day" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gen_day", ROOT / "scripts" / "gen_day.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gen_day"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["gen_day"]


def day_schedule(seed: int, directory: InstanceDirectory, nodes: int, *, events: int = 500,
                 duration_s: float = 6.0, redeliver: float = 0.1) -> list[Planned]:
    """About ``events`` webhook bodies of a generated day (``scripts/gen_day.py``, seed
    ``seed``), its 14 recorded hours compressed into ``duration_s`` in recorded order, dealt
    round-robin to ``nodes`` nodes; a fraction ``redeliver`` of the message bodies is
    delivered again 0.05-1.5 s later to another node (the day's own redeliveries are
    dealt like any body). Lines that are not JSON are left out (no client sends them)."""
    rng = random.Random(seed)
    day = [e for e in gen_day().generate(seed, events) if e.raw is None]
    first, span = day[0].at, max(1, day[-1].at - day[0].at)
    plan: list[Planned] = []
    for i, event in enumerate(day):
        at_s = (event.at - first) / span * duration_s
        post = make_post(event.fmt, event.body, directory)
        plan.append(Planned(at_s, i % nodes, post))
        if post.keys and rng.random() < redeliver and nodes > 1:
            other = (i + rng.randrange(1, nodes)) % nodes
            later = rng.uniform(0, 0.005) if rng.random() < 1 / 3 else rng.uniform(0.05, 1.5)
            plan.append(Planned(at_s + later, other, post, redelivery=True))
    return plan


# --- a slow model ------------------------------------------------------------------------------


@attrs.define
class ChatModel:
    """An OpenAI-compatible chat endpoint whose n-th request takes ``delays_s[n]`` seconds
    (the last value for the rest); ``calls`` counts requests begun, ``answered`` those
    answered."""

    delays_s: tuple[float, ...] = (0.0,)
    calls: int = 0
    answered: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await read_request(scope, receive, send) is None:
            return
        delay = self.delays_s[min(self.calls, len(self.delays_s) - 1)]
        self.calls += 1
        await trio.sleep(delay)
        self.answered += 1
        body = (b'{"choices": [{"message": {"role": "assistant", "content": "An answer from'
                b' the model."}, "finish_reason": "stop"}]}')
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


# --- a slow database connection ----------------------------------------------------------------


@attrs.define
class DelayProxy:
    """A TCP proxy in front of the cluster's Unix socket that delays one statement by
    ``delay_s`` -- a slow network, a stalled pool or a busy server at one process. The
    statement is the first the client sends containing ``trigger`` (e.g. a message id, in
    the parameters of the inbox insert); ``answer`` False holds the statement back before
    the server sees it, True passes it at once and holds back the server's answer to it.
    Everything else passes at once."""

    socket_path: Path
    trigger: bytes | None = None
    delay_s: float = 1.0
    answer: bool = False
    fired: int = 0

    async def serve(self, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(int(listeners[0].socket.getsockname()[1]))

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_unix_socket(str(self.socket_path))
        held = [False]  # an answer to hold back is due on this connection
        async with client, server, trio.open_nursery() as nursery:
            async def up() -> None:
                while data := await client.receive_some(65536):
                    if self.trigger is not None and self.trigger in data and not self.fired:
                        self.fired += 1
                        if self.answer:
                            held[0] = True
                        else:
                            await trio.sleep(self.delay_s)
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def down() -> None:
                while data := await server.receive_some(65536):
                    if held[0]:
                        held[0] = False
                        await trio.sleep(self.delay_s)
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            for pump in (up, down):
                nursery.start_soon(_quietly, pump)


async def _quietly(pump: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await pump()


def unix_socket(conninfo: str) -> Path:
    """The server socket a ``host=DIR port=N`` conninfo connects to."""
    parts = dict(item.split("=", 1) for item in conninfo.split())
    return Path(parts["host"]) / f".s.PGSQL.{parts['port']}"


def via_proxy(conninfo: str, port: int) -> str:
    parts = dict(item.split("=", 1) for item in conninfo.split())
    return f"host=127.0.0.1 port={port} user={parts['user']} dbname={parts['dbname']}"


# --- the verdict ---------------------------------------------------------------------------------


@attrs.frozen
class Verdict:
    """What the database and the outcome files say. ``lost``: acknowledged messages not
    processed, without their turn's effects, or without an outcome line that a process
    which was not killed must have written; ``doubled``: rows written twice (test_faults'
    tally) plus messages with more than one outcome line; ``lines_cut``: messages without an
    outcome line committed while a process that was then SIGKILLed lived (its line may have
    been in that process's buffer)."""

    acknowledged: int
    lost: int
    doubled: int
    pending: int
    turns: int
    lines_cut: int
    redelivery_lines: int
    problems: tuple[str, ...]
    actions: dict[str, int]

    def line(self) -> str:
        return (f"acknowledged={self.acknowledged} lost={self.lost} doubled={self.doubled} "
                f"pending={self.pending} turns={self.turns} lines cut by kills="
                f"{self.lines_cut}")


def outcome_lines(files: Iterable[Path]) -> list[tuple[str, dict[str, Any]]]:
    """Every complete line of the outcome files, with the file's node name."""
    lines = []
    for path in files:
        if not path.exists():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            try:
                lines.append((path.parent.name, _json(raw)))
            except ValueError:
                continue  # the last line of a killed process may be cut short
    return lines


def _json(raw: str) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def judge(conninfo: str, acked: set[Key], outcome_files: Iterable[Path], *,
          killed: Sequence[tuple[float, float]] = ()) -> Verdict:
    """Check the database and every node's outcome file against ``acked``.

    ``killed``: the lifetimes (epoch seconds, from its start to a second after its SIGKILL)
    of the processes that were killed. A message committed within one of them may lack its
    outcome line (the process that committed it may have died with the line in its
    buffer); any other acknowledged message needs exactly one.
    """
    base = tally(conninfo, acked)
    problems = list(base.problems)
    inbox = {(r[0], r[1]): r[2:] for r in sql(
        conninfo, "SELECT instance, message_id, status, action, turn_id,"
                  " extract(epoch FROM processed_at) FROM inbox")}
    lost, doubled_lines, cut = _check_lines(acked, inbox, outcome_files, killed, problems)
    turns = _check_turns(conninfo, problems)
    _check_order(conninfo, problems)
    _check_conversations(conninfo, problems)
    redeliveries = sum(1 for _, out in outcome_lines(outcome_files)
                       if out.get("action") == "duplicate" and out.get("reason") == REDELIVERED)
    return Verdict(base.acknowledged, base.lost + len(lost), base.doubled + len(doubled_lines),
                   base.pending, turns, cut, redeliveries, tuple(problems), base.actions)


def _check_lines(acked: set[Key], inbox: dict[Key, tuple[Any, ...]],
                 files: Iterable[Path], killed: Sequence[tuple[float, float]],
                 problems: list[str]) -> tuple[set[Key], set[Key], int]:
    finals: dict[Key, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for node, out in outcome_lines(files):
        if out.get("message_id") is None or out.get("sender") is None:
            continue  # receipts, echoes, invalid bodies: ended at intake, no inbound message
        if out.get("action") == "duplicate" and out.get("reason") == REDELIVERED:
            continue  # the redelivery's own line
        finals[(out["instance"], out["message_id"])].append((node, out))
    lost: set[Key] = set()
    doubled: set[Key] = set()
    cut = 0
    for key in sorted(acked | set(finals)):
        lines = finals.get(key, [])
        row = inbox.get(key)
        if len(lines) > 1:
            doubled.add(key)
            problems.append(f"{key}: {len(lines)} outcome lines: "
                            f"{[(n, o['action'], o.get('turn_id')) for n, o in lines]}")
        if row is None:
            if lines:
                problems.append(f"{key}: outcome line {lines[0][1]['action']} but no inbox row")
            continue
        status, action, turn, processed_at = row
        if not lines:
            if key in acked and status == "processed":
                if any(born <= float(processed_at) <= died for born, died in killed):
                    cut += 1
                else:
                    lost.add(key)
                    problems.append(f"{key}: {action} in the inbox but no outcome line")
            continue
        for node, out in lines:
            if out["action"] != action:
                problems.append(f"{key}: outcome {out['action']} ({node}) but {action} in "
                                f"the inbox")
            if out.get("turn_id") and out["turn_id"] != turn:
                problems.append(f"{key}: outcome turn {out['turn_id']} ({node}) but "
                                f"{turn} in the inbox")
    return lost, doubled, cut


def _check_turns(conninfo: str, problems: list[str]) -> int:
    """Each turn: its last message (by received_at, id) carries the action, the others are
    merged; exactly one AI interaction when it replied, none when held, at most one when
    escalated; one reply row when it replied, one handover row when escalated, none else;
    no AI interaction or outbox row of a turn that closed no inbox row."""
    rows = sql(conninfo, "SELECT turn_id, action FROM inbox WHERE status = 'processed'"
                         " AND action = ANY(%s) ORDER BY turn_id, received_at, id",
               (sorted(TURN_ACTIONS),))
    actions: dict[str, list[str]] = defaultdict(list)
    for turn, action in rows:
        actions[turn].append(action)
    ai = Counter(dict(sql(conninfo, "SELECT turn_id, count(*) FROM ai_interactions GROUP BY 1")))
    outbox = Counter({(r[0], r[1]): r[2] for r in sql(
        conninfo, "SELECT split_part(idempotency_key, ':', 1), kind, count(*) FROM outbox"
                  " WHERE kind IN ('reply', 'handover') GROUP BY 1, 2")})
    for turn, acts in actions.items():
        *merged, final = acts
        if final not in ("replied", "escalated", "held") or any(a != "merged" for a in merged):
            problems.append(f"turn {turn}: actions in message order {acts}")
        want_ai = {"replied": {1}, "held": {0}, "escalated": {0, 1}}.get(final, {0})
        if ai[turn] not in want_ai:
            problems.append(f"turn {turn} ({final}): {ai[turn]} ai interactions")
        if outbox[(turn, "reply")] != (final == "replied"):
            problems.append(f"turn {turn} ({final}): {outbox[(turn, 'reply')]} reply rows")
        if outbox[(turn, "handover")] != (final == "escalated"):
            problems.append(f"turn {turn} ({final}): {outbox[(turn, 'handover')]} handover rows")
    processed = {r[0] for r in sql(conninfo, "SELECT DISTINCT turn_id FROM inbox"
                                             " WHERE status = 'processed' AND turn_id IS NOT NULL")}
    for turn in set(ai) - processed:
        problems.append(f"ai interaction of turn {turn}, which closed no inbox row")
    for (key,) in sql(conninfo, "SELECT idempotency_key FROM outbox ORDER BY id"):
        if key.split(":", 1)[0] not in processed:
            problems.append(f"outbox row {key}, whose turn closed no inbox row")
    return len(actions)


def _check_order(conninfo: str, problems: list[str]) -> None:
    """Per conversation, turns are decided over received_at: taking its messages in
    (received_at, id) order, their turns come in blocks, never interleaved, and the blocks
    were committed (processed_at) and answered (ai_interactions.id) in that order."""
    rows = sql(conninfo, """
        SELECT i.instance, i.sender, i.turn_id, i.message_id, i.processed_at, a.id
        FROM inbox i LEFT JOIN ai_interactions a ON a.turn_id = i.turn_id
        WHERE i.status = 'processed' AND i.action = ANY(%s)
        ORDER BY i.instance, i.sender, i.received_at, i.id""", (sorted(TURN_ACTIONS),))
    by_conversation: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    for instance, sender, *rest in rows:
        by_conversation[(instance, sender)].append(tuple(rest))
    for conv, messages in by_conversation.items():
        seen: list[str] = []
        last: tuple[dt.datetime, int | None] | None = None
        for turn, message_id, processed_at, ai_id in messages:
            if seen and seen[-1] == turn:
                continue
            if turn in seen:
                problems.append(f"{conv}: turn {turn} interleaved with {seen[-1]} in "
                                f"received order (at {message_id})")
                continue
            seen.append(turn)
            if last is not None:
                if processed_at <= last[0]:
                    problems.append(f"{conv}: turn {turn} (first message {message_id}) was "
                                    f"committed before the turn received before it")
                if ai_id is not None and last[1] is not None and ai_id <= last[1]:
                    problems.append(f"{conv}: ai interaction {ai_id} of turn {turn} before "
                                    f"{last[1]} of the turn received before it")
            last = (processed_at, ai_id if ai_id is not None else (last[1] if last else None))


def _check_conversations(conninfo: str, problems: list[str]) -> None:
    """Nothing owed at the end: no pending count, no lease, nothing due."""
    for conv, instance, sender, pending, owner, due in sql(
            conninfo, "SELECT id, instance, sender, pending, lease_owner, due_at"
                      " FROM conversations WHERE pending <> 0 OR lease_owner IS NOT NULL"
                      " OR due_at IS NOT NULL ORDER BY id"):
        problems.append(f"conversation {conv} ({instance}/{sender}) at the end: pending="
                        f"{pending} lease_owner={owner} due_at={due}")
    for status, n in sql(conninfo, "SELECT status, count(*) FROM outbox"
                                   " WHERE status = 'pending' GROUP BY 1"):
        problems.append(f"{n} outbox rows {status} at the end")


async def settled(conninfo: str, acked: set[Key], timeout_s: float) -> float:
    """Wait until every acknowledged message is processed and no outbox row is pending."""
    from test_faults import all_processed

    done = all_processed(conninfo, acked)
    return await until(lambda: done() and not sql(
        conninfo, "SELECT 1 FROM outbox WHERE status = 'pending' LIMIT 1"), timeout_s,
        "every acknowledged message processed", every_s=0.1)


def epoch() -> float:
    return time.time()
