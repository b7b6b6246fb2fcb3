// Package dashboard is the operators' web interface: server-rendered pages
// (html/template) over the same store operations as the JSON API, with
// every asset embedded in the binary and no build step. Every route states
// the least role it needs and is checked on the server (auth.Require); the
// handler runs behind http.CrossOriginProtection and a strict
// Content-Security-Policy (no inline script or style).
package dashboard

import (
	"bytes"
	"context"
	"crypto/rand"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Config configures the dashboard.
type Config struct {
	Logger *slog.Logger
	// BaseContext outlives requests: bulk re-injects run under it.
	BaseContext context.Context
	// BreakerState reports the ERP circuit breaker's state when this
	// process runs the saga handler (dev); known is false otherwise.
	BreakerState func() (state string, known bool)
	// Refresh is how often the overview reloads itself (default 10s).
	Refresh time.Duration
	// CRMOpen says the CRM-facing API runs without a token (dev), shown as
	// a banner.
	CRMOpen bool
}

// Dashboard serves the pages.
type Dashboard struct {
	store *postgres.Store
	pool  *pgxpool.Pool
	auth  *auth.Service
	cfg   Config
	log   *slog.Logger
	pages map[string]*template.Template
}

// New returns the dashboard over store, authenticating through authSvc.
func New(store *postgres.Store, authSvc *auth.Service, cfg Config) (*Dashboard, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.BaseContext == nil {
		cfg.BaseContext = context.Background()
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = 10 * time.Second
	}
	d := &Dashboard{store: store, pool: store.Pool(), auth: authSvc, cfg: cfg, log: cfg.Logger, pages: map[string]*template.Template{}}
	names, err := fs.Glob(templateFS, "templates/*.html")
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		base := strings.TrimSuffix(strings.TrimPrefix(n, "templates/"), ".html")
		if base == "layout" {
			continue
		}
		t, err := template.New(base).Funcs(funcs).ParseFS(templateFS, "templates/layout.html", n)
		if err != nil {
			return nil, fmt.Errorf("dashboard template %s: %w", n, err)
		}
		d.pages[base] = t
	}
	return d, nil
}

// Handler returns the dashboard's routes.
func (d *Dashboard) Handler() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", cacheStatic(http.FileServerFS(static))))
	mux.HandleFunc("GET /favicon.ico", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/static/favicon.svg", http.StatusMovedPermanently)
	})
	mux.HandleFunc("GET /login", d.loginPage)
	mux.HandleFunc("POST /login", d.login)
	mux.HandleFunc("POST /logout", d.logout)

	route := func(pattern string, min auth.Role, h http.HandlerFunc) {
		mux.HandleFunc(pattern, auth.Require(min, d.deny, h))
	}
	route("GET /{$}", auth.RoleViewer, d.overview)
	route("GET /chart.svg", auth.RoleViewer, d.chartSVG)
	route("GET /alerts", auth.RoleViewer, d.alerts)
	route("POST /alerts/{id}/acknowledge", auth.RoleOperator, d.ackAlert)
	route("POST /alerts/{id}/resolve", auth.RoleOperator, d.resolveAlert)
	route("GET /dead-letters", auth.RoleViewer, d.deadLetters)
	route("POST /dead-letters/bulk-reinject", auth.RoleOperator, d.bulkReinject)
	route("GET /dead-letters/{id}", auth.RoleViewer, d.deadLetter)
	route("POST /dead-letters/{id}/edit", auth.RoleAdmin, d.editDeadLetter)
	route("POST /dead-letters/{id}/approve", auth.RoleAdmin, d.approveDeadLetter)
	route("POST /dead-letters/{id}/reinject", auth.RoleOperator, d.reinjectDeadLetter)
	route("POST /dead-letters/{id}/discard", auth.RoleOperator, d.discardDeadLetter)
	route("GET /deals", auth.RoleViewer, d.findDeal)
	route("GET /deals/{id}", auth.RoleViewer, d.timeline)
	route("GET /audit", auth.RoleViewer, d.audit)
	route("GET /users", auth.RoleAdmin, d.users)
	route("POST /users", auth.RoleAdmin, d.addUser)
	route("POST /users/{name}/role", auth.RoleAdmin, d.setRole)
	route("POST /users/{name}/disable", auth.RoleAdmin, d.disableUser)
	route("POST /users/{name}/enable", auth.RoleAdmin, d.enableUser)
	route("POST /users/{name}/password", auth.RoleAdmin, d.resetPassword)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		d.errorPage(w, r, http.StatusNotFound, "There is no page at "+r.URL.Path+".")
	})

	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.log.WarnContext(r.Context(), "cross-origin request refused", "method", r.Method, "path", r.URL.Path,
			"origin", r.Header.Get("Origin"), "sec_fetch_site", r.Header.Get("Sec-Fetch-Site"))
		d.errorPage(w, r, http.StatusForbidden, "Cross-origin request refused.")
	}))
	return d.middleware(cop.Handler(d.auth.Middleware(mux)))
}

func cacheStatic(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=300")
		h.ServeHTTP(w, r)
	})
}

type ctxKey int

const requestIDKey ctxKey = 0

// middleware sets the security headers, a request id and logs the request.
func (d *Dashboard) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "+
			"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "same-origin")
		if r.TLS != nil {
			h.Set("Strict-Transport-Security", "max-age=31536000")
		}
		id := r.Header.Get("X-Request-ID")
		if id == "" || len(id) > 128 {
			b := make([]byte, 8)
			_, _ = rand.Read(b)
			id = hex.EncodeToString(b)
		}
		h.Set("X-Request-ID", id)
		rw := &statusWriter{ResponseWriter: w, status: 200}
		start := time.Now()
		next.ServeHTTP(rw, r.WithContext(context.WithValue(r.Context(), requestIDKey, id)))
		d.log.LogAttrs(r.Context(), slog.LevelInfo, "http", slog.String("method", r.Method), slog.String("path", r.URL.Path),
			slog.Int("status", rw.status), slog.Duration("took", time.Since(start)), slog.String("request_id", id))
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(s int) { w.status = s; w.ResponseWriter.WriteHeader(s) }

// deny answers a request without the role its route needs: to the login
// page without a session, a 403 page without the role.
func (d *Dashboard) deny(w http.ResponseWriter, r *http.Request, status int) {
	if status == http.StatusUnauthorized {
		q := url.Values{}
		if r.Method == http.MethodGet {
			q.Set("next", r.URL.RequestURI())
		}
		if auth.SessionExpired(r.Context()) {
			q.Set("expired", "1")
		}
		target := "/login"
		if len(q) > 0 {
			target += "?" + q.Encode()
		}
		http.Redirect(w, r, target, http.StatusSeeOther)
		return
	}
	p, _ := auth.FromContext(r.Context())
	d.log.WarnContext(r.Context(), "forbidden", "user", p.Name, "role", p.Role, "method", r.Method, "path", r.URL.Path)
	d.errorPage(w, r, http.StatusForbidden, "Your role ("+string(p.Role)+") does not allow this.")
}

// view is what every page template gets.
type view struct {
	Title    string
	Nav      string
	User     auth.Principal
	LoggedIn bool
	Flash    string
	Error    string
	CRMOpen  bool
	Refresh  int // seconds; 0: no auto-refresh
	Data     any
}

func (d *Dashboard) render(w http.ResponseWriter, r *http.Request, status int, page string, v view) {
	t, ok := d.pages[page]
	if !ok {
		http.Error(w, "no template "+page, http.StatusInternalServerError)
		return
	}
	v.User, v.LoggedIn = auth.FromContext(r.Context())
	v.CRMOpen = d.cfg.CRMOpen
	if v.Flash == "" {
		v.Flash = flashes[r.URL.Query().Get("done")]
	}
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, "layout", v); err != nil {
		d.log.ErrorContext(r.Context(), "render failed", "page", page, "err", err)
		http.Error(w, "the page could not be rendered; see the server log", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

var flashes = map[string]string{
	"acknowledged":    "Alert acknowledged.",
	"resolved":        "Alert resolved.",
	"edited":          "Payload saved as a new revision.",
	"edited-approval": "Payload saved as a new revision. It changes money fields: a second admin must approve it before it can be re-injected.",
	"approved":        "Revision approved.",
	"reinjected":      "Re-injected: the saga resumes with the fixed payload.",
	"discarded":       "Dead letter discarded.",
	"bulk":            "Bulk re-inject started; it continues in the background.",
	"role":            "Role changed.",
	"disabled":        "User disabled; their sessions ended.",
	"enabled":         "User enabled.",
}

func (d *Dashboard) errorPage(w http.ResponseWriter, r *http.Request, status int, msg string) {
	d.render(w, r, status, "error", view{Title: http.StatusText(status), Error: msg, Data: status})
}

// fail reports a failed store call: its problem status and detail, without
// internals for a 500.
func (d *Dashboard) fail(w http.ResponseWriter, r *http.Request, err error) {
	p := httpapi.ProblemFor(err)
	if p.Status >= 500 {
		d.log.ErrorContext(r.Context(), "request failed", "path", r.URL.Path, "err", err)
	}
	d.errorPage(w, r, p.Status, p.Detail)
}

// actor is the logged-in user as the audit log records them.
func actor(r *http.Request) postgres.Actor {
	p, _ := auth.FromContext(r.Context())
	id, _ := r.Context().Value(requestIDKey).(string)
	return postgres.Actor{Name: p.Name, Role: string(p.Role), RequestID: id}
}

func who(r *http.Request) auth.Who {
	a := actor(r)
	return auth.Who{Name: a.Name, Role: auth.Role(a.Role), RequestID: a.RequestID}
}

func unmasked(r *http.Request) bool {
	p, ok := auth.FromContext(r.Context())
	return ok && p.CanSeePII()
}

// redirect answers a successful POST (post/redirect/get).
func redirect(w http.ResponseWriter, r *http.Request, path string, done string) {
	if done != "" {
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		path += sep + "done=" + url.QueryEscape(done)
	}
	http.Redirect(w, r, path, http.StatusSeeOther)
}

// safeNext accepts only a local path as the place to go after login.
func safeNext(s string) string {
	if s == "" || !strings.HasPrefix(s, "/") || strings.HasPrefix(s, "//") || strings.ContainsAny(s, "\\\r\n") ||
		strings.HasPrefix(s, "/login") {
		return "/"
	}
	return s
}

func (d *Dashboard) loginPage(w http.ResponseWriter, r *http.Request) {
	if _, ok := auth.FromContext(r.Context()); ok {
		http.Redirect(w, r, safeNext(r.URL.Query().Get("next")), http.StatusSeeOther)
		return
	}
	v := view{Title: "Log in", Data: loginData{Next: safeNext(r.URL.Query().Get("next"))}}
	switch {
	case r.URL.Query().Get("expired") == "1":
		v.Flash = "Your session has expired. Please log in again."
	case r.URL.Query().Get("out") == "1":
		v.Flash = "You are logged out."
	}
	d.render(w, r, http.StatusOK, "login", v)
}

type loginData struct {
	Next string
	Name string
}

func (d *Dashboard) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	name, password, next := r.PostFormValue("name"), r.PostFormValue("password"), safeNext(r.PostFormValue("next"))
	_, err := d.auth.Login(w, r, name, password)
	var rl *auth.RateLimitedError
	switch {
	case err == nil:
		http.Redirect(w, r, next, http.StatusSeeOther)
	case errors.As(err, &rl):
		w.Header().Set("Retry-After", fmt.Sprint(int(rl.RetryAfter.Seconds())+1))
		d.render(w, r, http.StatusTooManyRequests, "login", view{Title: "Log in", Error: rl.Error(), Data: loginData{Next: next, Name: name}})
	case errors.Is(err, auth.ErrBadCredentials):
		d.render(w, r, http.StatusUnauthorized, "login", view{Title: "Log in", Error: "Unknown user or wrong password.", Data: loginData{Next: next, Name: name}})
	default:
		d.log.ErrorContext(r.Context(), "login failed", "err", err)
		d.errorPage(w, r, http.StatusInternalServerError, "Login is unavailable; see the server log.")
	}
}

func (d *Dashboard) logout(w http.ResponseWriter, r *http.Request) {
	if err := d.auth.Logout(w, r); err != nil {
		d.log.ErrorContext(r.Context(), "logout failed", "err", err)
	}
	http.Redirect(w, r, "/login?out=1", http.StatusSeeOther)
}
