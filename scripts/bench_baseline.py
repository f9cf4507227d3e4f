"""The obvious port (issue 16's baseline): the source documents' message flow written the way
most Python teams would -- asyncio, an asyncpg pool of 10, one statement per query,
``asyncio.gather`` for the independent context loads, a lock per conversation, 100
messages in flight. Run as its own process against a migrated database; prints one JSON
line of measurements.

Per user message, in this order (one round trip each; the four loads at once):
the inbox insert (a redelivered id ends there), the conversation upsert, history / webhook
setting / open escalation / recent AI interactions, the user message insert, then -- with
the pipeline's own pure rules, so that both decide alike -- the AI interaction, the
assistant message, the outbox row (recorded as delivered, like the ``dry`` transport), an
escalation when one is due, and the inbox row closed. What differs from the pipeline: no
burst buffer (each message is its own turn) and no repeated-text window; receipts and
other events are only parsed, as in the pipeline.

    .venv/bin/python scripts/bench_baseline.py --dsn "host=/tmp port=5432 dbname=x" --log L
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.engine import responders  # noqa: E402
from pipeline.recorded_log import merge_logs  # noqa: E402
from pipeline.rules import escalation_rules, instance_directory  # noqa: E402
from stages.escalation import after_answer, decide  # noqa: E402
from stages.parse import parse_event  # noqa: E402
from stages.records import (  # noqa: E402
    Decision,
    InboundMessage,
    RawEvent,
    Turn,
    TurnContext,
)

HISTORY = 10
RECENT = 5


class Counting:
    """The pool, counting statements (round trips)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements = 0

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.statements += 1
        return await self.pool.fetchval(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.statements += 1
        return await self.pool.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> None:
        self.statements += 1
        await self.pool.execute(sql, *args)


class Port:
    def __init__(self, db: Counting, cfg: Any) -> None:
        self.db = db
        self.rules = escalation_rules(cfg)
        self.responders = responders(cfg, None)
        self.handover = cfg.escalation.handover_message
        self.locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.latencies: list[float] = []
        self.messages = 0

    async def handle(self, msg: InboundMessage) -> None:
        start = time.perf_counter()
        async with self.locks[(msg.instance, msg.sender)]:  # taken in arrival order
            await self._handle(msg)
        self.latencies.append(time.perf_counter() - start)
        self.messages += 1

    async def _handle(self, msg: InboundMessage) -> None:
        db = self.db
        row = await db.fetchval(
            "INSERT INTO inbox (instance, message_id, sender, format, received_at, message)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
            msg.instance, msg.message_id, msg.sender, msg.format, msg.received_at,
            json.dumps({"text": msg.text, "kind": msg.kind}))
        if row is None:  # a redelivered id
            return
        conv = await db.fetchval(
            "INSERT INTO conversations (instance, sender, sender_name, last_message_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (instance, sender) WHERE status = 'open'"
            " DO UPDATE SET last_message_at = greatest(conversations.last_message_at,"
            " EXCLUDED.last_message_at) RETURNING id",
            msg.instance, msg.sender, msg.sender_name, msg.received_at)
        history, webhook, escalated, recent = await asyncio.gather(
            db.fetch("SELECT role, body FROM messages WHERE conversation_id = $1"
                     " ORDER BY id DESC LIMIT $2", conv, HISTORY),
            db.fetchval("SELECT settings ->> 'webhook_url' FROM instances WHERE name = $1",
                        msg.instance),
            db.fetchval("SELECT EXISTS (SELECT 1 FROM escalations WHERE conversation_id = $1"
                        " AND status = 'open')", conv),
            db.fetch("SELECT fallback FROM ai_interactions WHERE conversation_id = $1"
                     " ORDER BY id DESC LIMIT $2", conv, RECENT))
        turn_id = "b_" + hashlib.sha256(msg.message_id.encode()).hexdigest()[:20]
        await db.execute(
            "INSERT INTO messages (conversation_id, instance, message_id, role, kind, body,"
            " turn_id, sent_at) VALUES ($1, $2, $3, 'user', $4, $5, $6, $7)"
            " ON CONFLICT DO NOTHING",
            conv, msg.instance, msg.message_id, msg.kind, msg.text, turn_id, msg.sent_at)
        context = TurnContext(conv, "\n".join(f"{r['role']}: {r['body']}"
                                              for r in reversed(history)),
                              webhook or "", bool(escalated),
                              tuple(r["fallback"] for r in recent))
        turn = Turn(turn_id, msg.instance, msg.sender, (msg,), context=context)
        rules = self.rules[msg.instance]
        decision = decide(turn, context, rules)
        answer = None
        if decision.verdict == "reply":
            reply = await self.responders[msg.instance].answer(turn, context.history)
            decision = after_answer(turn, context, reply, rules) or decision
            await db.execute(
                "INSERT INTO ai_interactions (conversation_id, turn_id, responder, prompt,"
                " reply, confidence, fallback) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                conv, turn_id, reply.responder, turn.text, reply.text, reply.confidence,
                reply.fallback)
            answer = reply.text
        action = await self._effects(conv, turn_id, msg, decision, answer)
        await db.execute("UPDATE inbox SET status = 'processed', action = $2, turn_id = $3,"
                         " processed_at = now() WHERE id = $1", row, action, turn_id)

    async def _effects(self, conv: int, turn_id: str, msg: InboundMessage,
                       decision: Decision, answer: str | None) -> str:
        db = self.db
        if decision.verdict == "hold":
            return "held"
        if decision.verdict == "escalate":
            await db.execute("INSERT INTO escalations (conversation_id, reason, turn_id)"
                             " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                             conv, decision.reason or "escalated", turn_id)
            text, kind, action = self.handover, "handover", "escalated"
        else:
            text, kind, action = answer, "reply", "replied"
        await db.execute(
            "INSERT INTO messages (conversation_id, instance, message_id, role, kind, body,"
            " turn_id) VALUES ($1, $2, $3, 'assistant', 'text', $4, $5)",
            conv, msg.instance, f"{turn_id}:out", text, turn_id)
        await db.execute(
            "INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target,"
            " payload, status, delivered_at) VALUES ($1, $2, $3, $4, $5, $6, 'delivered',"
            " now())", f"{turn_id}:{kind}", kind, msg.instance, conv, msg.sender,
            json.dumps({"to": msg.sender, "text": text}))
        return action


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config)
    directory = instance_directory(cfg)
    pool = await asyncpg.create_pool(args.dsn, min_size=args.pool, max_size=args.pool)
    try:
        await pool.execute(
            "INSERT INTO instances (name, phone_number_id, evolution_instance) SELECT n, p, e"
            " FROM unnest($1::text[], $2::text[], $3::text[]) AS i(n, p, e)"
            " ON CONFLICT DO NOTHING",
            [i.name for i in cfg.instances], [i.phone_number_id or None for i in cfg.instances],
            [i.evolution_instance for i in cfg.instances])
        db = Counting(pool)
        port = Port(db, cfg)
        flight = asyncio.Semaphore(args.in_flight)
        tasks: set[asyncio.Task[None]] = set()
        cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()

        async def one(msg: InboundMessage) -> None:
            try:
                await port.handle(msg)
            finally:
                flight.release()

        for item in merge_logs([Path(p) for p in args.log]):
            if not isinstance(item, RawEvent):
                continue
            for parsed in parse_event(item, directory):
                if isinstance(parsed, InboundMessage):
                    await flight.acquire()
                    task = asyncio.create_task(one(parsed))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
        seconds = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await pool.close()
    n = port.messages
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = sorted(port.latencies)
    return {"messages": n, "seconds": seconds, "msgs_per_s": n / seconds,
            "round_trips": db.statements, "round_trips_per_msg": db.statements / max(n, 1),
            "cpu_ms_per_msg": cpu_s * 1000 / max(n, 1),
            "p50_ms": statistics.median(lat) * 1000 if lat else 0.0,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000 if lat else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--log", nargs="+", required=True)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--pool", type=int, default=10)
    p.add_argument("--in-flight", type=int, default=100)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
