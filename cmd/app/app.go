// Package app wires dealbridge's processes from its packages. Every process
// is a function that runs until its context is cancelled and then shuts
// down gracefully; `dev` runs several of them in one process.
package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmetrics "github.com/ThreeDotsLabs/watermill/components/metrics"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/crashpoint"
	"github.com/dealbridge/dealbridge/adapters/dashboard"
	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/erp/tryton"
	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/metrics"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/adapters/reconcile"
	"github.com/dealbridge/dealbridge/adapters/saga"
	"github.com/dealbridge/dealbridge/adapters/webhook"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// NewPool connects to databaseURL with application_name set to name, so
// that pg_stat_activity tells the processes apart.
func NewPool(ctx context.Context, databaseURL, name string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("invalid database URL: %w", err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = name
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the database: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("cannot reach the database at %s: %w", redact(cfg), err)
	}
	return pool, nil
}

func redact(cfg *pgxpool.Config) string {
	return fmt.Sprintf("%s:%d/%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database)
}

// Serve runs an HTTP server on ln until ctx is done, then shuts it down,
// letting requests in flight finish for up to 10s.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, logger *slog.Logger) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http server on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("http server shutdown: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// APIHandler returns the api process's handler over pool with the default
// HTTPConfig: no CRM token, default session timeouts.
func APIHandler(pool *pgxpool.Pool, logger *slog.Logger) http.Handler {
	h, err := HTTPHandler(context.Background(), pool, logger, HTTPConfig{})
	if err != nil {
		panic(err) // only an embedded template that does not parse
	}
	return h
}

// HTTPConfig configures the api process's HTTP front.
type HTTPConfig struct {
	// Auth configures sessions, the CRM token and the login rate limit.
	Auth auth.Config
	// BreakerState reports the ERP breaker when this process runs the
	// saga handler too (dev).
	BreakerState func() (string, bool)
	// Metrics, when set, is served at GET /metrics; MetricsAuth makes that
	// route need a user's session or API token (see httpapi.WithMetrics).
	Metrics     http.Handler
	MetricsAuth bool
}

// HTTPHandler returns the api process's handler: the CRM-facing API and the
// operator JSON API under /api/, health checks, and the dashboard
// everywhere else. Background work started by requests (bulk re-injects)
// runs under ctx.
func HTTPHandler(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger, cfg HTTPConfig) (http.Handler, error) {
	store := postgres.NewStore(pool)
	cfg.Auth.Logger = logger
	authSvc := auth.New(pool, cfg.Auth)
	api := httpapi.New(store, logger).WithContext(ctx).WithAuth(authSvc).WithMetrics(cfg.Metrics, cfg.MetricsAuth).Handler()
	dash, err := dashboard.New(store, authSvc, dashboard.Config{Logger: logger, BaseContext: ctx,
		BreakerState: cfg.BreakerState, CRMOpen: !authSvc.CRMTokenRequired()})
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/api/", api)
	mux.Handle("/healthz", api)
	mux.Handle("/readyz", api)
	if cfg.Metrics != nil {
		mux.Handle("/metrics", api)
	}
	mux.Handle("/", dash.Handler())
	return mux, nil
}

// RelayConfig configures RunRelay.
type RelayConfig struct {
	PollInterval time.Duration
	BatchSize    int
	// Retention is how long relayed outbox rows are kept (0: forever);
	// see outbox.RelayConfig.
	Retention time.Duration
}

// RunRelay relays the outbox to the work queue until ctx is done. An
// envelope that cannot be unwrapped is dead-lettered (with an alert) in the
// relay's own transaction, so it never wedges the relay and is never
// silently dropped.
func RunRelay(ctx context.Context, pool *pgxpool.Pool, cfg RelayConfig, logger *slog.Logger) error {
	pub, err := queue.NewPublisher(pool, queue.PublisherConfig{}, logger)
	if err != nil {
		return err
	}
	poison, err := middleware.PoisonQueueWithFilter(postgres.NewDeadLetterPublisher(postgres.NewStore(pool)),
		postgres.DeadLetterTopic, func(err error) bool {
			// The forwarder reports an undecodable envelope only through
			// its error text; anything else (the queue insert failed) is a
			// database problem to retry, not poison.
			return strings.Contains(err.Error(), "cannot unwrap message from an envelope")
		})
	if err != nil {
		return fmt.Errorf("cannot create poison queue: %w", err)
	}
	r, err := outbox.NewRelay(pool, pub, outbox.RelayConfig{
		PollInterval: cfg.PollInterval, BatchSize: cfg.BatchSize, Retention: cfg.Retention, Middlewares: []message.HandlerMiddleware{
			queue.UndoHeldOnError, poison, crashpoint.Middleware(crashpoint.RelayAfterPublishBeforeOffsetAck)},
		// A batch's queue inserts in one round trip, with its offset update.
		Beginner: queue.DeferringBeginner,
	}, logger)
	if err != nil {
		return err
	}
	return r.Run(ctx)
}

// HandlerConfig configures RunHandler.
type HandlerConfig struct {
	// ERP selects the ERP adapter: "http" (default: the generic HTTP/JSON
	// client on ERPURL) or "tryton" (Tryton 6.0 over JSON-RPC, configured
	// by Tryton). See ERPPort.
	ERP          string
	Tryton       tryton.Config
	ERPURL       string
	ERPTimeout   time.Duration
	Consumers    int
	PollInterval time.Duration
	Lease        time.Duration
	NackDelay    time.Duration
	// HandlerTimeout bounds how long one message may be handled (see
	// queue.SubscriberConfig.HandlerTimeout; zero: its default).
	HandlerTimeout time.Duration
	Retry          domain.RetryPolicy
	Breaker        erp.BreakerConfig
	// AlertWebhookURL and AlertWebhookSecret turn on the outbound alert
	// webhook; both or neither.
	AlertWebhookURL    string
	AlertWebhookSecret string
	// ReconcileInterval is how often the handler reconciles won deals with
	// the ERP (adapters/reconcile); 0 turns it off. ReconcileAfter is the
	// age from which a won deal without an invoice is looked up (default
	// 10m).
	ReconcileInterval time.Duration
	ReconcileAfter    time.Duration
	// Metrics, when set, receives the handler's metrics: ERP calls and
	// breaker state (ERPPort) and Watermill's router metrics
	// (RunHandlerWithPort). Nil: none.
	Metrics prometheus.Registerer
}

// RunHandler runs the invoice saga handlers until ctx is done.
func RunHandler(ctx context.Context, pool *pgxpool.Pool, cfg HandlerConfig, logger *slog.Logger) error {
	port, closePort, err := ERPPort(cfg, logger)
	if err != nil {
		return err
	}
	defer closePort()
	return RunHandlerWithPort(ctx, pool, port, cfg, logger)
}

// RunHandlerWithPort runs the invoice saga handlers against port.
func RunHandlerWithPort(ctx context.Context, pool *pgxpool.Pool, port erp.Port, cfg HandlerConfig, logger *slog.Logger) error {
	if (cfg.AlertWebhookURL == "") != (cfg.AlertWebhookSecret == "") {
		return errors.New("the alert webhook needs both a URL and a secret")
	}
	wlog := watermill.NewSlogLogger(logger)
	qcfg := queue.SubscriberConfig{Consumers: cfg.Consumers, PollInterval: cfg.PollInterval, Lease: cfg.Lease, NackDelay: cfg.NackDelay,
		HandlerTimeout: cfg.HandlerTimeout}
	sub, err := queue.NewSubscriber(pool, qcfg, logger)
	if err != nil {
		return err
	}
	// A router stopped through its context does not close its subscribers,
	// and a subscriber's LISTEN connection lives until Close.
	defer sub.Close()
	router, err := message.NewRouter(message.RouterConfig{CloseTimeout: 15 * time.Second}, wlog)
	if err != nil {
		return fmt.Errorf("cannot create router: %w", err)
	}
	router.AddMiddleware(middleware.Recoverer)
	store := postgres.NewStore(pool, postgres.WithAlertNotifications(cfg.AlertWebhookURL != ""))
	poison, err := middleware.PoisonQueueWithFilter(postgres.NewDeadLetterPublisher(store), postgres.DeadLetterTopic,
		func(err error) bool {
			// Poison, and panics: a message that crashes the handler would
			// otherwise be retried forever.
			return saga.IsPoison(err) || errors.As(err, new(middleware.RecoveredPanicError))
		})
	if err != nil {
		return fmt.Errorf("cannot create poison queue: %w", err)
	}
	h := saga.NewInvoiceHandler(store, port, saga.Config{Retry: cfg.Retry}, logger)
	router.AddConsumerHandler(saga.HandlerName, outbox.InvoiceTopic, sub, h.Handle).AddMiddleware(poison)
	if cfg.AlertWebhookURL != "" {
		sender, err := webhook.New(webhook.Config{URL: cfg.AlertWebhookURL, Secret: []byte(cfg.AlertWebhookSecret), Retry: cfg.Retry}, logger)
		if err != nil {
			return err
		}
		wsub, err := queue.NewSubscriber(pool, queue.SubscriberConfig{Consumers: 2, PollInterval: cfg.PollInterval, Lease: cfg.Lease, HandlerTimeout: cfg.HandlerTimeout}, logger)
		if err != nil {
			return err
		}
		defer wsub.Close()
		router.AddConsumerHandler(webhook.HandlerName, outbox.AlertTopic, wsub, sender.Handle)
	}
	if cfg.ReconcileInterval > 0 {
		// Every handler process reconciles; passes are idempotent (an
		// invoice is recorded once, an alert raised once per K).
		rec := reconcile.New(store, port, reconcile.Config{After: cfg.ReconcileAfter, Logger: logger})
		rctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); rec.Run(rctx, cfg.ReconcileInterval) }()
		defer func() { stop(); <-done }()
	}
	if cfg.Metrics != nil {
		// Added after Recoverer and the handlers' poison middleware (the
		// router runs middleware in the order added), so that it times the
		// handler itself and sees the errors poison turns into acks.
		wmetrics.NewPrometheusMetricsBuilder(cfg.Metrics, metrics.Namespace, "router").AddPrometheusRouterMetrics(router)
	}
	if err := router.Run(ctx); err != nil {
		return fmt.Errorf("handler router: %w", err)
	}
	return nil
}

// ERPSim returns a simulated ERP.
func ERPSim(cfg erpsim.Config) (*erpsim.Server, error) {
	return erpsim.New(cfg)
}
