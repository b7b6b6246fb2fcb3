package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/adapters/reconcile"
	"github.com/dealbridge/dealbridge/cmd/app"
)

// runReconcile runs one reconciliation pass: won deals older than --after
// without an invoice are looked up in the ERP by K; found → recorded,
// missing → alerted (once per K). It prints what it did and the age of the
// oldest unreconciled deal.
//
// The ERP is chosen as the handler chooses it (--erp http|tryton and the
// Tryton flags, through app.ERPPort): reconciliation must look in the ERP
// the handler invoices in.
func runReconcile(ctx context.Context, env Env, args []string) error {
	var (
		c          common
		erpURL     string
		erpTimeout time.Duration
		ef         erpFlags
		after      time.Duration
		limit      int
		asJSON     bool
	)
	f := newFlags(env, "reconcile", "reconcile [--after 10m] [--erp http|tryton] [--erp-url URL] [--json] [flags]")
	c.register(f)
	f.string(&erpURL, "erp-url", "DEALBRIDGE_ERP_URL", "http://127.0.0.1:8081", "base URL of the ERP's HTTP API (with --erp http)")
	f.duration(&erpTimeout, "erp-timeout", "DEALBRIDGE_ERP_TIMEOUT", 10*time.Second, "timeout of one ERP call")
	ef.register(f)
	f.duration(&after, "after", "DEALBRIDGE_RECONCILE_AFTER", 10*time.Minute, "check deals won at least this long ago")
	f.IntVar(&limit, "limit", 500, "at most this many deals per pass, oldest first")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	if err := f.parse(args); err != nil {
		return err
	}
	erpCfg := app.HandlerConfig{ERPURL: erpURL, ERPTimeout: erpTimeout}
	if ef.kind != "" {
		if err := ef.apply(env, &erpCfg); err != nil {
			return err
		}
	}
	if err := c.requireDB(); err != nil {
		return err
	}
	logger, err := c.logger(env)
	if err != nil {
		return err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, "dealbridge-reconcile", 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	port, closePort, err := app.ERPPort(erpCfg, logger)
	if err != nil {
		return fmt.Errorf("cannot set up the ERP: %w", err)
	}
	defer closePort()
	res, err := reconcile.New(postgres.NewStore(pool), port, reconcile.Config{After: after, Limit: limit, Logger: logger}).RunOnce(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		return writeJSONTo(env.Stdout, res)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEAL\tKEY\tWON FOR\tQUEUED\tACTION\tDETAIL")
	for _, o := range res.Checked {
		detail := o.InvoiceNumber
		if o.AlertID != "" {
			detail = "alert " + o.AlertID
		}
		if o.Error != "" {
			detail = clip(o.Error, 80)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\t%s\n", o.DealID, o.IdempotencyKey, o.Age.Round(time.Second), o.Queued, o.Action, detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(env.Stdout, "checked %d won deal(s) older than %s: %d invoice(s) recorded from the ERP, %d alert(s) raised, %d lookup(s) failed\n",
		len(res.Checked), after, res.Recorded, res.Alerted, res.Failed)
	if res.Oldest == nil {
		fmt.Fprintln(env.Stdout, "oldest unreconciled deal: none (every won deal is invoiced)")
	} else {
		fmt.Fprintf(env.Stdout, "oldest unreconciled deal: %s, won %s ago\n", res.Oldest.DealID, res.Oldest.Age.Round(time.Second))
	}
	if res.Failed > 0 {
		// Name the first failure, so that the error line says why (an
		// unreachable ERP, a refused login) without the table.
		for _, o := range res.Checked {
			if o.Error != "" {
				return fmt.Errorf("%d ERP lookup(s) failed; the first, of deal %s: %s", res.Failed, o.DealID, o.Error)
			}
		}
		return fmt.Errorf("%d ERP lookup(s) failed", res.Failed)
	}
	return nil
}
