-- +goose Up

-- The work-queue claim as a function whose planner settings keep its plan
-- right whatever the statistics say. A queue swings from empty to a backlog
-- of thousands between two autovacuum ANALYZEs; planned with the statistics
-- of an empty table, the claim read the whole topic with a bitmap scan and
-- sorted it to return the first few rows: 5 ms per claim at a backlog of
-- 2,000 and growing with it, so the backlog fed itself (measured by
-- `dealbridge bench`). With sorts, bitmap and sequential scans and hash and
-- merge joins priced out, the claim walks an index in id order, stops after
-- p_limit claimable rows and updates each by its primary key.
-- Only the head (lowest id) of each ordering key is claimable.
-- +goose StatementBegin
CREATE FUNCTION work_queue_claim(p_topic text, p_lease_us bigint, p_limit integer)
RETURNS TABLE (id bigint, claim_token uuid, uuid text, payload bytea, metadata jsonb, attempts integer, created_at timestamptz)
LANGUAGE sql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
UPDATE work_queue AS q
SET attempts    = q.attempts + 1,
    lease_until = now() + p_lease_us * interval '1 microsecond',
    claim_token = gen_random_uuid(),
    last_error  = CASE WHEN q.lease_until IS NOT NULL THEN 'lease expired' ELSE q.last_error END
FROM (
    SELECT c.id
    FROM work_queue AS c
    WHERE c.topic = p_topic
      AND c.available_at <= now()
      AND (c.lease_until IS NULL OR c.lease_until <= now())
      AND (c.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM work_queue AS o
            WHERE o.topic = c.topic AND o.ordering_key = c.ordering_key AND o.id < c.id))
    ORDER BY c.topic, c.id
    LIMIT p_limit
    FOR UPDATE SKIP LOCKED
) AS next
WHERE q.id = next.id
RETURNING q.id, q.claim_token, q.uuid, q.payload, q.metadata, q.attempts, q.created_at
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION work_queue_claim(text, bigint, integer);
