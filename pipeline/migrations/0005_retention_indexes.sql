-- 0005: the hot statements stay index scans however much history piles up, and retention
-- (pipeline/retention.py) finds old finished rows without reading the others. Already
-- covered before this file: the claim (conversations_due, inbox_conversation_pending), the
-- repeated-text window (inbox_conversation), history (messages_history), recent answers
-- (ai_interactions_recent), the open escalation of a conversation and the list of open
-- escalations (escalations_one_open, partial: it holds only the open ones), the outbox
-- claim (outbox_due, outbox_pending_lane; pipeline/outbox.py reads them without a join).

-- every context load: when the conversation's last escalation was resolved (failed answers
-- before it do not count); max(resolved_at) per conversation was a scan of all escalations
CREATE INDEX escalations_resolved ON escalations (conversation_id, resolved_at);

-- retention, oldest first: only finished rows are in these partial indexes, so pending work
-- is never read (nor deleted) by it
CREATE INDEX inbox_processed ON inbox (processed_at) WHERE status = 'processed';
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE status = 'delivered';
CREATE INDEX outbox_dead ON outbox (created_at) WHERE status = 'dead';
CREATE INDEX dead_letters_created ON dead_letters (created_at);
