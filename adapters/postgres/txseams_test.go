package postgres_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// TestWithInvoicePublisher: a won deal's invoice request goes to the
// publisher inside the close transaction instead of the outbox, and a
// publisher error rolls the whole close back.
func TestWithInvoicePublisher(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	var (
		got     []domain.InvoiceRequest
		failing bool
	)
	errPublish := errors.New("publish refused")
	s := postgres.NewStore(pool, postgres.WithInvoicePublisher(func(ctx context.Context, tx pgx.Tx, req domain.InvoiceRequest, _ domain.Metadata) error {
		// Inside the close transaction: the deal is already won there.
		var status string
		if err := tx.QueryRow(ctx, `SELECT status FROM deals WHERE id=$1`, req.DealID).Scan(&status); err != nil {
			return err
		}
		if status != string(domain.StatusWon) {
			t.Errorf("publisher sees the deal %s, want won", status)
		}
		if failing {
			return errPublish
		}
		got = append(got, req)
		return nil
	}))
	setStock(t, s, "SKU-P", 10)

	d := createDeal(t, s, lines("SKU-P", 2))
	failing = true
	before := dump(t, ctx, pool)
	if _, err := s.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); !errors.Is(err, errPublish) {
		t.Fatalf("close with a failing publisher: %v, want %v", err, errPublish)
	}
	assertUnchanged(t, before, dump(t, ctx, pool))

	failing = false
	won, err := s.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].DealID != d.ID || won.IdempotencyKey == nil || got[0].IdempotencyKey != *won.IdempotencyKey {
		t.Fatalf("published %+v, want the request of deal %s with its key", got, d.ID)
	}
	if n := count(t, ctx, pool, `SELECT count(*) FROM watermill_outbox`); n != 0 {
		t.Fatalf("%d outbox rows, want none: the publisher replaces the outbox", n)
	}
	if inv, err := s.GetInventory(ctx, "SKU-P"); err != nil || inv.Allocated != 2 {
		t.Fatalf("inventory %+v %v, want 2 allocated", inv, err)
	}

	// A lost deal publishes nothing.
	lost := createDeal(t, s, lines("SKU-P", 1))
	if _, err := s.CloseDeal(ctx, lost.ID, domain.OutcomeLost, nil, meta); err != nil || len(got) != 1 {
		t.Fatalf("lost close: %v, %d published", err, len(got))
	}
}

// TestRecordInvoiceTx: the recording commits and rolls back with the
// caller's transaction, and a second recording of the same key is a no-op.
func TestRecordInvoiceTx(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := newPool(t, 4)
	s := postgres.NewStore(pool)
	setStock(t, s, "SKU-R", 10)
	d := createDeal(t, s, lines("SKU-R", 1))
	won, err := s.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta)
	if err != nil {
		t.Fatal(err)
	}
	key := *won.IdempotencyKey

	record := func(commit bool) bool {
		t.Helper()
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(ctx) }()
		recorded, err := s.RecordInvoiceTx(ctx, tx, d.ID, key, "INV-1", meta)
		if err != nil {
			t.Fatal(err)
		}
		// The caller's own write in the same transaction.
		if _, err := tx.Exec(ctx, `CREATE TEMP TABLE IF NOT EXISTS mark (n int)`); err != nil {
			t.Fatal(err)
		}
		if commit {
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
		return recorded
	}

	if !record(false) {
		t.Fatal("first recording reported false")
	}
	if got, err := s.GetDeal(ctx, d.ID); err != nil || got.Status != domain.StatusWon {
		t.Fatalf("after a rolled-back recording the deal is %+v (%v), want won", got.Status, err)
	}
	if !record(true) {
		t.Fatal("recording after the rollback reported false")
	}
	if got, err := s.GetDeal(ctx, d.ID); err != nil || got.Status != domain.StatusInvoiced || got.Invoice == nil || got.Invoice.Number != "INV-1" {
		t.Fatalf("after the committed recording the deal is %+v (%v), want invoiced with INV-1", got, err)
	}
	if record(true) {
		t.Fatal("a second recording of the same key reported true")
	}
	if n := count(t, ctx, pool, `SELECT count(*) FROM events WHERE type=$1 AND stream_id=$2`, domain.TypeInvoiceCreated, domain.DealStream(d.ID)); n != 1 {
		t.Fatalf("%d InvoiceCreated events, want 1", n)
	}
}
