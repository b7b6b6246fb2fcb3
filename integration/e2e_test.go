package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

// TestEndToEndProcesses runs every dealbridge process as its own OS process
// on one database — erp-sim, api, relay and two handlers — closes 200 deals
// concurrently through the API and checks that each became exactly one ERP
// invoice with the right key and amount.
func TestEndToEndProcesses(t *testing.T) {
	const (
		deals        = 200
		closeWorkers = 16
		sku          = "E2E-1"
		stock        = 1000
	)
	dbURL := pgtest.NewDatabase(t)
	dbEnv := []string{"DATABASE_URL=" + dbURL}

	// pgtest migrated the database; `migrate status` must see that.
	code, out, errOut := runProc(t, time.Minute, dbEnv, "migrate", "status")
	if code != 0 {
		t.Fatalf("migrate status: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	statusLines := strings.Split(strings.TrimSpace(out), "\n")
	if len(statusLines) < 4 || strings.Contains(out, "pending") {
		t.Fatalf("migrate status: want every migration applied, got:\n%s", out)
	}

	simAddr, apiAddr := freeAddr(t), freeAddr(t)
	simURL, apiURL := "http://"+simAddr, "http://"+apiAddr
	sim := startProc(t, "erp-sim", nil, "erp-sim", "--listen", simAddr, "--store", filepath.Join(t.TempDir(), "erp.jsonl"))
	api := startProc(t, "api", dbEnv, "api", "--listen", apiAddr)
	relay := startProc(t, "relay", dbEnv, "relay")
	handlers := []*proc{
		startProc(t, "handler-1", dbEnv, "handler", "--erp-url", simURL),
		startProc(t, "handler-2", dbEnv, "handler", "--erp-url", simURL),
	}
	all := append([]*proc{sim, api, relay}, handlers...)
	sim.waitHealthy(simURL, 30*time.Second)
	api.waitHealthy(apiURL, 30*time.Second)
	relay.waitStderr("relay running", 30*time.Second)
	for _, h := range handlers {
		h.waitStderr("handler running", 30*time.Second)
	}

	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)

	crm, erp := newClient(apiURL), newClient(simURL)
	if _, err := crm.setInventory(sku, stock); err != nil {
		t.Fatal(err)
	}

	// Open the deals: quantities 1..4, so 500 units in all; every fourth
	// deal has a second line of the same SKU at another price.
	created := make([]dealJSON, deals)
	var wantQty int64
	reqs := make([]createDealJSON, deals)
	for i := range reqs {
		q := int64(1 + i%4)
		reqs[i] = createDealJSON{
			Customer: customerJSON{ID: fmt.Sprintf("C-%03d", i), Name: fmt.Sprintf("Customer %d", i)},
			Currency: "USD",
			Lines:    []lineJSON{{SKU: sku, Description: "Widget", Quantity: q, UnitPrice: fmt.Sprintf("%d.%02d", 10+i, i%100)}},
		}
		wantQty += q
		if i%4 == 0 {
			reqs[i].Lines = append(reqs[i].Lines, lineJSON{SKU: sku, Description: "Spare", Quantity: 1, UnitPrice: "0.99"})
			wantQty++
		}
	}
	parallel(t, 8, deals, func(i int) error {
		d, err := crm.createDeal(reqs[i])
		if err != nil {
			return err
		}
		if d.Status != "open" || d.ID == "" || d.Version < 1 {
			return fmt.Errorf("created deal %+v: want an id, status open and a version", d)
		}
		created[i] = d
		return nil
	})

	// Close them all at once.
	start := time.Now()
	parallel(t, closeWorkers, deals, func(i int) error {
		d, err := crm.closeDeal(created[i].ID)
		if err != nil {
			return err
		}
		if d.Status != "won" && d.Status != "invoiced" {
			return fmt.Errorf("deal %s after close: status %q, want won (or already invoiced)", d.ID, d.Status)
		}
		return nil
	})
	closed := time.Since(start)

	// Wait until every deal is invoiced, failing early if a process dies.
	ctx := context.Background()
	var invoiced int
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM deals WHERE status = 'invoiced'`).Scan(&invoiced); err != nil {
			t.Fatal(err)
		}
		if invoiced == deals {
			break
		}
		for _, p := range all {
			if p.exited() {
				t.Fatalf("%s exited (status %d) with %d of %d deals invoiced", p.name, p.exitCode(), invoiced, deals)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d deals invoiced after 60s", invoiced, deals)
		}
		time.Sleep(50 * time.Millisecond)
	}
	var lastInvoiced time.Time
	if err := pool.QueryRow(ctx, `SELECT max(recorded_at) FROM events WHERE type = 'InvoiceCreated'`).Scan(&lastInvoiced); err != nil {
		t.Fatal(err)
	}
	took := lastInvoiced.Sub(start)
	t.Logf("%d deals: closes took %v (%.0f closes/s); first close to last invoiced %v: %.0f deals/s end to end (race detector: %v)",
		deals, closed.Round(time.Millisecond), float64(deals)/closed.Seconds(), took.Round(time.Millisecond), float64(deals)/took.Seconds(), raceEnabled)

	// The deals as the API shows them.
	byID := map[string]dealJSON{}
	for _, c := range created {
		d, err := crm.deal(c.ID)
		if err != nil {
			t.Fatal(err)
		}
		if d.Status != "invoiced" || d.Invoice == nil || d.Invoice.Number == "" || d.Invoice.IdempotencyKey == "" {
			t.Fatalf("deal %s: status %q, invoice %+v; want invoiced with a number and a key", d.ID, d.Status, d.Invoice)
		}
		if want := expectedTotal(t, d.Lines); d.Total != want {
			t.Errorf("deal %s: total %s, want %s", d.ID, d.Total, want)
		}
		var types []string
		for _, e := range d.Events {
			types = append(types, e.Type)
		}
		if got := strings.Join(types, ","); !strings.Contains(got, "DealWon") || strings.Count(got, "InvoiceCreated") != 1 {
			t.Errorf("deal %s events %s: want DealWon and one InvoiceCreated", d.ID, got)
		}
		byID[d.ID] = d
	}

	// The simulator holds exactly one invoice per deal, under its key.
	invs, err := erp.invoices("")
	if err != nil {
		t.Fatal(err)
	}
	if len(invs) != deals {
		t.Errorf("simulator holds %d invoices, want %d", len(invs), deals)
	}
	seen := map[string]bool{}
	for _, inv := range invs {
		d, ok := byID[inv.Reference]
		switch {
		case !ok:
			t.Errorf("invoice %s references %q, which is no deal of this test", inv.Number, inv.Reference)
			continue
		case seen[inv.Reference]:
			t.Errorf("deal %s invoiced more than once (again as %s)", inv.Reference, inv.Number)
			continue
		}
		seen[inv.Reference] = true
		if inv.IdempotencyKey != d.Invoice.IdempotencyKey || inv.Number != d.Invoice.Number {
			t.Errorf("deal %s: simulator has invoice %s key %s, deal records %s key %s",
				d.ID, inv.Number, inv.IdempotencyKey, d.Invoice.Number, d.Invoice.IdempotencyKey)
		}
		if inv.Total != d.Total || inv.Currency != d.Currency || inv.CustomerID != d.Customer.ID {
			t.Errorf("deal %s (%s %s, customer %s): invoice %s is %s %s for customer %s",
				d.ID, d.Total, d.Currency, d.Customer.ID, inv.Number, inv.Total, inv.Currency, inv.CustomerID)
		}
	}
	stats, err := erp.simStats()
	if err != nil {
		t.Fatal(err)
	}
	if stats.Creates != deals || stats.Keys != deals || stats.MaxCreatesPerKey != 1 {
		t.Errorf("simulator stats %+v: want %d creates, %d keys, at most 1 create per key", stats, deals, deals)
	}
	t.Logf("simulator: %d attempts %v", stats.Attempts, stats.AttemptsByOutcome)

	inv, err := crm.inventory(sku)
	if err != nil {
		t.Fatal(err)
	}
	if inv.Available != stock-wantQty || inv.Allocated != wantQty {
		t.Errorf("inventory %s: available %d allocated %d, want %d and %d", sku, inv.Available, inv.Allocated, stock-wantQty, wantQty)
	}

	checkInvariantI4(t, pool, deals)

	// Both handler processes took part.
	for _, h := range handlers {
		n := strings.Count(h.stderr.String(), `msg="deal invoiced"`)
		t.Logf("%s invoiced %d deals", h.name, n)
		if n == 0 {
			t.Errorf("%s invoiced no deal: the handlers do not share the work", h.name)
		}
	}

	// Every process shuts down cleanly on SIGTERM (exit 0).
	for _, p := range all {
		if code := p.stop(stopTimeout); code != 0 {
			t.Errorf("%s: exit status %d after SIGTERM, want 0", p.name, code)
		}
	}
}

// parallel runs fn(0..n-1) on workers goroutines and fails the test with
// the errors (at most a few are shown).
func parallel(t testing.TB, workers, n int, fn func(i int) error) {
	t.Helper()
	var (
		mu   sync.Mutex
		errs []error
		next = make(chan int)
		wg   sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			for i := range next {
				if err := fn(i); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if len(errs) > 0 {
		for _, err := range errs[:min(len(errs), 5)] {
			t.Error(err)
		}
		t.Fatalf("%d of %d calls failed", len(errs), n)
	}
}
