// Package bench is `dealbridge bench`: one run that measures, against one
// PostgreSQL server and interleaved so that machine noise hits every
// contender alike,
//
//   - the ceiling: the close-deal write transaction alone
//     (postgres.Store.CloseDeal: deal update, inventory, events, outbox) at
//     several numbers of concurrent clients;
//   - dealbridge end to end: close → outbox → relay → work queue → handler →
//     ERP simulator → invoice recorded, with the relay, the handlers and the
//     ERP simulator running as child processes of this binary, at maximum
//     rate and at fixed open-loop rates, and its scaling with handler
//     processes and relay batch sizes;
//   - the same saga on River (github.com/riverqueue/river): the close
//     transaction inserts a River job instead of the outbox message, a River
//     worker (a child process too) calls the same ERP simulator with the same
//     idempotency key and records the invoice and completes the job in one
//     transaction;
//   - the replay rebuild of every projection and the bulk re-inject of dead
//     letters.
//
// Each phase runs in a fresh database copied from one template (migrated,
// River-migrated, stocked, with a pool of open deals), so no phase inherits
// another's tables. The report (markdown, an SVG chart, result.json) says how
// every number was measured.
package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// Config configures a run. Zero values mean the defaults (or the quick
// defaults when Quick is set).
type Config struct {
	// Bin is the dealbridge binary whose relay, handler, erp-sim and
	// `bench river-worker` subcommands run as child processes. Required.
	Bin string
	// DatabaseURL names the PostgreSQL server to run on; its role must be
	// allowed to CREATE DATABASE (each phase gets a database of its own,
	// all dropped at the end). Empty: a private cluster in WorkDir, started
	// from the machine's PostgreSQL server binaries.
	DatabaseURL string
	// PGSettings are extra server settings of the private cluster.
	PGSettings map[string]string
	// WorkDir holds the private cluster and the child processes' logs.
	// Default: a temporary directory, removed at the end unless KeepWorkDir.
	WorkDir     string
	KeepWorkDir bool
	// OutDir receives README.md, chart.svg and result.json. Empty: none.
	OutDir string
	// Command is the command line that reproduces the run, for the report.
	Command string

	// Quick is a tiny run of a few seconds per contender (tests, smoke).
	Quick bool
	// Phase is the load time of each phase (default 10s; quick 1.5s).
	Phase time.Duration
	// Rounds is how many times the main comparison runs (the ceiling,
	// both contenders at maximum rate and at each fixed rate), interleaved;
	// the targets use the medians of the rounds (default 3; quick 1).
	Rounds int
	// Drain bounds the wait for the last invoices after the load (default
	// 60s).
	Drain time.Duration
	// CeilingClients are the concurrent clients of the ceiling phases
	// (default 8 and 32; quick 8).
	CeilingClients []int
	// Closers are the concurrent closing clients at maximum rate
	// (default 8).
	Closers int
	// MaxBacklog bounds the deals closed but not yet invoiced at maximum
	// rate: the closers wait while the pipeline is this far behind, so that
	// input equals output and the rate measured is sustainable (default
	// 2000).
	MaxBacklog int
	// Rates are the open-loop rates in deals/s (default 250, 500, 1000;
	// quick 100).
	Rates []float64
	// Handlers are the handler process counts of the scaling phases; the
	// first is the main configuration (default 1, 2, 4; quick 1, 2).
	Handlers []int
	// BatchSizes are the relay batch sizes of the scaling phases; the
	// first is the main configuration (default 100, 10, 1000; quick 100).
	BatchSizes []int
	// Consumers is each handler's --consumers (default 32: one handler's
	// concurrency at which its throughput is not bounded by in-flight ERP
	// calls on this kind of machine; the handler's own default is 8, a
	// gentler load on a real ERP).
	Consumers int
	// RiverWorkers are the River worker's MaxWorkers; the first is River's
	// main configuration, the others run at maximum rate only (default
	// 100, as River's documentation sizes it, and Consumers: the same
	// concurrency as one handler).
	RiverWorkers []int
	// RiverFetchCooldown and RiverFetchPoll are River's FetchCooldown and
	// FetchPollInterval (zero: River's defaults, 100ms and 1s).
	RiverFetchCooldown, RiverFetchPoll time.Duration
	// RelayPoll and QueuePoll are the relay's --relay-poll-interval and
	// the handlers' --queue-poll-interval (zero: the product defaults).
	RelayPoll, QueuePoll time.Duration
	// ChildLogLevel is the children's --log-level (default warn: per-deal
	// info lines would measure the logger).
	ChildLogLevel string
	// SKUs is the number of stocked SKUs the deals' lines spread over
	// (default 1000).
	SKUs int
	// PoolDeals is the number of open deals in the template (default
	// 2000/s × Phase, at least what the fastest open-loop rate needs). A
	// phase that uses them up ends early, and says so.
	PoolDeals int
	// ReplayEvents is the size of the seeded log the replay rebuilds
	// (default 100,000; quick 3,000). Negative: no replay phase.
	ReplayEvents int
	// BulkDeals × BulkPerDeal dead letters are bulk re-injected (default
	// 100 × 10; quick 10 × 3). Negative BulkDeals: no bulk phase.
	BulkDeals, BulkPerDeal int

	// Log receives progress (default: discard).
	Log *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Quick {
		c.Phase = cmp.Or(c.Phase, 1500*time.Millisecond)
		c.Rounds = cmp.Or(c.Rounds, 1)
		c.Drain = cmp.Or(c.Drain, 30*time.Second)
		c.CeilingClients = orSlice(c.CeilingClients, []int{8})
		c.Rates = orSlice(c.Rates, []float64{100})
		c.Handlers = orSlice(c.Handlers, []int{1, 2})
		c.BatchSizes = orSlice(c.BatchSizes, []int{100})
		c.RiverWorkers = orSlice(c.RiverWorkers, []int{100})
		c.SKUs = cmp.Or(c.SKUs, 50)
		c.MaxBacklog = cmp.Or(c.MaxBacklog, 200)
		c.ReplayEvents = cmp.Or(c.ReplayEvents, 3000)
		c.BulkDeals = cmp.Or(c.BulkDeals, 10)
		c.BulkPerDeal = cmp.Or(c.BulkPerDeal, 3)
		c.PoolDeals = cmp.Or(c.PoolDeals, 1200)
	}
	c.Phase = cmp.Or(c.Phase, 10*time.Second)
	c.Rounds = cmp.Or(c.Rounds, 3)
	c.Drain = cmp.Or(c.Drain, 60*time.Second)
	c.CeilingClients = orSlice(c.CeilingClients, []int{8, 32})
	c.Closers = cmp.Or(c.Closers, 8)
	c.MaxBacklog = cmp.Or(c.MaxBacklog, 2000)
	c.Rates = orSlice(c.Rates, []float64{250, 500, 1000})
	c.Handlers = orSlice(c.Handlers, []int{1, 2, 4})
	c.BatchSizes = orSlice(c.BatchSizes, []int{100, 10, 1000})
	c.Consumers = cmp.Or(c.Consumers, 32)
	c.RiverWorkers = orSlice(c.RiverWorkers, []int{100, c.Consumers})
	c.ChildLogLevel = cmp.Or(c.ChildLogLevel, "warn")
	c.SKUs = cmp.Or(c.SKUs, 1000)
	c.ReplayEvents = cmp.Or(c.ReplayEvents, 100_000)
	c.BulkDeals = cmp.Or(c.BulkDeals, 100)
	c.BulkPerDeal = cmp.Or(c.BulkPerDeal, 10)
	if c.PoolDeals == 0 {
		need := 2000 * c.Phase.Seconds()
		for _, r := range c.Rates {
			need = max(need, r*c.Phase.Seconds()*1.1)
		}
		c.PoolDeals = int(need) + 100
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c
}

// orSlice is cmp.Or for slices: v unless it is empty.
func orSlice[T any](v, def []T) []T {
	if len(v) == 0 {
		return def
	}
	return v
}

func (c Config) validate() error {
	var errs []error
	if c.Bin == "" {
		errs = append(errs, errors.New("bench: Config.Bin (the dealbridge binary) is required"))
	}
	for _, n := range append(append(append([]int{c.Closers, c.Consumers, c.SKUs, c.MaxBacklog, c.Rounds}, c.CeilingClients...), c.Handlers...), append(c.BatchSizes, c.RiverWorkers...)...) {
		if n <= 0 {
			errs = append(errs, fmt.Errorf("bench: counts, sizes and clients must be positive, got %d", n))
			break
		}
	}
	for _, r := range c.Rates {
		if r <= 0 {
			errs = append(errs, fmt.Errorf("bench: rate %v must be positive", r))
		}
	}
	if c.Phase <= 0 || c.Drain <= 0 {
		errs = append(errs, errors.New("bench: phase and drain must be positive"))
	}
	return errors.Join(errs...)
}

// Run runs the benchmark and returns its result; with cfg.OutDir set it
// also writes the report there. A contender that loses, duplicates or
// strands a deal does not stop the run: Result.Verified says so.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Log
	workDir := cfg.WorkDir
	if workDir == "" {
		d, err := os.MkdirTemp("", "dealbridge-bench-")
		if err != nil {
			return nil, fmt.Errorf("bench: work dir: %w", err)
		}
		workDir = d
		if !cfg.KeepWorkDir {
			defer os.RemoveAll(workDir)
		}
	}
	workDir, err := filepath.Abs(workDir)
	if err != nil {
		return nil, fmt.Errorf("bench: work dir: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(workDir, "logs"), 0o755); err != nil {
		return nil, fmt.Errorf("bench: work dir: %w", err)
	}
	// The private cluster runs as the postgres user when we are root: let
	// it traverse the work directory.
	_ = os.Chmod(workDir, 0o755)

	start := time.Now()
	srv, err := openServer(ctx, cfg, workDir)
	if err != nil {
		return nil, err
	}
	defer srv.close(context.WithoutCancel(ctx))

	h := &harness{cfg: cfg, srv: srv, logDir: filepath.Join(workDir, "logs"), log: log}
	res := &Result{Started: start, Command: cfg.Command, Quick: cfg.Quick}
	res.Machine = describeMachine(ctx, srv)
	res.Config = describeConfig(cfg)

	log.Info("bench: preparing the template database", "deals", cfg.PoolDeals, "skus", cfg.SKUs)
	t0 := time.Now()
	if err := h.prepareTemplate(ctx); err != nil {
		return nil, err
	}
	res.SetupSeconds = time.Since(t0).Seconds()
	log.Info("bench: template ready", "elapsed", time.Since(t0).Round(time.Millisecond))

	for _, p := range plan(cfg) {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		log.Info("bench: phase", "name", p.name())
		r, err := h.runPhase(ctx, p)
		if err != nil {
			return nil, fmt.Errorf("bench: phase %s: %w", p.name(), err)
		}
		log.Info("bench: phase done", "name", p.name(), "summary", r.summary())
		res.Phases = append(res.Phases, r)
	}
	if cfg.ReplayEvents > 0 {
		log.Info("bench: replay rebuild", "events", cfg.ReplayEvents)
		r, err := h.runReplay(ctx)
		if err != nil {
			return nil, fmt.Errorf("bench: replay: %w", err)
		}
		res.Replay = &r
	}
	if cfg.BulkDeals > 0 {
		log.Info("bench: bulk re-inject", "entries", cfg.BulkDeals*cfg.BulkPerDeal)
		r, err := h.runBulk(ctx)
		if err != nil {
			return nil, fmt.Errorf("bench: bulk re-inject: %w", err)
		}
		res.Bulk = &r
	}
	res.TotalSeconds = time.Since(start).Seconds()
	res.finish()
	if cfg.OutDir != "" {
		if err := res.Write(cfg.OutDir); err != nil {
			return res, err
		}
	}
	return res, nil
}

// harness is one run's shared state.
type harness struct {
	cfg    Config
	srv    *server
	logDir string
	log    *slog.Logger
	seq    int // phase databases made so far
}
