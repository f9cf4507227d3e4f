"""Resolving escalations (store, HTTP endpoint, CLI) gives the conversation back to the
assistant; the hand-over effects are written once."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from conftest import sql
from test_pipeline import make_config, run_sample
from test_webhook import _start

from pipeline.config import WebhookConfig, parse_config
from pipeline.engine import Inlets, Pipeline
from pipeline.store import Store
from stages.outcomes import OutcomeSink
from stages.records import RawEvent

TOKEN = "resolve-token-for-tests"


def text_event(sender: str, message_id: str, text: str) -> RawEvent:
    body = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {
            "metadata": {"phone_number_id": "1122334455667"},
            "messages": [{"from": sender, "id": message_id, "timestamp": "1700000000",
                          "type": "text", "text": {"body": text}}]}}]}]}
    return RawEvent(dt.datetime(2025, 9, 1, tzinfo=dt.UTC), "cloud-api", body)


async def send_events(store: Store, *events: RawEvent, cfg: Any = None) -> OutcomeSink:
    sink = OutcomeSink()

    async def source(inlets: Inlets) -> None:
        for event in events:
            await inlets.raw.send(event)

    await Pipeline(cfg or make_config(), store, sink).run(source)
    return sink


async def test_escalate_hold_resolve_reply(store: Store, conninfo: str) -> None:
    sink = await send_events(store, text_event("5511", "m1", "I want to talk to a human"))
    assert sink.actions == {"escalated": 1}
    [esc] = await store.open_escalations()
    assert (esc.instance, esc.sender) == ("demo", "5511")
    assert sql(conninfo, "SELECT kind FROM outbox ORDER BY id") == [("handover",)]
    sink = await send_events(store, text_event("5511", "m2", "hello? what is the price"))
    assert sink.actions == {"held": 1}  # stored, but the assistant stays silent
    assert sql(conninfo, "SELECT count(*) FROM messages WHERE message_id = 'm2'") == [(1,)]
    assert await store.resolve_escalation(esc.id, "test")
    assert not await store.resolve_escalation(esc.id, "test")  # only once
    sink = await send_events(store, text_event("5511", "m3", "what is the price?"))
    assert sink.actions == {"replied": 1}


async def test_escalation_webhook_event_is_emitted_once(store: Store, conninfo: str) -> None:
    cfg = parse_config({"instances": [{"name": "demo", "phone_number_id": "1122334455667",
                                       "webhook_url": "http://127.0.0.1:9/hook"}]}, "t")
    await send_events(store, text_event("5522", "e1", "falar com atendente"), cfg=cfg)
    await send_events(store, text_event("5522", "e1", "falar com atendente"), cfg=cfg)
    events = sql(conninfo, "SELECT payload->>'event' FROM outbox WHERE kind = 'webhook'"
                 " ORDER BY id")
    assert events == [("turn",), ("escalation.opened",)]


async def test_http_endpoints_need_the_token(store: Store) -> None:
    await run_sample(store)
    open_ids = [e.id for e in await store.open_escalations()]
    assert open_ids
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
        srv = await _start(nursery, store, WebhookConfig(port=0, resolve_token=TOKEN))
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert (await client.get(f"{srv.url}/escalations")).status_code == 401
        assert (await client.get(f"{srv.url}/escalations",
                                 headers={"authorization": "Bearer nope"})).status_code == 401
        listed = (await client.get(f"{srv.url}/escalations", headers=auth)).json()
        assert [e["id"] for e in listed["open"]] == open_ids
        r = await client.post(f"{srv.url}/escalations/{open_ids[0]}/resolve", headers=auth)
        assert (r.status_code, r.json()) == (200, {"resolved": open_ids[0]})
        r = await client.post(f"{srv.url}/escalations/{open_ids[0]}/resolve", headers=auth)
        assert r.status_code == 404
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
        srv = await _start(nursery, store, WebhookConfig(port=0))  # no token: no endpoint
        r = await client.get(f"{srv.url}/escalations")
        assert r.status_code == 404 and "resolve_token" in r.json()["error"]
        nursery.cancel_scope.cancel()


def test_cli_lists_and_resolves(cluster: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\ndata_dir = "{cluster.data_dir}"\n'
                   '[[instances]]\nname = "demo"\nphone_number_id = "1122334455667"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline", *args, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    assert cli("db", "migrate").returncode == 0
    db = cluster.conninfo("pipeline")
    sql(db, "INSERT INTO instances (name) VALUES ('demo') ON CONFLICT DO NOTHING")
    [(conv,)] = sql(db, "INSERT INTO conversations (instance, sender) VALUES ('demo', 'cli-"
                        "sender') RETURNING id")
    [(esc,)] = sql(db, "INSERT INTO escalations (conversation_id, reason) VALUES (%s, "
                       "'keyword: human') RETURNING id", (conv,))
    listed = cli("escalations", "list", "--instance", "demo")
    assert listed.returncode == 0, listed.stderr
    assert f"{esc}\tdemo\tcli-sender\t" in listed.stdout and "keyword: human" in listed.stdout
    done = cli("escalations", "resolve", str(esc), "--by", "maria")
    assert done.returncode == 0 and done.stdout.startswith(f"resolved {esc}")
    assert sql(db, "SELECT status, resolved_by FROM escalations WHERE id = %s", (esc,)) == [
        ("resolved", "maria")]
    missing = cli("escalations", "resolve", str(esc))
    assert missing.returncode == 1 and f"no open escalation {esc}" in missing.stderr
    assert cli("escalations", "resolve").returncode == 2


async def test_failed_answers_before_a_resolved_escalation_do_not_count(store: Store) -> None:
    cfg = parse_config({"escalation": {"max_failed_answers": 2},
                        "instances": [{"name": "demo", "phone_number_id": "1122334455667"}]},
                       "t")
    first = await send_events(store, text_event("5533", "f1", "xyzzy"), cfg=cfg)
    assert first.actions == {"replied": 1}  # the fallback answer
    second = await send_events(store, text_event("5533", "f2", "plugh"), cfg=cfg)
    assert second.actions == {"escalated": 1}  # would be the 2nd fallback in a row
    assert second.escalations == {"2 failed answers in a row": 1}
    [esc] = await store.open_escalations()
    await store.resolve_escalation(esc.id, "test")
    third = await send_events(store, text_event("5533", "f3", "frobozz"), cfg=cfg)
    assert third.actions == {"replied": 1}  # a fresh start after the human's turn
