package cli

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/metrics"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/cmd/app"
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
	var hf httpFlags
	hf.register(f)
	var mf metricsFlags
	mf.register(f, "serve GET /metrics on this separate address, without credentials, instead of on --listen (empty: on --listen)")
	var mc string
	f.string(&mc, "maker-checker", "DEALBRIDGE_MAKER_CHECKER", "", "on or off: money edits of dead letters need a second operator (empty: leave the stored setting)")
	if err := f.parse(args); err != nil {
		return err
	}
	if mc != "" && mc != "on" && mc != "off" {
		return &usageError{msg: "--maker-checker must be on or off"}
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
	if mc != "" {
		if err := postgres.NewStore(pool).SetMakerChecker(ctx, mc == "on"); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", listen, err)
	}
	defer ln.Close()
	hcfg, open, err := hf.config(env, ln.Addr())
	if err != nil {
		return err
	}
	reg, err := app.NewMetricsRegistry(pool, logger)
	if err != nil {
		return err
	}
	mln, err := mf.bind()
	if err != nil {
		return err
	}
	if mln != nil {
		defer mln.Close()
		logger.Info("metrics listening", "url", "http://"+mln.Addr().String()+"/metrics")
	} else {
		metricsOnAPI(&hcfg, reg, ln.Addr(), logger)
	}
	h, err := app.HTTPHandler(ctx, pool, logger, hcfg)
	if err != nil {
		return err
	}
	if open {
		logger.Warn("the CRM API runs without a token (loopback only); set DEALBRIDGE_API_TOKEN to require one")
	}
	logger.Info("api listening", "url", "http://"+ln.Addr().String(), "dashboard", "http://"+ln.Addr().String()+"/")
	return app.RunWithMetrics(ctx, mln, reg, logger, func(ctx context.Context) error { return app.Serve(ctx, ln, h, logger) })
}

// metricsOnAPI serves the metrics of reg at GET /metrics of the API
// listener on addr: open on a loopback address, and elsewhere (where the
// CRM API may face the internet) only to a user's session or API token.
func metricsOnAPI(cfg *app.HTTPConfig, reg *prometheus.Registry, addr net.Addr, logger *slog.Logger) {
	cfg.Metrics = metrics.Handler(reg, logger)
	cfg.MetricsAuth = !isLoopback(addr)
	if cfg.MetricsAuth {
		logger.Info("GET /metrics needs a user's API token on a non-loopback address ('dealbridge users token NAME'), or use --metrics-listen")
	}
}

type relayFlags struct {
	poll      time.Duration
	batch     int
	retention time.Duration
}

func (r *relayFlags) register(f *flags) {
	f.duration(&r.poll, "relay-poll-interval", "DEALBRIDGE_RELAY_POLL_INTERVAL", 500*time.Millisecond, "fallback poll of the outbox (LISTEN/NOTIFY wakes the relay sooner)")
	f.int(&r.batch, "relay-batch-size", "DEALBRIDGE_RELAY_BATCH_SIZE", 100, "outbox rows relayed per transaction")
	f.duration(&r.retention, "outbox-retention", "DEALBRIDGE_OUTBOX_RETENTION", 7*24*time.Hour,
		"how long relayed outbox rows are kept (the event log keeps everything; 0 keeps them forever)")
}

func (r *relayFlags) validate() error {
	if r.retention < 0 {
		return &usageError{msg: "--outbox-retention must not be negative (0 keeps every relayed row)"}
	}
	return nil
}

func (r *relayFlags) config() app.RelayConfig {
	return app.RelayConfig{PollInterval: r.poll, BatchSize: r.batch, Retention: r.retention}
}

func runRelay(ctx context.Context, env Env, args []string) error {
	var (
		c common
		r relayFlags
	)
	f := newFlags(env, "relay", "relay [flags]")
	c.register(f)
	r.register(f)
	var mf metricsFlags
	mf.register(f, "address of a metrics listener: GET /metrics (relay lag, queue, dead letters, ...) and GET /healthz (empty: off)")
	if err := f.parse(args); err != nil {
		return err
	}
	if err := r.validate(); err != nil {
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
	var reg *prometheus.Registry
	mln, err := mf.bind()
	if err != nil {
		return err
	}
	if mln != nil {
		defer mln.Close()
		if reg, err = app.NewMetricsRegistry(pool, logger); err != nil {
			return err
		}
		logger.Info("metrics listening", "url", "http://"+mln.Addr().String()+"/metrics")
	}
	logger.Info("relay running")
	return app.RunWithMetrics(ctx, mln, reg, logger, func(ctx context.Context) error {
		return app.RunRelay(ctx, pool, r.config(), logger)
	})
}

type handlerFlags struct {
	erpURL       string
	erpTimeout   time.Duration
	consumers    int
	poll         time.Duration
	lease        time.Duration
	handlerTO    time.Duration
	nackDelay    time.Duration
	maxAttempts  int
	retryInitial time.Duration
	retryMax     time.Duration
	maxAge       time.Duration
	breakerN     int
	breakerCool  time.Duration
	webhookURL   string
	secretFile   string
	erp          erpFlags // --erp and the Tryton settings (tryton_flags.go)
	// reconciliation with the ERP (adapters/reconcile)
	reconcileEvery time.Duration
	reconcileAfter time.Duration
}

func (h *handlerFlags) register(f *flags, withURL bool) {
	if withURL {
		f.string(&h.erpURL, "erp-url", "DEALBRIDGE_ERP_URL", "http://127.0.0.1:8081", "base URL of the ERP's HTTP API")
		h.erp.register(f)
	}
	f.duration(&h.erpTimeout, "erp-timeout", "DEALBRIDGE_ERP_TIMEOUT", 10*time.Second, "timeout of one ERP call")
	f.int(&h.consumers, "consumers", "DEALBRIDGE_CONSUMERS", 8, "messages handled in parallel by this process")
	f.duration(&h.poll, "queue-poll-interval", "DEALBRIDGE_QUEUE_POLL_INTERVAL", 500*time.Millisecond, "work-queue polling fallback (LISTEN/NOTIFY wakes consumers sooner)")
	f.duration(&h.lease, "lease", "DEALBRIDGE_LEASE", 30*time.Second, "work-queue lease; a crashed handler's message returns after it")
	f.duration(&h.handlerTO, "handler-timeout", "DEALBRIDGE_HANDLER_TIMEOUT", 5*time.Minute, "longest one message may be handled; then its context is cancelled and it is retried (negative: no limit)")
	f.duration(&h.nackDelay, "nack-delay", "DEALBRIDGE_NACK_DELAY", time.Second, "delay before a failed message is retried")
	f.int(&h.maxAttempts, "max-attempts", "DEALBRIDGE_MAX_ATTEMPTS", 8, "ERP attempts per invoice before compensation")
	f.duration(&h.retryInitial, "retry-initial", "DEALBRIDGE_RETRY_INITIAL", time.Second, "upper bound of the first retry backoff (full jitter)")
	f.duration(&h.retryMax, "retry-max", "DEALBRIDGE_RETRY_MAX", 5*time.Minute, "cap of the retry backoff")
	f.duration(&h.maxAge, "retry-max-age", "DEALBRIDGE_RETRY_MAX_AGE", 24*time.Hour, "give up retrying once the first attempt is this old")
	f.int(&h.breakerN, "breaker-failures", "DEALBRIDGE_BREAKER_FAILURES", 5, "consecutive ERP failures that open the circuit breaker")
	f.duration(&h.breakerCool, "breaker-cooldown", "DEALBRIDGE_BREAKER_COOLDOWN", 5*time.Second, "first cool-down of an open breaker (doubles while the ERP stays down)")
	f.string(&h.webhookURL, "alert-webhook-url", "DEALBRIDGE_ALERT_WEBHOOK_URL", "", "POST every alert here, HMAC-signed (needs a secret)")
	f.string(&h.secretFile, "alert-webhook-secret-file", "DEALBRIDGE_ALERT_WEBHOOK_SECRET_FILE", "", "file holding the webhook HMAC secret (or set $DEALBRIDGE_ALERT_WEBHOOK_SECRET)")
	f.duration(&h.reconcileEvery, "reconcile-interval", "DEALBRIDGE_RECONCILE_INTERVAL", time.Minute, "how often won deals without an invoice are reconciled with the ERP (0: off)")
	f.duration(&h.reconcileAfter, "reconcile-after", "DEALBRIDGE_RECONCILE_AFTER", 10*time.Minute, "reconcile deals won at least this long ago")
}

func (h *handlerFlags) config(env Env) (app.HandlerConfig, error) {
	cfg := app.HandlerConfig{ERPURL: h.erpURL, ERPTimeout: h.erpTimeout, Consumers: h.consumers,
		PollInterval: h.poll, Lease: h.lease, NackDelay: h.nackDelay, HandlerTimeout: h.handlerTO,
		Retry:             domain.RetryPolicy{Initial: h.retryInitial, Max: h.retryMax, MaxAttempts: h.maxAttempts, MaxAge: h.maxAge},
		Breaker:           erp.BreakerConfig{FailureThreshold: h.breakerN, CoolDown: h.breakerCool},
		ReconcileInterval: h.reconcileEvery, ReconcileAfter: h.reconcileAfter,
	}
	if h.reconcileEvery < 0 || h.reconcileAfter < 0 {
		return cfg, &usageError{msg: "--reconcile-interval and --reconcile-after must not be negative"}
	}
	if h.maxAttempts < 1 {
		return cfg, &usageError{msg: "--max-attempts must be at least 1"}
	}
	if h.erp.kind != "" {
		if err := h.erp.apply(env, &cfg); err != nil {
			return cfg, err
		}
	}
	// The secret never comes from the command line, where ps would show it.
	secret := env.Getenv("DEALBRIDGE_ALERT_WEBHOOK_SECRET")
	if h.secretFile != "" {
		b, err := os.ReadFile(h.secretFile)
		if err != nil {
			return cfg, fmt.Errorf("cannot read the alert webhook secret: %w", err)
		}
		secret = strings.TrimSpace(string(b))
	}
	if h.webhookURL != "" && secret == "" {
		return cfg, &usageError{msg: "--alert-webhook-url needs a secret: --alert-webhook-secret-file or $DEALBRIDGE_ALERT_WEBHOOK_SECRET"}
	}
	if h.webhookURL != "" {
		cfg.AlertWebhookURL, cfg.AlertWebhookSecret = h.webhookURL, secret
	}
	return cfg, nil
}

func runHandler(ctx context.Context, env Env, args []string) error {
	var (
		c common
		h handlerFlags
	)
	f := newFlags(env, "handler", "handler [flags]")
	c.register(f)
	h.register(f, true)
	var mf metricsFlags
	mf.register(f, "address of a metrics listener: GET /metrics (ERP calls, router, queue, dead letters, ...) and GET /healthz (empty: off)")
	if err := f.parse(args); err != nil {
		return err
	}
	logger, err := setup(ctx, env, &c, "handler")
	if err != nil {
		return err
	}
	if _, err := h.config(env); err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-handler", int32(h.consumers+4))
	if err != nil {
		return err
	}
	defer pool.Close()
	cfg, err := h.config(env)
	if err != nil {
		return err
	}
	var reg *prometheus.Registry
	mln, err := mf.bind()
	if err != nil {
		return err
	}
	if mln != nil {
		defer mln.Close()
		if reg, err = app.NewMetricsRegistry(pool, logger); err != nil {
			return err
		}
		cfg.Metrics = reg
		logger.Info("metrics listening", "url", "http://"+mln.Addr().String()+"/metrics")
	}
	erpTarget := h.erpURL
	if cfg.ERP == app.ERPTryton {
		erpTarget = "tryton " + cfg.Tryton.URL + "/" + cfg.Tryton.Database
	}
	logger.Info("handler running", "erp", erpTarget, "consumers", h.consumers)
	return app.RunWithMetrics(ctx, mln, reg, logger, func(ctx context.Context) error {
		return app.RunHandler(ctx, pool, cfg, logger)
	})
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
	// The action may come before the flags (as the usage line shows) or
	// after them.
	var action string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		action, args = args[0], args[1:]
	}
	if err := f.parse(args); err != nil {
		return err
	}
	switch {
	case action == "" && f.NArg() == 1:
		action = f.Arg(0)
	case action == "" || f.NArg() != 0:
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
	switch action {
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
	return &usageError{msg: fmt.Sprintf("unknown migrate action %q: expected up, down or status", action)}
}
