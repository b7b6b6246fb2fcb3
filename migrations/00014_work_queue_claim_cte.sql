-- +goose Up

-- work_queue_claim with its candidate rows in a MATERIALIZED CTE. As a
-- join (UPDATE ... FROM (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)) the
-- subquery could be evaluated again for a concurrently updated row
-- (EvalPlanQual): a claim then returned more rows than asked and could wait
-- on another session's row lock; `dealbridge bench` with four handlers saw
-- both (a claim running into its 30 s timeout, and a handler whose
-- consumers were handed more claims than they had room for). A
-- materialized CTE runs once: it locks at most n rows, skipping locked
-- ones, and the UPDATE touches only those.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION work_queue_claim(p_topic text, p_lease_us bigint, p_limit integer)
RETURNS TABLE (id bigint, claim_token uuid, uuid text, payload bytea, metadata jsonb, attempts integer, created_at timestamptz)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    WITH next AS MATERIALIZED (
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
    )
    UPDATE work_queue AS q
    SET attempts    = q.attempts + 1,
        lease_until = now() + p_lease_us * interval '1 microsecond',
        claim_token = gen_random_uuid(),
        last_error  = CASE WHEN q.lease_until IS NOT NULL THEN 'lease expired' ELSE q.last_error END
    FROM next
    WHERE q.id = next.id
    RETURNING q.id, q.claim_token, q.uuid, q.payload, q.metadata, q.attempts, q.created_at;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION work_queue_claim(p_topic text, p_lease_us bigint, p_limit integer)
RETURNS TABLE (id bigint, claim_token uuid, uuid text, payload bytea, metadata jsonb, attempts integer, created_at timestamptz)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_bitmapscan = off
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
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
    RETURNING q.id, q.claim_token, q.uuid, q.payload, q.metadata, q.attempts, q.created_at;
END
$$;
-- +goose StatementEnd
