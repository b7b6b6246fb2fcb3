-- +goose Up

-- The relay's select (outbox.relaySchema): the next batch after the relay's
-- cursor, as one range of the outbox's primary key, in a function whose
-- plan ignores stale statistics, as work_queue_claim's does.
--
-- The relay runs it once per poll, hundreds of times a second under load.
-- Planning it on every execution costs more than running it (0.35 ms a
-- poll against 0.06 ms); a plan cached while the outbox was empty, or
-- never analyzed, is a sequential scan of the outbox, which keeps every
-- relayed row (1.9 ms a poll at 9,000 rows in `dealbridge bench`). Here
-- PL/pgSQL caches the plan for the session, and the settings make that
-- plan the primary key's index, whatever the statistics say: the index
-- hands the rows over in order from the cursor, and the scan stops after
-- the batch.
--
-- The rows are exactly those of watermill-sql's DefaultPostgreSQLSchema
-- select: the cursor row of the consumer group is locked FOR UPDATE (one
-- relay at a time), (transaction_id, "offset") > cursor is its
-- `(transaction_id = t AND "offset" > o) OR transaction_id > t`, and
-- transaction_id < the snapshot's xmin keeps the relay gap-safe.
-- +goose StatementBegin
CREATE FUNCTION outbox_relay_batch(p_consumer_group text, p_limit integer)
RETURNS TABLE ("offset" bigint, transaction_id xid8, uuid varchar, payload json, metadata json)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
BEGIN
    RETURN QUERY
    WITH last_processed AS (
        SELECT c.offset_acked, c.last_processed_transaction_id
        FROM watermill_offsets_outbox AS c
        WHERE c.consumer_group = p_consumer_group
        FOR UPDATE
    )
    SELECT o."offset", o.transaction_id, o.uuid, o.payload, o.metadata
    FROM watermill_outbox AS o
    WHERE (o.transaction_id, o."offset") > ((SELECT l.last_processed_transaction_id FROM last_processed AS l),
                                            (SELECT l.offset_acked FROM last_processed AS l))
      AND o.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY o.transaction_id, o."offset"
    LIMIT p_limit;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION outbox_relay_batch(text, integer);
