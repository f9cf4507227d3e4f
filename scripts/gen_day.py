#!/usr/bin/env python3
"""Generate the bundled day: a recorded message log of one busy business day.

    .venv/bin/python scripts/gen_day.py                      # writes pipeline/data/day.jsonl
    .venv/bin/python scripts/gen_day.py --seed 7 --events 10000 --out /tmp/big.jsonl

Monday 2025-09-01, 08:00-22:00 UTC, two instances of the embedded default config: ``demo``
(WhatsApp Cloud API, phone_number_id 1122334455667) and ``loja`` (Evolution API instance
"loja"). What is in it, and why:

- A daily curve with a morning peak (10-11 h) and a bigger evening peak (19-21 h).
- Senders with Zipf-like activity: a few chatty ones with dozens of messages, most with 1-3.
  English, Portuguese, Spanish and some Arabic (greetings, prices, opening hours, delivery,
  thanks, complaints, order status), written so that the default rules responder answers
  a good share and falls back on the rest (Spanish and Arabic mostly fall back).
- Bursts (2-4 messages within a second or two, one turn), impatient repeats of the same
  text (duplicates by text), media with and without captions, voice notes, documents,
  locations, contacts, stickers, reactions, interactive button/list replies, template
  quick replies, quoted replies, an unsupported type, ``@lid`` senders.
- Redeliveries of the same message id (an identical body) seconds to minutes later, many of
  them after later messages of the same sender; first deliveries that arrive after the
  sender's next message; a dropped Evolution connection whose queued messages arrive late.
- Cloud API receipts of the business's replies (sent/delivered/read/failed, some out of
  order), Evolution ``fromMe`` echoes of the business's replies and of human agents,
  ``send.message``, ``messages.update`` and ``connection.update`` events.
- Explicit requests for a human and escalation keywords in several languages.
- About 0.5 % deliberately bad lines: not JSON, unknown shapes, missing fields.

The file is in receipt order: sorted by ``received_at`` (late and redelivered messages sit
where they were received; their body timestamps are older than the lines around them).
The output depends only on ``--seed`` and ``--events``: the same arguments give the same
bytes (tests/test_day.py checks the committed file against a fresh run).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import datetime as dt
import functools
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "pipeline" / "data" / "day.jsonl"
DEFAULT_SEED = 20250901
DEFAULT_EVENTS = 3500

DAY = dt.datetime(2025, 9, 1, tzinfo=dt.UTC)
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY_START = 8 * HOUR
DAY_END = 22 * HOUR

# --- the two instances (pipeline/data/default.toml) ---------------------------------------

DEMO_PHONE_NUMBER_ID = "1122334455667"
DEMO_DISPLAY_NUMBER = "15550001122"
DEMO_WABA_ID = "102290129340398"
LOJA_INSTANCE = "loja"
LOJA_NUMBER = "5511900001234"
LOJA_INSTANCE_ID = "7d1c2a90-5b7e-4f0e-9d51-000000000001"
LOJA_NAME = "Loja Bella Massa"
EVO_DESTINATION = "https://bot.example.com/webhook/evolution"
EVO_SERVER = "https://evo.example.com"
CLOUD_HEADERS = {"content-type": "application/json", "user-agent": "facebookexternalua"}
EVO_HEADERS = {"content-type": "application/json"}

# Hourly intensity (relative), linear in between: morning and evening peaks.
CURVE = [(8, 0.3), (9, 0.8), (10, 1.3), (11, 1.45), (12, 1.1), (13, 0.95), (14, 0.7),
         (15, 0.6), (16, 0.65), (17, 0.85), (18, 1.25), (19, 1.65), (20, 1.75), (21, 1.2),
         (22, 0.5)]

# --- what people write --------------------------------------------------------------------
# Per language and intent. Comments say which default rule (if any) answers.

TEXTS: dict[str, dict[str, list[str]]] = {
    "en": {
        "greet": ["Hi", "Hello!", "Good morning", "Hey there", "Hi, good afternoon",
                  "Hello 👋", "Good evening", "hi"],
        "price": ["How much is the large pepperoni pizza?", "What's the price of the family combo?",
                  "price list please", "How much does the chocolate cake cost?",
                  "What are your prices for catering?", "how much for 2 medium pizzas?",
                  "Can you send me the price of the veggie box?", "How much is a dozen cupcakes?"],
        "hours": ["What are your opening hours?", "Are you open today?",
                  "What time do you close tonight?", "Are you open on Sunday?",
                  "When do you open tomorrow?", "Is the store open on Labor Day?",
                  "are you guys open now?"],
        "delivery": ["Do you deliver to Brooklyn?", "Can you deliver today?",
                     "Is delivery free over $30?", "How long does delivery take?",
                     "Do you deliver after 9pm?", "Do you do delivery to the airport hotels?"],
        "status": ["Where is my order? It's been an hour", "Order #58213 still hasn't arrived",
                   "Can I change my order to pick-up?",
                   "I placed an order 40 minutes ago, any update?", "is my order on the way?"],
        "other": ["Do you have gluten-free options?", "Can I pay with Apple Pay?",
                  "Is there parking nearby?", "Do you have vegan cheese?",
                  "Can I book a table for 6?", "Do you sell gift cards?"],
        "thanks": ["Thanks!", "Thank you so much", "thanks 👍", "Great, thank you!", "ok thanks",
                   "thank you!!"],
        "complaint": ["My pizza arrived cold", "The driver was really rude",
                      "You charged me twice for the same order",
                      "Wrong order again, this is the second time",
                      "I want to speak to a manager, this is unacceptable"],
        "human": ["Can I talk to a human?", "I want to speak to a human please",
                  "Is there a real person there?", "agent please", "Let me talk to a person",
                  "I need a human agent"],
        "ok": ["ok", "👍", "Perfect", "Got it", "see you", "cool"],
        "ping": ["hello?", "??", "anyone there?"],
        "followup": ["and do you deliver to Queens?", "also, are you open on Sunday?",
                     "and how much is delivery?", "for tonight", "2 of them"],
        "caption_q": ["How much is this one?", "Do you have this in stock? price?",
                      "this one please"],
        "caption_x": ["This is what I got 😕", "the receipt", "look at this"],
    },
    "pt": {
        "greet": ["Oi", "Olá, bom dia!", "Boa tarde", "Boa noite!", "Oi, tudo bem?", "Bom dia 😊",
                  "oii", "Olá"],
        "price": ["Qual o preço do bolo de chocolate?", "Quanto custa a pizza grande?",
                  "Qual o valor do combo família?", "Quanto custa o frete pro Centro?",
                  "me passa o preço da marmita fit", "valor do kit festa?",
                  "Quanto custa o salgado por cento?", "qual o preço da torta de limão?"],
        "hours": ["Qual o horário de funcionamento?", "Vocês abrem no domingo?",
                  "Que horas vocês abrem amanhã?", "Horário de sábado?",
                  "Vocês abrem hoje?", "qual o horário de vcs?"],
        "delivery": ["Vocês entregam no Butantã?", "Fazem entrega hoje?",
                     "Quanto tempo demora a entrega?", "Qual o frete pra Niterói?",
                     "Entregam depois das 21h?", "vcs entregam em Osasco?"],
        "status": ["Meu pedido ainda não chegou", "Cadê meu pedido? Já faz 1 hora",
                   "O pedido 4471 veio errado", "Posso trocar o sabor do meu pedido?",
                   "meu pedido já saiu?"],
        "other": ["Aceita pix?", "Vocês têm opção sem lactose?", "Tem estacionamento?",
                  "Tem bolo de cenoura hoje?", "Dá pra retirar na loja?",
                  "Vocês fazem bolo personalizado?"],
        "thanks": ["Obrigado!", "Obrigada 😊", "Valeu!", "muito obrigado", "valeu, obrigado",
                   "obrigada!!"],
        "complaint": ["Péssimo atendimento, ninguém responde", "Quero cancelar meu pedido",
                      "Vou fazer uma reclamação", "A pizza chegou fria e amassada",
                      "Cobraram duas vezes no meu cartão", "péssimo, veio tudo errado"],
        "human": ["Quero falar com um atendente", "Posso falar com uma pessoa?",
                  "atendente por favor", "tem algum humano aí?", "quero falar com alguém",
                  "Preciso falar com o gerente"],
        "ok": ["ok", "Blz", "Perfeito", "👍", "tá bom", "beleza"],
        "ping": ["Oi?", "alguém aí?", "??"],
        "followup": ["e vocês entregam no Morumbi?", "pra hoje", "e qual o horário de sábado?",
                     "2 unidades", "e o frete?"],
        "caption_q": ["Quanto custa esse?", "Tem esse? qual o valor?", "quero esse aqui"],
        "caption_x": ["Chegou assim 😕", "segue o comprovante", "olha isso"],
    },
    "es": {
        "greet": ["Hola", "Buenos días", "Buenas tardes!", "Hola, ¿qué tal?", "Buenas noches"],
        "price": ["¿Cuánto cuesta la pizza familiar?", "¿Precio del combo?",
                  "¿Tienen lista de precios?", "¿Cuál es el valor del envío?",
                  "how much es la torta?"],
        "hours": ["¿Cuál es el horario de atención?", "¿A qué hora cierran hoy?",
                  "¿Abren el domingo?", "¿Están abiertos ahora?"],
        "delivery": ["¿Hacen delivery a Palermo?", "¿Hacen envíos a domicilio?",
                     "¿Cuánto tarda el delivery?", "¿Llegan hasta Polanco?"],
        "status": ["Mi pedido no ha llegado", "¿Dónde está mi pedido?",
                   "El pedido 7719 llegó incompleto"],
        "other": ["¿Aceptan tarjeta?", "¿Tienen opciones veganas?", "¿Hay estacionamiento?"],
        "thanks": ["¡Gracias!", "Muchas gracias", "gracias 🙏", "mil gracias"],
        "complaint": ["El pedido llegó frío", "Me cobraron dos veces",
                      "Muy mal servicio, quiero cancelar"],
        "human": ["Quiero hablar con una persona", "¿Puedo hablar con un agente?",
                  "Necesito hablar con un humano", "quiero hablar con una persona por favor"],
        "ok": ["ok", "Perfecto", "vale", "👍", "listo"],
        "ping": ["¿Hola?", "??"],
        "followup": ["para hoy", "y el delivery?", "dos por favor"],
        "caption_q": ["¿Cuánto cuesta este?", "¿tienen este?"],
        "caption_x": ["Así llegó 😕", "el comprobante"],
    },
    "ar": {
        "greet": ["مرحبا", "السلام عليكم", "صباح الخير", "مساء الخير", "Hello"],
        "price": ["كم السعر؟", "بكم البيتزا الكبيرة؟", "ممكن قائمة الأسعار؟", "price?",
                  "How much is delivery?"],
        "hours": ["متى تفتحون؟", "ما هي ساعات العمل؟", "are you open now?"],
        "delivery": ["هل يوجد توصيل؟", "هل توصلون إلى دبي مارينا؟", "delivery to Al Barsha?"],
        "status": ["وين الطلب؟", "الطلب متأخر جداً"],
        "other": ["هل عندكم خيارات نباتية؟", "ممكن الدفع بالبطاقة؟"],
        "thanks": ["شكرا", "شكراً جزيلاً", "thank you"],
        "complaint": ["الطلب وصل بارد", "الخدمة سيئة جداً"],
        "human": ["أريد التحدث مع شخص", "اريد التحدث مع شخص", "أريد التحدث مع موظف",
                  "خدمة العملاء من فضلك", "ممكن أتكلم مع خدمة العملاء؟"],
        "ok": ["تمام", "ok", "👍", "حسنا"],
        "ping": ["؟؟", "مرحبا؟"],
        "followup": ["اليوم", "اثنين من فضلك"],
        "caption_q": ["كم سعر هذا؟", "price of this?"],
        "caption_x": ["هكذا وصل", "الإيصال"],
    },
}

# The business's answers, by the intent they answer (rules of the embedded default).
BOT_REPLIES = {
    "en": {"price": "Our prices are at https://example.com/prices.",
           "hours": "We are open Monday to Friday, 9:00 to 18:00.",
           "delivery": "We deliver within 5 km, every day until 22:00.",
           "thanks": "You are welcome!"},
    "pt": {"price": "Nossos preços estão em https://example.com/precos.",
           "hours": "Funcionamos de segunda a sexta, das 9h às 18h.",
           "delivery": "Entregamos em até 5 km, todos os dias até as 22h.",
           "thanks": "Por nada!"},
}
FALLBACK = ("Sorry, I did not understand. Could you rephrase? / "
            "Desculpe, não entendi. Pode reformular?")
HANDOVER = "A human agent will continue this conversation shortly."
AGENT_REPLIES = {
    "en": ["Hi, this is Sam from the team, let me check that for you.",
           "Sorry about that! I'm looking into your order now.",
           "Thanks for waiting. Your order left the store 5 minutes ago.",
           "I've issued a refund for the duplicate charge."],
    "pt": ["Olá! Aqui é a Camila, vou verificar seu pedido.",
           "Desculpe a demora, já estou vendo aqui.",
           "Seu pedido saiu para entrega agora há pouco.",
           "Fizemos o estorno da cobrança duplicada."],
    "es": ["Hola, soy Lucía del equipo, ya reviso tu pedido.",
           "Disculpa la demora, tu pedido ya salió."],
    "ar": ["مرحبا، معك سارة من فريق خدمة العملاء. كيف أقدر أساعدك؟",
           "نعتذر عن التأخير، الطلب في الطريق."],
}
BUTTONS = {"en": ["Prices", "Opening hours", "Delivery", "Talk to an agent", "Yes", "No"],
           "pt": ["Preços", "Horário", "Entrega", "Falar com atendente", "Sim", "Não"],
           "es": ["Precios", "Horario", "Delivery", "Sí", "No"],
           "ar": ["Prices", "Delivery", "نعم", "لا"]}
LIST_ROWS = {"en": ["Menu & prices", "Delivery areas", "Order status", "Store hours"],
             "pt": ["Cardápio e preços", "Áreas de entrega", "Status do pedido", "Horário"],
             "es": ["Menú y precios", "Zonas de delivery", "Estado del pedido"],
             "ar": ["Menu & prices", "Delivery areas"]}
TEMPLATE_BUTTONS = ["Yes, I'm interested", "Stop promotions", "Quero o cupom", "Sim, confirmo"]
EMOJIS = ["👍", "❤️", "🙏", "😂", "😮", "👏"]
PLACES = [(-23.5614, -46.6559, "Av. Paulista, 1578", "Bela Vista, São Paulo - SP"),
          (-23.5870, -46.6820, None, None), (40.6782, -73.9442, "Home", "Brooklyn, NY 11213"),
          (-22.8833, -43.1036, None, None), (25.0805, 55.1403, "Dubai Marina", None),
          (-34.5889, -58.4307, "Palermo Soho", "Buenos Aires"), (19.4326, -99.1332, None, None)]
DOCUMENTS = [("comprovante_pix.pdf", "application/pdf"),
             ("nota_fiscal_8841.pdf", "application/pdf"), ("invoice_58213.pdf", "application/pdf"),
             ("pedido_festa.docx",
              "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
             ("receipt.pdf", "application/pdf")]
SHARED_CONTACTS = ["Carlos Pereira", "Mom", "Ana (trabalho)", "Jorge Ramírez"]

NAMES = {
    "en": (["Emily", "Michael", "Sarah", "David", "Jessica", "Chris", "Ashley", "Matt", "Olivia",
            "James", "Megan", "Ryan", "Lauren", "Tom", "Hannah", "Kevin", "Priya", "Jordan"],
           ["Clarke", "Chen", "Johnson", "Smith", "Brown", "Miller", "Davis", "Patel", "Wilson",
            "Taylor", "Nguyen", "Lee", "Walker", "O'Brien", "Garcia"]),
    "pt": (["Ana", "Bruno", "Carla", "Diego", "Mariana", "Pedro", "Juliana", "Rafael", "Lucas",
            "Fernanda", "Gabriel", "Beatriz", "Thiago", "Camila", "Rodrigo", "Larissa", "Felipe",
            "Patrícia", "João", "Letícia", "Gustavo", "Aline"],
           ["Souza", "Lima", "Mendes", "Alves", "Costa", "Santos", "Rocha", "Oliveira", "Ferreira",
            "Pereira", "Ribeiro", "Carvalho", "Gomes", "Martins", "Araújo", "Barbosa"]),
    "es": (["Sofía", "Mateo", "Valentina", "Santiago", "Camila", "Diego", "Lucía", "Martín",
            "Isabella", "Javier", "Daniela", "Andrés"],
           ["García", "Rodríguez", "Martínez", "López", "González", "Hernández", "Pérez",
            "Sánchez", "Romero", "Torres"]),
    "ar": (["Ahmed", "Fatima", "Omar", "Layla", "Youssef", "Mariam", "Khalid", "Noor", "محمد",
            "سارة", "علي", "ريم"],
           ["Al-Mansoori", "Haddad", "Nasser", "Khalil", "Saleh", "", "", ""]),
}
NAME_DECORATIONS = ["", "", "", "", "", " 🌸", " ✨", " 🇧🇷", " ⚽"]

# Instance and language mix of the senders.
INSTANCE_SHARE = [("demo", 0.55), ("loja", 0.45)]
LANGS = {"demo": [("en", 0.45), ("pt", 0.22), ("es", 0.2), ("ar", 0.13)],
         "loja": [("pt", 0.78), ("es", 0.1), ("en", 0.07), ("ar", 0.05)]}


# --- small helpers ------------------------------------------------------------------------


def pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    values = [value for value, _ in weighted]
    weights = [weight for _, weight in weighted]
    return rng.choices(values, weights)[0]


def iso(ms: int) -> str:
    moment = DAY + dt.timedelta(milliseconds=ms)
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def unix(ms: int) -> int:
    return int((DAY + dt.timedelta(milliseconds=ms)).timestamp())


def hexid(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789ABCDEF") for _ in range(n))


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def sha256_b64(rng: random.Random) -> str:
    return base64.b64encode(bytes(rng.randrange(256) for _ in range(32))).decode()


class Ids:
    """Message ids that look like the real ones, never repeated by accident."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        while (value := make()) in self.used:
            pass
        self.used.add(value)
        return value

    def _wamid(self, phone: str, direction: int, inner: str) -> str:
        raw = (b"\x1c\x18" + bytes([len(phone)]) + phone.encode() + b"\x15\x02\x00"
               + bytes([direction]) + b"\x18" + bytes([len(inner)]) + inner.encode() + b"\x00")
        return "wamid." + base64.b64encode(raw).decode()

    def cloud_in(self, phone: str, source: str) -> str:
        """An inbound wamid: the sender's number and the device's own message id inside."""
        rng = self.rng

        def inner() -> str:
            if source == "ios":
                return "3A" + hexid(rng, 18)
            if source == "web":
                return "3EB0" + hexid(rng, 16)
            return hexid(rng, 32)

        return self._fresh(lambda: self._wamid(phone, 0x12, inner()))

    def cloud_out(self, phone: str) -> str:
        return self._fresh(lambda: self._wamid(phone, 0x11, hexid(self.rng, 18)))

    def evo_in(self) -> str:
        return self._fresh(lambda: "3EB0" + hexid(self.rng, 16))

    def evo_api(self) -> str:
        """What Baileys gives a message sent through the API."""
        return self._fresh(lambda: "BAE5" + hexid(self.rng, 12))

    def media(self) -> str:
        return self._fresh(lambda: str(self.rng.randrange(10**15, 10**16)))

    def cuid(self) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        return self._fresh(lambda: "cm" + "".join(self.rng.choice(alphabet) for _ in range(23)))


# --- senders ------------------------------------------------------------------------------


@dataclass
class Sender:
    instance: str
    lang: str
    number: str  # wa_id digits; for a lid sender, the lid digits
    name: str | None
    source: str  # android, ios or web
    budget: int  # user messages over the day
    lid: bool = False
    escalated: bool = False
    last_reply: str | None = None  # id of the business's latest message to them
    last_interactive: str | None = None

    @property
    def jid(self) -> str:
        return f"{self.number}@lid" if self.lid else f"{self.number}@s.whatsapp.net"


def phone_number(rng: random.Random, lang: str, instance: str) -> str:
    if lang == "pt":
        if rng.random() < 0.08:
            return "3519" + digits(rng, 8)  # Portugal
        ddd = rng.choice(["11", "11", "11", "21", "31", "41", "48", "51", "61", "71", "81", "85"])
        return "55" + ddd + "9" + digits(rng, 8)
    if lang == "en":
        if rng.random() < 0.3:
            return "447700900" + digits(rng, 3)  # UK drama range
        area = rng.choice(["212", "646", "718", "415", "305", "312", "713", "617"])
        return "1" + area + "555" + digits(rng, 4)
    if lang == "es":
        country = rng.choice(["mx", "mx", "ar", "es", "co"])
        if country == "mx":
            return "521" + rng.choice(["55", "33", "81"]) + digits(rng, 8)
        if country == "ar":
            return "54911" + digits(rng, 8)
        if country == "es":
            return "346" + digits(rng, 8)
        return "573" + digits(rng, 9)
    country = rng.choice(["ae", "ae", "sa", "eg", "ma"])
    if country == "ae":
        return "9715" + digits(rng, 8)
    if country == "sa":
        return "9665" + digits(rng, 8)
    if country == "eg":
        return "201" + rng.choice("0125") + digits(rng, 8)
    return "2126" + digits(rng, 8)


def person_name(rng: random.Random, lang: str) -> str | None:
    if rng.random() < 0.04:
        return None  # no profile name
    first, last = NAMES[lang]
    name = rng.choice(first)
    surname = rng.choice(last)
    if surname and rng.random() < 0.7:
        name = f"{name} {surname}"
    return name + rng.choice(NAME_DECORATIONS)


def make_senders(rng: random.Random, count: int, scale: float) -> list[Sender]:
    """``count`` senders; the k-th most active gets about ``scale / (k + 2)^1.1`` messages
    more than the 1-3 everyone sends (Zipf-Mandelbrot), at most 80."""
    senders: list[Sender] = []
    numbers: set[str] = set()
    lids = 0
    for rank in range(1, count + 1):
        instance = pick(rng, INSTANCE_SHARE)
        lang = pick(rng, LANGS[instance])
        lid = instance == "loja" and lids < 3 and rng.random() < 0.02
        while True:
            number = ("2" + digits(rng, 13)) if lid else phone_number(rng, lang, instance)
            if number not in numbers:
                numbers.add(number)
                break
        lids += lid
        base = pick(rng, [(1, 0.62), (2, 0.26), (3, 0.12)])
        extra = scale / (rank + 2) ** 1.1
        budget = min(80, base + int(extra) + (rng.random() < extra - int(extra)))
        source = pick(rng, [("android", 0.62), ("ios", 0.3), ("web", 0.08)])
        senders.append(Sender(instance, lang, number, person_name(rng, lang), source, budget,
                              lid=lid))
    if lids == 0:  # always at least one @lid sender
        for sender in senders:
            if sender.instance == "loja":
                sender.lid = True
                sender.number = "2" + digits(rng, 13)
                break
    rng.shuffle(senders)
    return senders


# --- events -------------------------------------------------------------------------------


@dataclass
class Event:
    at: int  # received_at, ms after midnight UTC
    fmt: str
    body: Any = None
    raw: str | None = None  # a deliberately bad line, written as is
    kind: str = "message"  # message, redelivery, receipt, echo, update, other, malformed
    sender: str | None = None
    message_id: str | None = None
    sent_ms: int | None = None
    seq: int = 0
    tags: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        if self.raw is not None:
            return self.raw
        record = {"received_at": iso(self.at), "format": self.fmt,
                  "headers": CLOUD_HEADERS if self.fmt == "cloud-api" else EVO_HEADERS,
                  "body": self.body}
        return json.dumps(record, ensure_ascii=False)


def cloud_envelope(value: dict[str, Any]) -> dict[str, Any]:
    return {"object": "whatsapp_business_account",
            "entry": [{"id": DEMO_WABA_ID, "changes": [{"value": value, "field": "messages"}]}]}


def cloud_metadata() -> dict[str, str]:
    return {"display_phone_number": DEMO_DISPLAY_NUMBER, "phone_number_id": DEMO_PHONE_NUMBER_ID}


def cloud_message_body(sender: Sender, message: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = {"messaging_product": "whatsapp", "metadata": cloud_metadata()}
    if sender.name is not None:
        value["contacts"] = [{"profile": {"name": sender.name}, "wa_id": sender.number}]
    else:
        value["contacts"] = [{"profile": {}, "wa_id": sender.number}]
    value["messages"] = [message]
    return cloud_envelope(value)


def cloud_status_body(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    return cloud_envelope({"messaging_product": "whatsapp", "metadata": cloud_metadata(),
                           "statuses": statuses})


def evo_envelope(event: str, data: dict[str, Any], at: int, rng: random.Random) -> dict[str, Any]:
    return {"event": event, "instance": LOJA_INSTANCE, "data": data,
            "destination": EVO_DESTINATION, "date_time": iso(at - rng.randrange(15, 180)),
            "sender": f"{LOJA_NUMBER}@s.whatsapp.net", "server_url": EVO_SERVER, "apikey": "***"}


def evo_upsert_data(jid: str, from_me: bool, message_id: str, push_name: str | None,
                    message: dict[str, Any], message_type: str, sent_ms: int, source: str,
                    context_info: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"key": {"remoteJid": jid, "fromMe": from_me, "id": message_id}}
    if push_name is not None:
        data["pushName"] = push_name
    data["status"] = "SERVER_ACK" if from_me else "DELIVERY_ACK"
    data["message"] = message
    data["contextInfo"] = context_info
    data["messageType"] = message_type
    data["messageTimestamp"] = unix(sent_ms)
    data["instanceId"] = LOJA_INSTANCE_ID
    data["source"] = source
    return data


# --- what one user message looks like in each format ----------------------------------------


@dataclass
class Spec:
    """One user message before it is put in a format."""

    type: str  # text, image, audio, video, document, sticker, location, contacts,
    #            button_reply, list_reply, template_button, reaction, unsupported
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    gap_ms: int | None = None  # time after the previous message of the turn
    intent: str = "other"
    quote: bool = False


def cloud_message(ids: Ids, rng: random.Random, sender: Sender, spec: Spec, sent_ms: int,
                  message_id: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"from": sender.number, "id": message_id,
                           "timestamp": str(unix(sent_ms)), "type": spec.type}
    context = None
    if spec.quote and sender.last_reply:
        context = {"from": DEMO_DISPLAY_NUMBER, "id": sender.last_reply}
    kind = spec.type
    if kind == "text":
        msg["text"] = {"body": spec.text}
    elif kind in ("image", "video", "document", "audio", "sticker"):
        media: dict[str, Any] = {}
        if spec.text and kind != "audio":
            media["caption"] = spec.text
        if kind == "document":
            media["filename"] = spec.extra["filename"]
        mime = {"image": "image/jpeg", "video": "video/mp4", "audio": "audio/ogg; codecs=opus",
                "sticker": "image/webp"}.get(kind, spec.extra.get("mime", "application/pdf"))
        media.update({"mime_type": mime, "sha256": sha256_b64(rng), "id": ids.media()})
        if kind == "audio":
            media["voice"] = spec.extra.get("voice", True)
        if kind == "sticker":
            media["animated"] = False
        msg[kind] = media
    elif kind == "location":
        lat, long, name, address = spec.extra["place"]
        loc: dict[str, Any] = {"latitude": lat, "longitude": long}
        if name:
            loc["name"] = name
        if address:
            loc["address"] = address
        msg["location"] = loc
    elif kind == "contacts":
        first = spec.text.split(" ")[0]
        msg["contacts"] = [{"name": {"first_name": first, "formatted_name": spec.text},
                            "phones": [{"phone": "+" + spec.extra["phone"], "type": "CELL",
                                        "wa_id": spec.extra["phone"]}]}]
    elif kind in ("button_reply", "list_reply"):
        msg["type"] = "interactive"
        reply = {"id": spec.extra["choice_id"], "title": spec.text}
        if kind == "list_reply":
            reply["description"] = spec.extra.get("description", "")
        msg["interactive"] = {"type": kind, kind: reply}
        context = {"from": DEMO_DISPLAY_NUMBER,
                   "id": sender.last_interactive or sender.last_reply or ids.cloud_out(
                       sender.number)}
    elif kind == "template_button":
        msg["type"] = "button"
        msg["button"] = {"payload": spec.extra["payload"], "text": spec.text}
        context = {"from": DEMO_DISPLAY_NUMBER, "id": ids.cloud_out(sender.number)}
    elif kind == "reaction":
        msg["reaction"] = {"message_id": spec.extra["target"], "emoji": spec.text}
    elif kind == "unsupported":
        msg["errors"] = [{"code": 131051, "title": "Message type unknown",
                          "message": "Message type unknown",
                          "error_data": {"details": "Message type is currently not supported."}}]
    if context is not None:
        msg = {"context": context, **msg}
    return msg


def evo_message(rng: random.Random, sender: Sender, spec: Spec, sent_ms: int
                ) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
    """``message``, ``messageType`` and ``contextInfo`` of an Evolution upsert."""
    kind = spec.type
    context = None
    if spec.quote and sender.last_reply:
        context = {"stanzaId": sender.last_reply, "participant": f"{LOJA_NUMBER}@s.whatsapp.net",
                   "quotedMessage": {"conversation": spec.extra.get("quoted", "...")}}
    enc = f"https://mmg.whatsapp.net/v/t62.7118-24/{rng.randrange(10**8, 10**9)}.enc"
    if kind == "text":
        return {"conversation": spec.text}, "conversation", context
    if kind == "image":
        part: dict[str, Any] = {"url": enc, "mimetype": "image/jpeg"}
        if spec.text:
            part["caption"] = spec.text
        part.update({"fileLength": str(rng.randrange(40_000, 400_000)), "height": 1280,
                     "width": rng.choice([720, 960, 1280])})
        return {"imageMessage": part}, "imageMessage", context
    if kind == "video":
        part = {"url": enc, "mimetype": "video/mp4", "seconds": rng.randrange(3, 40)}
        if spec.text:
            part["caption"] = spec.text
        return {"videoMessage": part}, "videoMessage", context
    if kind == "audio":
        part = {"url": enc, "mimetype": "audio/ogg; codecs=opus",
                "seconds": rng.randrange(2, 60), "ptt": spec.extra.get("voice", True),
                "fileLength": str(rng.randrange(4_000, 90_000))}
        return {"audioMessage": part}, "audioMessage", context
    if kind == "sticker":
        part = {"url": enc, "mimetype": "image/webp", "isAnimated": False}
        return {"stickerMessage": part}, "stickerMessage", context
    if kind == "document":
        filename = spec.extra["filename"]
        part = {"url": enc, "mimetype": spec.extra.get("mime", "application/pdf"),
                "title": filename, "fileName": filename,
                "fileLength": str(rng.randrange(20_000, 300_000)), "pageCount": 1}
        if spec.text:
            part["caption"] = spec.text
        return {"documentMessage": part}, "documentMessage", context
    if kind == "location":
        lat, long, name, address = spec.extra["place"]
        part = {"degreesLatitude": lat, "degreesLongitude": long}
        if name:
            part["name"] = name
        if address:
            part["address"] = address
        return {"locationMessage": part}, "locationMessage", context
    if kind == "contacts":
        phone = spec.extra["phone"]
        vcard = (f"BEGIN:VCARD\nVERSION:3.0\nFN:{spec.text}\n"
                 f"TEL;type=CELL;waid={phone}:+{phone}\nEND:VCARD")
        return ({"contactMessage": {"displayName": spec.text, "vcard": vcard}},
                "contactMessage", context)
    if kind in ("list_reply", "button_reply"):
        part = {"title": spec.text, "listType": 1,
                "singleSelectReply": {"selectedRowId": spec.extra["choice_id"]}}
        return {"listResponseMessage": part}, "listResponseMessage", context
    if kind == "reaction":
        part = {"key": {"remoteJid": sender.jid, "fromMe": True, "id": spec.extra["target"]},
                "text": spec.text, "senderTimestampMs": str(unix(sent_ms) * 1000)}
        return {"reactionMessage": part}, "reactionMessage", context
    raise ValueError(kind)


# --- conversations ------------------------------------------------------------------------

TURN_KINDS = [("question", 0.42), ("unanswerable", 0.14), ("media", 0.11), ("location", 0.04),
              ("interactive", 0.05), ("reaction", 0.045), ("complaint", 0.045), ("human", 0.03),
              ("ok", 0.06), ("ping", 0.04), ("odd", 0.02)]
FIRST_KINDS = [("greet_question", 0.36), ("greet", 0.11), ("question", 0.36), ("human", 0.025),
               ("media", 0.08), ("interactive", 0.05), ("unanswerable", 0.045)]
QUESTION_INTENTS = [("price", 0.38), ("hours", 0.27), ("delivery", 0.35)]


class Conversations:
    """Writes what each sender says, turn by turn."""

    def __init__(self, rng: random.Random, ids: Ids) -> None:
        self.rng = rng
        self.ids = ids

    def text(self, sender: Sender, intent: str) -> str:
        lang = sender.lang
        if lang == "ar" and intent in ("price", "hours", "delivery", "thanks", "greet") \
                and self.rng.random() < 0.3:
            lang = "en"  # many Arabic speakers write to a business in English
        return self.rng.choice(TEXTS[lang][intent])

    def question(self, sender: Sender) -> Spec:
        intent = pick(self.rng, QUESTION_INTENTS)
        return Spec("text", self.text(sender, intent), intent=intent,
                    quote=self.rng.random() < 0.04)

    def turn(self, sender: Sender, kind: str) -> list[Spec]:
        rng = self.rng
        if kind == "greet_question":
            specs = [Spec("text", self.text(sender, "greet"), intent="greet"),
                     self.question(sender)]
            if rng.random() < 0.25:
                specs.append(Spec("text", self.text(sender, "followup"), intent="followup"))
            return specs
        if kind == "greet":
            return [Spec("text", self.text(sender, "greet"), intent="greet")]
        if kind == "question":
            specs = [self.question(sender)]
            if rng.random() < 0.14:  # a burst: the question in pieces
                specs.append(Spec("text", self.text(sender, "followup"), intent="followup"))
                if rng.random() < 0.3:
                    specs.append(Spec("text", "?" if rng.random() < 0.5 else
                                      self.text(sender, "followup"), intent="followup"))
            return specs
        if kind == "unanswerable":
            return [Spec("text", self.text(sender, pick(rng, [("status", 0.5), ("other", 0.5)])),
                         intent="status", quote=rng.random() < 0.08)]
        if kind in ("complaint", "human", "ok", "thanks"):
            specs = [Spec("text", self.text(sender, kind), intent=kind)]
            if kind in ("complaint", "human") and rng.random() < 0.25:  # said twice, impatient
                specs.append(Spec("text", specs[0].text, intent=kind,
                                  gap_ms=rng.randrange(4_000, 25_000)))
            return specs
        if kind == "ping":
            text = self.text(sender, "ping")
            again = rng.randrange(3_000, 25_000) if rng.random() < 0.75 \
                else rng.randrange(40_000, 180_000)
            return [Spec("text", text, intent="ping"),
                    Spec("text", text, intent="ping", gap_ms=again)]
        if kind == "media":
            return self.media(sender)
        if kind == "location":
            place = rng.choice(PLACES)
            specs = [Spec("location", extra={"place": place}, intent="location")]
            if rng.random() < 0.5:
                specs.insert(0, Spec("text", rng.choice(
                    {"pt": ["minha localização", "entrega aqui?"],
                     "es": ["mi ubicación"], "ar": ["موقعي"]}.get(
                        sender.lang, ["here's my location", "deliver here?"])),
                    intent="delivery"))
            return specs
        if kind == "interactive":
            if sender.instance == "loja" and rng.random() < 0.7:
                return [self.question(sender)]  # Evolution numbers rarely send menus
            return [self.interactive(sender)]
        if kind == "reaction":  # the target is known when the message is sent
            emoji = "" if rng.random() < 0.1 else rng.choice(EMOJIS)
            return [Spec("reaction", emoji, intent="reaction")]
        if kind == "odd":
            options = ["sticker", "contacts"] + (["unsupported"] * (sender.instance == "demo"))
            choice = rng.choice(options)
            if choice == "contacts":
                phone = phone_number(rng, sender.lang, sender.instance)
                return [Spec("contacts", rng.choice(SHARED_CONTACTS), extra={"phone": phone},
                             intent="contacts")]
            return [Spec(choice, intent=choice)]
        raise ValueError(kind)

    def media(self, sender: Sender) -> list[Spec]:
        rng = self.rng
        what = pick(rng, [("image_q", 0.24), ("image_then_text", 0.12), ("image_x", 0.1),
                          ("image_bare", 0.08), ("audio", 0.3), ("document", 0.11),
                          ("video", 0.05)])
        if what == "image_q":
            return [Spec("image", self.text(sender, "caption_q"), intent="price")]
        if what == "image_x":
            return [Spec("image", self.text(sender, "caption_x"), intent="complaint")]
        if what == "image_bare":
            return [Spec("image", intent="media")]
        if what == "image_then_text":
            return [Spec("image", intent="media"),
                    Spec("text", self.text(sender, "caption_q"), intent="price")]
        if what == "audio":
            specs = [Spec("audio", extra={"voice": rng.random() < 0.9}, intent="media")]
            if rng.random() < 0.25:
                specs.append(Spec("audio", extra={"voice": True}, intent="media"))
            return specs
        if what == "video":
            return [Spec("video", self.text(sender, "caption_x") if rng.random() < 0.5 else "",
                         intent="media")]
        filename, mime = rng.choice(DOCUMENTS)
        caption = self.text(sender, "caption_x") if rng.random() < 0.5 else ""
        return [Spec("document", caption, extra={"filename": filename, "mime": mime},
                     intent="media")]

    def interactive(self, sender: Sender) -> Spec:
        rng = self.rng
        if sender.instance == "demo" and rng.random() < 0.12:
            text = rng.choice(TEMPLATE_BUTTONS)
            return Spec("template_button", text, extra={"payload": "promo_" + hexid(rng, 6)},
                        intent="button")
        if rng.random() < 0.6:
            title = rng.choice(BUTTONS[sender.lang])
            choice = title.lower().replace(" ", "_")
            return Spec("button_reply", title, extra={"choice_id": "btn_" + choice[:16]},
                        intent="button")
        title = rng.choice(LIST_ROWS[sender.lang])
        return Spec("list_reply", title, extra={"choice_id": "row_" + hexid(rng, 4).lower(),
                                                "description": ""}, intent="button")

    def session(self, sender: Sender, budget: int) -> list[list[Spec]]:
        """A visit: a few turns, ending with thanks or an ok now and then."""
        rng = self.rng
        turns: list[list[Spec]] = []
        used = 0
        first = True
        target = min(budget, 1 + int(rng.expovariate(1 / 2.2)))
        while used < target:
            kind = pick(rng, FIRST_KINDS) if first else pick(rng, TURN_KINDS)
            if not first and used >= 2 and rng.random() < 0.3:
                kind = "thanks"
            first = False
            specs = self.turn(sender, kind)
            turns.append(specs)
            used += len(specs)
            if kind == "thanks":
                break
        return turns


# --- the business side ----------------------------------------------------------------------


def bot_reply(sender: Sender, specs: list[Spec]) -> str:
    if sender.escalated:
        return HANDOVER
    lang = "pt" if sender.lang in ("pt", "es") else "en"
    for spec in specs:
        answer = BOT_REPLIES[lang].get(spec.intent)
        if answer:
            return answer
    return FALLBACK


# --- the generator ------------------------------------------------------------------------


class Day:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids = Ids(self.rng)
        self.talk = Conversations(self.rng, self.ids)
        self.events: list[Event] = []
        self.minutes, self.cumulative = self._curve()

    @staticmethod
    def _curve() -> tuple[list[int], list[float]]:
        minutes, cumulative, total = [], [], 0.0
        for minute in range(DAY_START // MIN, DAY_END // MIN):
            hour = minute / 60
            index = min(int(hour) - 8, len(CURVE) - 2)
            (h0, w0), (_h1, w1) = CURVE[index], CURVE[index + 1]
            total += w0 + (w1 - w0) * (hour - h0)
            minutes.append(minute)
            cumulative.append(total)
        return minutes, [value / total for value in cumulative]

    def moment(self) -> int:
        """A time of day drawn from the daily curve."""
        index = bisect.bisect_left(self.cumulative, self.rng.random())
        return self.minutes[min(index, len(self.minutes) - 1)] * MIN + self.rng.randrange(MIN)

    def add(self, event: Event) -> Event:
        self.events.append(event)
        return event

    # ---- users

    def run(self, senders: list[Sender]) -> None:
        for sender in senders:
            budget = sender.budget
            sessions = []
            while budget > 0:
                turns = self.talk.session(sender, budget)
                budget -= sum(len(turn) for turn in turns)
                sessions.append(turns)
            starts = sorted(self.moment() for _ in sessions)
            ready = DAY_START
            for start, turns in zip(starts, sessions, strict=True):
                start = max(start, ready)
                if start > DAY_END - 3 * MIN:
                    break
                ready = self.play(sender, turns, start) + self.rng.randrange(8 * MIN, 40 * MIN)

    def play(self, sender: Sender, turns: list[list[Spec]], start: int) -> int:
        """Put one session on the clock; return when it ended."""
        rng = self.rng
        at = start
        last = start
        for number, specs in enumerate(turns):
            if number:
                at = last + rng.randrange(1_700, 4_000) + int(
                    min(6 * MIN, rng.lognormvariate(math.log(35_000), 0.9)))
            if at >= DAY_END - 30 * SEC:
                break
            sent: list[Event] = []
            for index, spec in enumerate(specs):
                if index:
                    at += spec.gap_ms if spec.gap_ms is not None else rng.randrange(250, 1_300)
                sent.append(self.user_message(sender, spec, at))
            self.late_first_delivery(sent)
            for event in sent:
                if rng.random() < 0.03:
                    self.redeliver(event)
            last = at
            if any(spec.intent in ("human",) for spec in specs) or (
                    any(spec.intent == "complaint" for spec in specs) and rng.random() < 0.5):
                first_time = not sender.escalated
                sender.escalated = True
                if first_time:
                    self.business_reply(sender, specs, at, HANDOVER, bot=True)
                    continue
            if sender.escalated:
                if rng.random() < 0.7:
                    delay = rng.randrange(40 * SEC, 6 * MIN)
                    self.business_reply(sender, specs, at + delay,
                                        rng.choice(AGENT_REPLIES[sender.lang]), bot=False)
                    last = at + delay
            else:
                self.business_reply(sender, specs, at, bot_reply(sender, specs), bot=True)
        return last

    def user_message(self, sender: Sender, spec: Spec, at: int) -> Event:
        rng = self.rng
        sent_ms = at - rng.randrange(250, 2_500)
        if spec.type == "reaction":  # to the business's latest message, if there is one
            if sender.last_reply is None:
                spec = Spec("text", rng.choice(TEXTS[sender.lang]["ok"]), intent="ok")
            else:
                spec.extra["target"] = sender.last_reply
        if sender.instance == "demo":
            message_id = self.ids.cloud_in(sender.number, sender.source)
            body = cloud_message_body(sender, cloud_message(self.ids, rng, sender, spec, sent_ms,
                                                            message_id))
            fmt = "cloud-api"
        else:
            message_id = self.ids.evo_in()
            message, message_type, context = evo_message(rng, sender, spec, sent_ms)
            data = evo_upsert_data(sender.jid, False, message_id, sender.name, message,
                                   message_type, sent_ms, sender.source, context)
            body = evo_envelope("messages.upsert", data, at, rng)
            fmt = "evolution"
        event = self.add(Event(at, fmt, body, kind="message", sender=sender.jid,
                               message_id=message_id, sent_ms=sent_ms,
                               tags={"type": spec.type, "intent": spec.intent,
                                     "lang": sender.lang}))
        return event

    def redeliver(self, event: Event, delay: tuple[int, int] | None = None) -> None:
        """The same body again: WhatsApp and Evolution retry a webhook they think failed."""
        rng = self.rng
        if delay is None and event.fmt == "cloud-api":
            delay = pick(rng, [((400, 3 * SEC), 0.15), ((1 * MIN, 5 * MIN), 0.55),
                               ((5 * MIN, 20 * MIN), 0.3)])
        elif delay is None:
            delay = pick(rng, [((200, 2 * SEC), 0.4), ((1 * MIN, 10 * MIN), 0.6)])
        at = event.at + rng.randrange(*delay)
        if at < DAY_END:
            self.add(Event(at, event.fmt, event.body, kind="redelivery", sender=event.sender,
                           message_id=event.message_id, sent_ms=event.sent_ms))

    def late_first_delivery(self, sent: list[Event]) -> None:
        """Now and then a message's first delivery lands after the sender's next message."""
        if len(sent) >= 2 and self.rng.random() < 0.06:
            first, second = sent[0], sent[1]
            first.at = second.at + self.rng.randrange(300, 4_000)
            first.tags["late"] = True

    def vignettes(self, senders: list[Sender]) -> None:
        """A few scripted conversations, so that every seed has them."""
        taken = {sender.number for sender in senders}

        def newcomer(instance: str, lang: str, name: str) -> Sender:
            while (number := phone_number(self.rng, lang, instance)) in taken:
                pass
            taken.add(number)
            return Sender(instance, lang, number, name, "android", 0)

        text = functools.partial(Spec, "text")
        # An Arabic speaker asks for prices, gets the fallback, asks for a person.
        layla = newcomer("demo", "ar", "Layla Haddad")
        self.play(layla, [[text("مرحبا", intent="greet"), text("كم السعر؟", intent="price")],
                          [text("أريد التحدث مع شخص", intent="human")],
                          [text("شكرا", intent="thanks")]], 19 * HOUR + 42 * MIN + 7_310)
        # A redelivery that arrives after the sender's next message.
        mariana = newcomer("loja", "pt", "Mariana Costa")
        start = 10 * HOUR + 5 * MIN + 1_120
        self.play(mariana, [[text("Oi, quanto custa o bolo de chocolate?", intent="price")],
                            [text("e vocês entregam no Butantã?", intent="delivery")],
                            [text("Obrigada!", intent="thanks")]], start)
        first = next(event for event in self.events
                     if event.sender == mariana.jid and event.kind == "message")
        self.redeliver(first, (3 * MIN, 4 * MIN))
        # A Spanish speaker on the Cloud API number wants a human straight away.
        mateo = newcomer("demo", "es", "Mateo Pérez")
        self.play(mateo, [[text("Necesito hablar con un humano", intent="human")],
                          [text("¿Hola?", intent="ping")]], 12 * HOUR + 31 * MIN + 4_500)

    # ---- the business

    def business_reply(self, sender: Sender, specs: list[Spec], at: int, text: str,
                       *, bot: bool) -> None:
        rng = self.rng
        reply_at = at + (1_500 + rng.randrange(150, 1_400) if bot else 0)
        if sender.instance == "demo":
            reply_id = self.ids.cloud_out(sender.number)
            self.receipts(sender, reply_id, reply_at, bot)
            if bot and rng.random() < 0.15 and not sender.escalated:
                sender.last_interactive = reply_id
        else:
            reply_id = self.ids.evo_api() if bot else self.ids.evo_in()
            self.echo(sender, reply_id, reply_at, text, bot)
        sender.last_reply = reply_id

    def receipts(self, sender: Sender, reply_id: str, at: int, bot: bool) -> None:
        """Cloud API statuses of one outgoing message: sent, delivered, read, or failed."""
        rng = self.rng
        conversation = {"id": hashlib.md5(f"{sender.number}".encode()).hexdigest(),
                        "origin": {"type": "service"}}
        pricing = {"billable": True, "pricing_model": "CBP", "category": "service"}

        def status(state: str, when: int) -> dict[str, Any]:
            item: dict[str, Any] = {"id": reply_id, "status": state,
                                    "timestamp": str(unix(when - rng.randrange(100, 900))),
                                    "recipient_id": sender.number}
            if state in ("sent", "delivered"):
                item["conversation"] = conversation
                item["pricing"] = pricing
            if state == "failed":
                code, title = rng.choice([
                    (131026, "Message undeliverable"),
                    (131000, "Something went wrong"),
                    (130472, "User's number is part of an experiment")])
                item["errors"] = [{"code": code, "title": title, "message": title,
                                   "error_data": {"details": title + "."}}]
            return item

        def emit(state: str, when: int) -> None:
            if when < DAY_END:
                self.add(Event(when, "cloud-api", cloud_status_body([status(state, when)]),
                               kind="receipt", sender=sender.number, message_id=reply_id,
                               tags={"status": state}))

        sent_at = at + rng.randrange(250, 900)
        if rng.random() < 0.018:
            if rng.random() < 0.5:
                emit("sent", sent_at)
            emit("failed", sent_at + rng.randrange(300, 20_000))
            return
        delivered_at = sent_at + rng.randrange(200, 4_000)
        if rng.random() < 0.08:  # Meta sends them in parallel: delivered can win
            delivered_at = sent_at - rng.randrange(20, 600)
        read_at = delivered_at + int(min(45 * MIN, rng.lognormvariate(math.log(25_000), 1.2)))
        if rng.random() < 0.03:
            read_at = delivered_at - rng.randrange(10, 400)
        keep = 0.5 if bot else 0.8
        if rng.random() < keep:
            emit("sent", sent_at)
        if rng.random() < keep:
            emit("delivered", delivered_at)
        if rng.random() < keep * 0.8:
            emit("read", read_at)

    def echo(self, sender: Sender, reply_id: str, at: int, text: str, bot: bool) -> None:
        """Evolution: the business's own message comes back (fromMe), then its updates."""
        rng = self.rng
        when = at + rng.randrange(150, 900)
        if not bot or rng.random() < 0.5:
            source = "unknown" if bot else "web"
            data = evo_upsert_data(sender.jid, True, reply_id, LOJA_NAME,
                                   {"conversation": text}, "conversation", when, source)
            self.add(Event(when, "evolution", evo_envelope("messages.upsert", data, when, rng),
                           kind="echo", sender=sender.jid, message_id=reply_id))
        elif rng.random() < 0.18:
            data = evo_upsert_data(sender.jid, True, reply_id, "", {"conversation": text},
                                   "conversation", when, "unknown")
            data.pop("pushName")
            self.add(Event(when, "evolution", evo_envelope("send.message", data, when, rng),
                           kind="other", sender=sender.jid, message_id=reply_id))
        for state, chance, lo, hi in (("DELIVERY_ACK", 0.3, 300, 5_000),
                                      ("READ", 0.25, 5_000, 10 * MIN)):
            if rng.random() < chance:
                when += rng.randrange(lo, hi)
                if when >= DAY_END:
                    break
                data = {"keyId": reply_id, "remoteJid": sender.jid, "fromMe": True,
                        "instanceId": LOJA_INSTANCE_ID, "messageId": self.ids.cuid(),
                        "status": state}
                self.add(Event(when, "evolution", evo_envelope("messages.update", data, when,
                                                               rng),
                               kind="update", sender=sender.jid, message_id=reply_id,
                               tags={"status": state}))

    # ---- incidents and oddities

    def connection_drop(self) -> None:
        """Loja's phone loses the connection for a few minutes around 15:10; Evolution then
        delivers what arrived meanwhile, all at once, after the reconnect."""
        rng = self.rng
        down = 15 * HOUR + 10 * MIN + rng.randrange(5 * MIN)
        up = down + rng.randrange(2 * MIN, 4 * MIN)
        for when, state, reason in ((down, "close", 428), (down + 2_000, "connecting", None),
                                    (up, "open", 200)):
            data: dict[str, Any] = {"instance": LOJA_INSTANCE, "state": state}
            if reason is not None:
                data["statusReason"] = reason
            body = evo_envelope("connection.update", data, when, rng)
            self.add(Event(when, "evolution", body, kind="other", tags={"state": state}))
        flush = up + 400
        for event in sorted(self.events, key=lambda e: (e.at, e.seq)):
            if event.fmt == "evolution" and event.kind != "other" and down < event.at < up:
                flush += rng.randrange(20, 120)
                event.at = flush
                event.tags["queued"] = True

    def malformed(self, count: int) -> None:
        """Lines the replay must report and skip (or parts the parser marks invalid)."""
        rng = self.rng
        variants = ["truncated", "proxy_error", "messenger", "evo_no_event", "missing_from",
                    "missing_body", "missing_key_id", "missing_timestamp", "bad_format",
                    "unknown_phone_number_id", "naive_time", "truncated"]
        rng.shuffle(variants)
        for index in range(count):
            variant = variants[index % len(variants)]
            at = self.moment()
            template = Sender("demo", "en", "14155550100", "Test", "android", 1)
            msg = {"from": template.number, "id": self.ids.cloud_in(template.number, "android"),
                   "timestamp": str(unix(at - 800)), "type": "text",
                   "text": {"body": "Are you open today?"}}
            event = Event(at, "cloud-api", cloud_message_body(template, msg), kind="malformed",
                          tags={"variant": variant})
            if variant == "truncated":
                line = event.line()
                event.raw = line[: int(len(line) * rng.uniform(0.3, 0.8))]
            elif variant == "proxy_error":
                event.raw = "<html><head><title>502 Bad Gateway</title></head></html>"
            elif variant == "messenger":
                event.body = {"object": "page", "entry": [{
                    "id": "106542391234567", "time": unix(at) * 1000,
                    "messaging": [{"sender": {"id": "6789012345678901"},
                                   "recipient": {"id": "106542391234567"},
                                   "message": {"mid": "m_" + hexid(rng, 24).lower(),
                                               "text": "hi"}}]}]}
            elif variant == "evo_no_event":
                event.fmt = "evolution"
                event.body = {"status": "ok", "message": "webhook test", "instance": "loja",
                              "date_time": iso(at)}
            elif variant == "missing_from":
                del msg["from"]
            elif variant == "missing_timestamp":
                del msg["timestamp"]
            elif variant == "unknown_phone_number_id":
                value = event.body["entry"][0]["changes"][0]["value"]
                value["metadata"] = {"display_phone_number": "15550009999",
                                     "phone_number_id": "9988776655443"}
            elif variant == "missing_key_id":
                event.fmt = "evolution"
                data = evo_upsert_data("5511955550000@s.whatsapp.net", False, "x", "Teste",
                                       {"conversation": "Oi, vocês abrem hoje?"}, "conversation",
                                       at - 700, "android")
                del data["key"]["id"]
                event.body = evo_envelope("messages.upsert", data, at, rng)
            elif variant == "missing_body":
                event.raw = json.dumps({"received_at": iso(at), "format": "cloud-api",
                                        "headers": CLOUD_HEADERS})
            elif variant == "bad_format":
                record = {"received_at": iso(at), "format": "telegram", "headers": {},
                          "body": {"update_id": 912345678, "message": {"text": "/start"}}}
                event.raw = json.dumps(record)
            elif variant == "naive_time":
                record = json.loads(event.line())
                record["received_at"] = iso(at)[:-1].replace("T", " ")
                event.raw = json.dumps(record, ensure_ascii=False)
            self.add(event)


def _generate(seed: int, senders: int, scale: float, bad: int) -> list[Event]:
    day = Day(seed)
    people = make_senders(day.rng, senders, scale)
    day.run(people)
    day.vignettes(people)
    for index, event in enumerate(day.events):
        event.seq = index
    day.connection_drop()
    day.malformed(bad)
    for index, event in enumerate(day.events):
        event.seq = index
    events = [event for event in day.events if DAY_START <= event.at < DAY_END]
    events.sort(key=lambda event: (event.at, event.seq))
    return events


def generate(seed: int = DEFAULT_SEED, events: int = DEFAULT_EVENTS) -> list[Event]:
    """The day's events in receipt order, about ``events`` of them.

    The number of senders is calibrated over a few full (deterministic) runs; the run that
    lands nearest ``events`` is kept.
    """
    bad = max(3, round(events * 0.005))
    senders = max(10, round(events / 7.8))
    best: list[Event] = []
    for _ in range(4):
        made = _generate(seed, senders, 240.0 * senders / 410, bad)
        if abs(len(made) - events) < abs(len(best) - events):
            best = made
        senders = max(10, round(senders * events / len(made)))
    return best


def render(events: list[Event]) -> str:
    return "".join(event.line() + "\n" for event in events)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                        help="about this many lines (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write")
    args = parser.parse_args(argv)
    if args.events < 100:
        parser.error("--events must be at least 100")
    events = generate(args.seed, args.events)
    text = render(events)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(text.encode("utf-8"))
    kinds: dict[str, int] = {}
    for event in events:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    summary = ", ".join(f"{kind}={count}" for kind, count in sorted(kinds.items()))
    print(f"{args.out}: {len(events)} lines, {len(text.encode()) / 1e6:.2f} MB ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
