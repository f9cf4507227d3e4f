-- 0003: replies and customer webhook events queue separately per conversation, so a slow
-- customer endpoint never delays what the user is waiting for (see pipeline/outbox.py)
DROP INDEX outbox_pending_lane;
CREATE INDEX outbox_pending_lane ON outbox ((CASE WHEN conversation_id IS NULL THEN -id ELSE conversation_id * 2 + (kind = 'webhook')::int END), id)
    WHERE status = 'pending';
