-- +goose Up

-- The event log is the source of truth: every state change of a deal or of
-- an inventory item is an event here, and every projection can be rebuilt
-- from it. stream_version is unique per stream, which is what gives appends
-- their optimistic concurrency: two writers that read version n both try to
-- insert n+1 and one of them fails.
CREATE TABLE events (
    position       bigserial   PRIMARY KEY,
    stream_id      text        NOT NULL,
    stream_version integer     NOT NULL CHECK (stream_version > 0),
    type           text        NOT NULL,
    schema_version integer     NOT NULL DEFAULT 1,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_type_idx ON events (type);

-- Append-only, enforced by the database and not only by the code: UPDATE,
-- DELETE and TRUNCATE all fail. A superuser can still disable the trigger,
-- which is what tamper-evidence (hash chains) is for.
-- +goose StatementBegin
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
-- +goose StatementEnd

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- +goose Down
DROP TABLE events;
DROP FUNCTION events_append_only();
