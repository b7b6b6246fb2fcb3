package metrics_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/dealbridge/dealbridge/adapters/metrics"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// scrape GETs url and parses the Prometheus text format.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	var p expfmt.TextParser
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: cannot parse the exposition: %v", url, err)
	}
	return mfs
}

// value returns the value of the gauge or counter name whose labels are
// exactly labels ("k=v" pairs).
func value(t *testing.T, mfs map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	mf, ok := mfs[name]
	if !ok {
		t.Fatalf("metric %s missing", name)
	}
	want := strings.Join(labels, ",")
	for _, m := range mf.GetMetric() {
		var got []string
		for _, lp := range m.GetLabel() {
			got = append(got, lp.GetName()+"="+lp.GetValue())
		}
		if strings.Join(got, ",") != want {
			continue
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		}
		t.Fatalf("metric %s{%s} is neither gauge nor counter", name, want)
	}
	t.Fatalf("metric %s{%s} missing", name, want)
	return 0
}

type fixtures struct {
	pool *pgxpool.Pool
	t    *testing.T
}

func (f fixtures) exec(sql string, args ...any) {
	f.t.Helper()
	if _, err := f.pool.Exec(context.Background(), sql, args...); err != nil {
		f.t.Fatalf("%s: %v", strings.Fields(sql)[0:3], err)
	}
}

// deal inserts a deal in status, won (DealWon recorded) wonAgo ago when
// wonAgo is not empty.
func (f fixtures) deal(status domain.Status, wonAgo string) {
	id := uuid.NewString()
	f.exec(`INSERT INTO deals (id, customer_id, customer_name, currency, lines, total, status, version, close_version, idempotency_key, created_at, updated_at)
		VALUES ($1, 'C-1', 'Globex', 'USD', '[]', '0.00', $2, 2, 2, $3, now(), now())`, id, string(status), id+":2")
	if wonAgo != "" {
		f.exec(`INSERT INTO events (stream_id, stream_version, type, payload, recorded_at)
			VALUES ($1, 1, $2, '{}', now() - $3::interval)`, "deal-"+id, domain.TypeDealWon, wonAgo)
	}
}

func TestCollectorMeasuresThePipeline(t *testing.T) {
	t.Parallel()
	pool := pgtest.NewPool(t)
	f := fixtures{pool: pool, t: t}

	// Two won deals without an invoice (the older won 2h ago), one
	// invoiced, whose win was long ago but does not count.
	f.deal(domain.StatusWon, "2 hours")
	f.deal(domain.StatusWon, "10 minutes")
	f.deal(domain.StatusInvoiced, "5 hours")
	// Work queue: 3 ready on the invoice topic (the oldest ready for 30s),
	// 1 delayed for an hour, 1 held under a live lease.
	for _, ago := range []string{"30 seconds", "20 seconds", "1 second"} {
		f.exec(`INSERT INTO work_queue (topic, uuid, available_at) VALUES ($1, $2, now() - $3::interval)`, outbox.InvoiceTopic, uuid.NewString(), ago)
	}
	f.exec(`INSERT INTO work_queue (topic, uuid, available_at) VALUES ($1, $2, now() + interval '1 hour')`, outbox.InvoiceTopic, uuid.NewString())
	f.exec(`INSERT INTO work_queue (topic, uuid, available_at, lease_until, attempts) VALUES ($1, $2, now() - interval '1 minute', now() + interval '1 minute', 3)`,
		outbox.InvoiceTopic, uuid.NewString())
	// Outbox: two rows the relay has not passed (it has no cursor yet),
	// the older written 90s ago.
	for _, ago := range []string{"90 seconds", "5 seconds"} {
		f.exec(`INSERT INTO watermill_outbox (uuid, created_at, payload, transaction_id) VALUES ($1, LOCALTIMESTAMP - $2::interval, '{}', pg_current_xact_id())`, uuid.NewString(), ago)
	}
	// Dead letters: two open (two classes), one discarded.
	for _, dl := range [][2]string{{"open", "permanent"}, {"open", "transient"}, {"discarded", "permanent"}} {
		f.exec(`INSERT INTO dead_letters (id, state, message_uuid, topic, handler, payload, metadata, reason, error_class, attempts,
				first_failure_at, last_failure_at, version, created_at, updated_at)
			VALUES ($1, $2, $3, 'invoice-requests', 'invoice-saga', '\x7b7d', '{}', 'boom', $4, 1, now(), now(), 1, now(), now())`,
			uuid.NewString(), dl[0], uuid.NewString(), dl[1])
	}
	// Alerts: one open, one resolved.
	for _, st := range []string{"open", "resolved"} {
		f.exec(`INSERT INTO alerts (id, kind, severity, state, message, version, created_at, updated_at)
			VALUES ($1, 'invoice_failed', 'error', $2, 'boom', 1, now(), now())`, uuid.NewString(), st)
	}
	// Sagas: two retrying, one invoiced.
	for _, st := range []string{domain.SagaRetrying, domain.SagaRetrying, domain.SagaInvoiced} {
		f.exec(`INSERT INTO invoice_sagas (idempotency_key, deal_id, state, started_at, updated_at) VALUES ($1, $2, $3, now(), now())`,
			uuid.NewString()+":2", uuid.NewString(), st)
	}

	reg, err := metrics.NewRegistry(pool, metrics.Config{})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(metrics.Mux(reg, slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	mfs := scrape(t, srv.URL+"/metrics")

	atLeast := func(name string, min, max float64, labels ...string) {
		t.Helper()
		if v := value(t, mfs, name, labels...); v < min || v > max {
			t.Errorf("%s{%s} = %v, want in [%v, %v]", name, strings.Join(labels, ","), v, min, max)
		}
	}
	equal := func(name string, want float64, labels ...string) {
		t.Helper()
		if v := value(t, mfs, name, labels...); v != want {
			t.Errorf("%s{%s} = %v, want %v", name, strings.Join(labels, ","), v, want)
		}
	}
	// Generous upper bounds: a loaded machine may take a while between
	// the inserts and the scrape, but not an hour.
	atLeast("dealbridge_unreconciled_oldest_age_seconds", 7200, 7200+600)
	equal("dealbridge_unreconciled_deals", 2)
	equal("dealbridge_relay_backlog_messages", 2)
	atLeast("dealbridge_relay_lag_seconds", 90, 90+600)
	topic := "topic=" + outbox.InvoiceTopic
	equal("dealbridge_queue_depth", 5, topic)
	equal("dealbridge_queue_messages", 3, "state=ready", topic)
	equal("dealbridge_queue_messages", 1, "state=delayed", topic)
	equal("dealbridge_queue_messages", 1, "state=in_flight", topic)
	atLeast("dealbridge_queue_oldest_ready_age_seconds", 30, 30+600, topic)
	equal("dealbridge_queue_max_attempts", 3, topic)
	equal("dealbridge_queue_depth", 0, "topic="+outbox.AlertTopic) // known topics read 0 when empty
	equal("dealbridge_dead_letters_open", 2)
	equal("dealbridge_dead_letters_open_by_class", 1, "error_class=permanent")
	equal("dealbridge_dead_letters_open_by_class", 1, "error_class=transient")
	equal("dealbridge_alerts_open", 1)
	equal("dealbridge_sagas", 2, "state="+domain.SagaRetrying)
	equal("dealbridge_sagas", 1, "state="+domain.SagaInvoiced)
	equal("dealbridge_sagas", 0, "state="+domain.SagaPending)
	equal("dealbridge_db_scrape_success", 1)
	if _, ok := mfs["go_goroutines"]; !ok {
		t.Error("the Go runtime collector is missing")
	}

	// The relay passes the older row: one left, and the lag is the
	// younger row's age.
	f.exec(`INSERT INTO watermill_offsets_outbox (consumer_group, offset_acked, last_processed_transaction_id)
		SELECT $1, "offset", transaction_id FROM watermill_outbox ORDER BY created_at LIMIT 1`, outbox.ConsumerGroup)
	mfs = scrape(t, srv.URL+"/metrics")
	equal("dealbridge_relay_backlog_messages", 1)
	atLeast("dealbridge_relay_lag_seconds", 5, 85)
}

func TestCollectorEmptyDatabase(t *testing.T) {
	t.Parallel()
	reg, err := metrics.NewRegistry(pgtest.NewPool(t), metrics.Config{})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(metrics.Mux(reg, slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	mfs := scrape(t, srv.URL+"/metrics")
	for _, name := range []string{"dealbridge_unreconciled_oldest_age_seconds", "dealbridge_unreconciled_deals",
		"dealbridge_relay_lag_seconds", "dealbridge_relay_backlog_messages", "dealbridge_dead_letters_open", "dealbridge_alerts_open"} {
		if v := value(t, mfs, name); v != 0 {
			t.Errorf("%s = %v on an empty database, want 0", name, v)
		}
	}
	if v := value(t, mfs, "dealbridge_db_scrape_success"); v != 1 {
		t.Errorf("dealbridge_db_scrape_success = %v, want 1", v)
	}
	resp, err := http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /healthz: %s", resp.Status)
	}
}

// A database that does not answer costs the pipeline gauges, not the
// scrape: the rest is served, with dealbridge_db_scrape_success 0.
func TestCollectorDatabaseDown(t *testing.T) {
	t.Parallel()
	pool := pgtest.NewPool(t)
	cfg := pool.Config()
	cfg.ConnConfig.Port = 1 // nothing listens there
	down, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(down.Close)
	reg, err := metrics.NewRegistry(down, metrics.Config{})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(metrics.Mux(reg, slog.New(slog.DiscardHandler)))
	t.Cleanup(srv.Close)
	mfs := scrape(t, srv.URL+"/metrics")
	if v := value(t, mfs, "dealbridge_db_scrape_success"); v != 0 {
		t.Errorf("dealbridge_db_scrape_success = %v with the database down, want 0", v)
	}
	if _, ok := mfs["dealbridge_relay_lag_seconds"]; ok {
		t.Error("dealbridge_relay_lag_seconds served without a database")
	}
	if _, ok := mfs["go_goroutines"]; !ok {
		t.Error("the rest of the metrics is missing")
	}
}
