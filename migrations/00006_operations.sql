-- +goose Up

-- Dead-letter operations: the payload column holds the latest revision; every
-- revision, with its JSON Patch, lives in the dead letter's event stream.
ALTER TABLE dead_letters
    ADD COLUMN revision       integer NOT NULL DEFAULT 0,
    ADD COLUMN needs_approval boolean NOT NULL DEFAULT false,
    ADD COLUMN approved_by    text,
    ADD COLUMN reinjects      integer NOT NULL DEFAULT 0,
    ADD COLUMN reason_search  tsvector GENERATED ALWAYS AS (to_tsvector('simple', reason)) STORED;
-- Keyset pagination walks (created_at, id) newest first.
CREATE INDEX dead_letters_page_idx ON dead_letters (created_at DESC, id DESC);
CREATE INDEX dead_letters_reason_idx ON dead_letters USING gin (reason_search);
CREATE INDEX dead_letters_key_idx ON dead_letters (idempotency_key);

-- The audit log is not a projection: it is its own append-only record of
-- operator actions, written in the same transaction as each action.
CREATE TABLE audit_log (
    id           bigserial   PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text        NOT NULL,
    role         text        NOT NULL,
    action       text        NOT NULL,
    target_type  text        NOT NULL,
    target_id    text        NOT NULL,
    reason       text        NOT NULL DEFAULT '',
    before_hash  text,
    after_hash   text,
    diff         jsonb,
    request_id   text,
    operation_id uuid
);
CREATE INDEX audit_log_target_idx ON audit_log (target_type, target_id);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC, id DESC);

-- +goose StatementBegin
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Bulk re-inject operations: the plan is written once, then each item is
-- re-injected in its own transaction that also marks it done, so a crash
-- resumes exactly where it stopped and no item is re-injected twice.
CREATE TABLE bulk_operations (
    id         uuid        PRIMARY KEY,
    kind       text        NOT NULL,
    filter     jsonb       NOT NULL,
    actor      text        NOT NULL,
    role       text        NOT NULL,
    reason     text        NOT NULL,
    state      text        NOT NULL CHECK (state IN ('running', 'done')),
    total      integer     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bulk_operation_items (
    operation_id   uuid    NOT NULL REFERENCES bulk_operations (id),
    seq            integer NOT NULL,
    dead_letter_id uuid    NOT NULL,
    deal_id        uuid,
    state          text    NOT NULL CHECK (state IN ('pending', 'done', 'skipped')),
    detail         text,
    PRIMARY KEY (operation_id, seq)
);

-- System settings shared by every process (e.g. the maker-checker rule).
CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- +goose Down
DROP TABLE settings;
DROP TABLE bulk_operation_items;
DROP TABLE bulk_operations;
DROP TABLE audit_log;
DROP FUNCTION audit_log_append_only();
DROP INDEX dead_letters_key_idx;
DROP INDEX dead_letters_reason_idx;
DROP INDEX dead_letters_page_idx;
ALTER TABLE dead_letters DROP COLUMN reason_search, DROP COLUMN reinjects, DROP COLUMN approved_by,
    DROP COLUMN needs_approval, DROP COLUMN revision;
