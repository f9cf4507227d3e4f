-- 0001: the tables of DESIGN.md and the constraints that carry correctness.

-- instances are seeded from the [[instances]] of the config at start
CREATE TABLE instances (
    name               text PRIMARY KEY,
    phone_number_id    text UNIQUE,
    evolution_instance text UNIQUE,
    settings           jsonb NOT NULL DEFAULT '{}',
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- one open conversation per (instance, sender) at a time
CREATE TABLE conversations (
    id              bigserial PRIMARY KEY,
    instance        text NOT NULL REFERENCES instances (name),
    sender          text NOT NULL,
    sender_name     text,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_message_at timestamptz
);
CREATE UNIQUE INDEX conversations_one_open ON conversations (instance, sender)
    WHERE status = 'open';

-- raw inbound messages, stored before the webhook is acknowledged; one row per message id
CREATE TABLE inbox (
    id           bigserial PRIMARY KEY,
    instance     text NOT NULL,
    message_id   text NOT NULL,
    sender       text NOT NULL,
    format       text NOT NULL CHECK (format IN ('cloud-api', 'evolution')),
    received_at  timestamptz NOT NULL,
    message      jsonb NOT NULL,
    redeliveries integer NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'processed')),
    action       text CHECK (action IN ('replied', 'escalated', 'held', 'merged', 'duplicate',
                                        'invalid', 'ignored')),
    reason       text,
    turn_id      text,
    processed_at timestamptz,
    CONSTRAINT inbox_one_per_message UNIQUE (instance, message_id),
    CONSTRAINT inbox_processed_has_action CHECK ((status = 'processed') = (action IS NOT NULL))
);
CREATE INDEX inbox_pending ON inbox (received_at, id) WHERE status = 'pending';

-- the conversation's history: user messages (one per inbound id), assistant and human replies
CREATE TABLE messages (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id),
    instance        text NOT NULL,
    message_id      text NOT NULL,
    role            text NOT NULL CHECK (role IN ('user', 'assistant', 'human')),
    kind            text NOT NULL DEFAULT 'text',
    body            text NOT NULL,
    turn_id         text,
    sent_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_one_per_id UNIQUE (instance, message_id)
);
CREATE INDEX messages_history ON messages (conversation_id, id DESC);

-- every answer of the assistant, one per turn
CREATE TABLE ai_interactions (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id),
    turn_id         text NOT NULL UNIQUE,
    responder       text NOT NULL,
    prompt          text NOT NULL,
    reply           text NOT NULL,
    confidence      real NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    fallback        boolean NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ai_interactions_recent ON ai_interactions (conversation_id, id DESC);

-- hand-overs to a human; at most one open per conversation
CREATE TABLE escalations (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    reason          text NOT NULL,
    turn_id         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    resolved_by     text,
    CHECK ((status = 'resolved') = (resolved_at IS NOT NULL))
);
CREATE UNIQUE INDEX escalations_one_open ON escalations (conversation_id) WHERE status = 'open';

-- replies and webhook events waiting for delivery; the key makes every effect idempotent
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    idempotency_key text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('reply', 'handover', 'webhook')),
    instance        text NOT NULL,
    conversation_id bigint REFERENCES conversations (id),
    target          text NOT NULL,
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    CONSTRAINT outbox_idempotent UNIQUE (idempotency_key)
);
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE status = 'pending';

-- what could not be understood or delivered, with the reason
CREATE TABLE dead_letters (
    id         bigserial PRIMARY KEY,
    stage      text NOT NULL,
    reason     text NOT NULL,
    origin     text,
    format     text,
    instance   text,
    message_id text,
    payload    jsonb,
    raw        text,
    created_at timestamptz NOT NULL DEFAULT now()
);
