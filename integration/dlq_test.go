package integration

// Dead-letter operations end to end: a 422 fixed from the command line and
// re-injected through real processes; two concurrent re-injects of one
// entry (over HTTP and through the store) with the saga running, ending in
// one ERP invoice; a bulk re-inject of 1,000 entries interrupted (SIGTERM),
// killed (SIGKILL) and resumed, re-injecting each entry exactly once.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

var dlqMeta = domain.Metadata{Actor: "dlq-test"}

// dlqOneLine checks that a failed command printed exactly one line on
// stderr and nothing on stdout, and returns the line.
func dlqOneLine(t *testing.T, what string, code int, stdout, stderr string) string {
	t.Helper()
	if code == 0 {
		t.Fatalf("%s: exit 0, want a failure\nstdout: %s", what, stdout)
	}
	line := strings.TrimSuffix(stderr, "\n")
	if line == "" || strings.Contains(line, "\n") || strings.TrimSpace(stdout) != "" {
		t.Fatalf("%s: exit %d; want one line on stderr and nothing on stdout, got stderr %q, stdout %q", what, code, stderr, stdout)
	}
	return line
}

// dlqShowJSON is `dlq show ID --json` as a script reads it.
type dlqShowJSON struct {
	ID             string          `json:"id"`
	State          string          `json:"state"`
	DealID         *string         `json:"deal_id"`
	IdempotencyKey *string         `json:"idempotency_key"`
	Payload        json.RawMessage `json:"payload"`
	Reason         string          `json:"reason"`
	ErrorClass     string          `json:"error_class"`
	Attempts       int             `json:"attempts"`
	Revision       int             `json:"revision"`
	Reinjects      int             `json:"reinjects"`
	Revisions      []struct {
		Revision int             `json:"revision"`
		Actor    string          `json:"actor"`
		Reason   string          `json:"reason"`
		Patch    json.RawMessage `json:"patch"`
		Payload  json.RawMessage `json:"payload"`
	} `json:"revisions"`
	History []struct {
		Type string `json:"type"`
	} `json:"history"`
}

// TestDeadLetterFixedFromTheCommandLine: the ERP rejects customer C-9 (422);
// the deal is compensated and dead-lettered; an operator looks at it with
// `dlq show --json`, fixes the customer with `dlq edit` and re-injects it
// with `dlq reinject`; the running relay and handler invoice it. Every
// process is the real binary; the CLI gets only DATABASE_URL.
func TestDeadLetterFixedFromTheCommandLine(t *testing.T) {
	const sku = "DLQ-E2E"
	dbURL := pgtest.NewDatabase(t)
	dbEnv := []string{"DATABASE_URL=" + dbURL}
	simAddr, apiAddr := freeAddr(t), freeAddr(t)
	simURL, apiURL := "http://"+simAddr, "http://"+apiAddr
	sim := startProc(t, "erp-sim", nil, "erp-sim", "--listen", simAddr, "--reject-customer", "C-9")
	api := startProc(t, "api", dbEnv, "api", "--listen", apiAddr)
	// Default poll intervals (the handler is woken by NOTIFY): under -race on
	// two cores, busy pollers starve the CLI processes of the test.
	relay := startProc(t, "relay", dbEnv, "relay")
	handler := startProc(t, "handler", dbEnv, "handler", "--erp-url", simURL,
		"--retry-initial", "100ms", "--retry-max", "200ms", "--max-attempts", "3")
	sim.waitHealthy(simURL, 30*time.Second)
	api.waitHealthy(apiURL, 30*time.Second)
	relay.waitStderr("relay running", 30*time.Second)
	handler.waitStderr("handler running", 30*time.Second)

	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	crm, erp := newClient(apiURL), newClient(simURL)
	if _, err := crm.setInventory(sku, 10); err != nil {
		t.Fatal(err)
	}
	d, err := crm.createDeal(createDealJSON{Customer: customerJSON{ID: "C-9", Name: "Globex"}, Currency: "USD",
		Lines: []lineJSON{{SKU: sku, Description: "Widget", Quantity: 2, UnitPrice: "495.00"}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := crm.closeDeal(d.ID); err != nil {
		t.Fatal(err)
	}
	handler.waitFor(60*time.Second, "deal reverted after the 422", func() (bool, error) {
		got, err := crm.deal(d.ID)
		return err == nil && got.Status == "reverted", fmt.Errorf("status %s: %v", got.Status, err)
	})
	if inv, _ := crm.inventory(sku); inv.Available != 10 || inv.Allocated != 0 {
		t.Fatalf("inventory after compensation: %+v, want all released", inv)
	}

	cli := func(args ...string) (int, string, string) {
		t.Helper()
		return runProc(t, time.Minute, dbEnv, args...)
	}
	fails := func(what string, args ...string) string {
		t.Helper()
		code, out, errOut := cli(args...)
		return dlqOneLine(t, what, code, out, errOut)
	}
	code, out, errOut := cli("dlq", "list", "--deal", d.ID, "--json")
	var listed []dlqShowJSON
	if code != 0 || json.Unmarshal([]byte(out), &listed) != nil || len(listed) != 1 {
		t.Fatalf("dlq list --deal: exit %d\n%s\n%s", code, out, errOut)
	}
	id := listed[0].ID
	show := func() dlqShowJSON {
		t.Helper()
		code, out, errOut := cli("dlq", "show", id, "--json")
		var v dlqShowJSON
		if code != 0 {
			t.Fatalf("dlq show --json: exit %d\n%s", code, errOut)
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("dlq show --json printed no JSON object: %v\n%s", err, out)
		}
		return v
	}
	v := show()
	var req domain.InvoiceRequest
	if err := json.Unmarshal(v.Payload, &req); err != nil {
		t.Fatalf("payload %s: %v", v.Payload, err)
	}
	key := d.ID + ":2"
	if v.State != "open" || v.ErrorClass != "permanent" || !strings.Contains(v.Reason, "unknown customer C-9") || v.Attempts != 1 ||
		req.Customer.ID != "C-9" || req.IdempotencyKey != key || len(v.Revisions) != 1 || v.IdempotencyKey == nil || *v.IdempotencyKey != key {
		t.Fatalf("dlq show: %+v, payload %+v", v, req)
	}

	dir := t.TempDir()
	write := func(name string, r domain.InvoiceRequest) string {
		t.Helper()
		b, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fixed := req
	fixed.Customer.ID = "C-1"
	fixedFile := write("fixed.json", fixed)
	badTotal := fixed
	badTotal.Total = "1.00"
	badFile := write("bad-total.json", badTotal)

	// Refusals: a non-zero exit and one line; nothing changes.
	line := fails("show of an unknown id", "dlq", "show", watermill.NewUUID(), "--json")
	if !strings.Contains(line, "not found") {
		t.Errorf("unknown id: %q", line)
	}
	line = fails("edit without --reason", "dlq", "edit", id, "--payload-file", fixedFile, "--actor", "alice")
	if !strings.Contains(line, "--reason") {
		t.Errorf("edit without --reason: %q", line)
	}
	line = fails("edit with a wrong total", "dlq", "edit", id, "--payload-file", badFile, "--reason", "fix", "--actor", "alice")
	if !strings.Contains(line, "total") || !strings.Contains(line, "990.00") {
		t.Errorf("wrong total: %q, want the field named", line)
	}
	var revision, events int
	if err := pool.QueryRow(context.Background(), `SELECT (SELECT revision FROM dead_letters WHERE id = $1),
		(SELECT count(*) FROM events WHERE stream_id = $2)`, id, domain.DeadLetterStream(id)).Scan(&revision, &events); err != nil {
		t.Fatal(err)
	}
	if revision != 0 || events != 1 {
		t.Fatalf("refused edits wrote: revision %d, %d events on the entry's stream", revision, events)
	}

	// The fix.
	code, out, errOut = cli("dlq", "edit", id, "--payload-file", fixedFile, "--reason", "customer C-9 is C-1 in the ERP", "--actor", "alice")
	if code != 0 || !strings.Contains(out, "revision 1") {
		t.Fatalf("dlq edit: exit %d\n%s\n%s", code, out, errOut)
	}
	code, out, errOut = cli("dlq", "reinject", id, "--reason", "customer fixed", "--actor", "bob")
	if code != 0 || !strings.Contains(out, key) {
		t.Fatalf("dlq reinject: exit %d\n%s\n%s", code, out, errOut)
	}
	handler.waitFor(60*time.Second, "deal invoiced after the re-inject", func() (bool, error) {
		got, err := crm.deal(d.ID)
		return err == nil && got.Status == "invoiced", fmt.Errorf("status %s: %v", got.Status, err)
	})
	got, err := crm.deal(d.ID)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, e := range got.Events {
		types = append(types, e.Type)
	}
	if want := []string{"DealCreated", "DealWon", "DealReverted", "DealReinstated", "InvoiceCreated"}; !slices.Equal(types, want) {
		t.Fatalf("deal history %v, want %v", types, want)
	}
	if got.Invoice == nil || got.Invoice.IdempotencyKey != key {
		t.Fatalf("deal invoice %+v, want key %s", got.Invoice, key)
	}
	if inv, _ := crm.inventory(sku); inv.Available != 8 || inv.Allocated != 2 {
		t.Fatalf("inventory after the re-inject: %+v, want 2 allocated again", inv)
	}
	invs, err := erp.invoices("?reference=" + d.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(invs) != 1 || invs[0].CustomerID != "C-1" || invs[0].IdempotencyKey != key || invs[0].Number != got.Invoice.Number || invs[0].Total != "990.00" {
		t.Fatalf("ERP invoices for the deal: %+v, want exactly one for C-1 with key %s", invs, key)
	}
	// The entry and its alert are resolved (in the invoice's transaction).
	v = show()
	if v.State != "resolved" {
		t.Fatalf("entry after the invoice: %s, want resolved", v.State)
	}
	if len(v.Revisions) != 2 || v.Revisions[1].Actor != "alice" || !strings.Contains(string(v.Revisions[1].Patch), "/customer/id") || v.Reinjects != 1 {
		t.Fatalf("resolved entry: %+v", v)
	}
	var alerts, resolved int
	if err := pool.QueryRow(context.Background(), `SELECT count(*), count(*) FILTER (WHERE state = 'resolved') FROM alerts
		WHERE dead_letter_id = $1`, id).Scan(&alerts, &resolved); err != nil {
		t.Fatal(err)
	}
	if alerts != 1 || resolved != 1 {
		t.Fatalf("%d alerts of the entry, %d resolved; want its one alert resolved", alerts, resolved)
	}
	// A resolved entry cannot be re-injected again.
	line = fails("reinject of a resolved entry", "dlq", "reinject", id, "--reason", "again", "--actor", "bob")
	if !strings.Contains(line, "resolved") || !strings.Contains(line, id) {
		t.Errorf("reinject of a resolved entry: %q", line)
	}
	// The audit log names both operators.
	code, out, errOut = cli("audit", "list", "--target-id", id, "--json")
	var rows []postgres.AuditEntry
	if code != 0 || json.Unmarshal([]byte(out), &rows) != nil {
		t.Fatalf("audit list: exit %d\n%s\n%s", code, out, errOut)
	}
	var who []string
	for _, r := range rows {
		who = append(who, r.Actor+" "+r.Action)
	}
	if want := []string{"bob dead_letter.reinject", "alice dead_letter.edit"}; !slices.Equal(who, want) {
		t.Fatalf("audit of the entry: %v, want %v (newest first)", who, want)
	}
	if rows[1].Reason != "customer C-9 is C-1 in the ERP" || len(rows[1].Diff) == 0 || rows[0].Reason != "customer fixed" {
		t.Fatalf("audit rows: %+v", rows)
	}
}

// dlqPipeline runs the relay and the invoice handler in this process
// (app.RunRelay and app.RunHandler, the wiring of the real processes) until
// the test ends.
func dlqPipeline(t *testing.T, pool *pgxpool.Pool, erpURL string, logger *slog.Logger) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() { errs <- app.RunRelay(ctx, pool, app.RelayConfig{PollInterval: 50 * time.Millisecond}, logger) })
	wg.Go(func() {
		errs <- app.RunHandler(ctx, pool, app.HandlerConfig{ERPURL: erpURL, ERPTimeout: 2 * time.Second, Consumers: 4,
			PollInterval: 50 * time.Millisecond, Retry: domain.RetryPolicy{Initial: 100 * time.Millisecond, Max: 300 * time.Millisecond, MaxAttempts: 4}}, logger)
	})
	t.Cleanup(func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(stopTimeout):
			t.Errorf("relay/handler still running %v after cancel", stopTimeout)
			return
		}
		close(errs)
		for err := range errs {
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("relay/handler: %v", err)
			}
		}
	})
}

// TestDoubleReinjectOneInvoice: for each entry two re-injects race — over
// HTTP (two operators' API tokens) for some entries, straight through the
// store for the others — while the relay and the handler run: exactly one
// wins (the other gets 409 / domain.ErrStateConflict and leaves no audit
// row), and the ERP gets exactly one invoice per key.
func TestDoubleReinjectOneInvoice(t *testing.T) {
	const (
		sku     = "DLQ-RACE"
		entries = 6
	)
	ctx := t.Context()
	dbURL := pgtest.NewDatabase(t)
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 32
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	t.Cleanup(func() {
		if t.Failed() {
			s := logs.String()
			if len(s) > 32<<10 {
				s = "…" + s[len(s)-32<<10:]
			}
			t.Logf("in-process logs:\n%s", s)
		}
	})
	store := postgres.NewStore(pool)
	sim, err := erpsim.New(erpsim.Config{Faults: erpsim.Faults{RejectCustomers: []string{"C-9"}}, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	simSrv := httptest.NewServer(sim.Handler())
	t.Cleanup(func() { _ = sim.Close(); simSrv.Close() })

	svc := auth.New(pool, auth.Config{})
	who := auth.Who{Name: "test-setup", Role: auth.RoleAdmin}
	tokens := map[string]string{}
	for _, name := range []string{"olga", "oscar"} {
		if _, err := svc.AddUser(ctx, name, auth.RoleOperator, "correct horse battery staple", who); err != nil {
			t.Fatal(err)
		}
		if tokens[name], err = svc.CreateToken(ctx, name, "race test", who); err != nil {
			t.Fatal(err)
		}
	}
	apiSrv := httptest.NewServer(httpapi.New(store, logger).WithAuth(svc).Handler())
	t.Cleanup(apiSrv.Close)
	dlqPipeline(t, pool, simSrv.URL, logger)

	if _, err := store.SetInventory(ctx, sku, 100, dlqMeta); err != nil {
		t.Fatal(err)
	}
	type entry struct{ deal, key, dl string }
	es := make([]entry, entries)
	for i := range es {
		d, err := store.CreateDeal(ctx, domain.Customer{ID: "C-9", Name: "Globex"}, "USD",
			[]domain.Line{{SKU: sku, Description: "Widget", Quantity: 1, UnitPrice: "10.00"}}, dlqMeta)
		if err != nil {
			t.Fatal(err)
		}
		if d, err = store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, dlqMeta); err != nil {
			t.Fatal(err)
		}
		es[i] = entry{deal: d.ID, key: *d.IdempotencyKey}
	}
	eventually(t, 60*time.Second, "every deal compensated and dead-lettered", func() (bool, error) {
		for i := range es {
			p, err := store.ListDeadLetters(ctx, postgres.DeadLetterFilter{DealID: es[i].deal}, "", 10)
			if err != nil || len(p.Items) != 1 || p.Items[0].State != domain.DLStateOpen {
				return false, fmt.Errorf("deal %d: %v %v", i, p.Items, err)
			}
			es[i].dl = p.Items[0].ID
		}
		return true, nil
	})
	// The ERP knows the customer now; the entries are re-injected unedited.
	if err := sim.SetFaults(erpsim.Faults{}); err != nil {
		t.Fatal(err)
	}

	type outcome struct {
		status int
		err    error
		who    string
	}
	results := make([][2]outcome, entries)
	start := make(chan struct{})
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 30 * time.Second}
	for i, e := range es {
		viaHTTP := i%2 == 0
		for j, user := range []string{"olga", "oscar"} {
			wg.Go(func() {
				<-start
				res := outcome{who: user}
				if viaHTTP {
					req, _ := http.NewRequest("POST", apiSrv.URL+"/api/v1/dead-letters/"+e.dl+"/reinject", strings.NewReader(`{"reason":"customer known now"}`))
					req.Header.Set("Authorization", "Bearer "+tokens[user])
					resp, err := client.Do(req)
					if err == nil {
						res.status = resp.StatusCode
						resp.Body.Close()
					}
					res.err = err
				} else {
					_, res.err = store.ReinjectDeadLetter(ctx, e.dl, postgres.ReinjectOptions{Reason: "customer known now"},
						postgres.Actor{Name: user, Role: "operator"})
				}
				results[i][j] = res
			})
		}
	}
	close(start)
	wg.Wait()

	winners := make([]string, entries)
	for i := range es {
		for _, r := range results[i] {
			won := false
			switch {
			case i%2 == 0 && r.err == nil && r.status == http.StatusAccepted:
				won = true
			case i%2 == 0 && r.err == nil && r.status == http.StatusConflict:
			case i%2 == 1 && r.err == nil:
				won = true
			case i%2 == 1 && errors.Is(r.err, domain.ErrStateConflict):
			default:
				t.Fatalf("entry %d: %s got status %d, error %v", i, r.who, r.status, r.err)
			}
			if won {
				if winners[i] != "" {
					t.Fatalf("entry %d: two winners", i)
				}
				winners[i] = r.who
			}
		}
		if winners[i] == "" {
			t.Fatalf("entry %d: no winner: %+v", i, results[i])
		}
	}

	eventually(t, 60*time.Second, "every deal invoiced", func() (bool, error) {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM deals WHERE status = 'invoiced'`).Scan(&n)
		return err == nil && n == entries, fmt.Errorf("%d invoiced: %v", n, err)
	})
	eventually(t, 10*time.Second, "every entry resolved", func() (bool, error) {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM dead_letters WHERE state = 'resolved'`).Scan(&n)
		return err == nil && n == entries, fmt.Errorf("%d resolved: %v", n, err)
	})
	creates := map[string]int{}
	for _, c := range sim.Ledger().Creates {
		creates[c.Key]++
	}
	byRef := map[string]int{}
	for _, inv := range sim.Invoices() {
		byRef[inv.Reference]++
	}
	for i, e := range es {
		if creates[e.key] != 1 || byRef[e.deal] != 1 {
			t.Errorf("entry %d: %d ERP creates for %s, %d invoices for the deal; want exactly 1", i, creates[e.key], e.key, byRef[e.deal])
		}
		rows, err := store.ListAudit(ctx, postgres.AuditFilter{TargetID: e.dl})
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != 1 || rows[0].Action != "dead_letter.reinject" || rows[0].Actor != winners[i] {
			t.Errorf("entry %d: audit %+v, want one re-inject row by the winner %s", i, rows, winners[i])
		}
		var reinjects, reinstated int
		if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM events WHERE stream_id = $1 AND type = 'DeadLetterReinjected'),
			(SELECT count(*) FROM events WHERE stream_id = $2 AND type = 'DealReinstated')`,
			domain.DeadLetterStream(e.dl), domain.DealStream(e.deal)).Scan(&reinjects, &reinstated); err != nil {
			t.Fatal(err)
		}
		if reinjects != 1 || reinstated != 1 {
			t.Errorf("entry %d: %d re-injects, %d reinstatements; want 1 each", i, reinjects, reinstated)
		}
	}
	var open int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM alerts WHERE state <> 'resolved'`).Scan(&open); err != nil || open != 0 {
		t.Errorf("%d alerts left unresolved (%v)", open, err)
	}
	if inv, err := store.GetInventory(ctx, sku); err != nil || inv.Allocated != entries {
		t.Errorf("inventory %+v (%v), want %d allocated", inv, err, entries)
	}
}

// dlqMakeEntries makes deals × perDeal open dead letters through the
// store: per deal the compensation's entry (class permanent) and perDeal-1
// poison copies of its message (classes exhausted and poison). All of them
// can be re-injected: the first re-instates the deal, the others join the
// same close's saga.
func dlqMakeEntries(t *testing.T, store *postgres.Store, sku string, deals, perDeal int) {
	t.Helper()
	ctx := t.Context()
	if _, err := store.SetInventory(ctx, sku, int64(deals), dlqMeta); err != nil {
		t.Fatal(err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range deals {
		g.Go(func() error {
			d, err := store.CreateDeal(gctx, domain.Customer{ID: fmt.Sprintf("C-%d", i), Name: "Customer"}, "USD",
				[]domain.Line{{SKU: sku, Description: "Widget", Quantity: 1, UnitPrice: "10.00"}}, dlqMeta)
			if err != nil {
				return err
			}
			if d, err = store.CloseDeal(gctx, d.ID, domain.OutcomeWon, nil, dlqMeta); err != nil {
				return err
			}
			req := domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: *d.IdempotencyKey, CloseVersion: *d.CloseVersion,
				Customer: d.Customer, Currency: d.Currency, Lines: d.Lines, Total: d.Total}
			payload, err := json.Marshal(req)
			if err != nil {
				return err
			}
			src := func() postgres.DeadLetterSource {
				return postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga",
					Payload: payload, Metadata: map[string]string{outbox.MetadataIdempotencyKey: req.IdempotencyKey}}
			}
			now := time.Now()
			if _, err := store.Compensate(gctx, req, postgres.Failure{ErrorClass: "permanent", Reason: "unknown customer",
				Attempts: 1, FirstFailureAt: now, LastFailureAt: now}, src(), dlqMeta); err != nil {
				return err
			}
			for j := 1; j < perDeal; j++ {
				class := domain.ClassExhausted
				if j%3 == 0 {
					class = domain.ClassPoison
				}
				if _, err := store.DeadLetter(gctx, d.ID, req.IdempotencyKey, postgres.Failure{ErrorClass: class,
					Reason: fmt.Sprintf("copy %d", j), Attempts: 1, FirstFailureAt: now, LastFailureAt: now}, src(), dlqMeta); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

// TestBulkReinjectInterruptedKilledResumed: 1,000 entries across 100 deals,
// re-injected by `dealbridge dlq bulk-reinject`: a dry run first; the run
// is stopped with SIGTERM (it says how to resume), resumed and SIGKILLed,
// then resumed to the end. Every entry is re-injected exactly once, each
// deal's entries in order, under one operation id.
func TestBulkReinjectInterruptedKilledResumed(t *testing.T) {
	const deals, perDeal = 100, 10
	const total = deals * perDeal
	ctx := t.Context()
	dbURL := pgtest.NewDatabase(t)
	dbEnv := []string{"DATABASE_URL=" + dbURL}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store := postgres.NewStore(pool)
	start := time.Now()
	dlqMakeEntries(t, store, "DLQ-BULK", deals, perDeal)
	t.Logf("made %d entries in %v", total, time.Since(start))

	code, out, errOut := runProc(t, time.Minute, dbEnv, "dlq", "bulk-reinject", "--dry-run", "--json")
	var plan postgres.BulkPlan
	if code != 0 || json.Unmarshal([]byte(out), &plan) != nil {
		t.Fatalf("dry run: exit %d\n%s\n%s", code, out, errOut)
	}
	if want := map[string]int{"permanent": deals, domain.ClassExhausted: deals * 6, domain.ClassPoison: deals * 3}; plan.Count != total ||
		fmt.Sprint(plan.ByErrorClass) != fmt.Sprint(want) {
		t.Fatalf("dry run %+v, want %d by class %v", plan, total, want)
	}
	progress := func(op string) (done, pending int) {
		t.Helper()
		if err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'pending')
			FROM bulk_operation_items WHERE operation_id = $1`, op).Scan(&done, &pending); err != nil {
			t.Fatal(err)
		}
		return done, pending
	}
	reinjected := func() int {
		t.Helper()
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM events WHERE type = 'DeadLetterReinjected'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	// Run 1, stopped with SIGTERM.
	run1 := startProc(t, "bulk-1", dbEnv, "dlq", "bulk-reinject", "--reason", "ERP fixed", "--actor", "ops", "--rate", "100")
	run1.waitStderr(" entries (resume with --resume ", 30*time.Second)
	m := regexp.MustCompile(`bulk operation ([0-9a-f-]{36}): (\d+) entries`).FindStringSubmatch(run1.stderr.String())
	if m == nil || m[2] != fmt.Sprint(total) {
		t.Fatalf("bulk-reinject stderr: %q", run1.stderr.String())
	}
	op := m[1]
	run1.waitFor(30*time.Second, "100 entries re-injected", func() (bool, error) {
		done, _ := progress(op)
		return done >= 100, fmt.Errorf("%d done", done)
	})
	if code := run1.signal(syscall.SIGTERM, stopTimeout); code != 1 {
		t.Fatalf("bulk-reinject after SIGTERM: exit %d, want 1\n%s", code, run1.stderr.String())
	}
	if !strings.Contains(run1.stderr.String(), "interrupted after") || !strings.Contains(run1.stderr.String(), "--resume "+op) {
		t.Fatalf("bulk-reinject after SIGTERM should say how to resume:\n%s", run1.stderr.String())
	}
	done1, pending1 := progress(op)
	if done1 < 100 || pending1 == 0 || reinjected() != done1 {
		t.Fatalf("after SIGTERM: %d done, %d pending, %d re-injected", done1, pending1, reinjected())
	}

	// Run 2, resumed and killed.
	run2 := startProc(t, "bulk-2", dbEnv, "dlq", "bulk-reinject", "--resume", op, "--actor", "ops", "--rate", "100")
	run2.waitFor(30*time.Second, "400 entries re-injected", func() (bool, error) {
		done, _ := progress(op)
		return done >= done1+300, fmt.Errorf("%d done", done)
	})
	run2.kill()
	done2, pending2 := progress(op)
	if pending2 == 0 || reinjected() != done2 {
		t.Fatalf("after SIGKILL: %d done, %d pending, %d re-injected: a killed run must leave no half-done item", done2, pending2, reinjected())
	}
	t.Logf("SIGTERM after %d, SIGKILL after %d", done1, done2)

	// Run 3, to the end.
	code, out, errOut = runProc(t, time.Minute, dbEnv, "dlq", "bulk-reinject", "--resume", op, "--actor", "ops", "--rate", "0", "--json")
	var p postgres.BulkProgress
	if code != 0 || json.Unmarshal([]byte(out), &p) != nil {
		t.Fatalf("resumed bulk-reinject: exit %d\n%s\n%s", code, out, errOut)
	}
	if p.Done != total || p.Pending != 0 || p.Skipped != 0 {
		t.Fatalf("resumed run: %+v, want all %d done", p, total)
	}
	dlqCheckBulk(t, pool, op, total)
}

// dlqCheckBulk checks that op re-injected each of the total entries exactly
// once, in (created_at, id) order per deal, with op on every audit row.
func dlqCheckBulk(t *testing.T, pool *pgxpool.Pool, op string, total int) {
	t.Helper()
	ctx := t.Context()
	var entries, reinjectedOnce, wrong int
	if err := pool.QueryRow(ctx, `SELECT count(*),
			count(*) FILTER (WHERE d.state = 'reinjected' AND d.reinjects = 1),
			count(*) FILTER (WHERE (SELECT count(*) FROM events e WHERE e.stream_id = 'deadletter-' || d.id
				AND e.type = 'DeadLetterReinjected' AND e.payload->>'operation_id' = $1) <> 1)
		FROM dead_letters d`, op).Scan(&entries, &reinjectedOnce, &wrong); err != nil {
		t.Fatal(err)
	}
	if entries != total || reinjectedOnce != total || wrong != 0 {
		t.Fatalf("%d entries, %d re-injected exactly once, %d without exactly one re-inject of the operation; want %d, %d, 0",
			entries, reinjectedOnce, wrong, total, total)
	}
	// Per deal, the outbox order of the re-injected messages is the entries'
	// (created_at, id) order.
	rows, err := pool.Query(ctx, `WITH pub AS (
			SELECT o."offset", (o.payload::jsonb->'metadata'->>'reinjected_from') AS dl FROM watermill_outbox o
			WHERE o.payload::jsonb->'metadata' ? 'reinjected_from')
		SELECT d.deal_id::text, d.id::text, row_number() OVER (PARTITION BY d.deal_id ORDER BY d.created_at, d.id) AS want,
			row_number() OVER (PARTITION BY d.deal_id ORDER BY pub."offset") AS got
		FROM dead_letters d LEFT JOIN pub ON pub.dl = d.id::text`)
	if err != nil {
		t.Fatal(err)
	}
	type pos struct {
		deal, dl  string
		want, got int
	}
	ps, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (pos, error) {
		var x pos
		return x, r.Scan(&x.deal, &x.dl, &x.want, &x.got)
	})
	if err != nil {
		t.Fatal(err)
	}
	var published int
	var distinct int
	if err := pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT payload::jsonb->'metadata'->>'reinjected_from')
		FROM watermill_outbox WHERE payload::jsonb->'metadata' ? 'reinjected_from'`).Scan(&published, &distinct); err != nil {
		t.Fatal(err)
	}
	if published != total || distinct != total || len(ps) != total {
		t.Fatalf("%d re-injected messages from %d distinct entries for %d entries, want %d", published, distinct, len(ps), total)
	}
	for _, x := range ps {
		if x.want != x.got {
			t.Fatalf("deal %s: entry %s is #%d of the deal but was published #%d", x.deal, x.dl, x.want, x.got)
		}
	}
	var auditN, withOp, actors int
	if err := pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE operation_id = $1), count(DISTINCT actor || role)
		FROM audit_log WHERE action LIKE 'dead_letter.%reinject%'`, op).Scan(&auditN, &withOp, &actors); err != nil {
		t.Fatal(err)
	}
	if auditN != total+1 || withOp != total+1 || actors != 1 {
		t.Fatalf("audit: %d re-inject rows, %d with the operation id, %d actors; want %d (start + one per entry), all, 1",
			auditN, withOp, actors, total+1)
	}
}
