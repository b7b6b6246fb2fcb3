package integration

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// BenchmarkEndToEnd measures deals/s from close to invoiced with every part
// in this process: the HTTP API (httptest), the relay and the invoice saga
// handler (goroutines) and an ERP simulator without latency (httptest), on
// a fresh database, wired by cmd/app exactly as the processes are. b.N deals are opened before the timer starts; the timed
// part closes them all with 16 concurrent clients and waits until every one
// is invoiced.
//
// With skus=1 every deal takes stock of one SKU, so every close waits for
// the same inventory row lock (a hot product); with skus=16 the deals
// spread over 16 SKUs and the closes mostly run in parallel.
//
//	go test -run '^$' -bench BenchmarkEndToEnd -benchtime 500x ./integration/
func BenchmarkEndToEnd(b *testing.B) {
	for _, skus := range []int{1, 16} {
		b.Run(fmt.Sprintf("skus=%d", skus), func(b *testing.B) { benchmarkEndToEnd(b, skus) })
	}
}

func benchmarkEndToEnd(b *testing.B, skus int) {
	const closeWorkers = 16
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	dbURL := pgtest.NewDatabase(b)
	pcfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		b.Fatal(err)
	}
	pcfg.MaxConns = 40
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)

	sim, err := erpsim.New(erpsim.Config{Logger: logger})
	if err != nil {
		b.Fatal(err)
	}
	simSrv := httptest.NewServer(sim.Handler())
	b.Cleanup(func() {
		simSrv.Close()
		_ = sim.Close()
	})
	apiSrv := httptest.NewServer(httpapi.New(postgres.NewStore(pool), logger).Handler())
	b.Cleanup(apiSrv.Close)

	// The relay and the handler run until the benchmark's cleanup, which
	// must find that they stopped cleanly.
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() { errs <- app.RunRelay(ctx, pool, app.RelayConfig{}, logger) })
	wg.Go(func() { errs <- app.RunHandler(ctx, pool, app.HandlerConfig{ERPURL: simSrv.URL, Consumers: 8}, logger) })
	b.Cleanup(func() {
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !errors.Is(err, context.Canceled) {
				b.Errorf("relay/handler: %v", err)
			}
		}
	})

	crm := newClient(apiSrv.URL)
	sku := func(i int) string { return fmt.Sprintf("BENCH-%02d", i%skus) }
	for i := range skus {
		if _, err := crm.setInventory(sku(i), int64(b.N)); err != nil {
			b.Fatal(err)
		}
	}
	ids := make([]string, b.N)
	parallel(b, 8, b.N, func(i int) error {
		d, err := crm.createDeal(createDealJSON{
			Customer: customerJSON{ID: fmt.Sprintf("C-%d", i), Name: "Bench"},
			Currency: "USD",
			Lines:    []lineJSON{{SKU: sku(i), Description: "Widget", Quantity: 1, UnitPrice: "495.00"}},
		})
		ids[i] = d.ID
		return err
	})

	b.ResetTimer()
	start := time.Now()
	parallel(b, closeWorkers, b.N, func(i int) error {
		_, err := crm.closeDeal(ids[i])
		return err
	})
	deadline := time.Now().Add(5 * time.Minute)
	for {
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM deals WHERE status = 'invoiced'`).Scan(&n); err != nil {
			b.Fatal(err)
		}
		if n == b.N {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d deals invoiced after 5 minutes", n, b.N)
		}
		time.Sleep(5 * time.Millisecond)
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "deals/s")

	checkInvariantI4(b, pool, b.N)
	if st := sim.Stats(); st.Creates != b.N || st.MaxCreatesPerKey != 1 {
		b.Errorf("simulator stats %+v: want %d creates, 1 per key", st, b.N)
	}
}
