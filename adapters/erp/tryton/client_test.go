package tryton

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/domain"
)

// fakeTryton answers JSON-RPC like Tryton 6.0 with canned results; a test
// overrides methods through handle.
type fakeTryton struct {
	t        *testing.T
	mu       sync.Mutex
	calls    []fakeCall
	sessions int
	// invoices returned by search_read on account.invoice
	invoices []map[string]any
	// handle, when set and returning true, has answered the call.
	handle func(w http.ResponseWriter, c fakeCall) bool
}

type fakeCall struct {
	Method string
	Params []any
	Auth   string
	Raw    string
}

func (f *fakeTryton) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var req struct {
		ID     int64
		Method string
		Params []any
	}
	if err := json.Unmarshal(b, &req); err != nil {
		http.Error(w, "bad json", 400)
		return
	}
	c := fakeCall{Method: req.Method, Params: req.Params, Auth: r.Header.Get("Authorization"), Raw: string(b)}
	f.mu.Lock()
	f.calls = append(f.calls, c)
	h := f.handle
	f.mu.Unlock()
	if h != nil && h(w, c) {
		return
	}
	result := func(v any) {
		_ = json.NewEncoder(w).Encode(map[string]any{"id": req.ID, "result": v})
	}
	switch req.Method {
	case "common.db.login":
		f.mu.Lock()
		f.sessions++
		n := f.sessions
		f.mu.Unlock()
		result([]any{2, "key" + string(rune('0'+n))})
	case "model.res.user.get_preferences":
		result(map[string]any{"company": 7, "language": "en", "company.rec_name": "Acme"})
	case "model.account.invoice.search_read":
		f.mu.Lock()
		defer f.mu.Unlock()
		result(f.invoices)
	case "model.party.party.search_read", "model.product.product.search_read", "model.currency.currency.search_read":
		result([]any{map[string]any{"id": 3}})
	case "model.party.party.read":
		result([]any{map[string]any{"id": 3, "code": "C-1"}})
	case "model.currency.currency.read":
		result([]any{map[string]any{"id": 3, "code": "USD"}})
	case "model.account.invoice.on_change":
		result([]any{map[string]any{"invoice_address": 11, "journal": 12, "payment_term": 13, "journal.": map[string]any{"rec_name": "Revenue"}}})
	case "model.account.invoice.on_change_with":
		result(map[string]any{"account": 14})
	case "model.account.invoice.line.on_change":
		result([]any{map[string]any{"account": 15, "unit": 16, "taxes": []any{}}})
	case "model.account.invoice.create":
		result([]any{99})
	case "model.account.invoice.post", "model.account.invoice.delete":
		result(nil)
	case "model.account.invoice.read":
		result([]any{postedRow(99, "INV/2026/00001")})
	default:
		f.t.Errorf("unexpected call %s", req.Method)
		http.Error(w, "unexpected", 500)
	}
}

func postedRow(id int, number string) map[string]any {
	return map[string]any{"id": id, "number": number, "reference": "D-1:2", "state": "posted", "party": 3, "currency": 3,
		"untaxed_amount": map[string]any{"__class__": "Decimal", "decimal": "990.30"},
		"total_amount":   map[string]any{"__class__": "Decimal", "decimal": "990.30"},
		"create_date":    map[string]any{"__class__": "datetime", "year": 2026, "month": 11, "day": 25, "hour": 6, "minute": 0, "second": 0, "microsecond": 0}}
}

func (f *fakeTryton) methods() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.calls {
		out = append(out, c.Method)
	}
	return out
}

func (f *fakeTryton) call(method string) (fakeCall, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.calls {
		if c.Method == method {
			return c, true
		}
	}
	return fakeCall{}, false
}

func newFake(t *testing.T) (*fakeTryton, *Client) {
	f := &fakeTryton{t: t}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c := New(Config{URL: srv.URL, Database: "erp", User: "crm", Password: "pw", Timeout: 2 * time.Second})
	return f, c
}

var req1 = erp.InvoiceRequest{Key: "D-1:2", Reference: "D-1", CustomerID: "C-1", CustomerName: "Globex", Currency: "USD", Total: "990.30",
	Lines: []erp.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}, {SKU: "SKU-2", Quantity: 3, UnitPrice: "0.10"}}}

func TestCreateFlowNoneFound(t *testing.T) {
	f, c := newFake(t)
	inv, err := c.CreateInvoice(context.Background(), req1)
	if err != nil {
		t.Fatal(err)
	}
	if inv.Number != "INV/2026/00001" || inv.Total != "990.30" || inv.Currency != "USD" || inv.Key != "D-1:2" || inv.Reference != "D-1" || inv.Status != "posted" {
		t.Errorf("invoice %+v", inv)
	}
	ms := strings.Join(f.methods(), " ")
	for _, want := range []string{"common.db.login", "model.account.invoice.search_read", "model.account.invoice.create", "model.account.invoice.post"} {
		if !strings.Contains(ms, want) {
			t.Errorf("calls %s: missing %s", ms, want)
		}
	}
	create, _ := f.call("model.account.invoice.create")
	// Decimal objects, never floats; the company in the values and the
	// context; K in the reference; no invoice_date (posting sets it).
	for _, want := range []string{`"unit_price":{"__class__":"Decimal","decimal":"495"}`, `"unit_price":{"__class__":"Decimal","decimal":"0.1"}`,
		`"company":7`, `"reference":"D-1:2"`, `"invoice_address":11`, `"account":14`, `"journal":12`, `"account":15`, `"unit":16`} {
		if !strings.Contains(create.Raw, want) {
			t.Errorf("create body %s: missing %s", create.Raw, want)
		}
	}
	if strings.Contains(create.Raw, "invoice_date") {
		t.Errorf("create body sets invoice_date: %s", create.Raw)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, call := range f.calls {
		if strings.HasPrefix(call.Method, "common.") || call.Method == "model.res.user.get_preferences" {
			continue
		}
		ctx, _ := call.Params[len(call.Params)-1].(map[string]any)
		if ctx["company"] != float64(7) {
			t.Errorf("%s: context %v without the company", call.Method, call.Params[len(call.Params)-1])
		}
		if !strings.HasPrefix(call.Auth, "Session ") {
			t.Errorf("%s: Authorization %q", call.Method, call.Auth)
		}
	}
}

func TestCreateFlowFoundStates(t *testing.T) {
	for _, tc := range []struct {
		state     string
		wantWrite []string
	}{
		{"posted", nil},
		{"paid", nil},
		{"draft", []string{"model.account.invoice.post"}},
		{"validated", []string{"model.account.invoice.post"}},
	} {
		t.Run(tc.state, func(t *testing.T) {
			f, c := newFake(t)
			row := postedRow(42, "INV/2026/00042")
			row["state"] = tc.state
			if tc.state == "draft" || tc.state == "validated" {
				row["number"] = nil
			}
			f.invoices = []map[string]any{row}
			if _, err := c.CreateInvoice(context.Background(), req1); err != nil {
				t.Fatal(err)
			}
			var writes []string
			for _, m := range f.methods() {
				switch m {
				case "model.account.invoice.create", "model.account.invoice.post", "model.account.invoice.delete":
					writes = append(writes, m)
				}
			}
			if strings.Join(writes, ",") != strings.Join(tc.wantWrite, ",") {
				t.Errorf("writes %v, want %v", writes, tc.wantWrite)
			}
			if tc.state == "draft" {
				post, _ := f.call("model.account.invoice.post")
				if !strings.Contains(post.Raw, "[[42]") {
					t.Errorf("post %s: want the draft 42", post.Raw)
				}
			}
		})
	}
}

func TestDraftThatNoLongerMatchesIsReplaced(t *testing.T) {
	f, c := newFake(t)
	row := postedRow(42, "")
	row["state"], row["number"] = "draft", nil
	row["untaxed_amount"] = map[string]any{"__class__": "Decimal", "decimal": "5.00"}
	f.invoices = []map[string]any{row}
	if _, err := c.CreateInvoice(context.Background(), req1); err != nil {
		t.Fatal(err)
	}
	ms := strings.Join(f.methods(), " ")
	if !strings.Contains(ms, "model.account.invoice.delete") || !strings.Contains(ms, "model.account.invoice.create") {
		t.Errorf("calls %s: want the stale draft deleted and a new invoice created", ms)
	}
}

func TestDuplicateIsPermanentAndWrapsSentinel(t *testing.T) {
	f, c := newFake(t)
	f.invoices = []map[string]any{postedRow(1, "INV/1"), postedRow(2, "INV/2")}
	_, err := c.CreateInvoice(context.Background(), req1)
	if domain.ClassOf(err) != domain.ErrorPermanent || !errors.Is(err, erp.ErrDuplicateInvoice) || !strings.Contains(err.Error(), "INV/1") {
		t.Fatalf("err %v", err)
	}
	inv, ok, err := c.FindInvoiceByKey(context.Background(), "D-1:2")
	if err != nil || !ok || inv.Number != "INV/1" {
		t.Errorf("FindInvoiceByKey: %+v %v %v: want the oldest", inv, ok, err)
	}
}

func TestFindIgnoresDrafts(t *testing.T) {
	f, c := newFake(t)
	row := postedRow(1, "")
	row["state"], row["number"] = "draft", nil
	f.invoices = []map[string]any{row}
	if _, ok, err := c.FindInvoiceByKey(context.Background(), "D-1:2"); ok || err != nil {
		t.Errorf("found %v, err %v: a draft is not an invoice yet", ok, err)
	}
}

func TestErrorMapping(t *testing.T) {
	rpcErr := func(e any) func(w http.ResponseWriter) {
		return func(w http.ResponseWriter) { _ = json.NewEncoder(w).Encode(map[string]any{"id": 1, "error": e}) }
	}
	status := func(code int, retryAfter string) func(w http.ResponseWriter) {
		return func(w http.ResponseWriter) {
			if retryAfter != "" {
				w.Header().Set("Retry-After", retryAfter)
			}
			w.WriteHeader(code)
			_, _ = w.Write([]byte("<html><title>oops</title></html>"))
		}
	}
	for _, tc := range []struct {
		name    string
		reply   func(w http.ResponseWriter)
		class   domain.ErrorClass
		message string
		retry   time.Duration
	}{
		{"UserError", rpcErr([]any{"UserError", []any{`A value is required for field "Party" in "Invoice".`, "", nil}}),
			domain.ErrorPermanent, `A value is required for field "Party" in "Invoice".`, 0},
		{"UserWarning", rpcErr([]any{"UserWarning", []any{"invoice_payment_term_9", "payment date in the past", ""}}),
			domain.ErrorPermanent, "payment date in the past", 0},
		{"ConcurrencyException", rpcErr([]any{"ConcurrencyException", "Records were modified in the meanwhile"}), domain.ErrorTransient, "modified", 0},
		{"server exception", rpcErr([]any{"'no.such.model'", ""}), domain.ErrorTransient, "server error", 0},
		{"500", status(500, ""), domain.ErrorTransient, "HTTP 500", 0},
		{"503", status(503, "3"), domain.ErrorTransient, "HTTP 503", 3 * time.Second},
		{"429", status(429, "7"), domain.ErrorRateLimited, "HTTP 429", 7 * time.Second},
		{"403", status(403, ""), domain.ErrorPermanent, "HTTP 403", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, c := newFake(t)
			f.handle = func(w http.ResponseWriter, call fakeCall) bool {
				if call.Method != "model.account.invoice.create" {
					return false
				}
				tc.reply(w)
				return true
			}
			_, err := c.CreateInvoice(context.Background(), req1)
			var e *domain.ERPError
			if !errors.As(err, &e) || e.Class != tc.class || !strings.Contains(e.Message, tc.message) || e.RetryAfter != tc.retry {
				t.Errorf("err %#v, want class %s, message with %q, retry after %s", err, tc.class, tc.message, tc.retry)
			}
		})
	}
}

func TestReloginOnceOn401(t *testing.T) {
	f, c := newFake(t)
	posts := 0
	f.handle = func(w http.ResponseWriter, call fakeCall) bool {
		if call.Method == "model.account.invoice.post" {
			posts++
			if posts == 1 {
				w.WriteHeader(http.StatusUnauthorized) // the session is not fresh
				return true
			}
			if !strings.Contains(call.Auth, "") || call.Auth == "" {
				t.Error("retried post without a session")
			}
		}
		return false
	}
	if _, err := c.CreateInvoice(context.Background(), req1); err != nil {
		t.Fatal(err)
	}
	if f.sessions != 2 || posts != 2 {
		t.Errorf("logins %d, posts %d: want 2 and 2", f.sessions, posts)
	}

	// A 401 right after a new login is not retried again.
	f2, c2 := newFake(t)
	f2.handle = func(w http.ResponseWriter, call fakeCall) bool {
		if call.Method == "model.account.invoice.search_read" {
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	}
	_, err := c2.CreateInvoice(context.Background(), req1)
	if domain.ClassOf(err) != domain.ErrorTransient || f2.sessions != 2 {
		t.Errorf("err %v after %d logins: want transient after 2", err, f2.sessions)
	}
}

func TestWrongPasswordIsTransientWithClearMessage(t *testing.T) {
	f, c := newFake(t)
	f.handle = func(w http.ResponseWriter, call fakeCall) bool {
		if call.Method == "common.db.login" {
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	}
	_, err := c.CreateInvoice(context.Background(), req1)
	if domain.ClassOf(err) != domain.ErrorTransient || !strings.Contains(err.Error(), "wrong user or password") {
		t.Errorf("err %v", err)
	}
}

// A timeout after a create was sent is ambiguous; after a search it is
// transient. Connection refused is transient.
func TestTimeoutsAndConnectionErrors(t *testing.T) {
	for _, method := range []string{"model.account.invoice.create", "model.account.invoice.post", "model.account.invoice.search_read"} {
		t.Run(method, func(t *testing.T) {
			f, _ := newFake(t)
			release := make(chan struct{})
			f.handle = func(w http.ResponseWriter, call fakeCall) bool {
				if call.Method != method {
					return false
				}
				<-release
				return true
			}
			srv := httptest.NewServer(f)
			defer srv.Close()
			c := New(Config{URL: srv.URL, Database: "erp", User: "crm", Password: "pw", Timeout: 300 * time.Millisecond})
			_, err := c.CreateInvoice(context.Background(), req1)
			close(release)
			want := domain.ErrorAmbiguous
			if method == "model.account.invoice.search_read" {
				want = domain.ErrorTransient
			}
			if domain.ClassOf(err) != want {
				t.Errorf("err %v, want %s", err, want)
			}
		})
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c := New(Config{URL: "http://" + addr, Database: "erp", User: "crm", Password: "pw"})
	if _, err := c.CreateInvoice(context.Background(), req1); domain.ClassOf(err) != domain.ErrorTransient {
		t.Errorf("connection refused: %v, want transient", err)
	}
	if _, _, err := c.FindInvoiceByKey(context.Background(), "D-1:2"); domain.ClassOf(err) != domain.ErrorTransient {
		t.Errorf("connection refused on lookup: %v, want transient", err)
	}
}

func TestMissingCustomerRejected(t *testing.T) {
	f, c := newFake(t)
	f.handle = func(w http.ResponseWriter, call fakeCall) bool {
		if call.Method == "model.party.party.search_read" {
			_ = json.NewEncoder(w).Encode(map[string]any{"id": 1, "result": []any{}})
			return true
		}
		return false
	}
	_, err := c.CreateInvoice(context.Background(), req1)
	if domain.ClassOf(err) != domain.ErrorPermanent || !strings.Contains(err.Error(), `unknown customer: no party with code "C-1"`) {
		t.Errorf("err %v", err)
	}
	for _, m := range f.methods() {
		if m == "model.account.invoice.create" || m == "model.party.party.create" {
			t.Errorf("%s called for a rejected customer", m)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	c := New(Config{URL: "not a url", Database: "", User: "crm"})
	_, err := c.CreateInvoice(context.Background(), req1)
	if domain.ClassOf(err) != domain.ErrorPermanent || !strings.Contains(err.Error(), "no tryton password") {
		t.Errorf("err %v", err)
	}
	if err := (Config{URL: "http://x", Database: "d", User: "u", Password: "p", MissingCustomer: "maybe"}).Validate(); err == nil {
		t.Error("MissingCustomer maybe accepted")
	}
}

func TestDealID(t *testing.T) {
	for k, want := range map[string]string{"abc:2": "abc", "abc:2:r1": "abc", "abc": "abc"} {
		if got := dealID(k); got != want {
			t.Errorf("dealID(%q) = %q, want %q", k, got, want)
		}
	}
}
