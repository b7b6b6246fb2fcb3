-- +goose Up

-- The Postgres work queue (adapters/queue) that carries saga work from the
-- relay to the handler processes. One row is one message waiting to be
-- handled or being handled; an acked message is deleted.
--
-- A row is claimable when available_at <= now(), it holds no live lease
-- (lease_until IS NULL OR lease_until <= now()), and, when it has an
-- ordering key, no lower id of the same topic and key exists (only the head
-- of a key is ever claimable, so a key has at most one message in flight).
-- A claim sets lease_until, a fresh claim_token and attempts + 1 and commits
-- at once: no transaction stays open while the handler runs (invariant I5).
-- Ack, nack and lease extension match on (id, claim_token), so a consumer
-- that lost its lease cannot touch a message that another consumer holds.
CREATE TABLE work_queue (
    id           bigserial   PRIMARY KEY,
    topic        text        NOT NULL,
    uuid         text        NOT NULL,
    payload      bytea       NOT NULL DEFAULT '\x'::bytea,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    ordering_key text        NULL,
    attempts     integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    available_at timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NULL,
    claim_token  uuid        NULL,
    last_error   text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The claim scans a topic in id order and filters on availability and lease.
CREATE INDEX work_queue_claim_idx ON work_queue (topic, id);

-- "Is there an older message of the same key?" (the head-of-key check).
CREATE INDEX work_queue_ordering_key_idx ON work_queue (topic, ordering_key, id)
    WHERE ordering_key IS NOT NULL;

-- +goose Down
DROP TABLE work_queue;
