"""Dead letters an operator can act on: a dead reply sent again through the outbox with its
own idempotency key (CLI and HTTP), an invalid event put aside, never retried."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import test_delivery
import trio
from conftest import sql
from test_delivery import Receiver, Reply, add_row, conversation, delivering, make_config
from test_faults import until
from test_webhook import _start

from pipeline.config import WebhookConfig
from pipeline.deadletters import DeadLetters
from pipeline.outbox import OutboxStore
from pipeline.store import Store
from stages.records import Invalid

TOKEN = "operator-token-for-tests"
receiver = test_delivery.receiver  # the fixtures of the delivery tests
outbox = test_delivery.outbox


async def a_dead_webhook_event(receiver: Receiver, outbox: OutboxStore, conninfo: str) -> int:
    """A customer webhook event that fails until the sends run out: its dead letter's id."""
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t1:webhook", conv, f"{receiver.url}/hook", kind="webhook",
            payload={"event": "reply", "text": "hi"})
    receiver.script("/hook", *[Reply(500)] * 2)
    async with delivering(make_config(receiver.url, max_attempts=2), outbox) as run:
        await until(lambda: run.stats.dead == 1, 10, "dead")
    [(letter,)] = sql(conninfo, "SELECT id FROM dead_letters WHERE message_id = 't1:webhook'")
    return int(letter)


async def test_retry_sends_a_dead_row_again_with_its_key(
        receiver: Receiver, outbox: OutboxStore, store: Store, conninfo: str) -> None:
    letter = await a_dead_webhook_event(receiver, outbox, conninfo)
    await store.dead_letter("intake", Invalid("body is not valid json", origin="webhook"), "{")
    letters = DeadLetters(store.pool, 5.0)
    listed = await letters.list()
    assert [(d.stage, d.status) for d in listed] == [("dispatch", "open"), ("intake", "open")]
    invalid = listed[1].id
    assert await letters.retry(invalid, "test") == "not retryable"
    assert await letters.discard(invalid, "test") == "discarded"
    assert await letters.retry(letter, "maria") == "retried"
    assert await letters.retry(letter, "maria") == "not open"
    assert await letters.retry(999_999, "maria") == "missing"
    assert sql(conninfo, "SELECT status, attempts FROM outbox WHERE idempotency_key ="
                         " 't1:webhook'") == [("pending", 0)]
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.delivered == 1, 10, "sent again")
    hits = receiver.of("/hook")
    assert len(hits) == 3 and hits[-1].answered.status == 200
    assert {h.headers["idempotency-key"] for h in hits} == {"t1:webhook"}
    assert sql(conninfo, "SELECT status, handled_by FROM dead_letters ORDER BY id") == [
        ("retried", "maria"), ("discarded", "test")]
    assert await letters.list() == []
    assert len(await letters.list(every=True)) == 2


async def test_http_endpoints(receiver: Receiver, outbox: OutboxStore, store: Store,
                              conninfo: str) -> None:
    letter = await a_dead_webhook_event(receiver, outbox, conninfo)
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
        srv = await _start(nursery, store, WebhookConfig(port=0, resolve_token=TOKEN))
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert (await client.get(f"{srv.url}/deadletters")).status_code == 401
        listed = (await client.get(f"{srv.url}/deadletters", headers=auth)).json()
        assert [d["id"] for d in listed["dead_letters"]] == [letter]
        shown = (await client.get(f"{srv.url}/deadletters/{letter}", headers=auth)).json()
        assert shown["key"] == "t1:webhook" and shown["payload"] == {"event": "reply",
                                                                     "text": "hi"}
        r = await client.post(f"{srv.url}/deadletters/{letter}/retry", headers=auth)
        assert (r.status_code, r.json()["result"]) == (200, "retried")
        r = await client.post(f"{srv.url}/deadletters/{letter}/discard", headers=auth)
        assert (r.status_code, r.json()["result"]) == (409, "not open")
        nursery.cancel_scope.cancel()


def test_cli(conninfo: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\ndsn = "{conninfo}"\n'
                   '[[instances]]\nname = "acme"\n')
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t9:reply", conv, "5511")
    sql(conninfo, "UPDATE outbox SET status = 'dead'")
    [(letter_id,)] = sql(conninfo, "INSERT INTO dead_letters (stage, reason, origin, instance,"
                                   " message_id, payload) VALUES ('dispatch', 'gave up after"
                                   " 10 attempts: http 500', 'outbox', 'acme', 't9:reply',"
                                   " '{}') RETURNING id")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline", "deadletters", *args,
                               "--config", str(cfg)], capture_output=True, text=True,
                              timeout=60)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert f"{letter_id}\tdispatch\topen\tacme\t" in listed.stdout and "t9:reply" in listed.stdout
    shown = cli("show", str(letter_id))
    assert json.loads(shown.stdout)["reason"] == "gave up after 10 attempts: http 500"
    done = cli("retry", str(letter_id), "--by", "maria")
    assert done.returncode == 0 and "back in the outbox" in done.stdout
    again = cli("discard", str(letter_id))
    assert again.returncode == 1 and "already retried or discarded" in again.stderr
    assert cli("retry").returncode == 2
