package outbox_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/outbox"
)

// TestPruneRelayedDeletesOnlyWhatTheRelayPassed: rows the relay has passed
// are deleted in batches, oldest first; rows it has not passed, and rows
// younger than the retention, stay; the relay then delivers the rest, and
// nothing twice.
func TestPruneRelayedDeletesOnlyWhatTheRelayPassed(t *testing.T) {
	pool := newPool(t, 4)
	ctx := t.Context()
	if n, err := outbox.PruneRelayed(ctx, pool, 0, 100); err != nil || n != 0 {
		t.Fatalf("with no relay cursor yet: pruned %d (%v), want 0", n, err)
	}
	first := publishSequence(t, pool, 10)
	rec := newRecorder()
	stop := startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	waitFor(t, waitDeadline, "the relay to pass every row", func() bool {
		b, err := outbox.MeasureBacklog(context.Background(), pool)
		return err == nil && b.Messages == 0 && len(rec.missing(first)) == 0
	})
	stop()
	later := publishSequence(t, pool, 3) // not relayed

	if n, err := outbox.PruneRelayed(ctx, pool, time.Hour, 100); err != nil || n != 0 {
		t.Fatalf("rows younger than the retention: pruned %d (%v), want 0", n, err)
	}
	if n, err := outbox.PruneRelayed(ctx, pool, 0, 4); err != nil || n != 4 {
		t.Fatalf("first batch: pruned %d (%v), want 4", n, err)
	}
	left := outboxOffsets(t, pool)
	for _, u := range first[:4] {
		if _, ok := left[u]; ok {
			t.Fatalf("the oldest relayed rows go first; %s is still there", u)
		}
	}
	if n, err := outbox.PruneRelayed(ctx, pool, 0, 100); err != nil || n != 6 {
		t.Fatalf("second batch: pruned %d (%v), want the other 6 relayed rows", n, err)
	}
	if n, err := outbox.PruneRelayed(ctx, pool, 0, 100); err != nil || n != 0 {
		t.Fatalf("third batch: pruned %d (%v), want 0", n, err)
	}
	left = outboxOffsets(t, pool)
	var got []string
	for u := range left {
		got = append(got, u)
	}
	slices.Sort(got)
	want := slices.Sorted(slices.Values(later))
	if !slices.Equal(got, want) {
		t.Fatalf("left in the outbox %v, want the unrelayed %v", got, want)
	}

	rec2 := newRecorder()
	startRelay(t, pool, rec2, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	waitFor(t, waitDeadline, "the rest delivered", func() bool { return len(rec2.missing(later)) == 0 })
	time.Sleep(100 * time.Millisecond)
	if d := rec2.deliveries(); len(d) != len(later) {
		t.Fatalf("after the prune the relay delivered %v, want only %v", d, later)
	}
}

// TestRelayPrunesInTheBackground: with a retention, the relay deletes the
// rows it has relayed once they are older than it.
func TestRelayPrunesInTheBackground(t *testing.T) {
	pool := newPool(t, 4)
	sent := publishSequence(t, pool, 5)
	rec := newRecorder()
	startRelay(t, pool, rec, outbox.RelayConfig{PollInterval: 10 * time.Millisecond, Retention: time.Millisecond, PruneInterval: 20 * time.Millisecond})
	waitFor(t, waitDeadline, "delivery", func() bool { return len(rec.missing(sent)) == 0 })
	waitFor(t, waitDeadline, "an empty outbox", func() bool { return len(outboxOffsets(t, pool)) == 0 })
}

// TestPruneRefusesACursorAheadOfTheDatabase: after a restore from a dump
// whose relay row was not reset, the cursor is ahead of every new
// transaction id, so new, unrelayed rows sort before it. Pruning must not
// take them for relayed rows.
func TestPruneRefusesACursorAheadOfTheDatabase(t *testing.T) {
	pool := newPool(t, 4)
	ctx := t.Context()
	sent := publishSequence(t, pool, 3)
	if _, err := pool.Exec(ctx, `INSERT INTO watermill_offsets_outbox (consumer_group, offset_acked, last_processed_transaction_id)
		VALUES ($1, 1, (pg_current_xact_id()::text::bigint + 1000000)::text::xid8)`, outbox.ConsumerGroup); err != nil {
		t.Fatal(err)
	}
	n, err := outbox.PruneRelayed(ctx, pool, 0, 100)
	if !errors.Is(err, outbox.ErrCursorAhead) || n != 0 {
		t.Fatalf("pruned %d (%v), want 0 and ErrCursorAhead", n, err)
	}
	if left := outboxOffsets(t, pool); len(left) != len(sent) {
		t.Fatalf("%d of %d unrelayed rows left", len(left), len(sent))
	}
}
