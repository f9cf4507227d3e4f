-- 0007: a dead letter can be sent again or put aside (`pipeline deadletters`, /deadletters):
-- it stays, with who did what and when, so the record of the failure is not lost
ALTER TABLE dead_letters ADD COLUMN status text NOT NULL DEFAULT 'open'
    CHECK (status IN ('open', 'retried', 'discarded'));
ALTER TABLE dead_letters ADD COLUMN handled_at timestamptz;
ALTER TABLE dead_letters ADD COLUMN handled_by text;
CREATE INDEX dead_letters_open ON dead_letters (created_at, id) WHERE status = 'open';
