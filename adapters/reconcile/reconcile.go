// Package reconcile compares dealbridge's view of won deals with the ERP's.
//
// A deal that has been won for longer than Config.After without an invoice
// recorded is looked up in the ERP by its idempotency key K. If the ERP has
// the invoice (the saga's success was lost: a crash, a lost response, a
// deleted work-queue message), it is recorded through the store, exactly as
// the saga would have. If the ERP has none, an "unreconciled_deal" alert is
// raised, once per K. The age of the oldest unreconciled deal is the
// measured counterpart of "zero data loss": it grows without bound for a
// loss that no error ever reported.
package reconcile

import (
	"context"
	"crypto/sha1"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/dealbridge/dealbridge/adapters/erp"
	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/domain"
)

// AlertKind is the kind of the alert raised for a deal the ERP has no
// invoice for.
const AlertKind = "unreconciled_deal"

// Actor is who reconciliation acts as, in event metadata and the audit log.
const Actor = "reconciler"

// Config configures a Reconciler.
type Config struct {
	// After is how long a deal must have been won before it is checked
	// (default 10m): the saga normally finishes well within it.
	After time.Duration
	// Limit caps the deals checked per run (default 500), oldest first.
	Limit  int
	Logger *slog.Logger
}

// Reconciler runs reconciliation passes.
type Reconciler struct {
	store *postgres.Store
	port  erp.Port
	cfg   Config
}

// New returns a Reconciler.
func New(store *postgres.Store, port erp.Port, cfg Config) *Reconciler {
	if cfg.After <= 0 {
		cfg.After = 10 * time.Minute
	}
	if cfg.Limit <= 0 {
		cfg.Limit = 500
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Reconciler{store: store, port: port, cfg: cfg}
}

// Outcome is what a pass did with one deal.
type Outcome struct {
	postgres.UnreconciledDeal
	// Action: "recorded" (the ERP had the invoice), "alerted" (it has
	// none; alert raised), "already_alerted", "recorded_meanwhile" (the
	// saga finished first) or "lookup_failed".
	Action        string `json:"action"`
	InvoiceNumber string `json:"invoice_number,omitempty"`
	AlertID       string `json:"alert_id,omitempty"`
	Error         string `json:"error,omitempty"`
}

// Result is one pass.
type Result struct {
	Checked  []Outcome `json:"checked"`
	Recorded int       `json:"recorded"`
	Alerted  int       `json:"alerted"`
	Failed   int       `json:"failed"`
	// Oldest is the oldest deal still unreconciled after the pass (of any
	// age), nil when none.
	Oldest *postgres.UnreconciledDeal `json:"oldest,omitempty"`
}

// AlertID is the id of the unreconciled-deal alert of key K: derived from
// K (a name-based UUID), so that every pass and every handler process
// raises the same alert, which the event log then admits only once.
func AlertID(key string) string {
	ns := []byte("dealbridge/unreconciled_deal/")
	h := sha1.Sum(append(ns, key...))
	h[6] = (h[6] & 0x0f) | 0x50 // version 5
	h[8] = (h[8] & 0x3f) | 0x80 // RFC 4122 variant
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

// RunOnce runs one reconciliation pass.
func (r *Reconciler) RunOnce(ctx context.Context) (Result, error) {
	var res Result
	deals, err := r.store.UnreconciledDeals(ctx, r.cfg.After, r.cfg.Limit)
	if err != nil {
		return res, err
	}
	meta := domain.Metadata{Actor: Actor, CorrelationID: "reconcile"}
	for _, d := range deals {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		o := r.one(ctx, d, meta)
		switch o.Action {
		case "recorded":
			res.Recorded++
		case "alerted":
			res.Alerted++
		case "lookup_failed":
			res.Failed++
		}
		res.Checked = append(res.Checked, o)
	}
	oldest, ok, err := r.store.OldestUnreconciled(ctx)
	if err != nil {
		return res, err
	}
	if ok {
		res.Oldest = &oldest
	}
	return res, nil
}

func (r *Reconciler) one(ctx context.Context, d postgres.UnreconciledDeal, meta domain.Metadata) Outcome {
	o := Outcome{UnreconciledDeal: d}
	log := r.cfg.Logger.With("deal", d.DealID, "idempotency_key", d.IdempotencyKey, "won_for", d.Age.Round(time.Second))
	// A lookup changes nothing in the ERP, and no transaction is open
	// across it (I5).
	inv, found, err := r.port.FindInvoiceByKey(ctx, d.IdempotencyKey)
	if err != nil {
		o.Action, o.Error = "lookup_failed", err.Error()
		log.Warn("reconcile: ERP lookup failed; will retry next pass", "err", err)
		return o
	}
	if found {
		if inv.Reference != "" && inv.Reference != d.DealID {
			return r.alert(ctx, o, meta, domain.SeverityCritical, fmt.Sprintf(
				"deal %s: the ERP invoice %s for key %s references %s, not this deal", d.DealID, inv.Number, d.IdempotencyKey, inv.Reference))
		}
		recorded, err := r.store.RecordInvoice(ctx, d.DealID, d.IdempotencyKey, inv.Number, meta)
		if err != nil {
			o.Action, o.Error = "lookup_failed", err.Error()
			log.Warn("reconcile: cannot record the invoice found in the ERP", "err", err)
			return o
		}
		o.InvoiceNumber = inv.Number
		o.Action = "recorded_meanwhile"
		if recorded {
			o.Action = "recorded"
			log.Warn("reconcile: recorded an invoice the saga never recorded", "invoice", inv.Number)
		}
		// The deal is reconciled: an alert an earlier pass raised is done.
		id := AlertID(d.IdempotencyKey)
		if st, ok, err := r.store.AlertState(ctx, id); err == nil && ok && st != "resolved" {
			if err := r.store.ResolveAlert(ctx, id, "the ERP invoice "+inv.Number+" was found and recorded",
				postgres.Actor{Name: Actor, Role: "system"}); err != nil {
				log.Warn("reconcile: cannot resolve the alert", "alert", id, "err", err)
			}
		}
		return o
	}
	where := "its invoice request is in no queue: the message was lost or never relayed"
	severity := domain.SeverityCritical
	if d.Queued {
		where = "its invoice request is still queued (the saga keeps retrying)"
		severity = domain.SeverityWarning
	}
	return r.alert(ctx, o, meta, severity, fmt.Sprintf("deal %s has been won for %s without an invoice, and the ERP has none for key %s; %s",
		d.DealID, d.Age.Round(time.Second), d.IdempotencyKey, where))
}

func (r *Reconciler) alert(ctx context.Context, o Outcome, meta domain.Metadata, severity, msg string) Outcome {
	id := AlertID(o.IdempotencyKey)
	o.AlertID = id
	if _, ok, err := r.store.AlertState(ctx, id); err == nil && ok {
		o.Action = "already_alerted"
		return o
	}
	_, err := r.store.RaiseAlert(ctx, domain.AlertRaised{AlertID: id, Kind: AlertKind, Severity: severity,
		DealID: o.DealID, IdempotencyKey: o.IdempotencyKey, Message: msg}, meta)
	switch {
	case errors.Is(err, domain.ErrVersionConflict):
		o.Action = "already_alerted" // another process raised it just now
	case err != nil:
		o.Action, o.Error = "lookup_failed", err.Error()
		r.cfg.Logger.Warn("reconcile: cannot raise the alert", "deal", o.DealID, "err", err)
	default:
		o.Action = "alerted"
		r.cfg.Logger.Error("reconcile: deal won without an invoice", "deal", o.DealID, "idempotency_key", o.IdempotencyKey,
			"won_for", o.Age.Round(time.Second), "queued", o.Queued)
	}
	return o
}

// Run runs a pass every interval until ctx is done. A failed pass is
// logged and retried at the next tick.
func (r *Reconciler) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		res, err := r.RunOnce(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			r.cfg.Logger.Warn("reconcile: pass failed", "err", err)
		default:
			args := []any{"checked", len(res.Checked), "recorded", res.Recorded, "alerted", res.Alerted, "lookup_failed", res.Failed}
			if res.Oldest != nil {
				args = append(args, "oldest_unreconciled_age", res.Oldest.Age.Round(time.Second), "oldest_deal", res.Oldest.DealID)
			}
			r.cfg.Logger.Debug("reconcile: pass done", args...)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
