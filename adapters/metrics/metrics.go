// Package metrics exposes dealbridge's health to Prometheus: a per-process
// registry, a collector that measures the pipeline from Postgres at scrape
// time (relay lag, work-queue depth and age, unreconciled deals, dead
// letters, alerts, sagas), ERP call counters and latencies, and the HTTP
// handlers that serve them.
//
// Nothing here uses Prometheus's global default registry: every process
// builds its own with NewRegistry, so tests (and `dev`, which runs every
// process in one) never collide.
package metrics

import (
	"log/slog"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every dealbridge metric.
const Namespace = "dealbridge"

// NewRegistry returns a registry holding the Go runtime and process
// collectors and a Collector over pool (see Config for its settings).
// Processes add their own metrics (ERP calls, Watermill router) to it.
func NewRegistry(pool *pgxpool.Pool, cfg Config) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		NewCollector(pool, cfg),
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return reg, nil
}

// Handler serves the metrics of reg in the Prometheus exposition formats.
// A scrape that takes longer than 30s is cut off (Collector's own queries
// stop much earlier).
func Handler(reg *prometheus.Registry, logger *slog.Logger) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		ErrorHandling:       promhttp.ContinueOnError,
		Registry:            reg, // promhttp_metric_handler_errors_total
		MaxRequestsInFlight: 4,
		Timeout:             30 * time.Second,
	})
}

// Mux is the handler of a metrics-only listener (relay and handler
// processes, --metrics-listen): GET /metrics and GET /healthz (liveness:
// the process is up; it does not touch the database).
func Mux(reg *prometheus.Registry, logger *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", Handler(reg, logger))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"status":"ok"}` + "\n"))
	})
	return mux
}
