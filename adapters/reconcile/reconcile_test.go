package reconcile_test

import (
	"context"
	"log/slog"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/adapters/reconcile"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
	"github.com/dealbridge/dealbridge/projections"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var meta = domain.Metadata{Actor: "reconcile-test"}

func newERP(t *testing.T) *erp.HTTPClient {
	t.Helper()
	sim, err := erpsim.New(erpsim.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sim.Close() })
	ts := httptest.NewServer(sim.Handler())
	t.Cleanup(ts.Close)
	return erp.NewHTTPClient(erp.HTTPConfig{BaseURL: ts.URL, Timeout: 5 * time.Second})
}

// relayAll runs the real relay until the work queue holds n messages.
func relayAll(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	logger := slog.New(slog.DiscardHandler)
	pub, err := queue.NewPublisher(pool, queue.PublisherConfig{}, logger)
	if err != nil {
		t.Fatal(err)
	}
	r, err := outbox.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond}, logger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var got int
		if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM work_queue WHERE topic=$1`, outbox.InvoiceTopic).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the relay moved %d of %d messages", got, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func wonDeal(t *testing.T, store *postgres.Store) postgres.DealView {
	t.Helper()
	d, err := store.CreateDeal(t.Context(), domain.Customer{ID: "C-1", Name: "Globex"}, "EUR",
		[]domain.Line{{SKU: "SKU-R", Description: "Widget", Quantity: 1, UnitPrice: "100.00"}}, meta)
	if err != nil {
		t.Fatal(err)
	}
	if d, err = store.CloseDeal(t.Context(), d.ID, domain.OutcomeWon, nil, meta); err != nil {
		t.Fatal(err)
	}
	return d
}

func countAlerts(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM alerts WHERE kind=$1`, reconcile.AlertKind).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestReconcileFindsLostMessages(t *testing.T) {
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	ctx := t.Context()
	port := newERP(t)
	if _, err := store.SetInventory(ctx, "SKU-R", 10, meta); err != nil {
		t.Fatal(err)
	}
	lost, done, queued := wonDeal(t, store), wonDeal(t, store), wonDeal(t, store)
	relayAll(t, pool, 3)

	// An operator (or a bug) deletes two work-queue messages by hand. For
	// one of them the ERP had already created the invoice: its success was
	// never recorded.
	for _, d := range []postgres.DealView{lost, done} {
		if tag, err := pool.Exec(ctx, `DELETE FROM work_queue WHERE ordering_key=$1`, d.ID); err != nil || tag.RowsAffected() != 1 {
			t.Fatalf("delete the message of %s: %v %v", d.ID, tag, err)
		}
	}
	inv, err := port.CreateInvoice(ctx, erp.InvoiceRequest{Key: *done.IdempotencyKey, Reference: done.ID, CustomerID: "C-1",
		CustomerName: "Globex", Currency: "EUR", Total: "100.00",
		Lines: []erp.Line{{SKU: "SKU-R", Description: "Widget", Quantity: 1, UnitPrice: "100.00"}}})
	if err != nil {
		t.Fatal(err)
	}

	// Too young to be checked.
	res, err := reconcile.New(store, port, reconcile.Config{After: time.Hour}).RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Checked) != 0 || res.Oldest == nil || res.Oldest.DealID != lost.ID {
		t.Fatalf("young deals were checked or the oldest is wrong: %+v", res)
	}

	time.Sleep(30 * time.Millisecond)
	rec := reconcile.New(store, port, reconcile.Config{After: 20 * time.Millisecond})
	res, err = rec.RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	actions := map[string]string{}
	for _, o := range res.Checked {
		actions[o.DealID] = o.Action
	}
	want := map[string]string{lost.ID: "alerted", done.ID: "recorded", queued.ID: "alerted"}
	for id, a := range want {
		if actions[id] != a {
			t.Errorf("deal %s: %q, want %q (all: %v)", id, actions[id], a, actions)
		}
	}
	got, err := store.GetDeal(ctx, done.ID)
	if err != nil || got.Status != domain.StatusInvoiced || got.Invoice == nil || got.Invoice.Number != inv.Number {
		t.Fatalf("the invoice found in the ERP was not recorded: %+v %v", got, err)
	}
	alerts, err := store.ListAlerts(ctx, "open", 100)
	if err != nil {
		t.Fatal(err)
	}
	sev := map[string]string{}
	for _, a := range alerts {
		if a.Kind == reconcile.AlertKind && a.DealID != nil {
			sev[*a.DealID] = a.Severity
		}
	}
	if sev[lost.ID] != domain.SeverityCritical || sev[queued.ID] != domain.SeverityWarning || len(sev) != 2 {
		t.Fatalf("alerts by deal: %v (lost message → critical, still queued → warning)", sev)
	}
	if res.Oldest == nil || res.Oldest.DealID != lost.ID || res.Oldest.Age <= 0 || res.Oldest.Queued {
		t.Fatalf("oldest unreconciled: %+v", res.Oldest)
	}

	// Every pass finds them again, but raises nothing new.
	for range 2 {
		res, err = rec.RunOnce(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if res.Alerted != 0 || countAlerts(t, pool) != 2 {
			t.Fatalf("alert raised again: %+v, %d alerts", res, countAlerts(t, pool))
		}
	}

	// The ERP catches up (an invoice created out of band): the next pass
	// records it and resolves its alert.
	if _, err := port.CreateInvoice(ctx, erp.InvoiceRequest{Key: *lost.IdempotencyKey, Reference: lost.ID, CustomerID: "C-1",
		CustomerName: "Globex", Currency: "EUR", Total: "100.00",
		Lines: []erp.Line{{SKU: "SKU-R", Description: "Widget", Quantity: 1, UnitPrice: "100.00"}}}); err != nil {
		t.Fatal(err)
	}
	if res, err = rec.RunOnce(ctx); err != nil || res.Recorded != 1 {
		t.Fatalf("%+v %v", res, err)
	}
	if st, _, _ := store.AlertState(ctx, reconcile.AlertID(*lost.IdempotencyKey)); st != "resolved" {
		t.Fatalf("the alert of the reconciled deal is %q", st)
	}
	if res.Oldest == nil || res.Oldest.DealID != queued.ID {
		t.Fatalf("oldest unreconciled after: %+v", res.Oldest)
	}

	// Everything reconciliation did is in the log: replay equals live.
	if rep, err := projections.Replay(ctx, pool, projections.Options{Verify: true}); err != nil || rep.Drift() {
		t.Fatalf("replay after reconciliation: drift %v, %v", rep.Drift(), err)
	}
}

func TestAlertIDIsStablePerKey(t *testing.T) {
	a, b := reconcile.AlertID("d:2"), reconcile.AlertID("d:2")
	if a != b || a == reconcile.AlertID("d:3") || len(a) != 36 || a[14] != '5' {
		t.Fatalf("%s %s", a, b)
	}
}
