"""Escalation rules and the word matching under them: pure, no event loop except for the
stage wrapper. Tables in English, Portuguese, Spanish and Arabic."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.config import BusinessHoursConfig, EscalationConfig, InstanceConfig
from pipeline.rules import rules_from_config
from stages.escalation import (
    BusinessHours,
    Escalation,
    EscalationRules,
    after_answer,
    decide,
    fallback_streak,
)
from stages.records import Decision, InboundMessage, Reply, Turn, TurnContext
from stages.textmatch import Matcher, Phrase, fold, words

MONDAY_NOON = dt.datetime(2025, 9, 1, 12, 0, tzinfo=dt.UTC)

KEYWORDS = ("human", "agent", "atendente", "humano", "pessoa", "falar com alguem", "manager",
            "gerente", "reclamação", "موظف")
REQUESTS = ("talk to a human", "speak to a person", "falar com um atendente",
            "hablar con un agente", "hablar con una persona", "أريد التحدث مع شخص",
            "خدمة العملاء")
RULES = EscalationRules(KEYWORDS, 3, request_phrases=REQUESTS)


def turn(*texts: str, at: dt.datetime = MONDAY_NOON, step_s: float = 0) -> Turn:
    """A turn of ``texts``, the last received at ``at`` (earlier ones ``step_s`` apart)."""
    n = len(texts)
    msgs = tuple(
        InboundMessage("demo", f"m{i}", "5511999990000", "text", text,
                       at - dt.timedelta(seconds=step_s * (n - 1 - i)),
                       at - dt.timedelta(seconds=step_s * (n - 1 - i)), "cloud-api")
        for i, text in enumerate(texts))
    return Turn("t1", "demo", "5511999990000", msgs)


def ctx(escalated: bool = False, fallbacks: tuple[bool, ...] = ()) -> TurnContext:
    return TurnContext(conversation_id=1, escalated=escalated, recent_fallbacks=fallbacks)


# --- matching -----------------------------------------------------------------------------

MATCHING = [
    # English
    ("I want to talk to a human", "explicit request: talk to a human"),
    ("Can I TALK TO A HUMAN???", "explicit request: talk to a human"),
    ("speak to a\nperson", "explicit request: speak to a person"),  # across a turn's lines
    ("Agent, please", "keyword: agent"),
    ("human🙏", "keyword: human"),
    ("ＨＵＭＡＮ", "keyword: human"),  # fullwidth (compatibility decomposition)
    ("the manager's number", "keyword: manager"),
    ("my agenda for today", None),
    ("inhuman service", None),
    ("talk to a humanoid", None),
    ("management", None),
    ("h u m a n", None),
    ("human_resources", "keyword: human"),  # `_` separates words
    ("", None),
    # Portuguese
    ("quero FALAR com um atendente por favor", "explicit request: falar com um atendente"),
    ("Atendênte!", "keyword: atendente"),
    ("HUMANO!", "keyword: humano"),
    ("preciso falar com alguém 😡", "keyword: falar com alguem"),
    ("uma RECLAMACAO", "keyword: reclamação"),
    ("atendentes", None),
    ("pessoal, bom dia", None),
    ("gerenciar meu pedido", None),
    ("falar com", None),
    # Spanish
    ("¿Puedo hablar con un agente?", "explicit request: hablar con un agente"),
    ("Quiero HABLAR con una persona, por favor", "explicit request: hablar con una persona"),
    ("hablar con un agente de viajes", "explicit request: hablar con un agente"),
    ("la agencia de viajes", None),
    ("hablar con una", None),
    ("Humanidad", None),
    # Arabic
    ("أريد التحدث مع شخص", "explicit request: أريد التحدث مع شخص"),
    ("اريد التحدث مع شخص", "explicit request: أريد التحدث مع شخص"),  # no hamza
    ("أُرِيدُ التَّحَدُّثَ مَعَ شَخْصٍ", "explicit request: أريد التحدث مع شخص"),  # tashkeel
    ("خدمه العملاء؟", "explicit request: خدمة العملاء"),  # ha for ta marbuta
    ("خدمـــة العملاء", "explicit request: خدمة العملاء"),  # tatweel
    ("أريد موظف من فضلك", "keyword: موظف"),
    ("موظفين", None),
    ("أريد التحدث", None),
]


@pytest.mark.parametrize(("text", "reason"), MATCHING)
def test_requests_and_keywords_match_whole_words(text: str, reason: str | None) -> None:
    assert RULES.asks_for_human(text) == reason
    expected = Decision("reply") if reason is None else Decision("escalate", reason)
    assert decide(turn(*text.split("\n")), ctx(), RULES) == expected


@pytest.mark.parametrize(("text", "folded"), [
    ("Olá, ATENDÊNTE!!", "ola atendente"),
    ("  Straße\tÇA  ", "strasse ca"),
    ("İstanbul ıı", "istanbul ii"),
    ("أُرِيدُ  خدمـــة", "اريد خدمه"),
    ("رقم ١٢٣ و ۴۵", "رقم 123 و 45"),
    ("soft\u00adhyphen zero\u200bwidth", "softhyphen zerowidth"),
    ("人工客服", "人 工 客 服"),
    ("🙏🙏", ""),
])
def test_fold(text: str, folded: str) -> None:
    assert fold(text) == folded


@pytest.mark.parametrize(("phrase", "text", "found"), [
    ("entreg*", "vocês entregam?", True),
    ("entreg*", "entreg", True),
    ("entreg*", "reentrega", False),
    ("falar com atend*", "quero falar com atendimento", True),
    ("falar com atend*", "falar com o atendimento", False),
    ("人工", "我要人工客服", True),
])
def test_a_trailing_star_matches_a_word_prefix(phrase: str, text: str, found: bool) -> None:
    assert (Matcher.of([phrase]).search(text) is not None) is found


def test_the_first_configured_phrase_wins_whatever_the_text_order() -> None:
    m = Matcher.of(["gerente", "humano"])
    assert m.search("humano ou gerente") == Phrase("gerente", ("gerente",))
    assert m.first_index(words("humano")) == 1


@pytest.mark.parametrize("phrase", ["🙏", "!!!", " ", "ـــ"])
def test_a_phrase_that_can_never_match_is_refused(phrase: str) -> None:
    with pytest.raises(ValueError, match=r"has no letters or digits to match$"):
        Matcher.of(["human", phrase])
    with pytest.raises(ValueError, match=r"has no letters or digits to match$"):
        EscalationRules(("human", phrase), 3)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fold_never_raises_and_is_idempotent(text: str) -> None:
    folded = fold(text)
    assert fold(folded) == folded
    assert "  " not in folded and folded == folded.strip()


@settings(max_examples=300, deadline=None)
@given(text=st.text(), phrase=st.text(min_size=1))
def test_matching_is_invariant_under_case_changes(text: str, phrase: str) -> None:
    assume(words(phrase))
    m = Matcher.of([phrase])
    found = m.search(text) is not None
    for variant in (text.upper(), text.lower(), text.swapcase(), text.title(), text.casefold()):
        assert (m.search(variant) is not None) is found
    embedded = f"{text} {phrase.swapcase()} {text}"
    assert m.search(embedded) is not None


# --- order of the rules ---------------------------------------------------------------------

@pytest.mark.parametrize(("rules", "context", "text", "expected"), [
    (RULES, ctx(escalated=True), "talk to a human", Decision("hold",
                                                              "conversation is with a human")),
    (attrs.evolve(RULES, enabled=False), ctx(escalated=True), "hi",
     Decision("hold", "conversation is with a human")),
    (attrs.evolve(RULES, enabled=False), ctx(fallbacks=(True,) * 5), "talk to a human",
     Decision("reply")),
    (RULES, ctx(), "talk to a human", Decision("escalate", "explicit request: talk to a human")),
    (RULES, ctx(fallbacks=(True,) * 3), "agent", Decision("escalate", "keyword: agent")),
    # earlier failed answers alone do not hand over: the turn is answered first
    (RULES, ctx(fallbacks=(True,) * 3), "hi", Decision("reply")),
    (RULES, ctx(fallbacks=(True, True)), "hi", Decision("reply")),
    (RULES, ctx(fallbacks=(True, True, False, True)), "hi", Decision("reply")),
    (RULES, ctx(fallbacks=(False, True, True, True)), "hi", Decision("reply")),
    (RULES, ctx(), "hello", Decision("reply")),
])
def test_order_of_the_rules(rules: EscalationRules, context: TurnContext, text: str,
                            expected: Decision) -> None:
    assert decide(turn(text), context, rules) == expected


FAILED = Reply("Sorry, could you rephrase?", 0.0, fallback=True, responder="rules")
GOOD = Reply("We open at 9.", 0.9, fallback=False, responder="rules")
UNSURE = Reply("Maybe at 9?", 0.3, fallback=False, responder="rules")


@pytest.mark.parametrize(("rules", "fallbacks", "reply", "expected"), [
    (RULES, (True, True), FAILED, Decision("escalate", "3 failed answers in a row")),
    (RULES, (True, True, True), FAILED, Decision("escalate", "4 failed answers in a row")),
    (RULES, (True, True), GOOD, None),  # the turn could be answered: it is
    (RULES, (True,), FAILED, None),
    (RULES, (True, False, True), FAILED, None),
    (attrs.evolve(RULES, min_confidence=0.5), (True, True), UNSURE,
     Decision("escalate", "3 failed answers in a row")),
    (attrs.evolve(RULES, max_failed_answers=1), (), FAILED,
     Decision("escalate", "1 failed answers in a row")),
    (attrs.evolve(RULES, enabled=False), (True,) * 5, FAILED, None),
])
def test_the_nth_failed_answer_hands_over_instead(
        rules: EscalationRules, fallbacks: tuple[bool, ...], reply: Reply,
        expected: Decision | None) -> None:
    assert after_answer(turn("hi"), ctx(fallbacks=fallbacks), reply, rules) == expected


@pytest.mark.parametrize(("fallbacks", "streak"), [
    ((), 0), ((False,), 0), ((True,), 1), ((True, True, False, True), 2), ((True,) * 5, 5),
])
def test_fallback_streak_counts_the_newest_answers(fallbacks: tuple[bool, ...],
                                                   streak: int) -> None:
    assert fallback_streak(fallbacks) == streak


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"^max_failed_answers must be >= 1, not 0$"):
        EscalationRules(KEYWORDS, 0)


# --- business hours -----------------------------------------------------------------------

WEEKDAYS_9_TO_18 = frozenset({"mon", "tue", "wed", "thu", "fri"})


def hours(tz: str, days: frozenset[str] = WEEKDAYS_9_TO_18) -> BusinessHours:
    return BusinessHours(True, tz, days, dt.time(9), dt.time(18))


def utc(year: int, month: int, day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC)


@pytest.mark.parametrize(("business", "at", "is_open"), [
    (hours("America/Sao_Paulo"), utc(2025, 9, 1, 12, 0), True),  # Mon 09:00 -03: opens
    (hours("America/Sao_Paulo"), utc(2025, 9, 1, 11, 59), False),  # Mon 08:59
    (hours("America/Sao_Paulo"), utc(2025, 9, 1, 20, 59), True),  # Mon 17:59
    (hours("America/Sao_Paulo"), utc(2025, 9, 1, 21, 0), False),  # Mon 18:00: closed
    (hours("America/Sao_Paulo"), utc(2025, 9, 2, 2, 0), False),  # Tue in UTC, Mon 23:00 there
    (hours("America/Sao_Paulo"), utc(2025, 9, 6, 15, 0), False),  # Saturday noon
    (hours("America/Sao_Paulo", frozenset({"sat"})), utc(2025, 9, 6, 15, 0), True),
    (hours("Asia/Tokyo"), utc(2025, 9, 1, 0, 30), True),  # 00:30 in UTC, 09:30 in Tokyo
    (hours("Asia/Tokyo"), utc(2025, 8, 31, 0, 30), False),  # Sunday 09:30 in Tokyo
    (hours("Asia/Tokyo"), utc(2025, 9, 1, 12, 0), False),  # Mon 21:00 in Tokyo
    (hours("Asia/Riyadh", frozenset({"sun", "mon", "tue", "wed", "thu"})),
     utc(2025, 8, 31, 7, 0), True),  # Sunday 10:00 in Riyadh
    (hours("Europe/Berlin"), utc(2025, 3, 31, 7, 30), True),  # Mon 09:30 CEST (after DST)
    (hours("Europe/Berlin"), utc(2025, 3, 28, 7, 30), False),  # Fri 08:30 CET (before DST)
    (hours("UTC"), dt.datetime(2025, 9, 1, 9, 0, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo")),
     False),  # an aware time in any zone: Mon 00:00 UTC
    (BusinessHours(), utc(2025, 9, 7, 3, 0), True),  # disabled: always open
])
def test_business_hours(business: BusinessHours, at: dt.datetime, is_open: bool) -> None:
    assert business.is_open(at) is is_open


def test_an_escalation_out_of_hours_is_flagged_and_a_reply_is_not() -> None:
    rules = attrs.evolve(RULES, hours=hours("America/Sao_Paulo"))
    saturday = utc(2025, 9, 6, 15, 0)
    assert decide(turn("HUMANO!", at=saturday), ctx(), rules) == Decision(
        "escalate", "keyword: humano", out_of_hours=True)
    failed = Reply("sorry?", 0.0, fallback=True, responder="rules")
    assert after_answer(turn("hi", at=saturday), ctx(fallbacks=(True,) * 2), failed,
                        rules) == Decision("escalate", "3 failed answers in a row",
                                           out_of_hours=True)
    assert decide(turn("hello", at=saturday), ctx(), rules) == Decision("reply")
    assert decide(turn("HUMANO!", at=utc(2025, 9, 1, 15, 0)), ctx(), rules) == Decision(
        "escalate", "keyword: humano")


def test_business_hours_are_judged_at_the_last_message_of_the_turn() -> None:
    rules = attrs.evolve(RULES, hours=hours("UTC"))
    last_after_closing = turn("agent", "are you there?", at=utc(2025, 9, 1, 18, 0), step_s=120)
    assert last_after_closing.messages[0].received_at.hour == 17
    assert decide(last_after_closing, ctx(), rules).out_of_hours is True


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"open": dt.time(18), "close": dt.time(9)}, r"^close must be after open \(18:00:00\)"),
    ({"days": frozenset({"mon", "funday"})}, r"^days must be among mon, .*, not \['funday'\]$"),
])
def test_bad_business_hours_are_refused(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        BusinessHours(True, "UTC", **kwargs)  # type: ignore[arg-type]


def test_unknown_time_zone_is_refused_at_construction() -> None:
    with pytest.raises(zoneinfo.ZoneInfoNotFoundError):
        BusinessHours(True, "Mars/Olympus_Mons")


# --- from the config, and the stage --------------------------------------------------------

def test_rules_from_config_refine_the_defaults_per_instance() -> None:
    base = EscalationConfig(business_hours=BusinessHoursConfig(
        enabled=True, timezone="America/Sao_Paulo", days=("mon", "sat"), open="08:30",
        close="12:00"))
    loja = InstanceConfig(name="loja", escalation_keywords=("cancelar",), max_failed_answers=2)
    rules = rules_from_config(base, loja)
    assert rules.keywords == (*base.keywords, "cancelar")
    assert rules.request_phrases == base.request_phrases
    assert (rules.max_failed_answers, rules.enabled) == (2, True)
    assert rules.hours == BusinessHours(True, "America/Sao_Paulo", frozenset({"mon", "sat"}),
                                        dt.time(8, 30), dt.time(12))
    quiet = rules_from_config(base, InstanceConfig(name="q", escalation_enabled=False))
    assert (quiet.max_failed_answers, quiet.enabled) == (3, False)


@pytest.mark.parametrize(("text", "reason"), [
    ("I want to speak to a human", "explicit request: speak to a human"),
    ("quero falar com atendente", "explicit request: falar com atendente"),
    ("hablar con un humano ya", "explicit request: hablar con un humano"),
    ("خدمة العملاء من فضلك", "explicit request: خدمة العملاء"),
    ("o gerente está?", "keyword: gerente"),
    ("preciso falar com alguem", "keyword: falar com alguem"),
    ("what is the price?", None),
])
def test_the_shipped_defaults_compile_and_match(text: str, reason: str | None) -> None:
    rules = rules_from_config(EscalationConfig(), InstanceConfig(name="demo"))
    assert rules.asks_for_human(text) == reason


async def test_the_stage_decides_with_the_instance_rules() -> None:
    stage = Escalation({"demo": RULES})
    [out] = await stage(attrs.evolve(turn("agent"), context=ctx()))
    assert out.decision == Decision("escalate", "keyword: agent")
    with pytest.raises(AssertionError, match=r"^escalation runs after the context stage$"):
        await stage(turn("agent"))


def test_reasons_name_the_configured_phrase_not_the_user_text() -> None:
    reason = RULES.asks_for_human("QUERO falar com UM atendênte")
    assert reason is not None and re.fullmatch(r"explicit request: falar com um atendente",
                                               reason)
