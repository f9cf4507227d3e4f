-- 0004: the database owns the work (pipeline/claims.py). A conversation is the unit of
-- ownership: its row carries how many inbox rows are pending, when its oldest pending work
-- may be due, and the lease of whichever process is working on it (with a fencing token
-- that the commit checks, so a process whose lease was taken over cannot write).

ALTER TABLE conversations
    ADD COLUMN pending     integer NOT NULL DEFAULT 0 CHECK (pending >= 0),
    ADD COLUMN due_at      timestamptz,          -- NULL: nothing pending
    ADD COLUMN lease_owner text,
    ADD COLUMN lease_token bigint NOT NULL DEFAULT 0,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN attempts    integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error  text;

CREATE SEQUENCE lease_tokens;

-- the claim: conversations whose work is due, earliest first
CREATE INDEX conversations_due ON conversations (due_at, id) WHERE due_at IS NOT NULL;
-- a conversation's pending rows in order, and its recent rows (repeated-text window)
CREATE INDEX inbox_conversation_pending ON inbox (instance, sender, received_at, id)
    WHERE status = 'pending';
CREATE INDEX inbox_conversation ON inbox (instance, sender, received_at);

-- rows left pending by an older version: give every one an open conversation with its count
INSERT INTO conversations (instance, sender, last_message_at)
SELECT DISTINCT ON (i.instance, i.sender) i.instance, i.sender, i.received_at
FROM inbox i
WHERE i.status = 'pending'
  AND EXISTS (SELECT 1 FROM instances n WHERE n.name = i.instance)
  AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.instance = i.instance
                  AND c.sender = i.sender AND c.status = 'open')
ORDER BY i.instance, i.sender, i.received_at;

UPDATE conversations c SET pending = p.n, due_at = p.first_at
FROM (SELECT instance, sender, count(*) AS n, min(received_at) AS first_at
      FROM inbox WHERE status = 'pending' GROUP BY instance, sender) p
WHERE c.instance = p.instance AND c.sender = p.sender AND c.status = 'open';

-- a commit that finds its claim taken over, or its rows already processed, fails with this
CREATE FUNCTION pipeline_conflict(message text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PC001', MESSAGE = message;
END
$$;
