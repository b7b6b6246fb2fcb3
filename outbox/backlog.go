package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Querier runs one query returning one row: a *pgxpool.Pool, *pgx.Conn or
// pgx.Tx.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Backlog is what the relay has not passed yet.
type Backlog struct {
	// Messages is the outbox rows after the relay's position.
	Messages int64
	// OldestAge is the age of the oldest of them (0 when there is none):
	// the relay lag.
	OldestAge time.Duration
}

// relayBacklogSQL: the relay's position is watermill-sql's cursor
// (last_processed_transaction_id, offset_acked) of consumer group $1; a row
// is relayed when its (transaction_id, "offset") is at or before it, and
// every row counts while the group has no cursor yet. The row comparison
// is a range of the table's primary key, so the query reads the unrelayed
// rows only: an anti-join against the cursor read the whole outbox, which
// keeps every relayed row (4.4 ms at 20,000 rows, against 0.1 ms).
// created_at is a TIMESTAMP written with CURRENT_TIMESTAMP, hence
// LOCALTIMESTAMP.
const relayBacklogSQL = `SELECT count(*), COALESCE(EXTRACT(EPOCH FROM LOCALTIMESTAMP - min(o.created_at)), 0)::float8
	FROM watermill_outbox o
	WHERE (o.transaction_id, o."offset") > (
	      COALESCE((SELECT c.last_processed_transaction_id FROM watermill_offsets_outbox c WHERE c.consumer_group = $1), '0'::xid8),
	      COALESCE((SELECT c.offset_acked FROM watermill_offsets_outbox c WHERE c.consumer_group = $1), 0))`

// MeasureBacklog counts the outbox rows the relay (consumer group
// ConsumerGroup) has not relayed yet and measures the age of the
// oldest, on the database clock. It is one aggregate query over the
// unrelayed rows (an index range), meant for scrapes and checkers.
func MeasureBacklog(ctx context.Context, db Querier) (Backlog, error) {
	var b Backlog
	var age float64
	// Planned on every call (scrapes are rare): a plan cached on a
	// connection while the outbox was empty would scan all of it.
	if err := db.QueryRow(ctx, relayBacklogSQL, pgx.QueryExecModeExec, ConsumerGroup).Scan(&b.Messages, &age); err != nil {
		return Backlog{}, fmt.Errorf("cannot measure the relay backlog: %w", err)
	}
	// A row inserted after this statement's LOCALTIMESTAMP in another
	// session's clock reading can make the difference slightly negative.
	b.OldestAge = time.Duration(max(0, age) * float64(time.Second))
	return b, nil
}
