package app

import (
	"context"
	"log/slog"
	"net"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/dealbridge/dealbridge/adapters/metrics"
)

// NewMetricsRegistry returns the process's own Prometheus registry: Go
// runtime and process metrics and the pipeline measured from pool at
// scrape time (adapters/metrics). Each process has its own; nothing is
// registered globally.
func NewMetricsRegistry(pool *pgxpool.Pool, logger *slog.Logger) (*prometheus.Registry, error) {
	return metrics.NewRegistry(pool, metrics.Config{Logger: logger})
}

// RunWithMetrics runs run and, when ln is not nil, a metrics server on ln
// (GET /metrics of reg, GET /healthz) beside it. When either stops the other
// is stopped; the server shuts down gracefully. run's error comes first.
func RunWithMetrics(ctx context.Context, ln net.Listener, reg *prometheus.Registry, logger *slog.Logger, run func(context.Context) error) error {
	if ln == nil {
		return run(ctx)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer cancel() // run has stopped: so does the server, even on success
		return run(gctx)
	})
	g.Go(func() error { return ServeMetrics(gctx, ln, reg, logger) })
	return g.Wait()
}

// ServeMetrics serves GET /metrics of reg and GET /healthz on ln until ctx
// is done, then shuts down gracefully (see Serve).
func ServeMetrics(ctx context.Context, ln net.Listener, reg *prometheus.Registry, logger *slog.Logger) error {
	return Serve(ctx, ln, metrics.Mux(reg, logger), logger)
}
