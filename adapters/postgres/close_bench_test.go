package postgres_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
)

// BenchmarkCloseDeal measures the close transaction alone (the bench
// command's ceiling): 2,000 won closes by 8 concurrent clients over 100
// SKUs, with the CPU each costs in this process and in the pool's server
// processes (the relays' wake-up included, as it rides with the commit).
//
//	go test -run '^$' -bench CloseDeal -benchtime 3x ./adapters/postgres/
func BenchmarkCloseDeal(b *testing.B) {
	const deals, clients, skus = 2000, 8, 100
	pool := newBenchPool(b, clients+1)
	store := postgres.NewStore(pool)
	ctx := b.Context()
	for i := range skus {
		if _, err := store.SetInventory(ctx, fmt.Sprintf("SKU-%03d", i), 10_000_000, meta); err != nil {
			b.Fatal(err)
		}
	}
	pids := pgtest.BackendPIDs(b, pool)
	var (
		best         time.Duration
		pgCPU, goCPU time.Duration
		closed       int
	)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		ids := make([]string, deals)
		for d := range ids {
			v, err := store.CreateDeal(ctx, customer, "EUR", lines(fmt.Sprintf("SKU-%03d", (i*deals+d)%skus), 1), meta)
			if err != nil {
				b.Fatal(err)
			}
			ids[d] = v.ID
		}
		pg0, go0 := pgtest.BackendsCPU(pids), pgtest.ProcessCPU()
		b.StartTimer()
		start := time.Now()
		var next atomic.Int64
		var g errgroup.Group
		for range clients {
			g.Go(func() error {
				for {
					n := next.Add(1) - 1
					if n >= deals {
						return nil
					}
					if _, err := store.CloseDeal(ctx, ids[n], domain.OutcomeWon, nil, meta); err != nil {
						return err
					}
				}
			})
		}
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
		took := time.Since(start)
		b.StopTimer()
		pgCPU += pgtest.BackendsCPU(pids) - pg0
		goCPU += pgtest.ProcessCPU() - go0
		closed += deals
		if best == 0 || took < best {
			best = took
		}
	}
	b.ReportMetric(float64(deals)/best.Seconds(), "closes/s")
	b.ReportMetric(float64(goCPU.Microseconds())/float64(closed), "go-cpu-µs/close")
	b.ReportMetric(float64(pgCPU.Microseconds())/float64(closed), "pg-cpu-µs/close")
	b.ReportMetric(0, "ns/op")
}
