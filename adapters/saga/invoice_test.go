package saga_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/adapters/saga"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var meta = domain.Metadata{Actor: "saga-test", CorrelationID: "corr-saga"}

// env is one test's world: a fresh database with a store, a simulated ERP
// served over real HTTP, a real HTTP client to it, and the handler.
type env struct {
	pool    *pgxpool.Pool
	store   *postgres.Store
	sim     *erpsim.Server
	client  *erp.HTTPClient
	handler *saga.InvoiceHandler
}

func newEnv(t *testing.T, maxConns int32, simCfg erpsim.Config) *env {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)

	sim, err := erpsim.New(simCfg)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(sim.Handler())
	t.Cleanup(func() {
		_ = sim.Close()
		ts.Close()
	})
	client := erp.NewHTTPClient(erp.HTTPConfig{BaseURL: ts.URL, Timeout: 5 * time.Second})
	store := postgres.NewStore(pool)
	return &env{
		pool: pool, store: store, sim: sim, client: client,
		handler: saga.NewInvoiceHandler(store, client, saga.Config{}, slog.New(slog.DiscardHandler)),
	}
}

// wonDeal creates and closes a deal through the store and returns the
// invoice request message exactly as the outbox row carries it.
func (e *env) wonDeal(t *testing.T) (postgres.DealView, *message.Message) {
	t.Helper()
	ctx := t.Context()
	if _, err := e.store.SetInventory(ctx, "SKU-1", 100, meta); err != nil {
		t.Fatal(err)
	}
	d, err := e.store.CreateDeal(ctx, domain.Customer{ID: "C-1", Name: "Acme GmbH"}, "EUR", []domain.Line{
		{SKU: "SKU-1", Description: "Widget", Quantity: 3, UnitPrice: "12.50"},
		{SKU: "SKU-1", Description: "Widget, spare", Quantity: 1, UnitPrice: "2.00"},
	}, meta)
	if err != nil {
		t.Fatal(err)
	}
	d, err = e.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, &d.Version, meta)
	if err != nil {
		t.Fatal(err)
	}
	return d, e.outboxMessage(t, d.ID)
}

// outboxMessage unwraps the deal's outbox row (a watermill forwarder
// envelope) into the message the relay would deliver.
func (e *env) outboxMessage(t *testing.T, dealID string) *message.Message {
	t.Helper()
	rows, err := e.pool.Query(t.Context(), `SELECT payload::text FROM watermill_outbox ORDER BY "offset"`)
	if err != nil {
		t.Fatal(err)
	}
	bodies, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(bodies) != 1 {
		t.Fatalf("%d outbox rows, want 1", len(bodies))
	}
	var env struct {
		DestinationTopic string            `json:"destination_topic"`
		UUID             string            `json:"uuid"`
		Payload          []byte            `json:"payload"`
		Metadata         map[string]string `json:"metadata"`
	}
	if err := json.Unmarshal([]byte(bodies[0]), &env); err != nil {
		t.Fatal(err)
	}
	if env.DestinationTopic != outbox.InvoiceTopic {
		t.Fatalf("outbox message for %q, want %q", env.DestinationTopic, outbox.InvoiceTopic)
	}
	m := message.NewMessage(env.UUID, env.Payload)
	m.Metadata = env.Metadata
	m.SetContext(t.Context())
	var req domain.InvoiceRequest
	if err := json.Unmarshal(m.Payload, &req); err != nil {
		t.Fatal(err)
	}
	if req.DealID != dealID {
		t.Fatalf("outbox message for deal %s, want %s", req.DealID, dealID)
	}
	return m
}

// warmPool opens n connections in pool, so that n concurrent users do not
// wait for connection setup one after the other.
func warmPool(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	conns := make([]*pgxpool.Conn, n)
	for i := range conns {
		c, err := pool.Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	for _, c := range conns {
		c.Release()
	}
}

// delivery is a fresh delivery of m, as a transport redelivers it.
// crashingBeforeCommit returns a handler on e whose recording fails just
// before its commit (after the ERP call), with the error it fails with.
func (e *env) crashingBeforeCommit() (*saga.InvoiceHandler, error) {
	errCrash := errors.New("crash before local commit")
	return saga.NewInvoiceHandler(
		postgres.NewStore(e.pool, postgres.WithBeforeCommit(func(context.Context, pgx.Tx) error { return errCrash })),
		e.client, saga.Config{}, slog.New(slog.DiscardHandler)), errCrash
}

func delivery(t *testing.T, m *message.Message) *message.Message {
	c := m.Copy()
	c.SetContext(t.Context())
	return c
}

func invoiceRequest(t *testing.T, m *message.Message) domain.InvoiceRequest {
	t.Helper()
	var req domain.InvoiceRequest
	if err := json.Unmarshal(m.Payload, &req); err != nil {
		t.Fatal(err)
	}
	return req
}

func (e *env) invoiceEvents(t *testing.T, dealID string) int {
	t.Helper()
	var n int
	err := e.pool.QueryRow(t.Context(), `SELECT count(*) FROM events WHERE stream_id=$1 AND type=$2`,
		domain.DealStream(dealID), domain.TypeInvoiceCreated).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// assertInvoicedOnce checks I3 for one deal: one ERP invoice for its key,
// one InvoiceCreated event, the deal invoiced with that invoice's number.
func (e *env) assertInvoicedOnce(t *testing.T, dealID, key string) {
	t.Helper()
	st := e.sim.Stats()
	if st.Creates != 1 || st.MaxCreatesPerKey != 1 {
		t.Fatalf("ERP creates = %d (max %d per key), want exactly 1; stats %+v", st.Creates, st.MaxCreatesPerKey, st)
	}
	inv := e.sim.Invoices()[0]
	if inv.IdempotencyKey != key || inv.Reference != dealID {
		t.Fatalf("ERP invoice %+v, want key %s for deal %s", inv, key, dealID)
	}
	if n := e.invoiceEvents(t, dealID); n != 1 {
		t.Fatalf("%d InvoiceCreated events, want 1", n)
	}
	d, err := e.store.GetDeal(t.Context(), dealID)
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != domain.StatusInvoiced || d.Invoice == nil || d.Invoice.Number != inv.Number || d.Invoice.IdempotencyKey != key {
		t.Fatalf("deal %s: status %s, invoice %+v; want invoiced with %s", dealID, d.Status, d.Invoice, inv.Number)
	}
	if s, ok, err := e.store.InvoiceState(t.Context(), key); err != nil || !ok || s != "invoiced" {
		t.Fatalf("saga state %q, %v, %v; want invoiced", s, ok, err)
	}
}

// assertNotInvoiced checks that no invoice was recorded locally (a failed
// attempt may be: that is the durable retry).
func (e *env) assertNotInvoiced(t *testing.T, dealID, key string) {
	t.Helper()
	if n := e.invoiceEvents(t, dealID); n != 0 {
		t.Fatalf("%d InvoiceCreated events, want none", n)
	}
	d, err := e.store.GetDeal(t.Context(), dealID)
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != domain.StatusWon || d.Invoice != nil {
		t.Fatalf("deal %s: status %s, invoice %+v; want won without invoice", dealID, d.Status, d.Invoice)
	}
	if s, ok, err := e.store.InvoiceState(t.Context(), key); err != nil || !ok || s == "invoiced" {
		t.Fatalf("saga state %q, %v, %v; want not invoiced", s, ok, err)
	}
}

// TestRedeliveryInvoicesOnce: the same message handled twice in a row.
func TestRedeliveryInvoicesOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 4, erpsim.Config{})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey
	if got := m.Metadata.Get(outbox.MetadataIdempotencyKey); got != key {
		t.Fatalf("message idempotency key %q, want %q", got, key)
	}
	for i := range 2 {
		if err := e.handler.Handle(delivery(t, m)); err != nil {
			t.Fatalf("delivery %d: %v", i+1, err)
		}
	}
	e.assertInvoicedOnce(t, d.ID, key)
}

// TestConcurrentRedeliveryInvoicesOnce: five deliveries of the same message
// handled at once. Some may fail (the ERP answers 409 while the first
// create for the key is in flight) and would be redelivered; in the end
// there is one invoice.
func TestConcurrentRedeliveryInvoicesOnce(t *testing.T) {
	t.Parallel()
	// A durable simulator fsyncs each create before answering, which keeps
	// the key in flight long enough for concurrent creates to see it.
	e := newEnv(t, 8, erpsim.Config{StorePath: filepath.Join(t.TempDir(), "erp.jsonl")})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey

	const n = 5
	// Every delivery holds its own connection and reaches the ERP at the
	// same time: the ERP answers each create only after a delay.
	warmPool(t, e.pool, n)
	if err := e.sim.SetFaults(erpsim.Faults{Latency: 100 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	start := make(chan struct{})
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		msg := delivery(t, m)
		wg.Go(func() {
			<-start
			errs[i] = e.handler.Handle(msg)
		})
	}
	close(start)
	wg.Wait()
	succeeded := 0
	for i, err := range errs {
		if err == nil {
			succeeded++
			continue
		}
		var ee *domain.ERPError
		if !errors.As(err, &ee) || ee.Class != domain.ErrorTransient {
			t.Errorf("delivery %d: %v, want success or a transient ERP error (key in flight)", i, err)
		}
	}
	if succeeded == 0 {
		t.Fatalf("no concurrent delivery succeeded: %v", errs)
	}
	// The transport redelivers the failed ones.
	for i, err := range errs {
		if err != nil {
			if err := e.handler.Handle(delivery(t, m)); err != nil {
				t.Fatalf("redelivery of %d: %v", i, err)
			}
		}
	}
	e.assertInvoicedOnce(t, d.ID, key)
	t.Logf("%d of %d concurrent deliveries succeeded; ERP stats %+v", succeeded, n, e.sim.Stats())
}

// TestERPCommittedLocalCommitLost (F2): the ERP created the invoice but the
// local transaction recording it never committed. The redelivery gets the
// stored response replayed and records the same invoice number.
func TestERPCommittedLocalCommitLost(t *testing.T) {
	t.Parallel()

	t.Run("first attempt ended after the ERP call", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, 4, erpsim.Config{})
		d, m := e.wonDeal(t)
		req := invoiceRequest(t, m)
		// The first attempt, up to and including the ERP's 2xx, with the
		// request the handler sends.
		lines := make([]erp.Line, len(req.Lines))
		for i, l := range req.Lines {
			lines[i] = erp.Line{SKU: l.SKU, Description: l.Description, Quantity: l.Quantity, UnitPrice: l.UnitPrice}
		}
		first, err := e.client.CreateInvoice(t.Context(), erp.InvoiceRequest{
			Key: req.IdempotencyKey, Reference: req.DealID, CustomerID: req.Customer.ID, CustomerName: req.Customer.Name,
			Currency: req.Currency, Lines: lines, Total: req.Total,
		})
		if err != nil {
			t.Fatal(err)
		}
		e.assertNotInvoiced(t, d.ID, req.IdempotencyKey)

		if err := e.handler.Handle(delivery(t, m)); err != nil {
			t.Fatalf("redelivery: %v", err)
		}
		e.assertInvoicedOnce(t, d.ID, req.IdempotencyKey)
		if got := e.sim.Invoices()[0].Number; got != first.Number {
			t.Fatalf("recorded invoice %s, the first attempt created %s", got, first.Number)
		}
		if r := e.sim.Stats().AttemptsByOutcome[erpsim.OutcomeReplayed]; r != 1 {
			t.Fatalf("%d replayed ERP attempts, want 1 (stats %+v)", r, e.sim.Stats())
		}
	})

	t.Run("local commit failed", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, 4, erpsim.Config{})
		d, m := e.wonDeal(t)
		key := *d.IdempotencyKey
		crashing, errCrash := e.crashingBeforeCommit()
		if err := crashing.Handle(delivery(t, m)); !errors.Is(err, errCrash) {
			t.Fatalf("first attempt: %v, want the injected crash", err)
		}
		if st := e.sim.Stats(); st.Creates != 1 {
			t.Fatalf("ERP creates after the first attempt = %d, want 1", st.Creates)
		}
		e.assertNotInvoiced(t, d.ID, key)

		if err := e.handler.Handle(delivery(t, m)); err != nil {
			t.Fatalf("redelivery: %v", err)
		}
		e.assertInvoicedOnce(t, d.ID, key)
		if r := e.sim.Stats().AttemptsByOutcome[erpsim.OutcomeReplayed]; r != 1 {
			t.Fatalf("%d replayed ERP attempts, want 1 (stats %+v)", r, e.sim.Stats())
		}
	})
}

// TestRedeliveryLooksUpBeforeCreating: the first delivery created the
// invoice and failed to record it (its commit failed) without recording a
// failed attempt. The redelivery (queue attempt 2) looks the invoice up by
// key and records it: no second create reaches the ERP, which matters for
// an ERP that deduplicates nothing. The control: a first delivery (attempt
// 1) of another deal creates without a lookup.
func TestRedeliveryLooksUpBeforeCreating(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 4, erpsim.Config{})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey
	crashing, errCrash := e.crashingBeforeCommit()
	first := delivery(t, m)
	first.Metadata.Set(queue.MetadataAttempt, "1")
	if err := crashing.Handle(first); !errors.Is(err, errCrash) {
		t.Fatalf("first delivery: %v, want the injected crash", err)
	}
	again := delivery(t, m)
	again.Metadata.Set(queue.MetadataAttempt, "2")
	if err := e.handler.Handle(again); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	e.assertInvoicedOnce(t, d.ID, key)
	if st := e.sim.Stats(); st.Attempts != 1 || st.Creates != 1 {
		t.Fatalf("ERP stats %+v: want the one create of the first delivery, no second POST", st)
	}

	c := newEnv(t, 4, erpsim.Config{})
	d2, m2 := c.wonDeal(t)
	fresh := delivery(t, m2)
	fresh.Metadata.Set(queue.MetadataAttempt, "1")
	if err := c.handler.Handle(fresh); err != nil {
		t.Fatalf("control: a first delivery: %v", err)
	}
	c.assertInvoicedOnce(t, d2.ID, *d2.IdempotencyKey)
	if st := c.sim.Stats(); st.Attempts != 1 || st.Creates != 1 {
		t.Fatalf("control: ERP stats %+v, want one create", st)
	}
}

// TestERPFailureNacksAndRecordsNothing: while every create fails, Handle
// returns an error (the message is nacked) and nothing is recorded; once
// the ERP recovers the redelivery invoices the deal.
func TestERPFailureNacksAndRecordsNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 4, erpsim.Config{})
	d, m := e.wonDeal(t)
	key := *d.IdempotencyKey
	if err := e.sim.SetFaults(erpsim.Faults{ErrorRate: 1}); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		err := e.handler.Handle(delivery(t, m))
		var ee *domain.ERPError
		if !errors.As(err, &ee) || ee.Class != domain.ErrorTransient {
			t.Fatalf("delivery %d with the ERP failing: %v, want a transient ERP error", i+1, err)
		}
	}
	if st := e.sim.Stats(); st.Creates != 0 || st.AttemptsByOutcome[erpsim.OutcomeFault] != 2 {
		t.Fatalf("ERP stats %+v, want 2 faulted attempts and no create", st)
	}
	e.assertNotInvoiced(t, d.ID, key)

	if err := e.sim.SetFaults(erpsim.Faults{}); err != nil {
		t.Fatal(err)
	}
	if err := e.handler.Handle(delivery(t, m)); err != nil {
		t.Fatalf("delivery after recovery: %v", err)
	}
	e.assertInvoicedOnce(t, d.ID, key)
}
