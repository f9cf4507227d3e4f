"""The console in a real browser: headless Chromium (Debian's, through its ChromeDriver)
drives ``pipeline run`` -- a real process, its replies going to a local fake Evolution API --
through the whole hand-off: sign in, find the escalated customer in the queue, read the
history (a ``<script>`` sent by the customer shows as text), claim, reply (the reply reaches
the fake channel), add a private note, resolve, and see the customer's next message answered
by the assistant again. Screenshots of the queue and the conversation go to ``docs/`` when
``CONSOLE_SCREENSHOTS=1`` (that is how the README's pictures were made)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from asgi import read_request
from conftest import sql
from test_faults import ROOT, Server, base_values, config_text, evolution_body, until, write_config

from pipeline.pgcluster import Cluster

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TOKEN = "browser-test-console-token"
CUSTOMER = "5511988887777"
SCRIPT_TEXT = "<script>document.title='pwned'</script> quero falar com um atendente"
AGENT_REPLY = "Olá! Aqui é a Ana, da loja. Já vejo o seu pedido."


class FakeEvolution:
    """Evolution's ``sendText``: records (number, text) and answers with a message id."""

    def __init__(self) -> None:
        self.sends: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = await read_request(scope, receive, send)
        if raw is None:
            return
        data = json.loads(raw)
        self.sends.append((data["number"], data["text"]))
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body",
                    "body": json.dumps({"key": {"id": f"out-{len(self.sends)}"}}).encode()})

    def texts(self) -> list[str]:
        return [text for number, text in self.sends if number == CUSTOMER]


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium is not installed (Debian packages chromium and "
                    "chromium-driver; scripts/setup-env installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="console-browser-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str,
             timeout_s: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        condition, message=f"waited {timeout_s} s for {what}")


def screenshot(driver: Any, name: str) -> None:
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        driver.save_screenshot(str(ROOT / "docs" / name))


def sign_in_and_find_the_customer(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/console/queue")  # not signed in: sent to the sign-in page
    wait_for(driver, lambda d: "/console/login" in d.current_url, "the sign-in page")
    driver.find_element(By.NAME, "name").send_keys("Ana")
    driver.find_element(By.NAME, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(driver, lambda d: d.current_url.endswith("/console/queue"), "the queue")
    # htmx came from the package and runs under the page's Content-Security-Policy
    assert driver.execute_script("return typeof htmx") == "object"
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    row = wait_for(driver, lambda d: d.find_elements(By.LINK_TEXT, f"Cliente {CUSTOMER[-4:]}"),
                   "the escalated customer in the queue")
    page = driver.find_element(By.TAG_NAME, "body").text
    assert "explicit request: falar com um atendente" in page
    assert "no 24-hour window (evolution" in page
    screenshot(driver, "console-queue.png")
    row[0].click()
    wait_for(driver, lambda d: "/console/conversations/" in d.current_url, "the conversation")
    history = wait_for(driver, lambda d: d.find_element(By.ID, "history").text,
                       "the history")
    assert "<script>document.title='pwned'</script>" in history  # shown as text
    assert driver.title != "pwned"
    assert "A human agent will continue this conversation shortly." in history
    assert "handed to a human" in history


def claim_and_reply(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.NAME, "claim").click()
    wait_for(driver, lambda d: "You have this conversation now." in d.page_source, "the claim")
    driver.find_element(By.CSS_SELECTOR, "form.reply textarea").send_keys(AGENT_REPLY)
    driver.find_element(By.NAME, "send").click()
    wait_for(driver, lambda d: "Reply queued" in d.page_source, "the reply queued")


def note_and_resolve(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    wait_for(driver, lambda d: "delivered" in d.find_element(By.ID, "history").text,
             "the reply's delivery status (the history refreshes itself)")
    driver.find_element(By.CSS_SELECTOR, "form.note textarea").send_keys(
        "Cliente pediu retorno amanhã cedo.")
    driver.find_element(By.NAME, "add_note").click()
    wait_for(driver, lambda d: "Note added" in d.page_source, "the note")
    history = driver.find_element(By.ID, "history").text
    assert AGENT_REPLY in history and "private note · Ana" in history
    screenshot(driver, "console-conversation.png")
    driver.find_element(By.NAME, "resolve").click()
    wait_for(driver, lambda d: d.current_url.endswith("/console/queue"), "back in the queue")
    wait_for(driver, lambda d: "Nobody is waiting" in d.page_source, "an empty queue")


async def test_an_agent_takes_over_and_hands_back_in_a_real_browser(
        browser: Any, cluster: Cluster, dbname: str, tmp_path: Path) -> None:
    conninfo = cluster.conninfo(dbname)
    channel = FakeEvolution()
    async with trio.open_nursery() as nursery:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve

        hc = HypercornConfig()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = hc.errorlog = None
        [fake] = await nursery.start(partial(serve, channel, hc))
        values = base_values(conninfo, console={"token": TOKEN, "refresh_s": 1.0})
        instance = (f'[[instances]]\nname = "loja"\nevolution_instance = "loja"\n'
                    f'transport = "evolution"\nbase_url = "{fake}"\napi_key = "k"\n')
        server = Server(write_config(tmp_path, config_text(values, instance)), tmp_path)
        url = await server.start()
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                async def customer(message_id: str, text: str) -> None:
                    r = await client.post("/webhook/evolution",
                                          json=evolution_body("loja", CUSTOMER, message_id, text))
                    assert r.status_code == 200, r.text

                await customer("IN-1", SCRIPT_TEXT)
                await until(lambda: len(channel.texts()) == 1, 30, "the hand-over message sent")
                await trio.to_thread.run_sync(sign_in_and_find_the_customer, browser, url)
                await trio.to_thread.run_sync(claim_and_reply, browser)
                await until(lambda: AGENT_REPLY in channel.texts(), 30,
                            "the agent's reply at the channel")
                await trio.to_thread.run_sync(note_and_resolve, browser)
                assert sql(conninfo, "SELECT status, resolved_by FROM escalations") == [
                    ("resolved", "Ana")]
                await customer("IN-2", "qual o horário de vocês?")
                await until(lambda: len(channel.texts()) == 3, 30, "the assistant's answer")
        finally:
            await server.terminate(30)
        nursery.cancel_scope.cancel()
    assert channel.texts() == ["A human agent will continue this conversation shortly.",
                               AGENT_REPLY, "Funcionamos de segunda a sexta, das 9h às 18h."]
    assert sql(conninfo, "SELECT message_id, action FROM inbox ORDER BY id") == [
        ("IN-1", "escalated"), ("IN-2", "replied")]
    assert sql(conninfo, "SELECT author, body FROM notes") == [
        ("Ana", "Cliente pediu retorno amanhã cedo.")]
