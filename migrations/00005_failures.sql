-- +goose Up

-- Saga bookkeeping for retries. version is the stream version of the saga's
-- own stream (invoice-K), whose events are the failed attempts.
ALTER TABLE invoice_sagas
    ADD COLUMN version          integer     NOT NULL DEFAULT 0,
    ADD COLUMN attempts         integer     NOT NULL DEFAULT 0,
    ADD COLUMN error_class      text,
    ADD COLUMN last_error       text,
    ADD COLUMN first_attempt_at timestamptz,
    ADD COLUMN last_attempt_at  timestamptz,
    ADD COLUMN next_attempt_at  timestamptz;

CREATE TABLE alerts (
    id              uuid        PRIMARY KEY,
    kind            text        NOT NULL,
    severity        text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    deal_id         uuid,
    idempotency_key text,
    dead_letter_id  uuid,
    message         text        NOT NULL,
    version         integer     NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX alerts_state_idx ON alerts (state, created_at);
CREATE INDEX alerts_deal_idx ON alerts (deal_id);

CREATE TABLE dead_letters (
    id               uuid        PRIMARY KEY,
    state            text        NOT NULL CHECK (state IN ('open', 'reinjected', 'discarded', 'resolved')),
    deal_id          uuid,
    idempotency_key  text,
    message_uuid     text        NOT NULL,
    topic            text        NOT NULL,
    handler          text        NOT NULL,
    payload          bytea       NOT NULL,
    metadata         jsonb       NOT NULL,
    reason           text        NOT NULL,
    error_class      text        NOT NULL,
    attempts         integer     NOT NULL,
    first_failure_at timestamptz NOT NULL,
    last_failure_at  timestamptz NOT NULL,
    version          integer     NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX dead_letters_state_idx ON dead_letters (state, created_at, id);
CREATE INDEX dead_letters_deal_idx ON dead_letters (deal_id);
CREATE INDEX dead_letters_class_idx ON dead_letters (error_class);

-- +goose Down
DROP TABLE dead_letters;
DROP TABLE alerts;
ALTER TABLE invoice_sagas
    DROP COLUMN version, DROP COLUMN attempts, DROP COLUMN error_class, DROP COLUMN last_error,
    DROP COLUMN first_attempt_at, DROP COLUMN last_attempt_at, DROP COLUMN next_attempt_at;
