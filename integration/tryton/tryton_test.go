package tryton_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/tryton"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// A closed deal becomes one posted Tryton invoice with the deal's amount,
// currency and reference, and the deal shows Tryton's invoice number. The
// saga runs in the real `dealbridge handler --erp tryton` process. A second
// delivery of the same request, and a second direct call, change nothing.
func TestClosedDealInvoicedInTryton(t *testing.T) {
	w := newWorld(t)
	w.pipeline() // the relay only; the handler is the process below
	w.startHandlerProcess(nil)

	usd, kUSD := w.deal("C-1", "USD", line("SKU-1", 2, "495.00"), line("SKU-2", 3, "0.10"))
	eur, kEUR := w.deal("C-2", "EUR", line("SKU-2", 1, "1234.56"))
	w.waitSaga(kUSD, domain.SagaInvoiced, time.Minute)
	w.waitSaga(kEUR, domain.SagaInvoiced, time.Minute)
	inv := w.oneInvoice(usd, kUSD, "C-1")
	w.oneInvoice(eur, kEUR, "C-2")
	if usd.Total != "990.30" || inv.Lines != 2 {
		t.Errorf("deal total %s, invoice lines %d; want 990.30 and 2", usd.Total, inv.Lines)
	}
	if !strings.HasPrefix(inv.Number, "INV/") {
		t.Errorf("invoice number %q: want Tryton's INV/<year>/ sequence", inv.Number)
	}

	// Redelivery: the same request again through the queue.
	w.republish(usd, kUSD)
	// A second call straight to the port: done, same invoice.
	c := w.client(nil)
	req := erp.InvoiceRequest{Key: kUSD, Reference: usd.ID, CustomerID: "C-1", CustomerName: usd.Customer.Name,
		Currency: "USD", Total: usd.Total, Lines: []erp.Line{{SKU: "SKU-1", Quantity: 2, UnitPrice: "495.00"}, {SKU: "SKU-2", Quantity: 3, UnitPrice: "0.10"}}}
	got, err := c.CreateInvoice(context.Background(), req)
	if err != nil || got.Number != inv.Number || got.Total != "990.30" || got.Currency != "USD" || got.Key != kUSD || got.Reference != usd.ID {
		t.Errorf("second CreateInvoice: %+v, %v; want invoice %s", got, err, inv.Number)
	}
	found, ok, err := c.FindInvoiceByKey(context.Background(), kUSD)
	if err != nil || !ok || found.Number != inv.Number || found.CustomerID != "C-1" {
		t.Errorf("FindInvoiceByKey: %+v, %v, %v", found, ok, err)
	}
	time.Sleep(500 * time.Millisecond) // let the republished message be handled
	w.oneInvoice(usd, kUSD, "C-1")
	if n := len(w.insp.invoices("")); n != 2 {
		t.Errorf("Tryton holds %d invoices, want 2", n)
	}
}

// A crash between create and post leaves a draft; the retry finds it and
// posts it instead of creating another.
func TestCrashBetweenCreateAndPostHeals(t *testing.T) {
	w := newWorld(t)
	ft := &faultTransport{fail: func(method string, n int) bool {
		return method == "model.account.invoice.post" && n == 1
	}}
	c := w.client(func(cfg *tryton.Config) { cfg.Client = &http.Client{Transport: ft} })
	w.pipeline(c)

	d, key := w.deal("C-1", "USD", line("SKU-1", 1, "100.00"))
	v := w.waitSaga(key, domain.SagaInvoiced, time.Minute)
	w.oneInvoice(d, key, "C-1")
	if got := ft.count("model.account.invoice.create"); got != 1 {
		t.Errorf("%d creates, want 1 (the retry must post the draft)", got)
	}
	if got := ft.count("model.account.invoice.post"); got != 2 {
		t.Errorf("%d posts, want 2 (the lost one and the healing one)", got)
	}
	if v.Attempts < 1 {
		t.Errorf("saga attempts %d: the failed post should have been recorded", v.Attempts)
	}
}

// Two handler processes' worth of consumers (each with its own Tryton
// session) and duplicate deliveries of every request: one invoice per
// deal, because the queue's ordering key serialises each deal.
func TestRacingHandlersOneInvoicePerDeal(t *testing.T) {
	w := newWorld(t)
	w.pipeline(w.client(nil), w.client(nil))
	type closed struct {
		d   postgres.DealView
		key string
	}
	var deals []closed
	for range 4 {
		d, key := w.deal("C-1", "USD", line("SKU-1", 1, "10.00"))
		deals = append(deals, closed{d, key})
		w.republish(d, key)
		w.republish(d, key)
	}
	for _, c := range deals {
		w.waitSaga(c.key, domain.SagaInvoiced, time.Minute)
	}
	time.Sleep(time.Second) // the duplicates drain
	for _, c := range deals {
		w.oneInvoice(c.d, c.key, "C-1")
	}
	if n := len(w.insp.invoices("")); n != len(deals) {
		t.Errorf("Tryton holds %d invoices, want %d", n, len(deals))
	}
}

// Concurrent calls for one key on one Client are serialised in-process.
func TestConcurrentCallsOneKeyOneInvoice(t *testing.T) {
	w := newWorld(t)
	c := w.client(nil)
	req := erp.InvoiceRequest{Key: "D-RACE:2", Reference: "D-RACE", CustomerID: "C-1", Currency: "USD", Total: "5.00",
		Lines: []erp.Line{{SKU: "SKU-1", Quantity: 1, UnitPrice: "5.00"}}}
	var wg sync.WaitGroup
	numbers := make([]string, 4)
	for i := range numbers {
		wg.Go(func() {
			inv, err := c.CreateInvoice(context.Background(), req)
			if err != nil {
				t.Error(err)
			}
			numbers[i] = inv.Number
		})
	}
	wg.Wait()
	for _, n := range numbers[1:] {
		if n != numbers[0] {
			t.Errorf("numbers %v: want one invoice", numbers)
		}
	}
	if invs := w.insp.invoices("D-RACE:"); len(invs) != 1 {
		t.Errorf("Tryton holds %d invoices for D-RACE, want 1: %+v", len(invs), invs)
	}
}

// An unknown customer (reject mode) is a permanent error: the deal is
// compensated, an alert raised and the payload dead-lettered with the
// reason. An operator fixes the customer id in the dead letter and
// re-injects it: the deal is invoiced, once.
func TestUnknownCustomerDeadLetterFixReinject(t *testing.T) {
	w := newWorld(t)
	w.pipeline(w.client(nil))
	ctx := context.Background()

	d, key := w.deal("C-404", "USD", line("SKU-1", 4, "25.00"))
	v := w.waitSaga(key, domain.SagaCompensated, time.Minute)
	if v.Attempts != 1 {
		t.Errorf("saga attempts %d, want 1 (permanent: no retry)", v.Attempts)
	}
	if got := w.getDeal(d.ID); got.Status != domain.StatusReverted {
		t.Errorf("deal status %s, want reverted", got.Status)
	}
	if inv, err := w.store.GetInventory(ctx, "SKU-1"); err != nil || inv.Allocated != 0 {
		t.Errorf("inventory %+v, %v: want released", inv, err)
	}
	alerts, err := w.store.ListAlerts(ctx, "", 10)
	if err != nil || len(alerts) != 1 || nilStr(alerts[0].DealID) != d.ID {
		t.Fatalf("alerts %+v, %v: want one for deal %s", alerts, err, d.ID)
	}
	page, err := w.store.ListDeadLetters(ctx, postgres.DeadLetterFilter{DealID: d.ID}, "", 10)
	if err != nil || len(page.Items) != 1 {
		t.Fatalf("dead letters %+v, %v: want one", page, err)
	}
	dl := page.Items[0]
	for _, want := range []string{"permanent", "unknown customer", `"C-404"`} {
		if !strings.Contains(dl.Reason, want) {
			t.Errorf("dead letter reason %q: want it to contain %q", dl.Reason, want)
		}
	}
	if len(w.insp.invoices(d.ID)) != 0 {
		t.Errorf("Tryton holds an invoice for the rejected deal")
	}

	// Fix the customer id through a dead-letter edit, then re-inject.
	var req domain.InvoiceRequest
	if err := json.Unmarshal(dl.Payload, &req); err != nil {
		t.Fatal(err)
	}
	req.Customer = domain.Customer{ID: "C-1", Name: "Globex Corporation"}
	fixed, _ := json.Marshal(req)
	ops := postgres.Actor{Name: "ops@example.com", Role: "operator"}
	if _, err := w.store.EditDeadLetter(ctx, dl.ID, fixed, "customer C-404 is Globex (C-1) in Tryton", ops); err != nil {
		t.Fatal(err)
	}
	if _, err := w.store.ReinjectDeadLetter(ctx, dl.ID, postgres.ReinjectOptions{Reason: "customer fixed"}, ops); err != nil {
		t.Fatal(err)
	}
	w.waitSaga(key, domain.SagaInvoiced, time.Minute)
	d.Customer = req.Customer
	w.oneInvoice(d, key, "C-1")
}

// Tryton's own refusal (a UserError) is permanent, and its message reaches
// the dead letter: a customer without an address cannot be invoiced.
func TestTrytonUserErrorKeptInDeadLetter(t *testing.T) {
	w := newWorld(t)
	w.pipeline(w.client(nil))
	d, key := w.deal("C-NOADDR", "USD", line("SKU-1", 1, "10.00"))
	w.waitSaga(key, domain.SagaCompensated, time.Minute)
	page, err := w.store.ListDeadLetters(context.Background(), postgres.DeadLetterFilter{DealID: d.ID}, "", 10)
	if err != nil || len(page.Items) != 1 {
		t.Fatalf("dead letters %+v, %v: want one", page, err)
	}
	if want := `A value is required for field "Invoice Address" in "Invoice"`; !strings.Contains(page.Items[0].Reason, want) {
		t.Errorf("dead letter reason %q: want Tryton's message %q", page.Items[0].Reason, want)
	}
	if invs := w.insp.invoices(d.ID); len(invs) != 0 {
		t.Errorf("Tryton holds %+v for the refused deal", invs)
	}
}

// trytond dies (SIGKILL) in the middle of a batch and comes back: every
// deal ends invoiced exactly once.
func TestTrytonRestartMidBatch(t *testing.T) {
	w := newWorld(t)
	w.pipeline(w.client(nil))
	const n = 12
	type closed struct {
		d   postgres.DealView
		key string
	}
	var deals []closed
	for i := range n {
		d, key := w.deal("C-1", "USD", line("SKU-1", int64(i+1), "7.25"))
		deals = append(deals, closed{d, key})
	}
	// Kill trytond once a few deals are through.
	deadline := time.Now().Add(time.Minute)
	for invoiced := 0; invoiced < 3; {
		if time.Now().After(deadline) {
			t.Fatal("no progress before the restart")
		}
		invoiced = 0
		for _, c := range deals {
			if w.saga(c.key).State == domain.SagaInvoiced {
				invoiced++
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := stopTrytond(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	if err := startTrytond(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, c := range deals {
		w.waitSaga(c.key, domain.SagaInvoiced, 2*time.Minute)
	}
	for _, c := range deals {
		w.oneInvoice(c.d, c.key, "C-1")
	}
	if invs := w.insp.invoices(""); len(invs) != n {
		t.Errorf("Tryton holds %d invoices, want %d", len(invs), n)
	}
}

// On HTTP 401 the client logs in again and retries once: a session idle
// for more than [session] timeout may no longer post (fresh_session), and
// a deleted session is refused everywhere.
func TestSessionExpiryRelogin(t *testing.T) {
	w := newWorld(t)
	ft := &faultTransport{}
	c := w.client(func(cfg *tryton.Config) { cfg.Client = &http.Client{Transport: ft} })
	ctx := context.Background()
	req := func(key string) erp.InvoiceRequest {
		return erp.InvoiceRequest{Key: key, Reference: strings.Split(key, ":")[0], CustomerID: "C-1", Currency: "USD", Total: "1.00",
			Lines: []erp.Line{{SKU: "SKU-1", Quantity: 1, UnitPrice: "1.00"}}}
	}
	if _, err := c.CreateInvoice(ctx, req("S-1:2")); err != nil {
		t.Fatal(err)
	}
	// Idle for 10 minutes: searches still work, post answers 401.
	trytonSQL(t, w.tdb, `UPDATE ir_session SET create_date = now() - interval '10 minutes', write_date = now() - interval '10 minutes'`)
	if inv, err := c.CreateInvoice(ctx, req("S-2:2")); err != nil || inv.Number == "" {
		t.Fatalf("after the session aged: %+v, %v", inv, err)
	}
	if got := ft.count("common.db.login"); got != 2 {
		t.Errorf("%d logins, want 2", got)
	}
	// Deleted: the next call is refused, then succeeds after a new login.
	trytonSQL(t, w.tdb, `DELETE FROM ir_session`)
	if _, ok, err := c.FindInvoiceByKey(ctx, "S-2:2"); err != nil || !ok {
		t.Fatalf("after the session was deleted: %v, %v", ok, err)
	}
	if got := ft.count("common.db.login"); got != 3 {
		t.Errorf("%d logins, want 3", got)
	}
	w.insp = inspect(t, w.tdb) // its session was deleted too
	if invs := w.insp.invoices("S-"); len(invs) != 2 {
		t.Errorf("Tryton holds %d invoices, want 2", len(invs))
	}
}

// More than one invoice for a key (a duplicate made behind the service's
// back) is reported, never papered over by a third.
func TestDuplicateInvoiceReported(t *testing.T) {
	w := newWorld(t)
	c := w.client(nil)
	ctx := context.Background()
	req := erp.InvoiceRequest{Key: "DUP:2", Reference: "DUP", CustomerID: "C-1", Currency: "USD", Total: "3.00",
		Lines: []erp.Line{{SKU: "SKU-1", Quantity: 1, UnitPrice: "3.00"}}}
	first, err := c.CreateInvoice(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	invs := w.insp.invoices("DUP:")
	w.insp.call("model.account.invoice.copy", []any{[]any{invs[0].ID}, map[string]any{"reference": "DUP:2"}}, nil)

	_, err = c.CreateInvoice(ctx, req)
	var e *domain.ERPError
	if !errors.As(err, &e) || e.Class != domain.ErrorPermanent || !errors.Is(err, erp.ErrDuplicateInvoice) || !strings.Contains(e.Message, "duplicate") {
		t.Fatalf("CreateInvoice with a duplicate: %v; want a permanent error wrapping erp.ErrDuplicateInvoice", err)
	}
	found, ok, err := c.FindInvoiceByKey(ctx, "DUP:2")
	if err != nil || !ok || found.Number != first.Number {
		t.Errorf("FindInvoiceByKey: %+v, %v, %v; want the posted original %s", found, ok, err, first.Number)
	}
	if n := len(w.insp.invoices("DUP:")); n != 2 {
		t.Errorf("Tryton holds %d invoices, want 2 (no third)", n)
	}
}

// Master data mapping: a party identifier instead of the code; missing
// customers created (once) when so configured; unknown products and
// currencies are permanent errors.
func TestCustomerMappingAndCreation(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	req := func(key, customer string) erp.InvoiceRequest {
		return erp.InvoiceRequest{Key: key, Reference: strings.Split(key, ":")[0], CustomerID: customer, CustomerName: "Newco " + customer,
			Currency: "USD", Total: "2.50", Lines: []erp.Line{{SKU: "SKU-2", Quantity: 1, UnitPrice: "2.50"}}}
	}
	byIdent := w.client(func(cfg *tryton.Config) { cfg.CustomerMatch = tryton.MatchIdentifier })
	if inv, err := byIdent.CreateInvoice(ctx, req("M-1:2", "CRM-2")); err != nil || inv.Number == "" {
		t.Fatalf("identifier mapping: %+v, %v", inv, err)
	}
	if invs := w.insp.invoices("M-1:"); len(invs) != 1 || invs[0].Party != "C-2" {
		t.Errorf("identifier CRM-2: invoices %+v, want party C-2", invs)
	}

	creating := w.client(func(cfg *tryton.Config) { cfg.MissingCustomer = tryton.CreateMissing })
	for _, key := range []string{"M-2:2", "M-3:2"} {
		if inv, err := creating.CreateInvoice(ctx, req(key, "C-NEW")); err != nil || inv.Number == "" {
			t.Fatalf("create missing customer: %+v, %v", inv, err)
		}
	}
	var count int
	w.insp.call("model.party.party.search_count", []any{[]any{[]any{"code", "=", "C-NEW"}}}, &count)
	if count != 1 {
		t.Errorf("%d parties with code C-NEW, want 1", count)
	}

	rejecting := w.client(nil)
	for name, r := range map[string]erp.InvoiceRequest{
		"unknown customer": req("M-4:2", "C-NOPE"),
		"unknown product": func() erp.InvoiceRequest {
			r := req("M-5:2", "C-1")
			r.Lines[0].SKU = "SKU-NOPE"
			return r
		}(),
		"unknown currency": func() erp.InvoiceRequest { r := req("M-6:2", "C-1"); r.Currency = "XAU"; return r }(),
	} {
		_, err := rejecting.CreateInvoice(ctx, r)
		if domain.ClassOf(err) != domain.ErrorPermanent {
			t.Errorf("%s: %v, want a permanent error", name, err)
		}
	}
}
