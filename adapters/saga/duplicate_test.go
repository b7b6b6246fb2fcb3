package saga_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/erp/tryton"
	"github.com/dealbridge/dealbridge/adapters/saga"
	"github.com/dealbridge/dealbridge/domain"
)

// A duplicate invoice: the ERP holds two invoices for one idempotency key
// K (an ERP without a unique key, Tryton, after a race the service should
// have prevented). The saga must raise ONE duplicate_invoice alert, record
// one of the invoices (the oldest), and never compensate: the deal was
// invoiced, twice.

// fakeTryton answers JSON-RPC like Tryton 6.0 for the calls of a lookup
// (adapters/erp/tryton): login, preferences, the invoice search, currency
// and party reads. Its account.invoice search returns invoices, except
// that the searches numbered (from 1) in failSearch answer HTTP 503. Any
// write is recorded and refused.
type fakeTryton struct {
	t          *testing.T
	mu         sync.Mutex
	invoices   []map[string]any
	failSearch map[int]bool
	searches   int
	calls      []string
}

func (f *fakeTryton) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var req struct {
		ID     int64  `json:"id"`
		Method string `json:"method"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		http.Error(w, "bad json", http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, req.Method)
	var result any
	switch req.Method {
	case "common.db.login":
		result = []any{2, "session-key"}
	case "common.db.logout":
	case "model.res.user.get_preferences":
		result = map[string]any{"company": 1, "language": "en"}
	case "model.account.invoice.search_read":
		f.searches++
		if f.failSearch[f.searches] {
			http.Error(w, "service unavailable", http.StatusServiceUnavailable)
			return
		}
		result = f.invoices
	case "model.currency.currency.read":
		result = []any{map[string]any{"id": 3, "code": "EUR"}}
	case "model.party.party.read":
		result = []any{map[string]any{"id": 5, "code": "C-1"}}
	default:
		f.t.Errorf("unexpected Tryton call %s", req.Method)
		http.Error(w, "unexpected call", http.StatusInternalServerError)
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"id": req.ID, "result": result})
}

func (f *fakeTryton) called(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c == method {
			n++
		}
	}
	return n
}

// postedInvoice is a posted Tryton customer invoice for key, as search_read
// returns it.
func postedInvoice(id int, number, key string, day int) map[string]any {
	amount := map[string]any{"__class__": "Decimal", "decimal": "39.50"}
	return map[string]any{"id": id, "number": number, "reference": key, "state": "posted", "party": 5, "currency": 3,
		"untaxed_amount": amount, "total_amount": amount,
		"create_date": map[string]any{"__class__": "datetime", "year": 2026, "month": 11, "day": day,
			"hour": 6, "minute": 0, "second": 0, "microsecond": 0}}
}

// trytonHandler is the invoice handler on e's database with the Tryton
// adapter behind the circuit breaker, as app.ERPPort builds it.
func trytonHandler(t *testing.T, e *env, f *fakeTryton) *saga.InvoiceHandler {
	t.Helper()
	ts := httptest.NewServer(f)
	t.Cleanup(ts.Close)
	c := tryton.New(tryton.Config{URL: ts.URL, Database: "acme", User: "dealbridge", Password: "s3cret", Timeout: 5 * time.Second})
	t.Cleanup(func() { _ = c.Close() })
	return saga.NewInvoiceHandler(e.store, erp.NewBreaker(c, erp.BreakerConfig{}), saga.Config{
		Retry: domain.RetryPolicy{Initial: time.Millisecond, Max: time.Millisecond, MaxAttempts: 8, MaxAge: time.Hour},
	}, slog.New(slog.DiscardHandler))
}

// duplicateAlerts returns the duplicate_invoice alerts of a deal (state,
// severity, key, message) and the AlertRaised events behind them.
func (e *env) duplicateAlerts(t *testing.T, dealID string) (rows []string, events int) {
	t.Helper()
	r, err := e.pool.Query(t.Context(), `SELECT state || ' ' || severity || ' ' || coalesce(idempotency_key, '') || ' ' || message
		FROM alerts WHERE deal_id=$1 AND kind=$2`, dealID, domain.AlertKindDuplicateInvoice)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for r.Next() {
		var s string
		if err := r.Scan(&s); err != nil {
			t.Fatal(err)
		}
		rows = append(rows, s)
	}
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	err = e.pool.QueryRow(t.Context(), `SELECT count(*) FROM events WHERE type=$1 AND payload->>'kind'=$2 AND payload->>'deal_id'=$3`,
		domain.TypeAlertRaised, domain.AlertKindDuplicateInvoice, dealID).Scan(&events)
	if err != nil {
		t.Fatal(err)
	}
	return rows, events
}

// assertNotCompensated checks that nothing of a compensation happened:
// no InvoiceFailed, DealReverted or InventoryReleased event, no dead
// letter, no other alert, and the deal's stock still allocated.
func (e *env) assertNotCompensated(t *testing.T, dealID, key string) {
	t.Helper()
	var failed, reverted, released, letters, others int
	err := e.pool.QueryRow(t.Context(), `SELECT
		(SELECT count(*) FROM events WHERE stream_id=$1 AND type=$2),
		(SELECT count(*) FROM events WHERE type=$3 AND payload->>'deal_id'=$4),
		(SELECT count(*) FROM events WHERE type=$5),
		(SELECT count(*) FROM dead_letters),
		(SELECT count(*) FROM alerts WHERE kind<>$6)`,
		domain.SagaStream(key), domain.TypeInvoiceFailed, domain.TypeDealReverted, dealID,
		domain.TypeInventoryReleased, domain.AlertKindDuplicateInvoice).Scan(&failed, &reverted, &released, &letters, &others)
	if err != nil {
		t.Fatal(err)
	}
	if failed+reverted+released+letters+others != 0 {
		t.Fatalf("compensation traces: %d InvoiceFailed, %d DealReverted, %d InventoryReleased events, %d dead letters, %d other alerts; want none",
			failed, reverted, released, letters, others)
	}
	inv, err := e.store.GetInventory(t.Context(), "SKU-1")
	if err != nil {
		t.Fatal(err)
	}
	if inv.Allocated != 4 {
		t.Fatalf("SKU-1 allocated %d, want the deal's 4 still allocated", inv.Allocated)
	}
}

// assertRecorded checks that the deal is invoiced with number, once.
func (e *env) assertRecorded(t *testing.T, dealID, key, number string) {
	t.Helper()
	d, err := e.store.GetDeal(t.Context(), dealID)
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != domain.StatusInvoiced || d.Invoice == nil || d.Invoice.Number != number || d.Invoice.IdempotencyKey != key {
		t.Fatalf("deal %s: status %s, invoice %+v; want invoiced with %s", dealID, d.Status, d.Invoice, number)
	}
	if n := e.invoiceEvents(t, dealID); n != 1 {
		t.Fatalf("%d InvoiceCreated events, want 1", n)
	}
	if s, ok, err := e.store.InvoiceState(t.Context(), key); err != nil || !ok || s != "invoiced" {
		t.Fatalf("saga state %q, %v, %v; want invoiced", s, ok, err)
	}
}

// TestDuplicateInvoiceAlertNotCompensated: Tryton holds two posted invoices
// for K when the saga calls it. CreateInvoice reports a permanent error
// wrapping erp.ErrDuplicateInvoice; the saga raises one critical
// duplicate_invoice alert, records the oldest invoice and compensates
// nothing. A redelivery changes nothing.
func TestDuplicateInvoiceAlertNotCompensated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 4, erpsim.Config{})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey
	f := &fakeTryton{t: t, invoices: []map[string]any{
		postedInvoice(41, "INV/2026/00041", key, 24), postedInvoice(42, "INV/2026/00042", key, 25),
	}}
	h := trytonHandler(t, e, f)

	if err := h.Handle(delivery(t, m)); err != nil {
		t.Fatalf("delivery: %v, want the message acknowledged", err)
	}
	alerts, events := e.duplicateAlerts(t, d.ID)
	if len(alerts) != 1 || events != 1 {
		t.Fatalf("duplicate_invoice alerts %q (%d AlertRaised events); want one", alerts, events)
	}
	if a := alerts[0]; !strings.HasPrefix(a, "open critical "+key+" ") || !strings.Contains(a, "INV/2026/00041") ||
		!strings.Contains(a, "INV/2026/00042") {
		t.Errorf("alert %q: want open, critical, for %s, naming both invoices", a, key)
	}
	e.assertRecorded(t, d.ID, key, "INV/2026/00041")
	e.assertNotCompensated(t, d.ID, key)

	if err := h.Handle(delivery(t, m)); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	if alerts, events := e.duplicateAlerts(t, d.ID); len(alerts) != 1 || events != 1 {
		t.Fatalf("after a redelivery: duplicate_invoice alerts %q (%d events); want still one", alerts, events)
	}
	e.assertRecorded(t, d.ID, key, "INV/2026/00041")
	for _, w := range []string{"model.account.invoice.create", "model.account.invoice.post", "model.account.invoice.delete"} {
		if n := f.called(w); n != 0 {
			t.Errorf("%d calls of %s, want none", n, w)
		}
	}
}

// TestDuplicateInvoiceAlertedOnceWhenTheLookupFails: the lookup that
// follows the duplicate (to record the oldest invoice) fails once, so the
// message is redelivered and Tryton reports the duplicate again. The
// duplicate is still one incident: one alert.
func TestDuplicateInvoiceAlertedOnceWhenTheLookupFails(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 4, erpsim.Config{})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey
	f := &fakeTryton{t: t, failSearch: map[int]bool{2: true}, invoices: []map[string]any{
		postedInvoice(41, "INV/2026/00041", key, 24), postedInvoice(42, "INV/2026/00042", key, 25),
	}}
	h := trytonHandler(t, e, f)

	if err := h.Handle(delivery(t, m)); err == nil {
		t.Fatal("first delivery acknowledged although the lookup failed")
	}
	e.assertNotCompensated(t, d.ID, key)
	if err := h.Handle(delivery(t, m)); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	e.assertRecorded(t, d.ID, key, "INV/2026/00041")
	e.assertNotCompensated(t, d.ID, key)
	if alerts, events := e.duplicateAlerts(t, d.ID); len(alerts) != 1 || events != 1 {
		t.Fatalf("duplicate_invoice alerts %q (%d AlertRaised events); want one", alerts, events)
	}
}

// TestDuplicateInvoiceAlertAfterAFailedAttempt: the first attempt fails
// (Tryton answers 503); when the message comes back, Tryton holds two
// posted invoices for K. That is how a duplicate typically arises (a
// create whose outcome was unknown, then another): it must be alerted
// like one found by the first attempt.
func TestDuplicateInvoiceAlertAfterAFailedAttempt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 4, erpsim.Config{})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey
	f := &fakeTryton{t: t, failSearch: map[int]bool{1: true}, invoices: []map[string]any{
		postedInvoice(41, "INV/2026/00041", key, 24), postedInvoice(42, "INV/2026/00042", key, 25),
	}}
	h := trytonHandler(t, e, f)

	if err := h.Handle(delivery(t, m)); domain.ClassOf(err) != domain.ErrorTransient {
		t.Fatalf("first delivery: %v, want a transient ERP error", err)
	}
	if err := h.Handle(delivery(t, m)); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	e.assertRecorded(t, d.ID, key, "INV/2026/00041")
	e.assertNotCompensated(t, d.ID, key)
	if alerts, events := e.duplicateAlerts(t, d.ID); len(alerts) != 1 || events != 1 {
		t.Fatalf("duplicate_invoice alerts %q (%d AlertRaised events); want one", alerts, events)
	}
}
