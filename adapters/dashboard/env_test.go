package dashboard_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

const testPassword = "correct horse battery staple"

// Users of the tests, by role.
var users = map[string]auth.Role{"alice": auth.RoleAdmin, "bob": auth.RoleAdmin, "olga": auth.RoleOperator, "vic": auth.RoleViewer}

type env struct {
	srv   *httptest.Server
	pool  *pgxpool.Pool
	store *postgres.Store
	svc   *auth.Service
}

type envOpt struct {
	auth   auth.Config
	tls    bool
	logger *slog.Logger
}

// newEnv serves the api process's whole HTTP front (CRM API, operator JSON
// API, dashboard) exactly as cmd/app wires it, over a fresh database with
// the test users.
func newEnv(t *testing.T, o envOpt) *env {
	t.Helper()
	pool := pgtest.NewPool(t)
	e := &env{pool: pool, store: postgres.NewStore(pool)}
	logger := o.logger
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	h, err := app.HTTPHandler(t.Context(), pool, logger, app.HTTPConfig{Auth: o.auth})
	if err != nil {
		t.Fatal(err)
	}
	e.svc = auth.New(pool, o.auth)
	for name, role := range users {
		if _, err := e.svc.AddUser(t.Context(), name, role, testPassword, auth.Who{Name: "test", Role: auth.RoleAdmin}); err != nil {
			t.Fatal(err)
		}
	}
	if o.tls {
		e.srv = httptest.NewTLSServer(h)
	} else {
		e.srv = httptest.NewServer(h)
	}
	t.Cleanup(e.srv.Close)
	if err := e.store.SetMakerChecker(t.Context(), true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.SetInventory(t.Context(), "SKU-1", 100_000, domain.Metadata{Actor: "test"}); err != nil {
		t.Fatal(err)
	}
	return e
}

type failed struct {
	dealID, dlID, alertID string
	req                   domain.InvoiceRequest
}

// failedDeal makes a won deal whose invoice the ERP rejected, compensated
// through the store as the saga does it.
func (e *env) failedDeal(t *testing.T, customerID string) failed {
	t.Helper()
	ctx := t.Context()
	m := domain.Metadata{Actor: "test"}
	d, err := e.store.CreateDeal(ctx, domain.Customer{ID: customerID, Name: "Globex Secret Corp"}, "USD",
		[]domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}}, m)
	if err != nil {
		t.Fatal(err)
	}
	if d, err = e.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, m); err != nil {
		t.Fatal(err)
	}
	req := domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: *d.IdempotencyKey, CloseVersion: *d.CloseVersion,
		Customer: d.Customer, Currency: d.Currency, Lines: d.Lines, Total: d.Total}
	payload, _ := json.Marshal(req)
	now := time.Now()
	res, err := e.store.Compensate(ctx, req,
		postgres.Failure{ErrorClass: "permanent", Reason: "unknown customer " + customerID, Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
		postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga", Payload: payload,
			Metadata: map[string]string{outbox.MetadataIdempotencyKey: req.IdempotencyKey}}, m)
	if err != nil {
		t.Fatal(err)
	}
	return failed{dealID: d.ID, dlID: res.DeadLetterID, alertID: res.AlertID, req: req}
}

// client is a browser-like HTTP client with a cookie jar that does not
// follow redirects (the tests look at them).
type client struct {
	t   *testing.T
	e   *env
	hc  *http.Client
	hdr http.Header // sent with every request
}

func (e *env) client(t *testing.T) *client {
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Transport: e.srv.Client().Transport, Jar: jar, Timeout: 30 * time.Second}
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &client{t: t, e: e, hc: hc, hdr: http.Header{}}
}

type resp struct {
	status int
	body   string
	header http.Header
}

func (c *client) do(method, path string, form url.Values) resp {
	c.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, c.e.srv.URL+path, body)
	if err != nil {
		c.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range c.hdr {
		req.Header[k] = v
	}
	r, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return resp{status: r.StatusCode, body: string(b), header: r.Header}
}

func (c *client) login(name string) resp {
	c.t.Helper()
	r := c.do("POST", "/login", url.Values{"name": {name}, "password": {testPassword}, "next": {"/"}})
	if r.status != http.StatusSeeOther || r.header.Get("Location") != "/" {
		c.t.Fatalf("login %s: %d %s", name, r.status, r.body)
	}
	return r
}

func (e *env) loggedIn(t *testing.T, name string) *client {
	t.Helper()
	c := e.client(t)
	c.login(name)
	return c
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
