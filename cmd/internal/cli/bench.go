package cli

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/dealbridge/dealbridge/cmd/internal/bench"
)

// runBench runs the benchmark of issue 9 (package bench). `bench
// river-worker` is the River contender's worker process, started by the
// benchmark itself.
func runBench(ctx context.Context, env Env, args []string) error {
	if len(args) > 0 && args[0] == "river-worker" {
		return runBenchRiverWorker(ctx, env, args[1:])
	}
	var (
		cfg                            bench.Config
		logLevel                       string
		rates, ceiling, hs, bs, pg, rw string
	)
	f := newFlags(env, "bench", "bench [--quick] [--out DIR] [flags]")
	f.string(&cfg.DatabaseURL, "database-url", "DATABASE_URL", "", "PostgreSQL server to run on, as a URL whose role may CREATE DATABASE (default: a private cluster from the local server binaries)")
	f.string(&cfg.OutDir, "out", "DEALBRIDGE_BENCH_OUT", "", "directory for README.md, chart.svg and result.json (e.g. docs/bench)")
	f.BoolVar(&cfg.Quick, "quick", false, "a tiny run of a few seconds per phase (smoke test; its numbers mean nothing)")
	f.duration(&cfg.Phase, "phase", "DEALBRIDGE_BENCH_PHASE", 0, "load time of each phase (default 10s; --quick 1.5s)")
	f.int(&cfg.Rounds, "rounds", "DEALBRIDGE_BENCH_ROUNDS", 0, "times the main comparison (ceiling, both contenders at maximum rate and at each rate) runs, interleaved; targets use the medians (default 3; --quick 1)")
	f.string(&rates, "rates", "DEALBRIDGE_BENCH_RATES", "", "open-loop rates in deals/s, comma-separated (default 250,500,1000)")
	f.string(&ceiling, "ceiling-clients", "DEALBRIDGE_BENCH_CEILING_CLIENTS", "", "concurrent clients of the ceiling phases (default 8,32)")
	f.string(&hs, "handlers", "DEALBRIDGE_BENCH_HANDLERS", "", "handler process counts; the first is the main configuration (default 1,2,4)")
	f.string(&bs, "batch-sizes", "DEALBRIDGE_BENCH_BATCH_SIZES", "", "relay batch sizes; the first is the main configuration (default 100,10,1000)")
	f.int(&cfg.Consumers, "consumers", "DEALBRIDGE_BENCH_CONSUMERS", 0, "each handler's --consumers, and River's second MaxWorkers (default 32)")
	f.string(&rw, "river-workers", "DEALBRIDGE_BENCH_RIVER_WORKERS", "", "the River worker's MaxWorkers; the first is River's main configuration, the others run at maximum rate (default 100,<consumers>)")
	f.duration(&cfg.RiverFetchCooldown, "river-fetch-cooldown", "DEALBRIDGE_BENCH_RIVER_FETCH_COOLDOWN", 0, "River's FetchCooldown (default: River's, 100ms)")
	f.duration(&cfg.RiverFetchPoll, "river-fetch-poll-interval", "DEALBRIDGE_BENCH_RIVER_FETCH_POLL_INTERVAL", 0, "River's FetchPollInterval (default: River's, 1s)")
	f.int(&cfg.Closers, "closers", "DEALBRIDGE_BENCH_CLOSERS", 0, "concurrent closing clients at maximum rate (default 8)")
	f.int(&cfg.MaxBacklog, "max-backlog", "DEALBRIDGE_BENCH_MAX_BACKLOG", 0, "deals closed and not yet invoiced at which the maximum-rate closers wait (default 2000)")
	f.duration(&cfg.RelayPoll, "relay-poll-interval", "DEALBRIDGE_BENCH_RELAY_POLL_INTERVAL", 0, "the relay's --relay-poll-interval (default: the relay's default)")
	f.duration(&cfg.QueuePoll, "queue-poll-interval", "DEALBRIDGE_BENCH_QUEUE_POLL_INTERVAL", 0, "the handlers' --queue-poll-interval (default: the handler's default)")
	f.int(&cfg.PoolDeals, "pool-deals", "DEALBRIDGE_BENCH_POOL_DEALS", 0, "open deals prepared in the template (default 2000/s × phase, or what the fastest rate needs)")
	f.int(&cfg.ReplayEvents, "replay-events", "DEALBRIDGE_BENCH_REPLAY_EVENTS", 0, "events in the log the replay rebuilds (default 100000; negative: skip)")
	f.int(&cfg.BulkDeals, "bulk-deals", "DEALBRIDGE_BENCH_BULK_DEALS", 0, "deals with dead letters to bulk re-inject (default 100; negative: skip)")
	f.int(&cfg.BulkPerDeal, "bulk-per-deal", "DEALBRIDGE_BENCH_BULK_PER_DEAL", 0, "dead letters per deal (default 10)")
	f.string(&cfg.ChildLogLevel, "child-log-level", "DEALBRIDGE_BENCH_CHILD_LOG_LEVEL", "warn", "--log-level of the child processes")
	f.string(&pg, "pg-setting", "DEALBRIDGE_BENCH_PG_SETTINGS", "", "extra settings of the private cluster, name=value,name=value")
	f.string(&cfg.WorkDir, "work-dir", "DEALBRIDGE_BENCH_WORK_DIR", "", "directory for the cluster and the processes' logs (default: a temporary one)")
	f.BoolVar(&cfg.KeepWorkDir, "keep", false, "keep the temporary work directory (processes' logs) after the run")
	f.string(&logLevel, "log-level", "DEALBRIDGE_LOG_LEVEL", "info", "debug, info, warn or error")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() > 0 {
		return &usageError{msg: fmt.Sprintf("unexpected argument %q", f.Arg(0))}
	}
	if cfg.Rounds < 0 {
		return &usageError{msg: "--rounds must not be negative (0: the default, 3)"}
	}
	var err error
	if cfg.Rates, err = parseList(rates, "--rates", func(s string) (float64, error) { return strconv.ParseFloat(s, 64) }); err != nil {
		return err
	}
	if cfg.CeilingClients, err = parseList(ceiling, "--ceiling-clients", strconv.Atoi); err != nil {
		return err
	}
	if cfg.Handlers, err = parseList(hs, "--handlers", strconv.Atoi); err != nil {
		return err
	}
	if cfg.BatchSizes, err = parseList(bs, "--batch-sizes", strconv.Atoi); err != nil {
		return err
	}
	if cfg.RiverWorkers, err = parseList(rw, "--river-workers", strconv.Atoi); err != nil {
		return err
	}
	if pg != "" {
		cfg.PGSettings = map[string]string{}
		for _, kv := range strings.Split(pg, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || k == "" {
				return &usageError{msg: fmt.Sprintf("--pg-setting %q: want name=value", kv)}
			}
			cfg.PGSettings[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	c := common{logLevel: logLevel, logFormat: "text"}
	logger, err := c.logger(env)
	if err != nil {
		return err
	}
	cfg.Log = logger
	if cfg.Bin, err = os.Executable(); err != nil {
		return fmt.Errorf("cannot find this binary: %w", err)
	}
	cfg.Command = "dealbridge bench " + strings.Join(redactArgs(args), " ")
	res, err := bench.Run(ctx, cfg)
	if err != nil {
		return err
	}
	for _, t := range res.Targets {
		mark := "-"
		if t.Met != nil {
			mark = map[bool]string{true: "ok", false: "MISSED"}[*t.Met]
		}
		fmt.Fprintf(env.Stdout, "%-6s %s: %s\n", mark, t.What, t.Measured)
	}
	if cfg.OutDir != "" {
		fmt.Fprintf(env.Stdout, "report: %s/README.md\n", strings.TrimRight(cfg.OutDir, "/"))
	}
	if !res.Verified {
		return fmt.Errorf("a contender did not invoice every deal it closed exactly once: see the report")
	}
	return nil
}

// redactArgs drops the database URL from the command line shown in the
// report (it may hold a password).
func redactArgs(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--database-url" || a == "-database-url":
			i++
			out = append(out, a, "$DATABASE_URL")
		case strings.HasPrefix(a, "--database-url=") || strings.HasPrefix(a, "-database-url="):
			out = append(out, "--database-url=$DATABASE_URL")
		default:
			out = append(out, a)
		}
	}
	return out
}

func parseList[T any](s, flag string, parse func(string) (T, error)) ([]T, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []T
	for _, p := range strings.Split(s, ",") {
		v, err := parse(strings.TrimSpace(p))
		if err != nil {
			return nil, &usageError{msg: fmt.Sprintf("%s: %q is not a number", flag, p)}
		}
		out = append(out, v)
	}
	return out, nil
}

func runBenchRiverWorker(ctx context.Context, env Env, args []string) error {
	var (
		c       common
		cfg     bench.RiverWorkerConfig
		timeout time.Duration
	)
	f := newFlags(env, "bench river-worker", "bench river-worker [flags]  (the benchmark's River contender; started by `dealbridge bench`)")
	c.register(f)
	f.string(&cfg.ERPURL, "erp-url", "DEALBRIDGE_ERP_URL", "http://127.0.0.1:8081", "base URL of the ERP's HTTP API")
	f.int(&cfg.Workers, "workers", "DEALBRIDGE_BENCH_RIVER_WORKERS", 8, "River MaxWorkers of the default queue")
	f.duration(&timeout, "erp-timeout", "DEALBRIDGE_ERP_TIMEOUT", 10*time.Second, "timeout of one ERP call")
	f.duration(&cfg.FetchCooldown, "fetch-cooldown", "DEALBRIDGE_BENCH_RIVER_FETCH_COOLDOWN", 0, "River's FetchCooldown (0: River's default)")
	f.duration(&cfg.FetchPollInterval, "fetch-poll-interval", "DEALBRIDGE_BENCH_RIVER_FETCH_POLL_INTERVAL", 0, "River's FetchPollInterval (0: River's default)")
	if err := f.parse(args); err != nil {
		return err
	}
	logger, err := setup(ctx, env, &c, "bench river-worker")
	if err != nil {
		return err
	}
	cfg.DatabaseURL, cfg.ERPTimeout, cfg.Logger = c.databaseURL, timeout, logger
	return bench.RunRiverWorker(ctx, cfg)
}
