package dashboard_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/dealbridge/dealbridge/adapters/auth"
)

// TestEveryRouteEveryRole calls every dashboard page and every operator
// JSON endpoint as nobody, viewer, operator and admin, directly (no UI):
// below the route's role the server answers 401 (JSON) or a redirect to the
// login page (pages) without a session, and 403 with one.
func TestEveryRouteEveryRole(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{})
	f := e.failedDeal(t, "C-REJECT")
	if _, err := e.svc.AddUser(t.Context(), "zed", auth.RoleViewer, testPassword, auth.Who{Name: "test", Role: auth.RoleAdmin}); err != nil {
		t.Fatal(err)
	}
	type route struct {
		method, path string
		min          auth.Role
		json         bool
	}
	dl, al := f.dlID, f.alertID
	routes := []route{
		{"GET", "/", auth.RoleViewer, false},
		{"GET", "/chart.svg", auth.RoleViewer, false},
		{"GET", "/alerts", auth.RoleViewer, false},
		{"POST", "/alerts/" + al + "/acknowledge", auth.RoleOperator, false},
		{"POST", "/alerts/" + al + "/resolve", auth.RoleOperator, false},
		{"GET", "/dead-letters", auth.RoleViewer, false},
		{"POST", "/dead-letters/bulk-reinject", auth.RoleOperator, false},
		{"GET", "/dead-letters/" + dl, auth.RoleViewer, false},
		{"POST", "/dead-letters/" + dl + "/edit", auth.RoleAdmin, false},
		{"POST", "/dead-letters/" + dl + "/approve", auth.RoleAdmin, false},
		{"POST", "/dead-letters/" + dl + "/reinject", auth.RoleOperator, false},
		{"POST", "/dead-letters/" + dl + "/discard", auth.RoleOperator, false},
		{"GET", "/deals/" + f.dealID, auth.RoleViewer, false},
		{"GET", "/deals?id=" + f.dealID, auth.RoleViewer, false},
		{"GET", "/audit", auth.RoleViewer, false},
		{"GET", "/users", auth.RoleAdmin, false},
		{"POST", "/users", auth.RoleAdmin, false},
		{"POST", "/users/zed/role", auth.RoleAdmin, false},
		{"POST", "/users/zed/disable", auth.RoleAdmin, false},
		{"POST", "/users/zed/enable", auth.RoleAdmin, false},
		{"POST", "/users/zed/password", auth.RoleAdmin, false},
		{"GET", "/api/v1/dead-letters", auth.RoleViewer, true},
		{"GET", "/api/v1/dead-letters/" + dl, auth.RoleViewer, true},
		{"PUT", "/api/v1/dead-letters/" + dl + "/payload", auth.RoleAdmin, true},
		{"POST", "/api/v1/dead-letters/" + dl + "/approve", auth.RoleAdmin, true},
		{"POST", "/api/v1/dead-letters/" + dl + "/reinject", auth.RoleOperator, true},
		{"POST", "/api/v1/dead-letters/" + dl + "/discard", auth.RoleOperator, true},
		{"POST", "/api/v1/dead-letters/bulk-reinject", auth.RoleOperator, true},
		{"GET", "/api/v1/alerts", auth.RoleViewer, true},
		{"POST", "/api/v1/alerts/" + al + "/acknowledge", auth.RoleOperator, true},
		{"POST", "/api/v1/alerts/" + al + "/resolve", auth.RoleOperator, true},
		{"GET", "/api/v1/audit", auth.RoleViewer, true},
	}
	clients := map[auth.Role]*client{auth.RoleNone: e.client(t), auth.RoleViewer: e.loggedIn(t, "vic"),
		auth.RoleOperator: e.loggedIn(t, "olga"), auth.RoleAdmin: e.loggedIn(t, "alice")}
	for _, role := range []auth.Role{auth.RoleNone, auth.RoleViewer, auth.RoleOperator, auth.RoleAdmin} {
		for _, rt := range routes {
			c := clients[role]
			var form url.Values
			if rt.method != "GET" && !rt.json {
				form = url.Values{} // empty: nothing valid to do, only the gate is tested
			}
			if rt.json && rt.method != "GET" {
				c.hdr.Set("Content-Type", "application/json")
			}
			r := c.do(rt.method, rt.path, form)
			allowed := role.AtLeast(rt.min)
			what := fmt.Sprintf("%s %s as %q", rt.method, rt.path, role)
			switch {
			case allowed && (r.status == 401 || r.status == 403 || strings.HasPrefix(r.header.Get("Location"), "/login")):
				t.Errorf("%s: refused (%d %s), want allowed", what, r.status, r.header.Get("Location"))
			case allowed && r.status >= 500:
				t.Errorf("%s: %d %s", what, r.status, r.body)
			case !allowed && role == auth.RoleNone && rt.json && r.status != 401:
				t.Errorf("%s: %d, want 401", what, r.status)
			case !allowed && role == auth.RoleNone && !rt.json && (r.status != 303 || !strings.HasPrefix(r.header.Get("Location"), "/login")):
				t.Errorf("%s: %d to %q, want a redirect to the login page", what, r.status, r.header.Get("Location"))
			case !allowed && role != auth.RoleNone && r.status != 403:
				t.Errorf("%s: %d, want 403", what, r.status)
			}
		}
	}
}

// TestViewerReinjectIs403 is the case: the viewer's re-inject is
// refused by the server (page form and JSON), and nothing is written.
func TestViewerReinjectIs403(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{})
	f := e.failedDeal(t, "C-REJECT")
	vic := e.loggedIn(t, "vic")
	before := auditCount(t, e)
	if r := vic.do("POST", "/dead-letters/"+f.dlID+"/reinject", url.Values{"reason": {"let me"}}); r.status != 403 || !strings.Contains(r.body, "does not allow") {
		t.Errorf("viewer re-inject (page): %d %s", r.status, r.body)
	}
	vic.hdr.Set("Content-Type", "application/json")
	r := vic.do("POST", "/api/v1/dead-letters/"+f.dlID+"/reinject", nil)
	if r.status != 403 || !strings.Contains(r.header.Get("Content-Type"), "problem+json") {
		t.Errorf("viewer re-inject (JSON): %d %s", r.status, r.body)
	}
	if after := auditCount(t, e); after != before {
		t.Errorf("audit rows %d → %d: the refused action wrote", before, after)
	}
	var state string
	if err := e.pool.QueryRow(t.Context(), `SELECT state FROM dead_letters WHERE id=$1`, f.dlID).Scan(&state); err != nil || state != "open" {
		t.Errorf("dead letter %s after the refused re-inject (%v)", state, err)
	}
}

func auditCount(t *testing.T, e *env) int {
	var n int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM audit_log WHERE action NOT LIKE 'user.%'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCrossOriginPostRefused: a logged-in admin's browser posting from
// another origin (Sec-Fetch-Site, or only an Origin header for older
// browsers) is refused before any handler runs; the same-origin post works.
func TestCrossOriginPostRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{})
	f := e.failedDeal(t, "C-REJECT")
	before := auditCount(t, e)
	for _, h := range []map[string]string{
		{"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
		{"Sec-Fetch-Site": "same-site", "Origin": "http://other.127.0.0.1.nip.io"},
		{"Origin": "https://evil.example"},
	} {
		c := e.loggedIn(t, "alice")
		for k, v := range h {
			c.hdr.Set(k, v)
		}
		for _, p := range []string{"/dead-letters/" + f.dlID + "/discard", "/api/v1/dead-letters/" + f.dlID + "/discard"} {
			form := url.Values{"reason": {"csrf"}}
			if strings.HasPrefix(p, "/api/") {
				form = nil
			}
			if r := c.do("POST", p, form); r.status != 403 || !strings.Contains(strings.ToLower(r.body), "cross-origin") {
				t.Errorf("POST %s with %v: %d %s, want 403", p, h, r.status, r.body)
			}
		}
	}
	if after := auditCount(t, e); after != before {
		t.Fatalf("a cross-origin post wrote %d audit rows", after-before)
	}
	// The same request from the dashboard itself is fine.
	c := e.loggedIn(t, "alice")
	c.hdr.Set("Sec-Fetch-Site", "same-origin")
	c.hdr.Set("Origin", e.srv.URL)
	if r := c.do("POST", "/dead-letters/"+f.dlID+"/discard", url.Values{"reason": {"duplicate of another deal"}}); r.status != 303 {
		t.Fatalf("same-origin discard: %d %s", r.status, r.body)
	}
}

// TestLoggedOutRequests: pages redirect to the login page (and back after
// it), JSON gets 401 with WWW-Authenticate, a garbage cookie or token is
// nobody.
func TestLoggedOutRequests(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{})
	c := e.client(t)
	r := c.do("GET", "/alerts?state=open", nil)
	if r.status != 303 || r.header.Get("Location") != "/login?next=%2Falerts%3Fstate%3Dopen" {
		t.Fatalf("GET /alerts logged out: %d %q", r.status, r.header.Get("Location"))
	}
	r = c.do("POST", "/login", url.Values{"name": {"olga"}, "password": {testPassword}, "next": {"/alerts?state=open"}})
	if r.status != 303 || r.header.Get("Location") != "/alerts?state=open" {
		t.Fatalf("login with next: %d %q", r.status, r.header.Get("Location"))
	}
	// An open redirect is not possible through next.
	for _, next := range []string{"//evil.example/", "https://evil.example/", "/\\evil.example"} {
		c2 := e.client(t)
		r := c2.do("POST", "/login", url.Values{"name": {"olga"}, "password": {testPassword}, "next": {next}})
		if r.header.Get("Location") != "/" {
			t.Errorf("next=%q: redirected to %q", next, r.header.Get("Location"))
		}
	}
	for _, hdr := range []http.Header{{}, {"Authorization": {"Bearer dbt_not-a-token"}}, {"Cookie": {"dealbridge_session=forged"}}} {
		c := e.client(t)
		c.hdr = hdr
		r := c.do("GET", "/api/v1/alerts", nil)
		if r.status != 401 || r.header.Get("WWW-Authenticate") == "" || !strings.Contains(r.header.Get("Content-Type"), "problem+json") {
			t.Errorf("GET /api/v1/alerts with %v: %d %v", hdr, r.status, r.header)
		}
	}
	// Logging out ends the session on the server: the old cookie is dead.
	c = e.loggedIn(t, "alice")
	cookie := sessionCookie(t, c)
	if r := c.do("POST", "/logout", url.Values{}); r.status != 303 {
		t.Fatalf("logout: %d", r.status)
	}
	c2 := e.client(t)
	c2.hdr.Set("Cookie", cookie.Name+"="+cookie.Value)
	if r := c2.do("GET", "/", nil); r.status != 303 || !strings.HasPrefix(r.header.Get("Location"), "/login") {
		t.Errorf("the logged-out cookie still works: %d", r.status)
	}
}

func sessionCookie(t *testing.T, c *client) *http.Cookie {
	t.Helper()
	u, _ := url.Parse(c.e.srv.URL)
	for _, ck := range c.hc.Jar.Cookies(u) {
		if strings.HasSuffix(ck.Name, "dealbridge_session") {
			return ck
		}
	}
	t.Fatal("no session cookie")
	return nil
}

// TestSessionExpiry: the idle timeout and the absolute timeout each end a
// session; the page then says so on the login page.
func TestSessionExpiry(t *testing.T) {
	t.Parallel()
	t.Run("idle", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, envOpt{auth: auth.Config{IdleTimeout: time.Second, AbsoluteTimeout: time.Hour}})
		c := e.loggedIn(t, "alice")
		if r := c.do("GET", "/", nil); r.status != 200 {
			t.Fatalf("fresh session: %d", r.status)
		}
		time.Sleep(1500 * time.Millisecond)
		r := c.do("GET", "/alerts", nil)
		if r.status != 303 || !strings.Contains(r.header.Get("Location"), "expired=1") {
			t.Fatalf("after the idle timeout: %d %q", r.status, r.header.Get("Location"))
		}
		if r := c.do("GET", r.header.Get("Location"), nil); !strings.Contains(r.body, "Your session has expired") {
			t.Errorf("login page after expiry does not say so")
		}
	})
	t.Run("absolute", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, envOpt{auth: auth.Config{IdleTimeout: time.Second, AbsoluteTimeout: 2 * time.Second}})
		c := e.loggedIn(t, "alice")
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline.Add(-300 * time.Millisecond)) {
			if r := c.do("GET", "/alerts", nil); r.status != 200 {
				t.Fatalf("active session refused before its max age: %d", r.status)
			}
			time.Sleep(300 * time.Millisecond)
		}
		time.Sleep(600 * time.Millisecond)
		if r := c.do("GET", "/alerts", nil); r.status != 303 {
			t.Fatalf("active session past its max age: %d", r.status)
		}
	})
}

// TestLoginRateLimitAndFixation: failed logins are limited per address and
// user (429 even for the right password once the burst is spent); a login
// issues a new session id and deletes the one presented.
func TestLoginRateLimitAndFixation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{auth: auth.Config{LoginBurst: 3, LoginRefill: time.Hour}})
	c := e.client(t)
	for i := range 3 {
		if r := c.do("POST", "/login", url.Values{"name": {"bob"}, "password": {"wrong password " + fmt.Sprint(i)}}); r.status != 401 ||
			!strings.Contains(r.body, "Unknown user or wrong password") {
			t.Fatalf("bad login %d: %d", i, r.status)
		}
	}
	r := c.do("POST", "/login", url.Values{"name": {"bob"}, "password": {testPassword}})
	if r.status != 429 || r.header.Get("Retry-After") == "" {
		t.Fatalf("login past the limit: %d %v", r.status, r.header)
	}

	e2 := newEnv(t, envOpt{})
	c = e2.loggedIn(t, "alice")
	first := sessionCookie(t, c)
	c.login("alice")
	second := sessionCookie(t, c)
	if first.Value == second.Value {
		t.Fatal("a login kept the presented session id")
	}
	old := e2.client(t)
	old.hdr.Set("Cookie", first.Name+"="+first.Value)
	if r := old.do("GET", "/", nil); r.status != 303 {
		t.Errorf("the session presented at login still works: %d", r.status)
	}
	// A disabled user's session ends at once.
	vic := e2.loggedIn(t, "vic")
	if err := e2.svc.SetDisabled(t.Context(), "vic", true, auth.Who{Name: "test", Role: auth.RoleAdmin}); err != nil {
		t.Fatal(err)
	}
	if r := vic.do("GET", "/", nil); r.status != 303 {
		t.Errorf("a disabled user's session still works: %d", r.status)
	}
}

// TestCookieAttributes: under TLS the cookie is __Host-, Secure, HttpOnly,
// SameSite=Lax, Path=/, no Domain; over plain HTTP it cannot be Secure and
// so is not __Host- prefixed. Both carry no expiry (a browser session).
func TestCookieAttributes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		tls  bool
		name string
	}{{true, "__Host-dealbridge_session"}, {false, "dealbridge_session"}} {
		e := newEnv(t, envOpt{tls: tc.tls})
		r := e.client(t).login("alice")
		sc := r.header.Get("Set-Cookie")
		want := []string{tc.name + "=", "Path=/", "HttpOnly", "SameSite=Lax"}
		if tc.tls {
			want = append(want, "Secure")
		}
		for _, w := range want {
			if !strings.Contains(sc, w) {
				t.Errorf("tls=%v: Set-Cookie %q lacks %q", tc.tls, sc, w)
			}
		}
		if strings.Contains(sc, "Domain=") || strings.Contains(sc, "Expires=") || (!tc.tls && strings.Contains(sc, "Secure")) {
			t.Errorf("tls=%v: Set-Cookie %q", tc.tls, sc)
		}
		if len(strings.SplitN(strings.SplitN(sc, ";", 2)[0], "=", 2)[1]) < 40 {
			t.Errorf("session id too short: %q", sc)
		}
	}
}

// TestViewerSeesMaskedCustomer: customer fields are masked for viewers on
// pages and in JSON, shown to operators.
func TestViewerSeesMaskedCustomer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{})
	f := e.failedDeal(t, "C-REJECT")
	vic, olga := e.loggedIn(t, "vic"), e.loggedIn(t, "olga")
	for _, p := range []string{"/dead-letters/" + f.dlID, "/deals/" + f.dealID, "/api/v1/dead-letters/" + f.dlID, "/api/v1/dead-letters", "/dead-letters"} {
		rv, ro := vic.do("GET", p, nil), olga.do("GET", p, nil)
		if rv.status != 200 || ro.status != 200 {
			t.Fatalf("GET %s: viewer %d, operator %d", p, rv.status, ro.status)
		}
		if strings.Contains(rv.body, "Globex Secret Corp") || strings.Contains(rv.body, "C-REJECT") {
			t.Errorf("GET %s as viewer shows the customer name", p)
		}
		if strings.Contains(p, "/deals/") || strings.Contains(p, "/dead-letters/") {
			if !strings.Contains(ro.body, "Globex Secret Corp") {
				t.Errorf("GET %s as operator does not show the customer name", p)
			}
		}
	}
}

// TestEditValidationInline: a payload that fails the schema comes back as
// the same page, 422, the submitted text kept and the field named.
func TestEditValidationInline(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpt{})
	f := e.failedDeal(t, "C-REJECT")
	alice := e.loggedIn(t, "alice")
	bad := strings.Replace(mustJSON(t, f.req), `"USD"`, `"US"`, 1)
	r := alice.do("POST", "/dead-letters/"+f.dlID+"/edit", url.Values{"payload": {bad}, "reason": {"fix currency"}})
	if r.status != 422 || !strings.Contains(r.body, `id="payload-error"`) || !strings.Contains(r.body, "<b>currency</b>") ||
		!strings.Contains(r.body, "&#34;US&#34;") {
		t.Fatalf("invalid edit: %d\n%s", r.status, r.body)
	}
	r = alice.do("POST", "/dead-letters/"+f.dlID+"/edit", url.Values{"payload": {mustJSON(t, f.req)}, "reason": {""}})
	if r.status != 422 || !strings.Contains(r.body, "reason") {
		t.Fatalf("edit without reason: %d", r.status)
	}
}
