package outbox_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/outbox"
)

// backlogByAntiJoin is the backlog's definition spelled out the slow way:
// every outbox row not at or before the relay's cursor.
const backlogByAntiJoin = `SELECT count(*) FROM watermill_outbox o
	WHERE NOT EXISTS (SELECT 1 FROM watermill_offsets_outbox c WHERE c.consumer_group = $1
	      AND (o.transaction_id, o."offset") <= (c.last_processed_transaction_id, COALESCE(c.offset_acked, 0)))`

// TestMeasureBacklogCountsTheRowsAfterTheCursor puts the relay's cursor at
// every position of an outbox written by several transactions (some with
// two messages) and compares MeasureBacklog with the definition; then
// with no cursor at all (every row counts) and with a real relay that has
// passed everything (nothing, and no age).
func TestMeasureBacklogCountsTheRowsAfterTheCursor(t *testing.T) {
	pool := newPool(t, 4)
	ctx := t.Context()
	for i := range 12 {
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for range 1 + i%2 {
			if err := outbox.PublishTx(ctx, tx, gapTopic, newMessage()); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	const total = 18

	b, err := outbox.MeasureBacklog(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	if b.Messages != total || b.OldestAge < 0 {
		t.Fatalf("without a cursor: %+v, want %d messages", b, total)
	}

	rows, err := pool.Query(ctx, `SELECT transaction_id::text, "offset" FROM watermill_outbox ORDER BY transaction_id, "offset"`)
	if err != nil {
		t.Fatal(err)
	}
	type pos struct {
		Tx  string
		Off int64
	}
	positions, err := pgx.CollectRows(rows, pgx.RowToStructByPos[pos])
	if err != nil {
		t.Fatal(err)
	}
	if len(positions) != total {
		t.Fatalf("%d outbox rows, want %d", len(positions), total)
	}
	for i, p := range positions {
		if _, err := pool.Exec(ctx, `INSERT INTO watermill_offsets_outbox (consumer_group, offset_acked, last_processed_transaction_id)
			VALUES ($1, $2, $3::xid8) ON CONFLICT (consumer_group) DO UPDATE SET offset_acked = $2, last_processed_transaction_id = $3::xid8`,
			outbox.ConsumerGroup, p.Off, p.Tx); err != nil {
			t.Fatal(err)
		}
		var want int64
		if err := pool.QueryRow(ctx, backlogByAntiJoin, outbox.ConsumerGroup).Scan(&want); err != nil {
			t.Fatal(err)
		}
		b, err = outbox.MeasureBacklog(ctx, pool)
		if err != nil {
			t.Fatal(err)
		}
		if b.Messages != want || want != int64(total-1-i) {
			t.Fatalf("cursor at row %d (%s, %d): MeasureBacklog %d, definition %d, want %d", i, p.Tx, p.Off, b.Messages, want, total-1-i)
		}
	}
	if b.OldestAge != 0 {
		t.Fatalf("nothing left, but the oldest unrelayed row is %v old", b.OldestAge)
	}

	// A real relay, from scratch: the backlog is what it has not passed.
	if _, err := pool.Exec(ctx, `DELETE FROM watermill_offsets_outbox`); err != nil {
		t.Fatal(err)
	}
	late := publishSequence(t, pool, 3)
	time.Sleep(20 * time.Millisecond) // the oldest row has an age
	b, err = outbox.MeasureBacklog(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	if b.Messages != total+3 || b.OldestAge < 20*time.Millisecond {
		t.Fatalf("before the relay: %+v, want %d messages at least 20ms old", b, total+3)
	}
	rec := newRecorder()
	stop := startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	waitFor(t, waitDeadline, "the relay to deliver everything", func() bool { return len(rec.missing(late)) == 0 })
	// The batch commits after its last delivery: wait for it before the
	// relay stops (stopping rolls an uncommitted batch back).
	waitFor(t, waitDeadline, "an empty backlog", func() bool {
		b, err = outbox.MeasureBacklog(context.Background(), pool)
		return err == nil && b.Messages == 0
	})
	stop()
	if b.OldestAge != 0 {
		t.Fatalf("after the relay: %+v", b)
	}
}
