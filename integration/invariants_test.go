package integration

// Helpers of the unhappy-path and crash tests: the invariant checker (I4 and
// inventory conservation, by query), a test world (database, store,
// simulated ERP over real HTTP) and the relay + handler pipeline run either
// in this process (cmd/app) or as dealbridge subprocesses.

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// ---------------------------------------------------------------------------
// The invariant checker.

// erpView is what the checker reads from the simulated ERP: an in-process
// *erpsim.Server, or a remoteSim over its HTTP API.
type erpView interface {
	Ledger() erpsim.Ledger
	Invoices() []erpsim.Invoice
}

var _ erpView = (*erpsim.Server)(nil)

// remoteSim reads an erp-sim over HTTP (GET /_sim/ledger, GET /invoices);
// a failure fails the test.
type remoteSim struct {
	t    testing.TB
	base string
}

func (r remoteSim) get(path string, out any) {
	r.t.Helper()
	resp, err := http.Get(r.base + path)
	if err != nil {
		r.t.Fatalf("erp-sim GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		r.t.Fatalf("erp-sim GET %s: %s", path, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		r.t.Fatalf("erp-sim GET %s: %v", path, err)
	}
}

func (r remoteSim) Ledger() erpsim.Ledger {
	var l erpsim.Ledger
	r.get("/_sim/ledger", &l)
	return l
}

func (r remoteSim) Invoices() []erpsim.Invoice {
	var v []erpsim.Invoice
	r.get("/invoices", &v)
	return v
}

// drainTimeout bounds how long checkInvariants waits for the pipeline to go
// quiet (every saga terminal, the outbox relayed, the work queue empty).
const drainTimeout = 15 * time.Second

// checkInvariants waits until the pipeline has drained and then checks, by
// query against the event log, the read models and the ERP:
//
//   - I4: every won close (DealWon, keyed by its idempotency key K) is
//     EITHER invoiced exactly once — one InvoiceCreated for K, the saga and
//     (for the deal's current close) the deal invoiced with the number of
//     the single ERP invoice holding K, no DealReverted, no InvoiceFailed,
//     no dead letter — OR compensated — one InvoiceFailed, one
//     DealReverted, the saga compensated, the deal reverted, exactly one
//     invoice_failed alert and exactly one dead letter for K, linked to each
//     other, and no ERP invoice for K. Never both, never neither; and the
//     ERP holds no invoice for a key that no close produced;
//   - no saga left pending or retrying, nothing left in the work queue,
//     nothing left unrelayed in the outbox;
//   - inventory: the inventory table equals the fold of the Inventory*
//     events; per SKU, allocated equals the quantities of the deals now won
//     or invoiced, and available equals the last InventorySet minus what
//     was allocated since plus what was released since; each deal's net
//     allocation is its quantity while won/invoiced and zero otherwise.
//
// Operator re-injection (DealReinstated, InvoiceSagaResumed) is not
// modelled: a compensated close that was re-injected and then invoiced is
// reported as BOTH.
func checkInvariants(t testing.TB, pool *pgxpool.Pool, sim erpView) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout+30*time.Second)
	defer cancel()
	waitDrained(t, ctx, pool)
	checkTerminalOutcomes(t, ctx, pool, sim)
	checkInventory(t, ctx, pool)
}

// waitDrained waits until no saga is pending or retrying, the work queue is
// empty and the relay has passed every outbox row.
func waitDrained(t testing.TB, ctx context.Context, pool *pgxpool.Pool) {
	t.Helper()
	const q = `SELECT
	(SELECT count(*) FROM invoice_sagas WHERE state NOT IN ('invoiced', 'compensated')),
	(SELECT count(*) FROM work_queue),
	(SELECT count(*) FROM watermill_outbox o
	  WHERE NOT EXISTS (SELECT 1 FROM watermill_offsets_outbox c WHERE c.consumer_group = $1
	      AND (o.transaction_id, o."offset") <= (c.last_processed_transaction_id, c.offset_acked)))`
	deadline := time.Now().Add(drainTimeout)
	for {
		var open, queued, unrelayed int
		if err := pool.QueryRow(ctx, q, outbox.ConsumerGroup).Scan(&open, &queued, &unrelayed); err != nil {
			t.Fatalf("invariants: drain query: %v", err)
		}
		if open == 0 && queued == 0 && unrelayed == 0 {
			return
		}
		if time.Now().After(deadline) {
			dumpStuck(t, ctx, pool)
			t.Fatalf("invariants: not drained after %v: %d saga(s) pending/retrying (stuck), %d work_queue row(s), %d outbox row(s) not relayed",
				drainTimeout, open, queued, unrelayed)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func dumpStuck(t testing.TB, ctx context.Context, pool *pgxpool.Pool) {
	t.Helper()
	rows, err := pool.Query(ctx, `SELECT idempotency_key, state, attempts, coalesce(last_error, ''), next_attempt_at FROM invoice_sagas
		WHERE state NOT IN ('invoiced', 'compensated')`)
	if err == nil {
		for rows.Next() {
			var k, s, e string
			var n int
			var next *time.Time
			if rows.Scan(&k, &s, &n, &e, &next) == nil {
				t.Logf("stuck saga %s: state %s, attempts %d, next %v, last error %q", k, s, n, next, e)
			}
		}
		rows.Close()
	}
	rows, err = pool.Query(ctx, `SELECT id, topic, uuid, attempts, available_at, lease_until, last_error, metadata::text FROM work_queue`)
	if err == nil {
		for rows.Next() {
			var id int64
			var topic, uuid, lastErr, md string
			var n int
			var avail time.Time
			var lease *time.Time
			if rows.Scan(&id, &topic, &uuid, &n, &avail, &lease, &lastErr, &md) == nil {
				t.Logf("work_queue row %d %s %s: attempts %d, available %v, lease %v, last error %q, metadata %s",
					id, topic, uuid, n, avail, lease, lastErr, md)
			}
		}
		rows.Close()
	}
}

// closeRecord is one won close as the event log and read models show it.
type closeRecord struct {
	dealID string
	key    string

	invoiceCreated []string // invoice numbers of InvoiceCreated events for the key
	reverted       int      // DealReverted events for the key
	failed         int      // InvoiceFailed events for the key

	sagaState, sagaInvoice string
	sagaFound              bool

	alerts      []alertRow // invoice_failed alerts for the key
	deadLetters []dlRow    // dead letters for the key
	erp         []erpsim.Invoice
}

type alertRow struct{ id, kind, dealID, deadLetterID string }

type dlRow struct{ id, class, dealID string }

type dealRow struct {
	status, key, invoice string
	lines                []domain.Line
}

func checkTerminalOutcomes(t testing.TB, ctx context.Context, pool *pgxpool.Pool, sim erpView) {
	t.Helper()
	closes := map[string]*closeRecord{}
	var order []string
	rows, err := pool.Query(ctx, `SELECT payload->>'deal_id', payload->>'idempotency_key' FROM events WHERE type = 'DealWon' ORDER BY position`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var c closeRecord
		if err := rows.Scan(&c.dealID, &c.key); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		if closes[c.key] != nil {
			t.Errorf("invariants: two DealWon events for key %s", c.key)
			continue
		}
		closes[c.key] = &c
		order = append(order, c.key)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}

	orphan := func(what, key string) { t.Errorf("invariants: %s for key %q, which no DealWon produced", what, key) }

	rows, err = pool.Query(ctx, `SELECT type, payload->>'idempotency_key', coalesce(payload->>'invoice_number', '') FROM events
		WHERE type IN ('InvoiceCreated', 'DealReverted', 'InvoiceFailed')`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var typ, key, number string
		if err := rows.Scan(&typ, &key, &number); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		c := closes[key]
		if c == nil {
			orphan(typ, key)
			continue
		}
		switch typ {
		case domain.TypeInvoiceCreated:
			c.invoiceCreated = append(c.invoiceCreated, number)
		case domain.TypeDealReverted:
			c.reverted++
		case domain.TypeInvoiceFailed:
			c.failed++
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}

	rows, err = pool.Query(ctx, `SELECT idempotency_key, state, coalesce(invoice_number, '') FROM invoice_sagas`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var key, state, number string
		if err := rows.Scan(&key, &state, &number); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		c := closes[key]
		if c == nil {
			orphan("invoice saga", key)
			continue
		}
		c.sagaFound, c.sagaState, c.sagaInvoice = true, state, number
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}

	rows, err = pool.Query(ctx, `SELECT id::text, kind, idempotency_key, coalesce(deal_id::text, ''), coalesce(dead_letter_id::text, '')
		FROM alerts WHERE idempotency_key IS NOT NULL`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var a alertRow
		var key string
		if err := rows.Scan(&a.id, &a.kind, &key, &a.dealID, &a.deadLetterID); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		if a.kind != domain.AlertKindInvoiceFailed {
			// Alerts of other kinds (poison, duplicate invoice, failed
			// compensation) must never concern a real close.
			if closes[key] != nil {
				t.Errorf("invariants: key %s has a %s alert %s", key, a.kind, a.id)
			}
			continue
		}
		c := closes[key]
		if c == nil {
			orphan("invoice_failed alert "+a.id, key)
			continue
		}
		c.alerts = append(c.alerts, a)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}

	rows, err = pool.Query(ctx, `SELECT id::text, error_class, coalesce(idempotency_key, ''), coalesce(deal_id::text, '') FROM dead_letters`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var d dlRow
		var key string
		if err := rows.Scan(&d.id, &d.class, &key, &d.dealID); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		if c := closes[key]; c != nil {
			c.deadLetters = append(c.deadLetters, d)
		} else if d.class != domain.ClassPoison {
			orphan(d.class+" dead letter "+d.id, key)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}

	deals := loadDeals(t, ctx, pool)

	for _, inv := range sim.Invoices() {
		c := closes[inv.IdempotencyKey]
		if c == nil {
			t.Errorf("invariants: unexpected ERP invoice %s for key %q (reference %s): no close produced that key",
				inv.Number, inv.IdempotencyKey, inv.Reference)
			continue
		}
		if inv.Reference != c.dealID {
			t.Errorf("invariants: ERP invoice %s for key %s references %s, want deal %s", inv.Number, c.key, inv.Reference, c.dealID)
		}
		c.erp = append(c.erp, inv)
	}
	creates := map[string]int{}
	for _, cr := range sim.Ledger().Creates {
		creates[cr.Key]++
	}

	var nInvoiced, nCompensated int
	for _, key := range order {
		c := closes[key]
		d, hasDeal := deals[c.dealID]
		current := hasDeal && d.key == c.key // the deal's latest close
		invoicedOnce := len(c.invoiceCreated) == 1 && len(c.erp) == 1 && creates[key] == 1 &&
			c.invoiceCreated[0] == c.erp[0].Number && c.sagaState == domain.SagaInvoiced && c.sagaInvoice == c.erp[0].Number &&
			c.reverted == 0 && c.failed == 0 && len(c.deadLetters) == 0 && len(c.alerts) == 0 &&
			(!current || d.status == string(domain.StatusInvoiced) && d.invoice == c.erp[0].Number)
		compensated := c.reverted == 1 && c.failed == 1 && len(c.invoiceCreated) == 0 && len(c.erp) == 0 && creates[key] == 0 &&
			c.sagaState == domain.SagaCompensated && len(c.alerts) == 1 && len(c.deadLetters) == 1 &&
			c.alerts[0].deadLetterID == c.deadLetters[0].id && c.alerts[0].dealID == c.dealID && c.deadLetters[0].dealID == c.dealID &&
			(c.deadLetters[0].class == string(domain.ErrorPermanent) || c.deadLetters[0].class == domain.ClassExhausted) &&
			(!current || d.status == string(domain.StatusReverted))
		switch {
		case invoicedOnce:
			nInvoiced++
		case compensated:
			nCompensated++
		default:
			var verdict []string
			hasInvoice := len(c.invoiceCreated) > 0 || len(c.erp) > 0
			hasComp := c.reverted > 0 || c.failed > 0 || len(c.deadLetters) > 0 || len(c.alerts) > 0
			switch {
			case hasInvoice && hasComp:
				verdict = append(verdict, "BOTH invoiced and compensated")
			case !hasInvoice && !hasComp:
				verdict = append(verdict, "NEITHER invoiced nor compensated (lost or stuck)")
			}
			if len(c.erp) > 1 || creates[key] > 1 || len(c.invoiceCreated) > 1 {
				verdict = append(verdict, "DUPLICATED")
			}
			if len(verdict) == 0 {
				verdict = append(verdict, "inconsistent")
			}
			numbers := make([]string, len(c.erp))
			for i, inv := range c.erp {
				numbers[i] = inv.Number
			}
			t.Errorf("invariants: I4 violated for deal %s key %s: %s: InvoiceCreated %v, ERP invoices %v (creates %d), saga %q (found %v, invoice %q), "+
				"DealReverted %d, InvoiceFailed %d, invoice_failed alerts %+v, dead letters %+v, deal %+v (current close %v)",
				c.dealID, key, strings.Join(verdict, ", "), c.invoiceCreated, numbers, creates[key], c.sagaState, c.sagaFound, c.sagaInvoice,
				c.reverted, c.failed, c.alerts, c.deadLetters, d, current)
		}
	}
	t.Logf("invariants: %d won close(s): %d invoiced exactly once, %d compensated", len(order), nInvoiced, nCompensated)
}

func loadDeals(t testing.TB, ctx context.Context, pool *pgxpool.Pool) map[string]dealRow {
	t.Helper()
	rows, err := pool.Query(ctx, `SELECT id::text, status, coalesce(idempotency_key, ''), coalesce(invoice_number, ''), lines FROM deals`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	deals := map[string]dealRow{}
	for rows.Next() {
		var id string
		var d dealRow
		var lines []byte
		if err := rows.Scan(&id, &d.status, &d.key, &d.invoice, &lines); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		if err := json.Unmarshal(lines, &d.lines); err != nil {
			t.Fatalf("invariants: deal %s lines: %v", id, err)
		}
		deals[id] = d
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}
	return deals
}

// checkInventory derives every SKU's stock from the Inventory* events and
// compares it with the inventory table and with the deals' statuses.
func checkInventory(t testing.TB, ctx context.Context, pool *pgxpool.Pool) {
	t.Helper()
	type stock struct {
		available, allocated int64 // fold of every event
		lastSet              int64
		sinceSet             int64 // allocated minus released since the last InventorySet
		sets                 int
	}
	skus := map[string]*stock{}
	get := func(sku string) *stock {
		if skus[sku] == nil {
			skus[sku] = &stock{}
		}
		return skus[sku]
	}
	type dealSKU struct{ deal, sku string }
	net := map[dealSKU]int64{}
	rows, err := pool.Query(ctx, `SELECT type, payload FROM events
		WHERE type IN ('InventorySet', 'InventoryAllocated', 'InventoryReleased') ORDER BY position`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var typ string
		var payload []byte
		if err := rows.Scan(&typ, &payload); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		var e struct {
			SKU       string `json:"sku"`
			DealID    string `json:"deal_id"`
			Quantity  int64  `json:"quantity"`
			Available int64  `json:"available"`
		}
		if err := json.Unmarshal(payload, &e); err != nil {
			t.Fatalf("invariants: %s payload %s: %v", typ, payload, err)
		}
		s := get(e.SKU)
		switch typ {
		case domain.TypeInventorySet:
			s.available, s.lastSet, s.sinceSet = e.Available, e.Available, 0
			s.sets++
		case domain.TypeInventoryAllocated:
			s.available -= e.Quantity
			s.allocated += e.Quantity
			s.sinceSet += e.Quantity
			net[dealSKU{e.DealID, e.SKU}] += e.Quantity
		case domain.TypeInventoryReleased:
			s.available += e.Quantity
			s.allocated -= e.Quantity
			s.sinceSet -= e.Quantity
			net[dealSKU{e.DealID, e.SKU}] -= e.Quantity
		}
		if s.available < 0 || s.allocated < 0 {
			t.Errorf("invariants: inventory %s went negative in the event log (available %d, allocated %d)", e.SKU, s.available, s.allocated)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}

	// What the deals hold now.
	want := map[string]int64{}
	wantNet := map[dealSKU]int64{}
	for id, d := range loadDeals(t, ctx, pool) {
		held := d.status == string(domain.StatusWon) || d.status == string(domain.StatusInvoiced)
		for _, l := range d.lines {
			if held {
				want[l.SKU] += l.Quantity
				wantNet[dealSKU{id, l.SKU}] += l.Quantity
			} else {
				wantNet[dealSKU{id, l.SKU}] += 0
			}
		}
	}
	for k, q := range wantNet {
		if net[k] != q {
			t.Errorf("invariants: deal %s holds a net allocation of %d %s in the event log, want %d for its status", k.deal, net[k], k.sku, q)
		}
	}
	for k, q := range net {
		if _, ok := wantNet[k]; !ok && q != 0 {
			t.Errorf("invariants: %d %s allocated to %s, which is no deal", q, k.sku, k.deal)
		}
	}

	table := map[string][2]int64{}
	rows, err = pool.Query(ctx, `SELECT sku, available, allocated FROM inventory`)
	if err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for rows.Next() {
		var sku string
		var a, b int64
		if err := rows.Scan(&sku, &a, &b); err != nil {
			t.Fatalf("invariants: %v", err)
		}
		table[sku] = [2]int64{a, b}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("invariants: %v", err)
	}
	for sku, s := range skus {
		row, ok := table[sku]
		switch {
		case !ok:
			t.Errorf("invariants: inventory %s has events but no row", sku)
		case row != [2]int64{s.available, s.allocated}:
			t.Errorf("invariants: inventory %s row: available %d allocated %d; the event log says %d and %d",
				sku, row[0], row[1], s.available, s.allocated)
		}
		if s.allocated != want[sku] {
			t.Errorf("invariants: inventory %s: %d allocated, but won/invoiced deals hold %d", sku, s.allocated, want[sku])
		}
		if s.sets > 0 && s.available != s.lastSet-s.sinceSet {
			t.Errorf("invariants: inventory %s: available %d, want last InventorySet %d minus %d allocated since",
				sku, s.available, s.lastSet, s.sinceSet)
		}
	}
	for sku := range table {
		if skus[sku] == nil {
			t.Errorf("invariants: inventory row %s without events", sku)
		}
	}
	for sku, q := range want {
		if q > 0 && skus[sku] == nil {
			t.Errorf("invariants: deals hold %d %s but there are no inventory events", q, sku)
		}
	}
}

// ---------------------------------------------------------------------------
// The test world.

var testMeta = domain.Metadata{Actor: "integration-test", CorrelationID: "corr-unhappy"}

// world is one test's surroundings: a fresh migrated database, the api's
// Store on it, and a simulated ERP served over real HTTP in this process.
type world struct {
	t      *testing.T
	dbURL  string
	pool   *pgxpool.Pool
	store  *postgres.Store
	sim    *erpsim.Server
	simURL string
	logs   *syncBuffer // in-process logs, shown when the test fails
	logger *slog.Logger
}

func newWorld(t *testing.T, faults erpsim.Faults) *world {
	t.Helper()
	w := &world{t: t, dbURL: pgtest.NewDatabase(t), logs: &syncBuffer{}}
	w.logger = slog.New(slog.NewTextHandler(w.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	t.Cleanup(func() {
		if t.Failed() {
			s := w.logs.String()
			if len(s) > 64<<10 {
				s = "…" + s[len(s)-64<<10:]
			}
			t.Logf("---- in-process logs:\n%s", s)
		}
	})
	cfg, err := pgxpool.ParseConfig(w.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 24
	w.pool, err = pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.pool.Close)
	w.store = postgres.NewStore(w.pool)
	w.sim, err = erpsim.New(erpsim.Config{Faults: faults, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(w.sim.Handler())
	t.Cleanup(func() {
		_ = w.sim.Close() // releases hung requests first
		ts.Close()
	})
	w.simURL = ts.URL
	return w
}

func (w *world) setFaults(f erpsim.Faults) {
	w.t.Helper()
	if err := w.sim.SetFaults(f); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) setInventory(sku string, n int64) {
	w.t.Helper()
	if _, err := w.store.SetInventory(context.Background(), sku, n, testMeta); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) inventory(sku string) postgres.InventoryView {
	w.t.Helper()
	v, err := w.store.GetInventory(context.Background(), sku)
	if err != nil {
		w.t.Fatal(err)
	}
	return v
}

// openDeal opens a deal for customer with one line of qty × sku.
func (w *world) openDeal(customer, sku string, qty int64) postgres.DealView {
	w.t.Helper()
	d, err := w.store.CreateDeal(context.Background(), domain.Customer{ID: customer, Name: "Customer " + customer}, "USD",
		[]domain.Line{{SKU: sku, Description: "Widget", Quantity: qty, UnitPrice: "12.50"}}, testMeta)
	if err != nil {
		w.t.Fatal(err)
	}
	return d
}

// closeWon closes d as won and returns its idempotency key.
func (w *world) closeWon(d postgres.DealView) string {
	w.t.Helper()
	c, err := w.store.CloseDeal(context.Background(), d.ID, domain.OutcomeWon, &d.Version, testMeta)
	if err != nil {
		w.t.Fatal(err)
	}
	if c.Status != domain.StatusWon || c.IdempotencyKey == nil {
		w.t.Fatalf("deal %s after close: status %s, key %v", d.ID, c.Status, c.IdempotencyKey)
	}
	return *c.IdempotencyKey
}

// newWonDeal opens and closes a deal and returns it (as opened) and its key.
func (w *world) newWonDeal(customer, sku string, qty int64) (postgres.DealView, string) {
	w.t.Helper()
	d := w.openDeal(customer, sku, qty)
	return d, w.closeWon(d)
}

func (w *world) saga(key string) postgres.SagaView {
	w.t.Helper()
	v, ok, err := w.store.Saga(context.Background(), key)
	if err != nil || !ok {
		w.t.Fatalf("saga %s: found %v, err %v", key, ok, err)
	}
	return v
}

// waitSaga waits until the saga of key is in state, failing fast when it
// reaches the other terminal state.
func (w *world) waitSaga(key, state string, timeout time.Duration) postgres.SagaView {
	w.t.Helper()
	var v postgres.SagaView
	eventually(w.t, timeout, "saga "+key+" "+state, func() (bool, error) {
		v = w.saga(key)
		if v.State != state && (v.State == domain.SagaInvoiced || v.State == domain.SagaCompensated) {
			w.t.Fatalf("saga %s ended %s (attempts %d, last error %v), want %s", key, v.State, v.Attempts, nilStr(v.LastError), state)
		}
		return v.State == state, fmt.Errorf("state %s, attempts %d, last error %s", v.State, v.Attempts, nilStr(v.LastError))
	})
	return v
}

// attemptsFor is the ERP ledger's POST /invoices attempts for key.
func (w *world) attemptsFor(key string) []erpsim.Attempt {
	var out []erpsim.Attempt
	for _, a := range w.sim.Ledger().Attempts {
		if a.Key == key {
			out = append(out, a)
		}
	}
	return out
}

// waitAttempts waits until the ledger holds at least n attempts for key.
func (w *world) waitAttempts(key string, n int, timeout time.Duration) []erpsim.Attempt {
	w.t.Helper()
	var as []erpsim.Attempt
	eventually(w.t, timeout, fmt.Sprintf("%d ERP attempt(s) for %s", n, key), func() (bool, error) {
		as = w.attemptsFor(key)
		return len(as) >= n, fmt.Errorf("%d attempt(s)", len(as))
	})
	return as
}

func (w *world) createsFor(key string) int {
	n := 0
	for _, c := range w.sim.Ledger().Creates {
		if c.Key == key {
			n++
		}
	}
	return n
}

// attemptFailures returns the InvoiceAttemptFailed events of key's saga.
func (w *world) attemptFailures(key string) []domain.InvoiceAttemptFailed {
	w.t.Helper()
	return eventsOf[domain.InvoiceAttemptFailed](w.t, w.pool, domain.SagaStream(key), domain.TypeInvoiceAttemptFailed)
}

// invoiceCreated returns the deal's InvoiceCreated events.
func (w *world) invoiceCreated(dealID string) []domain.InvoiceCreated {
	w.t.Helper()
	return eventsOf[domain.InvoiceCreated](w.t, w.pool, domain.DealStream(dealID), domain.TypeInvoiceCreated)
}

func eventsOf[E any](t testing.TB, pool *pgxpool.Pool, stream, typ string) []E {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT payload FROM events WHERE stream_id = $1 AND type = $2 ORDER BY stream_version`, stream, typ)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (E, error) {
		var b []byte
		var e E
		if err := r.Scan(&b); err != nil {
			return e, err
		}
		return e, json.Unmarshal(b, &e)
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func nilStr(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

func ledgerOutcomes(as []erpsim.Attempt) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = strconv.Itoa(a.Status) + " " + a.Outcome
	}
	return out
}

// ---------------------------------------------------------------------------
// The pipeline: relay + invoice handler.

// pipelineConfig configures the relay and the handler. Zero values take
// fast test defaults (see withDefaults).
type pipelineConfig struct {
	ERPTimeout   time.Duration
	Retry        domain.RetryPolicy
	Breaker      erp.BreakerConfig
	Consumers    int
	PollInterval time.Duration
	// HTTPClient replaces the ERP client's HTTP client (in-process only).
	HTTPClient *http.Client
	// AlertWebhookURL and AlertWebhookSecret turn the alert webhook on.
	AlertWebhookURL, AlertWebhookSecret string
}

func (c pipelineConfig) withDefaults() pipelineConfig {
	if c.ERPTimeout == 0 {
		c.ERPTimeout = 2 * time.Second
	}
	if c.Retry.Initial == 0 {
		c.Retry.Initial = 100 * time.Millisecond
	}
	if c.Retry.Max == 0 {
		c.Retry.Max = max(400*time.Millisecond, c.Retry.Initial)
	}
	if c.Retry.MaxAttempts == 0 {
		c.Retry.MaxAttempts = 6
	}
	if c.Breaker.FailureThreshold == 0 {
		c.Breaker.FailureThreshold = 100 // out of the way unless a test wants it
	}
	if c.Breaker.CoolDown == 0 {
		c.Breaker.CoolDown = 300 * time.Millisecond
	}
	if c.Consumers == 0 {
		c.Consumers = 4
	}
	if c.PollInterval == 0 {
		c.PollInterval = 50 * time.Millisecond
	}
	return c
}

// startInProcess runs app.RunRelay and app.RunHandler (app.RunHandlerWithPort
// when the test brings its own HTTP client) as goroutines until the test
// ends: the wiring of the relay and handler processes, in this process.
func (w *world) startInProcess(cfg pipelineConfig) {
	w.t.Helper()
	cfg = cfg.withDefaults()
	hcfg := app.HandlerConfig{
		ERPURL: w.simURL, ERPTimeout: cfg.ERPTimeout, Consumers: cfg.Consumers, PollInterval: cfg.PollInterval,
		Retry: cfg.Retry, Breaker: cfg.Breaker,
		AlertWebhookURL: cfg.AlertWebhookURL, AlertWebhookSecret: cfg.AlertWebhookSecret,
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() {
		errs <- wrapErr("relay", app.RunRelay(ctx, w.pool, app.RelayConfig{PollInterval: 50 * time.Millisecond}, w.logger))
	})
	wg.Go(func() {
		var err error
		if cfg.HTTPClient == nil {
			err = app.RunHandler(ctx, w.pool, hcfg, w.logger)
		} else {
			bc := cfg.Breaker
			bc.Logger = w.logger
			port := erp.NewBreaker(erp.NewHTTPClient(erp.HTTPConfig{
				BaseURL: w.simURL, Timeout: cfg.ERPTimeout, Client: cfg.HTTPClient, Logger: w.logger}), bc)
			err = app.RunHandlerWithPort(ctx, w.pool, port, hcfg, w.logger)
		}
		errs <- wrapErr("handler", err)
	})
	w.t.Cleanup(func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(stopTimeout):
			w.t.Errorf("in-process relay/handler still running %v after cancel", stopTimeout)
			return
		}
		close(errs)
		for err := range errs {
			if err != nil {
				w.t.Errorf("in-process %v", err)
			}
		}
	})
}

func wrapErr(name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", name, err)
}

// startProcesses runs `dealbridge relay` and `dealbridge handler` as
// subprocesses on the world's database and ERP; they are stopped with
// SIGTERM at cleanup and must exit 0 (see startProc).
func (w *world) startProcesses(cfg pipelineConfig) (relay, handler *proc) {
	w.t.Helper()
	if cfg.HTTPClient != nil {
		w.t.Fatal("startProcesses: HTTPClient is in-process only")
	}
	cfg = cfg.withDefaults()
	env := []string{"DATABASE_URL=" + w.dbURL}
	relay = startProc(w.t, "relay", env, "relay", "--relay-poll-interval", "50ms")
	args := handlerArgs(w.simURL, cfg)
	henv := env
	if cfg.AlertWebhookURL != "" {
		args = append(args, "--alert-webhook-url", cfg.AlertWebhookURL)
		henv = append(slices.Clone(env), "DEALBRIDGE_ALERT_WEBHOOK_SECRET="+cfg.AlertWebhookSecret)
	}
	handler = startProc(w.t, "handler", henv, args...)
	relay.waitStderr("relay running", 30*time.Second)
	handler.waitStderr("handler running", 30*time.Second)
	return relay, handler
}

// handlerArgs is the `dealbridge handler` command line for cfg (defaults
// applied).
func handlerArgs(erpURL string, cfg pipelineConfig) []string {
	return []string{"handler", "--erp-url", erpURL,
		"--erp-timeout", cfg.ERPTimeout.String(),
		"--consumers", strconv.Itoa(cfg.Consumers),
		"--queue-poll-interval", cfg.PollInterval.String(),
		"--retry-initial", cfg.Retry.Initial.String(),
		"--retry-max", cfg.Retry.Max.String(),
		"--max-attempts", strconv.Itoa(cfg.Retry.MaxAttempts),
		"--breaker-failures", strconv.Itoa(cfg.Breaker.FailureThreshold),
		"--breaker-cooldown", cfg.Breaker.CoolDown.String(),
	}
}
