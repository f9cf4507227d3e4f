-- 0008: the agents' console (pipeline/console/). One agent at a time owns an open escalation;
-- agents' replies are `human` messages (with who wrote them) sent through the outbox like
-- every other reply; private notes are kept apart from the messages, so the assistant's
-- history never shows them.
ALTER TABLE escalations ADD COLUMN claimed_by text;
ALTER TABLE escalations ADD COLUMN claimed_at timestamptz;
ALTER TABLE messages ADD COLUMN author text;

CREATE TABLE notes (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id),
    author          text NOT NULL,
    body            text NOT NULL CHECK (body <> ''),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notes_conversation ON notes (conversation_id, id);

-- a conversation's escalations, for its page (open and resolved, in order)
CREATE INDEX escalations_conversation ON escalations (conversation_id, id);
