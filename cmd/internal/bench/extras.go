package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
	"github.com/dealbridge/dealbridge/projections"
)

// ReplayResult is the replay rebuild's measurement.
type ReplayResult struct {
	Events        int64   `json:"events"`
	Seconds       float64 `json:"rebuild_s"`
	EventsPerSec  float64 `json:"events_per_s"`
	CPULoad       float64 `json:"cpu_replayer_s"`
	CPUPostgres   float64 `json:"cpu_postgres_s"`
	SeededSeconds float64 `json:"seed_s"`
	// Runs are the events/s of every rebuild; the fields above are the
	// fastest one's.
	Runs []float64 `json:"runs_events_per_s"`
}

// replayRuns is how many times the rebuild runs: about a second each, a
// single one measured a momentary slowdown of the machine as much as the
// code (83,000 to 156,000 events/s in single runs of the same code).
const replayRuns = 3

// runReplay seeds a log of about cfg.ReplayEvents events into a fresh
// database and times projections.Replay's rebuild of every projection from
// it (no verify, no swap), as `dealbridge replay --rebuild` does, replayRuns
// times; the fastest counts, as in go test -bench.
func (h *harness) runReplay(ctx context.Context) (ReplayResult, error) {
	var r ReplayResult
	db, err := h.newPhaseDB(ctx, "replay")
	if err != nil {
		return r, err
	}
	defer func() { _ = h.srv.dropDatabase(context.WithoutCancel(ctx), db) }()
	pool, err := h.srv.newPool(ctx, db, "dealbridge-bench-replay", 8)
	if err != nil {
		return r, err
	}
	defer pool.Close()
	t0 := time.Now()
	if err := seedLog(ctx, pool, h.cfg.ReplayEvents); err != nil {
		return r, err
	}
	r.SeededSeconds = time.Since(t0).Seconds()
	for range replayRuns {
		pg0, pgOK := h.srv.cpu()
		self0 := selfCPU()
		rep, err := projections.Replay(ctx, pool, projections.Options{})
		if err != nil {
			return r, err
		}
		pg1, _ := h.srv.cpu()
		r.Runs = append(r.Runs, rep.EventsPerSecond())
		if rep.EventsPerSecond() < r.EventsPerSec {
			continue
		}
		r.CPULoad = (selfCPU() - self0).Seconds()
		r.CPUPostgres = -1
		if pgOK {
			r.CPUPostgres = (pg1 - pg0).Seconds()
		}
		r.Events, r.Seconds, r.EventsPerSec = rep.Events, rep.Elapsed.Seconds(), rep.EventsPerSecond()
	}
	return r, nil
}

// seedLog appends about target events straight into the event log (COPY),
// built with the domain's own aggregates, after the template's own: deals
// created, won with their allocations, 0-2 failed ERP attempts, then
// invoiced, or (1 in 20) compensated with a dead letter and an alert; 1 in
// 10 stays open. (projections/bench_test.go seeds the same mix.)
func seedLog(ctx context.Context, pool *pgxpool.Pool, target int) error {
	var have int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM events`).Scan(&have); err != nil {
		return fmt.Errorf("seed log: %w", err)
	}
	rng := rand.New(rand.NewPCG(7, 7))
	meta, _ := json.Marshal(benchMeta)
	type stockState struct {
		available int64
		version   int
	}
	stock := map[string]*stockState{}
	var rows [][]any
	var addErr error
	add := func(c domain.Change) {
		for i, e := range c.Events {
			p, err := json.Marshal(e)
			if err != nil && addErr == nil {
				addErr = err
			}
			rows = append(rows, []any{c.StreamID, c.ExpectedVersion + i + 1, e.EventType(), domain.CurrentSchemaVersion(e.EventType()), p, meta})
		}
	}
	skus := make([]string, 200)
	for i := range skus {
		skus[i] = fmt.Sprintf("RPL-%03d", i)
		c, err := domain.InventoryChange(skus[i], 1_000_000, domain.Stock{})
		if err != nil {
			return err
		}
		add(c)
		stock[skus[i]] = &stockState{available: 1_000_000, version: 1}
	}
	snapshot := func() map[string]domain.Stock {
		m := map[string]domain.Stock{}
		for k, v := range stock {
			m[k] = domain.Stock{SKU: k, Available: v.available, Version: v.version}
		}
		return m
	}
	track := func(id string, d *domain.Deal, changes []domain.Change) {
		for _, c := range changes {
			add(c)
			for _, e := range c.Events {
				switch e := e.(type) {
				case domain.InventoryAllocated:
					stock[e.SKU].available -= e.Quantity
					stock[e.SKU].version++
				case domain.InventoryReleased:
					stock[e.SKU].available += e.Quantity
					stock[e.SKU].version++
				}
			}
			if c.StreamID == domain.DealStream(id) {
				d.Apply(c.Events...)
			}
		}
	}
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for have+len(rows) < target {
		id := watermill.NewUUID()
		var lines []domain.Line
		for range 1 + rng.IntN(3) {
			lines = append(lines, domain.Line{SKU: skus[rng.IntN(len(skus))], Description: "Widget",
				Quantity: int64(1 + rng.IntN(5)), UnitPrice: fmt.Sprintf("%d.%02d", 1+rng.IntN(900), rng.IntN(100))})
		}
		d, c, err := domain.NewDeal(id, domain.Customer{ID: fmt.Sprintf("C-%d", rng.IntN(5000)), Name: "Customer"}, "EUR", lines)
		if err != nil {
			return err
		}
		add(c)
		if rng.IntN(10) == 0 {
			continue // stays open
		}
		changes, err := d.Close(domain.OutcomeWon, nil, snapshot())
		if err != nil {
			return err
		}
		track(id, d, changes)
		key := d.InvoiceKey()
		fails := rng.IntN(3)
		for i := range fails {
			add(domain.Change{StreamID: domain.SagaStream(key), ExpectedVersion: i, Events: []domain.Event{domain.InvoiceAttemptFailed{
				DealID: id, IdempotencyKey: key, Attempt: i + 1, ErrorClass: domain.ErrorTransient, StatusCode: 503,
				Message: "unavailable", AttemptedAt: at, NextAttemptAt: at.Add(time.Second)}}})
		}
		if rng.IntN(20) == 0 {
			revert, err := d.Revert(key, "rejected", snapshot())
			if err != nil {
				return err
			}
			add(domain.Change{StreamID: domain.SagaStream(key), ExpectedVersion: fails, Events: []domain.Event{domain.InvoiceFailed{
				DealID: id, IdempotencyKey: key, ErrorClass: domain.ErrorPermanent, Reason: "rejected", Attempts: fails + 1}}})
			track(id, d, revert)
			dl := domain.MessageDeadLettered{DeadLetterID: watermill.NewUUID(), DealID: id, IdempotencyKey: key, MessageUUID: watermill.NewUUID(),
				Topic: outbox.InvoiceTopic, Handler: "invoice-saga", Metadata: map[string]string{"k": key}, Reason: "rejected",
				ErrorClass: "permanent", Attempts: fails + 1, FirstFailureAt: at, LastFailureAt: at}
			dl.SetPayload([]byte(`{"deal_id":"` + id + `"}`))
			add(domain.Change{StreamID: domain.DeadLetterStream(dl.DeadLetterID), Events: []domain.Event{dl}})
			al := domain.AlertRaised{AlertID: watermill.NewUUID(), Kind: domain.AlertKindInvoiceFailed, Severity: domain.SeverityCritical,
				DealID: id, IdempotencyKey: key, DeadLetterID: dl.DeadLetterID, Message: "not invoiced"}
			add(domain.Change{StreamID: domain.AlertStream(al.AlertID), Events: []domain.Event{al}})
			continue
		}
		c2, err := d.RecordInvoice(key, "INV-"+id[:8], fails+1)
		if err != nil {
			return err
		}
		add(*c2)
		d.Apply(c2.Events...)
	}
	if addErr != nil {
		return fmt.Errorf("seed log: %w", addErr)
	}
	if _, err := pool.CopyFrom(ctx, pgx.Identifier{"events"}, []string{"stream_id", "stream_version", "type", "schema_version", "payload", "metadata"},
		pgx.CopyFromRows(rows)); err != nil {
		return fmt.Errorf("seed log: copy events: %w", err)
	}
	if _, err := pool.Exec(ctx, `ANALYZE events`); err != nil {
		return fmt.Errorf("seed log: %w", err)
	}
	return nil
}

// BulkResult is the bulk re-inject's measurement.
type BulkResult struct {
	Entries       int     `json:"entries"`
	Deals         int     `json:"deals"`
	Done          int     `json:"done"`
	Skipped       int     `json:"skipped"`
	Seconds       float64 `json:"run_s"`
	EntriesPerSec float64 `json:"entries_per_s"`
	CPULoad       float64 `json:"cpu_runner_s"`
	CPUPostgres   float64 `json:"cpu_postgres_s"`
}

// runBulk makes cfg.BulkDeals deals whose invoices the ERP rejected
// (compensated exactly as the saga does) with cfg.BulkPerDeal dead letters
// each, then times one bulk re-inject of all of them (Store.StartBulkReinject
// + RunBulkReinject, unlimited rate), as `dealbridge dlq bulk-reinject`
// does.
func (h *harness) runBulk(ctx context.Context) (BulkResult, error) {
	var r BulkResult
	db, err := h.newPhaseDB(ctx, "bulk")
	if err != nil {
		return r, err
	}
	defer func() { _ = h.srv.dropDatabase(context.WithoutCancel(ctx), db) }()
	pool, err := h.srv.newPool(ctx, db, "dealbridge-bench-bulk", 12)
	if err != nil {
		return r, err
	}
	defer pool.Close()
	store := postgres.NewStore(pool)
	ids, err := openDeals(ctx, pool)
	if err != nil {
		return r, err
	}
	if len(ids) < h.cfg.BulkDeals {
		return r, fmt.Errorf("%d open deals in the template, %d needed", len(ids), h.cfg.BulkDeals)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, id := range ids[:h.cfg.BulkDeals] {
		g.Go(func() error { return makeDeadLetters(gctx, store, id, h.cfg.BulkPerDeal) })
	}
	if err := g.Wait(); err != nil {
		return r, err
	}
	actor := postgres.Actor{Name: "bench", Role: "admin"}
	op, total, err := store.StartBulkReinject(ctx, postgres.DeadLetterFilter{}, "bench", actor)
	if err != nil {
		return r, err
	}
	pg0, pgOK := h.srv.cpu()
	self0 := selfCPU()
	t0 := time.Now()
	p, err := store.RunBulkReinject(ctx, op, 0, 0, nil)
	if err != nil {
		return r, err
	}
	r.Seconds = time.Since(t0).Seconds()
	pg1, _ := h.srv.cpu()
	r.CPULoad = (selfCPU() - self0).Seconds()
	r.CPUPostgres = -1
	if pgOK {
		r.CPUPostgres = (pg1 - pg0).Seconds()
	}
	r.Entries, r.Deals, r.Done, r.Skipped = total, h.cfg.BulkDeals, p.Done, p.Skipped
	if r.Seconds > 0 {
		r.EntriesPerSec = float64(p.Done) / r.Seconds
	}
	if p.Done != total || p.Skipped != 0 {
		return r, fmt.Errorf("bulk re-inject: %+v of %d entries", p, total)
	}
	return r, nil
}

// makeDeadLetters closes deal id, compensates it as the saga does after the
// ERP rejected it (the first dead letter), and dead-letters perDeal-1
// copies of its message (exhausted) for the same close.
func makeDeadLetters(ctx context.Context, store *postgres.Store, id string, perDeal int) error {
	d, err := store.CloseDeal(ctx, id, domain.OutcomeWon, nil, benchMeta)
	if err != nil {
		return err
	}
	req := domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: *d.IdempotencyKey, CloseVersion: *d.CloseVersion,
		Customer: d.Customer, Currency: d.Currency, Lines: d.Lines, Total: d.Total}
	payload, err := json.Marshal(req)
	if err != nil {
		return err
	}
	now := time.Now()
	src := func() postgres.DeadLetterSource {
		return postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga", Payload: payload,
			Metadata: map[string]string{outbox.MetadataType: outbox.TypeInvoiceRequest, outbox.MetadataSchemaVersion: "1",
				outbox.MetadataIdempotencyKey: req.IdempotencyKey}}
	}
	res, err := store.Compensate(ctx, req, postgres.Failure{ErrorClass: "permanent", Reason: "unknown customer", Attempts: 1,
		FirstFailureAt: now, LastFailureAt: now}, src(), benchMeta)
	if err != nil {
		return err
	}
	if res.Outcome != postgres.Compensated {
		return fmt.Errorf("compensate deal %s: outcome %v", id, res.Outcome)
	}
	for j := 1; j < perDeal; j++ {
		if _, err := store.DeadLetter(ctx, id, req.IdempotencyKey, postgres.Failure{ErrorClass: domain.ClassExhausted,
			Reason: fmt.Sprintf("copy %d", j), Attempts: 1, FirstFailureAt: now, LastFailureAt: now}, src(), benchMeta); err != nil {
			return err
		}
	}
	return nil
}
