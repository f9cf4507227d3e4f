-- 0006: what became of a send, as the channel tells it (pipeline/delivery.py, receipts).
--
-- sending_since: set by the claim that takes a row to send it to the user -- the intent is
-- durable before the request leaves -- and cleared when the send's outcome is recorded. A row
-- claimed again with it still set was sent by a process that died (or whose answer was
-- lost): it is reconciled with the channel's echo before it may be sent again.
ALTER TABLE outbox ADD COLUMN sending_since timestamptz;
-- the channel's id of the sent message (the send's answer, or its echo)
ALTER TABLE outbox ADD COLUMN provider_id text;
-- the latest status webhooks reported; never downgraded (a late "sent" does not undo "read")
ALTER TABLE outbox ADD COLUMN receipt text
    CHECK (receipt IN ('sent', 'delivered', 'read', 'failed'));
ALTER TABLE outbox ADD COLUMN receipt_error text;
ALTER TABLE outbox ADD COLUMN receipt_at timestamptz;

-- a status webhook finds its row by the channel's id
CREATE INDEX outbox_provider ON outbox (instance, provider_id) WHERE provider_id IS NOT NULL;
-- an echo (Evolution's fromMe upsert) finds the send in doubt by recipient
CREATE INDEX outbox_sending ON outbox (instance, target) WHERE sending_since IS NOT NULL;
