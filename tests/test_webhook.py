"""The webhook server over real HTTP on 127.0.0.1 (hypercorn's Trio worker), against the
embedded database."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from conftest import sql

from pipeline.config import WebhookConfig
from pipeline.db import open_pool
from pipeline.intake import LiveIntake, SharedWrites
from pipeline.metrics import Metrics
from pipeline.recorded_log import LogRecorder, read_log
from pipeline.store import InstanceRow, Store
from pipeline.webhook import WebhookApp, serve
from stages.intake import Accepted
from stages.parse import InstanceDirectory
from stages.records import RawEvent

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "app-secret-for-tests"
APIKEY = "evolution-key-for-tests"
DIRECTORY = InstanceDirectory({"1122334455667": "demo"}, {"Teste": "demo", "loja": "loja"})


def cloud_body(message_id: str = "wamid.T1", text: str = "hello") -> bytes:
    body = json.loads((FIXTURES / "cloud-api" / "01_text.json").read_text())
    message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    message["id"], message["text"]["body"] = message_id, text
    return json.dumps(body).encode()


def signed(raw: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return {"x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"}


@attrs.define
class Server:
    url: str
    accepted: list[Accepted]
    app: WebhookApp


async def _start(nursery: trio.Nursery, store: Store, cfg: WebhookConfig,
                 recorder: LogRecorder | None = None, *, seed: bool = True) -> Server:
    accepted: list[Accepted] = []
    if seed:  # as `pipeline run` does at start: conversations reference their instance
        await store.seed_instances([InstanceRow("demo", "1122334455667", "Teste", {}),
                                    InstanceRow("loja", "", "loja", {})])

    async def handover(a: Accepted) -> None:
        accepted.append(a)

    writes = SharedWrites(store)  # as `pipeline run` does: requests share their writes
    await nursery.start(writes.run)
    app = WebhookApp(cfg, LiveIntake(store, DIRECTORY, writes), handover,
                     Metrics().stage("webhook"),
                     recorder)
    stopping = trio.Event()
    url = await nursery.start(partial(serve, app, "127.0.0.1", 0, grace_s=1,
                                      stopping=stopping))
    return Server(url, accepted, app)


@pytest.fixture
async def server(store: Store, tmp_path: Path) -> AsyncIterator[Server]:
    cfg = WebhookConfig(port=0, app_secret=SECRET, verify_token="verify-me",
                        evolution_apikey=APIKEY, max_body_bytes=64 * 1024, max_json_depth=20)
    recorder = LogRecorder(tmp_path / "rec")
    async with trio.open_nursery() as nursery:
        yield await _start(nursery, store, cfg, recorder)
        nursery.cancel_scope.cancel()
    recorder.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


async def test_signed_body_is_stored_then_acknowledged(server: Server, client: httpx.AsyncClient,
                                                       conninfo: str) -> None:
    raw = cloud_body()
    r = await client.post(f"{server.url}/webhook/cloud-api", content=raw, headers=signed(raw))
    assert (r.status_code, r.json()) == (200, {"stored": 1, "duplicates": 0, "ignored": 0,
                                               "invalid": 0})
    assert sql(conninfo, "SELECT instance, message_id, sender, status FROM inbox") == [
        ("demo", "wamid.T1", "972987654321", "pending")]
    assert [s.message.text for s in server.accepted[0].stored] == ["hello"]


async def test_redelivery_is_acknowledged_once_stored(server: Server, client: httpx.AsyncClient,
                                                      conninfo: str) -> None:
    raw = cloud_body()
    for _ in range(3):
        r = await client.post(f"{server.url}/webhook/cloud-api", content=raw,
                              headers=signed(raw))
        assert r.status_code == 200
    assert r.json()["duplicates"] == 1
    assert sql(conninfo, "SELECT count(*), max(redeliveries) FROM inbox") == [(1, 2)]
    assert [s.redelivered for a in server.accepted for s in a.stored] == [False, True, True]


@pytest.mark.parametrize("headers", [
    {}, {"x-hub-signature-256": "sha256=00"}, {"x-hub-signature-256": "garbage"},
])
async def test_bad_or_missing_signature_is_401_and_stores_nothing(
    server: Server, client: httpx.AsyncClient, conninfo: str, headers: dict[str, str],
) -> None:
    raw = cloud_body()
    r = await client.post(f"{server.url}/webhook/cloud-api", content=raw, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": "x-hub-signature-256 does not match the body"}
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(0,)]


async def test_signature_of_another_body_is_refused(server: Server,
                                                    client: httpx.AsyncClient) -> None:
    r = await client.post(f"{server.url}/webhook/cloud-api", content=cloud_body("wamid.2"),
                          headers=signed(cloud_body("wamid.1")))
    assert r.status_code == 401


async def test_verification_handshake(server: Server, client: httpx.AsyncClient) -> None:
    ok = await client.get(f"{server.url}/webhook/cloud-api", params={
        "hub.mode": "subscribe", "hub.verify_token": "verify-me", "hub.challenge": "1158201444"})
    assert (ok.status_code, ok.text) == (200, "1158201444")
    for params in ({"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
                   {"hub.mode": "unsubscribe", "hub.verify_token": "verify-me",
                    "hub.challenge": "1"}, {}):
        r = await client.get(f"{server.url}/webhook/cloud-api", params=params)
        assert r.status_code == 403


async def test_oversized_body_is_413(server: Server, client: httpx.AsyncClient,
                                     conninfo: str) -> None:
    raw = cloud_body(text="x" * 70_000)
    r = await client.post(f"{server.url}/webhook/cloud-api", content=raw, headers=signed(raw))
    assert r.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted while reading
        for _ in range(70):
            yield b"x" * 1024

    r = await client.post(f"{server.url}/webhook/cloud-api", content=chunks())
    assert r.status_code == 413
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(0,)]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", r"^body is not valid json: expecting property name"),
    (b"\xff\xfe", r"^body is not valid utf-8 at byte 0$"),
    (b"[" * 50 + b"]" * 50, r"^body is nested deeper than 20 levels$"),
    (b'{"object": "page"}', r"^object must be 'whatsapp_business_account', not 'page'"),
])
async def test_malformed_body_is_400_with_reason_and_dead_letter(
    server: Server, client: httpx.AsyncClient, conninfo: str, raw: bytes, reason: str,
) -> None:
    r = await client.post(f"{server.url}/webhook/cloud-api", content=raw, headers=signed(raw))
    assert r.status_code == 400
    assert re.search(reason, r.json()["error"])
    assert sql(conninfo, "SELECT count(*) FROM dead_letters") == [(1,)]
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(0,)]


async def test_evolution_apikey_in_header_or_body(server: Server, client: httpx.AsyncClient,
                                                  conninfo: str) -> None:
    body = json.loads((FIXTURES / "evolution" / "03_upsert_text_fixture_uppercase_event.json")
                      .read_text())
    body["instance"] = "loja"
    body["apikey"] = APIKEY
    ok = await client.post(f"{server.url}/webhook/evolution/messages-upsert", json=body)
    assert ok.status_code == 200, ok.text
    body["apikey"] = "wrong"
    assert (await client.post(f"{server.url}/webhook/evolution", json=body)).status_code == 401
    header = await client.post(f"{server.url}/webhook/evolution", json=body,
                               headers={"apikey": APIKEY})
    assert header.status_code == 200  # the header wins; the redelivery is acknowledged
    assert sql(conninfo, "SELECT instance, count(*) FROM inbox GROUP BY 1") == [("loja", 1)]


async def test_own_messages_and_receipts_are_acknowledged_and_ignored(
    server: Server, client: httpx.AsyncClient, conninfo: str,
) -> None:
    raw = (FIXTURES / "cloud-api" / "18_status_delivered.json").read_bytes()
    r = await client.post(f"{server.url}/webhook/cloud-api", content=raw, headers=signed(raw))
    assert r.status_code == 200 and r.json()["ignored"] == 1
    body = json.loads((FIXTURES / "evolution" / "06_upsert_text_fromMe_v2_server_ack.json")
                      .read_text())
    body["instance"], body["apikey"] = "loja", APIKEY
    r = await client.post(f"{server.url}/webhook/evolution", json=body)
    assert r.status_code == 200 and r.json()["ignored"] == 1
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(0,)]
    assert [o.reason for a in server.accepted for o in a.finished] == [
        "receipt: delivered", "own message (fromMe)"]


async def test_routes(server: Server, client: httpx.AsyncClient) -> None:
    assert (await client.get(f"{server.url}/healthz")).json() == {"status": "ok"}
    assert (await client.get(f"{server.url}/nope")).status_code == 404
    r = await client.put(f"{server.url}/webhook/evolution")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_inbox_unavailable_is_503_never_200(tmp_path: Path,
                                                  client: httpx.AsyncClient) -> None:
    async with open_pool(f"host={tmp_path} port=5432 user=postgres", 2,
                         connect_timeout_s=1) as pool:
        store = Store(pool, query_timeout_s=1)
        async with trio.open_nursery() as nursery:
            srv = await _start(nursery, store, WebhookConfig(port=0, app_secret=SECRET),
                               seed=False)
            raw = cloud_body()
            r = await client.post(f"{srv.url}/webhook/cloud-api", content=raw,
                                  headers=signed(raw))
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5"
            assert srv.accepted == []
            nursery.cancel_scope.cancel()


async def test_recorded_intake_replays_unchanged_without_credentials(
    server: Server, client: httpx.AsyncClient, tmp_path: Path,
) -> None:
    raw = cloud_body()
    await client.post(f"{server.url}/webhook/cloud-api", content=raw, headers=signed(raw))
    body = json.loads((FIXTURES / "evolution" / "03_upsert_text_fixture_uppercase_event.json")
                      .read_text())
    body["instance"], body["apikey"] = "loja", APIKEY
    await client.post(f"{server.url}/webhook/evolution", json=body)
    assert server.app.recorder is not None
    server.app.recorder.close()
    [log] = list((tmp_path / "rec").iterdir())
    events = list(read_log(log))
    assert all(isinstance(e, RawEvent) for e in events) and len(events) == 2
    assert [e.format for e in events if isinstance(e, RawEvent)] == ["cloud-api", "evolution"]
    assert APIKEY not in log.read_text() and SECRET not in log.read_text()

