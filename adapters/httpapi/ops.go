package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

func (a *API) opsRoutes(mux *http.ServeMux) {
	// Deny by default: every operator route states the least role it needs,
	// checked on the server whatever the dashboard shows.
	route := func(pattern string, min auth.Role, h http.HandlerFunc) {
		mux.HandleFunc(pattern, auth.Require(min, deny, h))
	}
	route("GET /api/v1/dead-letters", auth.RoleViewer, a.listDeadLetters)
	route("GET /api/v1/dead-letters/{id}", auth.RoleViewer, a.getDeadLetter)
	route("PUT /api/v1/dead-letters/{id}/payload", auth.RoleAdmin, a.editDeadLetter)
	route("POST /api/v1/dead-letters/{id}/approve", auth.RoleAdmin, a.approveDeadLetter)
	route("POST /api/v1/dead-letters/{id}/reinject", auth.RoleOperator, a.reinjectDeadLetter)
	route("POST /api/v1/dead-letters/{id}/discard", auth.RoleOperator, a.discardDeadLetter)
	route("POST /api/v1/dead-letters/bulk-reinject", auth.RoleOperator, a.bulkReinject)
	route("GET /api/v1/alerts", auth.RoleViewer, a.listAlerts)
	route("POST /api/v1/alerts/{id}/acknowledge", auth.RoleOperator, a.ackAlert)
	route("POST /api/v1/alerts/{id}/resolve", auth.RoleOperator, a.resolveAlert)
	route("GET /api/v1/audit", auth.RoleViewer, a.listAudit)
}

// actor is the authenticated user behind the request, as the audit log
// records it. The routes are registered through auth.Require, so a
// principal with a role is always there.
func (a *API) actor(r *http.Request) (postgres.Actor, error) {
	p, ok := auth.FromContext(r.Context())
	if !ok || !p.Role.Valid() {
		return postgres.Actor{}, &badRequest{status: http.StatusUnauthorized, msg: "not authenticated"}
	}
	id, _ := r.Context().Value(requestIDKey).(string)
	return postgres.Actor{Name: p.Name, Role: string(p.Role), RequestID: id}, nil
}

// unmasked reports whether the caller may see customer fields.
func unmasked(r *http.Request) bool {
	p, ok := auth.FromContext(r.Context())
	return ok && p.CanSeePII()
}

// MaskDeadLetter hides the customer fields of v from a viewer, also where
// the reason quotes them.
func MaskDeadLetter(v *postgres.DeadLetterView) {
	v.Reason = auth.MaskText(v.Reason, auth.CustomerValues(v.Payload)...)
	v.Payload = auth.MaskJSON(v.Payload)
	if v.PayloadText != nil {
		t := "(hidden from viewers)"
		v.PayloadText = &t
	}
}

// MaskDeadLetterDetail hides the customer fields of d (payload, revisions,
// patches, events, and free text quoting them) from a viewer.
func MaskDeadLetterDetail(d *postgres.DeadLetterDetail) {
	docs := []json.RawMessage{d.Payload}
	for _, r := range d.Revisions {
		docs = append(docs, r.Payload)
	}
	vals := auth.CustomerValues(docs...)
	MaskDeadLetter(&d.DeadLetterView)
	d.Reason = auth.MaskText(d.Reason, vals...)
	for i := range d.Revisions {
		d.Revisions[i].Payload = auth.MaskJSON(d.Revisions[i].Payload)
		d.Revisions[i].Patch = auth.MaskJSON(d.Revisions[i].Patch)
		d.Revisions[i].Reason = auth.MaskText(d.Revisions[i].Reason, vals...)
	}
	for _, evs := range [][]postgres.EventView{d.History, d.AttemptHistory} {
		for i := range evs {
			evs[i].Payload = auth.MaskJSONText(auth.MaskJSON(evs[i].Payload), vals...)
		}
	}
}

// DealCustomers returns the customer id and name of each deal, for masking
// free text (reasons, alert messages) that quotes them.
func DealCustomers(ctx context.Context, pool *pgxpool.Pool, dealIDs []string) (map[string][]string, error) {
	out := map[string][]string{}
	if len(dealIDs) == 0 {
		return out, nil
	}
	rows, err := pool.Query(ctx, `SELECT id::text, customer_id, customer_name FROM deals WHERE id::text = ANY($1)`, dealIDs)
	if err != nil {
		return nil, fmt.Errorf("cannot read deal customers: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id, cid, name string
		if err := rows.Scan(&id, &cid, &name); err != nil {
			return nil, err
		}
		out[id] = []string{cid, name}
	}
	return out, rows.Err()
}

// MaskDeadLetters masks a page of dead letters for a viewer, including the
// deal's customer where a reason quotes it.
func MaskDeadLetters(ctx context.Context, pool *pgxpool.Pool, items []postgres.DeadLetterView) error {
	var ids []string
	for _, it := range items {
		if it.DealID != nil {
			ids = append(ids, *it.DealID)
		}
	}
	cs, err := DealCustomers(ctx, pool, ids)
	if err != nil {
		return err
	}
	for i := range items {
		if items[i].DealID != nil {
			items[i].Reason = auth.MaskText(items[i].Reason, cs[*items[i].DealID]...)
		}
		MaskDeadLetter(&items[i])
	}
	return nil
}

// MaskAlerts masks the customer in alert messages for a viewer.
func MaskAlerts(ctx context.Context, pool *pgxpool.Pool, alerts []postgres.AlertView) error {
	var ids []string
	for _, a := range alerts {
		if a.DealID != nil {
			ids = append(ids, *a.DealID)
		}
	}
	cs, err := DealCustomers(ctx, pool, ids)
	if err != nil {
		return err
	}
	for i := range alerts {
		if alerts[i].DealID != nil {
			alerts[i].Message = auth.MaskText(alerts[i].Message, cs[*alerts[i].DealID]...)
		}
	}
	return nil
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
	if !unmasked(r) {
		if err := MaskDeadLetters(r.Context(), a.pool, page.Items); err != nil {
			a.fail(w, r, err)
			return
		}
	}
	writeJSON(w, http.StatusOK, page)
}

func (a *API) getDeadLetter(w http.ResponseWriter, r *http.Request) {
	d, err := a.store.GetDeadLetter(r.Context(), r.PathValue("id"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if !unmasked(r) {
		MaskDeadLetterDetail(&d)
		if d.DealID != nil {
			cs, err := DealCustomers(r.Context(), a.pool, []string{*d.DealID})
			if err != nil {
				a.fail(w, r, err)
				return
			}
			d.Reason = auth.MaskText(d.Reason, cs[*d.DealID]...)
		}
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
	if err == nil && !unmasked(r) {
		err = MaskAlerts(r.Context(), a.pool, alerts)
	}
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
	if !unmasked(r) {
		for i := range rows {
			rows[i].Diff = auth.MaskJSON(rows[i].Diff)
		}
	}
	writeJSON(w, http.StatusOK, rows)
}
