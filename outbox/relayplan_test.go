package outbox_test

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/outbox"
)

// outboxSeqScans is how many sequential scans of watermill_outbox the
// database has counted, once every backend but this one has ended (a
// backend flushes its statistics when it exits).
func outboxSeqScans(t *testing.T, conn *pgx.Conn) int64 {
	t.Helper()
	waitFor(t, waitDeadline, "the other backends to exit", func() bool {
		var n int
		err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND pid <> pg_backend_pid()`).Scan(&n)
		return err == nil && n == 0
	})
	var n int64
	if _, err := conn.Exec(t.Context(), `SELECT pg_stat_clear_snapshot()`); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(t.Context(), `SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'watermill_outbox'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestRelayDoesNotScanTheOutboxWithAPlanFromWhenItWasEmpty: a relay that
// polled an empty, analyzed outbox many times (long enough for Postgres to
// settle on a generic plan for a prepared select) then relays thousands of
// rows without one sequential scan of the outbox; nor does MeasureBacklog,
// called as often on the same connection before and after.
func TestRelayDoesNotScanTheOutboxWithAPlanFromWhenItWasEmpty(t *testing.T) {
	url := pgtest.NewDatabase(t)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close(context.Background()) }()
	if _, err := conn.Exec(ctx, `VACUUM ANALYZE watermill_outbox`); err != nil {
		t.Fatal(err)
	}
	before := outboxSeqScans(t, conn)

	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1 // every select of the relay on one connection, and its statement cache
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	stop := startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 2 * time.Millisecond, BatchSize: 10})
	time.Sleep(300 * time.Millisecond) // well over five polls of the empty outbox
	measure := func() {
		for range 10 { // as a metrics scrape would, on the same connection
			if _, err := outbox.MeasureBacklog(ctx, pool); err != nil {
				t.Fatal(err)
			}
		}
	}
	measure()

	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]*message.Message, 3000)
	want := make([]string, len(msgs))
	for i := range msgs {
		msgs[i] = newMessage()
		want[i] = msgs[i].UUID
	}
	if err := outbox.PublishTx(ctx, tx, gapTopic, msgs...); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "the relay to deliver 3000 messages", func() bool { return len(rec.missing(want)) == 0 })
	measure()
	stop()
	pool.Close()

	if n := outboxSeqScans(t, conn) - before; n != 0 {
		t.Fatalf("the relay and MeasureBacklog read %d outbox rows by sequential scans (3000 rows relayed in batches of 10)", n)
	}
}
