package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/dealbridge/dealbridge/adapters/postgres"
	"github.com/dealbridge/dealbridge/cmd/internal/app"
)

func runAlerts(ctx context.Context, env Env, args []string) error {
	if len(args) == 0 || args[0] != "list" {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(env.Stderr, "Usage: dealbridge alerts list [--state open|acknowledged|resolved] [--limit N] [--json]")
			return nil
		}
		return &usageError{msg: "expected: alerts list [flags]"}
	}
	var (
		c      common
		state  string
		limit  int
		asJSON bool
	)
	f := newFlags(env, "alerts list", "alerts list [flags]")
	c.register(f)
	f.StringVar(&state, "state", "", "only alerts in this state (open, acknowledged, resolved)")
	f.IntVar(&limit, "limit", 100, "at most this many, newest first")
	f.BoolVar(&asJSON, "json", false, "print a JSON array")
	if err := f.parse(args[1:]); err != nil {
		return err
	}
	switch state {
	case "", "open", "acknowledged", "resolved":
	default:
		return &usageError{msg: fmt.Sprintf("invalid --state %q (open, acknowledged or resolved)", state)}
	}
	if limit < 1 || limit > 100000 {
		return &usageError{msg: "--limit must be between 1 and 100000"}
	}
	store, closeFn, err := openStore(ctx, &c, "dealbridge-cli")
	if err != nil {
		return err
	}
	defer closeFn()
	alerts, err := store.ListAlerts(ctx, state, limit)
	if err != nil {
		return err
	}
	if asJSON {
		return writeJSONTo(env.Stdout, alerts)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tSEVERITY\tKIND\tDEAL\tCREATED\tMESSAGE")
	for _, a := range alerts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.State, a.Severity, a.Kind, deref(a.DealID),
			a.CreatedAt.UTC().Format("2006-01-02 15:04:05"), clip(a.Message, 80))
	}
	return tw.Flush()
}

func runDLQ(ctx context.Context, env Env, args []string) error {
	if len(args) == 0 || args[0] != "list" {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			fmt.Fprintln(env.Stderr, "Usage: dealbridge dlq list [--state open|reinjected|discarded|resolved] [--limit N] [--json]")
			return nil
		}
		return &usageError{msg: "expected: dlq list [flags]"}
	}
	var (
		c      common
		state  string
		limit  int
		asJSON bool
	)
	f := newFlags(env, "dlq list", "dlq list [flags]")
	c.register(f)
	f.StringVar(&state, "state", "", "only dead letters in this state (open, reinjected, discarded, resolved)")
	f.IntVar(&limit, "limit", 100, "at most this many, newest first")
	f.BoolVar(&asJSON, "json", false, "print a JSON array")
	if err := f.parse(args[1:]); err != nil {
		return err
	}
	switch state {
	case "", "open", "reinjected", "discarded", "resolved":
	default:
		return &usageError{msg: fmt.Sprintf("invalid --state %q (open, reinjected, discarded or resolved)", state)}
	}
	if limit < 1 || limit > 100000 {
		return &usageError{msg: "--limit must be between 1 and 100000"}
	}
	store, closeFn, err := openStore(ctx, &c, "dealbridge-cli")
	if err != nil {
		return err
	}
	defer closeFn()
	dls, err := store.ListDeadLetters(ctx, state, limit)
	if err != nil {
		return err
	}
	if asJSON {
		return writeJSONTo(env.Stdout, dls)
	}
	tw := tabwriter.NewWriter(env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tCLASS\tATTEMPTS\tDEAL\tLAST FAILURE\tREASON")
	for _, d := range dls {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", d.ID, d.State, d.ErrorClass, d.Attempts, deref(d.DealID),
			d.LastFailureAt.UTC().Format("2006-01-02 15:04:05"), clip(d.Reason, 80))
	}
	return tw.Flush()
}

func openStore(ctx context.Context, c *common, name string) (*postgres.Store, func(), error) {
	if err := c.requireDB(); err != nil {
		return nil, nil, err
	}
	pool, err := app.NewPool(ctx, c.databaseURL, name, 2)
	if err != nil {
		return nil, nil, err
	}
	return postgres.NewStore(pool), pool.Close, nil
}

func writeJSONTo(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func deref(s *string) string {
	if s == nil {
		return "-"
	}
	return *s
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}
