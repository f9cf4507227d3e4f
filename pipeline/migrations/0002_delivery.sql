-- 0002: what the delivery task needs to find the head of each conversation's queue quickly.

-- the oldest pending row of each conversation (rows without one form a queue of their own)
CREATE INDEX outbox_pending_lane ON outbox ((coalesce(conversation_id, -id)), id)
    WHERE status = 'pending';
