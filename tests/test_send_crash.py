"""No doubled send after a crash: ``pipeline run`` SIGKILLed at random points while a client
posts traffic and the replies go to local fakes of both channels -- the Cloud API number
(``demo``) and the Evolution instance (``loja``) -- that echo what they send as the real ones
do: Evolution a ``fromMe`` ``messages.upsert`` webhook, the Cloud API a ``sent`` status
carrying our ``biz_opaque_callback_data``; each retried until the pipeline answers, as both
providers retry webhooks. Counted where they land: the sends the fakes received equal the
delivered outbox rows, message for message, in every run."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from asgi import read_request
from test_faults import (
    APP_SECRET,
    Client,
    Server,
    _reached,
    all_processed,
    base_values,
    config_text,
    default_directory,
    drop_database,
    fresh_database,
    sample_posts,
    serve_receiver,
    sql,
    traffic,
    until,
    write_config,
)

from pipeline.pgcluster import Cluster


@attrs.define
class EchoingChannels:
    """Evolution's ``sendText`` and the Cloud API's ``messages``, each echoing what it sends
    to the pipeline's webhook (``url()``: None while the pipeline is down), retrying until it
    is answered 200."""

    url: Callable[[], str | None]
    rng: random.Random
    sends: list[tuple[str, str]] = attrs.Factory(list)  # (number, text) as received
    echoes_lost: int = 0
    per_channel: Counter[str] = attrs.Factory(Counter)
    nursery: trio.Nursery | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = await read_request(scope, receive, send)
        if raw is None:
            return
        data = json.loads(raw)
        message_id = f"out-{len(self.sends) + 1}"
        assert self.nursery is not None
        if scope["path"].startswith("/message/sendText/"):  # Evolution
            number, text = data["number"], data["text"]
            instance = scope["path"].rsplit("/", 1)[-1]
            echo = ("evolution", {"event": "messages.upsert", "instance": instance, "data": {
                "key": {"remoteJid": number if "@" in number else f"{number}@s.whatsapp.net",
                        "fromMe": True, "id": message_id},
                "message": {"conversation": text}, "messageType": "conversation",
                "messageTimestamp": int(time.time())}})
            answer: dict[str, Any] = {"key": {"id": message_id}}
        else:  # Cloud API: /v21.0/<phone_number_id>/messages
            number, text = data["to"], data["text"]["body"]
            phone_number_id = scope["path"].split("/")[-2]
            echo = ("cloud-api", {"object": "whatsapp_business_account", "entry": [{
                "id": "1", "changes": [{"field": "messages", "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "1",
                                 "phone_number_id": phone_number_id},
                    "statuses": [{"id": message_id, "status": "sent",
                                  "timestamp": str(int(time.time())), "recipient_id": number,
                                  "biz_opaque_callback_data": data[
                                      "biz_opaque_callback_data"]}]}}]}]})
            answer = {"messaging_product": "whatsapp", "messages": [{"id": message_id}]}
        self.sends.append((number, text))
        self.per_channel[echo[0]] += 1
        self.nursery.start_soon(self._echo, *echo)
        await trio.sleep(self.rng.uniform(0, 0.15))  # the answer takes a while: kills land
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    async def _echo(self, fmt: str, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        digest = hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
        headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
        await trio.sleep(self.rng.uniform(0, 0.3))
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = trio.current_time() + 90
            while trio.current_time() < deadline:
                url = self.url()
                if url is not None:
                    try:
                        got = await http.post(f"{url}/webhook/{fmt}", content=raw,
                                              headers=headers)
                        if got.status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                await trio.sleep(0.2)
        self.echoes_lost += 1


@attrs.frozen
class SendCrashResult:
    sends: Counter[tuple[str, str]]
    delivered: Counter[tuple[str, str]]
    other_rows: dict[str, int]  # outbox rows to users not delivered, by status
    per_channel: Counter[str]  # sends received by each fake API
    kills: int
    echoes_lost: int
    reconciled: int  # "echoed the send in doubt" lines in the logs
    resent: int  # "sending it again" lines


async def send_crash_scenario(cluster: Cluster, dbname: str, workdir: Path, seed: int, *,
                              kills: int = 3, messages: int = 150) -> SendCrashResult:
    rng = random.Random(seed)
    conninfo = cluster.conninfo(dbname)
    directory = default_directory()
    posts = sample_posts(directory) + traffic(rng, directory, messages=messages, senders=30,
                                              tag=f"sendcrash{seed}")
    marks = sorted(rng.sample(range(20, len(posts) - 10), kills))
    server: Server | None = None
    fake = EchoingChannels(lambda: server.url if server is not None else None, rng)
    async with trio.open_nursery() as services:
        fake.nursery = services
        base = await services.start(serve_receiver, fake)
        text = config_text(base_values(conninfo, dispatch={
            "reconcile_s": 3.0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0,
            "poll_interval_s": 0.1}), instances=(
            # each number its own channel: demo on the Cloud API, loja on Evolution
            f'[[instances]]\nname = "demo"\nphone_number_id = "1122334455667"\n'
            f'evolution_instance = "demo"\ntransport = "cloud-api"\n'
            f'base_url = "{base}/v21.0"\napi_key = "cloud-token"\n\n'
            f'[[instances]]\nname = "loja"\nevolution_instance = "loja"\n'
            f'transport = "evolution"\nbase_url = "{base}"\napi_key = "evo-key"\n'))
        server = Server(write_config(workdir, text), workdir)
        client = Client(server)
        try:
            await server.start()
            async with trio.open_nursery() as nursery:
                async def killer() -> None:
                    assert server is not None
                    for mark in marks:
                        await until(partial(_reached, client, mark), 120, "progress",
                                    every_s=0.005)
                        await trio.sleep(rng.uniform(0, 0.4))
                        server.kill()
                        await trio.sleep(rng.uniform(0, 0.5))
                        await server.start()

                nursery.start_soon(killer)
                with trio.fail_after(180):
                    await client.post_all(posts, workers=6)
            await until(all_processed(conninfo, client.acked), 60, "every message processed")

            def settled() -> bool:
                return not sql(conninfo, "SELECT 1 FROM outbox WHERE status = 'pending'"
                                         " AND kind <> 'webhook' LIMIT 1")

            await until(settled, 90, "every reply delivered")
            await server.terminate(timeout_s=60)
        finally:
            server.kill()
            services.cancel_scope.cancel()
    delivered = Counter((str(t), str(x)) for t, x in sql(
        conninfo, "SELECT target, payload ->> 'text' FROM outbox"
                  " WHERE status = 'delivered' AND kind <> 'webhook'"))
    others = dict(sql(conninfo, "SELECT status, count(*) FROM outbox WHERE kind <> 'webhook'"
                                " AND status <> 'delivered' GROUP BY status"))
    log = server.log_text()
    for number, text in (Counter(fake.sends) - delivered):
        print("doubled:", number, text[:40], sql(
            conninfo, "SELECT idempotency_key, kind, status, provider_id, receipt, attempts"
                      " FROM outbox WHERE target = %s ORDER BY id", (number,)))
    return SendCrashResult(Counter(fake.sends), delivered, others, fake.per_channel, kills,
                           fake.echoes_lost,
                           log.count("echoed the send in doubt"),
                           log.count("sending it again"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_between_send_and_record_sends_nothing_twice(cluster: Cluster, tmp_path: Path,
                                                             seed: int) -> None:
    dbname = fresh_database(cluster, "sendcrash")
    try:
        result = trio.run(send_crash_scenario, cluster, dbname, tmp_path, seed)
    finally:
        drop_database(cluster, dbname)
    print(f"seed {seed}: sends={sum(result.sends.values())} "
          f"delivered rows={sum(result.delivered.values())} reconciled={result.reconciled} "
          f"resent={result.resent} echoes lost={result.echoes_lost} other={result.other_rows} "
          f"per channel={dict(result.per_channel)}")
    print("sent, not delivered:", result.sends - result.delivered,
          "delivered, not sent:", result.delivered - result.sends)
    assert result.other_rows == {}
    assert result.per_channel["cloud-api"] > 10 and result.per_channel["evolution"] > 10
    assert sum(result.delivered.values()) > 30
    assert result.sends == result.delivered  # message for message: none twice, none lost
