package integration

// The unhappy paths of the invoice saga (reliability.md F5–F9, F12) against a
// real database and the simulated ERP over real HTTP, with the relay and the
// handler running in this process (see startInProcess). Every test ends with
// checkInvariants.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/adapters/saga"
	"github.com/dealbridge/dealbridge/adapters/webhook"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// clockSlack absorbs the rounding of timestamps to microseconds in
// Postgres; every clock compared below is this machine's wall clock.
const clockSlack = 5 * time.Millisecond

// F5 then recovery: the ERP answers 5xx until the test turns the errors
// off. Each failure is recorded with the time of the next attempt, which
// lies within the backoff bound and is honoured; the deal is invoiced once,
// and the attempt count equals the failures.
func TestERP5xxThenSuccess(t *testing.T) {
	w := newWorld(t, erpsim.Faults{ErrorRate: 1})
	policy := domain.RetryPolicy{Initial: 100 * time.Millisecond, Max: 400 * time.Millisecond, MaxAttempts: 8}
	w.startInProcess(pipelineConfig{Retry: policy})
	w.setInventory("SKU-5XX", 10)
	d, key := w.newWonDeal("C-5XX", "SKU-5XX", 2)

	w.waitAttempts(key, 2, 10*time.Second)
	w.setFaults(erpsim.Faults{})
	sg := w.waitSaga(key, domain.SagaInvoiced, 10*time.Second)

	as := w.attemptsFor(key)
	failures := len(as) - 1
	for i, a := range as {
		last := i == len(as)-1
		if !last && (a.Outcome != erpsim.OutcomeFault || a.Status < 500) || last && a.Outcome != erpsim.OutcomeCreated {
			t.Fatalf("ledger for %s: %v; want 5xx faults, then one create", key, ledgerOutcomes(as))
		}
	}
	if failures < 2 {
		t.Fatalf("ledger for %s: %v; want at least 2 failures before the create", key, ledgerOutcomes(as))
	}
	if sg.Attempts != failures {
		t.Errorf("invoice_sagas.attempts = %d, want %d (the failures)", sg.Attempts, failures)
	}
	ic := w.invoiceCreated(d.ID)
	if len(ic) != 1 || ic[0].Attempts != failures+1 || ic[0].InvoiceNumber != as[len(as)-1].Number {
		t.Errorf("InvoiceCreated events %+v, want one with attempts %d and number %s", ic, failures+1, as[len(as)-1].Number)
	}
	fails := w.attemptFailures(key)
	if len(fails) != failures {
		t.Fatalf("%d InvoiceAttemptFailed events, want %d", len(fails), failures)
	}
	for i, f := range fails {
		bound := policy.Bound(f.Attempt)
		switch {
		case f.Attempt != i+1:
			t.Errorf("failure %d records attempt %d", i+1, f.Attempt)
		case f.ErrorClass != domain.ErrorTransient || f.StatusCode != as[i].Status:
			t.Errorf("failure %d: class %s status %d, want transient %d", i+1, f.ErrorClass, f.StatusCode, as[i].Status)
		case f.NextAttemptAt.Before(f.AttemptedAt) || f.NextAttemptAt.After(f.AttemptedAt.Add(bound)):
			t.Errorf("failure %d: next attempt at %v is not within [%v, +%v]", i+1, f.NextAttemptAt, f.AttemptedAt, bound)
		}
		gap := as[i+1].Time.Sub(as[i].Time)
		if gap < 0 {
			t.Errorf("ledger attempt %d came %v before attempt %d", i+2, -gap, i+1)
		}
		// The retry is durable: it waits in the queue row until the
		// scheduled time.
		if early := f.NextAttemptAt.Sub(as[i+1].Time); early > clockSlack {
			t.Errorf("attempt %d reached the ERP at %v, %v before its scheduled %v", i+2, as[i+1].Time, early, f.NextAttemptAt)
		}
		t.Logf("attempt %d: %d, backoff %v (bound %v), gap to the next attempt %v", i+1, as[i].Status,
			f.NextAttemptAt.Sub(f.AttemptedAt).Round(time.Millisecond), bound, gap.Round(time.Millisecond))
	}
	checkInvariants(t, w.pool, w.sim)
}

// F6: 429 with Retry-After 1 s. The backoff alone would be at most 50 ms;
// the next attempt comes no earlier than Retry-After says.
func TestERP429RetryAfterHonoured(t *testing.T) {
	w := newWorld(t, erpsim.Faults{RateLimitRate: 1, RetryAfterSeconds: 1})
	w.startInProcess(pipelineConfig{Retry: domain.RetryPolicy{Initial: 50 * time.Millisecond, Max: 50 * time.Millisecond, MaxAttempts: 6}})
	w.setInventory("SKU-429", 10)
	d, key := w.newWonDeal("C-429", "SKU-429", 1)

	w.waitAttempts(key, 1, 10*time.Second)
	w.setFaults(erpsim.Faults{})
	w.waitSaga(key, domain.SagaInvoiced, 10*time.Second)

	as := w.attemptsFor(key)
	fails := w.attemptFailures(key)
	if len(as) < 2 || len(fails) != len(as)-1 || as[len(as)-1].Outcome != erpsim.OutcomeCreated {
		t.Fatalf("ledger for %s: %v, %d failures recorded; want 429(s), then one create", key, ledgerOutcomes(as), len(fails))
	}
	for i, f := range fails {
		if as[i].Status != http.StatusTooManyRequests || f.ErrorClass != domain.ErrorRateLimited || f.StatusCode != http.StatusTooManyRequests {
			t.Errorf("attempt %d: ledger %d, recorded %s %d; want 429 rate_limited", i+1, as[i].Status, f.ErrorClass, f.StatusCode)
		}
		if d := f.NextAttemptAt.Sub(f.AttemptedAt); d < time.Second {
			t.Errorf("attempt %d: next attempt scheduled %v after it, want ≥ Retry-After 1s", i+1, d)
		}
		gap := as[i+1].Time.Sub(as[i].Time)
		if gap < time.Second {
			t.Errorf("attempt %d came %v after the 429, want ≥ 1s (Retry-After)", i+2, gap)
		}
		t.Logf("429 at %v, next attempt %v later", as[i].Time.Format("15:04:05.000"), gap.Round(time.Millisecond))
	}
	if ic := w.invoiceCreated(d.ID); len(ic) != 1 || ic[0].Attempts != len(as) {
		t.Errorf("InvoiceCreated %+v, want one with attempts %d", ic, len(as))
	}
	checkInvariants(t, w.pool, w.sim)
}

// F7: the ERP rejects the customer with 422. No retry: compensation at once
// — deal reverted, inventory released, alert and dead letter carrying the
// ERP's message. Another customer's deal goes through meanwhile.
func TestERP422CompensatesAtOnce(t *testing.T) {
	w := newWorld(t, erpsim.Faults{RejectCustomers: []string{"C-REJECTED"}})
	w.startInProcess(pipelineConfig{Retry: domain.RetryPolicy{Initial: 50 * time.Millisecond, MaxAttempts: 5}})
	const sku = "SKU-422"
	w.setInventory(sku, 10)
	before := w.inventory(sku)

	d := w.openDeal("C-REJECTED", sku, 3)
	key := w.closeWon(d)
	if inv := w.inventory(sku); inv.Available != before.Available-3 || inv.Allocated != before.Allocated+3 {
		t.Fatalf("inventory after close: %+v, want 3 allocated", inv)
	}
	_, okKey := w.newWonDeal("C-OK", sku, 1)

	sg := w.waitSaga(key, domain.SagaCompensated, 10*time.Second)
	w.waitSaga(okKey, domain.SagaInvoiced, 10*time.Second)
	const erpMessage = "unknown customer C-REJECTED"

	if as := w.attemptsFor(key); len(as) != 1 || as[0].Status != http.StatusUnprocessableEntity {
		t.Errorf("ledger for %s: %v; want exactly one attempt, answered 422", key, ledgerOutcomes(as))
	}
	if sg.Attempts != 1 || nilStr(sg.ErrorClass) != string(domain.ErrorPermanent) || !strings.Contains(nilStr(sg.LastError), erpMessage) {
		t.Errorf("saga %+v: want 1 attempt, class permanent, last error with %q", sg, erpMessage)
	}
	deal, err := w.store.GetDeal(context.Background(), d.ID)
	if err != nil {
		t.Fatal(err)
	}
	if deal.Status != domain.StatusReverted || deal.Invoice != nil {
		t.Errorf("deal %s: status %s, invoice %+v; want reverted without invoice", d.ID, deal.Status, deal.Invoice)
	}
	after := w.inventory(sku)
	if after.Available != before.Available-1 || after.Allocated != before.Allocated+1 { // the other deal's unit stays allocated
		t.Errorf("inventory after compensation: available %d allocated %d; want %d and %d (back to before the close, less the other deal's unit)",
			after.Available, after.Allocated, before.Available-1, before.Allocated+1)
	}

	dl := onlyDeadLetterOf(t, w.store, d.ID)
	if dl.State != "open" || dl.ErrorClass != string(domain.ErrorPermanent) || dl.Attempts != 1 || !strings.Contains(dl.Reason, erpMessage) ||
		nilStr(dl.IdempotencyKey) != key || dl.Topic != outbox.InvoiceTopic || dl.Handler != saga.HandlerName {
		t.Errorf("dead letter %+v: want open, permanent, 1 attempt, reason with %q, key %s, topic %s, handler %s",
			dl, erpMessage, key, outbox.InvoiceTopic, saga.HandlerName)
	}
	var req domain.InvoiceRequest
	if err := json.Unmarshal(dl.Payload, &req); err != nil || req.IdempotencyKey != key || req.DealID != d.ID {
		t.Errorf("dead letter payload %s: want the invoice request of %s (%v)", dl.Payload, key, err)
	}
	al := onlyAlertOf(t, w.store, d.ID)
	if al.State != "open" || al.Kind != domain.AlertKindInvoiceFailed || !strings.Contains(al.Message, erpMessage) || nilStr(al.DeadLetterID) != dl.ID {
		t.Errorf("alert %+v: want open invoice_failed with %q, linked to dead letter %s", al, erpMessage, dl.ID)
	}
	if f := eventsOf[domain.InvoiceFailed](t, w.pool, domain.SagaStream(key), domain.TypeInvoiceFailed); len(f) != 1 ||
		f[0].ErrorClass != domain.ErrorPermanent || f[0].Attempts != 1 {
		t.Errorf("InvoiceFailed events %+v, want one, permanent, 1 attempt", f)
	}
	// The rejected attempt itself is on the saga's stream, with its status
	// and latency, so the timeline and the dead-letter page can show it.
	if fa := w.attemptFailures(key); len(fa) != 1 || !fa[0].Final || fa[0].Attempt != 1 || fa[0].StatusCode != http.StatusUnprocessableEntity ||
		fa[0].ErrorClass != domain.ErrorPermanent || fa[0].LatencyMS < 0 || !fa[0].NextAttemptAt.IsZero() {
		t.Errorf("InvoiceAttemptFailed events %+v, want one final 422 attempt with a latency and no next attempt", fa)
	}
	if sg.NextAttemptAt != nil {
		t.Errorf("saga of a failed invoice has a next attempt at %v", sg.NextAttemptAt)
	}
	checkInvariants(t, w.pool, w.sim)
	if as := w.attemptsFor(key); len(as) != 1 {
		t.Errorf("ledger for %s after the drain: %v; want still one attempt", key, ledgerOutcomes(as))
	}
}

// F5 to the end: 5xx on every attempt with MaxAttempts 3 → exactly 3 ERP
// attempts, then compensation with error class "exhausted".
func TestERPRetriesExhaustedCompensates(t *testing.T) {
	w := newWorld(t, erpsim.Faults{ErrorRate: 1})
	w.startInProcess(pipelineConfig{Retry: domain.RetryPolicy{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond, MaxAttempts: 3}})
	const sku = "SKU-EXH"
	w.setInventory(sku, 5)
	d, key := w.newWonDeal("C-EXH", sku, 5)
	if inv := w.inventory(sku); inv.Available != 0 {
		t.Fatalf("inventory after close %+v, want all 5 allocated", inv)
	}

	sg := w.waitSaga(key, domain.SagaCompensated, 15*time.Second)
	if as := w.attemptsFor(key); len(as) != 3 {
		t.Errorf("ledger for %s: %v; want exactly 3 attempts", key, ledgerOutcomes(as))
	}
	if sg.Attempts != 3 || nilStr(sg.ErrorClass) != domain.ClassExhausted {
		t.Errorf("saga %+v: want 3 attempts, class exhausted", sg)
	}
	dl := onlyDeadLetterOf(t, w.store, d.ID)
	if dl.ErrorClass != domain.ClassExhausted || dl.Attempts != 3 || !strings.Contains(dl.Reason, "retries exhausted after 3 attempt(s)") ||
		!strings.Contains(dl.Reason, "injected server error") || !dl.LastFailureAt.After(dl.FirstFailureAt) {
		t.Errorf("dead letter %+v: want class exhausted, 3 attempts, the last ERP error in the reason, first < last failure", dl)
	}
	fa := w.attemptFailures(key)
	if len(fa) != 3 {
		t.Fatalf("%d InvoiceAttemptFailed events, want 3 (the last one final)", len(fa))
	}
	for i, f := range fa {
		if f.Attempt != i+1 || f.Final != (i == 2) || f.ErrorClass != domain.ErrorTransient || f.StatusCode < 500 {
			t.Errorf("attempt event %d: %+v, want attempt %d, transient 5xx, final only for the last", i+1, f, i+1)
		}
	}
	if al := onlyAlertOf(t, w.store, d.ID); al.Kind != domain.AlertKindInvoiceFailed || nilStr(al.DeadLetterID) != dl.ID {
		t.Errorf("alert %+v, want invoice_failed linked to %s", al, dl.ID)
	}
	if inv := w.inventory(sku); inv.Available != 5 || inv.Allocated != 0 {
		t.Errorf("inventory after compensation %+v, want 5 available again", inv)
	}
	checkInvariants(t, w.pool, w.sim)
	if as := w.attemptsFor(key); len(as) != 3 {
		t.Errorf("ledger for %s after the drain: %v; want still 3 attempts", key, ledgerOutcomes(as))
	}
}

// F8: the ERP holds the create until the client times out — an ambiguous
// outcome. The handler looks the key up, finds nothing and retries with the
// same key; exactly one invoice results.
func TestERPHangIsAmbiguousThenRetried(t *testing.T) {
	w := newWorld(t, erpsim.Faults{HangRate: 1})
	w.startInProcess(pipelineConfig{ERPTimeout: 400 * time.Millisecond, Retry: domain.RetryPolicy{Initial: 100 * time.Millisecond, MaxAttempts: 6}})
	w.setInventory("SKU-HANG", 10)
	d, key := w.newWonDeal("C-HANG", "SKU-HANG", 1)

	w.waitAttempts(key, 1, 10*time.Second) // recorded once the client gave up
	w.setFaults(erpsim.Faults{})
	w.waitSaga(key, domain.SagaInvoiced, 10*time.Second)

	as := w.attemptsFor(key)
	if all := w.sim.Ledger().Attempts; len(all) != len(as) {
		t.Errorf("the ERP saw %d attempts, %d of them with key %s: every retry must reuse the key", len(all), len(as), key)
	}
	for i, a := range as {
		last := i == len(as)-1
		if !last && a.Outcome != erpsim.OutcomeHung || last && a.Outcome != erpsim.OutcomeCreated {
			t.Fatalf("ledger for %s: %v; want hung attempt(s), then one create", key, ledgerOutcomes(as))
		}
	}
	if len(as) < 2 || w.createsFor(key) != 1 {
		t.Fatalf("ledger for %s: %v, %d create(s); want a hang, then exactly one create", key, ledgerOutcomes(as), w.createsFor(key))
	}
	fails := w.attemptFailures(key)
	if len(fails) != len(as)-1 {
		t.Fatalf("%d failures recorded, want %d", len(fails), len(as)-1)
	}
	for _, f := range fails {
		if f.ErrorClass != domain.ErrorAmbiguous {
			t.Errorf("failure %d: class %s, want ambiguous", f.Attempt, f.ErrorClass)
		}
	}
	if !strings.Contains(w.logs.String(), "ambiguous ERP outcome resolved by lookup: no invoice; retrying with the same key") {
		t.Error("the handler did not look the key up after the ambiguous outcome")
	}
	if ic := w.invoiceCreated(d.ID); len(ic) != 1 || ic[0].Attempts != len(as) || ic[0].InvoiceNumber != as[len(as)-1].Number {
		t.Errorf("InvoiceCreated %+v, want one with attempts %d and number %s", ic, len(as), as[len(as)-1].Number)
	}
	checkInvariants(t, w.pool, w.sim)
}

// F9: the ERP creates the invoice and drops the connection before
// answering. The ambiguous outcome is resolved by a lookup by key (or, on a
// reused keep-alive connection, possibly by net/http resending the request,
// which carries an Idempotency-Key, and the ERP replaying its answer): one
// invoice, recorded on the deal.
func TestERPLostResponse(t *testing.T) {
	t.Run("fresh connection: lookup", func(t *testing.T) {
		w := newWorld(t, erpsim.Faults{DropAfterCommitRate: 1})
		// Without keep-alive net/http never resends, so the handler itself
		// must resolve the ambiguity.
		w.startInProcess(pipelineConfig{HTTPClient: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}})
		w.setInventory("SKU-LOST", 10)
		d, key := w.newWonDeal("C-LOST", "SKU-LOST", 1)
		w.waitAttempts(key, 1, 10*time.Second)
		w.setFaults(erpsim.Faults{})
		sg := w.waitSaga(key, domain.SagaInvoiced, 10*time.Second)

		as := w.attemptsFor(key)
		if len(as) != 1 || as[0].Outcome != erpsim.OutcomeDropped || w.createsFor(key) != 1 {
			t.Fatalf("ledger for %s: %v, %d create(s); want one dropped create and nothing more", key, ledgerOutcomes(as), w.createsFor(key))
		}
		if !strings.Contains(w.logs.String(), "ambiguous ERP outcome resolved by lookup: the invoice exists") {
			t.Error("the invoice was not found by the lookup")
		}
		if sg.Attempts != 0 || nilStr(sg.InvoiceNumber) != as[0].Number {
			t.Errorf("saga %+v: want no failed attempt and invoice %s", sg, as[0].Number)
		}
		checkLostResponseDeal(t, w, d.ID, key, as)
		checkInvariants(t, w.pool, w.sim)
	})
	t.Run("keep-alive connection", func(t *testing.T) {
		w := newWorld(t, erpsim.Faults{})
		w.startInProcess(pipelineConfig{})
		w.setInventory("SKU-LOST", 10)
		// A first deal leaves an idle keep-alive connection to the ERP.
		_, warm := w.newWonDeal("C-WARM", "SKU-LOST", 1)
		w.waitSaga(warm, domain.SagaInvoiced, 10*time.Second)

		w.setFaults(erpsim.Faults{DropAfterCommitRate: 1})
		d, key := w.newWonDeal("C-LOST", "SKU-LOST", 1)
		w.waitAttempts(key, 1, 10*time.Second)
		w.setFaults(erpsim.Faults{})
		w.waitSaga(key, domain.SagaInvoiced, 10*time.Second)

		as := w.attemptsFor(key)
		if len(as) == 0 || as[0].Outcome != erpsim.OutcomeDropped || w.createsFor(key) != 1 {
			t.Fatalf("ledger for %s: %v, %d create(s); want a dropped create first and exactly one create", key, ledgerOutcomes(as), w.createsFor(key))
		}
		for _, a := range as[1:] {
			if a.Outcome != erpsim.OutcomeReplayed || a.Number != as[0].Number {
				t.Errorf("ledger for %s: %v; after the dropped create only replays of %s may follow", key, ledgerOutcomes(as), as[0].Number)
			}
		}
		t.Logf("ledger for the key: %v (%d attempt(s), 1 create)", ledgerOutcomes(as), len(as))
		checkLostResponseDeal(t, w, d.ID, key, as)
		checkInvariants(t, w.pool, w.sim)
	})
}

func checkLostResponseDeal(t *testing.T, w *world, dealID, key string, as []erpsim.Attempt) {
	t.Helper()
	deal, err := w.store.GetDeal(context.Background(), dealID)
	if err != nil {
		t.Fatal(err)
	}
	if deal.Status != domain.StatusInvoiced || deal.Invoice == nil || deal.Invoice.Number != as[0].Number || deal.Invoice.IdempotencyKey != key {
		t.Errorf("deal %s: status %s, invoice %+v; want invoiced with %s (the invoice whose answer was lost)", dealID, deal.Status, deal.Invoice, as[0].Number)
	}
	if ic := w.invoiceCreated(dealID); len(ic) != 1 {
		t.Errorf("%d InvoiceCreated events, want 1", len(ic))
	}
}

// The ERP is down for 2 s while 20 deals close. The circuit breaker
// (2 failures, 300 ms cool-down, doubling) pauses the sagas without spending
// their attempts, so only a handful of attempts fail in all, no saga is
// compensated even with MaxAttempts 4, and all 20 are invoiced after the
// ERP is back.
func TestERPDownBreakerSavesAttempts(t *testing.T) {
	const (
		deals     = 20
		window    = 2 * time.Second
		threshold = 2
		coolDown  = 300 * time.Millisecond
		consumers = 4
	)
	w := newWorld(t, erpsim.Faults{})
	w.startInProcess(pipelineConfig{
		Consumers: consumers,
		Retry:     domain.RetryPolicy{Initial: 100 * time.Millisecond, Max: 400 * time.Millisecond, MaxAttempts: 4},
		Breaker:   erp.BreakerConfig{FailureThreshold: threshold, CoolDown: coolDown},
	})
	const sku = "SKU-DOWN"
	w.setInventory(sku, 100)
	opened := make([]postgres.DealView, deals)
	for i := range opened {
		opened[i] = w.openDeal(fmt.Sprintf("C-DOWN-%02d", i), sku, 1)
	}

	downUntil := time.Now().Add(window)
	w.setFaults(erpsim.Faults{DownUntil: downUntil})
	keys := make([]string, deals)
	for i, d := range opened {
		keys[i] = w.closeWon(d)
	}
	if time.Now().After(downUntil) {
		t.Logf("note: closing took longer than the %v window", window)
	}
	for _, k := range keys {
		w.waitSaga(k, domain.SagaInvoiced, 20*time.Second)
	}

	// Failed attempts: the breaker lets `threshold` consecutive failures
	// through, plus the calls already in flight when it opened (at most
	// consumers-1), then one probe per cool-down; cool-downs double, so
	// probes during the window number at most n with
	// coolDown·(2^n − 1) ≥ window.
	probes := 0
	for sum, cd := time.Duration(0), coolDown; sum < window; cd *= 2 {
		sum += cd
		probes++
	}
	bound := threshold + consumers - 1 + probes
	var total, maxPerSaga, compensated int
	if err := w.pool.QueryRow(context.Background(), `SELECT coalesce(sum(attempts), 0), coalesce(max(attempts), 0),
		count(*) FILTER (WHERE state = 'compensated') FROM invoice_sagas`).Scan(&total, &maxPerSaga, &compensated); err != nil {
		t.Fatal(err)
	}
	var down int
	for _, a := range w.sim.Ledger().Attempts {
		if a.Outcome == erpsim.OutcomeDown {
			down++
		}
	}
	t.Logf("%d deals through a %v outage: %d failed attempts recorded in all (bound %d), at most %d per saga; %d creates answered 503 (lookups not counted)",
		deals, window, total, bound, maxPerSaga, down)
	if compensated != 0 {
		t.Errorf("%d saga(s) compensated, want none", compensated)
	}
	if total > bound || total >= deals {
		t.Errorf("%d failed attempts recorded in all, want at most %d (without the breaker every one of the %d sagas spends attempts)", total, bound, deals)
	}
	if maxPerSaga >= 4 {
		t.Errorf("a saga spent %d attempts", maxPerSaga)
	}
	if !strings.Contains(w.logs.String(), "erp circuit breaker open") {
		t.Error("the circuit breaker never opened")
	}
	checkInvariants(t, w.pool, w.sim)
}

// pipelineModes runs fn with the relay and handler in this process and as
// dealbridge subprocesses (cmd/app behind the CLI flags and the binary).
func pipelineModes(t *testing.T, fn func(t *testing.T, w *world, start func(pipelineConfig))) {
	t.Run("in-process", func(t *testing.T) {
		w := newWorld(t, erpsim.Faults{})
		fn(t, w, w.startInProcess)
	})
	t.Run("processes", func(t *testing.T) {
		w := newWorld(t, erpsim.Faults{})
		fn(t, w, func(c pipelineConfig) { w.startProcesses(c) })
	})
}

// F12, the work queue: an undecodable payload, an unknown message type and a
// request that breaks the schema are each dead-lettered (class poison) with
// an alert, while deals closed before and after them are invoiced.
func TestPoisonInWorkQueue(t *testing.T) {
	pipelineModes(t, func(t *testing.T, w *world, start func(pipelineConfig)) {
		start(pipelineConfig{})
		w.setInventory("SKU-P", 10)
		_, before := w.newWonDeal("C-BEFORE", "SKU-P", 1)

		pub, err := queue.NewPublisher(w.pool, queue.PublisherConfig{}, w.logger)
		if err != nil {
			t.Fatal(err)
		}
		fakeDeal := watermill.NewUUID()
		fakeKey := domain.IdempotencyKey(fakeDeal, 2)
		invalid, err := json.Marshal(domain.InvoiceRequest{
			DealID: fakeDeal, IdempotencyKey: fakeKey, CloseVersion: 2, Customer: domain.Customer{ID: "C-X", Name: "X"},
			Currency: "USD", Lines: []domain.Line{{SKU: "SKU-P", Description: "Widget", Quantity: 2, UnitPrice: "12.50"}}, Total: "999.00",
		})
		if err != nil {
			t.Fatal(err)
		}
		poison := []struct {
			name, typ string
			payload   []byte
			reason    string
		}{
			{"not JSON", outbox.TypeInvoiceRequest, []byte("this is {not json"), "cannot decode invoice request"},
			{"unknown type", "Nope", []byte(`{"deal_id":"x"}`), `unknown message type "Nope"`},
			{"schema-invalid", outbox.TypeInvoiceRequest, invalid, "total: is 999.00 but the lines add up to 25.00"},
		}
		uuids := map[string]int{}
		for i, p := range poison {
			m := message.NewMessage(watermill.NewUUID(), p.payload)
			m.Metadata.Set(outbox.MetadataType, p.typ)
			m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
			if p.name == "schema-invalid" {
				m.Metadata.Set(outbox.MetadataIdempotencyKey, fakeKey)
			}
			uuids[m.UUID] = i
			if err := pub.Publish(outbox.InvoiceTopic, m); err != nil {
				t.Fatal(err)
			}
		}
		_, after := w.newWonDeal("C-AFTER", "SKU-P", 1)
		w.waitSaga(before, domain.SagaInvoiced, 10*time.Second)
		w.waitSaga(after, domain.SagaInvoiced, 10*time.Second)

		var dls []postgres.DeadLetterView
		eventually(t, 10*time.Second, "3 dead letters", func() (bool, error) {
			page, err := w.store.ListDeadLetters(context.Background(), postgres.DeadLetterFilter{}, "", 100)
			dls = page.Items
			return err == nil && len(dls) >= len(poison), fmt.Errorf("%d dead letters (%v)", len(dls), err)
		})
		if len(dls) != len(poison) {
			t.Fatalf("%d dead letters, want %d", len(dls), len(poison))
		}
		seen := map[int]bool{}
		for _, dl := range dls {
			i, ok := uuids[dl.MessageUUID]
			if !ok || seen[i] {
				t.Errorf("dead letter %+v is not one of the poison messages (or twice)", dl)
				continue
			}
			seen[i] = true
			p := poison[i]
			if dl.ErrorClass != domain.ClassPoison || dl.State != "open" || dl.Attempts != 1 || !strings.Contains(dl.Reason, p.reason) ||
				dl.Topic != outbox.InvoiceTopic || dl.Handler != saga.HandlerName {
				t.Errorf("%s: dead letter %+v; want open, class poison, 1 attempt, reason with %q, topic %s, handler %s",
					p.name, dl, p.reason, outbox.InvoiceTopic, saga.HandlerName)
			}
			raw := dl.Payload
			if dl.PayloadText != nil {
				raw = []byte(*dl.PayloadText)
			}
			// A JSON payload may come back re-encoded (jsonb), so JSON is
			// compared as JSON; anything else byte for byte.
			if sameJSON(raw, p.payload) != nil && string(raw) != string(p.payload) {
				t.Errorf("%s: dead letter payload %q, want %q", p.name, raw, p.payload)
			}
			if p.name == "schema-invalid" && (nilStr(dl.DealID) != fakeDeal || nilStr(dl.IdempotencyKey) != fakeKey) {
				t.Errorf("%s: dead letter deal %s key %s, want %s %s", p.name, nilStr(dl.DealID), nilStr(dl.IdempotencyKey), fakeDeal, fakeKey)
			}
		}
		checkPoisonAlerts(t, w.store, dls)
		checkInvariants(t, w.pool, w.sim)
	})
}

// checkPoisonAlerts checks that there is one poison_message alert per dead
// letter, linked to it, and no other alert.
func checkPoisonAlerts(t *testing.T, store *postgres.Store, dls []postgres.DeadLetterView) {
	t.Helper()
	alerts, err := store.ListAlerts(context.Background(), "", 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(alerts) != len(dls) {
		t.Errorf("%d alerts, want %d (one per dead letter)", len(alerts), len(dls))
	}
	byDL := map[string]postgres.AlertView{}
	for _, a := range alerts {
		byDL[nilStr(a.DeadLetterID)] = a
	}
	for _, dl := range dls {
		a, ok := byDL[dl.ID]
		if !ok || a.Kind != domain.AlertKindPoison || a.State != "open" || !strings.Contains(a.Message, dl.Reason) {
			t.Errorf("dead letter %s: alert %+v; want an open poison_message alert quoting %q", dl.ID, a, dl.Reason)
		}
	}
}

// F12, the outbox: rows that are not forwarder envelopes are dead-lettered
// by the relay (in its own transaction) with an alert, and the relay moves
// on: deals closed before and after are relayed and invoiced.
func TestPoisonInOutbox(t *testing.T) {
	pipelineModes(t, func(t *testing.T, w *world, start func(pipelineConfig)) {
		w.setInventory("SKU-PO", 10)
		_, before := w.newWonDeal("C-BEFORE", "SKU-PO", 1)
		payloads := []string{`{"hello":"not an envelope"}`, `"just a JSON string"`}
		for _, p := range payloads {
			if _, err := w.pool.Exec(context.Background(), `INSERT INTO watermill_outbox (uuid, payload, metadata, transaction_id)
				VALUES ($1, $2::json, '{}'::json, pg_current_xact_id())`, watermill.NewUUID(), p); err != nil {
				t.Fatal(err)
			}
		}
		_, after := w.newWonDeal("C-AFTER", "SKU-PO", 1)
		start(pipelineConfig{})
		_, later := w.newWonDeal("C-LATER", "SKU-PO", 1)
		for _, k := range []string{before, after, later} {
			w.waitSaga(k, domain.SagaInvoiced, 15*time.Second)
		}
		var dls []postgres.DeadLetterView
		eventually(t, 10*time.Second, "2 dead letters", func() (bool, error) {
			page, err := w.store.ListDeadLetters(context.Background(), postgres.DeadLetterFilter{}, "", 100)
			dls = page.Items
			return err == nil && len(dls) >= len(payloads), fmt.Errorf("%d dead letters (%v)", len(dls), err)
		})
		if len(dls) != len(payloads) {
			t.Fatalf("%d dead letters, want %d", len(dls), len(payloads))
		}
		got := map[string]bool{}
		for _, dl := range dls {
			if dl.ErrorClass != domain.ClassPoison || dl.State != "open" || dl.Topic != outbox.Topic ||
				!strings.Contains(dl.Reason, "cannot unwrap message from an envelope") {
				t.Errorf("dead letter %+v: want open, class poison, topic %s, reason about the envelope", dl, outbox.Topic)
			}
			var v any
			if err := json.Unmarshal(dl.Payload, &v); err != nil {
				t.Errorf("dead letter payload %s: %v", dl.Payload, err)
			}
			b, _ := json.Marshal(v)
			got[string(b)] = true
		}
		for _, p := range payloads {
			var v any
			_ = json.Unmarshal([]byte(p), &v)
			b, _ := json.Marshal(v)
			if !got[string(b)] {
				t.Errorf("no dead letter holds the outbox payload %s", p)
			}
		}
		checkPoisonAlerts(t, w.store, dls)
		checkInvariants(t, w.pool, w.sim)
	})
}

// The operator's view from the command line: `dlq list --json` and
// `alerts list --json` (run as the dealbridge binary with DATABASE_URL set)
// print JSON arrays with the fields the dashboard and scripts rely on.
func TestDeadLetterAndAlertCLI(t *testing.T) {
	w := newWorld(t, erpsim.Faults{RejectCustomers: []string{"C-REJECTED"}})
	w.startInProcess(pipelineConfig{})
	w.setInventory("SKU-CLI", 10)
	d, key := w.newWonDeal("C-REJECTED", "SKU-CLI", 2)
	w.waitSaga(key, domain.SagaCompensated, 10*time.Second)
	// And a poison message, which has no deal.
	pub, err := queue.NewPublisher(w.pool, queue.PublisherConfig{}, w.logger)
	if err != nil {
		t.Fatal(err)
	}
	m := message.NewMessage(watermill.NewUUID(), []byte("garbage"))
	m.Metadata.Set(outbox.MetadataType, "Nope")
	if err := pub.Publish(outbox.InvoiceTopic, m); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "2 dead letters", func() (bool, error) {
		page, err := w.store.ListDeadLetters(context.Background(), postgres.DeadLetterFilter{}, "", 10)
		return err == nil && len(page.Items) == 2, err
	})
	checkInvariants(t, w.pool, w.sim)

	env := []string{"DATABASE_URL=" + w.dbURL}
	list := func(what string) []map[string]any {
		t.Helper()
		code, out, errOut := runProc(t, time.Minute, env, what, "list", "--json")
		if code != 0 {
			t.Fatalf("dealbridge %s list --json: exit %d\n%s", what, code, errOut)
		}
		var v []map[string]any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("dealbridge %s list --json printed no JSON array: %v\n%s", what, err, out)
		}
		return v
	}
	has := func(what string, obj map[string]any, fields ...string) {
		t.Helper()
		for _, f := range fields {
			if _, ok := obj[f]; !ok {
				t.Errorf("%s object %v has no %q", what, obj, f)
			}
		}
	}

	dls := list("dlq")
	if len(dls) != 2 {
		t.Fatalf("dlq list: %d objects, want 2: %v", len(dls), dls)
	}
	var comp, poison map[string]any
	for _, o := range dls {
		has("dlq", o, "id", "deal_id", "state", "error_class", "reason", "attempts")
		switch o["error_class"] {
		case string(domain.ErrorPermanent):
			comp = o
		case domain.ClassPoison:
			poison = o
		}
	}
	if comp == nil || comp["deal_id"] != d.ID || comp["state"] != "open" || comp["attempts"] != float64(1) ||
		!strings.Contains(fmt.Sprint(comp["reason"]), "unknown customer C-REJECTED") {
		t.Errorf("dlq list: compensation dead letter %v; want deal %s, open, 1 attempt, the ERP's reason", comp, d.ID)
	}
	if poison == nil || poison["deal_id"] != nil || poison["state"] != "open" || !strings.Contains(fmt.Sprint(poison["reason"]), `"Nope"`) {
		t.Errorf("dlq list: poison dead letter %v; want no deal, open, the reason", poison)
	}

	alerts := list("alerts")
	if len(alerts) != 2 {
		t.Fatalf("alerts list: %d objects, want 2: %v", len(alerts), alerts)
	}
	var found bool
	for _, o := range alerts {
		has("alerts", o, "id", "deal_id", "state", "message")
		if o["deal_id"] == d.ID {
			found = true
			if o["state"] != "open" || o["kind"] != domain.AlertKindInvoiceFailed || !strings.Contains(fmt.Sprint(o["message"]), "unknown customer C-REJECTED") ||
				o["dead_letter_id"] != comp["id"] {
				t.Errorf("alerts list: %v; want open invoice_failed with the ERP's message, linked to %v", o, comp["id"])
			}
		}
	}
	if !found {
		t.Errorf("alerts list has no alert for deal %s: %v", d.ID, alerts)
	}
}

// The alert webhook: with a URL and a secret configured, a compensation
// (here after a 422) produces exactly one signed POST whose body is the
// AlertRaised event.
func TestAlertWebhookOnCompensation(t *testing.T) {
	pipelineModes(t, func(t *testing.T, w *world, start func(pipelineConfig)) {
		const secret = "whsec-integration"
		type delivery struct {
			body   []byte
			header http.Header
			at     time.Time
		}
		var (
			mu    sync.Mutex
			posts []delivery
		)
		recv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			mu.Lock()
			posts = append(posts, delivery{body: b, header: r.Header.Clone(), at: time.Now()})
			mu.Unlock()
			rw.WriteHeader(http.StatusNoContent)
		}))
		t.Cleanup(recv.Close)
		received := func() []delivery {
			mu.Lock()
			defer mu.Unlock()
			return append([]delivery(nil), posts...)
		}

		w.setFaults(erpsim.Faults{RejectCustomers: []string{"C-REJECTED"}})
		start(pipelineConfig{AlertWebhookURL: recv.URL + "/alerts", AlertWebhookSecret: secret})
		w.setInventory("SKU-WH", 10)
		_, okKey := w.newWonDeal("C-OK", "SKU-WH", 1)
		d, key := w.newWonDeal("C-REJECTED", "SKU-WH", 1)
		w.waitSaga(key, domain.SagaCompensated, 10*time.Second)
		w.waitSaga(okKey, domain.SagaInvoiced, 10*time.Second)
		eventually(t, 10*time.Second, "a webhook POST", func() (bool, error) { return len(received()) > 0, nil })
		checkInvariants(t, w.pool, w.sim)  // drains the alert topic too
		time.Sleep(200 * time.Millisecond) // a duplicate would have arrived by now

		ps := received()
		if len(ps) != 1 {
			t.Fatalf("%d webhook POSTs, want exactly 1", len(ps))
		}
		p := ps[0]
		if err := webhook.Verify([]byte(secret), p.body, p.header.Get(webhook.SignatureHeader), time.Now(), 5*time.Minute); err != nil {
			t.Errorf("webhook signature %q does not verify: %v", p.header.Get(webhook.SignatureHeader), err)
		}
		if err := webhook.Verify([]byte("another secret"), p.body, p.header.Get(webhook.SignatureHeader), time.Now(), 5*time.Minute); err == nil {
			t.Error("the signature verifies with another secret too")
		}
		if p.header.Get("Content-Type") != "application/json" || p.header.Get("Idempotency-Key") == "" {
			t.Errorf("webhook headers %v: want JSON and an Idempotency-Key", p.header)
		}
		al := onlyAlertOf(t, w.store, d.ID)
		evs := eventsOf[json.RawMessage](t, w.pool, domain.AlertStream(al.ID), domain.TypeAlertRaised)
		if len(evs) != 1 {
			t.Fatalf("%d AlertRaised events for alert %s, want 1", len(evs), al.ID)
		}
		var got, want map[string]any
		if err := json.Unmarshal(p.body, &got); err != nil {
			t.Fatalf("webhook body %s: %v", p.body, err)
		}
		if err := json.Unmarshal(evs[0], &want); err != nil {
			t.Fatal(err)
		}
		gb, _ := json.Marshal(got)
		wb, _ := json.Marshal(want)
		if string(gb) != string(wb) {
			t.Errorf("webhook body %s\nwant the AlertRaised event %s", gb, wb)
		}
		if got["alert_id"] != al.ID || got["kind"] != domain.AlertKindInvoiceFailed || got["deal_id"] != d.ID || got["idempotency_key"] != key {
			t.Errorf("webhook body %s: want alert %s (invoice_failed) for deal %s key %s", p.body, al.ID, d.ID, key)
		}
	})
}

func onlyDeadLetterOf(t *testing.T, store *postgres.Store, dealID string) postgres.DeadLetterView {
	t.Helper()
	page, err := store.ListDeadLetters(context.Background(), postgres.DeadLetterFilter{}, "", 1000)
	if err != nil {
		t.Fatal(err)
	}
	dls := page.Items
	var out []postgres.DeadLetterView
	for _, d := range dls {
		if nilStr(d.DealID) == dealID {
			out = append(out, d)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%d dead letters for deal %s, want 1: %+v", len(out), dealID, out)
	}
	return out[0]
}

func onlyAlertOf(t *testing.T, store *postgres.Store, dealID string) postgres.AlertView {
	t.Helper()
	as, err := store.ListAlerts(context.Background(), "", 1000)
	if err != nil {
		t.Fatal(err)
	}
	var out []postgres.AlertView
	for _, a := range as {
		if nilStr(a.DealID) == dealID {
			out = append(out, a)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%d alerts for deal %s, want 1: %+v", len(out), dealID, out)
	}
	return out[0]
}

// sameJSON reports nil when a and b are JSON documents with equal values.
func sameJSON(a, b []byte) error {
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		return err
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		return err
	}
	ja, _ := json.Marshal(va)
	jb, _ := json.Marshal(vb)
	if string(ja) != string(jb) {
		return fmt.Errorf("%s != %s", ja, jb)
	}
	return nil
}

// A Retry-After is kept by the saga, not only by the queue row: a delivery
// that comes before the next_attempt_at of a rate-limited attempt (the
// handler crashed between recording the failure and nacking, so the message
// returned at lease expiry; or the nack itself failed) is put back until
// then.
func TestEarlyRedeliveryWaitsForTheSchedule(t *testing.T) {
	w := newWorld(t, erpsim.Faults{RateLimitRate: 1, RetryAfterSeconds: 2})
	w.startInProcess(pipelineConfig{Retry: domain.RetryPolicy{Initial: 50 * time.Millisecond, Max: 50 * time.Millisecond, MaxAttempts: 6}})
	w.setInventory("SKU-EARLY", 10)
	d, key := w.newWonDeal("C-EARLY", "SKU-EARLY", 1)

	var sg postgres.SagaView
	eventually(t, 10*time.Second, "the failure recorded and the message parked", func() (bool, error) {
		sg = w.saga(key)
		var parked bool
		err := w.pool.QueryRow(context.Background(), `SELECT lease_until IS NULL AND available_at > now() FROM work_queue
			WHERE topic = $1 AND metadata->>$2 = $3`, outbox.InvoiceTopic, outbox.MetadataIdempotencyKey, key).Scan(&parked)
		return sg.Attempts == 1 && sg.NextAttemptAt != nil && err == nil && parked, fmt.Errorf("saga %+v, parked %v (%v)", sg, parked, err)
	})
	w.setFaults(erpsim.Faults{})
	// What a lost nack looks like: the message is available at once.
	if _, err := w.pool.Exec(context.Background(), `UPDATE work_queue SET available_at = now() WHERE topic = $1 AND metadata->>$2 = $3`,
		outbox.InvoiceTopic, outbox.MetadataIdempotencyKey, key); err != nil {
		t.Fatal(err)
	}
	w.waitSaga(key, domain.SagaInvoiced, 10*time.Second)

	as := w.attemptsFor(key)
	if len(as) != 2 || as[1].Outcome != erpsim.OutcomeCreated {
		t.Fatalf("ledger for %s: %v; want the 429, then one create", key, ledgerOutcomes(as))
	}
	if early := sg.NextAttemptAt.Sub(as[1].Time); early > clockSlack {
		t.Errorf("the retry reached the ERP %v before its scheduled time %v (Retry-After 2s ignored)", early, *sg.NextAttemptAt)
	}
	if ic := w.invoiceCreated(d.ID); len(ic) != 1 || ic[0].Attempts != 2 {
		t.Errorf("InvoiceCreated %+v, want one with attempts 2", ic)
	}
	checkInvariants(t, w.pool, w.sim)
}
