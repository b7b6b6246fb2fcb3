package projections_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/projections"
)

// BenchmarkReplay measures the rebuild of every projection from a log of
// about 100,000 events (deals created, won with their allocations, failed
// attempts, invoices, compensations with alerts and dead letters).
//
//	go test -run '^$' -bench Replay -benchtime 3x ./projections/
//
// The events/s metric is the figure to compare with the targets (50,000
// events/s in issue 6, 100,000 in issue 9).
func BenchmarkReplay(b *testing.B) {
	pool := pgtest.NewPool(b)
	n := generateLog(b, pool, 100_000)
	// Fill the live tables once, event by event with Apply, so that the
	// last replay verifies the in-memory fold against Apply on this log.
	replay(b, pool, projections.Options{Swap: true, OneByOne: true})
	var (
		best   projections.Report
		events int64
	)
	pgCPU0, goCPU0 := postgresCPU(b, pool), pgtest.ProcessCPU()
	b.ResetTimer()
	for b.Loop() {
		r := replay(b, pool, projections.Options{})
		events += r.Events
		if best.Elapsed == 0 || r.Elapsed < best.Elapsed {
			best = r
		}
	}
	b.StopTimer()
	time.Sleep(200 * time.Millisecond) // let the replay's backends exit and be reaped
	pgCPU, goCPU := postgresCPU(b, pool)-pgCPU0, pgtest.ProcessCPU()-goCPU0
	if best.Events != n {
		b.Fatalf("replayed %d events, generated %d", best.Events, n)
	}
	requireMethod(b, best, projections.MethodFold)
	// Wall-clock speed of the fastest run, and the CPU time a replay costs
	// per event (Go + Postgres backends), which does not depend on what
	// else the machine is running: 2 cores / that cost is the ceiling.
	b.ReportMetric(best.EventsPerSecond(), "events/s")
	b.ReportMetric(float64(goCPU.Microseconds())/float64(events), "go-cpu-µs/event")
	b.ReportMetric(float64(pgCPU.Microseconds())/float64(events), "pg-cpu-µs/event")
	b.ReportMetric(0, "ns/op")
	if rep := replay(b, pool, projections.Options{Verify: true}); rep.Drift() {
		b.Fatal("the benchmark's replay differs from live")
	}
}

// generateLog writes a consistent log of about target events straight into
// the event log (COPY), built with the domain's own aggregates.
func generateLog(tb testing.TB, pool *pgxpool.Pool, target int) int64 {
	tb.Helper()
	ctx := tb.Context()
	rng := rand.New(rand.NewPCG(7, 7))
	meta, _ := json.Marshal(domain.Metadata{Actor: "bench", CorrelationID: "bench"})
	type stockState struct {
		available int64
		version   int
	}
	stock := map[string]*stockState{}
	var rows [][]any
	add := func(c domain.Change) {
		for i, e := range c.Events {
			p, err := json.Marshal(e)
			if err != nil {
				tb.Fatal(err)
			}
			rows = append(rows, []any{c.StreamID, c.ExpectedVersion + i + 1, e.EventType(), domain.CurrentSchemaVersion(e.EventType()), p, meta})
		}
	}
	skuNames := make([]string, 200)
	for i := range skuNames {
		skuNames[i] = fmt.Sprintf("SKU-%03d", i)
		c, _ := domain.InventoryChange(skuNames[i], 1_000_000, domain.Stock{})
		add(c)
		stock[skuNames[i]] = &stockState{available: 1_000_000, version: 1}
	}
	snapshot := func() map[string]domain.Stock {
		m := map[string]domain.Stock{}
		for k, v := range stock {
			m[k] = domain.Stock{SKU: k, Available: v.available, Version: v.version}
		}
		return m
	}
	for len(rows) < target {
		id := watermill.NewUUID()
		var lines []domain.Line
		for range 1 + rng.IntN(3) {
			lines = append(lines, domain.Line{SKU: skuNames[rng.IntN(len(skuNames))], Description: "Widget",
				Quantity: int64(1 + rng.IntN(5)), UnitPrice: fmt.Sprintf("%d.%02d", 1+rng.IntN(900), rng.IntN(100))})
		}
		d, c, err := domain.NewDeal(id, domain.Customer{ID: fmt.Sprintf("C-%d", rng.IntN(5000)), Name: "Customer"}, "EUR", lines)
		if err != nil {
			tb.Fatal(err)
		}
		add(c)
		if rng.IntN(10) == 0 {
			continue // stays open
		}
		changes, err := d.Close(domain.OutcomeWon, nil, snapshot())
		if err != nil {
			tb.Fatal(err)
		}
		for _, c := range changes {
			add(c)
			for _, e := range c.Events {
				if a, ok := e.(domain.InventoryAllocated); ok {
					stock[a.SKU].available -= a.Quantity
					stock[a.SKU].version++
				}
			}
			if c.StreamID == domain.DealStream(id) {
				d.Apply(c.Events...)
			}
		}
		key := d.InvoiceKey()
		fails := rng.IntN(3)
		at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		for i := range fails {
			add(domain.Change{StreamID: domain.SagaStream(key), ExpectedVersion: i, Events: []domain.Event{domain.InvoiceAttemptFailed{
				DealID: id, IdempotencyKey: key, Attempt: i + 1, ErrorClass: domain.ErrorTransient, StatusCode: 503,
				Message: "unavailable", AttemptedAt: at, NextAttemptAt: at.Add(time.Second)}}})
		}
		if rng.IntN(20) == 0 {
			revert, err := d.Revert(key, "rejected", snapshot())
			if err != nil {
				tb.Fatal(err)
			}
			add(domain.Change{StreamID: domain.SagaStream(key), ExpectedVersion: fails, Events: []domain.Event{domain.InvoiceFailed{
				DealID: id, IdempotencyKey: key, ErrorClass: domain.ErrorPermanent, Reason: "rejected", Attempts: fails + 1}}})
			for _, c := range revert {
				add(c)
				for _, e := range c.Events {
					if r, ok := e.(domain.InventoryReleased); ok {
						stock[r.SKU].available += r.Quantity
						stock[r.SKU].version++
					}
				}
				if c.StreamID == domain.DealStream(id) {
					d.Apply(c.Events...)
				}
			}
			dl := domain.MessageDeadLettered{DeadLetterID: watermill.NewUUID(), DealID: id, IdempotencyKey: key, MessageUUID: watermill.NewUUID(),
				Topic: "invoice-requests", Handler: "invoice-saga", Metadata: map[string]string{"k": key}, Reason: "rejected",
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
			tb.Fatal(err)
		}
		add(*c2)
		d.Apply(c2.Events...)
	}
	n, err := pool.CopyFrom(ctx, pgx.Identifier{"events"}, []string{"stream_id", "stream_version", "type", "schema_version", "payload", "metadata"},
		pgx.CopyFromRows(rows))
	if err != nil {
		tb.Fatalf("copy events: %v", err)
	}
	if _, err := pool.Exec(context.WithoutCancel(ctx), `ANALYZE events`); err != nil {
		tb.Fatal(err)
	}
	return n
}

// postgresCPU is the CPU time used by the exited backends of the server
// (the postmaster's reaped children): the test binary's private cluster
// serves nothing else. Zero on a shared server (TEST_DATABASE_URL).
func postgresCPU(tb testing.TB, pool *pgxpool.Pool) time.Duration {
	var dir string
	if err := pool.QueryRow(tb.Context(), `SHOW data_directory`).Scan(&dir); err != nil {
		return 0
	}
	pidFile, err := os.ReadFile(filepath.Join(dir, "postmaster.pid"))
	if err != nil {
		return 0
	}
	pid := strings.TrimSpace(strings.SplitN(string(pidFile), "\n", 2)[0])
	stat, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	// Fields after the command: state is f[0]; cutime and cstime are the
	// 16th and 17th fields of the line, f[13] and f[14] here.
	cu, _ := strconv.ParseInt(f[13], 10, 64)
	cs, _ := strconv.ParseInt(f[14], 10, 64)
	return time.Duration(cu+cs) * time.Second / 100 // clock ticks (USER_HZ = 100)
}
