-- +goose Up

-- Tamper evidence and commit order for the event log.
--
-- 1. Hash chain. Every event stores prev_hash (the hash of the previous
--    event of its stream; 32 zero bytes for version 1) and
--      hash = sha256(prev_hash || lp(stream_id) || int4(stream_version) || lp(type)
--                    || int4(schema_version) || lp(payload::text) || lp(metadata::text)
--                    || int8(recorded_at in microseconds since the Unix epoch))
--    where lp(s) is the 4-byte big-endian length of s's UTF-8 bytes followed by
--    them, and payload::text / metadata::text are jsonb's canonical text.
--    The trigger below computes both on every insert, whoever the writer is,
--    and refuses an event whose predecessor in the stream does not exist (a
--    version gap). `dealbridge audit verify` recomputes the chain in Go,
--    independently of this function, and names the first bad event of each
--    stream: an edited event fails its own hash, an inserted or deleted one
--    breaks the chain or leaves a version gap.
--
-- 2. Commit order. events.position comes from a sequence and is NOT commit
--    order. A replay must fold events in an order consistent with every
--    conflict between the transactions that wrote them. Each transaction
--    that appends events takes a number from event_commit_seq in a deferred
--    constraint trigger, i.e. at pre-commit while it still holds all its row
--    locks: a transaction that waited for one of those locks gets its number
--    later. Replays order by (commit_seq, position).

ALTER TABLE events
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash      bytea,
    ADD COLUMN txid      xid8;
-- Only new rows get the writer's transaction id; existing rows stay NULL and
-- sort first, in position order.
ALTER TABLE events ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
CREATE INDEX events_txid_idx ON events (txid);

-- +goose StatementBegin
CREATE FUNCTION event_lp(s text) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT int4send(octet_length(convert_to(s, 'UTF8'))) || convert_to(s, 'UTF8')
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE FUNCTION event_hash(prev bytea, stream_id text, stream_version integer, type text, schema_version integer,
                           payload jsonb, metadata jsonb, recorded_at timestamptz)
RETURNS bytea LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sha256(prev || event_lp(stream_id) || int4send(stream_version) || event_lp(type)
                  || int4send(schema_version) || event_lp(payload::text) || event_lp(metadata::text)
                  || int8send((extract(epoch FROM recorded_at) * 1000000)::bigint))
$$;
-- +goose StatementEnd

-- Backfill the chain of the events that exist already (the append-only
-- trigger is disabled for this one statement block only).
ALTER TABLE events DISABLE TRIGGER events_no_update_delete;
-- +goose StatementBegin
DO $$
DECLARE
    r      record;
    prev   bytea;
    stream text := NULL;
BEGIN
    FOR r IN SELECT position, stream_id, stream_version, type, schema_version, payload, metadata, recorded_at
             FROM events ORDER BY stream_id, stream_version LOOP
        IF stream IS DISTINCT FROM r.stream_id THEN
            stream := r.stream_id;
            prev := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
        END IF;
        UPDATE events SET prev_hash = prev,
                          hash = event_hash(prev, r.stream_id, r.stream_version, r.type, r.schema_version,
                                            r.payload, r.metadata, r.recorded_at)
            WHERE position = r.position
            RETURNING hash INTO prev;
    END LOOP;
END;
$$;
-- +goose StatementEnd
ALTER TABLE events ENABLE TRIGGER events_no_update_delete;

ALTER TABLE events
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL;

-- +goose StatementBegin
CREATE FUNCTION events_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p bytea;
    m bytea;
    s bytea;
    t bytea;
BEGIN
    IF NEW.stream_version = 1 THEN
        NEW.prev_hash := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    ELSE
        SELECT hash INTO NEW.prev_hash FROM events
            WHERE stream_id = NEW.stream_id AND stream_version = NEW.stream_version - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'event %/% has no predecessor in its stream', NEW.stream_id, NEW.stream_version
                USING ERRCODE = 'foreign_key_violation';
        END IF;
    END IF;
    -- event_hash() spelled out: a SQL function called from PL/pgSQL is
    -- re-parsed on every call, this expression is planned once per session.
    -- TestChain* checks that both agree with each other and with Go.
    p := convert_to(NEW.payload::text, 'UTF8');
    m := convert_to(NEW.metadata::text, 'UTF8');
    s := convert_to(NEW.stream_id, 'UTF8');
    t := convert_to(NEW.type, 'UTF8');
    NEW.hash := sha256(NEW.prev_hash || int4send(length(s)) || s || int4send(NEW.stream_version)
                       || int4send(length(t)) || t || int4send(NEW.schema_version)
                       || int4send(length(p)) || p || int4send(length(m)) || m
                       || int8send((extract(epoch FROM NEW.recorded_at) * 1000000)::bigint));
    RETURN NEW;
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER events_chain BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION events_chain();

CREATE SEQUENCE event_commit_seq;
CREATE TABLE event_commits (
    txid       xid8   PRIMARY KEY,
    commit_seq bigint NOT NULL UNIQUE
);

-- +goose StatementBegin
CREATE FUNCTION events_commit_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Once per transaction: the flag is transaction-local.
    IF current_setting('dealbridge.commit_seq_taken', true) IS DISTINCT FROM 'on' THEN
        INSERT INTO event_commits (txid, commit_seq) VALUES (pg_current_xact_id(), nextval('event_commit_seq'))
            ON CONFLICT (txid) DO NOTHING;
        PERFORM set_config('dealbridge.commit_seq_taken', 'on', true);
    END IF;
    RETURN NULL;
END;
$$;
-- +goose StatementEnd
CREATE CONSTRAINT TRIGGER events_commit_seq AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION events_commit_seq();

-- +goose Down
DROP TRIGGER events_commit_seq ON events;
DROP FUNCTION events_commit_seq();
DROP TABLE event_commits;
DROP SEQUENCE event_commit_seq;
DROP TRIGGER events_chain ON events;
DROP FUNCTION events_chain();
DROP FUNCTION event_hash(bytea, text, integer, text, integer, jsonb, jsonb, timestamptz);
DROP FUNCTION event_lp(text);
DROP INDEX events_txid_idx;
ALTER TABLE events DROP COLUMN txid, DROP COLUMN hash, DROP COLUMN prev_hash;
