"""The store API: every SQL statement the stages need, each one round trip.

Stages call these methods and never see a connection. Each method borrows a pooled
connection for exactly one statement (no Turn ever holds a connection while it waits for
another), runs under ``query_timeout_s`` and translates psycopg errors into
:class:`pipeline.db.DatabaseError` subclasses. Writes that belong together are one statement
(data-modifying CTEs), so a cancellation can never leave half of them behind.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import trio
from psycopg.types.json import Jsonb

from pipeline.db import DatabaseError, DatabaseUnavailable, Pool, translate
from stages.dedupe import batch_ids, stored
from stages.records import (
    Claim,
    ClaimCommit,
    Committed,
    InboundMessage,
    Invalid,
    Receipt,
    Stored,
    Turn,
    TurnContext,
)
from stages.turns import BurstRules


class QueryTimeout(DatabaseUnavailable):
    """A statement did not finish within ``database.query_timeout_s``."""


class ClaimConflict(DatabaseError):
    """A commit found its claim taken over or its rows already processed: nothing was
    written, and the work is redone from the database."""


_CONFLICT_STATE = "PC001"  # raised by pipeline_conflict() (migration 0004)


@attrs.frozen
class ClaimRequest:
    """What :meth:`Store.claim` takes: up to ``limit`` conversations due at ``now`` (None:
    the database's clock, which live intake stamps ``received_at`` with)."""

    owner: str
    now: dt.datetime | None
    limit: int
    lease_s: float
    rules: BurstRules
    rows_per_claim: int = 64
    held: tuple[int, ...] = ()  # conversations this process works on already
    #: load each claimed conversation's context with the claim ([context] mode "claimed")
    context: ContextRequest | None = None


@attrs.frozen
class ContextRequest:
    """What a claim that loads the context loads: as ``Store.load_context`` does."""

    history_chars: int
    recent_interactions: int
    min_confidence: float = 0.0


@attrs.frozen
class Claimed:
    """One claimed conversation: its pending rows (oldest first, with their inbox ids) and
    the texts it answered recently (the repeated-text window)."""

    conversation_id: int
    token: int
    attempts: int
    rows: tuple[tuple[int, InboundMessage], ...]
    recent: tuple[tuple[dt.datetime, str], ...]
    context: TurnContext | None = None  # when the claim loaded it
    #: taken over from a lease that had expired (its process died or stalled)
    expired: bool = False


@attrs.frozen
class ClaimBatch:
    claims: tuple[Claimed, ...]
    next_due: dt.datetime | None  # the earliest due work not claimed now
    candidates: int  # conversations that were due (claimed, deferred or found idle)
    now: dt.datetime  # the time the claim decided on (the database's clock if asked)


@attrs.frozen
class InstanceRow:
    name: str
    phone_number_id: str
    evolution_instance: str
    settings: dict[str, Any]


@attrs.frozen
class EscalationRow:
    id: int
    instance: str
    sender: str
    reason: str
    created_at: dt.datetime


def message_json(msg: InboundMessage) -> dict[str, Any]:
    """The inbox copy of a message: enough to rebuild it after a restart."""
    return {
        "instance": msg.instance, "message_id": msg.message_id, "sender": msg.sender,
        "kind": msg.kind, "text": msg.text, "sent_at": msg.sent_at.isoformat(),
        "received_at": msg.received_at.isoformat(), "format": msg.format,
        "sender_name": msg.sender_name, "media_id": msg.media_id, "reply_to": msg.reply_to,
        "origin": msg.origin,
    }


def message_from_json(data: dict[str, Any]) -> InboundMessage:
    """Rebuild a message from its inbox copy (see :func:`message_json`)."""
    return InboundMessage(
        instance=data["instance"], message_id=data["message_id"], sender=data["sender"],
        kind=data["kind"], text=data["text"],
        sent_at=dt.datetime.fromisoformat(data["sent_at"]),
        received_at=dt.datetime.fromisoformat(data["received_at"]), format=data["format"],
        sender_name=data.get("sender_name"), media_id=data.get("media_id"),
        reply_to=data.get("reply_to"), origin=data.get("origin", "inbox"),
    )


def _sender_name(turn: Turn) -> str | None:
    return next((m.sender_name for m in reversed(turn.messages) if m.sender_name), None)


def _turn_params(turn: Turn) -> dict[str, Any]:
    return {
        "instance": turn.instance, "sender": turn.sender, "name": _sender_name(turn),
        "at": turn.messages[-1].received_at, "turn": turn.turn_id,
        "ids": [m.message_id for m in turn.messages], "kinds": [m.kind for m in turn.messages],
        "bodies": [m.text for m in turn.messages], "sent": [m.sent_at for m in turn.messages],
    }


def _context(conv_id: int, history: str | None, webhook_url: str | None, escalated: bool,
             fallbacks: list[bool] | None) -> TurnContext:
    return TurnContext(conversation_id=conv_id, history=history or "",
                       webhook_url=webhook_url or "", escalated=bool(escalated),
                       recent_fallbacks=tuple(fallbacks or ()))


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


#: the advisory lock that takes processes seeding ``instances`` at once in turn
_SEED_LOCK = 0x70697065  # "pipe"


class Store:
    """Small async API over a :class:`Pool`; see the module docstring."""

    def __init__(self, pool: Pool, query_timeout_s: float) -> None:
        self.pool = pool
        self.query_timeout_s = query_timeout_s
        self.round_trips = 0

    @asynccontextmanager
    async def _conn(self, timeout: float | None = None
                    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        limit = self.query_timeout_s if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                async with self.pool.connection() as conn:
                    self.round_trips += 1
                    yield conn
        except trio.TooSlowError:
            raise QueryTimeout(f"database did not answer within {limit} s") from None
        except psycopg.Error as exc:
            if exc.sqlstate == _CONFLICT_STATE:
                raise ClaimConflict(_first_line(exc)) from exc
            raise translate(exc) from exc

    async def _all(self, sql: str, params: Any = None,
                   timeout: float | None = None) -> list[tuple[Any, ...]]:
        async with self._conn(timeout) as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []

    async def ping(self) -> None:
        await self._all("SELECT 1")

    async def record_receipts(self, receipts: Sequence[Receipt], phone_hold: bool = False
                              ) -> int:
        """Apply what channels said of our sends to their outbox rows, in one statement; the
        number of receipts that found a row. A receipt finds its row by our key (the Cloud
        API's ``biz_opaque_callback_data``), by the channel's id for the message, or -- an
        Evolution echo -- as the send in doubt to that number with that text. A status
        never goes back (``read`` stays when a late ``sent`` arrives). A message to a user
        that WhatsApp refused (``failed``, e.g. 131047 outside the 24-hour window) opens an
        escalation of its conversation: the assistant holds, a human follows up.

        An echo that finds no row and whose text the pipeline did not queue for that number
        in the last day was typed on the business phone: it joins the conversation's history
        (role ``human``, author ``phone``) and, with ``phone_hold``, opens an escalation
        held by the phone -- the assistant stays silent until an agent resolves it."""
        if not receipts:
            return 0
        (found,), = await self._all(_RECORD_RECEIPTS, {"phone": phone_hold,
            "inst": [r.instance for r in receipts], "pid": [r.provider_id for r in receipts],
            "st": [r.status for r in receipts], "key": [r.key for r in receipts],
            "err": [r.error for r in receipts], "num": [r.number for r in receipts],
            "txt": [r.text for r in receipts]})
        return int(found)

    async def applied_migrations(self) -> list[str]:
        """The versions in ``schema_migrations`` (readiness: are they current?)."""
        return [str(v) for v, in await self._all("SELECT version FROM schema_migrations")]

    async def figures(self) -> dict[str, Any]:
        """What ``/metrics`` shows of the database, in one statement: outbox rows by status,
        dead letters, pending inbox rows."""
        (outbox, dead, pending), = await self._all(
            "SELECT (SELECT coalesce(json_object_agg(status, n), '{}'::json) FROM"
            "        (SELECT status, count(*) AS n FROM outbox GROUP BY status) s),"
            " (SELECT count(*) FROM dead_letters),"
            " (SELECT count(*) FROM inbox WHERE status = 'pending')")
        return {"outbox": outbox, "dead_letters": dead, "inbox_pending": pending}

    async def seed_instances(self, rows: Sequence[InstanceRow]) -> None:
        """Make the ``instances`` table match the config (inserted or updated, never deleted).

        Processes starting together do this at once: an advisory lock takes them in turn (a
        concurrent insert of the same instance would otherwise violate the unique phone
        number id, which ``ON CONFLICT (name)`` does not arbitrate)."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%b)", (_SEED_LOCK,))
            await conn.execute(
                "INSERT INTO instances (name, phone_number_id, evolution_instance, settings)"
                " SELECT n, nullif(p, ''), nullif(e, ''), s"
                " FROM unnest(%b::text[], %b::text[], %b::text[], %b::jsonb[]) AS t(n, p, e, s)"
                " ON CONFLICT (name) DO UPDATE SET phone_number_id = EXCLUDED.phone_number_id,"
                " evolution_instance = EXCLUDED.evolution_instance, settings = EXCLUDED.settings,"
                " updated_at = now()",
                ([r.name for r in rows], [r.phone_number_id for r in rows],
                 [r.evolution_instance for r in rows], [Jsonb(r.settings) for r in rows]),
            )

    async def load_instances(self) -> list[InstanceRow]:
        rows = await self._all("SELECT name, coalesce(phone_number_id, ''),"
                               " coalesce(evolution_instance, ''), settings FROM instances")
        return [InstanceRow(r[0], r[1], r[2], r[3]) for r in rows]

    async def store_inbound(self, messages: Sequence[InboundMessage],
                           first_due: dt.timedelta = dt.timedelta(0), *,
                           stamp: bool = False) -> list[Stored]:
        """Write messages to the inbox; return each as :class:`Stored`, ``redelivered`` when
        its id was already there (in the batch or stored before).

        One statement for the whole batch; a repeated id only bumps the row's redelivery
        counter. The same statement counts the new rows as pending work of their
        conversations and makes each due ``first_due`` after its oldest new row (the earliest
        its turn can close), opening the conversation of a sender seen for the first time, in
        arrival order, so conversation ids follow the order of the log.

        ``stamp`` (live intake): the new rows' ``received_at`` is the database's clock at the
        write, not the process's. Then the time a burst is decided on and the time a row
        becomes visible come from one clock: a message whose write was slow is simply
        received later (never earlier than a row a claim has already seen), and processes on
        several machines need no synchronised clocks.
        """
        ids = batch_ids(messages)
        fresh = ids.fresh(messages)
        senders: dict[tuple[str, str], InboundMessage] = {}
        for m in fresh:
            senders.setdefault(m.conversation_key, m)
        rows = await self._all(_STORE_INBOUND, {
            "instances": [m.instance for m in fresh], "ids": [m.message_id for m in fresh],
            "senders": [m.sender for m in fresh], "formats": [m.format for m in fresh],
            "received": [m.received_at for m in fresh],
            "messages": [Jsonb(message_json(m)) for m in fresh],
            "repeats": [ids.repeats.get((m.instance, m.message_id), 0) for m in fresh],
            "c_instances": [k[0] for k in senders], "c_senders": [k[1] for k in senders],
            "c_names": [m.sender_name for m in senders.values()],
            "c_at": [m.received_at for m in senders.values()], "first_due": first_due,
            "stamp": stamp,
        })
        return stored(messages, ids, {(r[0], r[1]) for r in rows if r[2]})

    async def dead_letter(self, stage: str, invalid: Invalid, raw: str | None = None) -> None:
        await self._all(
            "INSERT INTO dead_letters (stage, reason, origin, format, raw)"
            " VALUES (%b, %b, %b, %b, %b)",
            (stage, f"{invalid.reason} (at {invalid.where})" if invalid.where else invalid.reason,
             invalid.origin, invalid.format, raw),
        )

    async def load_context(self, turn: Turn, history_chars: int, recent_interactions: int,
                           min_confidence: float = 0.0,
                           timeout: float | None = None) -> TurnContext:
        """Find or create the conversation, load its context and store the user messages.

        One statement: the conversation upsert, the four independent reads (history, webhook
        config, escalation state, recent AI interactions) and the insert of the turn's
        messages. The reads see the snapshot taken before the insert, so the history never
        contains the turn itself.
        """
        rows = await self._all(_LOAD_CONTEXT, {
            **_turn_params(turn), "chars": history_chars, "n": recent_interactions,
            "min_conf": min_confidence,
        }, timeout)
        if not rows:
            raise DatabaseError(f"conversation of {turn.instance}/{turn.sender} not found")
        return _context(*rows[0])

    # --- the context loads one by one (modes sequential and parallel) ----------------------

    async def upsert_conversation(self, turn: Turn, timeout: float | None = None) -> int:
        """Find or create the open conversation of the turn, in one statement (no race
        between two workers: the partial unique index decides)."""
        rows = await self._all(_UPSERT_CONVERSATION, _turn_params(turn), timeout)
        return int(rows[0][0])

    async def load_history(self, conversation_id: int, turn_id: str, chars: int,
                           timeout: float | None = None) -> str:
        rows = await self._all(_HISTORY, {"conv": conversation_id, "turn": turn_id,
                                          "chars": chars}, timeout)
        return str(rows[0][0] or "")

    async def load_webhook(self, instance: str, timeout: float | None = None) -> str:
        rows = await self._all("SELECT settings ->> 'webhook_url' FROM instances WHERE name = %s",
                               (instance,), timeout)
        return str(rows[0][0] or "") if rows else ""

    async def load_escalated(self, conversation_id: int, timeout: float | None = None) -> bool:
        rows = await self._all("SELECT EXISTS (SELECT 1 FROM escalations WHERE"
                               " conversation_id = %b AND status = 'open')",
                               (conversation_id,), timeout)
        return bool(rows[0][0])

    async def load_fallbacks(self, conversation_id: int, turn_id: str, n: int,
                             min_confidence: float = 0.0,
                             timeout: float | None = None) -> tuple[bool, ...]:
        """The last ``n`` answers, newest first: True for a failed one (a fallback, or a
        confidence below ``min_confidence``)."""
        rows = await self._all(_FALLBACKS, {"conv": conversation_id, "turn": turn_id, "n": n,
                                            "min_conf": min_confidence}, timeout)
        return tuple(rows[0][0] or ())

    async def store_user_messages(self, conversation_id: int, turn: Turn,
                                  timeout: float | None = None) -> None:
        await self._all(_STORE_MESSAGES, {"conv": conversation_id, **_turn_params(turn)},
                        timeout)

    async def load_contexts(self, turns: Sequence[Turn], history_chars: int,
                            recent_interactions: int, min_confidence: float = 0.0,
                            timeout: float | None = None) -> list[TurnContext]:
        """:meth:`load_context` for many turns of *different* conversations in one
        statement (mode ``batched``); results in the order of ``turns``."""
        messages = [(t, m) for t in turns for m in t.messages]
        rows = await self._all(_LOAD_CONTEXTS, {
            "instances": [t.instance for t in turns], "senders": [t.sender for t in turns],
            "names": [_sender_name(t) for t in turns],
            "ats": [t.messages[-1].received_at for t in turns],
            "turns": [t.turn_id for t in turns],
            "m_turns": [t.turn_id for t, _ in messages],
            "m_ids": [m.message_id for _, m in messages],
            "m_kinds": [m.kind for _, m in messages], "m_bodies": [m.text for _, m in messages],
            "m_sent": [m.sent_at for _, m in messages],
            "chars": history_chars, "n": recent_interactions, "min_conf": min_confidence,
        }, timeout)
        by_ord = {int(r[0]): r[1:] for r in rows}
        if len(by_ord) != len(turns):
            raise DatabaseError(f"batched context load returned {len(by_ord)} rows for "
                                f"{len(turns)} turns")
        return [_context(*by_ord[i + 1]) for i in range(len(turns))]

    # --- escalations (operators) -----------------------------------------------------------

    async def open_escalations(self, instance: str | None = None) -> list[EscalationRow]:
        """Open escalations, oldest first (optionally of one instance)."""
        rows = await self._all(
            "SELECT e.id, c.instance, c.sender, e.reason, e.created_at"
            " FROM escalations e JOIN conversations c ON c.id = e.conversation_id"
            " WHERE e.status = 'open' AND (%b::text IS NULL OR c.instance = %b)"
            " ORDER BY e.created_at, e.id", (instance, instance))
        return [EscalationRow(*r) for r in rows]

    async def resolve_escalation(self, escalation_id: int, by: str) -> bool:
        """Close an open escalation so the assistant answers again; False if none was open."""
        rows = await self._all(
            "UPDATE escalations SET status = 'resolved', resolved_at = now(), resolved_by = %s"
            " WHERE id = %b AND status = 'open' RETURNING id", (by, escalation_id))
        return bool(rows)

    # --- claims: the database owns the work (pipeline/claims.py) ---------------------------

    async def claim(self, req: ClaimRequest) -> ClaimBatch:
        """Take up to ``req.limit`` conversations whose head turn is closed at ``req.now``,
        each under a lease with a new fencing token; defer those still open (their
        ``due_at`` moves to their deadline). One statement; many processes may run it at
        once (``FOR UPDATE SKIP LOCKED``: each conversation goes to one of them)."""
        rules = req.rules
        rows = await self._all(_CLAIM, {
            "now": req.now, "limit": req.limit, "owner": req.owner,
            "lease": dt.timedelta(seconds=req.lease_s), "rows": req.rows_per_claim,
            "window": rules.window, "max_wait": rules.wait, "max_messages": rules.limit,
            "text_window": rules.text_window, "held": list(req.held),
            "ctx": req.context is not None,
            "chars": req.context.history_chars if req.context else 0,
            "n": req.context.recent_interactions if req.context else 0,
            "min_conf": req.context.min_confidence if req.context else 0.0,
        })
        claims_json, later, next_due, candidates, now = rows[0]
        return ClaimBatch(
            claims=tuple(_claimed(c) for c in claims_json or ()),
            next_due=min((t for t in (later, next_due) if t is not None), default=None),
            candidates=int(candidates),
            now=now,
        )

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        """Write a claim's effects and close its rows, fenced by the lease's token.

        ``written`` is False when this very commit was written before (a retry after a lost
        answer); ``next_due`` says when the conversation's remaining work is due. Raises
        :class:`ClaimConflict` -- and writes nothing -- when the lease was taken over, a row
        is no longer pending, or an idempotency key is already used: the work is then redone
        from the database, never reported done.
        """
        fx, claim = commit.effects, commit.claim
        turn = fx.turn if fx is not None else None
        reply = turn.reply if turn is not None else None
        keys = fx.outbox if fx is not None else ()
        rows = commit.rows
        result = await self._all(_COMMIT_CLAIM, {
            "conv": claim.conversation_id, "token": claim.token, "instance": commit.instance,
            "n": len(rows), "ids": [r[0] for r in rows], "actions": [r[1] for r in rows],
            "reasons": [r[2] for r in rows], "keys": [r[3] for r in rows],
            "next_due": commit.next_due, "now": commit.now,
            "last_at": turn.messages[-1].received_at if turn else None,
            "name": _sender_name(turn) if turn else None,
            "ids_u": [m.message_id for m in turn.messages] if turn else [],
            "kinds_u": [m.kind for m in turn.messages] if turn else [],
            "bodies_u": [m.text for m in turn.messages] if turn else [],
            "sent_u": [m.sent_at for m in turn.messages] if turn else [],
            "turn": turn.turn_id if turn else "", "prompt": turn.text if turn else "",
            "has_ai": reply is not None, "responder": reply.responder if reply else "",
            "ai_reply": reply.text if reply else "",
            "confidence": reply.confidence if reply else 0.0,
            "fallback": reply.fallback if reply else False,
            "reply_text": fx.reply_text if fx else None,
            "reply_id": f"{turn.turn_id}:reply" if turn else "",
            "escalate": bool(turn and turn.decision and turn.decision.verdict == "escalate"),
            "reason": fx.reason if fx else None,
            "ob_keys": [o[0] for o in keys], "ob_kinds": [o[1] for o in keys],
            "ob_targets": [o[2] for o in keys], "ob_payloads": [Jsonb(o[3]) for o in keys],
            "ob_status": "delivered" if fx is not None and fx.delivered else "pending",
        })
        return Committed(result[0][0] == "ok", result[0][1])

    async def release(self, claim: Claim, due: dt.datetime, *, error: str | None = None,
                      failed: bool = False) -> bool:
        """Give a claimed conversation back: its work is due again at ``due`` (a turn not
        closed yet, or a retry after a failure). False when the lease was no longer ours."""
        rows = await self._all(
            "UPDATE conversations SET lease_owner = NULL, lease_until = NULL,"
            " attempts = attempts + %b::int, last_error = coalesce(%b, last_error),"
            " due_at = %b WHERE id = %b AND lease_token = %b AND lease_until IS NOT NULL"
            " RETURNING id",
            (int(failed), error, due, claim.conversation_id, claim.token))
        return bool(rows)

    async def renew(self, leases: Sequence[tuple[int, int]], lease_s: float) -> set[int]:
        """Extend the leases (conversation id, token) still held; return their tokens."""
        rows = await self._all(
            "UPDATE conversations c SET lease_until = now() + %b"
            " FROM unnest(%b::bigint[], %b::bigint[]) AS l(id, token)"
            " WHERE c.id = l.id AND c.lease_token = l.token AND c.lease_until IS NOT NULL"
            " RETURNING c.lease_token",
            (dt.timedelta(seconds=lease_s), [c for c, _ in leases], [t for _, t in leases]))
        return {int(r[0]) for r in rows}

    async def lease_owners(self, prefix: str) -> list[str]:
        """The owners (``host:pid``) holding leases whose name starts with ``prefix``."""
        rows = await self._all("SELECT DISTINCT lease_owner FROM conversations"
                               " WHERE lease_until IS NOT NULL AND starts_with(lease_owner, %b)",
                               (prefix,))
        return [str(r[0]) for r in rows]

    async def release_owners(self, owners: Sequence[str]) -> int:
        """Give back every lease of ``owners`` (processes known to be dead): due at once."""
        rows = await self._all(
            "UPDATE conversations SET lease_owner = NULL, lease_until = NULL"
            " WHERE lease_until IS NOT NULL AND lease_owner = ANY(%b::text[]) RETURNING id",
            (list(owners),))
        return len(rows)

    async def release_all(self, leases: Sequence[tuple[int, int]]) -> int:
        """Give back leases whose turns were cancelled (shutdown): due again at once."""
        rows = await self._all(
            "UPDATE conversations c SET lease_owner = NULL, lease_until = NULL"
            " FROM unnest(%b::bigint[], %b::bigint[]) AS l(id, token)"
            " WHERE c.id = l.id AND c.lease_token = l.token AND c.lease_until IS NOT NULL"
            " RETURNING c.id",
            ([c for c, _ in leases], [t for _, t in leases]))
        return len(rows)


def _claimed(data: dict[str, Any]) -> Claimed:
    return Claimed(
        conversation_id=int(data["conv"]), token=int(data["token"]),
        attempts=int(data["attempts"]),
        rows=tuple((int(r["id"]), message_from_json(r["message"])) for r in data["rows"] or ()),
        recent=tuple((dt.datetime.fromisoformat(r["at"]), r["text"] or "")
                     for r in data["recent"] or ()),
        context=(_context(int(data["conv"]), *data["ctx"]) if data.get("ctx") is not None
                 else None),
        expired=bool(data.get("expired")),
    )


_STORE_INBOUND = """
WITH given AS (  -- live intake stamps received_at with the database's clock (`stamp`)
    SELECT u.instance, u.id, u.sender, u.format,
           CASE WHEN %(stamp)b THEN clock_timestamp() ELSE u.received END AS received,
           u.message, u.repeats, u.ord
    FROM unnest(%(instances)b::text[], %(ids)b::text[], %(senders)b::text[],
                %(formats)b::text[], %(received)b::timestamptz[], %(messages)b::jsonb[],
                %(repeats)b::int[]) WITH ORDINALITY
         AS u(instance, id, sender, format, received, message, repeats, ord)
), ins AS (
    INSERT INTO inbox (instance, message_id, sender, format, received_at, message, redeliveries)
    SELECT instance, id, sender, format, received,
           CASE WHEN %(stamp)b THEN jsonb_set(message, '{received_at}', to_jsonb(received))
                ELSE message END, repeats
    FROM given ORDER BY ord
    ON CONFLICT (instance, message_id)
    DO UPDATE SET redeliveries = inbox.redeliveries + 1 + EXCLUDED.redeliveries
    RETURNING instance, message_id, sender, received_at, (xmax = 0) AS inserted
), arrived AS (  -- new pending work per conversation: its count and when it may be due
    SELECT instance, sender, count(*)::int AS n, min(received_at) + %(first_due)b AS due
    FROM ins WHERE inserted GROUP BY instance, sender
), found AS (
    UPDATE conversations c SET pending = c.pending + a.n,
                               due_at = least(coalesce(c.due_at, 'infinity'), a.due)
    FROM arrived a WHERE c.instance = a.instance AND c.sender = a.sender AND c.status = 'open'
    RETURNING c.instance, c.sender
), conv AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at, pending, due_at)
    SELECT c.instance, c.sender, c.name, c.at, coalesce(a.n, 0), a.due
    FROM unnest(%(c_instances)b::text[], %(c_senders)b::text[], %(c_names)b::text[],
                %(c_at)b::timestamptz[]) WITH ORDINALITY AS c(instance, sender, name, at, ord)
    LEFT JOIN arrived a ON a.instance = c.instance AND a.sender = c.sender
    WHERE NOT EXISTS (SELECT 1 FROM conversations o WHERE o.instance = c.instance
                      AND o.sender = c.sender AND o.status = 'open')
    ORDER BY c.ord
    ON CONFLICT (instance, sender) WHERE status = 'open'
    DO UPDATE SET pending = conversations.pending + EXCLUDED.pending,
                  due_at = least(coalesce(conversations.due_at, 'infinity'), EXCLUDED.due_at)
)
SELECT instance, message_id, inserted FROM ins
"""

_CONVERSATION_UPSERT_BODY = """
    ON CONFLICT (instance, sender) WHERE status = 'open'
    DO UPDATE SET last_message_at = greatest(conversations.last_message_at,
                                             EXCLUDED.last_message_at),
                  sender_name = coalesce(EXCLUDED.sender_name, conversations.sender_name)
    RETURNING id"""

# find (update) first and insert only when there is nothing to find: an INSERT ... ON
# CONFLICT spends a sequence value even when it conflicts, and conversation ids must not
# depend on how turns interleave (intake opens conversations in log order)
_FIND_OR_CREATE = """
found AS (
    UPDATE conversations SET last_message_at = greatest(last_message_at, %(at)b),
                             sender_name = coalesce(%(name)b, sender_name)
    WHERE instance = %(instance)b AND sender = %(sender)b AND status = 'open'
    RETURNING id
), made AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at)
    SELECT %(instance)b, %(sender)b, %(name)b, %(at)b WHERE NOT EXISTS (SELECT 1 FROM found)
""" + _CONVERSATION_UPSERT_BODY + """
), conv AS (
    SELECT id FROM found UNION ALL SELECT id FROM made
)"""

_UPSERT_CONVERSATION = "WITH" + _FIND_OR_CREATE + " SELECT id FROM conv"

# history: the last `chars` characters of the conversation before this turn
_HISTORY_OF = """
    (SELECT right(string_agg(h.role || ': ' || h.body, E'\n' ORDER BY h.id), %(chars)b)
       FROM (SELECT id, role, body FROM messages
              WHERE conversation_id = {conv} AND turn_id IS DISTINCT FROM {turn}
              ORDER BY id DESC LIMIT 50) h)"""

_FALLBACKS_OF = """
    (SELECT array_agg((a.fallback OR a.confidence < %(min_conf)b) ORDER BY a.id DESC)
       FROM (SELECT id, fallback, confidence FROM ai_interactions
              WHERE conversation_id = {conv} AND turn_id <> {turn}
                AND created_at > coalesce((SELECT max(r.resolved_at) FROM escalations r
                                           WHERE r.conversation_id = {conv}), '-infinity')
              ORDER BY id DESC LIMIT %(n)b) a)"""

_ESCALATED_OF = """
    EXISTS (SELECT 1 FROM escalations e WHERE e.conversation_id = {conv} AND e.status = 'open')"""

_HISTORY = "SELECT" + _HISTORY_OF.format(conv="%(conv)b", turn="%(turn)b")
_FALLBACKS = "SELECT" + _FALLBACKS_OF.format(conv="%(conv)b", turn="%(turn)b")

_STORE_MESSAGES = """
INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id, sent_at)
SELECT %(conv)b, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
FROM unnest(%(ids)b::text[], %(kinds)b::text[], %(bodies)b::text[], %(sent)b::timestamptz[])
     AS t(id, kind, body, sent)
ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id"""

# mode single: everything in one statement. The reads see the snapshot taken before the
# inserts, so the history never contains the turn itself.
_LOAD_CONTEXT = "WITH" + _FIND_OR_CREATE + """, stored AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT conv.id, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
    FROM conv, unnest(%(ids)b::text[], %(kinds)b::text[], %(bodies)b::text[],
                      %(sent)b::timestamptz[]) AS t(id, kind, body, sent)
    ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
    WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id
)
SELECT conv.id,""" + _HISTORY_OF.format(conv="conv.id", turn="%(turn)b") + """,
    (SELECT settings ->> 'webhook_url' FROM instances WHERE name = %(instance)b),""" \
    + _ESCALATED_OF.format(conv="conv.id") + "," \
    + _FALLBACKS_OF.format(conv="conv.id", turn="%(turn)b") + """
FROM conv"""

# mode batched: the same for many turns (one per conversation) in one statement
_LOAD_CONTEXTS = """
WITH input AS (
    SELECT * FROM unnest(%(instances)b::text[], %(senders)b::text[], %(names)b::text[],
                         %(ats)b::timestamptz[], %(turns)b::text[])
             WITH ORDINALITY AS t(instance, sender, name, at, turn, ord)
), found AS (
    UPDATE conversations c SET last_message_at = greatest(c.last_message_at, i.at),
                               sender_name = coalesce(i.name, c.sender_name)
    FROM input i WHERE c.instance = i.instance AND c.sender = i.sender AND c.status = 'open'
    RETURNING c.id, c.instance, c.sender
), made AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at)
    SELECT i.instance, i.sender, i.name, i.at FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM found f WHERE f.instance = i.instance
                      AND f.sender = i.sender)
    ORDER BY i.ord""" + _CONVERSATION_UPSERT_BODY + """, instance, sender
), conv AS (
    SELECT id, instance, sender FROM found UNION ALL SELECT id, instance, sender FROM made
), stored AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT conv.id, input.instance, m.id, 'user', m.kind, m.body, m.turn, m.sent
    FROM unnest(%(m_turns)b::text[], %(m_ids)b::text[], %(m_kinds)b::text[],
                %(m_bodies)b::text[], %(m_sent)b::timestamptz[]) AS m(turn, id, kind, body, sent)
    JOIN input ON input.turn = m.turn
    JOIN conv ON conv.instance = input.instance AND conv.sender = input.sender
    ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
    WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id
)
SELECT input.ord, conv.id,""" + _HISTORY_OF.format(conv="conv.id", turn="input.turn") + """,
    (SELECT settings ->> 'webhook_url' FROM instances WHERE name = input.instance),""" \
    + _ESCALATED_OF.format(conv="conv.id") + "," \
    + _FALLBACKS_OF.format(conv="conv.id", turn="input.turn") + """
FROM input JOIN conv ON conv.instance = input.instance AND conv.sender = input.sender
"""

# the head of each due conversation's queue, decided over the rows' recorded times: a turn is
# ready when a later row arrived after its deadline, when it is full, or when `now` is past
# its deadline. Repeated texts and reactions count here like any row, so this deadline is
# never earlier than the one the claim then computes without them (stages/turns.py): every
# row that can join the turn is in the inbox when it is claimed.
_CLAIM = """
WITH clock AS (SELECT coalesce(%(now)b::timestamptz, clock_timestamp()) AS now),
cand AS (
    SELECT id, instance, sender, lease_until IS NOT NULL AS expired FROM conversations
    WHERE due_at <= (SELECT now FROM clock) AND (lease_until IS NULL OR lease_until < now())
      AND id <> ALL (%(held)b::bigint[])
    ORDER BY due_at, id LIMIT %(limit)b
    FOR UPDATE SKIP LOCKED
), pend AS (
    SELECT c.id AS conv, i.id, i.received_at, i.message,
           row_number() OVER w AS rn, first_value(i.received_at) OVER w AS first_at,
           i.received_at - lag(i.received_at) OVER w AS gap
    FROM cand c CROSS JOIN LATERAL (
        SELECT p.id, p.received_at, p.message FROM inbox p
        WHERE p.instance = c.instance AND p.sender = c.sender AND p.status = 'pending'
        ORDER BY p.received_at, p.id LIMIT %(rows)b) i
    WINDOW w AS (PARTITION BY c.id ORDER BY i.received_at, i.id)
), chain AS (
    SELECT conv, received_at, first_at,
           bool_and(coalesce(gap <= %(window)b, true)
                    AND received_at <= first_at + %(max_wait)b AND rn <= %(max_messages)b)
               OVER (PARTITION BY conv ORDER BY received_at, id) AS in_head
    FROM pend
), heads AS (
    SELECT conv, min(first_at) AS first_at, max(received_at) FILTER (WHERE in_head) AS last_at,
           count(*) FILTER (WHERE in_head) AS n, bool_or(NOT in_head) AS followed
    FROM chain GROUP BY conv
), decided AS (
    SELECT conv, first_at, least(last_at + %(window)b, first_at + %(max_wait)b) AS deadline,
           followed OR n >= %(max_messages)b
               OR least(last_at + %(window)b, first_at + %(max_wait)b)
                  < (SELECT now FROM clock) AS ready
    FROM heads
), claimed AS (
    UPDATE conversations c SET lease_owner = %(owner)b, lease_token = nextval('lease_tokens'),
                               lease_until = now() + %(lease)b
    FROM decided d JOIN cand e ON e.id = d.conv WHERE c.id = d.conv AND d.ready
    RETURNING c.id, c.instance, c.sender, c.lease_token, c.attempts, d.first_at, e.expired
), later AS (
    UPDATE conversations c SET due_at = d.deadline + interval '1 millisecond'
    FROM decided d WHERE c.id = d.conv AND NOT d.ready
    RETURNING c.due_at
), idle AS (  -- due, but nothing pending: only when the counter agrees (it sees new rows)
    UPDATE conversations c SET due_at = NULL
    FROM cand WHERE c.id = cand.id AND c.pending <= 0
      AND NOT EXISTS (SELECT 1 FROM pend WHERE pend.conv = cand.id)
)
SELECT
    (SELECT json_agg(json_build_object(
        'conv', cl.id, 'token', cl.lease_token, 'attempts', cl.attempts,
        'expired', cl.expired,
        'ctx', CASE WHEN %(ctx)b THEN json_build_array(""" \
    + _HISTORY_OF.format(conv="cl.id", turn="''") + """,
            (SELECT settings ->> 'webhook_url' FROM instances WHERE name = cl.instance),""" \
    + _ESCALATED_OF.format(conv="cl.id") + "," \
    + _FALLBACKS_OF.format(conv="cl.id", turn="''") + """) END,
        'rows', (SELECT json_agg(json_build_object('id', p.id, 'message', p.message)
                                 ORDER BY p.received_at, p.id)
                 FROM pend p WHERE p.conv = cl.id),
        'recent', (SELECT json_agg(json_build_object('at', r.received_at,
                                                     'text', r.message ->> 'text')
                                   ORDER BY r.received_at, r.id)
                   FROM inbox r WHERE r.instance = cl.instance AND r.sender = cl.sender
                     AND r.status = 'processed'
                     AND r.action IN ('replied', 'escalated', 'held', 'merged')
                     AND r.received_at >= cl.first_at - %(text_window)b))
        ORDER BY cl.id) FROM claimed cl),
    (SELECT min(due_at) FROM later),
    (SELECT min(due_at) FROM conversations
      WHERE due_at > (SELECT now FROM clock)
        AND (lease_until IS NULL OR lease_until < now())
        AND id <> ALL (%(held)b::bigint[])),
    (SELECT count(*) FROM cand),
    (SELECT now FROM clock)
"""

# a claim's commit: everything or nothing, and only while the lease carries our token
_COMMIT_CLAIM = """
WITH lease AS (
    UPDATE conversations c SET lease_owner = NULL, lease_until = NULL, attempts = 0,
        last_error = NULL, pending = c.pending - %(n)b,
        last_message_at = greatest(c.last_message_at, %(last_at)b),
        sender_name = coalesce(%(name)b, c.sender_name),
        due_at = CASE WHEN c.pending - %(n)b <= 0 THEN NULL ELSE coalesce(
            (SELECT min(i.received_at) FROM inbox i
              WHERE i.instance = c.instance AND i.sender = c.sender AND i.status = 'pending'
                AND i.id <> ALL (%(ids)b::bigint[])) + %(next_due)b,
            coalesce(%(now)b::timestamptz, clock_timestamp())) END
    WHERE c.id = %(conv)b AND c.lease_token = %(token)b AND c.lease_until IS NOT NULL
    RETURNING c.id, c.due_at
), closed AS (
    UPDATE inbox SET status = 'processed', action = a.action, reason = a.reason,
                     turn_id = a.key, processed_at = now()
    FROM unnest(%(ids)b::bigint[], %(actions)b::text[], %(reasons)b::text[], %(keys)b::text[])
         AS a(id, action, reason, key)
    WHERE inbox.id = a.id AND inbox.status = 'pending' AND EXISTS (SELECT 1 FROM lease)
    RETURNING inbox.id
), ai AS (
    INSERT INTO ai_interactions (conversation_id, turn_id, responder, prompt, reply, confidence,
                                 fallback)
    SELECT %(conv)b, %(turn)b, %(responder)b, %(prompt)b, %(ai_reply)b, %(confidence)b,
           %(fallback)b
    WHERE %(has_ai)b AND EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (turn_id) DO NOTHING
    RETURNING 1
), users AS (  -- the turn's messages (a context load may have stored them already)
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT %(conv)b, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
    FROM unnest(%(ids_u)b::text[], %(kinds_u)b::text[], %(bodies_u)b::text[],
                %(sent_u)b::timestamptz[]) AS t(id, kind, body, sent)
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
    WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id
    RETURNING 1
), said AS (  -- after the user messages (history is ordered by id): it reads `users`
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id)
    SELECT %(conv)b, %(instance)b, %(reply_id)b, 'assistant', 'text', %(reply_text)b, %(turn)b
    WHERE %(reply_text)b::text IS NOT NULL AND EXISTS (SELECT 1 FROM lease)
      AND (SELECT count(*) FROM users) >= 0
    ON CONFLICT (instance, message_id) DO NOTHING
    RETURNING 1
), esc AS (
    INSERT INTO escalations (conversation_id, reason, turn_id)
    SELECT %(conv)b, %(reason)b, %(turn)b
    WHERE %(escalate)b AND EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (conversation_id) WHERE status = 'open' DO NOTHING
), ob AS (
    INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target, payload,
                        status, delivered_at)
    SELECT k, kd, %(instance)b, %(conv)b, tg, p, %(ob_status)b,
           CASE WHEN %(ob_status)b = 'delivered' THEN now() END
    FROM unnest(%(ob_keys)b::text[], %(ob_kinds)b::text[], %(ob_targets)b::text[],
                %(ob_payloads)b::jsonb[]) AS o(k, kd, tg, p)
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING 1
)
SELECT CASE
    WHEN NOT EXISTS (SELECT 1 FROM lease) THEN CASE
        WHEN (SELECT count(*) FROM inbox i, unnest(%(ids)b::bigint[], %(keys)b::text[]) a(id, key)
              WHERE i.id = a.id AND i.status = 'processed' AND i.turn_id = a.key) = %(n)b
        THEN 'already'
        ELSE pipeline_conflict('the lease of conversation ' || %(conv)b
                               || ' was taken over (token ' || %(token)b || ')') END
    WHEN (SELECT count(*) FROM closed) <> %(n)b THEN pipeline_conflict(
        'conversation ' || %(conv)b || ': ' || (%(n)b - (SELECT count(*) FROM closed))
        || ' of its claimed rows were already processed')
    WHEN (SELECT count(*) FROM ob) <> cardinality(%(ob_keys)b::text[]) THEN pipeline_conflict(
        'turn ' || %(turn)b || ': an idempotency key of its outbox rows is already used')
    WHEN %(has_ai)b AND NOT EXISTS (SELECT 1 FROM ai) THEN pipeline_conflict(
        'turn ' || %(turn)b || ' already has an AI interaction')
    WHEN %(reply_text)b::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM said) THEN
        pipeline_conflict('turn ' || %(turn)b || ' already has a reply message')
    ELSE 'ok' END,
    (SELECT due_at FROM lease)
"""

_RANK = "array_position(ARRAY['sent', 'delivered', 'read', 'failed'], {})"
_RECORD_RECEIPTS = """
WITH r AS (
    SELECT * FROM unnest(%(inst)b::text[], %(pid)b::text[], %(st)b::text[], %(key)b::text[],
                         %(err)b::text[], %(num)b::text[], %(txt)b::text[])
         WITH ORDINALITY AS r(instance, pid, status, key, err, num, txt, ord)
), m AS (
    SELECT r.*, coalesce(
        (SELECT o.id FROM outbox o WHERE r.key IS NOT NULL AND o.idempotency_key = r.key
           AND o.instance = r.instance),
        (SELECT o.id FROM outbox o WHERE o.instance = r.instance AND o.provider_id = r.pid
          ORDER BY o.id LIMIT 1),
        (SELECT o.id FROM outbox o WHERE r.txt IS NOT NULL AND o.instance = r.instance
           AND o.sending_since IS NOT NULL AND o.provider_id IS NULL AND o.target = r.num
           AND o.payload ->> 'text' = r.txt ORDER BY o.id LIMIT 1)) AS row_id
    FROM r
), best AS (
    SELECT DISTINCT ON (row_id) row_id, pid, status, err FROM m WHERE row_id IS NOT NULL
    ORDER BY row_id, {rank_m} DESC
), upd AS (
    UPDATE outbox o SET provider_id = coalesce(o.provider_id, b.pid),
        receipt = CASE WHEN {rank_b} > coalesce({rank_o}, 0) THEN b.status ELSE o.receipt END,
        receipt_error = coalesce(b.err, o.receipt_error), receipt_at = now()
    FROM best b WHERE o.id = b.row_id
    RETURNING o.id, o.conversation_id, o.kind, b.status, b.err
), refused AS (  -- a message WhatsApp refused: a human has to reach the user another way
    INSERT INTO escalations (conversation_id, reason)
    SELECT DISTINCT ON (u.conversation_id) u.conversation_id,
           'a reply could not be delivered: ' || coalesce(u.err, 'failed')
    FROM upd u WHERE u.status = 'failed' AND u.conversation_id IS NOT NULL
      AND u.kind <> 'webhook'
    ON CONFLICT (conversation_id) WHERE status = 'open' DO NOTHING
), phone AS (  -- an own-number message the pipeline did not send: a person on the phone
    SELECT DISTINCT ON (m.instance, m.pid) m.instance, m.pid, m.txt, c.id AS conv
    FROM m JOIN conversations c ON c.instance = m.instance AND c.sender = m.num
                                AND c.status = 'open'
    WHERE m.row_id IS NULL AND m.txt IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.instance = m.instance
                      AND o.target = m.num AND o.payload ->> 'text' = m.txt
                      AND o.created_at > now() - interval '1 day')
), typed AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, author)
    SELECT conv, instance, 'phone:' || pid, 'human', 'text', txt, 'phone' FROM phone
    ON CONFLICT (instance, message_id) DO NOTHING
    RETURNING conversation_id
), held AS (
    INSERT INTO escalations (conversation_id, reason, claimed_by, claimed_at)
    SELECT DISTINCT conversation_id, 'answered from the business phone', 'phone', now()
    FROM typed WHERE %(phone)b
    ON CONFLICT (conversation_id) WHERE status = 'open' DO NOTHING
)
SELECT count(*) FROM m WHERE row_id IS NOT NULL
""".replace("{rank_b}", _RANK.format("b.status")).replace("{rank_o}", _RANK.format("o.receipt")) \
    .replace("{rank_m}", _RANK.format("status"))

