package dashboard

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

const maxForm = 1 << 20

// form parses a POST form of at most 1 MiB.
func form(w http.ResponseWriter, r *http.Request) error {
	r.Body = http.MaxBytesReader(w, r.Body, maxForm)
	return r.ParseForm()
}

// ---- alerts ----

type alertsData struct {
	State  string
	Alerts []postgres.AlertView
}

func (d *Dashboard) alerts(w http.ResponseWriter, r *http.Request) {
	state := r.URL.Query().Get("state")
	switch state {
	case "", "open", "acknowledged", "resolved":
	default:
		d.errorPage(w, r, http.StatusBadRequest, "state must be open, acknowledged or resolved")
		return
	}
	as, err := d.store.ListAlerts(r.Context(), state, 500)
	if err == nil && !unmasked(r) {
		err = httpapi.MaskAlerts(r.Context(), d.pool, as)
	}
	if err != nil {
		d.fail(w, r, err)
		return
	}
	d.render(w, r, http.StatusOK, "alerts", view{Title: "Alerts", Nav: "alerts", Data: alertsData{State: state, Alerts: as}})
}

func backTo(r *http.Request, def string) string {
	if b := r.PostFormValue("back"); b != "" {
		return safeNext(b)
	}
	return def
}

func (d *Dashboard) ackAlert(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	if err := d.store.AcknowledgeAlert(r.Context(), r.PathValue("id"), actor(r)); err != nil {
		d.fail(w, r, err)
		return
	}
	redirect(w, r, backTo(r, "/alerts"), "acknowledged")
}

func (d *Dashboard) resolveAlert(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	if err := d.store.ResolveAlert(r.Context(), r.PathValue("id"), r.PostFormValue("reason"), actor(r)); err != nil {
		d.fail(w, r, err)
		return
	}
	redirect(w, r, backTo(r, "/alerts"), "resolved")
}

// ---- dead letters ----

type deadLettersData struct {
	Filter  postgres.DeadLetterFilter
	Page    postgres.DeadLetterPage
	Query   string // the filter as a query string, for the next page link
	Classes []string
	Plan    *postgres.BulkPlan
	Masked  bool
}

func filterFrom(v url.Values) postgres.DeadLetterFilter {
	return postgres.DeadLetterFilter{
		State: strings.TrimSpace(v.Get("state")), ErrorClass: strings.TrimSpace(v.Get("error_class")),
		Reason: strings.TrimSpace(v.Get("reason")), DealID: strings.TrimSpace(v.Get("deal_id")),
	}
}

func filterQuery(f postgres.DeadLetterFilter) string {
	q := url.Values{}
	for k, v := range map[string]string{"state": f.State, "error_class": f.ErrorClass, "reason": f.Reason, "deal_id": f.DealID} {
		if v != "" {
			q.Set(k, v)
		}
	}
	return q.Encode()
}

var errorClasses = []string{"permanent", "exhausted", "poison"}

func (d *Dashboard) deadLetters(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := filterFrom(q)
	if _, ok := q["state"]; !ok {
		f.State = domain.DLStateOpen
	}
	page, err := d.store.ListDeadLetters(r.Context(), f, postgres.Cursor(q.Get("cursor")), 50)
	if err != nil {
		var verr *domain.ValidationError
		if errors.As(err, &verr) {
			d.render(w, r, http.StatusUnprocessableEntity, "deadletters", view{Title: "Dead letters", Nav: "dead-letters",
				Error: verr.Error(), Data: deadLettersData{Filter: f, Classes: errorClasses}})
			return
		}
		d.fail(w, r, err)
		return
	}
	masked := !unmasked(r)
	if masked {
		if err := httpapi.MaskDeadLetters(r.Context(), d.pool, page.Items); err != nil {
			d.fail(w, r, err)
			return
		}
	}
	d.render(w, r, http.StatusOK, "deadletters", view{Title: "Dead letters", Nav: "dead-letters",
		Data: deadLettersData{Filter: f, Page: page, Query: filterQuery(f), Classes: errorClasses, Masked: masked}})
}

type revisionView struct {
	domain.Revision
	Pretty string
	Diff   []diffLine
	Ops    []patchOp
}

type patchOp struct {
	Op, Path, Value string
}

type attemptView struct {
	Attempt    int
	At         time.Time
	ErrorClass string
	Status     int
	LatencyMS  int64 // -1: not recorded
	Message    string
	Final      bool
}

var httpStatusRE = regexp.MustCompile(`\(HTTP (\d{3})\)`)

// statusIn finds the ERP's HTTP status in an error text ("... (HTTP 422)
// ..."), 0 if none.
func statusIn(s string) int {
	m := httpStatusRE.FindStringSubmatch(s)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

type editForm struct {
	Payload string
	Reason  string
	Error   string
	Field   string
}

type deadLetterData struct {
	DL        postgres.DeadLetterDetail
	Pretty    string
	Revisions []revisionView
	Attempts  []attemptView
	Edit      editForm
	Masked    bool
	Open      bool
	// AwaitingApproval: the latest revision changes money and no second
	// admin approved it yet.
	AwaitingApproval bool
	LatestBy         string
}

func (d *Dashboard) loadDeadLetter(r *http.Request, id string) (*deadLetterData, error) {
	dl, err := d.store.GetDeadLetter(r.Context(), id)
	if err != nil {
		return nil, err
	}
	masked := !unmasked(r)
	if masked {
		httpapi.MaskDeadLetterDetail(&dl)
		if dl.DealID != nil {
			cs, err := httpapi.DealCustomers(r.Context(), d.pool, []string{*dl.DealID})
			if err != nil {
				return nil, err
			}
			dl.Reason = auth.MaskText(dl.Reason, cs[*dl.DealID]...)
			for i := range dl.AttemptHistory {
				dl.AttemptHistory[i].Payload = auth.MaskJSONText(dl.AttemptHistory[i].Payload, cs[*dl.DealID]...)
			}
		}
	}
	data := &deadLetterData{DL: dl, Masked: masked, Open: dl.State == domain.DLStateOpen}
	if dl.Payload != nil {
		data.Pretty = prettyJSON(dl.Payload)
	} else if dl.PayloadText != nil {
		data.Pretty = *dl.PayloadText
	}
	prev := ""
	for i, rev := range dl.Revisions {
		rv := revisionView{Revision: rev, Pretty: prettyJSON(rev.Payload)}
		if i > 0 {
			rv.Diff = lineDiff(prev, rv.Pretty)
			var ops []map[string]any
			if json.Unmarshal(rev.Patch, &ops) == nil {
				for _, op := range ops {
					v, _ := json.Marshal(op["value"])
					if _, ok := op["value"]; !ok {
						v = nil
					}
					o, _ := op["op"].(string)
					p, _ := op["path"].(string)
					rv.Ops = append(rv.Ops, patchOp{Op: o, Path: p, Value: string(v)})
				}
			}
		}
		prev = rv.Pretty
		data.Revisions = append(data.Revisions, rv)
	}
	if n := len(dl.Revisions); n > 0 {
		latest := dl.Revisions[n-1]
		data.AwaitingApproval = latest.NeedsApproval && latest.ApprovedBy == ""
		data.LatestBy = latest.Actor
	}
	for _, e := range dl.AttemptHistory {
		var a domain.InvoiceAttemptFailed
		if json.Unmarshal(e.Payload, &a) != nil {
			continue
		}
		data.Attempts = append(data.Attempts, attemptView{Attempt: a.Attempt, At: a.AttemptedAt, ErrorClass: string(a.ErrorClass),
			Status: a.StatusCode, LatencyMS: a.LatencyMS, Message: a.Message, Final: a.Final})
	}
	// Logs written before the final attempt was recorded as an event know
	// it only from the dead letter (its reason names the ERP's status).
	if dl.Attempts > len(data.Attempts) {
		data.Attempts = append(data.Attempts, attemptView{Attempt: dl.Attempts, At: dl.LastFailureAt, ErrorClass: dl.ErrorClass,
			Status: statusIn(dl.Reason), LatencyMS: -1, Message: dl.Reason, Final: true})
	}
	data.Edit.Payload = data.Pretty
	return data, nil
}

func (d *Dashboard) deadLetter(w http.ResponseWriter, r *http.Request) {
	data, err := d.loadDeadLetter(r, r.PathValue("id"))
	if err != nil {
		d.fail(w, r, err)
		return
	}
	d.render(w, r, http.StatusOK, "deadletter", view{Title: "Dead letter " + data.DL.ID[:8], Nav: "dead-letters", Data: data})
}

// editDeadLetter saves a new revision; a validation error re-renders the
// page with the form as submitted and the error next to the field.
func (d *Dashboard) editDeadLetter(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form (at most 1 MiB)")
		return
	}
	id := r.PathValue("id")
	payload, reason := r.PostFormValue("payload"), r.PostFormValue("reason")
	rev, err := d.store.EditDeadLetter(r.Context(), id, []byte(payload), reason, actor(r))
	if err != nil {
		var verr *domain.ValidationError
		if !errors.As(err, &verr) {
			p := httpapi.ProblemFor(err)
			if p.Status >= 500 {
				d.fail(w, r, err)
				return
			}
		}
		data, lerr := d.loadDeadLetter(r, id)
		if lerr != nil {
			d.fail(w, r, lerr)
			return
		}
		p := httpapi.ProblemFor(err)
		data.Edit = editForm{Payload: payload, Reason: reason, Error: p.Detail, Field: p.Field}
		d.render(w, r, p.Status, "deadletter", view{Title: "Dead letter " + data.DL.ID[:8], Nav: "dead-letters", Data: data})
		return
	}
	done := "edited"
	if rev.NeedsApproval {
		done = "edited-approval"
	}
	redirect(w, r, "/dead-letters/"+id, done)
}

func (d *Dashboard) approveDeadLetter(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	id := r.PathValue("id")
	if err := d.store.ApproveDeadLetter(r.Context(), id, actor(r)); err != nil {
		d.fail(w, r, err)
		return
	}
	redirect(w, r, "/dead-letters/"+id, "approved")
}

func (d *Dashboard) reinjectDeadLetter(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	id := r.PathValue("id")
	reason := r.PostFormValue("reason")
	if strings.TrimSpace(reason) == "" {
		reason = "re-injected from the dashboard"
	}
	res, err := d.store.ReinjectDeadLetter(r.Context(), id, postgres.ReinjectOptions{Reason: reason, NewKey: r.PostFormValue("new_key") == "on"}, actor(r))
	if err != nil {
		d.fail(w, r, err)
		return
	}
	if r.PostFormValue("then") == "deal" && res.DealID != "" {
		redirect(w, r, "/deals/"+res.DealID, "reinjected")
		return
	}
	redirect(w, r, "/dead-letters/"+id, "reinjected")
}

func (d *Dashboard) discardDeadLetter(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	id := r.PathValue("id")
	if err := d.store.DiscardDeadLetter(r.Context(), id, r.PostFormValue("reason"), actor(r)); err != nil {
		d.fail(w, r, err)
		return
	}
	redirect(w, r, "/dead-letters/"+id, "discarded")
}

// bulkReinject plans (the first step: how many, by class) and, once
// confirmed with a reason, starts a bulk re-inject of the open entries the
// filter selects. The run continues in the background of this process and
// can be resumed from the CLI.
func (d *Dashboard) bulkReinject(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	f := filterFrom(r.PostForm)
	f.Reason = strings.TrimSpace(r.PostFormValue("filter_reason")) // "reason" is the audited one
	f.State = domain.DLStateOpen
	if r.PostFormValue("confirm") != "yes" {
		plan, err := d.store.PlanBulkReinject(r.Context(), f)
		if err != nil {
			d.fail(w, r, err)
			return
		}
		d.render(w, r, http.StatusOK, "bulk", view{Title: "Bulk re-inject", Nav: "dead-letters",
			Data: deadLettersData{Filter: f, Plan: &plan, Query: filterQuery(f)}})
		return
	}
	rate, _ := strconv.ParseFloat(r.PostFormValue("per_second"), 64)
	op, _, err := d.store.StartBulkReinject(r.Context(), f, r.PostFormValue("reason"), actor(r))
	if err != nil {
		d.fail(w, r, err)
		return
	}
	go func() {
		if _, err := d.store.RunBulkReinject(d.cfg.BaseContext, op, max(rate, 0), 0, nil); err != nil {
			d.log.Error("bulk re-inject stopped", "operation", op, "err", err)
		}
	}()
	redirect(w, r, "/audit?operation="+url.QueryEscape(op), "bulk")
}

// ---- audit ----

type auditData struct {
	Filter postgres.AuditFilter
	Rows   []postgres.AuditEntry
	Op     string
}

func (d *Dashboard) audit(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := postgres.AuditFilter{Actor: strings.TrimSpace(q.Get("actor")), Action: strings.TrimSpace(q.Get("action")),
		TargetType: strings.TrimSpace(q.Get("target_type")), TargetID: strings.TrimSpace(q.Get("target_id")), Limit: 200}
	if n, err := strconv.Atoi(q.Get("limit")); err == nil && n > 0 && n <= 2000 {
		f.Limit = n
	}
	rows, err := d.store.ListAudit(r.Context(), f)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	op := q.Get("operation")
	if op != "" {
		kept := rows[:0]
		for _, a := range rows {
			if a.OperationID != nil && *a.OperationID == op {
				kept = append(kept, a)
			}
		}
		rows = kept
	}
	if !unmasked(r) {
		for i := range rows {
			rows[i].Diff = auth.MaskJSON(rows[i].Diff)
		}
	}
	d.render(w, r, http.StatusOK, "audit", view{Title: "Audit log", Nav: "audit", Data: auditData{Filter: f, Rows: rows, Op: op}})
}

// ---- users ----

type usersData struct {
	Users       []auth.User
	NewName     string
	NewPassword string
	FormError   string
}

func (d *Dashboard) users(w http.ResponseWriter, r *http.Request) {
	d.renderUsers(w, r, http.StatusOK, usersData{})
}

func (d *Dashboard) renderUsers(w http.ResponseWriter, r *http.Request, status int, data usersData) {
	us, err := d.auth.ListUsers(r.Context())
	if err != nil {
		d.fail(w, r, err)
		return
	}
	data.Users = us
	d.render(w, r, status, "users", view{Title: "Users", Nav: "users", Data: data})
}

// addUser creates a user with a generated password, shown once on the
// answer (never put in a URL).
func (d *Dashboard) addUser(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	name := strings.TrimSpace(r.PostFormValue("name"))
	role, err := auth.ParseRole(r.PostFormValue("role"))
	if err != nil {
		d.renderUsers(w, r, http.StatusUnprocessableEntity, usersData{FormError: err.Error()})
		return
	}
	pw := auth.GeneratePassword()
	if _, err := d.auth.AddUser(r.Context(), name, role, pw, who(r)); err != nil {
		if errors.Is(err, auth.ErrUserExists) || errors.As(err, new(*domain.ValidationError)) {
			d.renderUsers(w, r, http.StatusUnprocessableEntity, usersData{FormError: err.Error()})
			return
		}
		d.fail(w, r, err)
		return
	}
	d.renderUsers(w, r, http.StatusOK, usersData{NewName: name, NewPassword: pw})
}

func (d *Dashboard) resetPassword(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	name := r.PathValue("name")
	pw := auth.GeneratePassword()
	if err := d.auth.SetPassword(r.Context(), name, pw, who(r)); err != nil {
		d.fail(w, r, err)
		return
	}
	d.renderUsers(w, r, http.StatusOK, usersData{NewName: name, NewPassword: pw})
}

func (d *Dashboard) userFail(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, auth.ErrLastAdmin) {
		d.renderUsers(w, r, http.StatusConflict, usersData{FormError: err.Error() + ": add or enable another admin first"})
		return
	}
	d.fail(w, r, err)
}

func (d *Dashboard) setRole(w http.ResponseWriter, r *http.Request) {
	if err := form(w, r); err != nil {
		d.errorPage(w, r, http.StatusBadRequest, "malformed form")
		return
	}
	role, err := auth.ParseRole(r.PostFormValue("role"))
	if err != nil {
		d.renderUsers(w, r, http.StatusUnprocessableEntity, usersData{FormError: err.Error()})
		return
	}
	if err := d.auth.SetRole(r.Context(), r.PathValue("name"), role, who(r)); err != nil {
		d.userFail(w, r, err)
		return
	}
	redirect(w, r, "/users", "role")
}

func (d *Dashboard) disableUser(w http.ResponseWriter, r *http.Request) {
	if err := d.auth.SetDisabled(r.Context(), r.PathValue("name"), true, who(r)); err != nil {
		d.userFail(w, r, err)
		return
	}
	redirect(w, r, "/users", "disabled")
}

func (d *Dashboard) enableUser(w http.ResponseWriter, r *http.Request) {
	if err := d.auth.SetDisabled(r.Context(), r.PathValue("name"), false, who(r)); err != nil {
		d.userFail(w, r, err)
		return
	}
	redirect(w, r, "/users", "enabled")
}
