package cli_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/dealbridge/dealbridge/adapters/metrics"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/cmd/internal/cli"
)

// syncBuffer is a bytes.Buffer safe for a running command and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs the command line in the background until the test ends (or
// stop is called) and returns stop, which cancels it and returns its exit
// status, and its stderr.
func start(t *testing.T, env map[string]string, args ...string) (stop func() int, stderr *syncBuffer) {
	t.Helper()
	stderr = &syncBuffer{}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() {
		done <- cli.Run(ctx, args, cli.Env{Stdout: io.Discard, Stderr: stderr, Getenv: func(k string) string { return env[k] }})
	}()
	var once sync.Once
	code := -1
	stop = func() int {
		once.Do(func() {
			cancel()
			select {
			case code = <-done:
			case <-time.After(30 * time.Second):
				t.Errorf("%s still running 30s after cancel", args[0])
			}
		})
		return code
	}
	t.Cleanup(func() { stop() })
	return stop, stderr
}

// waitURL waits for a log line `msg ... url=URL` and returns URL.
func waitURL(t *testing.T, stderr *syncBuffer, msg string) string {
	t.Helper()
	re := regexp.MustCompile(`msg="?` + msg + `"? url=(\S+)`)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(stderr.String()); m != nil {
			return m[1]
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no %q log line after 30s; stderr:\n%s", msg, stderr.String())
	return ""
}

// get GETs url and returns the status and body.
func get(t *testing.T, url string, header ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// families parses a Prometheus text exposition and returns the names.
func families(t *testing.T, body string) map[string]bool {
	t.Helper()
	var p expfmt.TextParser
	mfs, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("cannot parse the exposition: %v\n%s", err, body)
	}
	out := map[string]bool{}
	for name := range mfs {
		out[name] = true
	}
	return out
}

// TestMetricsListen: relay and handler serve /metrics and /healthz on
// --metrics-listen (or $DEALBRIDGE_METRICS_LISTEN), stop it with the
// process, and serve nothing without it.
func TestMetricsListen(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.NewDatabase(t)
	for _, c := range []struct {
		name string
		env  map[string]string
		args []string
		want []string
	}{
		{"relay", map[string]string{"DATABASE_URL": dbURL}, []string{"relay", "--metrics-listen", "127.0.0.1:0"},
			[]string{"dealbridge_relay_lag_seconds", "dealbridge_relay_backlog_messages", "dealbridge_unreconciled_oldest_age_seconds", "go_goroutines"}},
		{"handler", map[string]string{"DATABASE_URL": dbURL, "DEALBRIDGE_METRICS_LISTEN": "127.0.0.1:0"}, []string{"handler", "--erp-url", "http://127.0.0.1:1"},
			[]string{"dealbridge_erp_requests_total", "dealbridge_erp_breaker_state", "dealbridge_queue_depth", "dealbridge_sagas", "dealbridge_db_scrape_success"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			stop, stderr := start(t, c.env, c.args...)
			url := waitURL(t, stderr, "metrics listening")
			status, body := get(t, url)
			if status != http.StatusOK {
				t.Fatalf("GET %s: %d\n%s", url, status, body)
			}
			got := families(t, body)
			for _, name := range c.want {
				if !got[name] {
					t.Errorf("%s serves no %s", c.name, name)
				}
			}
			if status, _ := get(t, strings.TrimSuffix(url, "/metrics")+"/healthz"); status != http.StatusOK {
				t.Errorf("GET /healthz: %d", status)
			}
			if code := stop(); code != 0 {
				t.Fatalf("%s exited %d; stderr:\n%s", c.name, code, stderr.String())
			}
			if _, err := http.Get(url); err == nil {
				t.Errorf("the metrics listener still answers after %s stopped", c.name)
			}
		})
	}
	t.Run("off by default", func(t *testing.T) {
		t.Parallel()
		stop, stderr := start(t, map[string]string{"DATABASE_URL": dbURL}, "relay")
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(stderr.String(), "relay running") && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if strings.Contains(stderr.String(), "metrics listening") {
			t.Error("relay serves metrics without --metrics-listen")
		}
		if code := stop(); code != 0 {
			t.Fatalf("relay exited %d; stderr:\n%s", code, stderr.String())
		}
	})
}

// TestAPIMetrics: the api serves /metrics on its own listener, without
// credentials on a loopback address.
func TestAPIMetrics(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.NewDatabase(t)
	_, stderr := start(t, map[string]string{"DATABASE_URL": dbURL}, "api", "--listen", "127.0.0.1:0")
	base := waitURL(t, stderr, "api listening")
	status, body := get(t, base+"/metrics")
	if status != http.StatusOK {
		t.Fatalf("GET /metrics: %d\n%s", status, body)
	}
	if got := families(t, body); !got["dealbridge_unreconciled_oldest_age_seconds"] || !got["dealbridge_relay_lag_seconds"] {
		t.Errorf("the api's /metrics lacks the pipeline gauges:\n%s", body)
	}
}

// TestAPIMetricsNeedAUserOffLoopback: with MetricsAuth (the api on a
// non-loopback address) /metrics refuses anonymous scrapes and serves a
// user's API token.
func TestAPIMetricsNeedAUserOffLoopback(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.NewDatabase(t)
	code, out, errOut := run(t, map[string]string{"DATABASE_URL": dbURL}, "users", "add", "prometheus", "--role", "viewer", "--actor", "test")
	if code != 0 {
		t.Fatalf("users add: %d %s %s", code, out, errOut)
	}
	code, out, errOut = run(t, map[string]string{"DATABASE_URL": dbURL}, "users", "token", "prometheus", "--actor", "test")
	if code != 0 {
		t.Fatalf("users token: %d %s %s", code, out, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	token := strings.TrimSpace(lines[len(lines)-1])
	if len(token) < 16 {
		t.Fatalf("no token in %q", out)
	}
	pool, err := app.NewPool(t.Context(), dbURL, "metrics-auth-test", 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	logger := slog.New(slog.DiscardHandler)
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "probe"}, func() float64 { return 1 }))
	h, err := app.HTTPHandler(t.Context(), pool, logger, app.HTTPConfig{
		Metrics: metrics.Handler(reg, logger), MetricsAuth: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	if status, _ := get(t, srv.URL+"/metrics"); status != http.StatusUnauthorized {
		t.Errorf("anonymous GET /metrics: %d, want 401", status)
	}
	status, body := get(t, srv.URL+"/metrics", "Authorization", "Bearer "+token)
	if status != http.StatusOK || !families(t, body)["probe"] {
		t.Errorf("GET /metrics with a viewer's token: %d\n%s", status, body)
	}
}
