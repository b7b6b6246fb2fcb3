package httpapi_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

type testBundle struct {
	srv  *httptest.Server
	pool *pgxpool.Pool
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	pool := pgtest.NewPool(t)
	srv := httptest.NewServer(httpapi.New(postgres.NewStore(pool), slog.New(slog.DiscardHandler)).Handler())
	t.Cleanup(srv.Close)
	return &testBundle{srv: srv, pool: pool}
}

func (b *testBundle) do(t *testing.T, method, path, body string) (int, map[string]any, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, b.srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("%s %s: body is not JSON: %s", method, path, raw)
		}
	}
	return resp.StatusCode, m, resp.Header
}

// counts returns the number of rows that any command could write.
func (b *testBundle) counts(t *testing.T) [4]int {
	t.Helper()
	var c [4]int
	err := b.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM watermill_outbox),
		(SELECT count(*) FROM deals WHERE status <> 'open'), (SELECT coalesce(sum(available),0) FROM inventory)`).Scan(&c[0], &c[1], &c[2], &c[3])
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const dealBody = `{"customer":{"id":"C-1","name":"Globex"},"currency":"USD","lines":[{"sku":"SKU-1","description":"Widget","quantity":2,"unit_price":"495.00"}]}`

func TestHappyPath(t *testing.T) {
	t.Parallel()
	b := setup(t)
	if st, m, _ := b.do(t, "PUT", "/api/v1/inventory/SKU-1", `{"available":100}`); st != 200 || m["available"].(float64) != 100 {
		t.Fatalf("set inventory: %d %v", st, m)
	}
	st, m, h := b.do(t, "POST", "/api/v1/deals", dealBody)
	if st != 201 || m["status"] != "open" || m["version"].(float64) != 1 || m["total"] != "990.00" {
		t.Fatalf("create: %d %v", st, m)
	}
	id := m["id"].(string)
	if h.Get("Location") != "/api/v1/deals/"+id {
		t.Fatalf("Location = %q", h.Get("Location"))
	}
	st, m, _ = b.do(t, "POST", "/api/v1/deals/"+id+"/close", `{"outcome":"won"}`)
	if st != 200 || m["status"] != "won" || m["idempotency_key"] != id+":2" {
		t.Fatalf("close: %d %v", st, m)
	}
	if st, m, _ := b.do(t, "GET", "/api/v1/inventory/SKU-1", ""); st != 200 || m["available"].(float64) != 98 || m["allocated"].(float64) != 2 {
		t.Fatalf("inventory after close: %d %v", st, m)
	}
	st, m, _ = b.do(t, "GET", "/api/v1/deals/"+id, "")
	if st != 200 || len(m["events"].([]any)) != 2 {
		t.Fatalf("get: %d %v", st, m)
	}
}

// Bad input gets a 4xx problem+json naming the problem, and nothing is
// written.
func TestBadInputIsRefusedAndWritesNothing(t *testing.T) {
	t.Parallel()
	b := setup(t)
	if st, _, _ := b.do(t, "PUT", "/api/v1/inventory/SKU-1", `{"available":1}`); st != 200 {
		t.Fatal("seed inventory")
	}
	_, m, _ := b.do(t, "POST", "/api/v1/deals", dealBody)
	open := m["id"].(string)
	_, m, _ = b.do(t, "POST", "/api/v1/deals", `{"customer":{"id":"C-2","name":"Initech"},"currency":"USD","lines":[{"sku":"SKU-1","quantity":1,"unit_price":"5.00"}]}`)
	lost := m["id"].(string)
	if st, _, _ := b.do(t, "POST", "/api/v1/deals/"+lost+"/close", `{"outcome":"lost"}`); st != 200 {
		t.Fatal("close lost")
	}
	tests := []struct {
		name, method, path, body string
		status                   int
		field                    string
	}{
		{"malformed json", "POST", "/api/v1/deals", `{"customer":`, 400, ""},
		{"empty body", "POST", "/api/v1/deals", ``, 400, ""},
		{"trailing data", "POST", "/api/v1/deals", dealBody + `{}`, 400, ""},
		{"unknown field", "POST", "/api/v1/deals", `{"customer":{"id":"C-1","name":"G"},"currency":"USD","lines":[],"discount":5}`, 400, "discount"},
		{"float amount", "POST", "/api/v1/deals", `{"customer":{"id":"C-1","name":"G"},"currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":495.0}]}`, 400, "lines.unit_price"},
		{"bad amount", "POST", "/api/v1/deals", `{"customer":{"id":"C-1","name":"G"},"currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":"4,95"}]}`, 422, "lines[0].unit_price"},
		{"bad currency", "POST", "/api/v1/deals", `{"customer":{"id":"C-1","name":"G"},"currency":"DOLLARS","lines":[{"sku":"S","quantity":1,"unit_price":"1.00"}]}`, 422, "currency"},
		{"missing customer", "POST", "/api/v1/deals", `{"currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":"1.00"}]}`, 422, "customer"},
		{"unknown deal", "POST", "/api/v1/deals/5b0c7a3e-0000-4000-8000-000000000000/close", `{"outcome":"won"}`, 404, ""},
		{"not a deal id", "GET", "/api/v1/deals/../../etc", ``, 404, ""},
		{"bad outcome", "POST", "/api/v1/deals/" + open + "/close", `{"outcome":"maybe"}`, 422, "outcome"},
		{"version conflict", "POST", "/api/v1/deals/" + open + "/close", `{"outcome":"won","version":5}`, 409, "version"},
		{"not enough stock", "POST", "/api/v1/deals/" + open + "/close", `{"outcome":"won"}`, 409, "lines"},
		{"illegal transition", "POST", "/api/v1/deals/" + lost + "/close", `{"outcome":"won"}`, 409, "status"},
		{"negative stock", "PUT", "/api/v1/inventory/SKU-1", `{"available":-1}`, 422, "available"},
		{"stock as string", "PUT", "/api/v1/inventory/SKU-1", `{"available":"5"}`, 400, "available"},
		{"missing stock", "PUT", "/api/v1/inventory/SKU-1", `{}`, 422, "available"},
		{"bad sku", "PUT", "/api/v1/inventory/a%20b", `{"available":1}`, 422, "sku"},
		{"unknown route", "GET", "/api/v1/nope", ``, 404, ""},
	}
	before := b.counts(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, m, h := b.do(t, tt.method, tt.path, tt.body)
			if st != tt.status {
				t.Fatalf("status %d, want %d: %v", st, tt.status, m)
			}
			if ct := h.Get("Content-Type"); ct != "application/problem+json" {
				t.Fatalf("Content-Type %q", ct)
			}
			if m["title"] == "" || m["status"].(float64) != float64(tt.status) {
				t.Fatalf("problem body %v", m)
			}
			if tt.field != "" && m["field"] != tt.field {
				t.Fatalf("field = %v, want %q (%v)", m["field"], tt.field, m)
			}
		})
	}
	if after := b.counts(t); after != before {
		t.Fatalf("refused requests wrote something: before %v after %v", before, after)
	}
}

func TestBodyTooLarge(t *testing.T) {
	t.Parallel()
	b := setup(t)
	big := `{"customer":{"id":"C-1","name":"` + strings.Repeat("x", 2<<20) + `"}}`
	st, m, _ := b.do(t, "POST", "/api/v1/deals", big)
	if st != 413 || !strings.Contains(m["detail"].(string), "larger than") {
		t.Fatalf("%d %v", st, m)
	}
}
