package erp_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/domain"
)

func TestClientSimRoundTrip(t *testing.T) {
	sim, ts := startSim(t, erpsim.Config{})
	c := newClient(ts.URL, 5*time.Second)
	ctx := t.Context()

	req := request("K-1")
	inv, err := c.CreateInvoice(ctx, req)
	if err != nil {
		t.Fatalf("CreateInvoice: %v", err)
	}
	if inv.Number != "INV-000001" || inv.Key != "K-1" || inv.Reference != "DEAL-K-1" || inv.Status != "posted" ||
		inv.Currency != "EUR" || inv.Total != "37.50" || inv.CustomerID != "C-1" || len(inv.Lines) != 1 ||
		inv.Lines[0] != req.Lines[0] || inv.CreatedAt.IsZero() {
		t.Fatalf("unexpected invoice %+v", inv)
	}

	got, ok, err := c.FindInvoiceByKey(ctx, "K-1")
	if err != nil || !ok {
		t.Fatalf("FindInvoiceByKey = %v, %v", ok, err)
	}
	if got.Number != inv.Number || !got.CreatedAt.Equal(inv.CreatedAt) {
		t.Fatalf("lookup %+v, created %+v", got, inv)
	}
	if _, ok, err := c.FindInvoiceByKey(ctx, "K-unknown"); err != nil || ok {
		t.Fatalf("FindInvoiceByKey(unknown) = %v, %v; want false, nil", ok, err)
	}
	if st := sim.Stats(); st.Creates != 1 || st.Attempts != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestClientReplayCreatesNothing(t *testing.T) {
	sim, ts := startSim(t, erpsim.Config{})
	c := newClient(ts.URL, 5*time.Second)

	first, err := c.CreateInvoice(t.Context(), request("K-1"))
	if err != nil {
		t.Fatal(err)
	}
	second, err := c.CreateInvoice(t.Context(), request("K-1"))
	if err != nil {
		t.Fatal(err)
	}
	if first.Number != second.Number || !first.CreatedAt.Equal(second.CreatedAt) {
		t.Fatalf("replay returned %+v, first %+v", second, first)
	}
	l := sim.Ledger()
	if len(l.Creates) != 1 || len(l.Attempts) != 2 || l.Attempts[1].Outcome != erpsim.OutcomeReplayed {
		t.Fatalf("ledger %+v", l)
	}
}

func TestClientKeyReuseWithDifferentBodyIsPermanent(t *testing.T) {
	sim, ts := startSim(t, erpsim.Config{})
	c := newClient(ts.URL, 5*time.Second)
	if _, err := c.CreateInvoice(t.Context(), request("K-1")); err != nil {
		t.Fatal(err)
	}
	other := request("K-1")
	other.Total = "99.00"
	_, err := c.CreateInvoice(t.Context(), other)
	e := erpErr(t, err, domain.ErrorPermanent)
	if e.StatusCode != http.StatusUnprocessableEntity || !strings.Contains(e.Message, "different parameters") {
		t.Fatalf("error %+v", e)
	}
	if st := sim.Stats(); st.Creates != 1 {
		t.Fatalf("creates = %d, want 1", st.Creates)
	}
}

func TestClientConcurrentSameKeyCreatesOne(t *testing.T) {
	// A durable store widens the in-flight window (fsync) so 409s occur.
	sim, ts := startSim(t, erpsim.Config{StorePath: filepath.Join(t.TempDir(), "erp.jsonl")})
	c := newClient(ts.URL, 5*time.Second)

	const n = 20
	var (
		mu      sync.Mutex
		numbers = map[string]int{}
		wg      sync.WaitGroup
		start   = make(chan struct{})
	)
	for range n {
		wg.Go(func() {
			<-start
			inv, err := c.CreateInvoice(t.Context(), request("K-same"))
			if err != nil {
				// Only "still in flight" (409) is acceptable, and it is transient.
				if e := erpErr(t, err, domain.ErrorTransient); e.StatusCode != http.StatusConflict {
					t.Errorf("unexpected error %v", err)
				}
				return
			}
			mu.Lock()
			numbers[inv.Number]++
			mu.Unlock()
		})
	}
	close(start)
	wg.Wait()
	if len(numbers) != 1 {
		t.Fatalf("invoice numbers returned: %v, want exactly one", numbers)
	}
	if st := sim.Stats(); st.Creates != 1 || st.MaxCreatesPerKey != 1 || st.Attempts != n {
		t.Fatalf("stats %+v", st)
	} else {
		t.Logf("attempts by outcome: %v", st.AttemptsByOutcome)
	}
	// A retry after the dust settles replays the one invoice.
	inv, err := c.CreateInvoice(t.Context(), request("K-same"))
	if err != nil || numbers[inv.Number] == 0 {
		t.Fatalf("retry = %+v, %v", inv, err)
	}
}

func TestClientSimDurableAcrossRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "erp.jsonl")

	sim1, err := erpsim.New(erpsim.Config{StorePath: path})
	if err != nil {
		t.Fatal(err)
	}
	ts1 := httptest.NewServer(sim1.Handler())
	c1 := newClient(ts1.URL, 5*time.Second)
	inv1, err := c1.CreateInvoice(t.Context(), request("K-1"))
	if err != nil {
		t.Fatal(err)
	}
	ts1.Close()
	if err := sim1.Close(); err != nil {
		t.Fatal(err)
	}

	sim2, ts2 := startSim(t, erpsim.Config{StorePath: path})
	c2 := newClient(ts2.URL, 5*time.Second)
	got, ok, err := c2.FindInvoiceByKey(t.Context(), "K-1")
	if err != nil || !ok || got.Number != inv1.Number {
		t.Fatalf("after restart FindInvoiceByKey = %+v, %v, %v", got, ok, err)
	}
	replay, err := c2.CreateInvoice(t.Context(), request("K-1"))
	if err != nil || replay.Number != inv1.Number {
		t.Fatalf("after restart replay = %+v, %v", replay, err)
	}
	next, err := c2.CreateInvoice(t.Context(), request("K-2"))
	if err != nil || next.Number != "INV-000002" {
		t.Fatalf("after restart new create = %+v, %v", next, err)
	}
	if st := sim2.Stats(); st.Creates != 2 || st.Attempts != 3 || st.MaxCreatesPerKey != 1 {
		t.Fatalf("stats after restart %+v", st)
	}
}

func TestClientFaultClasses(t *testing.T) {
	t.Run("error_rate is transient", func(t *testing.T) {
		sim, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{ErrorRate: 1}})
		_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
		e := erpErr(t, err, domain.ErrorTransient)
		if e.StatusCode != 500 && e.StatusCode != 503 {
			t.Fatalf("status %d", e.StatusCode)
		}
		if sim.Stats().Creates != 0 {
			t.Fatal("an invoice was created")
		}
	})
	t.Run("rate_limit is rate_limited with RetryAfter", func(t *testing.T) {
		_, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{RateLimitRate: 1, RetryAfterSeconds: 7}})
		_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
		if e := erpErr(t, err, domain.ErrorRateLimited); e.RetryAfter != 7*time.Second || e.StatusCode != 429 {
			t.Fatalf("error %+v", e)
		}
	})
	t.Run("reject_customers is permanent with the message", func(t *testing.T) {
		sim, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{RejectCustomers: []string{"C-9"}}})
		req := request("K-1")
		req.CustomerID = "C-9"
		_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), req)
		if e := erpErr(t, err, domain.ErrorPermanent); e.Message != "unknown customer C-9" || e.StatusCode != 422 {
			t.Fatalf("error %+v", e)
		}
		if sim.Stats().Creates != 0 {
			t.Fatal("an invoice was created")
		}
	})
	t.Run("validation is permanent naming the field", func(t *testing.T) {
		_, ts := startSim(t, erpsim.Config{})
		req := request("K-1")
		req.Currency = "euro"
		_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), req)
		if e := erpErr(t, err, domain.ErrorPermanent); !strings.Contains(e.Message, "currency") {
			t.Fatalf("error %+v", e)
		}
	})
	t.Run("down_until is transient with RetryAfter", func(t *testing.T) {
		_, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{DownUntil: time.Now().Add(time.Minute)}})
		_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
		if e := erpErr(t, err, domain.ErrorTransient); e.StatusCode != 503 || e.RetryAfter < 55*time.Second {
			t.Fatalf("error %+v", e)
		}
	})
	t.Run("hang with client timeout is ambiguous and creates nothing", func(t *testing.T) {
		sim, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{HangRate: 1}})
		c := newClient(ts.URL, 200*time.Millisecond)
		_, err := c.CreateInvoice(t.Context(), request("K-1"))
		e := erpErr(t, err, domain.ErrorAmbiguous)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("error %v does not wrap the deadline", e)
		}
		if _, ok, err := c.FindInvoiceByKey(t.Context(), "K-1"); err != nil || ok {
			t.Fatalf("FindInvoiceByKey = %v, %v; want no invoice", ok, err)
		}
		if sim.Stats().Creates != 0 {
			t.Fatal("an invoice was created")
		}
	})
	t.Run("drop_after_commit is ambiguous and the invoice is found", func(t *testing.T) {
		sim, ts := startSim(t, erpsim.Config{Faults: erpsim.Faults{DropAfterCommitRate: 1}})
		c := newClient(ts.URL, 5*time.Second)
		_, err := c.CreateInvoice(t.Context(), request("K-1"))
		erpErr(t, err, domain.ErrorAmbiguous)
		inv, ok, err := c.FindInvoiceByKey(t.Context(), "K-1")
		if err != nil || !ok || inv.Number != "INV-000001" {
			t.Fatalf("FindInvoiceByKey = %+v, %v, %v", inv, ok, err)
		}
		// Retrying with the same key replays instead of creating again (F9).
		if err := sim.SetFaults(erpsim.Faults{}); err != nil {
			t.Fatal(err)
		}
		again, err := c.CreateInvoice(t.Context(), request("K-1"))
		if err != nil || again.Number != inv.Number {
			t.Fatalf("retry = %+v, %v", again, err)
		}
		if st := sim.Stats(); st.Creates != 1 || st.Attempts != 2 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// statusServer answers every request with status, headers and body.
func statusServer(t *testing.T, status int, header http.Header, body string) *httptest.Server {
	t.Helper()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		for k, v := range header {
			w.Header()[k] = v
		}
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(ts.Close)
	return ts
}

func TestClientStatusMapping(t *testing.T) {
	problem := http.Header{"Content-Type": {"application/problem+json"}}
	future := time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat)
	long := strings.Repeat("x", 5000)
	tests := []struct {
		name       string
		status     int
		header     http.Header
		body       string
		class      domain.ErrorClass
		msg        string
		retryAfter func(time.Duration) bool
	}{
		{"500", 500, nil, "boom", domain.ErrorTransient, "boom", nil},
		{"502 empty body", 502, nil, "", domain.ErrorTransient, "Bad Gateway", nil},
		{"503 with Retry-After", 503, http.Header{"Retry-After": {"3"}}, "", domain.ErrorTransient, "",
			func(d time.Duration) bool { return d == 3*time.Second }},
		{"409 in flight", 409, problem, `{"title":"Conflict","detail":"still processing"}`, domain.ErrorTransient, "still processing", nil},
		{"429 seconds", 429, http.Header{"Retry-After": {"12"}}, "", domain.ErrorRateLimited, "",
			func(d time.Duration) bool { return d == 12*time.Second }},
		{"429 HTTP-date", 429, http.Header{"Retry-After": {future}}, "", domain.ErrorRateLimited, "",
			func(d time.Duration) bool { return d > 80*time.Second && d <= 90*time.Second }},
		{"429 garbage Retry-After", 429, http.Header{"Retry-After": {"soon"}}, "", domain.ErrorRateLimited, "",
			func(d time.Duration) bool { return d == 0 }},
		{"400 problem detail", 400, problem, `{"title":"Bad Request","detail":"lines: required"}`, domain.ErrorPermanent, "lines: required", nil},
		{"422 problem title only", 422, problem, `{"title":"Customer blocked"}`, domain.ErrorPermanent, "Customer blocked", nil},
		{"404 plain text", 404, nil, "no such endpoint\n", domain.ErrorPermanent, "no such endpoint", nil},
		{"403 json message", 403, nil, `{"message":"forbidden tenant"}`, domain.ErrorPermanent, "forbidden tenant", nil},
		{"413 truncated", 413, nil, long, domain.ErrorPermanent, strings.Repeat("x", 512) + "…", nil},
		{"2xx undecodable", 201, nil, "<html>ok</html>", domain.ErrorAmbiguous, "undecodable", nil},
		{"2xx without number", 200, nil, `{"status":"posted"}`, domain.ErrorAmbiguous, "without an invoice number", nil},
		{"2xx other key", 201, nil, `{"number":"INV-1","idempotency_key":"other"}`, domain.ErrorAmbiguous, "another idempotency key", nil},
		{"final 3xx", 304, nil, "", domain.ErrorAmbiguous, "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := statusServer(t, tt.status, tt.header, tt.body)
			_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
			e := erpErr(t, err, tt.class)
			if e.StatusCode != tt.status {
				t.Errorf("StatusCode = %d, want %d", e.StatusCode, tt.status)
			}
			if tt.msg != "" && !strings.Contains(e.Message, tt.msg) {
				t.Errorf("Message = %q, want it to contain %q", e.Message, tt.msg)
			}
			if tt.retryAfter != nil && !tt.retryAfter(e.RetryAfter) {
				t.Errorf("RetryAfter = %v", e.RetryAfter)
			}
		})
	}
}

func TestClientSuccessWithoutKeyEchoUsesRequestKey(t *testing.T) {
	ts := statusServer(t, 200, nil, `{"number":"INV-7","reference":"DEAL-K-1"}`)
	inv, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
	if err != nil || inv.Number != "INV-7" || inv.Key != "K-1" {
		t.Fatalf("= %+v, %v", inv, err)
	}
}

func TestClientSendsKeyHeaderAndBody(t *testing.T) {
	var gotKey, gotBody string
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotKey = r.Header.Get("Idempotency-Key")
		b := new(strings.Builder)
		_, _ = bufio.NewReader(r.Body).WriteTo(b)
		gotBody = b.String()
		w.WriteHeader(201)
		_, _ = w.Write([]byte(`{"number":"INV-1","idempotency_key":"K-1"}`))
	}))
	defer ts.Close()
	if _, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1")); err != nil {
		t.Fatal(err)
	}
	want := `{"reference":"DEAL-K-1","customer_id":"C-1","customer_name":"Acme GmbH","currency":"EUR",` +
		`"lines":[{"sku":"SKU-1","description":"Widget","quantity":3,"unit_price":"12.50"}],"total":"37.50"}`
	if gotKey != "K-1" || gotBody != want {
		t.Fatalf("key %q body %s", gotKey, gotBody)
	}
}

func TestClientTruncatedSuccessBodyIsAmbiguous(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(201)
		_, _ = w.Write([]byte(`{"number":"INV-`))
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	defer ts.Close()
	_, err := newClient(ts.URL, 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
	if e := erpErr(t, err, domain.ErrorAmbiguous); e.StatusCode != 201 {
		t.Fatalf("error %+v", e)
	}
}

// closedPortURL returns a URL on 127.0.0.1 where nothing listens.
func closedPortURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

func TestClientNotSentIsTransient(t *testing.T) {
	t.Run("connection refused", func(t *testing.T) {
		_, err := newClient(closedPortURL(t), 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
		e := erpErr(t, err, domain.ErrorTransient)
		var op *net.OpError
		if !errors.As(err, &op) || op.Op != "dial" {
			t.Fatalf("error %v is not a dial error", e)
		}
	})
	t.Run("DNS failure", func(t *testing.T) {
		_, err := newClient("http://erp.invalid", 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
		erpErr(t, err, domain.ErrorTransient)
	})
	t.Run("dial timeout", func(t *testing.T) {
		// A dialer that never connects stands in for a black-holed SYN.
		client := &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				<-ctx.Done()
				return nil, &net.OpError{Op: "dial", Net: "tcp", Err: ctx.Err()}
			},
		}}
		c := erp.NewHTTPClient(erp.HTTPConfig{BaseURL: "http://10.255.255.1:81", Timeout: 100 * time.Millisecond, Client: client})
		_, err := c.CreateInvoice(t.Context(), request("K-1"))
		erpErr(t, err, domain.ErrorTransient)
	})
	t.Run("invalid base URL is permanent", func(t *testing.T) {
		_, err := newClient("::not a url", time.Second).CreateInvoice(t.Context(), request("K-1"))
		erpErr(t, err, domain.ErrorPermanent)
	})
	t.Run("empty key is permanent", func(t *testing.T) {
		_, err := newClient(closedPortURL(t), time.Second).CreateInvoice(t.Context(), request(""))
		erpErr(t, err, domain.ErrorPermanent)
	})
}

// TestClientResetAfterWriteIsAmbiguous uses a raw TCP server that reads the
// whole request and then resets the connection.
func TestClientResetAfterWriteIsAmbiguous(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			req, err := http.ReadRequest(bufio.NewReader(conn))
			if err == nil {
				_, _ = bufio.NewReader(req.Body).WriteTo(discard{})
			}
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // RST instead of FIN
			}
			conn.Close()
		}
	}()
	_, err = newClient("http://"+ln.Addr().String(), 5*time.Second).CreateInvoice(t.Context(), request("K-1"))
	erpErr(t, err, domain.ErrorAmbiguous)
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func TestFindInvoiceByKey(t *testing.T) {
	t.Run("ignores invoices of other keys", func(t *testing.T) {
		ts := statusServer(t, 200, nil, `[{"number":"INV-1","idempotency_key":"other"}]`)
		_, ok, err := newClient(ts.URL, time.Second).FindInvoiceByKey(t.Context(), "K-1")
		if err != nil || ok {
			t.Fatalf("= %v, %v; want false, nil", ok, err)
		}
	})
	t.Run("names the duplicates of the first invoice", func(t *testing.T) {
		ts := statusServer(t, 200, nil, `[{"number":"INV-1","idempotency_key":"K-1"},{"number":"INV-9","idempotency_key":"other"},`+
			`{"number":"INV-2","idempotency_key":"K-1"}]`)
		inv, ok, err := newClient(ts.URL, time.Second).FindInvoiceByKey(t.Context(), "K-1")
		if err != nil || !ok || inv.Number != "INV-1" || len(inv.Duplicates) != 1 || inv.Duplicates[0] != "INV-2" {
			t.Fatalf("= %+v, %v, %v; want INV-1 with duplicate INV-2", inv, ok, err)
		}
	})
	t.Run("a single invoice has no duplicates", func(t *testing.T) {
		ts := statusServer(t, 200, nil, `[{"number":"INV-1","idempotency_key":"K-1"}]`)
		inv, ok, err := newClient(ts.URL, time.Second).FindInvoiceByKey(t.Context(), "K-1")
		if err != nil || !ok || inv.Number != "INV-1" || inv.Duplicates != nil {
			t.Fatalf("= %+v, %v, %v; want INV-1 without duplicates", inv, ok, err)
		}
	})
	t.Run("5xx is transient", func(t *testing.T) {
		ts := statusServer(t, 500, nil, "")
		_, _, err := newClient(ts.URL, time.Second).FindInvoiceByKey(t.Context(), "K-1")
		erpErr(t, err, domain.ErrorTransient)
	})
	t.Run("undecodable is transient", func(t *testing.T) {
		ts := statusServer(t, 200, nil, "nope")
		_, _, err := newClient(ts.URL, time.Second).FindInvoiceByKey(t.Context(), "K-1")
		erpErr(t, err, domain.ErrorTransient)
	})
	t.Run("timeout is transient, never ambiguous", func(t *testing.T) {
		ts := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
		defer ts.Close()
		_, _, err := newClient(ts.URL, 100*time.Millisecond).FindInvoiceByKey(t.Context(), "K-1")
		erpErr(t, err, domain.ErrorTransient)
	})
	t.Run("refused is transient", func(t *testing.T) {
		_, _, err := newClient(closedPortURL(t), time.Second).FindInvoiceByKey(t.Context(), "K-1")
		erpErr(t, err, domain.ErrorTransient)
	})
	t.Run("query carries the key", func(t *testing.T) {
		var q string
		ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			q = r.URL.Path + "?" + r.URL.RawQuery
			_, _ = w.Write([]byte(`[]`))
		}))
		defer ts.Close()
		if _, _, err := newClient(ts.URL+"/", time.Second).FindInvoiceByKey(t.Context(), "deal 1/v2"); err != nil {
			t.Fatal(err)
		}
		if q != "/invoices?idempotency_key=deal+1%2Fv2" {
			t.Fatalf("request %s", q)
		}
	})
}

// TestClientReusesAConnectionPerConcurrentCaller: 16 callers making 50
// calls each keep reusing their keep-alive connections: the ERP accepts
// about 16 (with net/http's default of 2 idle connections per host it
// accepted 21 to 75 in five runs).
func TestClientReusesAConnectionPerConcurrentCaller(t *testing.T) {
	sim, err := erpsim.New(erpsim.Config{})
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * time.Millisecond) // every caller in flight at once
		sim.Handler().ServeHTTP(w, r)
	})
	ts := httptest.NewUnstartedServer(slow)
	ts.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			accepted.Add(1)
		}
	}
	ts.Start()
	t.Cleanup(func() { _ = sim.Close(); ts.Close() })

	const callers, calls = 16, 50
	c := erp.NewHTTPClient(erp.HTTPConfig{BaseURL: ts.URL, Timeout: 5 * time.Second, IdleConns: callers})
	var wg sync.WaitGroup
	for g := range callers {
		wg.Go(func() {
			for i := range calls {
				if _, err := c.CreateInvoice(t.Context(), request(fmt.Sprintf("K-conn-%d-%d", g, i))); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := accepted.Load(); n > callers+4 { // +4: net/http may dial while a connection is on its way back
		t.Fatalf("%d connections for %d concurrent callers (%d calls)", n, callers, callers*calls)
	}
}
