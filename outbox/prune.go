package outbox

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// pruneSQL deletes up to $3 outbox rows at or before the relay's cursor
// (consumer group $1) written more than $2 microseconds ago, oldest first,
// and reports whether the cursor is ahead of the database's transaction
// ids, and how many rows it deleted.
//
// Rows at or before the cursor have been relayed: the relay reads in
// (transaction_id, "offset") order and only below the snapshot's xmin, so
// when its cursor passes a row, every row before it is committed and
// passed too. That holds while the cursor is below the current snapshot's
// xmin, which it always is, unless the database was restored from a dump
// (transaction ids start again, lower) and the relay's row was not reset:
// then new, unrelayed rows sort before the cursor, and nothing is deleted.
// No cursor yet: nothing is deleted either.
const pruneSQL = `WITH cursor AS (
		SELECT c.last_processed_transaction_id AS tx, COALESCE(c.offset_acked, 0) AS off,
		       c.last_processed_transaction_id >= pg_snapshot_xmin(pg_current_snapshot()) AS ahead
		FROM watermill_offsets_outbox c WHERE c.consumer_group = $1
	), gone AS (
		DELETE FROM watermill_outbox o USING (
			SELECT "offset", transaction_id FROM watermill_outbox
			WHERE (transaction_id, "offset") <= (SELECT tx, off FROM cursor WHERE NOT ahead)
			  AND created_at < LOCALTIMESTAMP - $2 * interval '1 microsecond'
			ORDER BY transaction_id, "offset"
			LIMIT $3) d
		WHERE o.transaction_id = d.transaction_id AND o."offset" = d."offset"
		RETURNING 1
	)
	SELECT COALESCE((SELECT ahead FROM cursor), false), (SELECT count(*) FROM gone)`

// ErrCursorAhead: the relay's cursor is ahead of the database's
// transaction ids, which happens after a restore from a dump whose relay
// row was not reset (README, Operations). The relay then skips new rows,
// and pruning would delete them: PruneRelayed refuses.
var ErrCursorAhead = errors.New("the relay's cursor is ahead of this database's transaction ids " +
	"(restored from a dump?): new outbox rows are not relayed and nothing is pruned; reset the relay's row in watermill_offsets_outbox")

// PruneRelayed deletes up to limit outbox rows that the relay has passed
// and that are older than keep, oldest first, and returns how many it
// deleted. The event log is the record of what happened; an outbox row is
// only the transport of a message, useless once relayed, except to
// re-deliver it by moving the relay's cursor back (which keep bounds).
func PruneRelayed(ctx context.Context, db Querier, keep time.Duration, limit int) (int64, error) {
	var (
		ahead bool
		n     int64
	)
	if err := db.QueryRow(ctx, pruneSQL, ConsumerGroup, keep.Microseconds(), limit).Scan(&ahead, &n); err != nil {
		return 0, fmt.Errorf("cannot prune the relayed outbox rows: %w", err)
	}
	if ahead {
		return 0, ErrCursorAhead
	}
	return n, nil
}
