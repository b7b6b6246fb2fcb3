package erpsim

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

const validBody = `{"reference":"DEAL-1","customer_id":"C-1","customer_name":"Acme","currency":"EUR",` +
	`"lines":[{"sku":"S","description":"Widget","quantity":2,"unit_price":"10.00"}],"total":"20.00"}`

func start(t *testing.T, cfg Config) (*Server, *httptest.Server) {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		_ = s.Close()
		ts.Close()
	})
	return s, ts
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func do(t *testing.T, method, url, key, body string) response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, resp.Header, b}
}

func decode[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

func TestCreateAndQuery(t *testing.T) {
	_, ts := start(t, Config{})
	r := do(t, "POST", ts.URL+"/invoices", "K-1", validBody)
	if r.status != 201 || r.header.Get("Location") != "/invoices/INV-000001" {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	inv := decode[Invoice](t, r.body)
	if inv.Number != "INV-000001" || inv.Status != "posted" || inv.Reference != "DEAL-1" || inv.IdempotencyKey != "K-1" {
		t.Fatalf("invoice %+v", inv)
	}
	other := strings.Replace(validBody, "DEAL-1", "DEAL-2", 1)
	if r := do(t, "POST", ts.URL+"/invoices", "K-2", other); r.status != 201 {
		t.Fatalf("second create: %d %s", r.status, r.body)
	}

	for _, tt := range []struct {
		query string
		want  []string
	}{
		{"", []string{"INV-000001", "INV-000002"}},
		{"?reference=DEAL-2", []string{"INV-000002"}},
		{"?idempotency_key=K-1", []string{"INV-000001"}},
		{"?idempotency_key=nope", []string{}},
		{"?reference=DEAL-1&idempotency_key=K-2", []string{}},
	} {
		r := do(t, "GET", ts.URL+"/invoices"+tt.query, "", "")
		if r.status != 200 || !strings.HasPrefix(string(r.body), "[") {
			t.Fatalf("list %s: %d %s", tt.query, r.status, r.body)
		}
		got := []string{}
		for _, inv := range decode[[]Invoice](t, r.body) {
			got = append(got, inv.Number)
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("list %s = %v, want %v", tt.query, got, tt.want)
		}
	}

	r = do(t, "GET", ts.URL+"/invoices/INV-000002", "", "")
	if r.status != 200 || decode[Invoice](t, r.body).Reference != "DEAL-2" {
		t.Fatalf("get: %d %s", r.status, r.body)
	}
	if r := do(t, "GET", ts.URL+"/invoices/INV-999999", "", ""); r.status != 404 {
		t.Fatalf("get unknown: %d", r.status)
	}
	if r := do(t, "GET", ts.URL+"/healthz", "", ""); r.status != 200 {
		t.Fatalf("healthz: %d", r.status)
	}
}

func TestRequestValidation(t *testing.T) {
	_, ts := start(t, Config{})
	r := do(t, "POST", ts.URL+"/invoices", "", validBody)
	if r.status != 400 || r.header.Get("Content-Type") != "application/problem+json" ||
		!strings.Contains(decode[problem](t, r.body).Detail, "Idempotency-Key") {
		t.Fatalf("missing key: %d %s %s", r.status, r.header.Get("Content-Type"), r.body)
	}
	if r := do(t, "POST", ts.URL+"/invoices", "K", `{"reference":`); r.status != 400 {
		t.Fatalf("malformed JSON: %d", r.status)
	}
	if r := do(t, "POST", ts.URL+"/invoices", "K", `{"reference":"D","surprise":1}`); r.status != 400 {
		t.Fatalf("unknown field: %d", r.status)
	}

	for _, tt := range []struct{ from, to, field string }{
		{`"reference":"DEAL-1"`, `"reference":""`, "reference"},
		{`"customer_id":"C-1"`, `"customer_id":""`, "customer_id"},
		{`"currency":"EUR"`, `"currency":"EURO"`, "currency"},
		{`"currency":"EUR"`, `"currency":"eur"`, "currency"},
		{`"unit_price":"10.00"`, `"unit_price":"10,00"`, "lines[0].unit_price"},
		{`"unit_price":"10.00"`, `"unit_price":"1e3"`, "lines[0].unit_price"},
		{`"quantity":2`, `"quantity":0`, "lines[0].quantity"},
		{`"total":"20.00"`, `"total":""`, "total"},
		{`[{"sku":"S","description":"Widget","quantity":2,"unit_price":"10.00"}]`, `[]`, "lines"},
	} {
		body := strings.Replace(validBody, tt.from, tt.to, 1)
		r := do(t, "POST", ts.URL+"/invoices", "K-bad", body)
		p := decode[problem](t, r.body)
		if r.status != 422 || len(p.Errors) != 1 || p.Errors[0].Field != tt.field || !strings.Contains(p.Detail, tt.field) {
			t.Errorf("%s: %d %s", tt.to, r.status, r.body)
		}
	}
	// A failed request stores nothing under its key: the corrected payload
	// can reuse it (dead-letter re-inject with the same K).
	if r := do(t, "POST", ts.URL+"/invoices", "K-bad", validBody); r.status != 201 {
		t.Fatalf("corrected payload with the same key: %d %s", r.status, r.body)
	}
}

func TestIdempotency(t *testing.T) {
	s, ts := start(t, Config{})
	first := do(t, "POST", ts.URL+"/invoices", "K-1", validBody)
	// Same body with different formatting is the same request.
	var v any
	_ = json.Unmarshal([]byte(validBody), &v)
	pretty, _ := json.MarshalIndent(v, "", "  ")
	replay := do(t, "POST", ts.URL+"/invoices", "K-1", string(pretty))
	if replay.status != first.status || !bytes.Equal(replay.body, first.body) || replay.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay: %d %s %v\nfirst: %d %s", replay.status, replay.body, replay.header, first.status, first.body)
	}
	if first.header.Get("Idempotent-Replayed") != "" {
		t.Fatal("first response marked as replayed")
	}
	changed := do(t, "POST", ts.URL+"/invoices", "K-1", strings.Replace(validBody, "20.00", "21.00", 1))
	if changed.status != 422 || !strings.Contains(string(changed.body), "different parameters") {
		t.Fatalf("key reuse: %d %s", changed.status, changed.body)
	}

	// A key whose first request is still being processed.
	s.mu.Lock()
	s.keys["K-busy"] = &idem{fingerprint: "x", inFlight: true}
	s.mu.Unlock()
	if r := do(t, "POST", ts.URL+"/invoices", "K-busy", validBody); r.status != 409 {
		t.Fatalf("in flight: %d %s", r.status, r.body)
	}

	st := s.Stats()
	if st.Creates != 1 || st.Attempts != 4 || st.AttemptsByOutcome[OutcomeReplayed] != 1 ||
		st.AttemptsByOutcome[OutcomeInFlight] != 1 || st.AttemptsByOutcome[OutcomeRejected] != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestLedgerAndStatsEndpoints(t *testing.T) {
	_, ts := start(t, Config{Faults: Faults{ErrorRate: 1}})
	do(t, "POST", ts.URL+"/invoices", "K-1", validBody)
	do(t, "PUT", ts.URL+"/_sim/faults", "", `{}`)
	do(t, "POST", ts.URL+"/invoices", "K-1", validBody)
	do(t, "POST", ts.URL+"/invoices", "K-1", validBody)

	l := decode[Ledger](t, do(t, "GET", ts.URL+"/_sim/ledger", "", "").body)
	if len(l.Attempts) != 3 || len(l.Creates) != 1 || l.Creates[0].Key != "K-1" || l.Creates[0].Number != "INV-000001" {
		t.Fatalf("ledger %+v", l)
	}
	a := l.Attempts[0]
	if a.Outcome != OutcomeFault || a.Key != "K-1" || a.Reference != "DEAL-1" || (a.Status != 500 && a.Status != 503) ||
		!reflect.DeepEqual(a.Faults, []string{"error"}) || a.Time.IsZero() {
		t.Fatalf("attempt %+v", a)
	}
	if l.Attempts[1].Outcome != OutcomeCreated || l.Attempts[2].Outcome != OutcomeReplayed || l.Attempts[2].Number != "INV-000001" {
		t.Fatalf("attempts %+v", l.Attempts)
	}
	st := decode[Stats](t, do(t, "GET", ts.URL+"/_sim/stats", "", "").body)
	if st.Attempts != 3 || st.Creates != 1 || st.MaxCreatesPerKey != 1 || st.Keys != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestFaultsEndpoint(t *testing.T) {
	s, ts := start(t, Config{Faults: Faults{RetryAfterSeconds: 2}})
	plan := `{"error_rate":0.25,"rate_limit_rate":0.5,"retry_after_seconds":9,"reject_customers":["C-9"],` +
		`"latency":"15ms","hang_rate":0.1,"drop_after_commit_rate":0.2,"down_until":"2030-01-02T03:04:05Z"}`
	r := do(t, "PUT", ts.URL+"/_sim/faults", "", plan)
	if r.status != 200 {
		t.Fatalf("PUT: %d %s", r.status, r.body)
	}
	want := Faults{ErrorRate: 0.25, RateLimitRate: 0.5, RetryAfterSeconds: 9, RejectCustomers: []string{"C-9"},
		Latency: 15 * time.Millisecond, HangRate: 0.1, DropAfterCommitRate: 0.2,
		DownUntil: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	if got := s.Faults(); !reflect.DeepEqual(got, want) {
		t.Fatalf("plan %+v, want %+v", got, want)
	}
	got := decode[Faults](t, do(t, "GET", ts.URL+"/_sim/faults", "", "").body)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("GET plan %+v", got)
	}
	if !strings.Contains(string(do(t, "GET", ts.URL+"/_sim/faults", "", "").body), `"latency":"15ms"`) {
		t.Fatal("latency is not a duration string")
	}
	for _, bad := range []string{`{"error_rate":1.5}`, `{"latency":"-1s"}`, `{"retry_after_seconds":-1}`} {
		if r := do(t, "PUT", ts.URL+"/_sim/faults", "", bad); r.status != 422 {
			t.Errorf("%s: %d", bad, r.status)
		}
	}
	for _, bad := range []string{`{"error_rat":1}`, `{"latency":"soon"}`, `nope`} {
		if r := do(t, "PUT", ts.URL+"/_sim/faults", "", bad); r.status != 400 {
			t.Errorf("%s: %d", bad, r.status)
		}
	}
	if !reflect.DeepEqual(s.Faults(), want) {
		t.Fatal("a rejected plan changed the plan")
	}
	if _, err := New(Config{Faults: Faults{HangRate: -0.1}}); err == nil {
		t.Fatal("New accepted an invalid plan")
	}
}

func TestFaultBehaviour(t *testing.T) {
	t.Run("down_until refuses lookups and creates", func(t *testing.T) {
		s, ts := start(t, Config{Faults: Faults{DownUntil: time.Now().Add(time.Hour)}})
		for _, r := range []response{do(t, "POST", ts.URL+"/invoices", "K", validBody), do(t, "GET", ts.URL+"/invoices", "", "")} {
			if r.status != 503 || r.header.Get("Retry-After") == "" {
				t.Fatalf("%d %v", r.status, r.header)
			}
		}
		if do(t, "GET", ts.URL+"/healthz", "", "").status != 200 || s.Stats().AttemptsByOutcome[OutcomeDown] != 1 {
			t.Fatal("healthz faulted or attempt not recorded")
		}
	})
	t.Run("latency", func(t *testing.T) {
		_, ts := start(t, Config{Faults: Faults{Latency: 100 * time.Millisecond}})
		t0 := time.Now()
		if r := do(t, "POST", ts.URL+"/invoices", "K", validBody); r.status != 201 || time.Since(t0) < 100*time.Millisecond {
			t.Fatalf("%d after %v", r.status, time.Since(t0))
		}
	})
	t.Run("rate limit", func(t *testing.T) {
		_, ts := start(t, Config{Faults: Faults{RateLimitRate: 1, RetryAfterSeconds: 4}})
		if r := do(t, "POST", ts.URL+"/invoices", "K", validBody); r.status != 429 || r.header.Get("Retry-After") != "4" {
			t.Fatalf("%d %v", r.status, r.header)
		}
	})
	t.Run("drop after commit", func(t *testing.T) {
		s, ts := start(t, Config{Faults: Faults{DropAfterCommitRate: 1}})
		req, _ := http.NewRequestWithContext(t.Context(), "POST", ts.URL+"/invoices", strings.NewReader(validBody))
		req.Header.Set("Idempotency-Key", "K")
		if resp, err := (&http.Client{Transport: &http.Transport{}}).Do(req); err == nil {
			resp.Body.Close()
			t.Fatalf("got a response %d", resp.StatusCode)
		}
		if st := s.Stats(); st.Creates != 1 || st.AttemptsByOutcome[OutcomeDropped] != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("hang is released by Close", func(t *testing.T) {
		s, ts := start(t, Config{Faults: Faults{HangRate: 1}})
		done := make(chan int)
		go func() {
			req, _ := http.NewRequest("POST", ts.URL+"/invoices", strings.NewReader(validBody))
			req.Header.Set("Idempotency-Key", "K")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				done <- -1
				return
			}
			resp.Body.Close()
			done <- resp.StatusCode
		}()
		time.Sleep(50 * time.Millisecond)
		select {
		case <-done:
			t.Fatal("hung request answered")
		default:
		}
		_ = s.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not release the hung request")
		}
		if st := s.Stats(); st.Creates != 0 || st.AttemptsByOutcome[OutcomeHung] != 1 {
			t.Fatalf("stats %+v", st)
		}
	})
}

func TestSeedReproducesFaults(t *testing.T) {
	run := func(seed int64) []int {
		_, ts := start(t, Config{Seed: seed, Faults: Faults{ErrorRate: 0.5}})
		var statuses []int
		for i := range 30 {
			statuses = append(statuses, do(t, "POST", ts.URL+"/invoices", "K-"+string(rune('a'+i)), validBody).status)
		}
		return statuses
	}
	a, b, c := run(42), run(42), run(7)
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("same seed, different faults:\n%v\n%v", a, b)
	}
	if reflect.DeepEqual(a, c) {
		t.Fatalf("different seeds, same faults: %v", a)
	}
}

func TestDurableStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sim.jsonl")
	s1, err := New(Config{StorePath: path})
	if err != nil {
		t.Fatal(err)
	}
	ts1 := httptest.NewServer(s1.Handler())
	first := do(t, "POST", ts1.URL+"/invoices", "K-1", validBody)
	do(t, "POST", ts1.URL+"/invoices", "K-2", strings.Replace(validBody, "DEAL-1", "DEAL-2", 1))
	ts1.Close()
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}

	// A torn last line (crash mid-write) is cut off at the next start.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString(`{"kind":"create","invoice":{"number":"INV-0`)
	f.Close()

	s2, ts2 := start(t, Config{StorePath: path})
	replay := do(t, "POST", ts2.URL+"/invoices", "K-1", validBody)
	if replay.status != 201 || !bytes.Equal(replay.body, first.body) || replay.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("replay after restart: %d %s", replay.status, replay.body)
	}
	if r := do(t, "POST", ts2.URL+"/invoices", "K-1", strings.Replace(validBody, "20.00", "1.00", 1)); r.status != 422 {
		t.Fatalf("key reuse after restart: %d", r.status)
	}
	r := do(t, "POST", ts2.URL+"/invoices", "K-3", validBody)
	if r.status != 201 || decode[Invoice](t, r.body).Number != "INV-000003" {
		t.Fatalf("numbering after restart: %d %s", r.status, r.body)
	}
	l := s2.Ledger()
	if len(l.Creates) != 3 || len(l.Attempts) != 5 {
		t.Fatalf("ledger after restart: %d creates, %d attempts", len(l.Creates), len(l.Attempts))
	}
	_ = s2.Close()

	// Every line of the file is valid JSON again.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if !json.Valid([]byte(line)) {
			t.Fatalf("line %d is not JSON: %s", i+1, line)
		}
	}

	// Corruption in the middle is an error, not silently skipped.
	bad := filepath.Join(t.TempDir(), "bad.jsonl")
	if err := os.WriteFile(bad, []byte("{nope}\n"+string(b)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{StorePath: bad}); err == nil {
		t.Fatal("New accepted a corrupt store")
	}
}

func TestRegisterFlags(t *testing.T) {
	var cfg Config
	fs := flag.NewFlagSet("erp-sim", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	err := fs.Parse([]string{
		"--store", "/tmp/x.jsonl", "--error-rate", "0.1", "--rate-limit-rate", "0.2", "--retry-after", "3",
		"--reject-customer", "C-9", "--reject-customer", "C-10", "--latency", "50ms", "--hang-rate", "0.05",
		"--drop-after-commit-rate", "0.3", "--seed", "99", "--down-until", "2030-01-01T00:00:00Z",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{StorePath: "/tmp/x.jsonl", Seed: 99, Faults: Faults{
		ErrorRate: 0.1, RateLimitRate: 0.2, RetryAfterSeconds: 3, RejectCustomers: []string{"C-9", "C-10"},
		Latency: 50 * time.Millisecond, HangRate: 0.05, DropAfterCommitRate: 0.3,
		DownUntil: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC),
	}}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("config %+v\nwant   %+v", cfg, want)
	}
	var def Config
	def.RegisterFlags(flag.NewFlagSet("x", flag.ContinueOnError))
	if def.Faults.RetryAfterSeconds != 1 {
		t.Fatalf("default retry-after %d", def.Faults.RetryAfterSeconds)
	}
}
