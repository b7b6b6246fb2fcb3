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

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// API serves the HTTP endpoints.
type API struct {
	store   *postgres.Store
	pool    *pgxpool.Pool
	logger  *slog.Logger
	baseCtx context.Context // outlives requests: background work (bulk re-injects)
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

// Handler returns the HTTP handler with every route.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/deals", a.createDeal)
	mux.HandleFunc("GET /api/v1/deals/{id}", a.getDeal)
	mux.HandleFunc("POST /api/v1/deals/{id}/close", a.closeDeal)
	mux.HandleFunc("PUT /api/v1/inventory/{sku}", a.setInventory)
	mux.HandleFunc("GET /api/v1/inventory/{sku}", a.getInventory)
	a.opsRoutes(mux)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, map[string]string{"status": "ok"}) })
	mux.HandleFunc("GET /readyz", a.ready)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeProblem(w, r, Problem{Status: http.StatusNotFound, Detail: "no such endpoint: " + r.Method + " " + r.URL.Path})
	})
	return a.middleware(mux)
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
