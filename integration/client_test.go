package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shopspring/decimal"
)

// The API and simulator contracts as a client sees them: only the fields
// the tests read, decoded from the wire rather than shared with the server.

type customerJSON struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

type lineJSON struct {
	SKU         string `json:"sku"`
	Description string `json:"description"`
	Quantity    int64  `json:"quantity"`
	UnitPrice   string `json:"unit_price"`
}

type createDealJSON struct {
	Customer customerJSON `json:"customer"`
	Currency string       `json:"currency"`
	Lines    []lineJSON   `json:"lines"`
}

type dealJSON struct {
	ID       string       `json:"id"`
	Status   string       `json:"status"`
	Version  int          `json:"version"`
	Customer customerJSON `json:"customer"`
	Currency string       `json:"currency"`
	Lines    []lineJSON   `json:"lines"`
	Total    string       `json:"total"`
	Invoice  *struct {
		Number         string `json:"number"`
		IdempotencyKey string `json:"idempotency_key"`
	} `json:"invoice"`
	Events []struct {
		Type string `json:"type"`
	} `json:"events"`
}

type inventoryJSON struct {
	SKU       string `json:"sku"`
	Available int64  `json:"available"`
	Allocated int64  `json:"allocated"`
}

type invoiceJSON struct {
	Number         string     `json:"number"`
	Reference      string     `json:"reference"`
	IdempotencyKey string     `json:"idempotency_key"`
	CustomerID     string     `json:"customer_id"`
	Currency       string     `json:"currency"`
	Total          string     `json:"total"`
	Lines          []lineJSON `json:"lines"`
}

type simStatsJSON struct {
	Attempts          int            `json:"attempts"`
	Creates           int            `json:"creates"`
	Keys              int            `json:"keys"`
	MaxCreatesPerKey  int            `json:"max_creates_per_key"`
	AttemptsByOutcome map[string]int `json:"attempts_by_outcome"`
}

// client talks JSON over HTTP. Its methods return errors instead of failing
// the test, so that they can run in worker goroutines.
type client struct {
	base string
	http *http.Client
}

func newClient(base string) *client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 32
	return &client{base: base, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// do sends body (JSON-encoded unless nil) and decodes a response of status
// want into out.
func (c *client) do(method, path string, body any, want int, out any) error {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.base+path, r)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read body: %w", method, path, err)
	}
	if resp.StatusCode != want {
		return fmt.Errorf("%s %s: status %d, want %d: %s", method, path, resp.StatusCode, want, bytes.TrimSpace(b))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s %s: decode %s: %w", method, path, b, err)
		}
	}
	return nil
}

func (c *client) setInventory(sku string, available int64) (inventoryJSON, error) {
	var v inventoryJSON
	err := c.do(http.MethodPut, "/api/v1/inventory/"+url.PathEscape(sku), map[string]int64{"available": available}, http.StatusOK, &v)
	return v, err
}

func (c *client) inventory(sku string) (inventoryJSON, error) {
	var v inventoryJSON
	err := c.do(http.MethodGet, "/api/v1/inventory/"+url.PathEscape(sku), nil, http.StatusOK, &v)
	return v, err
}

func (c *client) createDeal(req createDealJSON) (dealJSON, error) {
	var d dealJSON
	err := c.do(http.MethodPost, "/api/v1/deals", req, http.StatusCreated, &d)
	return d, err
}

func (c *client) closeDeal(id string) (dealJSON, error) {
	var d dealJSON
	err := c.do(http.MethodPost, "/api/v1/deals/"+id+"/close", map[string]string{"outcome": "won"}, http.StatusOK, &d)
	return d, err
}

func (c *client) deal(id string) (dealJSON, error) {
	var d dealJSON
	err := c.do(http.MethodGet, "/api/v1/deals/"+id, nil, http.StatusOK, &d)
	return d, err
}

// invoices lists the simulator's invoices; query is e.g. "?reference=ID".
func (c *client) invoices(query string) ([]invoiceJSON, error) {
	var v []invoiceJSON
	err := c.do(http.MethodGet, "/invoices"+query, nil, http.StatusOK, &v)
	return v, err
}

func (c *client) simStats() (simStatsJSON, error) {
	var v simStatsJSON
	err := c.do(http.MethodGet, "/_sim/stats", nil, http.StatusOK, &v)
	return v, err
}

// expectedTotal is the sum of quantity × unit price, with the currency's
// two decimals (every test deal is in USD).
func expectedTotal(t testing.TB, lines []lineJSON) string {
	t.Helper()
	sum := decimal.Zero
	for _, l := range lines {
		p, err := decimal.NewFromString(l.UnitPrice)
		if err != nil {
			t.Fatalf("unit price %q: %v", l.UnitPrice, err)
		}
		sum = sum.Add(p.Mul(decimal.NewFromInt(l.Quantity)))
	}
	return sum.StringFixed(2)
}

// invariantI4 is the SQL form of invariant I4 for a run without failures:
// every won close (DealWon, keyed by its idempotency key) has exactly one
// InvoiceCreated event with that key, no InvoiceCreated lacks its DealWon,
// and no deal is left in status won.
const invariantI4 = `
WITH won AS (
    SELECT payload->>'idempotency_key' AS k FROM events WHERE type = 'DealWon'
), invoiced AS (
    SELECT payload->>'idempotency_key' AS k, count(*) AS n FROM events WHERE type = 'InvoiceCreated' GROUP BY 1
)
SELECT
    (SELECT count(*) FROM won) AS won,
    (SELECT count(*) FROM won LEFT JOIN invoiced USING (k) WHERE invoiced.n IS NULL) AS not_invoiced,
    (SELECT count(*) FROM invoiced WHERE n > 1) AS invoiced_twice,
    (SELECT count(*) FROM invoiced WHERE k NOT IN (SELECT k FROM won)) AS invoiced_without_win,
    (SELECT count(*) FROM deals WHERE status = 'won') AS left_won`

// checkInvariantI4 fails the test unless I4 holds and exactly wantWon
// closes were won.
func checkInvariantI4(t testing.TB, pool *pgxpool.Pool, wantWon int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var won, notInvoiced, twice, orphan, leftWon int
	if err := pool.QueryRow(ctx, invariantI4).Scan(&won, &notInvoiced, &twice, &orphan, &leftWon); err != nil {
		t.Fatalf("I4 query: %v", err)
	}
	if won != wantWon || notInvoiced != 0 || twice != 0 || orphan != 0 || leftWon != 0 {
		t.Errorf("I4 violated: %d DealWon (want %d), %d not invoiced, %d invoiced more than once, %d invoiced without a win, %d deals left won",
			won, wantWon, notInvoiced, twice, orphan, leftWon)
	}
}
