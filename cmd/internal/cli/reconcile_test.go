package cli_test

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
)

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// passwordFile writes a Tryton password file and returns its path.
func passwordFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tryton-password")
	if err := os.WriteFile(p, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// closedURL is an http:// URL on which nothing listens.
func closedURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return "http://" + addr
}

// TestReconcileERPFlagValidation: reconcile validates --erp and the Tryton
// settings as the handler does, before it touches the database.
func TestReconcileERPFlagValidation(t *testing.T) {
	db := map[string]string{"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"}
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want []string // in the last line of stderr
	}{
		{"unknown adapter", db, []string{"--erp", "sap"}, []string{"--erp must be http or tryton"}},
		{"unknown adapter from the environment", map[string]string{"DATABASE_URL": db["DATABASE_URL"], "DEALBRIDGE_ERP": "sap"}, nil,
			[]string{"--erp must be http or tryton"}},
		{"tryton without settings", db, []string{"--erp", "tryton"},
			[]string{"--erp tryton:", "--tryton-database", "--tryton-password-file"}},
		{"tryton without a password", db, []string{"--erp", "tryton", "--tryton-database", "acme", "--tryton-user", "dealbridge"},
			[]string{"--erp tryton:", "$DEALBRIDGE_TRYTON_PASSWORD"}},
		{"tryton with a bad customer match", db, []string{"--erp", "tryton", "--tryton-database", "acme", "--tryton-user", "dealbridge",
			"--tryton-password-file", "PASSWORD_FILE", "--tryton-customer-match", "email"}, []string{"--erp tryton:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"reconcile"}, tc.args...)
			for i, a := range args {
				if a == "PASSWORD_FILE" {
					args[i] = passwordFile(t)
				}
			}
			code, out, errOut := run(t, tc.env, args...)
			if code != 2 {
				t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, errOut)
			}
			last := lastLine(errOut)
			if !strings.HasPrefix(last, "dealbridge reconcile: ") {
				t.Errorf("last stderr line %q: want \"dealbridge reconcile: …\"", last)
			}
			for _, w := range tc.want {
				if !strings.Contains(last, w) {
					t.Errorf("last stderr line %q: want %q in it", last, w)
				}
			}
			if out != "" {
				t.Errorf("unexpected stdout %q", out)
			}
		})
	}

	t.Run("unreadable password file", func(t *testing.T) {
		code, _, errOut := run(t, db, "reconcile", "--erp", "tryton", "--tryton-database", "acme", "--tryton-user", "dealbridge",
			"--tryton-password-file", filepath.Join(t.TempDir(), "missing"))
		if last := lastLine(errOut); code == 0 || !strings.Contains(last, "cannot read the Tryton password") {
			t.Errorf("exit %d, last stderr line %q: want a failure naming the password file", code, last)
		}
	})
}

// TestReconcileHTTPExplicit: --erp http is the HTTP client at --erp-url.
func TestReconcileHTTPExplicit(t *testing.T) {
	_, env, ids := auditDB(t)
	sim, err := erpsim.New(erpsim.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	var mu sync.Mutex
	var lookups []string
	h := sim.Handler()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.URL.Path == "/invoices" {
			mu.Lock()
			lookups = append(lookups, r.URL.Query().Get("idempotency_key"))
			mu.Unlock()
		}
		h.ServeHTTP(w, r)
	}))
	defer ts.Close()

	code, out, errOut := run(t, env, "reconcile", "--erp", "http", "--erp-url", ts.URL, "--after", "1ms")
	if code != 0 || !strings.Contains(out, ids[2]) || !strings.Contains(out, "1 alert(s) raised") {
		t.Fatalf("reconcile --erp http: exit %d\n%s%s", code, out, errOut)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(lookups) != 1 || !strings.HasPrefix(lookups[0], ids[2]+":") {
		t.Fatalf("ERP lookups by key %q, want one for deal %s", lookups, ids[2])
	}
}

// fakeTryton answers the JSON-RPC calls a reconciliation lookup makes, like
// Tryton 6.0: login, the user's preferences, an invoice search finding
// nothing, logout. It records the methods and the URL paths.
type fakeTryton struct {
	mu    sync.Mutex
	calls []string
}

func (f *fakeTryton) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var req struct {
		ID     int64  `json:"id"`
		Method string `json:"method"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		http.Error(w, "bad json", http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.calls = append(f.calls, r.URL.Path+" "+req.Method)
	f.mu.Unlock()
	var result any
	switch req.Method {
	case "common.db.login":
		result = []any{2, "session-key"}
	case "model.res.user.get_preferences":
		result = map[string]any{"company": 1, "language": "en"}
	case "model.account.invoice.search_read":
		result = []any{}
	case "common.db.logout":
		result = nil
	default:
		http.Error(w, "unexpected method "+req.Method, http.StatusInternalServerError)
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"id": req.ID, "result": result})
}

func (f *fakeTryton) methods() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// TestReconcileTryton: with --erp tryton the lookups go to Tryton over
// JSON-RPC (to the configured database, password from the environment),
// not to --erp-url; an unreachable Tryton fails the pass with an error
// line that says why.
func TestReconcileTryton(t *testing.T) {
	_, env, ids := auditDB(t)
	env["DEALBRIDGE_TRYTON_PASSWORD"] = "s3cret"
	env["DEALBRIDGE_ERP_URL"] = closedURL(t) // must not be used

	t.Run("looks up in Tryton", func(t *testing.T) {
		f := &fakeTryton{}
		ts := httptest.NewServer(f)
		defer ts.Close()
		code, out, errOut := run(t, env, "reconcile", "--erp", "tryton", "--tryton-url", ts.URL,
			"--tryton-database", "acme", "--tryton-user", "dealbridge", "--after", "1ms")
		if code != 0 || !strings.Contains(out, ids[2]) || !strings.Contains(out, "1 alert(s) raised") {
			t.Fatalf("reconcile --erp tryton: exit %d\n%s%s", code, out, errOut)
		}
		calls := strings.Join(f.methods(), "\n")
		for _, want := range []string{"/acme/ common.db.login", "/acme/ model.account.invoice.search_read"} {
			if !strings.Contains(calls, want) {
				t.Errorf("Tryton calls:\n%s\nwant %q", calls, want)
			}
		}
	})

	t.Run("Tryton unreachable", func(t *testing.T) {
		code, out, errOut := run(t, env, "reconcile", "--erp", "tryton", "--tryton-url", closedURL(t),
			"--tryton-database", "acme", "--tryton-user", "dealbridge", "--tryton-password-file", passwordFile(t),
			"--after", "1ms")
		if code != 1 {
			t.Fatalf("exit %d, want 1\n%s%s", code, out, errOut)
		}
		last := lastLine(errOut)
		if !strings.HasPrefix(last, "dealbridge reconcile: 1 ERP lookup(s) failed") || !strings.Contains(last, ids[2]) ||
			!strings.Contains(last, "tryton") {
			t.Errorf("last stderr line %q: want the failed lookup of %s and Tryton's error", last, ids[2])
		}
		if !strings.Contains(out, "lookup_failed") || !strings.Contains(out, "1 lookup(s) failed") {
			t.Errorf("stdout:\n%s\nwant the failed lookup reported", out)
		}
	})
}
