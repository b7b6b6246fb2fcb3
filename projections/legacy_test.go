package projections_test

import (
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/projections"
)

const (
	legacyInvoiced = "6f1c2a52-6c1b-4d8e-9d3a-0a5f6e7d8c91"
	legacyWon      = "0b7e3f10-2d4c-4a7b-8e21-5c9d0f1a2b3c"
)

// loadFixture writes a log of stored events as they are (old schema
// versions included) into the event log.
func loadFixture(t *testing.T, pool *pgxpool.Pool, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var evs []struct {
		StreamID      string          `json:"stream_id"`
		StreamVersion int             `json:"stream_version"`
		Type          string          `json:"type"`
		SchemaVersion int             `json:"schema_version"`
		Payload       json.RawMessage `json:"payload"`
		Metadata      json.RawMessage `json:"metadata"`
		RecordedAt    time.Time       `json:"recorded_at"`
	}
	if err := json.Unmarshal(b, &evs); err != nil {
		t.Fatal(err)
	}
	tx, err := pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(t.Context())
	for _, e := range evs {
		if _, err := tx.Exec(t.Context(), `INSERT INTO events (stream_id, stream_version, type, schema_version, payload, metadata, recorded_at)
			VALUES ($1,$2,$3,$4,$5,$6,$7)`, e.StreamID, e.StreamVersion, e.Type, e.SchemaVersion, []byte(e.Payload), []byte(e.Metadata), e.RecordedAt); err != nil {
			t.Fatalf("fixture event %s/%d: %v", e.StreamID, e.StreamVersion, err)
		}
	}
	if err := tx.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	return len(evs)
}

// TestLegacyLogReplaysIntoTodaysProjections: a log written by the
// prototype (schema version 0: float amounts, a flat customer, "qty", no
// idempotency key on DealWon) is upcast on replay into today's read
// models, and today's commands carry on from it.
func TestLegacyLogReplaysIntoTodaysProjections(t *testing.T) {
	pool := pgtest.NewPool(t)
	ctx := t.Context()
	n := loadFixture(t, pool, "testdata/legacy_events.json")

	// Only the log exists: the replay produces every row.
	rep := replay(t, pool, projections.Options{Verify: true})
	requireMethod(t, rep, projections.MethodFold)
	if rep.Events != int64(n) {
		t.Fatalf("replayed %d events, the fixture has %d", rep.Events, n)
	}
	if !rep.Drift() {
		t.Fatal("empty live tables should differ from the replay")
	}
	rep = replay(t, pool, projections.Options{Swap: true})
	if !rep.Swapped {
		t.Fatal("not swapped")
	}

	store := postgres.NewStore(pool)
	d, err := store.GetDeal(ctx, legacyInvoiced)
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != domain.StatusInvoiced || d.Customer != (domain.Customer{ID: "C-OLD-1", Name: "Initech"}) || d.Total != "990.10" ||
		d.Currency != "USD" || len(d.Lines) != 1 || d.Lines[0] != (domain.Line{SKU: "SKU-OLD", Description: "Red stapler", Quantity: 2, UnitPrice: "495.05"}) ||
		d.Invoice == nil || d.Invoice.Number != "INV-OLD-1" || d.Invoice.IdempotencyKey != legacyInvoiced+":2" {
		t.Fatalf("legacy invoiced deal projected as %+v", d)
	}
	if d.Events[0].SchemaVersion != 0 {
		t.Fatalf("the stored event was rewritten: schema version %d", d.Events[0].SchemaVersion)
	}
	d2, err := store.GetDeal(ctx, legacyWon)
	if err != nil {
		t.Fatal(err)
	}
	// 0.30000000000000004 was the prototype's float for 0.30.
	if d2.Status != domain.StatusWon || d2.Total != "0.30" || d2.Lines[0].UnitPrice != "0.30" || d2.IdempotencyKey == nil || *d2.IdempotencyKey != legacyWon+":2" {
		t.Fatalf("legacy won deal projected as %+v", d2)
	}
	inv, err := store.GetInventory(ctx, "SKU-OLD")
	if err != nil {
		t.Fatal(err)
	}
	if inv.Available != 7 || inv.Allocated != 3 || inv.Version != 3 {
		t.Fatalf("inventory %+v, want 7 available, 3 allocated, version 3", inv)
	}
	if st, ok, err := store.Saga(ctx, legacyWon+":2"); err != nil || !ok || st.State != domain.SagaRetrying || st.Attempts != 1 {
		t.Fatalf("legacy saga %+v (%v, %v)", st, ok, err)
	}

	// Today's code carries on from the old events: the invoice for the
	// legacy close is recorded (a current-version event after v0 ones).
	if ok, err := store.RecordInvoice(ctx, legacyWon, legacyWon+":2", "INV-NEW-1", meta); err != nil || !ok {
		t.Fatalf("record invoice on a legacy deal: %v, %v", ok, err)
	}
	recs, err := postgres.LoadStream(ctx, pool, domain.DealStream(legacyWon))
	if err != nil {
		t.Fatal(err)
	}
	if won, ok := recs[1].Event.(domain.DealWon); !ok || won.IdempotencyKey != legacyWon+":2" || won.PreviousStatus != domain.StatusOpen {
		t.Fatalf("upcast DealWon %#v", recs[1].Event)
	}
	if rep := replay(t, pool, projections.Options{Verify: true}); rep.Drift() {
		t.Fatal("the mixed old/new log does not replay into the live tables")
	}
	chain, err := postgres.VerifyChain(ctx, pool)
	if err != nil || !chain.OK() {
		t.Fatalf("chain over the legacy log: %+v, %v", chain.Problems, err)
	}
}
