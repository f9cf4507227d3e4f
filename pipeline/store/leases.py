"""A claim's lease: its commit (every write of a turn in one statement, fenced by the lease's
token), its release and its renewal, and the leases of processes known to be dead.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from pipeline.store.context import sender_name
from pipeline.store.edge import Statements
from stages.records import Claim, ClaimCommit, Committed


class LeaseStatements(Statements):
    """What a lease allows: commit its work, give it back or renew it; every statement is
    fenced by the lease's token, so a lease taken over can no longer write."""

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        """Write a claim's effects and close its rows, fenced by the lease's token.

        ``written`` is False when this very commit was written before (a retry after a lost
        answer); ``next_due`` says when the conversation's remaining work is due. Raises
        :class:`ClaimConflict` -- and writes nothing -- when the lease was taken over, a row
        is no longer pending, or an idempotency key is already used: the work is then redone
        from the database, never reported done.
        """
        fx = commit.effects
        turn = fx.turn if fx is not None else None
        keys = fx.outbox if fx is not None else ()
        result = await self._all(_COMMIT_CLAIM, {
            **_commit_values(commit), "next_due": commit.next_due, "now": commit.now,
            "last_at": turn.messages[-1].received_at if turn else None,
            "ids_u": [m.message_id for m in turn.messages] if turn else [],
            "kinds_u": [m.kind for m in turn.messages] if turn else [],
            "bodies_u": [m.text for m in turn.messages] if turn else [],
            "sent_u": [m.sent_at for m in turn.messages] if turn else [],
            "ob_keys": [o[0] for o in keys], "ob_kinds": [o[1] for o in keys],
            "ob_targets": [o[2] for o in keys], "ob_payloads": [Jsonb(o[3]) for o in keys],
        })
        return Committed(result[0][0] == "ok", result[0][1])

    async def commit_claims(self, commits: Sequence[ClaimCommit]) -> list[Committed]:
        """Several claims' commits in one statement (group commit): all of them, or -- when
        any would not be an ordinary first commit (a lease taken over, a row no longer
        pending, a key or reply already there, a commit written before) -- nothing, with
        :class:`ClaimConflict`; the caller then commits them one by one with
        :meth:`commit_claim`, which tells those cases apart. The turns travel as one JSON
        parameter (encoded in C) instead of ~30 parameters and arrays per turn."""
        rows = await self._all(_COMMIT_CLAIMS, {"turns": json.dumps(
            [_commit_json(c) for c in commits], separators=(",", ":"))})
        (_, due), = rows
        due_at = {int(conv): dt.datetime.fromisoformat(at) if at else None
                  for conv, at in (due or [])}
        return [Committed(True, due_at[c.claim.conversation_id]) for c in commits]

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
            "WITH locked AS (SELECT id FROM conversations WHERE id = ANY(%b::bigint[])"
            " ORDER BY id FOR UPDATE)"  # in id order, like every multi-row write
            " UPDATE conversations c SET lease_until = now() + %b"
            " FROM unnest(%b::bigint[], %b::bigint[]) AS l(id, token)"
            " WHERE c.id = l.id AND c.lease_token = l.token AND c.lease_until IS NOT NULL"
            " AND (SELECT count(*) FROM locked) >= 0 RETURNING c.lease_token",
            ([c for c, _ in leases], dt.timedelta(seconds=lease_s), [c for c, _ in leases],
             [t for _, t in leases]))
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
            "WITH locked AS (SELECT id FROM conversations WHERE id = ANY(%b::bigint[])"
            " ORDER BY id FOR UPDATE)"  # in id order, like every multi-row write
            " UPDATE conversations c SET lease_owner = NULL, lease_until = NULL"
            " FROM unnest(%b::bigint[], %b::bigint[]) AS l(id, token)"
            " WHERE c.id = l.id AND c.lease_token = l.token AND c.lease_until IS NOT NULL"
            " AND (SELECT count(*) FROM locked) >= 0 RETURNING c.id",
            ([c for c, _ in leases], [c for c, _ in leases], [t for _, t in leases]))
        return len(rows)


def _commit_values(commit: ClaimCommit) -> dict[str, Any]:
    """A commit's values that both commit statements take as they are."""
    fx, claim = commit.effects, commit.claim
    turn = fx.turn if fx is not None else None
    reply = turn.reply if turn is not None else None
    rows = commit.rows
    return {
        "conv": claim.conversation_id, "token": claim.token, "instance": commit.instance,
        "n": len(rows), "ids": [r[0] for r in rows], "actions": [r[1] for r in rows],
        "reasons": [r[2] for r in rows], "keys": [r[3] for r in rows],
        "name": sender_name(turn) if turn else None,
        "turn": turn.turn_id if turn else "", "prompt": turn.text if turn else "",
        "has_ai": reply is not None, "responder": reply.responder if reply else "",
        "ai_reply": reply.text if reply else "",
        "confidence": reply.confidence if reply else 0.0,
        "fallback": reply.fallback if reply else False,
        "reply_text": fx.reply_text if fx else None,
        "reply_id": f"{turn.turn_id}:reply" if turn else "",
        "escalate": bool(turn and turn.decision and turn.decision.verdict == "escalate"),
        "reason": fx.reason if fx else None,
        "ob_status": "delivered" if fx is not None and fx.delivered else "pending",
    }


def _commit_json(commit: ClaimCommit) -> dict[str, Any]:
    """One turn's commit as :data:`_COMMIT_CLAIMS` reads it: the values of
    :data:`_COMMIT_CLAIM`, times as ISO text, the messages and outbox rows as objects."""
    fx = commit.effects
    turn = fx.turn if fx is not None else None
    return {
        **_commit_values(commit),
        "next_due_us": commit.next_due // dt.timedelta(microseconds=1),
        "now": commit.now.isoformat() if commit.now else None,
        "last_at": turn.messages[-1].received_at.isoformat() if turn else None,
        "users": [{"id": m.message_id, "kind": m.kind, "body": m.text,
                   "sent": m.sent_at.isoformat()} for m in turn.messages] if turn else [],
        "outbox": [{"k": o[0], "kd": o[1], "tg": o[2], "p": o[3]}
                   for o in (fx.outbox if fx is not None else ())],
    }


# several claims' commits: what _COMMIT_CLAIM does for one, for every turn of the batch, and
# only if every one of them is an ordinary first commit -- else nothing (the caller then
# commits them one by one). Statements of one batch touch different conversations.
_COMMIT_CLAIMS = """
WITH t AS (
    SELECT * FROM jsonb_to_recordset(%(turns)b::jsonb) AS t(
        conv bigint, token bigint, instance text, n int, ids bigint[], actions text[],
        reasons text[], keys text[], next_due_us bigint, now timestamptz, last_at timestamptz,
        name text, users jsonb, turn text, prompt text, has_ai boolean, responder text,
        ai_reply text, confidence double precision, fallback boolean, reply_text text,
        reply_id text, escalate boolean, reason text, outbox jsonb, ob_status text)
), locked AS (  -- first, in id order, like every statement that writes several
                -- conversations: no deadlock with intake or a renewal
    SELECT c.id FROM conversations c WHERE c.id IN (SELECT t.conv FROM t)
    ORDER BY c.id FOR UPDATE
), lease AS (
    UPDATE conversations c SET lease_owner = NULL, lease_until = NULL, attempts = 0,
        last_error = NULL, pending = c.pending - t.n,
        last_message_at = greatest(c.last_message_at, t.last_at),
        sender_name = coalesce(t.name, c.sender_name),
        due_at = CASE WHEN c.pending - t.n <= 0 THEN NULL ELSE coalesce(
            (SELECT min(i.received_at) FROM inbox i
              WHERE i.instance = c.instance AND i.sender = c.sender AND i.status = 'pending'
                AND i.id <> ALL (t.ids)) + t.next_due_us * interval '1 microsecond',
            coalesce(t.now, clock_timestamp())) END
    FROM t
    WHERE c.id = t.conv AND c.lease_token = t.token AND c.lease_until IS NOT NULL
      AND (SELECT count(*) FROM locked) >= 0
    RETURNING c.id, c.due_at
), closed AS (  -- after the conversations' locks (the order intake takes them in too)
    UPDATE inbox SET status = 'processed', action = a.action, reason = a.reason,
                     turn_id = a.key, processed_at = now()
    FROM t, unnest(t.ids, t.actions, t.reasons, t.keys) AS a(id, action, reason, key)
    WHERE inbox.id = a.id AND inbox.status = 'pending' AND (SELECT count(*) FROM lease) >= 0
    RETURNING inbox.id
), ai AS (
    INSERT INTO ai_interactions (conversation_id, turn_id, responder, prompt, reply, confidence,
                                 fallback)
    SELECT t.conv, t.turn, t.responder, t.prompt, t.ai_reply, t.confidence, t.fallback
    FROM t WHERE t.has_ai
    ON CONFLICT (turn_id) DO NOTHING
    RETURNING 1
), users AS (  -- the turns' messages (a context load may have stored them already)
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT t.conv, t.instance, u.id, 'user', u.kind, u.body, t.turn, u.sent
    FROM t, jsonb_to_recordset(t.users) AS u(id text, kind text, body text, sent timestamptz)
    ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
    WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id
    RETURNING 1
), said AS (  -- after the user messages (history is ordered by id): it reads `users`
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id)
    SELECT t.conv, t.instance, t.reply_id, 'assistant', 'text', t.reply_text, t.turn
    FROM t WHERE t.reply_text IS NOT NULL AND (SELECT count(*) FROM users) >= 0
    ON CONFLICT (instance, message_id) DO NOTHING
    RETURNING 1
), esc AS (
    INSERT INTO escalations (conversation_id, reason, turn_id)
    SELECT t.conv, t.reason, t.turn FROM t WHERE t.escalate
    ON CONFLICT (conversation_id) WHERE status = 'open' DO NOTHING
), ob AS (
    INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target, payload,
                        status, delivered_at)
    SELECT o.k, o.kd, t.instance, t.conv, o.tg, o.p, t.ob_status,
           CASE WHEN t.ob_status = 'delivered' THEN now() END
    FROM t, jsonb_to_recordset(t.outbox) AS o(k text, kd text, tg text, p jsonb)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING 1
)
SELECT CASE
    WHEN (SELECT count(*) FROM lease) <> (SELECT count(*) FROM t) THEN pipeline_conflict(
        'a lease of the batch was taken over, or its commit was written before')
    WHEN (SELECT count(*) FROM closed) <> (SELECT sum(t.n) FROM t) THEN pipeline_conflict(
        'claimed rows of the batch were already processed')
    WHEN (SELECT count(*) FROM ob) <> (SELECT sum(jsonb_array_length(t.outbox)) FROM t)
        THEN pipeline_conflict('an idempotency key of the batch is already used')
    WHEN (SELECT count(*) FROM ai) <> (SELECT count(*) FROM t WHERE t.has_ai) THEN
        pipeline_conflict('a turn of the batch already has an AI interaction')
    WHEN (SELECT count(*) FROM said) <> (SELECT count(*) FROM t WHERE t.reply_text IS NOT NULL)
        THEN pipeline_conflict('a turn of the batch already has a reply message')
    ELSE 'ok' END,
    (SELECT json_agg(json_build_array(id, due_at)) FROM lease)
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
