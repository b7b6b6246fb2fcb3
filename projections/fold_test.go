package projections_test

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/projections"
)

// allEventTypes is every event type Apply projects.
var allEventTypes = []string{
	"AlertAcknowledged", "AlertRaised", "AlertResolved", "DeadLetterApproved", "DeadLetterDiscarded", "DeadLetterEdited",
	"DeadLetterReinjected", "DeadLetterReopened", "DeadLetterResolved", "DealCreated", "DealLost", "DealReinstated",
	"DealReverted", "DealWon", "InventoryAllocated", "InventoryReleased", "InventorySet", "InvoiceAttemptFailed",
	"InvoiceCreated", "InvoiceFailed", "InvoiceSagaResumed", "MessageDeadLettered",
}

// appendLive appends events to a stream and projects them with Apply in
// the same transaction, as the live path does.
func appendLive(t *testing.T, pool *pgxpool.Pool, stream string, events ...domain.Event) {
	t.Helper()
	ctx := t.Context()
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	var v int
	if err := tx.QueryRow(ctx, `SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1`, stream).Scan(&v); err != nil {
		t.Fatal(err)
	}
	recs, err := postgres.AppendTx(ctx, tx, domain.Change{StreamID: stream, ExpectedVersion: v, Events: events}, meta)
	if err != nil {
		t.Fatalf("append to %s: %v", stream, err)
	}
	if err := projections.Apply(ctx, tx, recs...); err != nil {
		t.Fatalf("apply to %s: %v", stream, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
}

// awkwardLog appends, through the live path, the events and values that
// the in-memory fold and its COPY encoding must get exactly right: text
// that needs escaping, uuids in upper case and without hyphens, times with
// nanoseconds and before 1970, binary payloads, upserts both ways, and the
// operator actions the simulation does not produce.
func awkwardLog(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	ctx := t.Context()
	weird := "tab\there, newline\nand CR\r, backslash \\ \\N \\x00, \"quotes\", 'single', ünïcödé €😀"
	appendLive(t, pool, domain.InventoryStream("SKU-\\weird\t"), domain.InventorySet{SKU: "SKU-\\weird\t", Available: 5})
	appendLive(t, pool, domain.InventoryStream("SKU-\\weird\t"), domain.InventorySet{SKU: "SKU-\\weird\t", Available: 9_000_000_000})
	appendLive(t, pool, domain.InventoryStream("SKU-\\weird\t"), domain.InventoryAllocated{SKU: "SKU-\\weird\t", Quantity: 3},
		domain.InventoryReleased{SKU: "SKU-\\weird\t", Quantity: 1})

	id := watermill.NewUUID()
	upper, bare := strings.ToUpper(id), strings.ReplaceAll(id, "-", "")
	stream := domain.DealStream(id)
	key := id + ":2"
	appendLive(t, pool, stream, domain.DealCreated{DealID: upper, Customer: domain.Customer{ID: "C-\t1", Name: weird}, Currency: "EUR",
		Lines: []domain.Line{{SKU: "SKU-\\weird\t", Description: weird, Quantity: 2, UnitPrice: "1.50"}}, Total: "3.00"})
	appendLive(t, pool, stream, domain.DealWon{DealID: bare, CloseVersion: 2, IdempotencyKey: key, PreviousStatus: domain.StatusOpen})
	nanos := time.Date(2026, 3, 4, 5, 6, 7, 123456789, time.FixedZone("X", 3*3600+1800))
	before1970 := time.Date(1969, 12, 31, 23, 59, 59, 999999500, time.UTC)
	appendLive(t, pool, domain.SagaStream(key), domain.InvoiceAttemptFailed{DealID: id, IdempotencyKey: key, Attempt: 1,
		ErrorClass: domain.ErrorTransient, Message: weird, AttemptedAt: nanos, NextAttemptAt: before1970})
	appendLive(t, pool, domain.SagaStream(key), domain.InvoiceAttemptFailed{DealID: id, IdempotencyKey: key, Attempt: 2,
		ErrorClass: domain.ErrorTransient, Message: "zero next", AttemptedAt: nanos.Add(time.Second)})
	appendLive(t, pool, domain.SagaStream(key), domain.InvoiceAttemptFailed{DealID: id, IdempotencyKey: key, Attempt: 3,
		ErrorClass: domain.ErrorPermanent, Message: "final", AttemptedAt: nanos.Add(2 * time.Second), NextAttemptAt: nanos, Final: true},
		domain.InvoiceFailed{DealID: id, IdempotencyKey: key, ErrorClass: domain.ErrorPermanent, Reason: weird, Attempts: 3})
	appendLive(t, pool, stream, domain.DealReverted{DealID: upper, IdempotencyKey: key, Reason: weird})
	// A final attempt that nothing follows (its InvoiceFailed clears the
	// next attempt otherwise).
	id2 := watermill.NewUUID()
	appendLive(t, pool, domain.DealStream(id2), domain.DealCreated{DealID: id2, Customer: domain.Customer{ID: "C-2", Name: "Initech"},
		Currency: "USD", Total: "0"})
	appendLive(t, pool, domain.DealStream(id2), domain.DealWon{DealID: id2, CloseVersion: 2, IdempotencyKey: id2 + ":2"})
	appendLive(t, pool, domain.SagaStream(id2+":2"), domain.InvoiceAttemptFailed{DealID: id2, IdempotencyKey: id2 + ":2", Attempt: 1,
		ErrorClass: domain.ErrorPermanent, Message: "final", AttemptedAt: nanos, NextAttemptAt: nanos, Final: true})

	dl := domain.MessageDeadLettered{DeadLetterID: strings.ToUpper(watermill.NewUUID()), DealID: bare, IdempotencyKey: key,
		MessageUUID: "msg\\1", Topic: "t\tt", Handler: "h\nh", Metadata: map[string]string{"k\t": weird}, Reason: weird,
		ErrorClass: "permanent", Attempts: 3, FirstFailureAt: before1970, LastFailureAt: nanos}
	dl.SetPayload([]byte{0xff, 0x00, '\\', '\n', 0x80})
	appendLive(t, pool, domain.DeadLetterStream(dl.DeadLetterID), dl)
	dlStream := domain.DeadLetterStream(dl.DeadLetterID)
	appendLive(t, pool, dlStream, domain.DeadLetterEdited{DeadLetterID: dl.DeadLetterID, Revision: 1, Payload: []byte(`{"fixed": "a\\tb"}`),
		NeedsApproval: true})
	appendLive(t, pool, dlStream, domain.DeadLetterApproved{DeadLetterID: strings.ToLower(dl.DeadLetterID), Revision: 1, Actor: weird})
	appendLive(t, pool, dlStream, domain.DeadLetterReinjected{DeadLetterID: dl.DeadLetterID, Revision: 1, Count: 1})
	appendLive(t, pool, stream, domain.DealReinstated{DealID: id, IdempotencyKey: key, PreviousKey: key})
	appendLive(t, pool, stream, domain.InvoiceSagaResumed{DealID: id, IdempotencyKey: key, DeadLetterID: dl.DeadLetterID})
	appendLive(t, pool, dlStream, domain.DeadLetterReopened{DeadLetterID: dl.DeadLetterID, Reason: "again\\", ErrorClass: "exhausted",
		Attempts: 4, LastFailureAt: nanos.Add(time.Hour)})
	appendLive(t, pool, dlStream, domain.DeadLetterReinjected{DeadLetterID: dl.DeadLetterID, Revision: 1, Count: 2,
		IdempotencyKey: id + ":9"})
	appendLive(t, pool, stream, domain.InvoiceSagaResumed{DealID: upper, IdempotencyKey: id + ":9", DeadLetterID: dl.DeadLetterID})
	appendLive(t, pool, stream, domain.InvoiceCreated{DealID: id, IdempotencyKey: id + ":9", InvoiceNumber: "INV\t9"})
	appendLive(t, pool, dlStream, domain.DeadLetterResolved{DeadLetterID: dl.DeadLetterID, InvoiceNumber: "INV\t9"})

	text := domain.MessageDeadLettered{DeadLetterID: watermill.NewUUID(), MessageUUID: "m2", Topic: "t", Handler: "h",
		Reason: "poison", ErrorClass: "poison", Attempts: 1, FirstFailureAt: nanos, LastFailureAt: nanos}
	text.SetPayload([]byte("not json \\ but text\t"))
	appendLive(t, pool, domain.DeadLetterStream(text.DeadLetterID), text)
	appendLive(t, pool, domain.DeadLetterStream(text.DeadLetterID), domain.DeadLetterDiscarded{DeadLetterID: text.DeadLetterID})

	for i, next := range []domain.Event{
		domain.AlertAcknowledged{}, domain.AlertResolved{},
	} {
		a := domain.AlertRaised{AlertID: watermill.NewUUID(), Kind: "k\\", Severity: "critical", Message: weird}
		if i == 0 {
			a.DealID, a.IdempotencyKey, a.DeadLetterID = upper, key, dl.DeadLetterID
		}
		appendLive(t, pool, domain.AlertStream(a.AlertID), a)
		switch next.(type) {
		case domain.AlertAcknowledged:
			next = domain.AlertAcknowledged{AlertID: a.AlertID}
		case domain.AlertResolved:
			next = domain.AlertResolved{AlertID: strings.ToUpper(a.AlertID)}
		}
		appendLive(t, pool, domain.AlertStream(a.AlertID), next)
	}
	if err := ctx.Err(); err != nil {
		t.Fatal(err)
	}
}

func requireMethod(t testing.TB, rep projections.Report, method string) {
	t.Helper()
	if rep.Method != method {
		t.Fatalf("rebuilt with %q (fallback: %s), want %q", rep.Method, rep.Fallback, method)
	}
}

func requireNoDrift(t testing.TB, rep projections.Report) {
	t.Helper()
	if rep.Drift() {
		var buf bytes.Buffer
		rep.Format(&buf)
		t.Fatalf("replay differs from live:\n%s", buf.String())
	}
}

// TestFoldEqualsApply: the in-memory fold and COPY (the rebuild's fast
// path) give the very tables that Apply gives, event by event, over a log
// with every event type, upcast legacy events, concurrent commands and
// awkward values.
func TestFoldEqualsApply(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	simulate(t, store, 80, 4, 11)
	awkwardLog(t, pool)

	// The live tables were written by Apply inside the append transactions.
	rep := replay(t, pool, projections.Options{Verify: true})
	requireMethod(t, rep, projections.MethodFold)
	requireNoDrift(t, rep)

	// Add legacy events (no live projection), rebuild the live tables event
	// by event with Apply, and compare the fold with that.
	loadFixture(t, pool, "testdata/legacy_events.json")
	rows, err := pool.Query(t.Context(), `SELECT DISTINCT type FROM events ORDER BY type`)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		types = append(types, s)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(types, allEventTypes) {
		t.Fatalf("the log has event types %v, want every one of %v", types, allEventTypes)
	}
	var legacy int
	if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM events WHERE schema_version = 0`).Scan(&legacy); err != nil || legacy == 0 {
		t.Fatalf("no legacy events in the log (%v)", err)
	}

	applied := replay(t, pool, projections.Options{OneByOne: true, Swap: true})
	requireMethod(t, applied, projections.MethodApply)
	folded := replay(t, pool, projections.Options{Verify: true})
	requireMethod(t, folded, projections.MethodFold)
	requireNoDrift(t, folded)
	for i, tr := range folded.Tables {
		if tr.RebuiltRows == 0 {
			t.Errorf("table %s is empty: the log does not exercise it", tr.Name)
		}
		if a := applied.Tables[i]; a.RebuiltChecksum != tr.RebuiltChecksum {
			t.Errorf("table %s: apply checksum %s, fold checksum %s", tr.Name, a.RebuiltChecksum, tr.RebuiltChecksum)
		}
	}
}

// TestFoldFallsBackToApply: a log the fold does not model (a uuid in
// braces, which PostgreSQL accepts) is rebuilt event by event, correctly;
// a log Apply cannot fold fails with Apply's error.
func TestFoldFallsBackToApply(t *testing.T) {
	pool := pgtest.NewPool(t)
	id := watermill.NewUUID()
	stream := domain.DealStream(id)
	appendLive(t, pool, stream, domain.DealCreated{DealID: id, Customer: domain.Customer{ID: "C-1", Name: "Globex"}, Currency: "EUR",
		Lines: []domain.Line{}, Total: "0.00"})
	appendLive(t, pool, stream, domain.DealLost{DealID: "{" + id + "}", PreviousStatus: domain.StatusOpen})

	rep := replay(t, pool, projections.Options{Verify: true})
	requireMethod(t, rep, projections.MethodApply)
	if !strings.Contains(rep.Fallback, "uuid") {
		t.Errorf("fallback reason %q does not name the uuid", rep.Fallback)
	}
	requireNoDrift(t, rep)
	var buf bytes.Buffer
	rep.Format(&buf)
	if !strings.Contains(buf.String(), "rebuilt event by event") {
		t.Errorf("the report does not say it fell back:\n%s", buf.String())
	}

	// An event that updates a deal no event created: Apply's error.
	other := watermill.NewUUID()
	if _, err := pool.Exec(t.Context(), `INSERT INTO events (stream_id, stream_version, type, schema_version, payload, metadata)
		VALUES ($1, 1, 'DealLost', 1, $2, '{}')`, domain.DealStream(other), []byte(`{"deal_id":"`+other+`","previous_status":"open"}`)); err != nil {
		t.Fatal(err)
	}
	_, err := projections.Replay(t.Context(), pool, projections.Options{})
	if err == nil || !strings.Contains(err.Error(), "expected 1 row, touched 0") {
		t.Fatalf("replay of a broken log: %v, want Apply's one-row error", err)
	}
}
