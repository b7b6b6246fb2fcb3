package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Execer runs one statement: a *pgxpool.Pool, *pgx.Conn or pgx.Tx.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// pruneSQL deletes up to $3 outbox rows at or before the relay's cursor
// (consumer group $1) written more than $2 microseconds ago, oldest first.
// Rows at or before the cursor have been relayed: the relay reads in
// (transaction_id, "offset") order and only below the snapshot's xmin, so
// when its cursor passes a row, every row before it is committed and
// passed too. No cursor yet: nothing is deleted.
const pruneSQL = `DELETE FROM watermill_outbox o USING (
		SELECT "offset", transaction_id FROM watermill_outbox
		WHERE (transaction_id, "offset") <= (SELECT c.last_processed_transaction_id, COALESCE(c.offset_acked, 0)
		                                     FROM watermill_offsets_outbox c WHERE c.consumer_group = $1)
		  AND created_at < LOCALTIMESTAMP - $2 * interval '1 microsecond'
		ORDER BY transaction_id, "offset"
		LIMIT $3) d
	WHERE o.transaction_id = d.transaction_id AND o."offset" = d."offset"`

// PruneRelayed deletes up to limit outbox rows that the relay has passed
// and that are older than keep, oldest first, and returns how many it
// deleted. The event log is the record of what happened; an outbox row is
// only the transport of a message, useless once relayed, except to
// re-deliver it by moving the relay's cursor back (which keep bounds).
func PruneRelayed(ctx context.Context, db Execer, keep time.Duration, limit int) (int64, error) {
	tag, err := db.Exec(ctx, pruneSQL, ConsumerGroup, keep.Microseconds(), limit)
	if err != nil {
		return 0, fmt.Errorf("cannot prune the relayed outbox rows: %w", err)
	}
	return tag.RowsAffected(), nil
}
