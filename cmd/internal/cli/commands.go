package cli

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/cmd/internal/app"
	"github.com/dealbridge/dealbridge/migrations"
)

func setup(ctx context.Context, env Env, c *common, name string) (*slog.Logger, error) {
	if err := c.requireDB(); err != nil {
		return nil, err
	}
	return c.logger(env)
}

func runAPI(ctx context.Context, env Env, args []string) error {
	var (
		c      common
		listen string
	)
	f := newFlags(env, "api", "api [flags]")
	c.register(f)
	f.string(&listen, "listen", "DEALBRIDGE_LISTEN", "127.0.0.1:8080", "address of the HTTP API")
	if err := f.parse(args); err != nil {
		return err
	}
	logger, err := setup(ctx, env, &c, "api")
	if err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-api", 0)
	if err != nil {
		return err
	}
	defer pool.Close()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", listen, err)
	}
	logger.Info("api listening", "url", "http://"+ln.Addr().String())
	return app.Serve(ctx, ln, app.APIHandler(pool, logger), logger)
}

type relayFlags struct {
	poll  time.Duration
	batch int
}

func (r *relayFlags) register(f *flags) {
	f.duration(&r.poll, "relay-poll-interval", "DEALBRIDGE_RELAY_POLL_INTERVAL", 100*time.Millisecond, "how often an idle relay polls the outbox")
	f.int(&r.batch, "relay-batch-size", "DEALBRIDGE_RELAY_BATCH_SIZE", 100, "outbox rows relayed per transaction")
}

func runRelay(ctx context.Context, env Env, args []string) error {
	var (
		c common
		r relayFlags
	)
	f := newFlags(env, "relay", "relay [flags]")
	c.register(f)
	r.register(f)
	if err := f.parse(args); err != nil {
		return err
	}
	logger, err := setup(ctx, env, &c, "relay")
	if err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-relay", 0)
	if err != nil {
		return err
	}
	defer pool.Close()
	logger.Info("relay running")
	return app.RunRelay(ctx, pool, app.RelayConfig{PollInterval: r.poll, BatchSize: r.batch}, logger)
}

type handlerFlags struct {
	erpURL     string
	erpTimeout time.Duration
	consumers  int
	poll       time.Duration
	lease      time.Duration
	nackDelay  time.Duration
}

func (h *handlerFlags) register(f *flags, withURL bool) {
	if withURL {
		f.string(&h.erpURL, "erp-url", "DEALBRIDGE_ERP_URL", "http://127.0.0.1:8081", "base URL of the ERP's HTTP API")
	}
	f.duration(&h.erpTimeout, "erp-timeout", "DEALBRIDGE_ERP_TIMEOUT", 10*time.Second, "timeout of one ERP call")
	f.int(&h.consumers, "consumers", "DEALBRIDGE_CONSUMERS", 8, "messages handled in parallel by this process")
	f.duration(&h.poll, "queue-poll-interval", "DEALBRIDGE_QUEUE_POLL_INTERVAL", 500*time.Millisecond, "work-queue polling fallback (LISTEN/NOTIFY wakes consumers sooner)")
	f.duration(&h.lease, "lease", "DEALBRIDGE_LEASE", 30*time.Second, "work-queue lease; a crashed handler's message returns after it")
	f.duration(&h.nackDelay, "nack-delay", "DEALBRIDGE_NACK_DELAY", time.Second, "delay before a failed message is retried")
}

func (h *handlerFlags) config() app.HandlerConfig {
	return app.HandlerConfig{ERPURL: h.erpURL, ERPTimeout: h.erpTimeout, Consumers: h.consumers,
		PollInterval: h.poll, Lease: h.lease, NackDelay: h.nackDelay}
}

func runHandler(ctx context.Context, env Env, args []string) error {
	var (
		c common
		h handlerFlags
	)
	f := newFlags(env, "handler", "handler [flags]")
	c.register(f)
	h.register(f, true)
	if err := f.parse(args); err != nil {
		return err
	}
	logger, err := setup(ctx, env, &c, "handler")
	if err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-handler", int32(h.consumers+4))
	if err != nil {
		return err
	}
	defer pool.Close()
	logger.Info("handler running", "erp", h.erpURL, "consumers", h.consumers)
	return app.RunHandler(ctx, pool, h.config(), logger)
}

func runERPSim(ctx context.Context, env Env, args []string) error {
	var (
		c      common
		listen string
		cfg    erpsim.Config
	)
	f := newFlags(env, "erp-sim", "erp-sim [flags]")
	f.string(&c.logLevel, "log-level", "DEALBRIDGE_LOG_LEVEL", "info", "debug, info, warn or error")
	f.string(&c.logFormat, "log-format", "DEALBRIDGE_LOG_FORMAT", "text", "text or json")
	f.string(&listen, "listen", "DEALBRIDGE_ERP_SIM_LISTEN", "127.0.0.1:8081", "address of the simulated ERP")
	cfg.RegisterFlags(f.FlagSet)
	if err := f.parse(args); err != nil {
		return err
	}
	logger, err := c.logger(env)
	if err != nil {
		return err
	}
	cfg.Logger = logger
	sim, err := erpsim.New(cfg)
	if err != nil {
		return err
	}
	defer sim.Close()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", listen, err)
	}
	logger.Info("erp-sim listening", "url", "http://"+ln.Addr().String(), "store", cfg.StorePath)
	return app.Serve(ctx, ln, sim.Handler(), logger)
}

func runMigrate(ctx context.Context, env Env, args []string) error {
	var c common
	f := newFlags(env, "migrate", "migrate up|down|status [flags]")
	c.register(f)
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() != 1 {
		return &usageError{msg: "expected one of: up, down, status"}
	}
	if err := c.requireDB(); err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-migrate", 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	switch f.Arg(0) {
	case "up":
		if err := migrations.Up(ctx, pool); err != nil {
			return err
		}
		fmt.Fprintln(env.Stdout, "migrations applied")
		return nil
	case "down":
		if err := migrations.Down(ctx, pool); err != nil {
			return err
		}
		fmt.Fprintln(env.Stdout, "rolled back one migration")
		return nil
	case "status":
		return migrations.Status(ctx, pool, env.Stdout)
	}
	return &usageError{msg: fmt.Sprintf("unknown migrate action %q: expected up, down or status", f.Arg(0))}
}
