package postgres_test

import (
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/migrations"
)

// chainDeals makes n invoiced deals and returns their ids.
func chainDeals(t *testing.T, store *postgres.Store, n int) []string {
	t.Helper()
	ctx := t.Context()
	if _, err := store.SetInventory(ctx, "SKU-CH", 100, meta); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range n {
		d, err := store.CreateDeal(ctx, customer, "EUR", []domain.Line{{SKU: "SKU-CH", Description: "W", Quantity: 1, UnitPrice: "9.99"}}, meta)
		if err != nil {
			t.Fatal(err)
		}
		if d, err = store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, meta); err != nil {
			t.Fatal(err)
		}
		if _, err := store.RecordInvoice(ctx, d.ID, *d.IdempotencyKey, "INV-"+d.ID[:8], meta); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, d.ID)
	}
	return ids
}

// tamper runs sql with the append-only guard off, as a superuser could.
func tamper(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	tx, err := pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(t.Context())
	for _, q := range []string{`ALTER TABLE events DISABLE TRIGGER events_no_update_delete`, sql, `ALTER TABLE events ENABLE TRIGGER events_no_update_delete`} {
		a := args
		if q != sql {
			a = nil
		}
		tag, err := tx.Exec(t.Context(), q, a...)
		if err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		if q == sql && tag.RowsAffected() == 0 {
			t.Fatalf("%s touched nothing", q)
		}
	}
	if err := tx.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func verifyChain(t *testing.T, pool *pgxpool.Pool) postgres.ChainReport {
	t.Helper()
	rep, err := postgres.VerifyChain(t.Context(), pool)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func TestChainNamesEditedInsertedAndDeletedEvents(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	ids := chainDeals(t, store, 4)

	clean := verifyChain(t, pool)
	if !clean.OK() || clean.Events < 13 || clean.Streams != 5 || len(clean.HeadDigest) != 64 {
		t.Fatalf("clean log: %+v", clean)
	}
	if again := verifyChain(t, pool); again.HeadDigest != clean.HeadDigest {
		t.Fatal("head digest is not stable")
	}

	// 1. Edit a payload (the total of deal 0's DealCreated).
	tamper(t, pool, `UPDATE events SET payload = jsonb_set(payload, '{total}', '"0.01"') WHERE stream_id=$1 AND stream_version=1`,
		domain.DealStream(ids[0]))
	// 2. Delete deal 1's DealWon (version 2).
	tamper(t, pool, `DELETE FROM events WHERE stream_id=$1 AND stream_version=2`, domain.DealStream(ids[1]))
	// 3. Insert a forged event into deal 2's stream: shift versions 2.. up
	// and insert a new version 2 (the chain trigger gives it a valid hash
	// of its own).
	tamper(t, pool, `UPDATE events SET stream_version = stream_version + 10 WHERE stream_id=$1 AND stream_version >= 2`, domain.DealStream(ids[2]))
	tamper(t, pool, `UPDATE events SET stream_version = stream_version - 9 WHERE stream_id=$1 AND stream_version >= 12`, domain.DealStream(ids[2]))
	if _, err := pool.Exec(t.Context(), `INSERT INTO events (stream_id, stream_version, type, payload) VALUES ($1, 2, 'DealLost', $2)`,
		domain.DealStream(ids[2]), `{"deal_id":"`+ids[2]+`","previous_status":"open"}`); err != nil {
		t.Fatal(err)
	}
	// 4. Edit the metadata of deal 3's last event.
	tamper(t, pool, `UPDATE events SET metadata = '{"actor":"mallory"}' WHERE stream_id=$1 AND stream_version=3`, domain.DealStream(ids[3]))

	rep := verifyChain(t, pool)
	want := map[string]struct {
		version int
		kind    string
	}{
		domain.DealStream(ids[0]): {1, "edited"},
		domain.DealStream(ids[1]): {3, "version_gap"},
		domain.DealStream(ids[2]): {3, "chain_broken"},
		domain.DealStream(ids[3]): {3, "edited"},
	}
	if len(rep.Problems) != len(want) {
		t.Fatalf("problems %v, want one per tampered stream", rep.Problems)
	}
	for _, p := range rep.Problems {
		w, ok := want[p.StreamID]
		if !ok || p.StreamVersion != w.version || p.Kind != w.kind || p.Position == 0 {
			t.Errorf("problem %s, want %s version %d %s", p, p.StreamID, w.version, w.kind)
		}
	}
	if !strings.Contains(rep.Problems[0].String(), "position") {
		t.Errorf("the report does not name the event's position: %s", rep.Problems[0])
	}
	if rep.HeadDigest == clean.HeadDigest {
		t.Error("head digest unchanged by tampering")
	}
}

func TestChainTriggerRefusesAVersionGap(t *testing.T) {
	pool := pgtest.NewPool(t)
	_, err := pool.Exec(t.Context(), `INSERT INTO events (stream_id, stream_version, type, payload) VALUES ('deal-x', 2, 'DealLost', '{}')`)
	if err == nil || !strings.Contains(err.Error(), "no predecessor") {
		t.Fatalf("an event without its predecessor was accepted: %v", err)
	}
}

// TestChainMigrationBackfillsExistingEvents: events written before
// migration 00007 get their chain when it runs.
func TestChainMigrationBackfillsExistingEvents(t *testing.T) {
	pool := pgtest.NewPool(t)
	ctx := t.Context()
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	p, err := migrations.NewProvider(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.DownTo(ctx, 6); err != nil {
		t.Fatal(err)
	}
	for v := 1; v <= 3; v++ {
		if _, err := pool.Exec(ctx, `INSERT INTO events (stream_id, stream_version, type, payload, metadata) VALUES ('deal-old', $1, 'DealLost', $2, '{"actor":"x"}')`,
			v, `{"n":`+strconv.Itoa(v)+`, "s": "é<>&"}`); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatal(err)
	}
	rep := verifyChain(t, pool)
	if !rep.OK() || rep.Events != 3 {
		t.Fatalf("after the backfill: %+v", rep)
	}
	tamper(t, pool, `UPDATE events SET payload = '{"n": 2, "s": "e<>&"}' WHERE stream_id='deal-old' AND stream_version=2`)
	if rep := verifyChain(t, pool); len(rep.Problems) != 1 || rep.Problems[0].StreamVersion != 2 || rep.Problems[0].Kind != "edited" {
		t.Fatalf("after an edit: %+v", rep.Problems)
	}
}
