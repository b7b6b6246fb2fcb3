// Package tryton_test is the acceptance suite of the Tryton adapter: it
// runs dealbridge's invoice saga against a real Tryton 6.0 server.
//
// TestMain is the harness. It checks for the Debian packages
// (tryton-server, tryton-modules-account-invoice, tryton-proteus,
// python3-psycopg2) and installs them with apt-get when they are missing
// and it runs as root (otherwise it fails saying what to install; .ci/run
// installs them). It then starts a private PostgreSQL cluster, initialises
// a Tryton database (trytond-admin, the slow part: about 80 s on two cores)
// and seeds it with testdata/seed.py (proteus), keeps it as a template, and
// starts trytond on a loopback port. Each test gets its own copy of the
// template (CREATE DATABASE … TEMPLATE, under a second), which trytond
// serves by name in the URL. The same cluster holds dealbridge's own test
// databases (TEST_DATABASE_URL points pgtest at it unless already set).
//
// DEALBRIDGE_TRYTON_CACHE=DIR keeps the cluster and the seeded template in
// DIR across runs (keyed by a hash of the seed script, the trytond version
// and the year), so that a second run skips trytond-admin.
// DEALBRIDGE_TRYTON_SKIP=1 skips the suite explicitly (never in CI).
package tryton_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgcluster"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

const (
	crmUser     = "crm"
	crmPassword = "CrmSync-9876" // of a throwaway test database only
	adminPass   = "ErpAdmin-4321"
	python      = "/usr/bin/python3" // Debian's proteus lives here, not in a pyenv python
)

// debianPackages are what the harness needs, with a file proving each one
// is installed.
var debianPackages = []struct{ pkg, file string }{
	{"tryton-server", "/usr/bin/trytond"},
	{"tryton-modules-account-invoice", "/usr/lib/python3/dist-packages/trytond/modules/account_invoice/__init__.py"},
	{"tryton-proteus", "/usr/lib/python3/dist-packages/proteus/__init__.py"},
	{"python3-psycopg2", "/usr/lib/python3/dist-packages/psycopg2/__init__.py"},
}

// env is the suite's Tryton: one server, one template, a database per test.
var env struct {
	dir      string // state: trytond.conf, logs, password files
	keep     bool   // DEALBRIDGE_TRYTON_CACHE: keep dir and cluster
	cluster  *pgcluster.Cluster
	template string
	port     int
	url      string // http://127.0.0.1:port
	conf     string
	log      string
	passFile string // the crm password, for the handler process

	mu  sync.Mutex
	cmd *exec.Cmd
	// exited is closed when the current trytond exits.
	exited chan struct{}

	bin      string        // the dealbridge binary (see dealbridgeBin)
	built    chan struct{} // closed when the build has ended
	buildErr error
	seq      atomic.Int64
}

func TestMain(m *testing.M) {
	if os.Getenv("DEALBRIDGE_TRYTON_SKIP") == "1" {
		fmt.Fprintln(os.Stderr, "tryton: DEALBRIDGE_TRYTON_SKIP=1: skipping the Tryton acceptance suite")
		os.Exit(0)
	}
	start := time.Now()
	err := setup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tryton harness:", err)
		teardown()
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "tryton harness: ready in %s (trytond on %s, template %s)\n", time.Since(start).Round(time.Millisecond), env.url, env.template)
	code := m.Run()
	teardown()
	os.Exit(code)
}

const passlibConf = `[passlib]
schemes = pbkdf2_sha512
pbkdf2_sha512__default_rounds = 1000
`

func setup() error {
	// Generous: trytond-admin takes 80-100 s on two idle cores, and several
	// times that when other work shares the machine.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	if err := ensurePackages(ctx); err != nil {
		return err
	}
	// Build the dealbridge binary while Tryton initialises; only the
	// tests that run it wait for it (dealbridgeBin).
	env.built = make(chan struct{})
	go func() {
		env.buildErr = buildBinary(context.Background())
		close(env.built)
	}()

	if dir := os.Getenv("DEALBRIDGE_TRYTON_CACHE"); dir != "" {
		env.dir, env.keep = dir, true
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	} else {
		dir, err := os.MkdirTemp("", "dealbridge-tryton-")
		if err != nil {
			return err
		}
		env.dir = dir
	}
	// The PostgreSQL server user must traverse it (tests run as root).
	if err := os.Chmod(env.dir, 0o755); err != nil {
		return err
	}
	var err error
	env.cluster, err = pgcluster.Start(ctx, pgcluster.Config{
		DataDir: filepath.Join(env.dir, "pg"),
		Settings: map[string]string{
			"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "400",
		},
		Logger: quietLogger(),
	})
	if err != nil {
		return fmt.Errorf("start PostgreSQL for Tryton: %w", err)
	}
	if os.Getenv(pgtest.EnvURL) == "" {
		// dealbridge's own test databases go to the same cluster.
		os.Setenv(pgtest.EnvURL, env.cluster.URL("postgres"))
	}
	env.passFile = filepath.Join(env.dir, "crm.pass")
	if err := os.WriteFile(env.passFile, []byte(crmPassword+"\n"), 0o600); err != nil {
		return err
	}
	adminFile := filepath.Join(env.dir, "admin.pass")
	if err := os.WriteFile(adminFile, []byte(adminPass+"\n"), 0o600); err != nil {
		return err
	}
	if env.port, err = freePort(); err != nil {
		return err
	}
	env.url = "http://127.0.0.1:" + strconv.Itoa(env.port)
	env.conf = filepath.Join(env.dir, "trytond.conf")
	env.log = filepath.Join(env.dir, "trytond.log")
	// Cheap password hashing: every login verifies the password, and the
	// default (bcrypt) costs seconds per login on a loaded 2-core machine.
	// Only for this throwaway test server.
	passlib := filepath.Join(env.dir, "passlib.ini")
	if err := os.WriteFile(passlib, []byte(passlibConf), 0o644); err != nil {
		return err
	}
	conf := fmt.Sprintf(`[database]
uri = postgresql://postgres@127.0.0.1:%d/
path = %s
list = False
[web]
listen = 127.0.0.1:%d
[session]
timeout = 300
max_age = 2592000
[password]
passlib = %s
`, env.cluster.Port(), filepath.Join(env.dir, "attachments"), env.port, passlib)
	if err := os.WriteFile(env.conf, []byte(conf), 0o644); err != nil {
		return err
	}
	if err := prepareTemplate(ctx, adminFile); err != nil {
		return err
	}
	return startTrytond(ctx)
}

// dealbridgeBin returns the binary built during setup.
func dealbridgeBin(t testing.TB) string {
	t.Helper()
	select {
	case <-env.built:
	case <-time.After(5 * time.Minute):
		t.Fatal("the dealbridge binary is still building after 5 minutes")
	}
	if env.buildErr != nil {
		t.Fatal(env.buildErr)
	}
	return env.bin
}

// ensurePackages installs the Debian packages when missing (as root with
// apt-get), or says what to install.
func ensurePackages(ctx context.Context) error {
	var missing []string
	for _, p := range debianPackages {
		if _, err := os.Stat(p.file); err != nil {
			missing = append(missing, p.pkg)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if _, err := exec.LookPath("apt-get"); err != nil || os.Geteuid() != 0 {
		return fmt.Errorf("the Tryton acceptance tests need Debian packages: apt-get install --no-install-recommends %s (or set DEALBRIDGE_TRYTON_SKIP=1 to skip them)",
			strings.Join(missing, " "))
	}
	fmt.Fprintln(os.Stderr, "tryton harness: installing", strings.Join(missing, " "))
	cmd := exec.CommandContext(ctx, "apt-get", append([]string{"install", "-y", "-q", "--no-install-recommends"}, missing...)...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		upd := exec.CommandContext(ctx, "apt-get", "update", "-q")
		if uout, uerr := upd.CombinedOutput(); uerr != nil {
			return fmt.Errorf("apt-get update: %w\n%s", uerr, tail(uout))
		}
		cmd = exec.CommandContext(ctx, "apt-get", append([]string{"install", "-y", "-q", "--no-install-recommends"}, missing...)...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err = cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get install %s: %w\n%s", strings.Join(missing, " "), err, tail(out))
		}
	}
	return nil
}

// prepareTemplate makes the seeded template database, or reuses it from
// the cache. It is built under a temporary name and renamed when complete,
// so a half-built one is never reused.
func prepareTemplate(ctx context.Context, adminFile string) error {
	seed, err := filepath.Abs(filepath.Join("testdata", "seed.py"))
	if err != nil {
		return err
	}
	script, err := os.ReadFile(seed)
	if err != nil {
		return err
	}
	ver, err := exec.CommandContext(ctx, python, "-c", "import trytond; print(trytond.__version__)").Output()
	if err != nil {
		return fmt.Errorf("%s cannot import trytond: %w", python, err)
	}
	h := sha256.New()
	h.Write(script)
	h.Write(ver)
	h.Write([]byte(passlibConf))
	h.Write([]byte(strconv.Itoa(time.Now().Year())))
	env.template = "erp_template_" + hex.EncodeToString(h.Sum(nil))[:12]

	admin, err := pgx.Connect(ctx, env.cluster.URL("postgres"))
	if err != nil {
		return err
	}
	defer admin.Close(ctx)
	var exists bool
	if err := admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, env.template).Scan(&exists); err != nil {
		return err
	}
	// A cache holds the template only: drop what earlier runs left.
	rows, err := admin.Query(ctx, `SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1', $1)`, env.template)
	if err != nil {
		return err
	}
	stale, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, db := range stale {
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{db}.Sanitize()+" WITH (FORCE)"); err != nil {
			return err
		}
	}
	if exists {
		fmt.Fprintln(os.Stderr, "tryton harness: reusing cached template", env.template)
		return nil
	}
	building := env.template + "_building"
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+building); err != nil {
		return err
	}
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, "trytond-admin", "-c", env.conf, "-d", building,
		"-u", "account_invoice", "--activate-dependencies", "--email", "admin@example.com")
	cmd.Env = append(os.Environ(), "TRYTONPASSFILE="+adminFile)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("trytond-admin: %w\n%s", err, tail(out))
	}
	t1 := time.Now()
	cmd = exec.CommandContext(ctx, python, "-W", "ignore", seed, "--config", env.conf, "--database", building,
		"--crm-password-file", env.passFile)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("seed.py: %w\n%s", err, tail(stderr.Bytes()))
	}
	if _, err := admin.Exec(ctx, "ALTER DATABASE "+building+" RENAME TO "+env.template); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "tryton harness: trytond-admin %s, seed %s: %s", t1.Sub(t0).Round(time.Millisecond),
		time.Since(t1).Round(time.Millisecond), out)
	return nil
}

// startTrytond starts the server and waits until it answers.
func startTrytond(ctx context.Context) error {
	env.mu.Lock()
	defer env.mu.Unlock()
	logf, err := os.OpenFile(env.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command("trytond", "-c", env.conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, killed with the test binary if that dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	runtime.LockOSThread() // Pdeathsig follows the thread that forked
	err = cmd.Start()
	runtime.UnlockOSThread()
	logf.Close()
	if err != nil {
		return fmt.Errorf("start trytond: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	env.cmd, env.exited = cmd, exited
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := ping(ctx); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("trytond did not answer on %s: %w\n%s", env.url, err, logTail())
		}
		select {
		case <-exited:
			return fmt.Errorf("trytond exited at start:\n%s", logTail())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stopTrytond stops the server with sig (SIGKILL: a crash) and waits.
func stopTrytond(sig syscall.Signal) error {
	env.mu.Lock()
	defer env.mu.Unlock()
	if env.cmd == nil {
		return nil
	}
	_ = syscall.Kill(-env.cmd.Process.Pid, sig)
	select {
	case <-env.exited:
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-env.cmd.Process.Pid, syscall.SIGKILL)
		<-env.exited
	}
	env.cmd = nil
	return nil
}

func ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, env.url+"/",
		strings.NewReader(`{"id":0,"method":"common.server.version","params":[]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return nil
}

func teardown() {
	_ = stopTrytond(syscall.SIGTERM)
	if env.cluster != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := env.cluster.Stop(ctx, pgcluster.StopFast); err != nil {
			fmt.Fprintln(os.Stderr, "tryton harness:", err)
		}
	}
	if env.dir != "" && !env.keep {
		_ = os.RemoveAll(env.dir)
	}
	if env.built != nil {
		<-env.built
		if env.bin != "" {
			_ = os.RemoveAll(filepath.Dir(env.bin))
		}
	}
}

// newTrytonDB gives the test a fresh copy of the seeded template and
// returns its name; it is dropped at cleanup.
func newTrytonDB(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("erp_t%d_%d", os.Getpid(), env.seq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin, err := pgx.Connect(ctx, env.cluster.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	// FILE_COPY: a copy of the files after a checkpoint, faster here than
	// WAL-logging every page of the template.
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name+" TEMPLATE "+env.template+" STRATEGY FILE_COPY"); err != nil {
		t.Fatalf("copy the Tryton template: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		admin, err := pgx.Connect(ctx, env.cluster.URL("postgres"))
		if err != nil {
			t.Error(err)
			return
		}
		defer admin.Close(ctx)
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop %s: %v", name, err)
		}
	})
	return name
}

// trytonSQL runs sql on the Tryton database db (for inspection and for
// ageing sessions).
func trytonSQL(t testing.TB, db, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, env.cluster.URL(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// ---------------------------------------------------------------------------
// Inspection over JSON-RPC, independent of the adapter under test.

type rpcInspector struct {
	t    testing.TB
	db   string
	auth string
	ctx  map[string]any
}

func inspect(t testing.TB, db string) *rpcInspector {
	t.Helper()
	r := &rpcInspector{t: t, db: db}
	var res []any
	r.do("common.db.login", []any{crmUser, map[string]any{"password": crmPassword}, "en"}, &res)
	uid, _ := res[0].(json.Number).Int64()
	r.auth = "Session " + base64.StdEncoding.EncodeToString([]byte(fmt.Sprintf("%s:%d:%s", crmUser, uid, res[1])))
	var prefs map[string]any
	r.do("model.res.user.get_preferences", []any{true, map[string]any{}}, &prefs)
	r.ctx = map[string]any{"company": prefs["company"]}
	return r
}

func (r *rpcInspector) do(method string, params []any, out any) {
	r.t.Helper()
	body, _ := json.Marshal(map[string]any{"id": 1, "method": method, "params": params})
	req, _ := http.NewRequest(http.MethodPost, env.url+"/"+r.db+"/", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if r.auth != "" {
		req.Header.Set("Authorization", r.auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		r.t.Fatalf("%s: %v", method, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		r.t.Fatalf("%s: HTTP %d %s", method, resp.StatusCode, b)
	}
	var env struct {
		Result json.RawMessage
		Error  json.RawMessage
	}
	if err := json.Unmarshal(b, &env); err != nil {
		r.t.Fatalf("%s: %v: %s", method, err, b)
	}
	if len(env.Error) > 0 && string(env.Error) != "null" {
		r.t.Fatalf("%s: error %s", method, env.Error)
	}
	dec := json.NewDecoder(bytes.NewReader(env.Result))
	dec.UseNumber()
	if out != nil {
		if err := dec.Decode(out); err != nil {
			r.t.Fatalf("%s: %v: %s", method, err, env.Result)
		}
	}
}

func (r *rpcInspector) call(method string, args []any, out any) {
	r.t.Helper()
	r.do(method, append(args, r.ctx), out)
}

// trytonInvoice is an invoice as the inspector reads it.
type trytonInvoice struct {
	ID        int64
	Number    string
	State     string
	Reference string
	Currency  string
	Untaxed   string
	Total     string
	Party     string // party code
	Lines     int
}

// invoices returns every customer invoice (any state) whose reference
// starts with prefix, oldest first.
func (r *rpcInspector) invoices(prefix string) []trytonInvoice {
	r.t.Helper()
	var rows []map[string]any
	r.call("model.account.invoice.search_read", []any{
		[]any{[]any{"reference", "like", prefix + "%"}, []any{"type", "=", "out"}}, 0, nil, []any{[]any{"id", "ASC"}},
		[]any{"id", "number", "state", "reference", "currency.code", "party.code", "untaxed_amount", "total_amount", "lines"},
	}, &rows)
	out := make([]trytonInvoice, len(rows))
	for i, m := range rows {
		id, _ := m["id"].(json.Number).Int64()
		lines, _ := m["lines"].([]any)
		out[i] = trytonInvoice{ID: id, Number: str(m["number"]), State: str(m["state"]), Reference: str(m["reference"]),
			Currency: str(sub(m, "currency", "code")), Party: str(sub(m, "party", "code")),
			Untaxed: dec(m["untaxed_amount"]), Total: dec(m["total_amount"]), Lines: len(lines)}
	}
	return out
}

// sub reads a dotted field ("currency.code") as Tryton 6.0 returns it:
// under the key "currency." as an object.
func sub(m map[string]any, field, name string) any {
	if o, ok := m[field+"."].(map[string]any); ok {
		return o[name]
	}
	return m[field+"."+name]
}

func str(v any) string {
	s, _ := v.(string)
	return s
}

func dec(v any) string {
	if o, ok := v.(map[string]any); ok {
		return str(o["decimal"])
	}
	return fmt.Sprint(v)
}

// ---------------------------------------------------------------------------
// Small helpers.

func buildBinary(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return errors.New("go env GOMOD: not inside the dealbridge module")
	}
	dir, err := os.MkdirTemp("", "dealbridge-tryton-bin-")
	if err != nil {
		return err
	}
	bin := filepath.Join(dir, "dealbridge")
	args := []string{"build"}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "-o", bin, "./cmd/dealbridge")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = filepath.Dir(gomod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	env.bin = bin
	return nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func tail(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

func logTail() string {
	b, _ := os.ReadFile(env.log)
	return tail(b)
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}
