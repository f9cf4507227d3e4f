"""Receipts: what channels said of our sends, applied to their outbox rows in one statement
(and what a refused send or a reply typed on the business phone opens)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pipeline.store.edge import Statements
from stages.records import Receipt

#: what an own-number message the pipeline did not send does (see ``record_receipts``)
PhoneRule = Literal["off", "record", "hold"]


class ReceiptStatements(Statements):
    """What channels said of our sends, written to their outbox rows."""

    async def record_receipts(self, receipts: Sequence[Receipt], phone: PhoneRule = "off"
                              ) -> int:
        """Apply what channels said of our sends to their outbox rows, in one statement; the
        number of receipts that found a row. A receipt finds its row by our key (the Cloud
        API's ``biz_opaque_callback_data``), by the channel's id for the message, or -- an
        Evolution echo -- as the send in doubt to that number with that text. A status
        never goes back (``read`` stays when a late ``sent`` arrives). A message to a user
        that WhatsApp refused (``failed``, e.g. 131047 outside the 24-hour window) opens an
        escalation of its conversation: the assistant holds, a human follows up.

        ``phone`` (live intake only: a replay's recorded echoes are of the original run's
        sends, and would race its own replies): with ``record``, an echo that finds no row
        and whose text the pipeline did not queue for that number in the last day was typed
        on the business phone and joins the conversation's history (role ``human``, author
        ``phone``); with ``hold`` it also opens an escalation held by the phone -- the
        assistant stays silent until an agent resolves it."""
        if not receipts:
            return 0
        (found,), = await self._all(_RECORD_RECEIPTS, {"phone": phone,
            "inst": [r.instance for r in receipts], "pid": [r.provider_id for r in receipts],
            "st": [r.status for r in receipts], "key": [r.key for r in receipts],
            "err": [r.error for r in receipts], "num": [r.number for r in receipts],
            "txt": [r.text for r in receipts]})
        return int(found)


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
    WHERE %(phone)s <> 'off' AND m.row_id IS NULL AND m.txt IS NOT NULL
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
    FROM typed WHERE %(phone)s = 'hold'
    ON CONFLICT (conversation_id) WHERE status = 'open' DO NOTHING
)
SELECT count(*) FROM m WHERE row_id IS NOT NULL
""".replace("{rank_b}", _RANK.format("b.status")).replace("{rank_o}", _RANK.format("o.receipt")) \
    .replace("{rank_m}", _RANK.format("status"))
