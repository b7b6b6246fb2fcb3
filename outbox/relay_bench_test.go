package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/outbox"
)

// BenchmarkRelay measures the relay into the Postgres work queue: 2,000
// outbox messages, each committed by its own transaction with its own
// ordering key (as closes write them), relayed in batches of 10 and 100,
// with the queue inserts held and sent with each batch's offset update
// (queue.DeferringBeginner, what `dealbridge relay` runs) and, for
// comparison, one round trip per message. It reports messages/s and the
// CPU per message in this process and in the relay pool's server
// processes.
//
//	go test -run '^$' -bench Relay -benchtime 3x ./outbox/
func BenchmarkRelay(b *testing.B) {
	for _, batch := range []int{10, 100} {
		for _, held := range []bool{true, false} {
			name := fmt.Sprintf("batch=%d/per-message", batch)
			if held {
				name = fmt.Sprintf("batch=%d/held", batch)
			}
			b.Run(name, func(b *testing.B) { benchmarkRelay(b, batch, held) })
		}
	}
}

func benchmarkRelay(b *testing.B, batch int, held bool) {
	const messages = 2000
	url := pgtest.NewDatabase(b)
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		b.Fatal(err)
	}
	cfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(b.Context(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)
	writers, err := pgxpool.New(b.Context(), url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(writers.Close)
	pub, err := queue.NewPublisher(pool, queue.PublisherConfig{}, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	rcfg := outbox.RelayConfig{PollInterval: 5 * time.Millisecond, BatchSize: batch}
	if held {
		rcfg.Beginner = queue.DeferringBeginner
	}
	pids := pgtest.BackendPIDs(b, pool)
	var (
		best         time.Duration
		pgCPU, goCPU time.Duration
		relayed      int
	)
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		for m := range messages {
			tx, err := writers.Begin(b.Context())
			if err != nil {
				b.Fatal(err)
			}
			msg := message.NewMessage(fmt.Sprintf("%d-%d", i, m), []byte(`{"deal_id":"d"}`))
			queue.SetOrderingKey(msg, fmt.Sprintf("deal-%d-%d", i, m))
			if err := outbox.PublishTx(b.Context(), tx, outbox.InvoiceTopic, msg); err != nil {
				b.Fatal(err)
			}
			if err := tx.Commit(b.Context()); err != nil {
				b.Fatal(err)
			}
		}
		relay, err := outbox.NewRelay(pool, pub, rcfg, slog.New(slog.DiscardHandler))
		if err != nil {
			b.Fatal(err)
		}
		pg0, go0 := pgtest.BackendsCPU(pids), pgtest.ProcessCPU()
		b.StartTimer()
		start := time.Now()
		ctx, cancel := context.WithCancel(b.Context())
		done := make(chan error, 1)
		go func() { done <- relay.Run(ctx) }()
		want := (i + 1) * messages
		for n := 0; n < want; {
			time.Sleep(2 * time.Millisecond)
			if err := writers.QueryRow(b.Context(), `SELECT count(*) FROM work_queue`).Scan(&n); err != nil {
				b.Fatal(err)
			}
		}
		took := time.Since(start)
		b.StopTimer()
		pgCPU += pgtest.BackendsCPU(pids) - pg0
		goCPU += pgtest.ProcessCPU() - go0
		relayed += messages
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		if best == 0 || took < best {
			best = took
		}
	}
	b.ReportMetric(float64(messages)/best.Seconds(), "msgs/s")
	b.ReportMetric(float64(goCPU.Microseconds())/float64(relayed), "go-cpu-µs/msg")
	b.ReportMetric(float64(pgCPU.Microseconds())/float64(relayed), "pg-cpu-µs/msg")
	b.ReportMetric(0, "ns/op")
}
