"""The 24-hour window, throughput and per-user pacing of sends (pure rules, then the delivery
task against a local fake Cloud API)."""

from __future__ import annotations

import itertools
import json

import attrs
import pytest
import test_delivery
from conftest import sql
from test_delivery import Receiver, Reply, add_row, conversation, delivering, make_config
from test_faults import until

from pipeline.config import Channel, InstanceConfig
from pipeline.outbox import OutboxRow, OutboxStore
from pipeline.pacing import Pacer
from pipeline.transports import classify, window

receiver = test_delivery.receiver  # the fixtures of the delivery tests
outbox = test_delivery.outbox
HOUR = 3600.0


def test_pacer_spaces_a_number_and_a_recipient() -> None:
    pacer = Pacer(per_s=10, gap_s=1.0)
    assert pacer.reserve("demo", "a", 0.0) == 0.0
    assert pacer.reserve("demo", "b", 0.0) == pytest.approx(0.1)  # the number's rate
    assert pacer.reserve("demo", "a", 0.0) == pytest.approx(1.0)  # the user's gap
    assert pacer.reserve("loja", "a", 0.0) == 0.0  # another number, its own budget
    assert pacer.reserve("demo", "c", 5.0) == 5.0  # time has passed: at once


ROW = OutboxRow(1, "t1:reply", "reply", "acme", 1, "5511", {"text": "hi"}, 0)
CLOUD = Channel("cloud-api", "http://127.0.0.1:1", "k")


@pytest.mark.parametrize(("kind", "transport", "age_h", "template", "expected"), [
    ("reply", "cloud-api", 1, "", "free-form"),
    ("reply", "cloud-api", None, "", "free-form"),  # no inbound known: as before
    ("reply", "cloud-api", 25, "", "refused"),
    ("handover", "cloud-api", 25, "back_soon", "template"),
    ("reply", "evolution", 25, "", "free-form"),  # WhatsApp Web has no window
    ("webhook", "cloud-api", 25, "", "free-form"),  # the customer's endpoint, not WhatsApp
])
def test_the_24_hour_window(kind: str, transport: str, age_h: float | None, template: str,
                            expected: str) -> None:
    row = attrs.evolve(ROW, kind=kind, inbound_age_s=None if age_h is None else age_h * HOUR)
    instance = InstanceConfig(name="acme", phone_number_id="11", template=template)
    assert window(row, attrs.evolve(CLOUD, transport=transport), instance) == expected


@pytest.mark.parametrize(("status", "body", "verdict"), [
    (400, '{"error": {"code": 130429, "message": "rate limit hit"}}', "retry"),
    (400, '{"error": {"code": 131056, "message": "pair rate limit"}}', "retry"),
    (400, '{"error": {"code": 100, "message": "invalid parameter"}}', "final"),
    (429, "", "retry"),
])
def test_throttling_answers_are_retried(status: int, body: str, verdict: str) -> None:
    assert classify(status, {}, body, 60.0).verdict == verdict


async def test_outside_the_window_a_template_or_a_dead_letter_saying_why(
        receiver: Receiver, outbox: OutboxStore, conninfo: str) -> None:
    late = conversation(conninfo, "5511")
    sql(conninfo, "UPDATE conversations SET last_message_at = now() - interval '25 hours'")
    add_row(conninfo, "t1:reply", late, "5511")
    cfg = make_config(f"{receiver.url}/v21.0", transport="cloud-api")
    async with delivering(cfg, outbox) as run:
        await until(lambda: run.stats.dead == 1, 10, "refused")
    assert receiver.hits == []
    [(reason,)] = sql(conninfo, "SELECT reason FROM dead_letters")
    assert reason.startswith("refused at attempt 1: outside the 24-hour window: the user last "
                             "wrote 25.0 h ago and [[instances]] acme has no template")
    with_template = attrs.evolve(cfg, instances=(attrs.evolve(
        cfg.instances[0], template="we_are_back", template_language="pt_BR"),))
    add_row(conninfo, "t2:reply", late, "5511")
    async with delivering(with_template, outbox) as run:
        await until(lambda: run.stats.delivered == 1, 10, "template sent")
    (hit,) = receiver.hits
    body = json.loads(hit.body)
    assert body["type"] == "template" and "text" not in body
    assert body["template"] == {"name": "we_are_back", "language": {"code": "pt_BR"}}


async def test_sends_to_one_user_are_paced(receiver: Receiver, outbox: OutboxStore,
                                           conninfo: str) -> None:
    conv = conversation(conninfo, "5511")
    for n in range(3):
        add_row(conninfo, f"t{n}:reply", conv, "5511")
    receiver.default = Reply(201)
    async with delivering(make_config(receiver.url, per_recipient_gap_s=0.3), outbox) as run:
        await until(lambda: run.stats.delivered == 3, 10, "delivered")
    times = [h.at for h in receiver.hits]
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(times)), times
