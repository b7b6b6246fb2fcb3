package integration

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// A durable retry survives SIGKILL of the handler: the ERP refuses the
// first create (429, Retry-After 3 s, so that the next attempt is due a
// known 3 s later), the failure is recorded and the message parked in the
// work queue until then; the handler is killed, the ERP heals and a new
// handler process takes over. The retry runs no earlier than the recorded
// next_attempt_at, and the invoice records 2 attempts: the count survived
// the crash.
//
// Every process is the real dealbridge binary: erp-sim, relay, handler.
func TestHandlerKilledDuringBackoff(t *testing.T) {
	dbURL := pgtest.NewDatabase(t)
	dbEnv := []string{"DATABASE_URL=" + dbURL}
	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store := postgres.NewStore(pool)
	ctx := context.Background()

	simAddr := freeAddr(t)
	simURL := "http://" + simAddr
	sim := startProc(t, "erp-sim", nil, "erp-sim", "--listen", simAddr, "--store", filepath.Join(t.TempDir(), "erp.jsonl"))
	sim.waitHealthy(simURL, 30*time.Second)
	erpView := remoteSim{t: t, base: simURL}
	putFaults(t, simURL, `{"rate_limit_rate": 1, "retry_after_seconds": 3}`)

	relay := startProc(t, "relay", dbEnv, "relay", "--relay-poll-interval", "50ms")
	handlerArgs := []string{"handler", "--erp-url", simURL, "--erp-timeout", "2s", "--consumers", "2",
		"--queue-poll-interval", "50ms", "--retry-initial", "3s", "--retry-max", "3s", "--max-attempts", "5"}
	h1 := startProc(t, "handler-1", dbEnv, handlerArgs...)
	relay.waitStderr("relay running", 30*time.Second)
	h1.waitStderr("handler running", 30*time.Second)

	if _, err := store.SetInventory(ctx, "SKU-KILL", 5, testMeta); err != nil {
		t.Fatal(err)
	}
	d, err := store.CreateDeal(ctx, domain.Customer{ID: "C-KILL", Name: "Kill Corp"}, "USD",
		[]domain.Line{{SKU: "SKU-KILL", Description: "Widget", Quantity: 2, UnitPrice: "12.50"}}, testMeta)
	if err != nil {
		t.Fatal(err)
	}
	d, err = store.CloseDeal(ctx, d.ID, domain.OutcomeWon, &d.Version, testMeta)
	if err != nil {
		t.Fatal(err)
	}
	key := *d.IdempotencyKey

	// Wait until the first attempt has failed, its failure is recorded with
	// a future next_attempt_at, and the queue row is parked (nacked: no
	// lease, available later).
	var sg postgres.SagaView
	h1.waitFor(15*time.Second, "a recorded failure and a parked message", func() (bool, error) {
		v, ok, err := store.Saga(ctx, key)
		if err != nil || !ok {
			return false, fmt.Errorf("saga: %v %v", ok, err)
		}
		sg = v
		if v.Attempts != 1 || v.NextAttemptAt == nil {
			return false, fmt.Errorf("saga %s attempts %d", v.State, v.Attempts)
		}
		var parked bool
		err = pool.QueryRow(ctx, `SELECT lease_until IS NULL AND available_at > now() AND attempts = 1 FROM work_queue
			WHERE topic = $1 AND metadata->>$2 = $3`, outbox.InvoiceTopic, outbox.MetadataIdempotencyKey, key).Scan(&parked)
		return err == nil && parked, fmt.Errorf("queue row parked: %v (%v)", parked, err)
	})
	next := *sg.NextAttemptAt
	if left := time.Until(next); left < 500*time.Millisecond {
		t.Fatalf("next attempt due in %v; the test needs the handler killed well before", left)
	}
	if as := attemptsOf(erpView.Ledger(), key); len(as) != 1 || as[0].Status != http.StatusTooManyRequests {
		t.Fatalf("ledger before the kill: %v, want one 429", ledgerOutcomes(as))
	}

	h1.kill()
	t.Logf("handler-1 SIGKILLed %v before the retry was due", time.Until(next).Round(time.Millisecond))
	putFaults(t, simURL, `{}`)
	h2 := startProc(t, "handler-2", dbEnv, handlerArgs...)
	h2.waitStderr("handler running", 30*time.Second)

	h2.waitFor(20*time.Second, "the deal invoiced", func() (bool, error) {
		v, _, err := store.Saga(ctx, key)
		return err == nil && v.State == domain.SagaInvoiced, fmt.Errorf("saga %s, attempts %d (%v)", v.State, v.Attempts, err)
	})

	as := attemptsOf(erpView.Ledger(), key)
	if len(as) != 2 || as[1].Outcome != erpsim.OutcomeCreated {
		t.Fatalf("ledger for %s: %v; want the 429, then one create", key, ledgerOutcomes(as))
	}
	// The sim and Postgres run on this machine's clock; allow for rounding.
	const slack = 20 * time.Millisecond
	if early := next.Sub(as[1].Time); early > slack {
		t.Errorf("the retry reached the ERP at %v, %v before the scheduled %v", as[1].Time, early, next)
	}
	t.Logf("retry scheduled for %v, reached the ERP %v after it", next.Format("15:04:05.000"), as[1].Time.Sub(next).Round(time.Millisecond))
	ic := eventsOf[domain.InvoiceCreated](t, pool, domain.DealStream(d.ID), domain.TypeInvoiceCreated)
	if len(ic) != 1 || ic[0].Attempts != 2 || ic[0].InvoiceNumber != as[1].Number {
		t.Errorf("InvoiceCreated %+v, want one with attempts 2 and number %s", ic, as[1].Number)
	}
	if v, _, _ := store.Saga(ctx, key); v.Attempts != 1 || nilStr(v.InvoiceNumber) != as[1].Number {
		t.Errorf("saga %+v: want 1 failed attempt and invoice %s", v, as[1].Number)
	}
	checkInvariants(t, pool, erpView)
}

func attemptsOf(l erpsim.Ledger, key string) []erpsim.Attempt {
	var out []erpsim.Attempt
	for _, a := range l.Attempts {
		if a.Key == key {
			out = append(out, a)
		}
	}
	return out
}

// putFaults replaces the fault plan of the erp-sim at base.
func putFaults(t testing.TB, base, plan string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, base+"/_sim/faults", bytes.NewReader([]byte(plan)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT /_sim/faults %s: %s", plan, resp.Status)
	}
}
