"""The webhook parsers: every real fixture, every Invalid path, and fuzzing that never raises."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.parse import (
    BodyError,
    InstanceDirectory,
    check_body,
    decode_body,
    parse_event,
)
from stages.records import Ignored, InboundMessage, Invalid, RawEvent, Receipt

FIXTURES = Path(__file__).parent / "fixtures"
RECEIVED = dt.datetime(2025, 8, 31, 10, 15, 2, 123000, tzinfo=dt.UTC)

DIRECTORY = InstanceDirectory(
    by_phone_number_id={"1122334455667": "demo", "27681414235104944": "acme"},
    by_evolution_name={
        "5535********": "clinica",
        "Teste": "teste",
        "test-instance": "test",
        "instance_3_553175564133": "laks",
        "nome-da-instancia": "nome",
        "myinstance": "my",
        "instance_sergio_socket": "sergio",
        "wp_wb": "wpwb",
        "loja-centro": "loja",
    },
)


def load(fmt: str, name: str) -> Any:
    return json.loads((FIXTURES / fmt / name).read_text(encoding="utf-8"))


def parse(fmt: str, body: Any) -> list[Any]:
    event = RawEvent(received_at=RECEIVED, format=fmt, body=body, origin="t.jsonl:7")  # type: ignore[arg-type]
    return parse_event(event, DIRECTORY)


def one(fmt: str, body: Any) -> Any:
    results = parse(fmt, body)
    assert len(results) == 1, results
    return results[0]


def utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


# --- every fixture ------------------------------------------------------------------------

CLOUD_SENDER = "972987654321"
# file -> (kind, text, media_id, reply_to, sent_at)
CLOUD_MESSAGES: dict[str, tuple[str, str, str | None, str | None, int]] = {
    "01_text.json": ("text", "Body Text", None, None, 1697043223),
    "02_image_no_caption.json": ("image", "", "65463453", None, 1697043379),
    "04_video_caption_forwarded.json": ("video", "caption", "765756756", None, 1697044362),
    "05_document_caption.json": ("document", "caption", "1234567890987654321", None, 1697043666),
    "06_audio_file.json": ("audio", "", "1234567890987654321", None, 1697043509),
    "07_voice_note.json": ("audio", "", "1234567890987654321", None, 1697043473),
    "08_reaction.json": ("reaction", "😮", None, "wamid.yzxyzx=", 1697044456),
    "09_reaction_removed_empty_emoji.json": ("reaction", "", None, "wamid.yzxyzx=", 1697044456),
    "10_location_named.json": (
        "location", "Facebook HQ, 1 Hacker Way, Menlo Park, CA 94025", None, None, 1697044557,
    ),
    "11_contacts.json": ("contacts", "Chandler Bing, Monica, Rachel Green", None, None, 1697044621),
    "12_reply_with_context.json": ("text", "replied text", None, "wamid.xyzxyz==", 1697044746),
    "13_interactive_button_reply.json": ("interactive", "title", None, "wamid.xyzxyz", 1698266730),
    "14_interactive_list_reply.json": ("interactive", "title", None, "wamid.xyzxyz", 1698266905),
    "15_template_quick_reply_button.json": ("button", "title", None, "wamid.xyzxyz==", 1698269027),
    "16_unsupported_type.json": ("unsupported", "", None, None, 1697044706),
}
CLOUD_RECEIPTS = {
    "17_status_sent.json": ("receipt: sent", "sent", None),
    "18_status_delivered.json": ("receipt: delivered", "delivered", None),
    "19_status_read.json": ("receipt: read", "read", None),
    "20_status_failed.json": (
        "receipt: failed (130472 (User's number is part of an experiment))", "failed",
        "130472 (User's number is part of an experiment)"),
}


@pytest.mark.parametrize("name", sorted(CLOUD_MESSAGES))
def test_cloud_fixture_messages(name: str) -> None:
    kind, text, media_id, reply_to, sent_at = CLOUD_MESSAGES[name]
    message = one("cloud-api", load("cloud-api", name))
    assert isinstance(message, InboundMessage)
    assert (message.kind, message.text, message.media_id, message.reply_to) == (
        kind, text, media_id, reply_to,
    )
    assert (message.instance, message.sender, message.sender_name) == (
        "demo", CLOUD_SENDER, "Test Name",
    )
    assert message.sent_at == utc(sent_at)
    assert message.received_at == RECEIVED
    assert (message.format, message.origin) == ("cloud-api", "t.jsonl:7")


def test_cloud_fixture_image_with_caption_other_instance() -> None:
    message = one("cloud-api", load("cloud-api", "03_image_with_caption.json"))
    assert message == InboundMessage(
        instance="acme",
        message_id="wamid.HBgLMTYzMTU1NTEyMzQVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
        sender="16315551234", kind="image", text="This is a caption",
        sent_at=utc(1602532300), received_at=RECEIVED, format="cloud-api",
        sender_name="Kerry Fisher", media_id="2754859441498128", origin="t.jsonl:7",
    )


@pytest.mark.parametrize("name", sorted(CLOUD_RECEIPTS))
def test_cloud_fixture_receipts(name: str) -> None:
    reason, status, error = CLOUD_RECEIPTS[name]
    assert one("cloud-api", load("cloud-api", name)) == Ignored(
        reason=reason, format="cloud-api", instance="demo",
        message_id="wamid.xyzxyz", origin="t.jsonl:7",
        receipt=Receipt("demo", "wamid.xyzxyz", status, error=error,  # type: ignore[arg-type]
                        number="972987654321"),
    )


def test_a_status_names_the_24_hour_window_and_hands_back_our_key() -> None:
    body = load("cloud-api", "20_status_failed.json")
    status = body["entry"][0]["changes"][0]["value"]["statuses"][0]
    status["errors"][0].update(code=131047, title="Re-engagement message")
    status["biz_opaque_callback_data"] = "t_abc:reply"
    ignored = one("cloud-api", body)
    assert isinstance(ignored, Ignored) and ignored.receipt is not None
    assert ignored.receipt.key == "t_abc:reply"
    assert ignored.receipt.error == ("131047 outside the 24-hour window: only a template can "
                                     "be sent (Re-engagement message)")
    assert ignored.reason == f"receipt: failed ({ignored.receipt.error})"


# file -> (instance, message_id, sender, sender_name, kind, text, reply_to, sent_at)
EVOLUTION_MESSAGES: dict[str, tuple[str, str, str, str, str, str, str | None, int]] = {
    "03_upsert_text_fixture_uppercase_event.json": (
        "test", "BAE5F2A7C4E99999", "5511999999999", "John Doe", "text",
        "Hello, this is a test message!", None, 1704067200,
    ),
    "04_upsert_text_with_contextinfo_v1.json": (
        "laks", "3A6687C4331054C34F0F", "553191819932", "Leila Fernanda", "text", "Eu te amo",
        None, 1705684429,
    ),
    "11_upsert_image_caption_constructed.json": (
        "loja", "3EB0C431C26A1916E07A", "5511987654321", "Mariana", "image",
        "o pedido chegou quebrado, quero falar com um atendente", None, 1760000100,
    ),
    "12_upsert_audio_ptt_constructed.json": (
        "loja", "3A5F1B2C9D8E7F6A5B4C", "5511987654321", "Mariana", "audio", "", None,
        1760000160,
    ),
    "13_upsert_document_caption_constructed.json": (
        "loja", "3EB0AA11BB22CC33DD44", "5511987654321", "Mariana", "document",
        "segue a nota fiscal", None, 1760000220,
    ),
    "14_upsert_reaction_constructed.json": (
        "loja", "3EB0FF00EE11DD22CC33", "5511987654321", "Mariana", "reaction", "👎",
        "BAE5F2A7C4E12345", 1760000250,
    ),
    "15_upsert_location_constructed.json": (
        "loja", "3EB0123456789ABCDEF0", "5511987654321", "Mariana", "location",
        "Loja Centro, Praça da Sé, São Paulo - SP", None, 1760000300,
    ),
    "16_upsert_quoted_reply_extendedtext_normalized_constructed.json": (
        "loja", "3EB0BEEF0000CAFE1111", "5511987654321", "Mariana", "text",
        "isso não resolveu, já é a terceira vez. quero um humano", "BAE5F2A7C4E12345",
        1760000400,
    ),
}
# file -> (reason, instance, message_id)
EVOLUTION_IGNORED: dict[str, tuple[str, str, str | None]] = {
    "01_upsert_text_fromMe_issue631.json": (
        "own message (fromMe)", "clinica", "4DA1D8D1B5B0139AC8C44B44B8CF5A93",
    ),
    "05_send_message_extendedtext_long_timestamp_v1.json": (
        "own message (fromMe)", "laks", "BAE520405E56E538"),
    "06_upsert_text_fromMe_v2_server_ack.json": (
        "own message (fromMe)", "nome", "3AE99D6A1DBF3F9A0578",
    ),
    "07_messages_update_deleted_issue2010.json": ("event: messages.update", "my", None),
    "08_messages_update_read_issue2010.json": (
        "receipt: read", "my", "A5561E44C2A63682E4295B52F484C14E"),
    "09_connection_update_close.json": ("event: connection.update", "sergio", None),
    "10_upsert_group_participant_lid_issue1746.json": (
        "group message", "wpwb", "3EB07B86E02236BE3DD95F",
    ),
}
# file -> (reason, where): not webhook bodies at all, or a message without an id
EVOLUTION_INVALID: dict[str, tuple[str, str]] = {
    "02_upsert_text_lid_issue2466.json": ("id must be a non-empty string, not ''", "data.key.id"),
    "17_sendText_request.json": ("event must be a non-empty string, not missing", "event"),
    "18_sendText_response_201.json": ("event must be a non-empty string, not missing", "event"),
}


@pytest.mark.parametrize("name", sorted(EVOLUTION_MESSAGES))
def test_evolution_fixture_messages(name: str) -> None:
    instance, message_id, sender, sender_name, kind, text, reply_to, sent_at = (
        EVOLUTION_MESSAGES[name]
    )
    assert one("evolution", load("evolution", name)) == InboundMessage(
        instance=instance, message_id=message_id, sender=sender, kind=kind, text=text,
        sent_at=utc(sent_at), received_at=RECEIVED, format="evolution",
        sender_name=sender_name, media_id=None, reply_to=reply_to, origin="t.jsonl:7",
    )


@pytest.mark.parametrize("name", sorted(EVOLUTION_IGNORED))
def test_evolution_fixture_ignored(name: str) -> None:
    reason, instance, message_id = EVOLUTION_IGNORED[name]
    got = one("evolution", load("evolution", name))
    assert attrs.evolve(got, receipt=None) == Ignored(
        reason=reason, format="evolution", instance=instance, message_id=message_id,
        origin="t.jsonl:7",
    )
    assert (got.receipt is not None) == (name in EVOLUTION_RECEIPTS)
    if got.receipt is not None:
        status, number, text = EVOLUTION_RECEIPTS[name]
        assert got.receipt == Receipt(instance, str(message_id), status,  # type: ignore[arg-type]
                                      number=number, text=text)


# file -> (status, number, text) of the receipt or echo an ignored event carries
EVOLUTION_RECEIPTS: dict[str, tuple[str, str | None, str | None]] = {
    "01_upsert_text_fromMe_issue631.json": ("sent", '55119********', (
        'Clínica ****** agradece seu contato. Como podemos ajudar?\n*A'
        'tendimento de segunda a sexta das 08:00hs as 18:00hs*\nNosso telefone fixo: **********')),
    "05_send_message_extendedtext_long_timestamp_v1.json": ("sent", "553191819932", "tes"),
    "06_upsert_text_fromMe_v2_server_ack.json": ("sent", "558197088404", "Texto da mensagem"),
    "08_messages_update_read_issue2010.json": ("read", None, None),
}


@pytest.mark.parametrize("name", sorted(EVOLUTION_INVALID))
def test_evolution_fixture_invalid(name: str) -> None:
    reason, where = EVOLUTION_INVALID[name]
    assert one("evolution", load("evolution", name)) == Invalid(
        reason=reason, where=where, format="evolution", origin="t.jsonl:7",
    )


def test_every_fixture_file_has_an_expectation() -> None:
    cloud = set(CLOUD_MESSAGES) | set(CLOUD_RECEIPTS) | {"03_image_with_caption.json"}
    evolution = set(EVOLUTION_MESSAGES) | set(EVOLUTION_IGNORED) | set(EVOLUTION_INVALID)
    assert {p.name for p in (FIXTURES / "cloud-api").glob("*.json")} == cloud
    assert {p.name for p in (FIXTURES / "evolution").glob("*.json")} == evolution
    assert (FIXTURES / "cloud-api" / "README.md").exists()
    assert (FIXTURES / "evolution" / "README.md").exists()


# --- several results from one body --------------------------------------------------------


def cloud_message(message_id: str, text: str, sender: str = CLOUD_SENDER) -> dict[str, Any]:
    return {"from": sender, "id": message_id, "timestamp": "1756634400", "type": "text",
            "text": {"body": text}}


def test_cloud_body_with_several_messages_statuses_and_changes() -> None:
    body = load("cloud-api", "01_text.json")
    value = body["entry"][0]["changes"][0]["value"]
    value["messages"] = [cloud_message("m1", "one"), cloud_message("m2", "two", "5511")]
    value["statuses"] = [{"id": "out1", "status": "read"}]
    second_change = copy.deepcopy(body["entry"][0]["changes"][0])
    second_change["value"]["messages"] = [cloud_message("m3", "three")]
    del second_change["value"]["statuses"]
    body["entry"][0]["changes"].append(second_change)
    body["entry"].append({"id": "x", "changes": [{"field": "account_update", "value": {}}]})
    results = parse("cloud-api", body)
    summary = [(type(r).__name__, getattr(r, "message_id", None)) for r in results]
    assert summary == [("InboundMessage", "m1"), ("InboundMessage", "m2"), ("Ignored", "out1"),
                       ("InboundMessage", "m3"), ("Ignored", None)]
    assert [r.text for r in results if isinstance(r, InboundMessage)] == ["one", "two", "three"]
    assert results[1].sender == "5511"
    assert results[1].sender_name is None  # no contact entry for that wa_id
    assert results[4].reason == "field: account_update"


def test_one_bad_message_does_not_spoil_its_neighbours() -> None:
    body = load("cloud-api", "01_text.json")
    value = body["entry"][0]["changes"][0]["value"]
    value["messages"] = [cloud_message("m1", "one"), {**cloud_message("m2", "two"), "from": 5},
                         cloud_message("m3", "three")]
    first, bad, third = parse("cloud-api", body)
    assert (first.message_id, third.message_id) == ("m1", "m3")
    assert bad == Invalid(reason="from must be a non-empty string, not 5",
                          where="entry[0].changes[0].value.messages[1].from",
                          format="cloud-api", origin="t.jsonl:7")


# --- every Invalid path -------------------------------------------------------------------

MSG = "entry[0].changes[0].value.messages[0]"
VALUE = "entry[0].changes[0].value"


def mutate(body: Any, path: str, new: Any) -> Any:
    """A copy of ``body`` with the value at dotted ``path`` replaced (``DELETE`` removes it)."""
    body = copy.deepcopy(body)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = body
    for key in parents:
        target = target[key]
    if new is DELETE:
        del target[last]
    else:
        target[last] = new
    return body


DELETE = object()

C_TEXT = "01_text.json"
CLOUD_INVALID: list[tuple[str, str, Any, str, str]] = [
    # fixture, path to change, new value, reason regex, where
    (C_TEXT, "object", "page", r"object must be 'whatsapp_business_account', not 'page'", "object"),
    (C_TEXT, "object", DELETE, r"object must be 'whatsapp_business_account', not missing",
     "object"),
    (C_TEXT, "entry", DELETE, r"entry must be a list, not missing", "entry"),
    (C_TEXT, "entry", {}, r"entry must be a list, not an object", "entry"),
    (C_TEXT, "entry.0", 5, r"entry\[0\] must be an object, not 5", "entry[0]"),
    (C_TEXT, "entry.0.changes", "x", r"changes must be a list, not 'x'", "entry[0].changes"),
    (C_TEXT, "entry.0.changes.0", None, r"changes\[0\] must be an object, not null",
     "entry[0].changes[0]"),
    (C_TEXT, "entry.0.changes.0.field", 7, r"field must be a non-empty string, not 7",
     "entry[0].changes[0].field"),
    (C_TEXT, "entry.0.changes.0.value", DELETE, r"value must be an object, not missing", VALUE),
    (C_TEXT, "entry.0.changes.0.value.metadata", [], r"metadata must be an object, not a list",
     f"{VALUE}.metadata"),
    (C_TEXT, "entry.0.changes.0.value.metadata.phone_number_id", 1122334455667,
     r"phone_number_id must be a non-empty string, not 1122334455667",
     f"{VALUE}.metadata.phone_number_id"),
    (C_TEXT, "entry.0.changes.0.value.metadata.phone_number_id", "999",
     r"unknown instance: phone_number_id '999' is not configured",
     f"{VALUE}.metadata.phone_number_id"),
    (C_TEXT, "entry.0.changes.0.value.messages", "x", r"messages must be a list, not 'x'",
     f"{VALUE}.messages"),
    (C_TEXT, "entry.0.changes.0.value.statuses", {}, r"statuses must be a list, not an object",
     f"{VALUE}.statuses"),
    (C_TEXT, "entry.0.changes.0.value.messages.0", "hi",
     r"messages\[0\] must be an object, not 'hi'", MSG),
    (C_TEXT, "entry.0.changes.0.value.messages.0.id", "", r"id must be a non-empty string, not ''",
     f"{MSG}.id"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.from", DELETE,
     r"from must be a non-empty string, not missing", f"{MSG}.from"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.timestamp", 12.5,
     r"timestamp must be a string of digits, not 12\.5", f"{MSG}.timestamp"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.timestamp", 1697043223,
     r"timestamp must be a string of digits, not 1697043223", f"{MSG}.timestamp"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.timestamp", "-5",
     r"timestamp must be a string of digits, not '-5'", f"{MSG}.timestamp"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.timestamp", "١٢٣",
     r"timestamp must be a string of digits, not '١٢٣'", f"{MSG}.timestamp"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.timestamp", "999999999999",
     r"timestamp must be a unix time in seconds, not '999999999999'", f"{MSG}.timestamp"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.timestamp", "9" * 5000,
     r"timestamp must be a unix time in seconds, not '9+\.\.\.", f"{MSG}.timestamp"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.type", None,
     r"type must be a non-empty string, not null", f"{MSG}.type"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.text", DELETE,
     r"text must be an object, not missing", f"{MSG}.text"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.text.body", 5, r"body must be a string, not 5",
     f"{MSG}.text.body"),
    (C_TEXT, "entry.0.changes.0.value.messages.0.context", "x",
     r"context must be an object, not 'x'", f"{MSG}.context"),
    ("02_image_no_caption.json", "entry.0.changes.0.value.messages.0.image.id", DELETE,
     r"id must be a non-empty string, not missing", f"{MSG}.image.id"),
    ("02_image_no_caption.json", "entry.0.changes.0.value.messages.0.image.caption", True,
     r"caption must be a string, not true", f"{MSG}.image.caption"),
    ("05_document_caption.json", "entry.0.changes.0.value.messages.0.document", "doc",
     r"document must be an object, not 'doc'", f"{MSG}.document"),
    ("08_reaction.json", "entry.0.changes.0.value.messages.0.reaction.emoji", 5,
     r"emoji must be a string, not 5", f"{MSG}.reaction.emoji"),
    ("10_location_named.json", "entry.0.changes.0.value.messages.0.location.latitude", "x",
     r"latitude must be a number, not 'x'", f"{MSG}.location.latitude"),
    ("10_location_named.json", "entry.0.changes.0.value.messages.0.location.longitude", False,
     r"longitude must be a number, not false", f"{MSG}.location.longitude"),
    ("11_contacts.json", "entry.0.changes.0.value.messages.0.contacts.1", "x",
     r"contacts\[1\] must be an object, not 'x'", f"{MSG}.contacts[1]"),
    ("11_contacts.json", "entry.0.changes.0.value.messages.0.contacts.0.name.formatted_name", 3,
     r"formatted_name must be a string, not 3", f"{MSG}.contacts[0].name.formatted_name"),
    ("13_interactive_button_reply.json", "entry.0.changes.0.value.messages.0.interactive.type",
     DELETE, r"type must be a non-empty string, not missing", f"{MSG}.interactive.type"),
    ("13_interactive_button_reply.json",
     "entry.0.changes.0.value.messages.0.interactive.button_reply.title", None,
     r"title must be a string, not null", f"{MSG}.interactive.button_reply.title"),
    ("15_template_quick_reply_button.json", "entry.0.changes.0.value.messages.0.button", DELETE,
     r"button must be an object, not missing", f"{MSG}.button"),
    ("18_status_delivered.json", "entry.0.changes.0.value.statuses.0.status", DELETE,
     r"status must be a non-empty string, not missing", f"{VALUE}.statuses[0].status"),
    ("18_status_delivered.json", "entry.0.changes.0.value.statuses.0", 1,
     r"statuses\[0\] must be an object, not 1", f"{VALUE}.statuses[0]"),
]

E_TEXT = "03_upsert_text_fixture_uppercase_event.json"
EVOLUTION_BAD: list[tuple[str, str, Any, str, str]] = [
    (E_TEXT, "event", 5, r"event must be a non-empty string, not 5", "event"),
    (E_TEXT, "instance", DELETE, r"instance must be a non-empty string, not missing", "instance"),
    (E_TEXT, "instance", "nope", r"unknown instance: instance 'nope' is not configured",
     "instance"),
    (E_TEXT, "data", DELETE, r"data must be an object, not missing", "data"),
    (E_TEXT, "data.key", [], r"key must be an object, not a list", "data.key"),
    (E_TEXT, "data.key.fromMe", "false", r"fromMe must be true or false, not 'false'",
     "data.key.fromMe"),
    (E_TEXT, "data.key.remoteJid", "5511999999999",
     r"remoteJid must be a user jid \(@s\.whatsapp\.net or @lid\), not '5511999999999'",
     "data.key.remoteJid"),
    (E_TEXT, "data.key.remoteJid", "@s.whatsapp.net",
     r"remoteJid must be a user jid \(@s\.whatsapp\.net or @lid\), not '@s\.whatsapp\.net'",
     "data.key.remoteJid"),
    (E_TEXT, "data.key.remoteJid", DELETE, r"remoteJid must be a non-empty string, not missing",
     "data.key.remoteJid"),
    (E_TEXT, "data.key.id", 42, r"id must be a non-empty string, not 42", "data.key.id"),
    (E_TEXT, "data.messageTimestamp", 12.5,
     r"messageTimestamp must be an integer or a string of digits, not 12\.5",
     "data.messageTimestamp"),
    (E_TEXT, "data.messageTimestamp", DELETE,
     r"messageTimestamp must be an integer or a string of digits, not missing",
     "data.messageTimestamp"),
    (E_TEXT, "data.messageTimestamp", True,
     r"messageTimestamp must be an integer or a string of digits, not true",
     "data.messageTimestamp"),
    (E_TEXT, "data.messageTimestamp", "17e8",
     r"messageTimestamp must be an integer or a string of digits, not '17e8'",
     "data.messageTimestamp"),
    (E_TEXT, "data.messageTimestamp", {"low": "1"},
     r"messageTimestamp must be an integer or a string of digits, not an object",
     "data.messageTimestamp"),
    (E_TEXT, "data.messageTimestamp", -1,
     r"messageTimestamp must be a unix time in seconds, not -1", "data.messageTimestamp"),
    (E_TEXT, "data.messageTimestamp", 10**20,
     r"messageTimestamp must be a unix time in seconds, not 100000000000000000000",
     "data.messageTimestamp"),
    (E_TEXT, "data.pushName", 5, r"pushName must be a string, not 5", "data.pushName"),
    (E_TEXT, "data.message", DELETE, r"message must be an object, not missing", "data.message"),
    (E_TEXT, "data.message.conversation", 5, r"conversation must be a string, not 5",
     "data.message.conversation"),
    (E_TEXT, "data.messageType", "", r"messageType must be a non-empty string, not ''",
     "data.messageType"),
    (E_TEXT, "data.messageType", "extendedTextMessage",
     r"extendedTextMessage must be an object, not missing", "data.message.extendedTextMessage"),
    ("11_upsert_image_caption_constructed.json", "data.message.imageMessage", "x",
     r"imageMessage must be an object, not 'x'", "data.message.imageMessage"),
    ("12_upsert_audio_ptt_constructed.json", "data.message.audioMessage", DELETE,
     r"audioMessage must be an object, not missing", "data.message.audioMessage"),
    ("15_upsert_location_constructed.json", "data.message.locationMessage.degreesLatitude", None,
     r"degreesLatitude must be a number, not null",
     "data.message.locationMessage.degreesLatitude"),
    ("16_upsert_quoted_reply_extendedtext_normalized_constructed.json", "data.contextInfo", "x",
     r"contextInfo must be an object, not 'x'", "data.contextInfo"),
    ("16_upsert_quoted_reply_extendedtext_normalized_constructed.json",
     "data.contextInfo.stanzaId", 7, r"stanzaId must be a string, not 7",
     "data.contextInfo.stanzaId"),
]


def invalid_case_id(case: tuple[str, str, Any, str, str]) -> str:
    return f"{case[1]}={case[2]!r:.20}"


@pytest.mark.parametrize(
    ("fmt", "case"),
    [("cloud-api", c) for c in CLOUD_INVALID] + [("evolution", c) for c in EVOLUTION_BAD],
    ids=[invalid_case_id(c) for c in CLOUD_INVALID + EVOLUTION_BAD],
)
def test_invalid_paths(fmt: str, case: tuple[str, str, Any, str, str]) -> None:
    name, path, new, reason, where = case
    result = one(fmt, mutate(load(fmt, name), path, new))
    assert isinstance(result, Invalid), result
    assert re.fullmatch(reason, result.reason), result.reason
    assert result.where == where
    assert (result.format, result.origin) == (fmt, "t.jsonl:7")


@pytest.mark.parametrize("fmt", ["cloud-api", "evolution"])
@pytest.mark.parametrize(("body", "found"), [([], "a list"), ("hi", "'hi'"), (None, "null")])
def test_body_not_an_object(fmt: str, body: Any, found: str) -> None:
    result = one(fmt, body)
    assert isinstance(result, Invalid)
    assert result.reason == f"body must be an object, not {found}"
    assert result.where == ""


def test_unknown_format() -> None:
    result = one("telegram", {})
    assert isinstance(result, Invalid)
    assert re.fullmatch(r"format must be 'cloud-api' or 'evolution', not 'telegram'", result.reason)


# --- more Cloud API shapes ----------------------------------------------------------------


def cloud_single(message: dict[str, Any]) -> Any:
    return mutate(load("cloud-api", C_TEXT), "entry.0.changes.0.value.messages", [message])


def test_cloud_location_without_name_is_coordinates() -> None:
    message = {**cloud_message("m", ""), "type": "location",
               "location": {"latitude": -23.5, "longitude": -46.25}}
    assert one("cloud-api", cloud_single(message)).text == "-23.5,-46.25"


def test_cloud_document_without_caption_uses_filename() -> None:
    message = {**cloud_message("m", ""), "type": "document",
               "document": {"id": "77", "filename": "menu.pdf"}}
    result = one("cloud-api", cloud_single(message))
    assert (result.kind, result.text, result.media_id) == ("document", "menu.pdf", "77")


def test_cloud_sticker_and_unknown_types() -> None:
    sticker = {**cloud_message("m", ""), "type": "sticker", "sticker": {"id": "s1"}}
    order = {**cloud_message("n", ""), "type": "order", "order": {"catalog_id": "1"}}
    results = parse("cloud-api", mutate(load("cloud-api", C_TEXT),
                                        "entry.0.changes.0.value.messages", [sticker, order]))
    assert [(r.kind, r.text, r.media_id) for r in results] == [
        ("sticker", "", "s1"), ("order", "", None),
    ]


def test_cloud_other_interactive_reply_has_no_text() -> None:
    message = {**cloud_message("m", ""), "type": "interactive",
               "interactive": {"type": "nfm_reply", "nfm_reply": {"body": "Sent"}}}
    result = one("cloud-api", cloud_single(message))
    assert (result.kind, result.text) == ("interactive", "")


def test_cloud_value_without_messages_or_statuses() -> None:
    body = mutate(load("cloud-api", C_TEXT), "entry.0.changes.0.value.messages", DELETE)
    assert one("cloud-api", body) == Ignored(
        reason="no messages or statuses", format="cloud-api", instance="demo",
        origin="t.jsonl:7",
    )


def test_cloud_empty_entry_list_still_has_an_outcome() -> None:
    result = one("cloud-api", {"object": "whatsapp_business_account", "entry": []})
    assert isinstance(result, Ignored)
    assert result.reason == "no messages or statuses"


def test_cloud_odd_contacts_only_lose_the_name() -> None:
    body = mutate(load("cloud-api", C_TEXT), "entry.0.changes.0.value.contacts",
                  [5, {"wa_id": 1}, {"wa_id": CLOUD_SENDER, "profile": "x"}])
    result = one("cloud-api", body)
    assert isinstance(result, InboundMessage)
    assert result.sender_name is None


# --- more Evolution shapes ----------------------------------------------------------------


def evolution_with(path: str, new: Any, name: str = E_TEXT) -> Any:
    return one("evolution", mutate(load("evolution", name), path, new))


@pytest.mark.parametrize(
    ("stamp", "seconds"),
    [
        ("1704067200", 1704067200),
        ({"low": 1705846799, "high": 0, "unsigned": True}, 1705846799),
        ({"low": -1, "high": 0}, 4294967295),  # a signed Long's low word
    ],
)
def test_evolution_timestamp_forms(stamp: Any, seconds: int) -> None:
    assert evolution_with("data.messageTimestamp", stamp).sent_at == utc(seconds)


LID = "13718@lid"
PHONE = "5511999999999"


def lid_body(alternates: dict[str, Any], jid: str = LID) -> Any:
    """The text fixture sent from ``jid``, with alternate id fields at dotted paths."""
    body = mutate(load("evolution", E_TEXT), "data.key.remoteJid", jid)
    for path, value in alternates.items():
        body = mutate(body, path, value)
    return body


@pytest.mark.parametrize(
    ("alternates", "sender"),
    [
        ({}, LID),  # no number anywhere: the whole lid is the key, as before
        ({"data.key.senderPn": f"{PHONE}@s.whatsapp.net"}, PHONE),
        ({"data.key.remoteJidAlt": f"{PHONE}@s.whatsapp.net"}, PHONE),
        ({"data.key.participantAlt": f"{PHONE}@s.whatsapp.net"}, PHONE),
        ({"data.senderPn": f"{PHONE}@s.whatsapp.net"}, PHONE),
        ({"data.remoteJidAlt": f"{PHONE}@c.us"}, PHONE),
        ({"data.participantAlt": f"{PHONE}@s.whatsapp.net"}, PHONE),
        ({"data.key.senderPn": "", "data.key.remoteJidAlt": f"{PHONE}@s.whatsapp.net"}, PHONE),
        ({"data.key.senderPn": f"{PHONE}@s.whatsapp.net", "data.remoteJidAlt": "1@s.whatsapp.net"},
         PHONE),  # the key wins over data
    ],
    ids=["none", "key.senderPn", "key.remoteJidAlt", "key.participantAlt", "data.senderPn",
         "data.remoteJidAlt", "data.participantAlt", "bad-then-good", "key-first"],
)
def test_evolution_lid_sender_takes_the_phone_beside_it(
    alternates: dict[str, Any], sender: str
) -> None:
    result = one("evolution", lid_body(alternates))
    assert isinstance(result, InboundMessage), result
    assert result.sender == sender


@pytest.mark.parametrize(
    "bad",
    [None, 5, True, "", [f"{PHONE}@s.whatsapp.net"], {"user": PHONE}, PHONE, "98765@lid",
     "abc@s.whatsapp.net", "@s.whatsapp.net", f"{PHONE}:7@s.whatsapp.net", f"{PHONE}@g.us",
     f" {PHONE}@s.whatsapp.net", "١٢٣@s.whatsapp.net", "9" * 300 + "@s.whatsapp.net"],
)
@pytest.mark.parametrize("field", ["data.key.senderPn", "data.key.remoteJidAlt", "data.senderPn"])
def test_evolution_bad_alternate_is_ignored(field: str, bad: Any) -> None:
    result = one("evolution", lid_body({field: bad}))
    assert isinstance(result, InboundMessage), result
    assert result.sender == LID


def test_evolution_same_person_by_lid_or_phone_is_one_conversation() -> None:
    by_lid = one("evolution", lid_body({"data.key.senderPn": f"{PHONE}@s.whatsapp.net"}))
    by_phone = one("evolution", lid_body({}, jid=f"{PHONE}@s.whatsapp.net"))
    assert by_lid.sender == by_phone.sender == PHONE


def test_evolution_phone_jid_wins_over_a_lid_alternate() -> None:
    """v2.3.6 may send the phone as remoteJid and the lid as remoteJidAlt."""
    body = lid_body({"data.key.remoteJidAlt": LID}, jid=f"{PHONE}@s.whatsapp.net")
    assert one("evolution", body).sender == PHONE


@pytest.mark.parametrize(
    ("jid", "from_me", "reason"),
    [(LID, True, "own message (fromMe)"), ("1203630@g.us", False, "group message")],
)
def test_evolution_alternates_do_not_change_ignored_messages(
    jid: str, from_me: bool, reason: str
) -> None:
    alternates = {"data.key.participantAlt": f"{PHONE}@s.whatsapp.net", "data.key.fromMe": from_me}
    result = one("evolution", lid_body(alternates, jid=jid))
    assert attrs.evolve(result, receipt=None) == Ignored(
        reason=reason, format="evolution", instance="test", message_id="BAE5F2A7C4E99999",
        origin="t.jsonl:7")
    if from_me:  # our echo: what was sent to the @lid address, for a send in doubt
        assert isinstance(result, Ignored) and result.receipt is not None
        assert result.receipt.number == LID


@pytest.mark.parametrize(
    ("jid", "reason"),
    [("status@broadcast", "broadcast message"), ("1203630@newsletter", "newsletter message"),
     ("1203630@g.us", "group message")],
)
def test_evolution_non_user_chats_are_ignored(jid: str, reason: str) -> None:
    result = evolution_with("data.key.remoteJid", jid)
    assert result == Ignored(reason=reason, format="evolution", instance="test",
                             message_id="BAE5F2A7C4E99999", origin="t.jsonl:7")


def test_evolution_v1_extended_text_with_quoted_message() -> None:
    message = {"extendedTextMessage": {"text": "sim, esse", "contextInfo": {"stanzaId": "Q1"}}}
    body = mutate(load("evolution", E_TEXT), "data.message", message)
    result = one("evolution", mutate(body, "data.messageType", "extendedTextMessage"))
    assert (result.kind, result.text, result.reply_to) == ("text", "sim, esse", "Q1")


def test_evolution_message_type_inferred_when_missing() -> None:
    body = mutate(load("evolution", "11_upsert_image_caption_constructed.json"),
                  "data.messageType", DELETE)
    assert one("evolution", body).kind == "image"


def test_evolution_protocol_message_is_ignored() -> None:
    body = mutate(load("evolution", E_TEXT), "data.message",
                  {"protocolMessage": {"type": "REVOKE", "key": {"id": "X"}}})
    result = one("evolution", mutate(body, "data.messageType", "protocolMessage"))
    assert isinstance(result, Ignored)
    assert result.reason == "protocol message"


@pytest.mark.parametrize(
    ("message_type", "message", "kind", "text"),
    [
        ("pollCreationMessage", {"pollCreationMessage": {"name": "?"}}, "pollCreationMessage", ""),
        ("stickerMessage", {"stickerMessage": {}}, "sticker", ""),
        ("videoMessage", {"videoMessage": {"caption": "olha"}}, "video", "olha"),
        ("documentMessage", {"documentMessage": {"fileName": "a.pdf"}}, "document", "a.pdf"),
        ("documentWithCaptionMessage",
         {"documentWithCaptionMessage": {"message": {"documentMessage": {"caption": "nf"}}}},
         "document", "nf"),
        ("contactMessage", {"contactMessage": {"displayName": "Ana"}}, "contacts", "Ana"),
        ("contactsArrayMessage",
         {"contactsArrayMessage": {"contacts": [{"displayName": "A"}, {"displayName": "B"}]}},
         "contacts", "A, B"),
        ("buttonsResponseMessage", {"buttonsResponseMessage": {"selectedDisplayText": "Sim"}},
         "interactive", "Sim"),
        ("listResponseMessage", {"listResponseMessage": {"title": "Pizza"}}, "interactive",
         "Pizza"),
        ("templateButtonReplyMessage",
         {"templateButtonReplyMessage": {"selectedDisplayText": "Ok"}}, "button", "Ok"),
        ("locationMessage", {"locationMessage": {"degreesLatitude": 1, "degreesLongitude": 2}},
         "location", "1,2"),
        ("reactionMessage", {"reactionMessage": {"text": ""}}, "reaction", ""),
    ],
)
def test_evolution_message_types(message_type: str, message: Any, kind: str, text: str) -> None:
    body = mutate(load("evolution", E_TEXT), "data.message", message)
    result = one("evolution", mutate(body, "data.messageType", message_type))
    assert isinstance(result, InboundMessage)
    assert (result.kind, result.text) == (kind, text)


def test_unknown_instance_of_an_ignored_event_is_still_ignored() -> None:
    body = mutate(load("evolution", "09_connection_update_close.json"), "instance", "other")
    result = one("evolution", body)
    assert isinstance(result, Ignored)
    assert result.instance is None


def test_directory_rejects_empty_instance_names() -> None:
    with pytest.raises(ValueError, match=r"^by_evolution_name\['x'\] must be a non-empty name"):
        InstanceDirectory(by_evolution_name={"x": ""})


# --- fuzzing: bad input never raises ------------------------------------------------------

KEYS = ["object", "entry", "changes", "field", "value", "metadata", "phone_number_id",
        "contacts", "messages", "statuses", "id", "from", "timestamp", "type", "text", "body",
        "event", "instance", "data", "key", "fromMe", "remoteJid", "messageTimestamp",
        "message", "messageType", "conversation", "low", "contextInfo", "stanzaId",
        "senderPn", "remoteJidAlt", "participantAlt"]
STRINGS = ["whatsapp_business_account", "messages", "1122334455667", "messages.upsert",
           "loja-centro", "text", "image", "1756634400", "5511@s.whatsapp.net", "1@lid",
           "conversation", "imageMessage", "reaction", "location", "interactive", ""]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
           | st.sampled_from(STRINGS))
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=5),
    max_leaves=40,
)
FORMAT_NAMES = ["cloud-api", "evolution"]


def check_results(fmt: str, body: Any) -> None:
    results = parse(fmt, body)
    assert results
    assert all(isinstance(r, InboundMessage | Ignored | Invalid) for r in results)
    assert parse(fmt, body) == results  # deterministic, reasons and paths included


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(FORMAT_NAMES), body=json_like)
def test_random_bodies_never_raise(fmt: str, body: Any) -> None:
    check_results(fmt, body)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths_of(child, (*prefix, index))
    return found


ALL_FIXTURES = [
    (fmt, p.name) for fmt in FORMAT_NAMES for p in sorted((FIXTURES / fmt).glob("*.json"))
]


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mutated_fixtures_never_raise(data: st.DataObject) -> None:
    fmt, name = data.draw(st.sampled_from(ALL_FIXTURES))
    body = load(fmt, name)
    path = data.draw(st.sampled_from(paths_of(body)[1:]))
    replacement = data.draw(st.just(DELETE) | json_like)
    target = body
    for key in path[:-1]:
        target = target[key]
    if replacement is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = replacement
    check_results(fmt, body)


# --- request bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("x", 0), ([], 1), ({}, 1), ({"a": [1, {"b": []}]}, 4), ([[[[]]], []], 4)],
)
def test_json_depth(value: Any, depth: int) -> None:
    check_body(value, depth)
    if depth > 0:
        with pytest.raises(BodyError, match=f"deeper than {depth - 1} levels"):
            check_body(value, depth - 1)


def test_json_depth_is_not_recursive() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(BodyError, match="deeper than 64 levels"):
        check_body(deep, 64)
    check_body(deep, 100_001)


def test_decode_body_accepts_json() -> None:
    assert decode_body('{"a": ["ã", 1]}'.encode(), 8) == {"a": ["ã", 1]}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff{}", r"body is not valid utf-8 at byte 0"),
        (b"", r"body is not valid json: expecting value at line 1 column 1"),
        (b'{"a": 1,}', r"body is not valid json: .* at line 1 column 9"),
        (b'{"a": NaN}', r"body is not valid json: nan is not allowed"),
        (b"[[[1]]]", r"body is nested deeper than 2 levels"),
        (b"[" * 100_000 + b"]" * 100_000, r"body is nested deeper than 2 levels"),
    ],
)
def test_decode_body_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(BodyError) as caught:
        decode_body(raw, 2)
    assert re.fullmatch(reason, caught.value.reason), caught.value.reason
    assert str(caught.value) == caught.value.reason
