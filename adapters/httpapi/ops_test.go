package httpapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/httpapi"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
	"github.com/dealbridge/dealbridge/domain"
	"github.com/dealbridge/dealbridge/outbox"
)

// The operator API of dead letters, alerts and the audit log over real
// HTTP and a real Postgres: status codes, problem+json naming the field,
// the state guard under concurrent requests, maker-checker, the audit rows
// with the request id, and keyset listing.

type opsEnv struct {
	srv    *httptest.Server
	pool   *pgxpool.Pool
	store  *postgres.Store
	tokens map[string]string // user name → bearer API token
}

// Users of the operator API, by role.
var opsUsers = map[string]auth.Role{"alice": auth.RoleAdmin, "bob": auth.RoleAdmin, "olga": auth.RoleOperator, "vic": auth.RoleViewer}

func newOpsEnv(t *testing.T) *opsEnv {
	t.Helper()
	ctx := t.Context()
	pool := pgtest.NewPool(t)
	store := postgres.NewStore(pool)
	svc := auth.New(pool, auth.Config{})
	e := &opsEnv{pool: pool, store: store, tokens: map[string]string{}}
	setupBy := auth.Who{Name: "test-setup", Role: auth.RoleAdmin}
	for name, role := range opsUsers {
		if _, err := svc.AddUser(ctx, name, role, "correct horse battery staple", setupBy); err != nil {
			t.Fatal(err)
		}
		tok, err := svc.CreateToken(ctx, name, "ops test", setupBy)
		if err != nil {
			t.Fatal(err)
		}
		e.tokens[name] = tok
	}
	e.srv = httptest.NewServer(httpapi.New(store, slog.New(slog.DiscardHandler)).WithAuth(svc).Handler())
	t.Cleanup(e.srv.Close)
	if _, err := store.SetInventory(ctx, "SKU-1", 100_000, domain.Metadata{Actor: "test"}); err != nil {
		t.Fatal(err)
	}
	return e
}

type response struct {
	status int
	body   []byte
	header http.Header
}

func (r response) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("body %s: %v", r.body, err)
	}
}

// problem decodes a problem+json body.
func (r response) problem(t *testing.T) httpapi.Problem {
	t.Helper()
	var p httpapi.Problem
	r.json(t, &p)
	if p.Status != r.status {
		t.Errorf("problem status %d in a %d response", p.Status, r.status)
	}
	return p
}

// call sends body (a string, or anything else JSON-encoded; nil: none) as
// user (token; "" for none) with request id reqID ("" for none).
func (e *opsEnv) call(t *testing.T, user, reqID, method, path string, body any) response {
	t.Helper()
	r, err := e.tryCall(user, reqID, method, path, body)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (e *opsEnv) tryCall(user, reqID, method, path string, body any) (response, error) {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return response{}, err
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		return response{}, err
	}
	if user != "" {
		req.Header.Set("Authorization", "Bearer "+e.tokens[user])
	}
	if reqID != "" {
		req.Header.Set("X-Request-ID", reqID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, body: b, header: resp.Header}, err
}

type failedEntry struct {
	dealID, dlID, alertID string
	req                   domain.InvoiceRequest
}

// failedDeal makes a won deal whose invoice the ERP rejected: compensated
// through the store as the saga does it.
func (e *opsEnv) failedDeal(t *testing.T, customerID string) failedEntry {
	t.Helper()
	ctx := t.Context()
	m := domain.Metadata{Actor: "test"}
	d, err := e.store.CreateDeal(ctx, domain.Customer{ID: customerID, Name: "Globex"}, "USD",
		[]domain.Line{{SKU: "SKU-1", Description: "Widget", Quantity: 2, UnitPrice: "495.00"}}, m)
	if err != nil {
		t.Fatal(err)
	}
	if d, err = e.store.CloseDeal(ctx, d.ID, domain.OutcomeWon, nil, m); err != nil {
		t.Fatal(err)
	}
	req := domain.InvoiceRequest{DealID: d.ID, IdempotencyKey: *d.IdempotencyKey, CloseVersion: *d.CloseVersion,
		Customer: d.Customer, Currency: d.Currency, Lines: d.Lines, Total: d.Total}
	payload, _ := json.Marshal(req)
	now := time.Now()
	res, err := e.store.Compensate(ctx, req,
		postgres.Failure{ErrorClass: "permanent", Reason: "unknown customer " + customerID, Attempts: 1, FirstFailureAt: now, LastFailureAt: now},
		postgres.DeadLetterSource{MessageUUID: watermill.NewUUID(), Topic: outbox.InvoiceTopic, Handler: "invoice-saga", Payload: payload,
			Metadata: map[string]string{outbox.MetadataIdempotencyKey: req.IdempotencyKey}}, m)
	if err != nil {
		t.Fatal(err)
	}
	return failedEntry{dealID: d.ID, dlID: res.DeadLetterID, alertID: res.AlertID, req: req}
}

func editBody(t *testing.T, req domain.InvoiceRequest, reason string, mutate func(*domain.InvoiceRequest)) map[string]any {
	t.Helper()
	req.Lines = slices.Clone(req.Lines)
	if mutate != nil {
		mutate(&req)
	}
	p, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return map[string]any{"payload": json.RawMessage(p), "reason": reason}
}

func c1(r *domain.InvoiceRequest) { r.Customer.ID = "C-1" }

func discount(r *domain.InvoiceRequest) {
	r.Lines[0].UnitPrice = "400.00"
	r.Total = "800.00"
}

func (e *opsEnv) auditOf(t *testing.T, target string) []postgres.AuditEntry {
	t.Helper()
	rows, err := e.store.ListAudit(t.Context(), postgres.AuditFilter{TargetID: target, Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	slices.Reverse(rows)
	return rows
}

// writes counts the rows an operator action could write.
func (e *opsEnv) writes(t *testing.T) string {
	t.Helper()
	var s string
	err := e.pool.QueryRow(context.Background(), `SELECT format('%s events, %s outbox, %s audit, %s dead letters changed, %s alerts changed',
		(SELECT count(*) FROM events), (SELECT count(*) FROM watermill_outbox), (SELECT count(*) FROM audit_log),
		(SELECT coalesce(sum(version), 0) FROM dead_letters), (SELECT coalesce(sum(version), 0) FROM alerts))`).Scan(&s)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestOpsDoubleReinjectOverHTTP: two operators re-inject the same entry at
// once: one 202, one 409; only the winner's request is in the audit log.
func TestOpsDoubleReinjectOverHTTP(t *testing.T) {
	t.Parallel()
	e := newOpsEnv(t)
	const entries = 5
	var fes []failedEntry
	for range entries {
		fes = append(fes, e.failedDeal(t, "C-9"))
	}
	type result struct {
		user, reqID string
		r           response
		err         error
	}
	results := make([][2]result, entries)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, fe := range fes {
		for j, user := range []string{"olga", "bob"} {
			wg.Go(func() {
				reqID := fmt.Sprintf("race-%d-%s", i, user)
				<-start
				r, err := e.tryCall(user, reqID, "POST", "/api/v1/dead-letters/"+fe.dlID+"/reinject", map[string]string{"reason": "customer fixed"})
				results[i][j] = result{user, reqID, r, err}
			})
		}
	}
	close(start)
	wg.Wait()
	for i, fe := range fes {
		var winner *result
		for j := range results[i] {
			res := &results[i][j]
			if res.err != nil {
				t.Fatal(res.err)
			}
			switch res.r.status {
			case http.StatusAccepted:
				if winner != nil {
					t.Fatalf("entry %d: two winners", i)
				}
				winner = res
				var out postgres.ReinjectResult
				res.r.json(t, &out)
				if out.DeadLetterID != fe.dlID || out.IdempotencyKey != fe.req.IdempotencyKey || out.Count != 1 {
					t.Errorf("entry %d: result %+v", i, out)
				}
			case http.StatusConflict:
				if p := res.r.problem(t); p.Type != "https://dealbridge.dev/problems/state-conflict" || p.Field != "state" ||
					!strings.Contains(p.Detail, "reinjected") {
					t.Errorf("entry %d: loser's problem %+v", i, p)
				}
				if ct := res.r.header.Get("Content-Type"); ct != "application/problem+json" {
					t.Errorf("entry %d: loser's content type %q", i, ct)
				}
			default:
				t.Fatalf("entry %d: %s got %d %s", i, res.user, res.r.status, res.r.body)
			}
		}
		if winner == nil {
			t.Fatalf("entry %d: no winner: %v", i, results[i])
		}
		rows := e.auditOf(t, fe.dlID)
		if len(rows) != 1 || rows[0].Action != "dead_letter.reinject" || rows[0].Actor != winner.user ||
			rows[0].RequestID == nil || *rows[0].RequestID != winner.reqID {
			t.Errorf("entry %d: audit %+v, want one reinject row by the winner %s with request id %s", i, rows, winner.user, winner.reqID)
		}
	}
	var n int
	if err := e.pool.QueryRow(t.Context(), `SELECT count(*) FROM events WHERE type = $1`, domain.TypeDeadLetterReinjected).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != entries {
		t.Fatalf("%d DeadLetterReinjected events, want %d", n, entries)
	}
}

// TestOpsEditRefusalsNameTheField: every invalid edit is a 4xx whose
// problem names the field, and writes nothing.
func TestOpsEditRefusalsNameTheField(t *testing.T) {
	t.Parallel()
	e := newOpsEnv(t)
	fe := e.failedDeal(t, "C-9")
	path := "/api/v1/dead-letters/" + fe.dlID + "/payload"
	good := editBody(t, fe.req, "customer fixed", c1)
	goodPayload := string(good["payload"].(json.RawMessage))
	before := e.writes(t)
	cases := []struct {
		name   string
		user   string
		path   string
		body   any
		status int
		field  string
	}{
		{"total does not add up", "alice", path, editBody(t, fe.req, "fix", func(r *domain.InvoiceRequest) { r.Total = "1.00" }), 422, "total"},
		{"bad customer id", "alice", path, editBody(t, fe.req, "fix", func(r *domain.InvoiceRequest) { r.Customer.ID = "C 9" }), 422, "customer.id"},
		{"bad quantity", "alice", path, editBody(t, fe.req, "fix", func(r *domain.InvoiceRequest) { r.Lines[0].Quantity = 0 }), 422, "lines[0].quantity"},
		{"bad currency", "alice", path, editBody(t, fe.req, "fix", func(r *domain.InvoiceRequest) { r.Currency = "usd" }), 422, "currency"},
		{"changed key", "alice", path, editBody(t, fe.req, "fix", func(r *domain.InvoiceRequest) { r.IdempotencyKey += ":r9" }), 422, "idempotency_key"},
		{"unknown payload field", "alice", path, map[string]any{"reason": "fix",
			"payload": json.RawMessage(strings.Replace(goodPayload, `{`, `{"note":"x",`, 1))}, 422, "note"},
		{"payload not an object", "alice", path, `{"reason":"fix","payload":"a string"}`, 422, "payload"},
		{"no reason", "alice", path, editBody(t, fe.req, " ", c1), 422, "reason"},
		{"no payload", "alice", path, `{"reason":"fix"}`, 422, "payload"},
		{"unknown body field", "alice", path, `{"reason":"fix","payload":{},"force":true}`, 400, "force"},
		{"malformed body", "alice", path, `{"reason":`, 400, ""},
		{"unknown entry", "alice", "/api/v1/dead-letters/" + watermill.NewUUID() + "/payload", good, 404, ""},
		{"not an id", "alice", "/api/v1/dead-letters/nope/payload", good, 404, ""},
		{"no credentials", "", path, good, 401, ""},
		{"viewer", "vic", path, good, 403, ""},
	}
	for _, c := range cases {
		r := e.call(t, c.user, "", "PUT", c.path, c.body)
		if r.status != c.status {
			t.Errorf("%s: %d %s, want %d", c.name, r.status, r.body, c.status)
			continue
		}
		if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
			t.Errorf("%s: content type %q", c.name, ct)
		}
		if p := r.problem(t); c.field != "" && p.Field != c.field {
			t.Errorf("%s: problem %+v, want field %q", c.name, p, c.field)
		}
	}
	if after := e.writes(t); after != before {
		t.Fatalf("refused edits wrote: %s → %s", before, after)
	}

	// A good edit: 200 with the revision; the detail shows every revision.
	r := e.call(t, "alice", "edit-1", "PUT", path, good)
	if r.status != http.StatusOK {
		t.Fatalf("edit: %d %s", r.status, r.body)
	}
	var rev domain.Revision
	r.json(t, &rev)
	if rev.Number != 1 || rev.Actor != "alice" || rev.Reason != "customer fixed" || rev.NeedsApproval || !strings.Contains(string(rev.Patch), "/customer/id") {
		t.Fatalf("revision %+v", rev)
	}
	r = e.call(t, "alice", "edit-2", "PUT", path, editBody(t, fe.req, "name too", func(q *domain.InvoiceRequest) { c1(q); q.Customer.Name = "Globex Corp" }))
	if r.status != http.StatusOK {
		t.Fatalf("second edit: %d %s", r.status, r.body)
	}
	var det postgres.DeadLetterDetail
	r = e.call(t, "olga", "", "GET", "/api/v1/dead-letters/"+fe.dlID, nil)
	r.json(t, &det)
	if r.status != 200 || len(det.Revisions) != 3 || det.Revision != 2 || len(det.History) != 3 {
		t.Fatalf("detail after two edits: %d, %d revisions, revision %d, %d events", r.status, len(det.Revisions), det.Revision, len(det.History))
	}
	if !strings.Contains(string(det.Revisions[2].Patch), "/customer/id") || !strings.Contains(string(det.Revisions[2].Patch), "/customer/name") {
		t.Fatalf("revision 2 patch %s: want both changes against the original", det.Revisions[2].Patch)
	}
	rows := e.auditOf(t, fe.dlID)
	if len(rows) != 2 || rows[0].Action != "dead_letter.edit" || rows[0].Role != "admin" || rows[0].RequestID == nil || *rows[0].RequestID != "edit-1" ||
		len(rows[0].Diff) == 0 || rows[0].BeforeHash == nil || rows[0].AfterHash == nil || rows[0].Reason != "customer fixed" {
		t.Fatalf("audit of the edits: %+v", rows)
	}
}

// TestOpsMakerCheckerOverHTTP: a money edit blocks the re-inject (409)
// until another admin approves; self-approval is 403.
func TestOpsMakerCheckerOverHTTP(t *testing.T) {
	t.Parallel()
	e := newOpsEnv(t)
	if err := e.store.SetMakerChecker(t.Context(), true); err != nil {
		t.Fatal(err)
	}
	fe := e.failedDeal(t, "C-9")
	base := "/api/v1/dead-letters/" + fe.dlID
	r := e.call(t, "alice", "", "PUT", base+"/payload", editBody(t, fe.req, "agreed discount", func(q *domain.InvoiceRequest) { c1(q); discount(q) }))
	var rev domain.Revision
	r.json(t, &rev)
	if r.status != 200 || !rev.MoneyChanged || !rev.NeedsApproval {
		t.Fatalf("money edit: %d %+v", r.status, rev)
	}
	before := e.writes(t)
	r = e.call(t, "olga", "", "POST", base+"/reinject", map[string]string{"reason": "go"})
	if p := r.problem(t); r.status != 409 || p.Type != "https://dealbridge.dev/problems/approval-required" {
		t.Fatalf("re-inject before approval: %d %+v", r.status, p)
	}
	r = e.call(t, "alice", "", "POST", base+"/approve", nil)
	if p := r.problem(t); r.status != 403 || p.Type != "https://dealbridge.dev/problems/self-approval" || p.Field != "actor" {
		t.Fatalf("self-approval: %d %+v", r.status, p)
	}
	r = e.call(t, "olga", "", "POST", base+"/approve", nil)
	if r.status != 403 {
		t.Fatalf("approval by an operator (approving needs admin): %d %s", r.status, r.body)
	}
	if after := e.writes(t); after != before {
		t.Fatalf("refusals wrote: %s → %s", before, after)
	}
	r = e.call(t, "bob", "approve-1", "POST", base+"/approve", nil)
	var det postgres.DeadLetterDetail
	r.json(t, &det)
	if r.status != 200 || det.ApprovedBy == nil || *det.ApprovedBy != "bob" {
		t.Fatalf("approval: %d %s", r.status, r.body)
	}
	r = e.call(t, "bob", "", "POST", base+"/approve", nil)
	if p := r.problem(t); r.status != 409 || p.Field != "state" {
		t.Fatalf("second approval: %d %+v", r.status, p)
	}
	r = e.call(t, "olga", "reinject-1", "POST", base+"/reinject", map[string]string{"reason": "approved discount"})
	if r.status != http.StatusAccepted {
		t.Fatalf("re-inject after approval: %d %s", r.status, r.body)
	}
	got := []string{}
	for _, a := range e.auditOf(t, fe.dlID) {
		got = append(got, a.Actor+" "+a.Action+" "+deref(a.RequestID))
	}
	if want := []string{"alice dead_letter.edit ", "bob dead_letter.approve approve-1", "olga dead_letter.reinject reinject-1"}; len(got) != 3 ||
		!strings.HasPrefix(got[0], want[0]) || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("audit %q, want %q", got, want)
	}

	// A customer-only edit needs no approval.
	fe2 := e.failedDeal(t, "C-9")
	r = e.call(t, "alice", "", "PUT", "/api/v1/dead-letters/"+fe2.dlID+"/payload", editBody(t, fe2.req, "customer id", c1))
	r.json(t, &rev)
	if r.status != 200 || rev.MoneyChanged || rev.NeedsApproval {
		t.Fatalf("customer edit: %d %+v", r.status, rev)
	}
	if r = e.call(t, "alice", "", "POST", "/api/v1/dead-letters/"+fe2.dlID+"/reinject", map[string]string{"reason": "go"}); r.status != 202 {
		t.Fatalf("re-inject after a customer edit: %d %s", r.status, r.body)
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// TestOpsDiscardAndAlertsOverHTTP: discard needs a reason; a discarded
// entry is 409 for every further action; alerts are acknowledged and
// resolved with audit rows.
func TestOpsDiscardAndAlertsOverHTTP(t *testing.T) {
	t.Parallel()
	e := newOpsEnv(t)
	fe := e.failedDeal(t, "C-9")
	base := "/api/v1/dead-letters/" + fe.dlID
	if r := e.call(t, "olga", "", "POST", base+"/discard", map[string]string{"reason": ""}); r.status != 422 || r.problem(t).Field != "reason" {
		t.Fatalf("discard without reason: %d %s", r.status, r.body)
	}
	if r := e.call(t, "olga", "", "POST", base+"/reinject", map[string]string{}); r.status != 422 || r.problem(t).Field != "reason" {
		t.Fatalf("re-inject without reason: %d %s", r.status, r.body)
	}
	if r := e.call(t, "vic", "", "POST", base+"/discard", map[string]string{"reason": "x"}); r.status != 403 {
		t.Fatalf("discard by a viewer: %d %s", r.status, r.body)
	}
	r := e.call(t, "olga", "discard-1", "POST", base+"/discard", map[string]string{"reason": "customer left"})
	var det postgres.DeadLetterDetail
	r.json(t, &det)
	if r.status != 200 || det.State != domain.DLStateDiscarded {
		t.Fatalf("discard: %d %s", r.status, r.body)
	}
	before := e.writes(t)
	for _, c := range []struct{ method, path string }{
		{"POST", base + "/reinject"}, {"POST", base + "/discard"}, {"PUT", base + "/payload"},
	} {
		var body any = map[string]string{"reason": "again"}
		if c.method == "PUT" {
			body = editBody(t, fe.req, "again", c1)
		}
		if r := e.call(t, "alice", "", c.method, c.path, body); r.status != 409 || r.problem(t).Field != "state" {
			t.Errorf("%s %s of a discarded entry: %d %s, want 409", c.method, c.path, r.status, r.body)
		}
	}
	for _, p := range []string{"/api/v1/dead-letters/" + watermill.NewUUID() + "/reinject", "/api/v1/dead-letters/x/discard"} {
		if r := e.call(t, "alice", "", "POST", p, map[string]string{"reason": "x"}); r.status != 404 {
			t.Errorf("POST %s: %d, want 404", p, r.status)
		}
	}
	if after := e.writes(t); after != before {
		t.Fatalf("refusals wrote: %s → %s", before, after)
	}

	// Alerts.
	ap := "/api/v1/alerts/" + fe.alertID
	if r := e.call(t, "olga", "ack-1", "POST", ap+"/acknowledge", nil); r.status != 200 {
		t.Fatalf("acknowledge: %d %s", r.status, r.body)
	}
	if r := e.call(t, "olga", "", "POST", ap+"/acknowledge", nil); r.status != 409 {
		t.Fatalf("second acknowledge: %d %s", r.status, r.body)
	}
	if r := e.call(t, "olga", "", "POST", ap+"/resolve", map[string]string{"reason": ""}); r.status != 422 || r.problem(t).Field != "reason" {
		t.Fatalf("resolve without reason: %d %s", r.status, r.body)
	}
	if r := e.call(t, "olga", "resolve-1", "POST", ap+"/resolve", map[string]string{"reason": "deal lost anyway"}); r.status != 200 {
		t.Fatalf("resolve: %d %s", r.status, r.body)
	}
	var alerts []postgres.AlertView
	r = e.call(t, "vic", "", "GET", "/api/v1/alerts?state=resolved", nil)
	r.json(t, &alerts)
	if r.status != 200 || len(alerts) != 1 || alerts[0].ID != fe.alertID {
		t.Fatalf("resolved alerts: %d %s", r.status, r.body)
	}
	if r := e.call(t, "vic", "", "GET", "/api/v1/alerts?state=closed", nil); r.status != 422 || r.problem(t).Field != "state" {
		t.Fatalf("alerts with a bad state: %d %s", r.status, r.body)
	}

	// The audit log over HTTP: each action with its request id.
	var rows []postgres.AuditEntry
	r = e.call(t, "alice", "", "GET", "/api/v1/audit?target_id="+url.QueryEscape(fe.alertID), nil)
	r.json(t, &rows)
	if r.status != 200 || len(rows) != 2 || rows[0].Action != "alert.resolve" || deref(rows[0].RequestID) != "resolve-1" ||
		rows[1].Action != "alert.acknowledge" || deref(rows[1].RequestID) != "ack-1" || rows[0].Reason != "deal lost anyway" || rows[0].Role != "operator" {
		t.Fatalf("alert audit over HTTP: %d %s", r.status, r.body)
	}
	r = e.call(t, "alice", "", "GET", "/api/v1/audit?target_id="+fe.dlID+"&action=dead_letter.discard", nil)
	r.json(t, &rows)
	if len(rows) != 1 || rows[0].Actor != "olga" || deref(rows[0].RequestID) != "discard-1" || rows[0].Reason != "customer left" {
		t.Fatalf("discard audit over HTTP: %s", r.body)
	}
}

// TestOpsListingOverHTTP: filters as query parameters, keyset pages that
// return each entry once, and 422s that name the parameter.
func TestOpsListingOverHTTP(t *testing.T) {
	t.Parallel()
	e := newOpsEnv(t)
	var fes []failedEntry
	for i := range 7 {
		fes = append(fes, e.failedDeal(t, fmt.Sprintf("C-%d", 90+i)))
	}
	if r := e.call(t, "olga", "", "POST", "/api/v1/dead-letters/"+fes[0].dlID+"/discard", map[string]string{"reason": "dup"}); r.status != 200 {
		t.Fatal(r.status)
	}
	page := func(q string) (postgres.DeadLetterPage, response) {
		t.Helper()
		r := e.call(t, "olga", "", "GET", "/api/v1/dead-letters?"+q, nil)
		var p postgres.DeadLetterPage
		if r.status == 200 {
			r.json(t, &p)
		}
		return p, r
	}
	walk := func(q string, limit int) []string {
		t.Helper()
		var ids []string
		cursor := ""
		for range 100 {
			p, r := page(fmt.Sprintf("%s&limit=%d&cursor=%s", q, limit, url.QueryEscape(cursor)))
			if r.status != 200 {
				t.Fatalf("page: %d %s", r.status, r.body)
			}
			for _, it := range p.Items {
				ids = append(ids, it.ID)
			}
			if p.Next == "" {
				return ids
			}
			cursor = string(p.Next)
		}
		t.Fatal("pagination does not end")
		return nil
	}
	var newestFirst []string
	for i := len(fes) - 1; i >= 0; i-- {
		newestFirst = append(newestFirst, fes[i].dlID)
	}
	for _, limit := range []int{1, 2, 3, 50} {
		if got := walk("", limit); !slices.Equal(got, newestFirst) {
			t.Errorf("walk with limit %d: %v, want %v", limit, got, newestFirst)
		}
	}
	if got := walk("state=open", 2); !slices.Equal(got, newestFirst[:6]) {
		t.Errorf("open: %v", got)
	}
	if got := walk("state=discarded", 2); !slices.Equal(got, []string{fes[0].dlID}) {
		t.Errorf("discarded: %v", got)
	}
	if got := walk("deal_id="+fes[3].dealID, 2); !slices.Equal(got, []string{fes[3].dlID}) {
		t.Errorf("deal: %v", got)
	}
	if got := walk("reason="+url.QueryEscape("customer C-93"), 2); !slices.Equal(got, []string{fes[3].dlID}) {
		t.Errorf("reason text: %v", got)
	}
	if got := walk("error_class=permanent&topic="+outbox.InvoiceTopic+"&handler=invoice-saga", 4); !slices.Equal(got, newestFirst) {
		t.Errorf("class, topic and handler: %v", got)
	}
	if got := walk("topic=nope", 4); len(got) != 0 {
		t.Errorf("unknown topic: %v", got)
	}
	since := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	until := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if got := walk("since="+since+"&until="+until, 3); !slices.Equal(got, newestFirst) {
		t.Errorf("window around now: %v", got)
	}
	if got := walk("since="+until, 3); len(got) != 0 {
		t.Errorf("window in the future: %v", got)
	}
	for _, c := range []struct{ q, field string }{
		{"cursor=not-a-cursor", "cursor"},
		{"cursor=" + url.QueryEscape("MjAyNi0wMS0wMXxub3QtYS11dWlk"), "cursor"},
		{"limit=0", "limit"},
		{"limit=ten", "limit"},
		{"limit=5000", "limit"},
		{"state=lost", "state"},
		{"since=yesterday", "since"},
		{"until=2026-13-01T00:00:00Z", "until"},
		{"since=" + until + "&until=" + since, "until"},
		{"deal_id=123", "deal_id"},
	} {
		_, r := page(c.q)
		if r.status != 422 {
			t.Errorf("?%s: %d %s, want 422", c.q, r.status, r.body)
			continue
		}
		if p := r.problem(t); p.Field != c.field {
			t.Errorf("?%s: problem %+v, want field %q", c.q, p, c.field)
		}
	}
	if r := e.call(t, "", "", "GET", "/api/v1/dead-letters", nil); r.status != 401 {
		t.Errorf("listing without credentials: %d", r.status)
	}

	// The dry run of a bulk re-inject: the count by error class.
	r := e.call(t, "olga", "", "POST", "/api/v1/dead-letters/bulk-reinject", map[string]any{"dry_run": true, "filter": map[string]any{}})
	var plan postgres.BulkPlan
	r.json(t, &plan)
	if r.status != 200 || plan.Count != 6 || plan.ByErrorClass["permanent"] != 6 {
		t.Fatalf("dry run: %d %s", r.status, r.body)
	}
	if r := e.call(t, "olga", "", "POST", "/api/v1/dead-letters/bulk-reinject", map[string]any{"reason": "", "filter": map[string]any{}}); r.status != 422 ||
		r.problem(t).Field != "reason" {
		t.Fatalf("bulk without reason: %d %s", r.status, r.body)
	}
}
