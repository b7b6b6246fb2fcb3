package dashboard

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dealbridge/dealbridge/adapters/auth"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// entry is one line of a deal's timeline: an event of one of its streams or
// an audit row of an operator action on it.
type entry struct {
	At       time.Time
	Position int64 // events: global position; audit rows: 0
	Source   string
	Kind     string
	Summary  string
	Class    string // css: ok, fail, warn, op, info
	Actor    string
	Detail   string
	Link     string
}

type timelineData struct {
	Deal     postgres.DealView
	Customer domain.Customer
	Entries  []entry
	Alerts   []postgres.AlertView
	Dead     []postgres.DeadLetterView
	Masked   bool
}

func (d *Dashboard) findDeal(w http.ResponseWriter, r *http.Request) {
	id := strings.TrimSpace(r.URL.Query().Get("id"))
	if id == "" {
		d.errorPage(w, r, http.StatusBadRequest, "Give a deal id.")
		return
	}
	http.Redirect(w, r, "/deals/"+id, http.StatusSeeOther)
}

func (d *Dashboard) timeline(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	id := r.PathValue("id")
	deal, err := d.store.GetDeal(ctx, id)
	if err != nil {
		d.fail(w, r, fmt.Errorf("deal %s: %w", id, err))
		return
	}
	masked := !unmasked(r)
	data := timelineData{Deal: deal, Customer: deal.Customer, Masked: masked}
	if masked {
		data.Customer = domain.Customer{ID: auth.MaskString(deal.Customer.ID), Name: auth.MaskString(deal.Customer.Name)}
	}
	// Everything that belongs to the deal: its own stream, every saga of
	// it (invoice-K, one per key), its alerts and dead letters, and the
	// inventory movements made for it.
	streams := []string{domain.DealStream(id)}
	var alertIDs, dlIDs []string
	rows, err := d.pool.Query(ctx, `SELECT 'invoice-' || idempotency_key FROM invoice_sagas WHERE deal_id = $1
		UNION SELECT 'invoice-' || idempotency_key FROM dead_letters WHERE deal_id = $1 AND idempotency_key IS NOT NULL`, id)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	sagas, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		d.fail(w, r, err)
		return
	}
	streams = append(streams, sagas...)
	all, err := d.store.ListAlerts(ctx, "", 10000)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	for _, a := range all {
		if a.DealID != nil && *a.DealID == id {
			data.Alerts = append(data.Alerts, a)
			alertIDs = append(alertIDs, a.ID)
			streams = append(streams, domain.AlertStream(a.ID))
		}
	}
	page, err := d.store.ListDeadLetters(ctx, postgres.DeadLetterFilter{DealID: id}, "", 1000)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	data.Dead = page.Items
	for _, dl := range page.Items {
		dlIDs = append(dlIDs, dl.ID)
		streams = append(streams, domain.DeadLetterStream(dl.ID))
	}
	rows, err = d.pool.Query(ctx, `SELECT position, stream_id, type, payload, metadata->>'actor', recorded_at FROM events
		WHERE stream_id = ANY($1)
		   OR (type IN ('InventoryAllocated', 'InventoryReleased') AND payload->>'deal_id' = $2)
		ORDER BY position`, streams, id)
	if err != nil {
		d.fail(w, r, err)
		return
	}
	for rows.Next() {
		var (
			e       entry
			stream  string
			payload []byte
			actor   *string
		)
		if err := rows.Scan(&e.Position, &stream, &e.Kind, &payload, &actor, &e.At); err != nil {
			rows.Close()
			d.fail(w, r, err)
			return
		}
		if actor != nil {
			e.Actor = *actor
		}
		describe(&e, stream, payload)
		if masked {
			e.Summary = maskCustomer(e.Summary, deal.Customer)
			e.Detail = prettyJSON(auth.MaskJSONText(auth.MaskJSON(payload), deal.Customer.ID, deal.Customer.Name))
		} else {
			e.Detail = prettyJSON(payload)
		}
		data.Entries = append(data.Entries, e)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		d.fail(w, r, err)
		return
	}
	targets := append(append([]string{id}, alertIDs...), dlIDs...)
	for _, t := range targets {
		as, err := d.store.ListAudit(ctx, postgres.AuditFilter{TargetID: t, Limit: 1000})
		if err != nil {
			d.fail(w, r, err)
			return
		}
		for _, a := range as {
			e := entry{At: a.At, Source: "operator", Kind: a.Action, Actor: a.Actor + " (" + a.Role + ")", Class: "op",
				Summary: a.Actor + " (" + a.Role + "): " + a.Action + " " + a.TargetType + " " + short(a.TargetID)}
			if a.Reason != "" {
				e.Summary += " — " + a.Reason
			}
			if len(a.Diff) > 0 {
				diff := a.Diff
				if masked {
					diff = auth.MaskJSONText(auth.MaskJSON(diff), deal.Customer.ID, deal.Customer.Name)
				}
				e.Detail = prettyJSON(diff)
			}
			if masked {
				e.Summary = maskCustomer(e.Summary, deal.Customer)
			}
			data.Entries = append(data.Entries, e)
		}
	}
	sort.SliceStable(data.Entries, func(i, j int) bool {
		a, b := data.Entries[i], data.Entries[j]
		if !a.At.Equal(b.At) {
			return a.At.Before(b.At)
		}
		return a.Position < b.Position
	})
	d.render(w, r, http.StatusOK, "timeline", view{Title: "Deal " + short(id), Nav: "deals", Data: data})
}

func short(s string) string {
	if len(s) > 8 {
		return s[:8]
	}
	return s
}

// maskCustomer hides the customer's id and name wherever free text (an
// ERP error message, a reason) repeats them.
func maskCustomer(s string, c domain.Customer) string {
	for _, v := range []string{c.Name, c.ID} {
		if len(v) >= 2 {
			s = strings.ReplaceAll(s, v, auth.MaskString(v))
		}
	}
	return s
}

// describe fills the entry's source, summary, class and link from its event.
func describe(e *entry, stream string, payload []byte) {
	var p map[string]any
	_ = json.Unmarshal(payload, &p)
	str := func(k string) string {
		switch v := p[k].(type) {
		case string:
			return v
		case float64:
			return fmt.Sprintf("%.0f", v)
		case bool:
			return fmt.Sprint(v)
		}
		return ""
	}
	switch {
	case strings.HasPrefix(stream, "deal-"):
		e.Source = "deal"
	case strings.HasPrefix(stream, "invoice-"):
		e.Source = "saga " + strings.TrimPrefix(stream, "invoice-")
	case strings.HasPrefix(stream, "alert-"):
		e.Source = "alert"
		e.Link = "/alerts"
	case strings.HasPrefix(stream, "deadletter-"):
		e.Source = "dead letter"
		e.Link = "/dead-letters/" + strings.TrimPrefix(stream, "deadletter-")
	case strings.HasPrefix(stream, "inventory-"):
		e.Source = "inventory"
	default:
		e.Source = stream
	}
	e.Class = "info"
	switch e.Kind {
	case domain.TypeDealCreated:
		cust, _ := p["customer"].(map[string]any)
		name, _ := cust["name"].(string)
		e.Summary = fmt.Sprintf("Deal created for %s: %s %s", name, str("total"), str("currency"))
	case domain.TypeDealWon:
		e.Summary = fmt.Sprintf("CRM status: won (close version %s, idempotency key %s)", str("close_version"), str("idempotency_key"))
	case domain.TypeDealLost:
		e.Summary = "CRM status: lost"
	case domain.TypeInventoryAllocated:
		e.Summary = fmt.Sprintf("Allocated %s × %s", str("quantity"), str("sku"))
	case domain.TypeInventoryReleased:
		e.Summary = fmt.Sprintf("Released %s × %s (compensation)", str("quantity"), str("sku"))
		e.Class = "warn"
	case domain.TypeInvoiceAttemptFailed:
		status := str("status_code")
		if status == "" {
			status = "no response"
		} else {
			status = "HTTP " + status
		}
		final := ""
		if str("final") == "true" {
			final = " (final)"
		}
		e.Summary = fmt.Sprintf("ERP attempt %s failed%s: %s, %s in %s ms — %s", str("attempt"), final, str("error_class"), status, str("latency_ms"), str("message"))
		e.Class = "fail"
	case domain.TypeInvoiceFailed:
		e.Summary = fmt.Sprintf("Invoice saga failed after %s attempt(s): %s — %s", str("attempts"), str("error_class"), str("reason"))
		e.Class = "fail"
	case domain.TypeDealReverted:
		e.Summary = "CRM status: reverted (compensation) — " + str("reason")
		e.Class = "warn"
	case domain.TypeAlertRaised:
		e.Summary = fmt.Sprintf("Alert raised (%s, %s): %s", str("severity"), str("kind"), str("message"))
		e.Class = "fail"
	case domain.TypeMessageDeadLettered:
		e.Summary = fmt.Sprintf("Dead-lettered (%s) after %s attempt(s): %s", str("error_class"), str("attempts"), str("reason"))
		e.Class = "fail"
	case domain.TypeDeadLetterEdited:
		e.Summary = fmt.Sprintf("Payload revision %s by %s: %s", str("revision"), str("actor"), str("reason"))
		if str("needs_approval") == "true" {
			e.Summary += " (changes money: needs approval)"
		}
		e.Class = "op"
	case domain.TypeDeadLetterApproved:
		e.Summary = fmt.Sprintf("Revision %s approved by %s", str("revision"), str("actor"))
		e.Class = "op"
	case domain.TypeDeadLetterReinjected:
		e.Summary = fmt.Sprintf("Re-injected by %s with key %s: %s", str("actor"), str("idempotency_key"), str("reason"))
		e.Class = "op"
	case domain.TypeDeadLetterDiscarded:
		e.Summary = fmt.Sprintf("Discarded by %s: %s", str("actor"), str("reason"))
		e.Class = "op"
	case domain.TypeDeadLetterResolved:
		e.Summary = "Dead letter resolved by the invoice " + str("invoice_number")
		e.Class = "ok"
	case domain.TypeDeadLetterReopened:
		e.Summary = "Dead letter reopened: " + str("reason")
		e.Class = "warn"
	case domain.TypeAlertAcknowledged:
		e.Summary = "Alert acknowledged by " + str("actor")
		e.Class = "op"
	case domain.TypeAlertResolved:
		e.Summary = fmt.Sprintf("Alert resolved by %s: %s", str("actor"), str("reason"))
		e.Class = "ok"
	case domain.TypeDealReinstated:
		e.Summary = "CRM status: won again (reinstated by a re-inject; inventory allocated again)"
		e.Class = "op"
	case domain.TypeInvoiceSagaResumed:
		e.Summary = "Invoice saga resumed with a fresh retry budget"
		e.Class = "op"
	case domain.TypeInvoiceCreated:
		e.Summary = fmt.Sprintf("ERP invoice %s created (attempt %s) — CRM status: invoiced", str("invoice_number"), str("attempts"))
		e.Class = "ok"
	default:
		e.Summary = e.Kind
	}
}
