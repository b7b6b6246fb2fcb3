-- +goose Up

-- Read models. Each is a pure function of the event log (projections/),
-- updated in the same transaction as the events that change it, so it can be
-- dropped and rebuilt at any time. Timestamps come from the events'
-- recorded_at, never from now(), so a rebuild reproduces them exactly.

CREATE TABLE deals (
    id                  uuid        PRIMARY KEY,
    customer_id         text        NOT NULL,
    customer_name       text        NOT NULL,
    currency            text        NOT NULL,
    lines               jsonb       NOT NULL,
    total               text        NOT NULL,
    status              text        NOT NULL,
    version             integer     NOT NULL,
    close_version       integer,
    status_before_close text,
    idempotency_key     text,
    invoice_number      text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX deals_status_idx ON deals (status);

CREATE TABLE inventory (
    sku        text        PRIMARY KEY,
    available  bigint      NOT NULL CHECK (available >= 0),
    allocated  bigint      NOT NULL DEFAULT 0 CHECK (allocated >= 0),
    version    integer     NOT NULL,
    updated_at timestamptz NOT NULL
);

-- One row per idempotency key K = deal id + close version.
CREATE TABLE invoice_sagas (
    idempotency_key text        PRIMARY KEY,
    deal_id         uuid        NOT NULL,
    state           text        NOT NULL,
    invoice_number  text,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX invoice_sagas_deal_idx ON invoice_sagas (deal_id);
CREATE INDEX invoice_sagas_state_idx ON invoice_sagas (state);

-- +goose Down
DROP TABLE invoice_sagas;
DROP TABLE inventory;
DROP TABLE deals;
