"""Several ``pipeline run`` processes on one database: the database owns the work.

Webhook intake only writes the inbox; every process claims due conversations under leases
with fencing tokens (pipeline/claims.py), one turn per conversation in flight across all
of them. These tests run real processes (tests/scaleout_helpers.py: :class:`Node`) on the
session cluster, a fresh database each, fed by clients that retry like Meta behind a load
balancer (:class:`Dealer`: each body to the process it was dealt to, then to the next one),
and count the effects where they land: rows in the database and outcome lines in every
process's ``--out`` file (:func:`judge`).

1. a generated day dealt round-robin over two and three processes, redeliveries of a body
   to another process than its first delivery included: nothing doubled or lost, turn
   order per conversation kept, nothing pending at the end;
2. the same while one process after another is SIGKILLed at random points and restarted
   (same port or a new one), with a 2 s lease so that the living take the dead's work over;
3. a burst posted alternately to two processes is one turn -- also when one process's
   inbox write is slow (its row becomes visible after the other message's);
4. a conversation handed to a human by one process is not answered by the other;
5. a dead process's turn is redone by a living one once its lease has expired, once;
   a living process's slow turn is not taken over (its lease is renewed);
6. the fenced commit when the database's answer to it is lost (a retry must recognise
   its own commit) or late (a lease renewal meanwhile must not lock the conversation);
7. processes started at the same moment on a fresh database all start.

Real time on purpose (processes have no virtual clock); every wait is bounded.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from scaleout_helpers import (
    ChatModel,
    Dealer,
    DelayProxy,
    Node,
    Verdict,
    day_schedule,
    judge,
    make_nodes,
    outcome_lines,
    scaleout_config,
    settled,
    start_all,
    stop_all,
    unix_socket,
    via_proxy,
)
from test_faults import (
    PHRASES,
    TURN_ACTIONS,
    PgProxy,
    base_values,
    cloud_body,
    config_text,
    default_directory,
    drop_database,
    fresh_database,
    make_post,
    serve_receiver,
    sql,
    until,
    use_chat_endpoint,
)

from pipeline.config import load_config
from pipeline.db import DatabaseError, open_pool
from pipeline.engine import instance_rows
from pipeline.pgcluster import Cluster
from pipeline.store import Store

LEASE_S = 2.0  # short, so that takeovers happen within a test
POLL_MS = 100.0


def _report(what: str, verdict: Verdict) -> None:
    print(f"{what}: {verdict.line()} actions={verdict.actions}")
    for problem in verdict.problems[:30]:
        print("  problem:", problem)


def _check(verdict: Verdict) -> None:
    assert verdict.problems == (), "\n".join(verdict.problems[:30])
    assert (verdict.lost, verdict.doubled, verdict.pending) == (0, 0, 0)


# --- 1. sharing one database -----------------------------------------------------------------


@attrs.frozen
class ShareResult:
    verdict: Verdict
    posts: int
    redelivered_elsewhere: int  # bodies acknowledged by two or more processes
    lines_per_node: dict[str, int]  # outcome lines of messages that reached a turn
    statuses: dict[int, int]
    exit_codes: list[int]


async def share_scenario(conninfo: str, workdir: Path, *, roles: tuple[str, ...], seed: int,
                         events: int = 500, duration_s: float = 6.0) -> ShareResult:
    """A generated day dealt round-robin over the processes that serve webhooks, with
    ``roles[i]`` for process i."""
    config = scaleout_config(workdir, conninfo, lease_s=LEASE_S, poll_ms=POLL_MS)
    nodes = make_nodes(config, workdir, len(roles), roles)
    webhooks = [n for n in nodes if n.serves_webhooks]
    dealer = Dealer(webhooks)
    schedule = day_schedule(seed, default_directory(), len(webhooks), events=events,
                            duration_s=duration_s)
    try:
        await start_all(nodes)
        with trio.fail_after(120):
            await dealer.play(schedule)
        await settled(conninfo, dealer.acked, 60)
        codes = await stop_all(nodes)
    finally:
        for node in nodes:
            node.kill()
    files = [n.outcomes for n in nodes]
    lines = Counter(node for node, out in outcome_lines(files)
                    if out.get("sender") and out["action"] in TURN_ACTIONS)
    return ShareResult(judge(conninfo, dealer.acked, files), len(schedule),
                       dealer.redelivered_elsewhere, dict(lines), dict(dealer.statuses), codes)


ALL = "webhook,turns,delivery"


@pytest.mark.parametrize("roles", [
    pytest.param((ALL, ALL), id="2"),
    pytest.param((ALL, ALL, ALL), id="3", marks=pytest.mark.slow),
    pytest.param(("webhook", "webhook", "turns"), id="2-webhook-1-turns", marks=pytest.mark.slow),
])
async def test_two_processes_share_one_database_without_doubling(
        cluster: Cluster, dbname: str, tmp_path: Path, roles: tuple[str, ...]) -> None:
    r = await share_scenario(cluster.conninfo(dbname), tmp_path, roles=roles, seed=len(roles))
    _report(f"{len(roles)} processes {roles}", r.verdict)
    print(f"  posts={r.posts} redelivered to another process={r.redelivered_elsewhere} "
          f"turn lines per process={r.lines_per_node} statuses={r.statuses}")
    assert r.exit_codes == [0] * len(roles)
    _check(r.verdict)
    assert r.verdict.acknowledged >= 200 and r.verdict.turns >= 100
    assert r.verdict.lines_cut == 0
    assert r.redelivered_elsewhere >= 10  # redeliveries of a body to another process
    assert r.verdict.redelivery_lines >= r.redelivered_elsewhere
    # the processes that run turns share them; the others run none
    runners = {f"p{i}" for i, r_ in enumerate(roles) if "turns" in r_.split(",")}
    assert set(r.lines_per_node) == runners, r.lines_per_node
    assert min(r.lines_per_node.values()) > 0.1 * sum(r.lines_per_node.values())


# --- 2. SIGKILL at random points ---------------------------------------------------------------


@attrs.frozen
class Kill:
    node: str
    at_s: float  # seconds into the run
    leases: int  # leases the killed process held (turns in flight)
    requests: int  # webhook requests it was answering
    same_port: bool


@attrs.frozen
class KillResult:
    verdict: Verdict
    kills: list[Kill]
    taken_over: int  # of the leases the killed held, claimed again by another process
    starts: int
    redelivered_elsewhere: int
    statuses: dict[int, int]
    exit_codes: list[int]


async def kill_scenario(conninfo: str, workdir: Path, seed: int, *, processes: int,
                        kills: int = 3, events: int = 400, duration_s: float = 8.0,
                        ai_delay_s: float = 0.0) -> KillResult:
    """Deal a generated day over ``processes`` processes; ``kills`` times, at random points,
    SIGKILL one of them (at random) and restart it 0.2-1.5 s later, on its port or a new
    one; the clients retry on the next process. With ``ai_delay_s`` the answers come from a
    chat endpoint that takes that long, so that the kills find turns in flight."""
    rng = random.Random(seed)
    kill_log: list[Kill] = []
    orphaned: dict[int, int] = {}  # conversation → token of the lease the killed held
    lifetimes: list[tuple[float, float]] = []  # of the killed processes, epoch seconds
    async with trio.open_nursery() as services:
        text = config_text(base_values(conninfo))
        if ai_delay_s:
            url = await services.start(serve_receiver, ChatModel((ai_delay_s,)))
            text = use_chat_endpoint(text, f"{url}/v1/chat/completions")
        config = scaleout_config(workdir, conninfo, lease_s=LEASE_S, poll_ms=POLL_MS, text=text)
        nodes = make_nodes(config, workdir, processes)
        dealer = Dealer(nodes)
        schedule = day_schedule(seed, default_directory(), processes, events=events,
                                duration_s=duration_s)
        marks = sorted(rng.uniform(0.1, 0.9) * duration_s for _ in range(kills))
        born = dict.fromkeys((n.name for n in nodes), time.time())
        try:
            await start_all(nodes)
            t0 = trio.current_time()

            async def killer() -> None:
                for mark in marks:
                    await trio.sleep_until(t0 + mark)
                    index = rng.randrange(len(nodes))
                    victim = nodes[index]
                    # a moment with a request in flight, if one comes within 0.5 s
                    with trio.move_on_after(0.5):
                        await until(lambda i=index: dealer.in_flight[i] > 0, 1,
                                    "a request in flight", every_s=0.001)
                    owner, requests = victim.owner, dealer.in_flight[index]
                    victim.kill()
                    lifetimes.append((born[victim.name], time.time() + 1.0))
                    held = sql(conninfo, "SELECT id, lease_token FROM conversations"
                                         " WHERE lease_owner = %s", (owner,))
                    orphaned.update((int(c), int(t)) for c, t in held)
                    same = rng.random() < 0.5
                    kill_log.append(Kill(victim.name, trio.current_time() - t0, len(held),
                                         requests, same))
                    await trio.sleep(rng.uniform(0.2, 1.5))
                    if not same:
                        victim.port = 0
                    born[victim.name] = time.time()
                    await victim.start()

            with trio.fail_after(150):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(killer)
                    await dealer.play(schedule)
            await settled(conninfo, dealer.acked, 60)
            codes = await stop_all(nodes)
        finally:
            for node in nodes:
                node.kill()
            services.cancel_scope.cancel()
    tokens = dict(sql(conninfo, "SELECT id, lease_token FROM conversations"))
    taken_over = sum(1 for conv, token in orphaned.items() if tokens[conv] > token)
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes], killed=lifetimes)
    return KillResult(verdict, kill_log, taken_over, sum(n.starts for n in nodes),
                      dealer.redelivered_elsewhere, dict(dealer.statuses), codes)


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "processes", "ai_delay_s"),
                         [(1, 2, 0.0), (2, 3, 0.2), (3, 2, 0.3)])
async def test_sigkill_at_random_points_with_several_processes(
        cluster: Cluster, dbname: str, tmp_path: Path, seed: int, processes: int,
        ai_delay_s: float) -> None:
    r = await kill_scenario(cluster.conninfo(dbname), tmp_path, seed, processes=processes,
                            ai_delay_s=ai_delay_s)
    _report(f"seed {seed}, {processes} processes", r.verdict)
    print(f"  kills (process, s, leases held, requests in flight, same port)="
          f"{[(k.node, round(k.at_s, 2), k.leases, k.requests, k.same_port) for k in r.kills]} "
          f"leases taken over={r.taken_over} starts={r.starts} "
          f"redelivered to another process={r.redelivered_elsewhere} statuses={r.statuses}")
    assert len(r.kills) == 3 and r.starts == processes + 3
    assert r.exit_codes == [0] * processes
    _check(r.verdict)
    assert r.verdict.acknowledged >= 150
    # the lines a killed process can lose: those in its 8 KiB write buffer (lines >= 150 B)
    assert r.verdict.lines_cut <= len(r.kills) * 8192 // 150


# --- 3. a burst split between two processes ------------------------------------------------------


def two_nodes(conninfo: str, workdir: Path, **sections: dict[str, Any]) -> list[Node]:
    config = scaleout_config(workdir, conninfo, lease_s=LEASE_S, poll_ms=POLL_MS, **sections)
    return make_nodes(config, workdir, 2)


def lines_by_sender(nodes: list[Node]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    found: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for node, out in outcome_lines(n.outcomes for n in nodes):
        if out.get("sender"):
            found[out["sender"]].append((node, out))
    return found


async def test_a_burst_split_between_two_processes_is_one_turn(
        cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    conninfo = cluster.conninfo(dbname)
    directory = default_directory()
    nodes = two_nodes(conninfo, tmp_path, intake__buffer={"window_ms": 1500, "max_wait_ms": 5000})
    dealer = Dealer(nodes)
    senders = [f"5531990{n:05d}" for n in range(3)]
    sent: dict[str, list[str]] = {}

    async def burst(http: httpx.AsyncClient, round_: int, sender: str) -> None:
        ids = sent[sender] = [f"wamid.burst.{round_}.{i}" for i in range(3)]
        texts = ["hello", "i would like to know", "what is the price?"]
        for i, (message_id, text) in enumerate(zip(ids, texts, strict=True)):
            post = make_post("cloud-api", cloud_body(sender, message_id, text), directory)
            assert await dealer.deliver(http, post, i % 2) == 200  # A, B, A
            await trio.sleep(0.2)

    try:
        await start_all(nodes)
        async with httpx.AsyncClient(trust_env=False) as http, trio.open_nursery() as nursery:
            for round_, sender in enumerate(senders):
                nursery.start_soon(burst, http, round_, sender)
        await settled(conninfo, dealer.acked, 30)
        codes = await stop_all(nodes)
    finally:
        for node in nodes:
            node.kill()
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report("bursts", verdict)
    assert codes == [0, 0]
    _check(verdict)
    acked_by = Counter(i for nodes_ in dealer.acked_by.values() for i in nodes_)
    assert acked_by == {0: 6, 1: 3}  # each burst was split between the processes
    lines = lines_by_sender(nodes)
    for sender in senders:
        mine = {out["message_id"]: (node, out) for node, out in lines[sender]}
        assert len(lines[sender]) == 3 and set(mine) == set(sent[sender]), lines[sender]
        actions = [mine[m][1]["action"] for m in sent[sender]]
        turns = {mine[m][1]["turn_id"] for m in sent[sender]}
        print(f"{sender}: {actions} turn {turns} written by {[mine[m][0] for m in sent[sender]]}")
        assert actions == ["merged", "merged", "replied"]
        assert len(turns) == 1
        (turn,) = turns
        assert sql(conninfo, "SELECT count(*) FROM ai_interactions WHERE turn_id = %s",
                   (turn,)) == [(1,)]
    assert sql(conninfo, "SELECT count(*) FROM ai_interactions") == [(3,)]


async def test_a_burst_split_between_two_processes_is_one_turn_when_one_inbox_write_is_slow(
        cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    """The same with the default window (1.5 s), but process A's inbox write of the first
    message takes 2 s (its database connection is slow: :class:`DelayProxy`). Live intake
    stamps ``received_at`` with the database's clock at the write, so the message is
    received when its row is written: after B's, and after B's burst closed. Two turns, B's
    first, and the conversation's order is the order of ``received_at`` (before this, A kept
    the earlier process-clock stamp while B's turn was already committed: out of order)."""
    conninfo = cluster.conninfo(dbname)
    directory = default_directory()
    sender = "5531990099999"
    proxy = DelayProxy(unix_socket(conninfo), b"wamid.lateburst.0", 2.0)
    burst = {"intake__buffer": {"window_ms": 1500, "max_wait_ms": 5000}}
    posts = [make_post("cloud-api", cloud_body(sender, f"wamid.lateburst.{i}", text), directory)
             for i, text in enumerate(["hello there", "what is the price?"])]
    acked_after: list[float] = []
    async with trio.open_nursery() as services:
        port = await services.start(proxy.serve)
        nodes = make_nodes(scaleout_config(tmp_path, conninfo, lease_s=LEASE_S,
                                           poll_ms=POLL_MS, **burst), tmp_path, 2)
        nodes[0].config = scaleout_config(tmp_path, via_proxy(conninfo, port), lease_s=LEASE_S,
                                          poll_ms=POLL_MS, name="slow.toml", **burst)
        dealer = Dealer(nodes)

        async def post(http: httpx.AsyncClient, i: int) -> None:
            started = time.monotonic()
            assert await dealer.deliver(http, posts[i], i) == 200  # A, then B
            acked_after.append(time.monotonic() - started)

        try:
            await start_all(nodes)
            async with httpx.AsyncClient(trust_env=False) as http, \
                    trio.open_nursery() as nursery:
                nursery.start_soon(post, http, 0)
                await trio.sleep(0.2)
                nursery.start_soon(post, http, 1)
            await settled(conninfo, dealer.acked, 30)
            codes = await stop_all(nodes)
        finally:
            for node in nodes:
                node.kill()
            services.cancel_scope.cancel()
    rows = sql(conninfo, "SELECT message_id, received_at, action, turn_id, processed_at"
                         " FROM inbox ORDER BY received_at, id")
    for row in rows:
        print(" ", row)
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report("burst with a slow inbox write", verdict)
    assert proxy.fired == 1 and max(acked_after) >= 2.0  # A's write did take 2 s
    assert codes == [0, 0]
    assert [r[0] for r in rows] == ["wamid.lateburst.1", "wamid.lateburst.0"]
    _check(verdict)  # order included: B's turn, then A's
    assert [r[2] for r in rows] == ["replied", "replied"] and rows[0][3] != rows[1][3]
    assert rows[0][4] < rows[1][4]  # B's turn committed first


# --- 4. a conversation with a human ------------------------------------------------------------


@pytest.mark.parametrize("window_ms", [0, 1500])
async def test_a_conversation_handed_to_a_human_is_not_answered_by_the_other_process(
        cluster: Cluster, dbname: str, tmp_path: Path, window_ms: int) -> None:
    """The request for a human goes to process A, the sender's next message a few ms later
    to process B, three times (three senders). Without buffering (window 0) they are two
    turns and the second is held; with a window they are one turn, escalated."""
    conninfo = cluster.conninfo(dbname)
    directory = default_directory()
    nodes = two_nodes(conninfo, tmp_path,
                      intake__buffer={"window_ms": window_ms, "max_wait_ms": 5000})
    dealer = Dealer(nodes)
    senders = [f"5531980{n:05d}" for n in range(3)]
    gaps: list[float] = []

    async def ask_then_write(http: httpx.AsyncClient, round_: int, sender: str) -> None:
        first = make_post("cloud-api", cloud_body(sender, f"wamid.human.{round_}.0",
                                                  "I want to talk to a human"), directory)
        second = make_post("cloud-api", cloud_body(sender, f"wamid.human.{round_}.1",
                                                   PHRASES[0].format(round_)), directory)
        started = time.monotonic()
        assert await dealer.deliver(http, first, 0) == 200
        assert await dealer.deliver(http, second, 1) == 200
        gaps.append(time.monotonic() - started)

    try:
        await start_all(nodes)
        async with httpx.AsyncClient(trust_env=False) as http:
            for round_, sender in enumerate(senders):
                await ask_then_write(http, round_, sender)
        await settled(conninfo, dealer.acked, 30)
        codes = await stop_all(nodes)
    finally:
        for node in nodes:
            node.kill()
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report(f"window {window_ms} ms", verdict)
    print(f"  both messages posted within {max(gaps) * 1000:.0f} ms")
    assert codes == [0, 0]
    _check(verdict)
    lines = lines_by_sender(nodes)
    for sender in senders:
        got = sorted((out["message_id"], out["action"], out["turn_id"], node)
                     for node, out in lines[sender])
        print(f"  {sender}: {[(a, t, node) for _, a, t, node in got]}")
        (_, first_action, first_turn, _), (_, second_action, second_turn, _) = got
        if window_ms == 0:
            assert (first_action, second_action) == ("escalated", "held")
            assert first_turn != second_turn
        else:
            assert (first_action, second_action) == ("merged", "escalated")
            assert first_turn == second_turn
    assert sql(conninfo, "SELECT count(*) FROM outbox WHERE kind = 'reply'") == [(0,)]
    assert sql(conninfo, "SELECT count(*) FROM outbox WHERE kind = 'handover'") == [(3,)]
    assert sql(conninfo, "SELECT count(*) FROM escalations WHERE status = 'open'") == [(3,)]


# --- 5. the dead's turn redone by the living -----------------------------------------------------


async def test_a_dead_process_s_turns_are_redone_by_the_living_within_the_lease(
        cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    """The model takes 3 s to answer the first request (0.1 s afterwards). The process that
    claimed the turn is SIGKILLed while it waits for that answer; the other one, running all
    along, must claim the turn within lease_s + poll (+ margin) of the kill and commit it,
    once."""
    conninfo = cluster.conninfo(dbname)
    model = ChatModel((3.0, 0.1))
    margin_s = 1.0
    async with trio.open_nursery() as services:
        url = await services.start(serve_receiver, model)
        text = use_chat_endpoint(config_text(base_values(conninfo)), f"{url}/v1/chat/completions")
        config = scaleout_config(tmp_path, conninfo, lease_s=LEASE_S, poll_ms=POLL_MS, text=text)
        nodes = make_nodes(config, tmp_path, 2)
        dealer = Dealer(nodes)
        post = make_post("cloud-api", cloud_body("553197000001", "wamid.slow.1",
                                                 PHRASES[0].format(1)), default_directory())
        lease = "SELECT lease_owner, lease_token FROM conversations WHERE sender = '553197000001'"
        try:
            await start_all(nodes)
            async with httpx.AsyncClient(trust_env=False) as http:
                assert await dealer.deliver(http, post, 0) == 200
            await until(lambda: model.calls == 1, 10, "the model asked", every_s=0.02)
            ((owner, token),) = sql(conninfo, lease)
            holder = next(n for n in nodes if n.owner == owner)
            other = next(n for n in nodes if n is not holder)
            holder.kill()
            killed = time.monotonic()
            claimed_s = await until(lambda: sql(conninfo, lease)[0][0] == other.owner, 15,
                                    "the other process claims the turn", every_s=0.02)
            ((_, new_token),) = sql(conninfo, lease)
            await settled(conninfo, dealer.acked, 15)
            committed_s = time.monotonic() - killed
            codes = await stop_all([other])
        finally:
            for node in nodes:
                node.kill()
            services.cancel_scope.cancel()
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report("takeover", verdict)
    print(f"  {holder.name} held the turn (token {token}) and was killed; {other.name} claimed "
          f"it {claimed_s:.2f} s later (token {new_token}) and committed it {committed_s:.2f} s "
          f"after the kill; model calls={model.calls} answered={model.answered}")
    assert codes == [0]
    _check(verdict)
    assert new_token > token
    assert claimed_s <= LEASE_S + POLL_MS / 1000 + margin_s
    assert committed_s <= LEASE_S + POLL_MS / 1000 + 0.1 + margin_s
    assert model.calls == 2 and model.answered == 1  # the killed one's request was cut
    assert sql(conninfo, "SELECT count(*) FROM ai_interactions") == [(1,)]
    assert sql(conninfo, "SELECT kind, count(*) FROM outbox GROUP BY 1") == [("reply", 1)]
    lines = [(node, out["action"]) for node, out in outcome_lines(n.outcomes for n in nodes)]
    assert lines == [(other.name, "replied")]


async def test_a_slow_turn_is_not_taken_over_while_its_process_lives(
        cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    """The counterpart: the model takes 3 s (longer than the 2 s lease) and both processes
    live. The claimer renews the lease, so the other process never takes the turn over:
    one request to the model, one commit under the token of the first claim."""
    conninfo = cluster.conninfo(dbname)
    model = ChatModel((3.0,))
    async with trio.open_nursery() as services:
        url = await services.start(serve_receiver, model)
        text = use_chat_endpoint(config_text(base_values(conninfo)), f"{url}/v1/chat/completions")
        config = scaleout_config(tmp_path, conninfo, lease_s=LEASE_S, poll_ms=POLL_MS, text=text)
        nodes = make_nodes(config, tmp_path, 2)
        dealer = Dealer(nodes)
        post = make_post("cloud-api", cloud_body("553197000002", "wamid.slowlive.1",
                                                 PHRASES[0].format(2)), default_directory())
        lease = "SELECT lease_owner, lease_token FROM conversations WHERE sender = '553197000002'"
        try:
            await start_all(nodes)
            async with httpx.AsyncClient(trust_env=False) as http:
                assert await dealer.deliver(http, post, 0) == 200
            await until(lambda: model.calls == 1, 10, "the model asked", every_s=0.02)
            ((owner, token),) = sql(conninfo, lease)
            owners = set()

            def committed() -> bool:
                owners.add(sql(conninfo, lease)[0][0])
                return bool(sql(conninfo, "SELECT 1 FROM inbox WHERE status = 'processed'"))

            took = await until(committed, 15, "the commit", every_s=0.05)
            ((_, final_token),) = sql(conninfo, lease)
            codes = await stop_all(nodes)
        finally:
            for node in nodes:
                node.kill()
            services.cancel_scope.cancel()
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report("slow living turn", verdict)
    print(f"  committed {took:.2f} s after the model was asked; lease owners seen {owners}")
    assert codes == [0, 0]
    _check(verdict)
    assert took >= 2.5  # the answer took longer than the lease
    assert model.calls == 1 and final_token == token
    assert owners <= {owner, None}
    assert not any("lost the lease" in n.log_text() for n in nodes)


# --- 6. the fenced commit when the database's answer is slow or lost --------------------------


async def test_a_commit_whose_answer_is_lost_is_reported_once(
        cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    """The commit of a turn takes effect but its answer is lost (the connection is cut:
    test_faults.PgProxy). The dispatch stage retries the commit on a new connection; the
    retry must be recognised as "this very commit was written before" (Store.commit_claim:
    ``written`` False) and the turn reported once -- not failed, not given back."""
    conninfo = cluster.conninfo(dbname)
    reply = b"Our prices are at https://example.com/prices."  # sent in the commit only
    proxy = PgProxy(unix_socket(conninfo), committed=lambda: bool(sql(
        conninfo, "SELECT 1 FROM inbox WHERE status = 'processed'")))
    async with trio.open_nursery() as services:
        port = await services.start(proxy.serve)
        config = scaleout_config(tmp_path, via_proxy(conninfo, port), lease_s=LEASE_S,
                                 poll_ms=POLL_MS)
        nodes = make_nodes(config, tmp_path, 1)
        dealer = Dealer(nodes)
        post = make_post("cloud-api", cloud_body("553100000077", "wamid.lostcommit.1",
                                                 "what is the price?"), default_directory())
        try:
            await start_all(nodes)
            proxy.trigger = reply
            async with httpx.AsyncClient(trust_env=False) as http:
                assert await dealer.deliver(http, post, 0) == 200
            await settled(conninfo, dealer.acked, 20)
            # the retried commit ends in its outcome line -- or in a failed turn
            await until(lambda: bool(outcome_lines([nodes[0].outcomes]))
                        or " failed;" in nodes[0].log_text(), 20,
                        "the retried commit's outcome", every_s=0.02)
            codes = await stop_all(nodes)
        finally:
            for node in nodes:
                node.kill()
            services.cancel_scope.cancel()
    state = sql(conninfo, "SELECT pending, attempts, last_error FROM conversations")
    failed = [line for line in nodes[0].log_text().splitlines() if " failed;" in line]
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report("lost commit answer", verdict)
    print(f"  connections cut={proxy.cuts} conversation (pending, attempts, last_error)={state}")
    for line in failed:
        print("  log:", line)
    assert proxy.cuts == 1 and codes == [0]
    assert failed == []
    assert state == [(0, 0, None)]
    _check(verdict)  # the outcome line of the committed turn


async def test_a_committed_conversation_is_not_locked_by_a_late_lease_renewal(
        cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    """The model takes 1 s (so the claim is old enough for the lease renewal) and the
    database's answer to the turn's commit comes back 1.5 s late: meanwhile the renewal
    runs for the claim still in flight. The commit has already ended the lease, so the
    renewal must find nothing to renew; the sender's next message is then answered after
    its burst window as usual, not once a renewed lease has expired."""
    conninfo = cluster.conninfo(dbname)
    proxy = DelayProxy(unix_socket(conninfo), delay_s=1.5, answer=True)
    model = ChatModel((1.0, 0.0))
    directory = default_directory()
    lease = "SELECT lease_owner, lease_until FROM conversations WHERE sender = '553100000088'"
    async with trio.open_nursery() as services:
        port = await services.start(proxy.serve)
        url = await services.start(serve_receiver, model)
        dsn = via_proxy(conninfo, port)
        text = use_chat_endpoint(config_text(base_values(dsn)), f"{url}/v1/chat/completions")
        config = scaleout_config(tmp_path, dsn, lease_s=LEASE_S, poll_ms=POLL_MS, text=text)
        nodes = make_nodes(config, tmp_path, 1)
        dealer = Dealer(nodes)
        posts = [make_post("cloud-api", cloud_body("553100000088", f"wamid.renew.{i}", body),
                           directory) for i, body in enumerate(["hello one", "hello two"])]
        processed = "SELECT 1 FROM inbox WHERE message_id = %s AND status = 'processed'"
        try:
            await start_all(nodes)
            proxy.trigger = b"An answer from the model."  # sent in the commit only
            async with httpx.AsyncClient(trust_env=False) as http:
                assert await dealer.deliver(http, posts[0], 0) == 200
                await until(lambda: bool(sql(conninfo, processed, ("wamid.renew.0",))), 10,
                            "the first commit", every_s=0.01)
                await trio.sleep(proxy.delay_s + 0.2)  # its answer is back
                after_commit = sql(conninfo, lease)
                assert await dealer.deliver(http, posts[1], 0) == 200
                second_s = await until(lambda: bool(sql(conninfo, processed, ("wamid.renew.1",))),
                                       10, "the second commit", every_s=0.01)
            codes = await stop_all(nodes)
        finally:
            for node in nodes:
                node.kill()
            services.cancel_scope.cancel()
    verdict = judge(conninfo, dealer.acked, [n.outcomes for n in nodes])
    _report("late renewal", verdict)
    print(f"  lease after the first commit={after_commit}; the second message was committed "
          f"{second_s:.2f} s after it was posted (window 0.3 s)")
    assert proxy.fired == 1 and codes == [0]
    _check(verdict)
    assert after_commit == [(None, None)]
    assert second_s < 1.0


# --- 7. starting together --------------------------------------------------------------------


async def test_processes_starting_together_seed_the_instances_without_an_error(
        cluster: Cluster) -> None:
    """Every ``pipeline run`` makes the ``instances`` table match its config at start
    (Store.seed_instances). Several processes started at once on a fresh database do so at
    the same moment; none of them may fail. Here the statement each start runs, four at a
    time on connections already open, on 12 fresh databases (the race is between the
    statements; processes would take a second each to get there)."""
    rows = instance_rows(load_config(None))
    errors: list[str] = []
    for round_ in range(12):
        name = fresh_database(cluster, f"seed{round_}")
        try:
            async with open_pool(cluster.conninfo(name), 4) as pool:
                await _seed_together(Store(pool, query_timeout_s=5.0), rows, 4, errors)
        finally:
            drop_database(cluster, name)
    print(f"{len(errors)} of 48 starts failed: {sorted(set(errors))}")
    assert errors == []


async def _seed_together(store: Store, rows: list[Any], n: int, errors: list[str]) -> None:
    """``n`` tasks each open a connection of the pool, then all seed at once."""
    opened, go = trio.Semaphore(0), trio.Event()

    async def seed() -> None:
        async with store.pool.connection():
            opened.release()
            await go.wait()
        try:
            await store.seed_instances(rows)
        except DatabaseError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(seed)
        for _ in range(n):
            await opened.acquire()
        go.set()
