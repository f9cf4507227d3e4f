"""The agents' console: its rules without I/O (table-driven), then its pages and actions on
a real server and database -- sign-in, cross-site refusals, one agent at a time, replies
through the outbox exactly once, notes, the hand-back, and the business phone's own
messages. The browser drives it in tests/test_console_browser.py."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
from conftest import sql
from psycopg.types.json import Jsonb

from pipeline.config import ConsoleConfig, DispatchConfig, InstanceConfig, WebhookConfig
from pipeline.console import auth
from pipeline.console.app import Console
from pipeline.console.queries import ConsoleStore, verdict
from pipeline.console.views import duration, window
from pipeline.intake import LiveIntake, SharedWrites
from pipeline.metrics import Metrics
from pipeline.store import InstanceRow, Store
from pipeline.webhook import WebhookApp, serve
from stages.parse import InstanceDirectory
from stages.records import Receipt

TOKEN = "console-token-for-tests"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)

# --- rules without I/O --------------------------------------------------------------------


@pytest.mark.parametrize(("value", "now", "expected"), [
    ("good", 1000.0, "maria"),
    ("good", 1000.0 + 3599, "maria"),
    ("good", 1000.0 + 3600, None),  # expired
    ("good", 999.0, None),  # issued in the future
    ("other-token", 1000.0, None),
    ("tampered", 1000.0, None),
    ("garbage", 1000.0, None),
])
def test_sessions(value: str, now: float, expected: str | None) -> None:
    good = auth.make_session(TOKEN, "maria", 1000)
    cookie = {"good": good, "other-token": auth.make_session("x" + TOKEN, "maria", 1000),
              "tampered": auth.make_session(TOKEN, "maria", 1000).replace("bWFya", "am9hb"),
              "garbage": "a.b.c"}[value]
    assert TOKEN not in cookie
    assert auth.read_session(TOKEN, cookie, now, 3600) == expected


@pytest.mark.parametrize(("name", "ok"), [
    ("Maria", True), ("José da Silva", True), ("", False), ("   ", False), ("x" * 41, False),
    ("a\nb", False), ("phone", False), ("Phone ", False),
])
def test_names(name: str, ok: bool) -> None:
    assert (auth.name_problem(name) is None) == ok


@pytest.mark.parametrize(("origin", "host", "same"), [
    (None, "127.0.0.1:8080", True),  # not a cross-site browser request
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://evil.example", "127.0.0.1:8080", False),
    ("http://127.0.0.1:9999", "127.0.0.1:8080", False),
    ("null", "127.0.0.1:8080", False),
])
def test_same_origin(origin: str | None, host: str, same: bool) -> None:
    assert auth.same_origin(origin, host) == same


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("10.0.0.1", False),
    ("192.168.1.2", False), (None, False), ("unix-socket", False),
])
def test_local_clients(host: str | None, local: bool) -> None:
    assert auth.local_client(host) == local


@pytest.mark.parametrize(("holder", "agent", "may"), [
    (None, "maria", True), ("maria", "maria", True), ("phone", "maria", True),
    ("joao", "maria", False),
])
def test_who_may_act(holder: str | None, agent: str, may: bool) -> None:
    assert auth.may_act(holder, agent) == may


@pytest.mark.parametrize(("found", "holder", "wrote", "repeated", "result"), [
    (True, None, True, False, "done"),
    (True, "maria", False, True, "already"),  # the same form again, or claimed already
    (False, None, False, True, "already"),  # resolved meanwhile, but this reply was sent
    (False, None, False, False, "not escalated"),
    (True, "joao", False, False, "taken"),
    (True, "maria", False, False, "already"),
])
def test_verdicts(found: bool, holder: str | None, wrote: bool, repeated: bool,
                  result: str) -> None:
    assert verdict(found, holder, wrote, "maria", repeated) == result


@pytest.mark.parametrize(("transport", "age_h", "template", "state", "can_reply"), [
    ("evolution", 30, "", "none", True),
    ("dry", 30, "", "none", True),
    ("cloud-api", 1, "", "open", True),
    ("cloud-api", 25, "follow_up", "closed", True),
    ("cloud-api", 25, "", "closed", False),
    ("cloud-api", None, "", "closed", False),
])
def test_the_24_hour_window(transport: Any, age_h: float | None, template: str, state: str,
                            can_reply: bool) -> None:
    last = None if age_h is None else NOW - dt.timedelta(hours=age_h)
    shown = window(transport, last, NOW, template)
    assert (shown.state, shown.can_reply) == (state, can_reply)
    if state == "closed" and template:
        assert template in shown.text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (59, "59 s"), (60, "1 min"), (3599, "59 min"), (3660, "1 h 1 min"),
    (90000, "1 d 1 h"), (-5, "0 s")])
def test_durations(seconds: int, text: str) -> None:
    assert duration(dt.timedelta(seconds=seconds)) == text


# --- pages and actions on a real server --------------------------------------------------

INSTANCES = {"loja": InstanceConfig(name="loja", transport="evolution",
                                    base_url="http://127.0.0.1:9"),
             "demo": InstanceConfig(name="demo", phone_number_id="1122334455667",
                                    transport="cloud-api", base_url="http://127.0.0.1:9",
                                    template="follow_up")}


@attrs.frozen
class Site:
    url: str
    conninfo: str
    queued: list[int]


@pytest.fixture
async def site(store: Store, conninfo: str) -> AsyncIterator[Site]:
    await store.seed_instances([InstanceRow("demo", "1122334455667", "Teste", {}),
                                InstanceRow("loja", "", "loja", {})])
    queued: list[int] = []
    console = Console(ConsoleConfig(token=TOKEN), ConsoleStore(store.pool, 5.0), INSTANCES,
                      DispatchConfig(), queued=lambda: queued.append(1))
    writes = SharedWrites(store)
    app = WebhookApp(WebhookConfig(port=0),
                     LiveIntake(store, InstanceDirectory({}, {}), writes),
                     _nothing, Metrics().stage("webhook"), console=console)
    async with trio.open_nursery() as nursery:
        await nursery.start(writes.run)
        url = await nursery.start(partial(serve, app, "127.0.0.1", 0, grace_s=1,
                                          stopping=trio.Event()))
        yield Site(url, conninfo, queued)
        nursery.cancel_scope.cancel()


async def _nothing(_accepted: object) -> None:
    pass


def escalated(db: str, sender: str, *, instance: str = "loja", name: str | None = None,
              text: str = "quero falar com um atendente", hours_ago: float = 0.0) -> int:
    """A conversation handed over as a turn would leave it: the user's message, the hand-over
    message with its outbox row, and the open escalation."""
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_ago)
    [(conv,)] = sql(db, "INSERT INTO conversations (instance, sender, sender_name,"
                        " last_message_at) VALUES (%s, %s, %s, %s) RETURNING id",
                    (instance, sender, name, at))
    sql(db, "INSERT INTO messages (conversation_id, instance, message_id, role, body, turn_id,"
            " sent_at) VALUES (%s, %s, %s, 'user', %s, %s, %s)",
        (conv, instance, f"in-{sender}", text, f"t-{sender}", at))
    sql(db, "INSERT INTO messages (conversation_id, instance, message_id, role, body, turn_id)"
            " VALUES (%s, %s, %s, 'assistant', 'Um atendente já vem.', %s)",
        (conv, instance, f"t-{sender}:reply", f"t-{sender}"))
    sql(db, "INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target,"
            " payload, status, delivered_at) VALUES (%s, 'handover', %s, %s, %s, %s,"
            " 'delivered', now())",
        (f"t-{sender}:handover", instance, conv, sender,
         Jsonb({"to": sender, "text": "Um atendente já vem."})))
    sql(db, "INSERT INTO escalations (conversation_id, reason, turn_id, created_at) SELECT"
            " %s, 'keyword: atendente', %s, sent_at FROM messages WHERE message_id = %s",
        (conv, f"t-{sender}", f"t-{sender}:reply"))  # one commit: the same now()
    assert isinstance(conv, int)
    return conv


async def sign_in(url: str, name: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=url)
    r = await client.post("/console/login", data={"name": name, "token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/console/queue"
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
    return client


def form_values(page: str, action: str) -> dict[str, str]:
    """The hidden fields of the form posting to ``action`` on ``page``."""
    form = re.search(rf'<form method="post" action="[^"]*/{action}"[^>]*>(.*?)</form>', page,
                     re.S)
    assert form, f"no {action} form on the page"
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form.group(1)))


async def page(client: httpx.AsyncClient, conv: int) -> str:
    r = await client.get(f"/console/conversations/{conv}")
    assert r.status_code == 200, r.text
    return r.text


async def act(client: httpx.AsyncClient, conv: int, action: str,
              **extra: str) -> httpx.Response:
    values = form_values(await page(client, conv), action)
    return await client.post(f"/console/conversations/{conv}/{action}", data=values | extra)


async def stale(client: httpx.AsyncClient, conv: int, action: str,
                **extra: str) -> httpx.Response:
    """Post ``action`` although the page shows no such form (a page left open meanwhile)."""
    csrf = form_values(await page(client, conv), "note")["csrf"]
    return await client.post(f"/console/conversations/{conv}/{action}",
                             data={"csrf": csrf, "key": "e" * 32} | extra)


def notice(r: httpx.Response) -> str:
    assert r.status_code == 303, r.text
    return str(r.headers["location"]).rsplit("notice=", 1)[-1].replace("%3A", ":") \
        .replace("%20", " ")


async def test_sign_in_is_required_and_checked(site: Site) -> None:
    async with httpx.AsyncClient(base_url=site.url) as anon:
        r = await anon.get("/console/queue")
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert (await anon.get("/console/queue", headers={"accept": "application/json"})
                ).status_code == 401
        login = await anon.get("/console/login")
        assert login.status_code == 200 and 'type="password"' in login.text
        assert "default-src 'self'" in login.headers["content-security-policy"]
        wrong = await anon.post("/console/login", data={"name": "maria", "token": "nope"})
        assert wrong.status_code == 401 and "not the console" in wrong.text
        noname = await anon.post("/console/login", data={"name": "", "token": TOKEN})
        assert noname.status_code == 400
    async with httpx.AsyncClient(base_url=site.url, cookies={
            auth.COOKIE: auth.make_session("guessed", "maria", 2_000_000_000)}) as forged:
        assert (await forged.get("/console/queue")).status_code == 303
    async with httpx.AsyncClient(base_url=site.url) as anon:
        static = await anon.get("/console/static/htmx.min.js")  # no secret in it
        assert static.status_code == 200 and "htmx" in static.text[:2000]
    async with aclosing(await sign_in(site.url, "maria")) as agent:
        assert (await agent.get("/console/queue")).status_code == 200
        out = await agent.post("/console/logout", data={
            "csrf": auth.csrf_value(TOKEN, agent.cookies[auth.COOKIE])})
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]


async def test_the_queue_oldest_first_with_who_and_the_window(site: Site) -> None:
    db = site.conninfo
    first = escalated(db, "5511900000001", name="Ana", hours_ago=2)
    escalated(db, "5511900000002", instance="demo", hours_ago=30)
    sql(db, "UPDATE escalations SET created_at = now() - interval '2 hours' WHERE"
            " conversation_id = %s", (first,))
    async with aclosing(await sign_in(site.url, "maria")) as agent:
        html = (await agent.get("/console/queue")).text
        assert html.index("Ana") < html.index("5511900000002")
        assert "2 h 0 min" in html and "keyword: atendente" in html
        assert "closed 6 h 0 min ago: a reply goes out as the template" in html
        assert 'hx-trigger="every 5.0s"' in html
        rows = (await agent.get("/console/queue?part=rows")).text
        assert "<html" not in rows and "Ana" in rows
    async with httpx.AsyncClient(base_url=site.url,
                                 headers={"authorization": f"Bearer {TOKEN}",
                                          "accept": "application/json"}) as script:
        listed = (await script.get("/console/queue")).json()["open"]
        assert [w["sender"] for w in listed] == ["5511900000001", "5511900000002"]
        assert [w["window"] for w in listed] == ["none", "closed"]


async def test_history_shows_everything_in_order_and_text_as_text(site: Site) -> None:
    db = site.conninfo
    conv = escalated(db, "5511900000003", text="<script>alert('x')</script> oi")
    async with aclosing(await sign_in(site.url, "maria")) as agent:
        html = await page(agent, conv)
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; oi" in html
        history = html[html.index('<ol id="history"'):]
        assert history.index("&lt;script&gt;") < history.index("handed to a human") \
            < history.index("hand-over message")
        assert "delivered" in html


async def test_claim_reply_note_resolve(site: Site) -> None:
    db = site.conninfo
    conv = escalated(db, "5511900000004")
    async with aclosing(await sign_in(site.url, "maria")) as maria, \
            aclosing(await sign_in(site.url, "joao")) as joao:
        assert notice(await act(maria, conv, "claim")) == "claim:done"
        plain = {"csrf": form_values(await page(joao, conv), "claim")["csrf"]}
        taken = await joao.post(f"/console/conversations/{conv}/claim", data=plain)
        assert notice(taken) == "claim:taken"  # without take_over
        assert "Take over from maria" in await page(joao, conv)
        assert f'action="/console/conversations/{conv}/reply"' not in await page(joao, conv)
        reply = form_values(await page(maria, conv), "reply")
        sent = await maria.post(f"/console/conversations/{conv}/reply",
                                data=reply | {"text": "Olá, sou a Maria."})
        assert notice(sent) == "reply:done"
        again = await maria.post(f"/console/conversations/{conv}/reply",
                                 data=reply | {"text": "Olá, sou a Maria."})
        assert notice(again) == "reply:already"  # a resubmitted form sends nothing twice
        assert sql(db, "SELECT kind, target, payload ->> 'text', status FROM outbox WHERE"
                       " idempotency_key LIKE 'console:%'") == [
            ("reply", "5511900000004", "Olá, sou a Maria.", "pending")]
        assert site.queued == [1]
        assert notice(await stale(joao, conv, "reply", text="eu também")) == "reply:taken"
        assert notice(await act(joao, conv, "note", text="cliente VIP")) == "note:done"
        assert notice(await act(maria, conv, "note", text="   ")) == "note:empty"
        assert notice(await stale(joao, conv, "resolve")) == "resolve:taken"
        html = await page(maria, conv)
        assert html.index("Olá, sou a Maria.") < html.index("cliente VIP")
        assert "private note · joao" in html and "pending" in html
        done = await act(maria, conv, "resolve")
        assert done.status_code == 303 and done.headers["location"] == "/console/queue"
        assert sql(db, "SELECT status, resolved_by, claimed_by FROM escalations") == [
            ("resolved", "maria", "maria")]
        assert "The assistant has this conversation." in await page(maria, conv)
        assert notice(await act(maria, conv, "note", text="depois")) == "note:done"
        late = await maria.post(f"/console/conversations/{conv}/reply",
                                data=reply | {"text": "x", "key": "f" * 32})
        assert notice(late) == "reply:not escalated"
    # the agent's reply is in the assistant's history; the notes are not
    [(history,)] = sql(db, "SELECT string_agg(role || ': ' || body, ' | ' ORDER BY id) FROM"
                           " messages WHERE conversation_id = %s", (conv,))
    assert "human: Olá, sou a Maria." in history and "VIP" not in history


async def test_take_over_and_the_phone_holder(site: Site) -> None:
    db = site.conninfo
    conv = escalated(db, "5511900000005")
    sql(db, "UPDATE escalations SET claimed_by = 'phone'")
    async with aclosing(await sign_in(site.url, "maria")) as maria, \
            aclosing(await sign_in(site.url, "joao")) as joao:
        assert notice(await act(maria, conv, "reply", text="assumo daqui")) == "reply:done"
        assert sql(db, "SELECT claimed_by FROM escalations") == [("maria",)]
        assert notice(await act(joao, conv, "claim", take_over="1")) == "claim:done"
        assert sql(db, "SELECT claimed_by FROM escalations") == [("joao",)]


async def test_forms_from_elsewhere_are_refused(site: Site) -> None:
    conv = escalated(site.conninfo, "5511900000006")
    async with aclosing(await sign_in(site.url, "maria")) as maria:
        good = form_values(await page(maria, conv), "claim")
        no_csrf = await maria.post(f"/console/conversations/{conv}/claim", data={})
        assert no_csrf.status_code == 403
        other = auth.csrf_value(TOKEN, auth.make_session(TOKEN, "joao", 1))
        wrong = await maria.post(f"/console/conversations/{conv}/claim", data={"csrf": other})
        assert wrong.status_code == 403
        cross = await maria.post(f"/console/conversations/{conv}/claim", data=good,
                                 headers={"origin": "http://evil.example"})
        assert cross.status_code == 403
    assert sql(site.conninfo, "SELECT claimed_by FROM escalations") == [(None,)]


async def test_scripts_use_the_bearer_token(site: Site) -> None:
    conv = escalated(site.conninfo, "5511900000007")
    async with httpx.AsyncClient(base_url=site.url) as script:
        bad = await script.post(f"/console/conversations/{conv}/claim",
                                headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401
        headers = {"authorization": f"Bearer {TOKEN}", "x-console-agent": "crm-bot"}
        r = await script.post(f"/console/conversations/{conv}/reply", data={"text": "oi"},
                              headers=headers)
        assert r.status_code == 200 and r.json()["result"] == "done"
        shown = (await script.get(f"/console/conversations/{conv}",
                                  headers=headers | {"accept": "application/json"})).json()
        assert shown["escalation"]["claimed_by"] == "crm-bot"
        assert [e["kind"] for e in shown["history"]] == ["user", "opened", "handover", "human"]
        assert shown["history"][-1]["author"] == "crm-bot"


async def test_agents_racing_for_one_conversation_get_one_claim_and_one_reply_each_key(
        site: Site) -> None:
    db = site.conninfo
    conv = escalated(db, "5511900000008")
    agents = [await sign_in(site.url, f"agent{i}") for i in range(6)]
    forms = [form_values(await page(a, conv), "reply") for a in agents]
    results: list[str] = []

    async def claim_and_reply(client: httpx.AsyncClient, form: dict[str, str]) -> None:
        for _ in range(2):  # a double click
            r = await client.post(f"/console/conversations/{conv}/reply",
                                  data=form | {"text": "sou eu"})
            results.append(notice(r))

    async with trio.open_nursery() as nursery:
        for client, form in zip(agents, forms, strict=True):
            nursery.start_soon(claim_and_reply, client, form)
    for client in agents:
        await client.aclose()
    assert sorted(results).count("reply:done") == 1
    assert sorted(results).count("reply:already") == 1
    assert sorted(results).count("reply:taken") == 10
    [(winner,)] = sql(db, "SELECT claimed_by FROM escalations")
    assert sql(db, "SELECT author FROM messages WHERE role = 'human'") == [(winner,)]
    assert sql(db, "SELECT count(*) FROM outbox WHERE idempotency_key LIKE 'console:%'") == [
        (1,)]


async def test_the_console_is_off_without_a_token_and_local_only(store: Store) -> None:
    def scope(client: str) -> dict[str, Any]:
        return {"type": "http", "method": "GET", "path": "/console/queue", "query_string": b"",
                "headers": [], "client": (client, 5000)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    off = Console(ConsoleConfig(), ConsoleStore(store.pool, 5.0), {}, DispatchConfig())
    assert (await off(scope("127.0.0.1"), receive)).status == 404
    on = Console(ConsoleConfig(token=TOKEN), ConsoleStore(store.pool, 5.0), {},
                 DispatchConfig())
    assert (await on(scope("10.1.2.3"), receive)).status == 403
    assert (await on(scope("127.0.0.1"), receive)).status == 303  # to the sign-in
    remote = Console(ConsoleConfig(token=TOKEN, allow_remote=True),
                     ConsoleStore(store.pool, 5.0), {}, DispatchConfig())
    assert (await remote(scope("10.1.2.3"), receive)).status == 303


# --- the business phone's own messages ----------------------------------------------------


def echo(text: str, number: str, pid: str) -> Receipt:
    return Receipt("loja", pid, "sent", number=number, text=text)


async def test_a_message_typed_on_the_business_phone_hands_the_conversation_over(
        store: Store, conninfo: str) -> None:
    await store.seed_instances([InstanceRow("loja", "", "loja", {})])
    [(conv,)] = sql(conninfo, "INSERT INTO conversations (instance, sender) VALUES"
                              " ('loja', '5511977') RETURNING id")
    sql(conninfo, "INSERT INTO outbox (idempotency_key, kind, instance, conversation_id,"
                  " target, payload, status) VALUES ('t1:reply', 'reply', 'loja', %s,"
                  " '5511977', %s, 'delivered')",
        (conv, Jsonb({"to": "5511977", "text": "resposta do assistente"})))
    # the echo of our own reply (its answer gave no id): not a person
    await store.record_receipts([echo("resposta do assistente", "5511977", "E1")], "hold")
    assert sql(conninfo, "SELECT count(*) FROM escalations") == [(0,)]
    # typed on the phone: in the history, and the assistant stays silent
    await store.record_receipts([echo("Oi, aqui é o dono da loja", "5511977", "E2")], "hold")
    await store.record_receipts([echo("Oi, aqui é o dono da loja", "5511977", "E2")], "hold")
    assert sql(conninfo, "SELECT role, author, body FROM messages") == [
        ("human", "phone", "Oi, aqui é o dono da loja")]
    assert sql(conninfo, "SELECT reason, claimed_by, status FROM escalations") == [
        ("answered from the business phone", "phone", "open")]
    # once resolved, a redelivered echo does not hand it over again
    sql(conninfo, "UPDATE escalations SET status = 'resolved', resolved_at = now()")
    await store.record_receipts([echo("Oi, aqui é o dono da loja", "5511977", "E2")], "hold")
    assert sql(conninfo, "SELECT count(*) FROM escalations WHERE status = 'open'") == [(0,)]
    # with hold_on_phone_reply = false the message is kept, the assistant goes on
    await store.record_receipts([echo("outra coisa", "5511977", "E3")], "record")
    assert sql(conninfo, "SELECT count(*) FROM escalations WHERE status = 'open'") == [(0,)]
    assert sql(conninfo, "SELECT count(*) FROM messages WHERE author = 'phone'") == [(2,)]
    # a replay's recorded echoes are the original run's sends: not a person on the phone
    await store.record_receipts([echo("de um replay", "5511977", "E4")], "off")
    assert sql(conninfo, "SELECT count(*) FROM messages WHERE author = 'phone'") == [(2,)]
    assert sql(conninfo, "SELECT count(*) FROM escalations WHERE status = 'open'") == [(0,)]
