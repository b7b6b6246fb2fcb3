package metrics

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// TimeoutDefault bounds the database queries of one scrape.
const TimeoutDefault = 5 * time.Second

// Config configures a Collector.
type Config struct {
	// Timeout bounds the queries of one scrape (default TimeoutDefault). A
	// query that does not answer in time is reported through
	// dealbridge_db_scrape_success 0 and its metrics are left out, rather
	// than hanging the scrape.
	Timeout time.Duration
	// Logger receives query failures (default: discarded).
	Logger *slog.Logger
}

// Collector measures the pipeline in Postgres when it is scraped. Every
// process that connects to the database may register one; the values are
// the same from each (they describe the database, not the process), so
// aggregate them with max, not sum.
//
// Scrapes are serialised: concurrent scrapes wait for each other rather
// than multiplying the load on the database.
type Collector struct {
	pool  *pgxpool.Pool
	store *postgres.Store
	cfg   Config
	mu    sync.Mutex

	unreconciledAge, unreconciled       *prometheus.Desc
	relayLag, relayBacklog              *prometheus.Desc
	queueDepth, queueMessages, queueAge *prometheus.Desc
	queueMaxAttempts                    *prometheus.Desc
	deadOpen, deadOpenByClass           *prometheus.Desc
	alertsOpen, sagas                   *prometheus.Desc
	scrapeSuccess, scrapeDuration       *prometheus.Desc
}

// NewCollector returns a Collector over pool.
func NewCollector(pool *pgxpool.Pool, cfg Config) *Collector {
	cfg.Timeout = cmp.Or(cfg.Timeout, TimeoutDefault)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", name), help, labels, nil)
	}
	return &Collector{
		pool: pool, store: postgres.NewStore(pool), cfg: cfg,
		unreconciledAge: d("unreconciled_oldest_age_seconds",
			"Age of the oldest deal won (closed or re-instated) without an invoice recorded; 0 when every won deal is invoiced."),
		unreconciled: d("unreconciled_deals",
			"Deals won (closed or re-instated) without an invoice recorded yet."),
		relayLag: d("relay_lag_seconds",
			"Age of the oldest outbox row the relay has not relayed to the work queue; 0 when it is caught up."),
		relayBacklog: d("relay_backlog_messages",
			"Outbox rows the relay has not relayed to the work queue yet."),
		queueDepth: d("queue_depth",
			"Work-queue messages not yet acked, by topic.", "topic"),
		queueMessages: d("queue_messages",
			"Work-queue messages by topic and state: ready (delay passed, not leased), in_flight (under a live lease), delayed (waiting for a nack delay).", "topic", "state"),
		queueAge: d("queue_oldest_ready_age_seconds",
			"How long the longest-waiting ready work-queue message has been ready (the consumer lag), by topic; 0 when none is ready.", "topic"),
		queueMaxAttempts: d("queue_max_attempts",
			"Highest delivery attempt count among the queued messages, by topic.", "topic"),
		deadOpen: d("dead_letters_open",
			"Open dead letters (neither re-injected, discarded nor resolved)."),
		deadOpenByClass: d("dead_letters_open_by_class",
			"Open dead letters by error class.", "error_class"),
		alertsOpen: d("alerts_open",
			"Open alerts (neither acknowledged nor resolved)."),
		sagas: d("sagas",
			"Invoice sagas by state.", "state"),
		scrapeSuccess: d("db_scrape_success",
			"1 when every database query of this scrape succeeded, 0 when one failed or timed out (its metrics are then missing)."),
		scrapeDuration: d("db_scrape_duration_seconds",
			"How long the database queries of this scrape took."),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.unreconciledAge, c.unreconciled, c.relayLag, c.relayBacklog,
		c.queueDepth, c.queueMessages, c.queueAge, c.queueMaxAttempts, c.deadOpen, c.deadOpenByClass,
		c.alertsOpen, c.sagas, c.scrapeSuccess, c.scrapeDuration} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: it runs its queries one after
// the other on one pooled connection at a time, under cfg.Timeout.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.Timeout)
	defer cancel()
	start := time.Now()
	var errs []error
	for _, measure := range []func(context.Context, chan<- prometheus.Metric) error{
		c.collectUnreconciled, c.collectRelay, c.collectQueue, c.collectDeadLetters, c.collectAlerts, c.collectSagas,
	} {
		if err := measure(ctx, ch); err != nil {
			errs = append(errs, err)
		}
	}
	success := 1.0
	if err := errors.Join(errs...); err != nil {
		success = 0
		c.cfg.Logger.Warn("metrics: database queries failed", "err", err)
	}
	ch <- prometheus.MustNewConstMetric(c.scrapeSuccess, prometheus.GaugeValue, success)
	ch <- prometheus.MustNewConstMetric(c.scrapeDuration, prometheus.GaugeValue, time.Since(start).Seconds())
}

func gauge(ch chan<- prometheus.Metric, d *prometheus.Desc, v float64, labels ...string) {
	ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func (c *Collector) collectUnreconciled(ctx context.Context, ch chan<- prometheus.Metric) error {
	var n int64
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM deals WHERE status = $1 AND idempotency_key IS NOT NULL`, string(domain.StatusWon)).Scan(&n); err != nil {
		return fmt.Errorf("cannot count won deals: %w", err)
	}
	oldest, ok, err := c.store.OldestUnreconciled(ctx)
	if err != nil {
		return err
	}
	age := 0.0
	if ok {
		age = max(0, oldest.Age.Seconds())
	}
	gauge(ch, c.unreconciled, float64(n))
	gauge(ch, c.unreconciledAge, age)
	return nil
}

func (c *Collector) collectRelay(ctx context.Context, ch chan<- prometheus.Metric) error {
	b, err := outbox.MeasureBacklog(ctx, c.pool)
	if err != nil {
		return err
	}
	gauge(ch, c.relayBacklog, float64(b.Messages))
	gauge(ch, c.relayLag, b.OldestAge.Seconds())
	return nil
}

// knownTopics are always reported, with zeros when empty, so that a
// drained queue reads 0 rather than vanishing from the graphs.
var knownTopics = []string{outbox.InvoiceTopic, outbox.AlertTopic}

func (c *Collector) collectQueue(ctx context.Context, ch chan<- prometheus.Metric) error {
	stats, err := queue.Stats(ctx, c.pool)
	if err != nil {
		return err
	}
	byTopic := make(map[string]queue.TopicStats, len(stats))
	for _, st := range stats {
		byTopic[st.Topic] = st
	}
	for _, t := range knownTopics {
		if _, ok := byTopic[t]; !ok {
			byTopic[t] = queue.TopicStats{Topic: t}
		}
	}
	for t, st := range byTopic {
		gauge(ch, c.queueDepth, float64(st.Depth), t)
		gauge(ch, c.queueMessages, float64(st.Available), t, "ready")
		gauge(ch, c.queueMessages, float64(st.InFlight), t, "in_flight")
		gauge(ch, c.queueMessages, float64(st.Delayed), t, "delayed")
		gauge(ch, c.queueAge, st.OldestAvailableAge.Seconds(), t)
		gauge(ch, c.queueMaxAttempts, float64(st.MaxAttempts), t)
	}
	return nil
}

func (c *Collector) collectDeadLetters(ctx context.Context, ch chan<- prometheus.Metric) error {
	counts, err := c.counts(ctx, `SELECT error_class, count(*) FROM dead_letters WHERE state = 'open' GROUP BY 1`)
	if err != nil {
		return fmt.Errorf("cannot count open dead letters: %w", err)
	}
	var total int64
	for class, n := range counts {
		total += n
		gauge(ch, c.deadOpenByClass, float64(n), class)
	}
	gauge(ch, c.deadOpen, float64(total))
	return nil
}

func (c *Collector) collectAlerts(ctx context.Context, ch chan<- prometheus.Metric) error {
	var n int64
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM alerts WHERE state = 'open'`).Scan(&n); err != nil {
		return fmt.Errorf("cannot count open alerts: %w", err)
	}
	gauge(ch, c.alertsOpen, float64(n))
	return nil
}

// sagaStates are always reported, with zeros.
var sagaStates = []string{domain.SagaPending, domain.SagaRetrying, domain.SagaInvoiced, domain.SagaCompensated}

func (c *Collector) collectSagas(ctx context.Context, ch chan<- prometheus.Metric) error {
	counts, err := c.counts(ctx, `SELECT state, count(*) FROM invoice_sagas GROUP BY 1`)
	if err != nil {
		return fmt.Errorf("cannot count sagas: %w", err)
	}
	for _, s := range sagaStates {
		if _, ok := counts[s]; !ok {
			counts[s] = 0
		}
	}
	for s, n := range counts {
		gauge(ch, c.sagas, float64(n), s)
	}
	return nil
}

// counts runs a "SELECT key, count(*) ... GROUP BY 1" query.
func (c *Collector) counts(ctx context.Context, sql string) (map[string]int64, error) {
	rows, err := c.pool.Query(ctx, sql)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	var (
		k string
		n int64
	)
	_, err = pgx.ForEachRow(rows, []any{&k, &n}, func() error { out[k] = n; return nil })
	return out, err
}
