package dashboard_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/cmd/app"
	"github.com/dealbridge/dealbridge/domain"
)

// chromiumPath is Debian's chromium; .ci/run installs it.
const chromiumPath = "/usr/bin/chromium"

// screenshotDir is where every page's screenshot goes: $DEALBRIDGE_SCREENSHOTS
// (CI lists it) or a fixed folder under the temp dir.
func screenshotDir(t *testing.T) string {
	dir := os.Getenv("DEALBRIDGE_SCREENSHOTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "dealbridge-screenshots")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// browser drives one headless Chromium and collects console errors.
type browser struct {
	t    *testing.T
	ctx  context.Context
	base string
	dir  string
	mu   sync.Mutex
	errs []string
	shot int
}

func newBrowser(t *testing.T, base string) *browser {
	t.Helper()
	if _, err := exec.LookPath(chromiumPath); err != nil {
		t.Fatalf("headless Chromium is required at %s: install Debian's package (apt-get install chromium); .ci/run does this", chromiumPath)
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.Flag("headless", true), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-dev-shm-usage", true),
		// The test server's certificate is self-signed.
		chromedp.IgnoreCertErrors,
		chromedp.WindowSize(1366, 900),
	}
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelC := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelC(); cancelA() })
	b := &browser{t: t, ctx: ctx, base: base, dir: screenshotDir(t)}
	// Start the browser, then follow its console.
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("cannot start %s: %v", chromiumPath, err)
	}
	msgs := chromedp.Console(ctx)
	go func() {
		for m, err := range msgs {
			if err != nil {
				return
			}
			switch m.Type {
			case chromedp.ConsoleError, chromedp.ConsoleException, chromedp.ConsoleWarning:
				b.mu.Lock()
				b.errs = append(b.errs, m.String()+" "+m.URL)
				b.mu.Unlock()
			}
		}
	}()
	return b
}

func (b *browser) do(actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 45*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("browser: %v", err)
	}
}

func get[T any](b *browser, a chromedp.Action[T]) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 45*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		b.t.Fatalf("browser: %v", err)
	}
	return v
}

func css(s string) chromedp.CSS { return chromedp.CSS(s) }

func (b *browser) open(path string) { b.t.Helper(); b.do(chromedp.Navigate(b.base + path)) }

func (b *browser) visible(sel string) { b.t.Helper(); b.do(chromedp.WaitVisible(css(sel))) }

func (b *browser) text(sel string) string {
	b.t.Helper()
	b.visible(sel)
	return strings.TrimSpace(get(b, chromedp.Text(css(sel))))
}

func (b *browser) exists(sel string) bool {
	b.t.Helper()
	return get(b, chromedp.Evaluate[bool](fmt.Sprintf(`document.querySelector(%q) !== null`, sel)))
}

// page checks that the page rendered without console errors and writes
// its screenshot.
func (b *browser) page(name string) {
	b.t.Helper()
	time.Sleep(150 * time.Millisecond) // let late console messages arrive
	b.mu.Lock()
	errs := b.errs
	b.errs = nil
	b.mu.Unlock()
	if len(errs) > 0 {
		b.t.Errorf("page %s: console errors:\n%s", name, strings.Join(errs, "\n"))
	}
	png := get(b, chromedp.FullScreenshot(100))
	b.shot++
	file := filepath.Join(b.dir, fmt.Sprintf("%02d-%s.png", b.shot, name))
	if err := os.WriteFile(file, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// forgetErrors drops console messages a step provoked on purpose.
func (b *browser) forgetErrors() {
	time.Sleep(150 * time.Millisecond)
	b.mu.Lock()
	b.errs = nil
	b.mu.Unlock()
}

func (b *browser) login(name string) {
	b.t.Helper()
	b.open("/login")
	b.do(chromedp.WaitVisible(css("#name")),
		chromedp.SendKeys(css("#name"), name),
		chromedp.SendKeys(css("#password"), testPassword),
		chromedp.Click(css("#login")),
		chromedp.WaitVisible(css("#current-user")))
	if got := b.text("#current-user"); got != name {
		b.t.Fatalf("logged in as %q, want %q", got, name)
	}
}

func (b *browser) logout() {
	b.t.Helper()
	b.do(chromedp.Click(css("#logout")), chromedp.WaitVisible(css("#login")))
}

// until reloads path until cond holds (30s at most).
func (b *browser) until(path, what string, cond func() bool) {
	b.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b.open(path)
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("after 30s still not: %s", what)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func (b *browser) fetchStatus(js string) int {
	b.t.Helper()
	return get(b, chromedp.Evaluate[int](js, chromedp.EvalAwaitPromise))
}

// TestBrowserScenario is the scenario end to end in headless
// Chromium against the real system (Postgres, relay, saga handler, erp-sim
// rejecting a customer with 422, the api process's HTTP front over TLS):
// log in; the alert and the dead letter appear; admin A's edit (with an
// inline validation error first) needs approval; admin B approves and
// re-injects; the deal's timeline shows it invoiced. Then a viewer's
// re-inject is refused by the server, and a cross-origin form post from
// another site is refused. Every page is screenshotted and must render
// without console errors.
func TestBrowserScenario(t *testing.T) {
	start := time.Now()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	if err := store.SetMakerChecker(ctx, true); err != nil {
		t.Fatal(err)
	}

	sim, err := erpsim.New(erpsim.Config{Faults: erpsim.Faults{RejectCustomers: []string{"C-REJECT"}}, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	simSrv := httptest.NewServer(sim.Handler())
	defer simSrv.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := app.RunRelay(ctx, pool, app.RelayConfig{PollInterval: 50 * time.Millisecond, BatchSize: 100}, logger); err != nil && ctx.Err() == nil {
			t.Errorf("relay: %v", err)
		}
	}()
	go func() {
		defer wg.Done()
		err := app.RunHandler(ctx, pool, app.HandlerConfig{ERPURL: simSrv.URL, ERPTimeout: 5 * time.Second, Consumers: 2,
			PollInterval: 50 * time.Millisecond, Lease: 10 * time.Second, NackDelay: 100 * time.Millisecond,
			Retry:   domain.RetryPolicy{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond, MaxAttempts: 3, MaxAge: time.Hour},
			Breaker: erp.BreakerConfig{FailureThreshold: 100, CoolDown: time.Second}}, logger)
		if err != nil && ctx.Err() == nil {
			t.Errorf("handler: %v", err)
		}
	}()

	const crmToken = "crm-token-for-the-browser-test"
	h, err := app.HTTPHandler(ctx, pool, logger, app.HTTPConfig{Auth: auth.Config{CRMToken: crmToken}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(h)
	defer srv.Close()
	svc := auth.New(pool, auth.Config{})
	for _, u := range []struct {
		name string
		role auth.Role
	}{{"alice", auth.RoleAdmin}, {"bob", auth.RoleAdmin}, {"vic", auth.RoleViewer}} {
		if _, err := svc.AddUser(ctx, u.name, u.role, testPassword, auth.Who{Name: "test", Role: auth.RoleAdmin}); err != nil {
			t.Fatal(err)
		}
	}

	// The CRM closes a deal for the customer the ERP rejects.
	crm := func(method, path, body string) map[string]any {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+crmToken)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		if resp.StatusCode >= 300 {
			t.Fatalf("CRM %s %s: %d %s", method, path, resp.StatusCode, raw)
		}
		var m map[string]any
		_ = json.Unmarshal(raw, &m)
		return m
	}
	crm("PUT", "/api/v1/inventory/SKU-1", `{"available":100}`)
	deal := crm("POST", "/api/v1/deals", `{"customer":{"id":"C-REJECT","name":"Initech"},"currency":"USD","lines":[{"sku":"SKU-1","description":"Widget","quantity":2,"unit_price":"495.00"}]}`)
	dealID := deal["id"].(string)
	crm("POST", "/api/v1/deals/"+dealID+"/close", `{"outcome":"won"}`)
	setup := time.Since(start)

	b := newBrowser(t, srv.URL)
	// Logged out, the dashboard sends the browser to the login page.
	b.open("/")
	b.visible("#login")
	loc := get(b, chromedp.Location())
	if !strings.Contains(loc, "/login?next=") {
		t.Fatalf("logged out: at %s", loc)
	}
	b.page("login")
	b.login("alice")

	// The cookie as the browser holds it.
	cookies := get(b, func(ctx context.Context, t *chromedp.Target) ([]*network.Cookie, error) {
		res, err := cdp.Call(ctx, t, network.GetCookies, network.GetCookiesParams{})
		return res.Cookies, err
	})
	if len(cookies) != 1 || cookies[0].Name != auth.SecureCookieName || !cookies[0].Secure || !cookies[0].HTTPOnly ||
		cookies[0].SameSite != network.CookieSameSiteLax || cookies[0].Path != "/" {
		t.Errorf("session cookie in the browser: %+v", cookies)
	}

	// The ERP's 422 becomes an alert and a dead letter.
	b.until("/alerts?state=open", "an open alert with its dead letter", func() bool { return b.exists("a.dl-link") })
	b.page("alerts")
	b.open("/")
	b.visible("#open-alerts")
	if n := b.text("#open-alerts"); n != "1" {
		t.Errorf("overview: %s open alerts", n)
	}
	b.page("overview")
	b.open("/dead-letters")
	b.visible("#dead-letters")
	b.page("dead-letters")

	b.open("/alerts?state=open")
	b.do(chromedp.Click(css("a.dl-link")), chromedp.WaitVisible(css("#payload-input")))
	dlURL := get(b, chromedp.Location())
	dlPath := strings.TrimPrefix(dlURL, srv.URL)
	if at := b.text("#attempts"); !strings.Contains(at, "HTTP 422") || !regexp.MustCompile(`final.*HTTP 422\s+\d+ ms`).MatchString(at) {
		t.Errorf("error history lacks the final 422 with its latency: %s", at)
	}
	b.page("dead-letter")

	// Admin A edits: first an invalid currency (the server names the field
	// inline), then the fix, which changes money and so needs approval.
	original := get(b, chromedp.Value(css("#payload-input")))
	var req domain.InvoiceRequest
	if err := json.Unmarshal([]byte(original), &req); err != nil {
		t.Fatalf("payload in the edit form: %v\n%s", err, original)
	}
	req.Currency = "US"
	bad, _ := json.MarshalIndent(req, "", "  ")
	b.do(chromedp.SetValue(css("#payload-input"), string(bad)),
		chromedp.SendKeys(css("#edit-reason"), "customer moved to the new account"),
		// #payload-error is always on the page (empty until an error), so
		// wait for the server's answer: the textarea marked invalid.
		chromedp.Click(css("#save-edit")), chromedp.WaitVisible(css("#payload-input.invalid")))
	if msg := b.text("#payload-error"); !strings.Contains(msg, "currency") {
		t.Errorf("inline validation error: %q", msg)
	}
	b.forgetErrors() // the 422 answer to the form post
	b.page("dead-letter-edit-invalid")
	req.Currency = "USD"
	req.Customer.ID = "C-42"
	req.Lines[0].UnitPrice = "490.00"
	req.Total = "980.00"
	good, _ := json.MarshalIndent(req, "", "  ")
	b.do(chromedp.SetValue(css("#payload-input"), string(good)),
		chromedp.Click(css("#save-edit")), chromedp.WaitVisible(css("#needs-approval")))
	if b.exists("#reinject:not([disabled])") || b.exists("#approve") {
		t.Error("re-inject, or approval by the author, offered before approval")
	}
	b.page("dead-letter-awaiting-approval")

	// Admin B approves and re-injects; the deal becomes invoiced.
	b.logout()
	b.login("bob")
	b.open(dlPath)
	b.do(chromedp.Click(css("#approve")), chromedp.WaitVisible(css("#reinject:not([disabled])")))
	b.do(chromedp.SendKeys(css("#reinject-reason"), "customer fixed and price approved"),
		chromedp.Click(css("#reinject")), chromedp.WaitVisible(css("#deal-status")))
	b.until("/deals/"+dealID, "the deal invoiced on its timeline", func() bool { return b.text("#deal-status") == "invoiced" })
	tl := b.text("#timeline")
	for _, want := range []string{"ERP attempt 1 failed (final): permanent, HTTP 422", "CRM status: reverted", "Payload revision 1 by alice",
		"Revision 1 approved by bob", "Re-injected by bob", "CRM status: invoiced", "alice (admin): dead_letter.edit"} {
		if !strings.Contains(tl, want) {
			t.Errorf("timeline lacks %q:\n%s", want, tl)
		}
	}
	b.page("deal-timeline")
	b.open(dlPath)
	b.visible("#dl-state")
	if s := b.text("#dl-state"); s != "resolved" {
		t.Errorf("dead letter after the invoice: %s", s)
	}
	b.page("dead-letter-resolved")
	b.open("/audit")
	b.visible("#audit")
	b.page("audit")
	b.open("/users")
	b.visible("#users")
	b.page("users")
	b.open("/alerts")
	b.visible("#alerts")
	b.page("alerts-all")
	b.open("/")
	b.visible("#open-alerts")
	b.page("overview-after")

	// A cross-origin form post (another site, as the logged-in admin) is
	// refused: here it tries to create an admin.
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, `<!doctype html><title>evil</title><form id="f" method="post" action="%s/users"><input name="name" value="mallory"><input name="role" value="admin"></form><script>document.getElementById("f").submit()</script>`, srv.URL)
	}))
	defer evil.Close()
	b.do(chromedp.Navigate(evil.URL), chromedp.WaitVisible(css("h1")))
	if body := b.text("main"); !strings.Contains(body, "Cross-origin request refused") {
		t.Errorf("cross-origin post answered: %s", body)
	}
	b.forgetErrors()
	var mallory int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM users WHERE name='mallory'`).Scan(&mallory); err != nil || mallory != 0 {
		t.Errorf("the cross-origin post created a user (%d, %v)", mallory, err)
	}

	// A viewer sees the dead letter masked; their re-inject request, sent by
	// hand, is refused by the server.
	b.open("/")
	b.logout()
	b.login("vic")
	b.open(dlPath)
	b.visible("#payload")
	if p := b.text("#payload"); strings.Contains(p, "Initech") || strings.Contains(p, "C-42") {
		t.Errorf("viewer sees customer fields: %s", p)
	}
	if b.exists("#reinject") {
		t.Error("viewer is offered a re-inject button")
	}
	if body := b.text("main"); strings.Contains(body, "C-REJECT") || strings.Contains(body, "Initech") {
		t.Error("viewer sees the customer in the dead letter's free text")
	}
	if b.exists("#approve") {
		t.Error("viewer is offered an approve button")
	}
	b.page("dead-letter-as-viewer")
	status := b.fetchStatus(`fetch(location.pathname + "/reinject", {method: "POST", body: new URLSearchParams({reason: "viewer tries"})}).then(r => r.status)`)
	if status != http.StatusForbidden {
		t.Errorf("viewer's re-inject from the browser: %d, want 403", status)
	}
	jsonStatus := b.fetchStatus(`fetch("/api/v1` + dlPath + `/reinject", {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"}).then(r => r.status)`)
	if jsonStatus != http.StatusForbidden {
		t.Errorf("viewer's JSON re-inject from the browser: %d, want 403", jsonStatus)
	}
	b.forgetErrors()
	b.open("/users")
	b.visible("h1")
	if h := b.text("h1"); !strings.Contains(h, "403") {
		t.Errorf("viewer on /users: %s", h)
	}
	b.forgetErrors()
	b.page("forbidden-as-viewer")
	t.Logf("setup %s, whole scenario %s; screenshots in %s", setup.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), b.dir)
}
