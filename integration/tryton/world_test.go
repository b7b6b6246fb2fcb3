package tryton_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/tryton"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/adapters/queue"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

var testMeta = domain.Metadata{Actor: "tryton-test", CorrelationID: "corr-tryton"}

// world is one test's surroundings: its own Tryton database, a fresh
// dealbridge database with its store, and in-process logs shown on failure.
type world struct {
	t      *testing.T
	tdb    string // Tryton database
	dbURL  string
	pool   *pgxpool.Pool
	store  *postgres.Store
	logs   *syncBuffer
	logger *slog.Logger
	insp   *rpcInspector
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{t: t, tdb: newTrytonDB(t), dbURL: pgtest.NewDatabase(t), logs: &syncBuffer{}}
	w.logger = slog.New(slog.NewTextHandler(w.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	t.Cleanup(func() {
		if t.Failed() {
			s := w.logs.String()
			if len(s) > 64<<10 {
				s = "…" + s[len(s)-64<<10:]
			}
			t.Logf("---- in-process logs:\n%s\n---- trytond log (tail):\n%s", s, logTail())
		}
	})
	cfg, err := pgxpool.ParseConfig(w.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 24
	if w.pool, err = pgxpool.NewWithConfig(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.pool.Close)
	w.store = postgres.NewStore(w.pool)
	w.insp = inspect(t, w.tdb)
	for _, sku := range []string{"SKU-1", "SKU-2"} {
		if _, err := w.store.SetInventory(context.Background(), sku, 10000, testMeta); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

// trytonConfig is the adapter's configuration for the world's database.
func (w *world) trytonConfig() tryton.Config {
	return tryton.Config{URL: env.url, Database: w.tdb, User: crmUser, Password: crmPassword,
		Timeout: 20 * time.Second, Logger: w.logger}
}

// client returns a Tryton port, closed at cleanup.
func (w *world) client(mod func(*tryton.Config)) *tryton.Client {
	cfg := w.trytonConfig()
	if mod != nil {
		mod(&cfg)
	}
	c := tryton.New(cfg)
	w.t.Cleanup(func() { _ = c.Close() })
	return c
}

// deal opens and closes (won) a deal and returns it with its key.
func (w *world) deal(customerID, currency string, lines ...domain.Line) (postgres.DealView, string) {
	w.t.Helper()
	ctx := context.Background()
	d, err := w.store.CreateDeal(ctx, domain.Customer{ID: customerID, Name: "Customer " + customerID}, currency, lines, testMeta)
	if err != nil {
		w.t.Fatal(err)
	}
	c, err := w.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, &d.Version, testMeta)
	if err != nil {
		w.t.Fatal(err)
	}
	if c.IdempotencyKey == nil {
		w.t.Fatalf("deal %s closed without a key", d.ID)
	}
	return c, *c.IdempotencyKey
}

func line(sku string, qty int64, price string) domain.Line {
	return domain.Line{SKU: sku, Description: "Item " + sku, Quantity: qty, UnitPrice: price}
}

// pipeline runs the relay and one saga handler per port in this process,
// wired as `dealbridge relay` and `dealbridge handler` wire them, until the
// test ends.
func (w *world) pipeline(ports ...erp.Port) {
	w.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, len(ports)+1)
	wg.Go(func() {
		if err := app.RunRelay(ctx, w.pool, app.RelayConfig{PollInterval: 50 * time.Millisecond}, w.logger); err != nil {
			errs <- fmt.Errorf("relay: %w", err)
		}
	})
	for i, p := range ports {
		hcfg := handlerConfig()
		bc := hcfg.Breaker
		bc.Logger = w.logger
		port := erp.NewBreaker(p, bc)
		wg.Go(func() {
			if err := app.RunHandlerWithPort(ctx, w.pool, port, hcfg, w.logger.With("handler", i)); err != nil {
				errs <- fmt.Errorf("handler %d: %w", i, err)
			}
		})
	}
	w.t.Cleanup(func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			w.t.Error("relay/handler still running 30s after cancel")
			return
		}
		close(errs)
		for err := range errs {
			w.t.Error(err)
		}
	})
}

// handlerConfig is a fast handler configuration for tests.
func handlerConfig() app.HandlerConfig {
	return app.HandlerConfig{
		Consumers: 4, PollInterval: 50 * time.Millisecond, Lease: 30 * time.Second, NackDelay: 100 * time.Millisecond,
		Retry:   domain.RetryPolicy{Initial: 100 * time.Millisecond, Max: time.Second, MaxAttempts: 40, MaxAge: 5 * time.Minute},
		Breaker: erp.BreakerConfig{FailureThreshold: 5, CoolDown: 200 * time.Millisecond},
	}
}

func (w *world) saga(key string) postgres.SagaView {
	w.t.Helper()
	v, ok, err := w.store.Saga(context.Background(), key)
	if err != nil || !ok {
		w.t.Fatalf("saga %s: found %v, err %v", key, ok, err)
	}
	return v
}

// waitSaga waits until the saga of key is in state, failing fast when it
// ends in the other terminal state.
func (w *world) waitSaga(key, state string, timeout time.Duration) postgres.SagaView {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v := w.saga(key)
		if v.State == state {
			return v
		}
		if v.State == domain.SagaInvoiced || v.State == domain.SagaCompensated {
			w.t.Fatalf("saga %s ended %s (attempts %d, last error %s), want %s", key, v.State, v.Attempts, nilStr(v.LastError), state)
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("saga %s not %s after %s: state %s, attempts %d, last error %s", key, state, timeout, v.State, v.Attempts, nilStr(v.LastError))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (w *world) getDeal(id string) postgres.DealView {
	w.t.Helper()
	d, err := w.store.GetDeal(context.Background(), id)
	if err != nil {
		w.t.Fatal(err)
	}
	return d
}

// oneInvoice checks that Tryton holds exactly one customer invoice for key
// (in any state), posted, with the deal's amount, currency and customer,
// and that the deal shows its number.
func (w *world) oneInvoice(d postgres.DealView, key, party string) trytonInvoice {
	w.t.Helper()
	invs := w.insp.invoices(key)
	var mine []trytonInvoice
	for _, inv := range invs {
		if inv.Reference == key {
			mine = append(mine, inv)
		}
	}
	if len(mine) != 1 {
		w.t.Fatalf("Tryton holds %d invoices with reference %s, want 1: %+v", len(mine), key, mine)
	}
	inv := mine[0]
	if inv.State != "posted" || inv.Number == "" {
		w.t.Errorf("invoice %+v: want posted with a number", inv)
	}
	if inv.Currency != d.Currency || inv.Party != party {
		w.t.Errorf("invoice %+v: want currency %s, party %s", inv, d.Currency, party)
	}
	if !decEqual(inv.Untaxed, d.Total) || !decEqual(inv.Total, d.Total) {
		w.t.Errorf("invoice %+v: want untaxed and total %s", inv, d.Total)
	}
	got := w.getDeal(d.ID)
	if got.Status != domain.StatusInvoiced || got.Invoice == nil || got.Invoice.Number != inv.Number || got.Invoice.IdempotencyKey != key {
		w.t.Errorf("deal %s: status %s, invoice %+v; want invoiced with Tryton's number %s", d.ID, got.Status, got.Invoice, inv.Number)
	}
	return inv
}

// republish publishes the deal's invoice request again: a duplicate
// delivery, as a redelivered or re-relayed message would be.
func (w *world) republish(d postgres.DealView, key string) {
	w.t.Helper()
	req := domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: key, CloseVersion: *d.CloseVersion,
		Customer: d.Customer, Currency: d.Currency, Lines: d.Lines, Total: d.Total}
	b, err := json.Marshal(req)
	if err != nil {
		w.t.Fatal(err)
	}
	m := message.NewMessage(watermill.NewUUID(), b)
	m.Metadata.Set(outbox.MetadataType, outbox.TypeInvoiceRequest)
	m.Metadata.Set(outbox.MetadataSchemaVersion, "1")
	queue.SetOrderingKey(m, d.ID)
	m.Metadata.Set(outbox.MetadataIdempotencyKey, key)
	pub, err := queue.NewPublisher(w.pool, queue.PublisherConfig{}, w.logger)
	if err != nil {
		w.t.Fatal(err)
	}
	if err := pub.Publish(outbox.InvoiceTopic, m); err != nil {
		w.t.Fatal(err)
	}
}

func decEqual(a, b string) bool {
	return strings.TrimRight(strings.TrimRight(a, "0"), ".") == strings.TrimRight(strings.TrimRight(b, "0"), ".")
}

func nilStr(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

// ---------------------------------------------------------------------------
// Transport faults.

// faultTransport forwards JSON-RPC calls to Tryton, failing chosen ones.
type faultTransport struct {
	mu    sync.Mutex
	calls map[string]int
	// fail, when it returns true for a method and its call number (from
	// 1), fails that call before it is sent.
	fail func(method string, n int) bool
}

func (f *faultTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		body, _ = io.ReadAll(req.Body)
		req.Body.Close()
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	var env struct{ Method string }
	_ = json.Unmarshal(body, &env)
	f.mu.Lock()
	if f.calls == nil {
		f.calls = map[string]int{}
	}
	f.calls[env.Method]++
	n := f.calls[env.Method]
	fail := f.fail != nil && f.fail(env.Method, n)
	f.mu.Unlock()
	if fail {
		return nil, fmt.Errorf("injected fault: %s call %d not sent", env.Method, n)
	}
	return http.DefaultTransport.RoundTrip(req)
}

func (f *faultTransport) count(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[method]
}

// ---------------------------------------------------------------------------
// Processes.

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startHandlerProcess runs `dealbridge handler --erp tryton …` until the
// test ends; it must exit 0 on SIGTERM.
func (w *world) startHandlerProcess(extraEnv []string, args ...string) {
	w.t.Helper()
	cmd := exec.Command(dealbridgeBin(w.t), append([]string{"handler", "--erp", "tryton",
		"--tryton-url", env.url, "--tryton-database", w.tdb, "--tryton-user", crmUser,
		"--tryton-password-file", env.passFile,
		"--consumers", "4", "--queue-poll-interval", "50ms", "--retry-initial", "100ms", "--retry-max", "1s",
		"--log-level", "info"}, args...)...)
	cmd.Env = append(append(os.Environ(), "DATABASE_URL="+w.dbURL), extraEnv...)
	stderr := &syncBuffer{}
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	cmd.Stdout = stderr
	running := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		once := sync.Once{}
		for sc.Scan() {
			fmt.Fprintln(stderr, sc.Text())
			if strings.Contains(sc.Text(), "handler running") {
				once.Do(func() { close(running) })
			}
		}
	}()
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); pw.Close() }()
	w.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				w.t.Errorf("handler process: %v\n%s", err, stderr.String())
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			w.t.Errorf("handler process did not stop on SIGTERM\n%s", stderr.String())
		}
		if w.t.Failed() {
			w.t.Logf("---- handler process output:\n%s", stderr.String())
		}
	})
	select {
	case <-running:
	case err := <-exited:
		w.t.Fatalf("handler process exited: %v\n%s", err, stderr.String())
	case <-time.After(30 * time.Second):
		w.t.Fatalf("handler process not running after 30s\n%s", stderr.String())
	}
}
