package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/erp/erpsim"
	"github.com/dealbridge/dealbridge/outbox"
)

// Verdicts. The first five are the allowed end states; the rest fail the
// run (reliability.md §3).
const (
	VInvoiced     = "invoiced"            // acknowledged, exactly one ERP invoice, recorded
	VRecovered    = "recovered"           // outcome unknown to the CRM, committed, invoiced exactly once
	VReinjected   = "invoiced-reinjected" // compensated, re-injected by an operator, then invoiced exactly once
	VCompensated  = "compensated"         // reverted + alert + dead letter, no ERP invoice
	VNotClosed    = "not-closed"          // no close committed (definite failures, or unknown and not committed), no invoice
	VClosedLost   = "closed-lost"         // closed as lost, no invoice
	VLost         = "lost"                // acknowledged or committed, neither invoiced nor compensated, and no trace downstream of the outbox (no work-queue row, no attempt)
	VDuplicated   = "duplicated"          // more than one ERP invoice for the deal or for one key
	VBoth         = "both"                // an ERP invoice AND compensated
	VStuck        = "stuck"               // not terminal after the drain, something still in flight
	VUnexpected   = "unexpected"          // an ERP invoice for a deal never (maybe) closed as won, or two closes acknowledged
	VInconsistent = "inconsistent"        // terminal, but the service's records contradict each other
)

var failing = []string{VLost, VDuplicated, VBoth, VStuck, VUnexpected, VInconsistent}

// Violation is one deal whose end state is not allowed.
type Violation struct {
	Deal    int    `json:"deal"`
	DealID  string `json:"deal_id"`
	Verdict string `json:"verdict"`
	Detail  string `json:"detail"`
}

// Invariant is one structural check.
type Invariant struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	// Warn marks a finding that does not fail the run.
	Warn bool `json:"warn,omitempty"`
}

// CheckResult is the checker's output.
type CheckResult struct {
	Counts      map[string]int  `json:"counts"`
	Verdicts    map[int]string  `json:"-"`
	Violations  []Violation     `json:"violations"`
	Invariants  []Invariant     `json:"invariants"`
	Acked       int             `json:"acked"`
	Maybe       int             `json:"maybe"`
	Committed   int             `json:"committed"`
	Attempts    int             `json:"erp_attempts"`
	Creates     int             `json:"erp_creates"`
	Outcomes    map[string]int  `json:"erp_attempts_by_outcome"`
	Replay      string          `json:"replay"`
	ReplayOK    bool            `json:"replay_ok"`
	Terminal    map[int]float64 `json:"-"`
	CrashHits   map[string]int  `json:"crash_hits"`
	Unreferred  int             `json:"erp_invoices_without_deal"`
	PoisonFound int             `json:"poison_dead_letters"`
}

// Pass reports whether every count of a failing verdict and every
// invariant is clean.
func (c *CheckResult) Pass() bool {
	for _, v := range failing {
		if c.Counts[v] > 0 {
			return false
		}
	}
	for _, inv := range c.Invariants {
		if !inv.OK && !inv.Warn {
			return false
		}
	}
	return c.Unreferred == 0
}

type dbDeal struct {
	status, key, invoice, customer string
	updated                        time.Time
	won, lost, reverted, failed    int
	invoiceCreated, reinstated     int
	dls                            []dbDL
	alerts                         int
	sagaAttempts                   int
	sagaOpen                       bool
	queued                         int
}

type dbDL struct{ id, state, class string }

func (r *run) ledger() (erpsim.Ledger, error) {
	var l erpsim.Ledger
	var last error
	for range 100 {
		resp, err := http.Get(r.erpURL + "/_sim/ledger")
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&l)
			resp.Body.Close()
			if err == nil && resp.StatusCode == http.StatusOK {
				return l, nil
			}
			if err == nil {
				err = fmt.Errorf("GET /_sim/ledger: %s", resp.Status)
			}
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	return l, last
}

func (r *run) loadDB(ctx context.Context) (map[string]*dbDeal, error) {
	deals := map[string]*dbDeal{}
	rows, err := r.db.Query(ctx, `SELECT id::text, status, coalesce(idempotency_key, ''), coalesce(invoice_number, ''), customer_id, updated_at FROM deals`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var id string
		d := &dbDeal{}
		if err := rows.Scan(&id, &d.status, &d.key, &d.invoice, &d.customer, &d.updated); err != nil {
			rows.Close()
			return nil, err
		}
		deals[id] = d
	}
	rows.Close()
	get := func(id string) *dbDeal {
		if deals[id] == nil {
			deals[id] = &dbDeal{status: "absent"}
		}
		return deals[id]
	}
	rows, err = r.db.Query(ctx, `SELECT payload->>'deal_id', type, count(*) FROM events
		WHERE type IN ('DealWon', 'DealLost', 'DealReverted', 'InvoiceFailed', 'InvoiceCreated', 'DealReinstated') GROUP BY 1, 2`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var id, typ string
		var n int
		if err := rows.Scan(&id, &typ, &n); err != nil {
			rows.Close()
			return nil, err
		}
		d := get(id)
		switch typ {
		case "DealWon":
			d.won = n
		case "DealLost":
			d.lost = n
		case "DealReverted":
			d.reverted = n
		case "InvoiceFailed":
			d.failed = n
		case "InvoiceCreated":
			d.invoiceCreated = n
		case "DealReinstated":
			d.reinstated = n
		}
	}
	rows.Close()
	rows, err = r.db.Query(ctx, `SELECT id::text, coalesce(deal_id::text, ''), state, error_class FROM dead_letters`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var dl dbDL
		var deal string
		if err := rows.Scan(&dl.id, &deal, &dl.state, &dl.class); err != nil {
			rows.Close()
			return nil, err
		}
		if deal != "" {
			get(deal).dls = append(get(deal).dls, dl)
		}
	}
	rows.Close()
	rows, err = r.db.Query(ctx, `SELECT deal_id::text, count(*) FROM alerts WHERE kind = 'invoice_failed' AND deal_id IS NOT NULL GROUP BY 1`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			rows.Close()
			return nil, err
		}
		get(id).alerts = n
	}
	rows.Close()
	rows, err = r.db.Query(ctx, `SELECT deal_id::text, sum(attempts), bool_or(state NOT IN ('invoiced', 'compensated')) FROM invoice_sagas GROUP BY 1`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var id string
		var n int
		var open bool
		if err := rows.Scan(&id, &n, &open); err != nil {
			rows.Close()
			return nil, err
		}
		get(id).sagaAttempts, get(id).sagaOpen = n, open
	}
	rows.Close()
	rows, err = r.db.Query(ctx, `SELECT coalesce(ordering_key, ''), count(*) FROM work_queue GROUP BY 1`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			rows.Close()
			return nil, err
		}
		if id != "" {
			get(id).queued = n
		}
	}
	rows.Close()
	return deals, rows.Err()
}

// unrelayedDeals returns the deals whose invoice request is still in the
// outbox, not passed by the active relay.
func (r *run) unrelayedDeals(ctx context.Context) (map[string]bool, error) {
	q := `SELECT payload::text FROM watermill_outbox o WHERE NOT EXISTS (SELECT 1 FROM watermill_offsets_outbox c WHERE c.consumer_group = $1
		AND (o.transaction_id, o."offset") <= (c.last_processed_transaction_id, c.offset_acked))`
	args := []any{outbox.ConsumerGroup}
	if r.naive != nil {
		q, args = `SELECT payload::text FROM watermill_outbox WHERE "offset" > $1`, []any{r.naive.lastID.Load()}
	}
	rows, err := r.db.Query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	payloads, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, p := range payloads {
		if _, m, err := unwrap([]byte(p)); err == nil {
			var req struct {
				DealID string `json:"deal_id"`
			}
			if json.Unmarshal(m.Payload, &req) == nil {
				out[req.DealID] = true
			}
		}
	}
	return out, nil
}

// check classifies every deal from the generator's history, the service
// database and the ERP ledger, and runs the structural invariants.
func (r *run) check(ctx context.Context) (*CheckResult, error) {
	res := &CheckResult{Counts: map[string]int{}, Verdicts: map[int]string{}, Terminal: map[int]float64{}, Outcomes: map[string]int{}}
	led, err := r.ledger()
	if err != nil {
		return nil, fmt.Errorf("erp ledger: %w", err)
	}
	deals, err := r.loadDB(ctx)
	if err != nil {
		return nil, fmt.Errorf("service database: %w", err)
	}
	inflight, err := r.unrelayedDeals(ctx)
	if err != nil {
		return nil, err
	}
	res.Attempts, res.Creates = len(led.Attempts), len(led.Creates)
	createsByRef := map[string][]erpsim.Create{}
	createsByKey := map[string]int{}
	for _, c := range led.Creates {
		createsByRef[c.Reference] = append(createsByRef[c.Reference], c)
		createsByKey[c.Key]++
	}
	attemptsByRef := map[string]int{}
	for _, a := range led.Attempts {
		attemptsByRef[a.Reference]++
		res.Outcomes[a.Outcome]++
	}

	// The generator's view of each deal.
	type genDeal struct {
		id                     string
		wonOK, wonInfo, lostOK bool
		firstClose, ackAt      float64
	}
	gen := make([]genDeal, len(r.plans))
	for _, op := range r.hist.all() {
		g := &gen[op.Deal]
		if op.DealID != "" {
			g.id = op.DealID
		}
		if op.F != "close-won" && op.F != "close-lost" {
			continue
		}
		if g.firstClose == 0 {
			g.firstClose = op.Invoke
		}
		switch {
		case op.F == "close-won" && op.Type == "ok":
			g.wonOK, g.ackAt = true, op.Complete
		case op.F == "close-won" && op.Type == "info":
			g.wonInfo = true
		case op.F == "close-lost" && op.Type == "ok":
			g.lostOK = true
		}
	}
	known := map[string]bool{}
	for i, g := range gen {
		if g.id == "" {
			res.Verdicts[i] = VNotClosed
			res.Counts[VNotClosed]++
			continue
		}
		known[g.id] = true
		d := deals[g.id]
		if d == nil {
			d = &dbDeal{status: "absent"}
		}
		cr := createsByRef[g.id]
		if g.wonOK {
			res.Acked++
		} else if g.wonInfo {
			res.Maybe++
		}
		if d.won > 0 {
			res.Committed++
		}
		var openDL, resolvedDL int
		for _, dl := range d.dls {
			switch dl.state {
			case "open", "discarded":
				openDL++
			case "resolved":
				resolvedDL++
			}
		}
		dupKey := false
		for _, c := range cr {
			if createsByKey[c.Key] > 1 {
				dupKey = true
			}
		}
		required := g.wonOK || d.won > 0
		detail := fmt.Sprintf("CRM: won ok=%v info=%v, lost ok=%v; DB: status %s, DealWon %d, DealReverted %d, InvoiceFailed %d, InvoiceCreated %d, "+
			"dead letters %v, alerts %d, saga attempts %d open %v, queued %d, unrelayed %v; ERP: %d attempts, %d creates",
			g.wonOK, g.wonInfo, g.lostOK, d.status, d.won, d.reverted, d.failed, d.invoiceCreated, d.dls, d.alerts, d.sagaAttempts, d.sagaOpen,
			d.queued, inflight[g.id], attemptsByRef[g.id], len(cr))
		var v string
		switch {
		case g.wonOK && g.lostOK:
			v = VUnexpected
		case len(cr) > 0 && !g.wonOK && !g.wonInfo && d.won == 0:
			v = VUnexpected
		case len(cr) > 1 || dupKey:
			v = VDuplicated
		case len(cr) == 1 && (d.status == "reverted" || openDL > 0):
			v = VBoth
		case !required && len(cr) == 0:
			v = VNotClosed
			if g.lostOK || d.lost > 0 {
				v = VClosedLost
			}
		case len(cr) == 1 && d.status == "invoiced" && d.invoice == cr[0].Number && d.invoiceCreated == 1:
			switch {
			case resolvedDL > 0 && d.reinstated > 0:
				v = VReinjected
			case len(d.dls) > 0 || d.alerts > 0 || d.reverted > 0 && d.reinstated == 0:
				v = VInconsistent
			case g.wonOK:
				v = VInvoiced
			default:
				v = VRecovered
			}
		case len(cr) == 0 && d.status == "reverted" && d.reverted >= 1 && d.failed >= 1:
			if openDL == 1 && d.alerts >= 1 && !d.sagaOpen {
				v = VCompensated
			} else {
				v = VInconsistent
			}
		case d.sagaAttempts > 0 || d.queued > 0 || inflight[g.id] || attemptsByRef[g.id] > 0 || len(cr) > 0:
			v = VStuck
		default:
			v = VLost
		}
		res.Verdicts[i] = v
		res.Counts[v]++
		if d.updated.After(r.start) && (v == VInvoiced || v == VRecovered || v == VCompensated || v == VReinjected) {
			res.Terminal[i] = d.updated.Sub(r.start).Seconds()
		}
		if slices.Contains(failing, v) {
			res.Violations = append(res.Violations, Violation{Deal: i, DealID: g.id, Verdict: v, Detail: detail})
		}
	}
	for ref, cs := range createsByRef {
		if !known[ref] {
			res.Unreferred += len(cs)
			res.Violations = append(res.Violations, Violation{Deal: -1, DealID: ref, Verdict: VUnexpected,
				Detail: fmt.Sprintf("%d ERP invoice(s) for reference %q, which the generator never created", len(cs), ref)})
		}
	}
	sort.SliceStable(res.Violations, func(i, j int) bool { return res.Violations[i].Verdict < res.Violations[j].Verdict })
	res.Invariants = r.invariants(ctx, led)
	res.CrashHits = r.crashHits()
	res.Replay, res.ReplayOK = r.replayVerify(ctx)
	if res.Replay != "" {
		res.Invariants = append(res.Invariants, Invariant{Name: "replay --verify: projections rebuilt from the event log equal the live tables",
			OK: res.ReplayOK, Detail: res.Replay})
	}
	return res, nil
}

// invariants are the structural checks of reliability.md §3, by query.
func (r *run) invariants(ctx context.Context, led erpsim.Ledger) []Invariant {
	var out []Invariant
	q := func(name, sql string, args ...any) {
		var n int
		err := r.db.QueryRow(ctx, sql, args...).Scan(&n)
		inv := Invariant{Name: name, OK: err == nil && n == 0, Detail: fmt.Sprintf("%d violation(s)", n)}
		if err != nil {
			inv.Detail = err.Error()
		}
		out = append(out, inv)
	}
	n, _, err := r.unrelayed(ctx)
	out = append(out, Invariant{Name: "outbox: no committed row left behind the relay's cursor", OK: err == nil && n == 0,
		Detail: fmt.Sprintf("%d row(s) not relayed (%v)", n, err)})
	q("work queue empty after the drain", `SELECT count(*) FROM work_queue`)
	q("every saga terminal (invoiced or compensated)", `SELECT count(*) FROM invoice_sagas WHERE state NOT IN ('invoiced', 'compensated')`)
	q("event versions contiguous per stream", `SELECT count(*) FROM (SELECT stream_id FROM events GROUP BY stream_id
		HAVING max(stream_version) - min(stream_version) + 1 <> count(*)) x`)
	q("every compensated saga has a dead letter and an invoice_failed alert", `SELECT count(*) FROM invoice_sagas s WHERE s.state = 'compensated'
		AND (NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.idempotency_key = s.idempotency_key)
		  OR NOT EXISTS (SELECT 1 FROM alerts a WHERE a.idempotency_key = s.idempotency_key AND a.kind = 'invoice_failed'))`)
	q("every dead letter of a deal has an alert", `SELECT count(*) FROM dead_letters d WHERE d.deal_id IS NOT NULL
		AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.dead_letter_id = d.id)`)
	q("every dead-letter re-inject is audited (event count = audit rows)", `SELECT abs(
		(SELECT count(*) FROM events WHERE type = 'DeadLetterReinjected') -
		(SELECT count(*) FROM audit_log WHERE action = 'dead_letter.reinject'))`)
	q("inventory: allocated = quantities of won and invoiced deals", `SELECT abs(
		(SELECT coalesce(sum(allocated), 0) FROM inventory) -
		(SELECT coalesce(sum((l->>'quantity')::bigint), 0) FROM deals, jsonb_array_elements(lines) l WHERE status IN ('won', 'invoiced')))`)
	q("no deal invoiced twice in the service (InvoiceCreated per deal <= 1)", `SELECT count(*) FROM (SELECT payload->>'deal_id' FROM events
		WHERE type = 'InvoiceCreated' GROUP BY 1 HAVING count(*) > 1) x`)
	q("no alert of kind duplicate_invoice or compensation_failed", `SELECT count(*) FROM alerts WHERE kind NOT IN ('invoice_failed', 'poison_message', 'unreconciled_deal')`)

	perKey := map[string]int{}
	for _, c := range led.Creates {
		perKey[c.Key]++
	}
	worst := 0
	for _, n := range perKey {
		worst = max(worst, n)
	}
	out = append(out, Invariant{Name: "ERP: at most one create per idempotency key", OK: worst <= 1,
		Detail: fmt.Sprintf("%d keys, max %d create(s) per key, %d attempts", len(perKey), worst, len(led.Attempts))})

	r.mu.Lock()
	poison := slices.Clone(r.poisonIDs)
	malformed := slices.Clone(r.malformed)
	reinjects := slices.Clone(r.reinjects)
	r.mu.Unlock()
	if len(poison) > 0 {
		var found, distinct int
		_ = r.db.QueryRow(ctx, `SELECT count(*), count(DISTINCT message_uuid) FROM dead_letters WHERE message_uuid = ANY($1) AND error_class = 'poison'`,
			poison).Scan(&found, &distinct)
		out = append(out, Invariant{Name: "F12: every poison message dead-lettered (never dropped, never wedging the pipeline)",
			OK: distinct == len(poison), Detail: fmt.Sprintf("%d injected, %d dead-lettered", len(poison), distinct)})
		out = append(out, Invariant{Name: "F12 (finding, not a failure): one dead letter per poison message, even when it is delivered twice",
			OK: found == distinct, Warn: true, Detail: fmt.Sprintf("%d poison dead letters for %d messages", found, distinct)})
	}
	if len(malformed) > 0 {
		bad, rejected, unanswered := 0, 0, 0
		for _, c := range malformed {
			switch {
			case c == -1:
				unanswered++ // the API was down for the whole retry budget (another fault)
			case c >= 400 && c < 500:
				rejected++
			default:
				bad++
			}
		}
		out = append(out, Invariant{Name: "F12: malformed request bodies rejected with 4xx (never 2xx, never 5xx)", OK: bad == 0,
			Detail: fmt.Sprintf("%d sent: %d rejected with 4xx, %d accepted or 5xx, %d unanswered while the API was down", len(malformed), rejected, bad, unanswered)})
	}
	if len(reinjects) > 0 {
		bad := 0
		var errs []string
		for _, x := range reinjects {
			if x.Wins != 1 {
				bad++
			}
			errs = append(errs, x.Errors...)
		}
		out = append(out, Invariant{Name: "F15: of concurrent re-injects of one dead letter exactly one wins", OK: bad == 0,
			Detail: fmt.Sprintf("%d dead letters, %d with wins != 1; errors: %v", len(reinjects), bad, errs)})
	}
	return out
}

var hitRE = regexp.MustCompile(`crashpoint (\S+) hit \d+: SIGKILL`)

// crashHits counts the crash points that fired, from the process logs.
func (r *run) crashHits() map[string]int {
	out := map[string]int{}
	files, _ := filepath.Glob(filepath.Join(r.workDir, "logs", "*.log"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, m := range hitRE.FindAllStringSubmatch(string(b), -1) {
			out[m[1]]++
		}
	}
	return out
}

// replayVerify runs `dealbridge replay --verify` when the binary has it.
func (r *run) replayVerify(ctx context.Context) (string, bool) {
	if _, err := runOnce(ctx, r.cfg.Bin, nil, 30*time.Second, "replay", "--help"); err != nil {
		return "", false
	}
	out, err := runOnce(ctx, r.cfg.Bin, []string{"DATABASE_URL=" + r.directURL}, 5*time.Minute, "replay", "--verify")
	out = strings.TrimSpace(out)
	if len(out) > 1500 {
		out = out[:1500] + " …"
	}
	if err != nil {
		return fmt.Sprintf("%v: %s", err, out), false
	}
	return out, true
}
