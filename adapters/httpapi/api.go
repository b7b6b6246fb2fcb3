// Package httpapi is dealbridge's CRM-facing HTTP API: deal commands and
// inventory, with problem+json errors that name the offending field.
package httpapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// API serves the HTTP endpoints.
type API struct {
	store   *postgres.Store
	pool    *pgxpool.Pool
	logger  *slog.Logger
	baseCtx context.Context // outlives requests: background work (bulk re-injects)
	auth    *auth.Service   // nil: the CRM API is open and every operator endpoint refuses
	metrics http.Handler    // nil: no GET /metrics
	// metricsAuth: GET /metrics needs a user's session or API token (any
	// role), like the operator routes; otherwise it is open.
	metricsAuth bool
}

// New returns the API over store.
func New(store *postgres.Store, logger *slog.Logger) *API {
	return &API{store: store, pool: store.Pool(), logger: logger, baseCtx: context.Background()}
}

// WithContext sets the context background work runs under (cancelled at
// shutdown).
func (a *API) WithContext(ctx context.Context) *API {
	a.baseCtx = ctx
	return a
}

// WithAuth authenticates requests through svc: the CRM-facing routes then
// need its CRM token when one is configured, and the operator routes a
// session or API token of a user with the right role. Without it the
// operator routes refuse every request.
func (a *API) WithAuth(svc *auth.Service) *API {
	a.auth = svc
	return a
}

// WithMetrics serves h (the process's Prometheus metrics) at GET /metrics.
// With requireAuth the route needs a session or API token of a user of any
// role (Prometheus: authorization.credentials_file with `users token`);
// without it anyone who reaches the listener may scrape. The metrics hold
// counts and ages only, never a deal, customer or payload.
func (a *API) WithMetrics(h http.Handler, requireAuth bool) *API {
	a.metrics, a.metricsAuth = h, requireAuth
	return a
}

// crm guards a CRM-facing route.
func (a *API) crm(h http.HandlerFunc) http.HandlerFunc {
	if a.auth == nil {
		return h
	}
	return a.auth.RequireCRM(deny, h)
}

// deny is the JSON refusal: 401 without credentials, 403 without the role.
func deny(w http.ResponseWriter, r *http.Request, status int) {
	detail := "this endpoint needs a logged-in session or an API token (Authorization: Bearer ...)"
	if status == http.StatusForbidden {
		detail = "your role does not allow this"
	} else if w.Header().Get("WWW-Authenticate") == "" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="dealbridge"`)
	}
	writeProblem(w, r, Problem{Status: status, Detail: detail, Type: "https://dealbridge.dev/problems/" + map[int]string{401: "unauthenticated", 403: "forbidden"}[status]})
}

// Handler returns the HTTP handler with every route.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/deals", a.crm(a.createDeal))
	mux.HandleFunc("GET /api/v1/deals/{id}", a.crm(a.getDeal))
	mux.HandleFunc("POST /api/v1/deals/{id}/close", a.crm(a.closeDeal))
	mux.HandleFunc("PUT /api/v1/inventory/{sku}", a.crm(a.setInventory))
	mux.HandleFunc("GET /api/v1/inventory/{sku}", a.crm(a.getInventory))
	a.opsRoutes(mux)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, map[string]string{"status": "ok"}) })
	mux.HandleFunc("GET /readyz", a.ready)
	if a.metrics != nil {
		if a.metricsAuth {
			mux.HandleFunc("GET /metrics", auth.Require(auth.RoleViewer, deny, a.metrics.ServeHTTP))
		} else {
			mux.Handle("GET /metrics", a.metrics)
		}
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeProblem(w, r, Problem{Status: http.StatusNotFound, Detail: "no such endpoint: " + r.Method + " " + r.URL.Path})
	})
	var h http.Handler = mux
	if a.auth != nil {
		h = a.auth.Middleware(h)
	}
	// CSRF: a browser's cross-origin state change is refused whatever
	// credentials it carries; API clients (no Sec-Fetch-Site, no Origin) pass.
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeProblem(w, r, Problem{Status: http.StatusForbidden, Detail: "cross-origin request refused", Type: "https://dealbridge.dev/problems/cross-origin"})
	}))
	return a.middleware(cop.Handler(h))
}

type ctxKey int

const requestIDKey ctxKey = 0

func (a *API) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-ID")
		if id == "" || len(id) > 128 {
			b := make([]byte, 8)
			_, _ = rand.Read(b)
			id = hex.EncodeToString(b)
		}
		w.Header().Set("X-Request-ID", id)
		rw := &statusWriter{ResponseWriter: w, status: 200}
		start := time.Now()
		next.ServeHTTP(rw, r.WithContext(context.WithValue(r.Context(), requestIDKey, id)))
		a.logger.LogAttrs(r.Context(), slog.LevelInfo, "http",
			slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Int("status", rw.status),
			slog.Duration("took", time.Since(start)), slog.String("request_id", id))
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(s int) { w.status = s; w.ResponseWriter.WriteHeader(s) }

func meta(r *http.Request) domain.Metadata {
	id, _ := r.Context().Value(requestIDKey).(string)
	return domain.Metadata{CorrelationID: id, Actor: "api"}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	p := problemFor(err)
	if p.Status >= 500 {
		a.logger.ErrorContext(r.Context(), "request failed", "path", r.URL.Path, "err", err)
	}
	writeProblem(w, r, p)
}

type createDealRequest struct {
	Customer *domain.Customer `json:"customer"`
	Currency string           `json:"currency"`
	Lines    []domain.Line    `json:"lines"`
}

func (a *API) createDeal(w http.ResponseWriter, r *http.Request) {
	var req createDealRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if req.Customer == nil {
		a.fail(w, r, &domain.ValidationError{Field: "customer", Reason: "is required"})
		return
	}
	d, err := a.store.CreateDeal(r.Context(), *req.Customer, req.Currency, req.Lines, meta(r))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/api/v1/deals/"+d.ID)
	writeJSON(w, http.StatusCreated, d)
}

func (a *API) getDeal(w http.ResponseWriter, r *http.Request) {
	d, err := a.store.GetDeal(r.Context(), r.PathValue("id"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

type closeRequest struct {
	Outcome domain.Outcome `json:"outcome"`
	Version *int           `json:"version"`
}

func (a *API) closeDeal(w http.ResponseWriter, r *http.Request) {
	var req closeRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if req.Outcome != domain.OutcomeWon && req.Outcome != domain.OutcomeLost {
		a.fail(w, r, &domain.ValidationError{Field: "outcome", Reason: `must be "won" or "lost"`})
		return
	}
	d, err := a.store.CloseDeal(r.Context(), r.PathValue("id"), req.Outcome, req.Version, meta(r))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

type inventoryRequest struct {
	Available *int64 `json:"available"`
}

func (a *API) setInventory(w http.ResponseWriter, r *http.Request) {
	var req inventoryRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if req.Available == nil {
		a.fail(w, r, &domain.ValidationError{Field: "available", Reason: "is required"})
		return
	}
	v, err := a.store.SetInventory(r.Context(), r.PathValue("sku"), *req.Available, meta(r))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (a *API) getInventory(w http.ResponseWriter, r *http.Request) {
	v, err := a.store.GetInventory(r.Context(), r.PathValue("sku"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (a *API) ready(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := a.pool.Ping(ctx); err != nil {
		writeProblem(w, r, Problem{Status: http.StatusServiceUnavailable, Detail: "database unreachable"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}
