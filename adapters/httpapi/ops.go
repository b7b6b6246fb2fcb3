package httpapi

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// ActorHeader names the operator performing an action. Until sessions and
// roles arrive with the dashboard, operator endpoints take the actor from
// this header and record it in the audit log.
const ActorHeader = "X-Dealbridge-Actor"

func (a *API) opsRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/v1/dead-letters", a.listDeadLetters)
	mux.HandleFunc("GET /api/v1/dead-letters/{id}", a.getDeadLetter)
	mux.HandleFunc("PUT /api/v1/dead-letters/{id}/payload", a.editDeadLetter)
	mux.HandleFunc("POST /api/v1/dead-letters/{id}/approve", a.approveDeadLetter)
	mux.HandleFunc("POST /api/v1/dead-letters/{id}/reinject", a.reinjectDeadLetter)
	mux.HandleFunc("POST /api/v1/dead-letters/{id}/discard", a.discardDeadLetter)
	mux.HandleFunc("POST /api/v1/dead-letters/bulk-reinject", a.bulkReinject)
	mux.HandleFunc("GET /api/v1/alerts", a.listAlerts)
	mux.HandleFunc("POST /api/v1/alerts/{id}/acknowledge", a.ackAlert)
	mux.HandleFunc("POST /api/v1/alerts/{id}/resolve", a.resolveAlert)
	mux.HandleFunc("GET /api/v1/audit", a.listAudit)
}

func (a *API) actor(r *http.Request) (postgres.Actor, error) {
	name := strings.TrimSpace(r.Header.Get(ActorHeader))
	if name == "" || len(name) > 100 {
		return postgres.Actor{}, &badRequest{field: ActorHeader, msg: "the " + ActorHeader + " header must name the operator"}
	}
	id, _ := r.Context().Value(requestIDKey).(string)
	return postgres.Actor{Name: name, Role: "operator", RequestID: id}, nil
}

func parseFilter(r *http.Request) (postgres.DeadLetterFilter, error) {
	q := r.URL.Query()
	f := postgres.DeadLetterFilter{
		State: q.Get("state"), ErrorClass: q.Get("error_class"), Reason: q.Get("reason"),
		DealID: q.Get("deal_id"), Topic: q.Get("topic"), Handler: q.Get("handler"),
	}
	for _, p := range []struct {
		name string
		t    *time.Time
	}{{"since", &f.Since}, {"until", &f.Until}} {
		if v := q.Get(p.name); v != "" {
			t, err := time.Parse(time.RFC3339, v)
			if err != nil {
				return f, &domain.ValidationError{Field: p.name, Reason: "must be an RFC 3339 time"}
			}
			*p.t = t
		}
	}
	return f, nil
}

func (a *API) listDeadLetters(w http.ResponseWriter, r *http.Request) {
	f, err := parseFilter(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	limit := 50
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			a.fail(w, r, &domain.ValidationError{Field: "limit", Reason: "must be a number"})
			return
		}
		limit = n
	}
	page, err := a.store.ListDeadLetters(r.Context(), f, postgres.Cursor(r.URL.Query().Get("cursor")), limit)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, page)
}

func (a *API) getDeadLetter(w http.ResponseWriter, r *http.Request) {
	d, err := a.store.GetDeadLetter(r.Context(), r.PathValue("id"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

type editRequest struct {
	Payload json.RawMessage `json:"payload"`
	Reason  string          `json:"reason"`
}

func (a *API) editDeadLetter(w http.ResponseWriter, r *http.Request) {
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var req editRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if len(req.Payload) == 0 {
		a.fail(w, r, &domain.ValidationError{Field: "payload", Reason: "is required"})
		return
	}
	rev, err := a.store.EditDeadLetter(r.Context(), r.PathValue("id"), req.Payload, req.Reason, actor)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rev)
}

func (a *API) approveDeadLetter(w http.ResponseWriter, r *http.Request) {
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.store.ApproveDeadLetter(r.Context(), r.PathValue("id"), actor); err != nil {
		a.fail(w, r, err)
		return
	}
	a.getDeadLetter(w, r)
}

type reasonRequest struct {
	Reason string `json:"reason"`
	NewKey bool   `json:"new_key"`
}

func (a *API) reinjectDeadLetter(w http.ResponseWriter, r *http.Request) {
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var req reasonRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	res, err := a.store.ReinjectDeadLetter(r.Context(), r.PathValue("id"), postgres.ReinjectOptions{Reason: req.Reason, NewKey: req.NewKey}, actor)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, res)
}

func (a *API) discardDeadLetter(w http.ResponseWriter, r *http.Request) {
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var req struct {
		Reason string `json:"reason"`
	}
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.store.DiscardDeadLetter(r.Context(), r.PathValue("id"), req.Reason, actor); err != nil {
		a.fail(w, r, err)
		return
	}
	a.getDeadLetter(w, r)
}

type bulkRequest struct {
	Filter    postgres.DeadLetterFilter `json:"filter"`
	Reason    string                    `json:"reason"`
	DryRun    bool                      `json:"dry_run"`
	PerSecond float64                   `json:"per_second"`
}

// bulkReinject plans (dry_run) or starts a bulk re-inject; the run itself
// continues in the background of this process, and can be resumed from the
// CLI (dlq bulk-reinject --resume) if the process stops.
func (a *API) bulkReinject(w http.ResponseWriter, r *http.Request) {
	var req bulkRequest
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if req.DryRun {
		plan, err := a.store.PlanBulkReinject(r.Context(), req.Filter)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, plan)
		return
	}
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	op, total, err := a.store.StartBulkReinject(r.Context(), req.Filter, req.Reason, actor)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	go func() {
		if _, err := a.store.RunBulkReinject(a.baseCtx, op, max(req.PerSecond, 0), 0, nil); err != nil {
			a.logger.Error("bulk re-inject stopped", "operation", op, "err", err)
		}
	}()
	writeJSON(w, http.StatusAccepted, map[string]any{"operation_id": op, "total": total})
}

func (a *API) listAlerts(w http.ResponseWriter, r *http.Request) {
	state := r.URL.Query().Get("state")
	switch state {
	case "", "open", "acknowledged", "resolved":
	default:
		a.fail(w, r, &domain.ValidationError{Field: "state", Reason: "must be open, acknowledged or resolved"})
		return
	}
	alerts, err := a.store.ListAlerts(r.Context(), state, 500)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, alerts)
}

func (a *API) ackAlert(w http.ResponseWriter, r *http.Request) {
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.store.AcknowledgeAlert(r.Context(), r.PathValue("id"), actor); err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"id": r.PathValue("id"), "state": "acknowledged"})
}

func (a *API) resolveAlert(w http.ResponseWriter, r *http.Request) {
	actor, err := a.actor(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var req struct {
		Reason string `json:"reason"`
	}
	if err := decode(w, r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.store.ResolveAlert(r.Context(), r.PathValue("id"), req.Reason, actor); err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"id": r.PathValue("id"), "state": "resolved"})
}

func (a *API) listAudit(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit, _ := strconv.Atoi(q.Get("limit"))
	rows, err := a.store.ListAudit(r.Context(), postgres.AuditFilter{Actor: q.Get("actor"), Action: q.Get("action"),
		TargetType: q.Get("target_type"), TargetID: q.Get("target_id"), Limit: limit})
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rows)
}
